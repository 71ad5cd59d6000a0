//! CAN databases (DBC files) and the decoding and encoding of CAN frames with them.
//!
//! `can-dbc` parses the text; validation, bit layout, decoding and encoding are ours and
//! are checked against cantools by `tests/cantools_decode.rs`.
//!
//! Supported: standard and extended ids, Intel (`@1`) and Motorola (`@0`) signals of 1 to 64
//! bits, signed and unsigned integers, IEEE float32/float64 (`SIG_VALTYPE_`), factor and
//! offset, simple multiplexing (one `M` signal, `m<N>` signals), payloads up to 64 bytes
//! (CAN FD). Not supported (the file is rejected, naming the message): extended
//! multiplexing (`SG_MUL_VAL_`, `m<N>M`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use can_dbc::{MultiplexIndicator, SignalExtendedValueType};

/// Largest payload of a frame (CAN FD).
pub const MAX_PAYLOAD: usize = 64;

/// A CAN identifier as it appears on the bus: 11 bits, or 29 bits when `extended`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanId {
    pub id: u32,
    pub extended: bool,
}

impl CanId {
    /// One number per id, extended ids with bit 31 set (as DBC files write them).
    fn key(self) -> u32 {
        self.id | (u32::from(self.extended) << 31)
    }
}

impl fmt::Display for CanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.extended {
            write!(f, "0x{:08X} (extended)", self.id)
        } else {
            write!(f, "0x{:03X}", self.id)
        }
    }
}

/// Bit order of a signal in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    /// `@1`: Intel, little-endian; the DBC start bit is the least significant bit.
    LittleEndian,
    /// `@0`: Motorola, big-endian; the DBC start bit is the most significant bit.
    BigEndian,
}

/// How a signal's raw bits are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Unsigned,
    Signed,
    /// IEEE 754 binary32 (`SIG_VALTYPE_ ... : 1;`).
    Float32,
    /// IEEE 754 binary64 (`SIG_VALTYPE_ ... : 2;`).
    Float64,
}

/// A signal's part in multiplexing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxRole {
    /// Always present.
    Plain,
    /// `M`: its raw value selects which `m<N>` signals the frame carries.
    Multiplexor,
    /// `m<N>`: present only when the multiplexor's raw value is `N`.
    Multiplexed(u64),
}

/// A raw signal value, before factor and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw {
    Unsigned(u64),
    Signed(i64),
    Float32(f32),
    Float64(f64),
}

/// A signal as the DBC defines it.
#[derive(Debug, Clone)]
pub struct SignalDef {
    pub name: String,
    pub start_bit: u16,
    pub len: u8,
    pub byte_order: ByteOrder,
    pub value_type: ValueType,
    pub factor: f64,
    pub offset: f64,
    pub min: f64,
    pub max: f64,
    pub unit: String,
    pub mux: MuxRole,
    pub receivers: Vec<String>,
    pub comment: Option<String>,
    codec: Codec,
}

impl SignalDef {
    /// Physical value of a raw value: `raw * factor + offset`.
    pub fn physical(&self, raw: Raw) -> f64 {
        self.codec.apply(raw)
    }

    /// The smallest and largest physical values the raw bits can hold (integer signals),
    /// or the finite range of the float type scaled (float signals).
    pub fn physical_range(&self) -> (f64, f64) {
        let (lo, hi) = match self.value_type {
            ValueType::Unsigned => (0.0, pow2(i32::from(self.len)) - 1.0),
            ValueType::Signed => {
                let half = pow2(i32::from(self.len) - 1);
                (-half, half - 1.0)
            }
            ValueType::Float32 => (f64::from(f32::MIN), f64::from(f32::MAX)),
            ValueType::Float64 => (f64::MIN, f64::MAX),
        };
        let (a, b) = (self.codec.scale(lo), self.codec.scale(hi));
        (a.min(b), a.max(b))
    }
}

/// A message (frame) as the DBC defines it.
#[derive(Debug, Clone)]
pub struct MessageDef {
    pub name: String,
    pub id: CanId,
    /// Payload length in bytes (the DBC's DLC field).
    pub size: usize,
    pub transmitter: Option<String>,
    pub comment: Option<String>,
    pub signals: Vec<SignalDef>,
    /// Index in `signals` of the multiplexor, if the message is multiplexed.
    multiplexor: Option<usize>,
    /// The multiplexor values some `m<N>` signal uses, sorted.
    mux_values: Vec<u64>,
}

impl MessageDef {
    pub fn signal(&self, name: &str) -> Option<&SignalDef> {
        self.signals.iter().find(|s| s.name == name)
    }

    /// The multiplexor signal, if the message is multiplexed.
    pub fn multiplexor(&self) -> Option<&SignalDef> {
        self.multiplexor.and_then(|i| self.signals.get(i))
    }

    /// The multiplexor values this message defines signals for, ascending.
    pub fn mux_values(&self) -> &[u64] {
        &self.mux_values
    }

    /// Checks the frame length and, for a multiplexed message, reads the multiplexor value.
    fn check_frame(&self, data: &[u8]) -> Result<Option<u64>, DecodeError> {
        check_len(self.size, data)?;
        match self.multiplexor() {
            None => Ok(None),
            Some(mux) => check_mux(mux.codec.raw(data), &self.mux_values).map(Some),
        }
    }
}

fn check_len(size: usize, data: &[u8]) -> Result<(), DecodeError> {
    if data.len() < size {
        return Err(DecodeError::TooShort {
            expected: size,
            got: data.len(),
        });
    }
    Ok(())
}

fn check_mux(value: u64, known: &[u64]) -> Result<u64, DecodeError> {
    if known.binary_search(&value).is_ok() {
        Ok(value)
    } else {
        Err(DecodeError::UnknownMultiplexor(value))
    }
}

fn present(role: MuxRole, selected: Option<u64>) -> bool {
    match role {
        MuxRole::Multiplexed(n) => selected == Some(n),
        MuxRole::Plain | MuxRole::Multiplexor => true,
    }
}

// ---------------------------------------------------------------------------------------
// Bit layout

/// Where a signal's bits sit in the payload, computed once from the DBC start bit: the
/// signal lies in the `count` bytes from `first`; read them as one big-endian (Motorola) or
/// little-endian (Intel) integer, shift right by `shift`, keep `mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    first: u8,
    count: u8,
    shift: u8,
    big_endian: bool,
    mask: u64,
}

impl Layout {
    fn new(start_bit: u64, len: u64, order: ByteOrder, size: usize) -> Result<Self, String> {
        if !(1..=64).contains(&len) {
            return Err(format!("length {len} is not 1 to 64 bits"));
        }
        let bits = size as u64 * 8;
        if start_bit >= bits {
            return Err(format!(
                "start bit {start_bit} is outside the {size}-byte message"
            ));
        }
        // Intel: DBC bit i is bit i % 8 (counting from the LSB) of byte i / 8 and the start
        // bit is the signal's LSB, so the signal is bits start.. of the little-endian payload.
        // Motorola: the start bit is the signal's MSB, numbered the same way ("sawtooth":
        // 7..0 in byte 0, 15..8 in byte 1). In network order (bit 0 = MSB of byte 0; cantools'
        // `sawtooth_to_network_bitnum`) that MSB is bit 8 * (s / 8) + 7 - s % 8, and the
        // signal is the `len` bits from there in the big-endian payload.
        let (lo, hi, shift, big_endian) = match order {
            ByteOrder::LittleEndian => {
                let last = start_bit + len - 1;
                if last >= bits {
                    return Err(format!(
                        "bits {start_bit}..={last} run past the end of the {size}-byte message"
                    ));
                }
                (start_bit / 8, last / 8, start_bit % 8, false)
            }
            ByteOrder::BigEndian => {
                let msb = 8 * (start_bit / 8) + 7 - start_bit % 8;
                let lsb = msb + len - 1;
                if lsb >= bits {
                    return Err(format!(
                        "Motorola signal from bit {start_bit} ({len} bits) runs past the end of \
                         the {size}-byte message"
                    ));
                }
                (msb / 8, lsb / 8, 7 - lsb % 8, true)
            }
        };
        let mask = if len == 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        // Bounded above: size <= 64 bytes, so bytes < 64, count <= 9, shift < 8.
        Ok(Self {
            first: lo as u8,
            count: (hi - lo + 1) as u8,
            shift: shift as u8,
            big_endian,
            mask,
        })
    }

    /// Payload bits covered by this signal, as (byte, bit mask) pairs.
    fn occupied(&self) -> impl Iterator<Item = (usize, u8)> + '_ {
        let mut window = [0u8; 9];
        let count = usize::from(self.count);
        self.write_window(&mut window[..count], self.mask);
        window
            .into_iter()
            .take(count)
            .enumerate()
            .map(|(i, m)| (usize::from(self.first) + i, m))
    }

    #[inline]
    fn extract(&self, data: &[u8]) -> u64 {
        let first = usize::from(self.first);
        let Some(bytes) = data.get(first..first + usize::from(self.count)) else {
            return 0;
        };
        if bytes.len() <= 8 {
            let mut w = 0u64;
            if self.big_endian {
                for &b in bytes {
                    w = (w << 8) | u64::from(b);
                }
            } else {
                for &b in bytes.iter().rev() {
                    w = (w << 8) | u64::from(b);
                }
            }
            (w >> self.shift) & self.mask
        } else {
            ((window(bytes, self.big_endian) >> self.shift) as u64) & self.mask
        }
    }

    /// Writes `raw` into the payload.
    fn insert(&self, data: &mut [u8], raw: u64) {
        let first = usize::from(self.first);
        if let Some(bytes) = data.get_mut(first..first + usize::from(self.count)) {
            self.write_window(bytes, raw);
        }
    }

    /// Writes `raw` into the signal's `count` bytes.
    fn write_window(&self, bytes: &mut [u8], raw: u64) {
        let mask = u128::from(self.mask) << self.shift;
        let mut w = window(bytes, self.big_endian);
        w = (w & !mask) | ((u128::from(raw & self.mask) << self.shift) & mask);
        let write = |b: &mut u8| {
            *b = w as u8;
            w >>= 8;
        };
        if self.big_endian {
            bytes.iter_mut().rev().for_each(write);
        } else {
            bytes.iter_mut().for_each(write);
        }
    }
}

fn window(bytes: &[u8], big_endian: bool) -> u128 {
    let fold = |w: u128, &b: &u8| (w << 8) | u128::from(b);
    if big_endian {
        bytes.iter().fold(0, fold)
    } else {
        bytes.iter().rev().fold(0, fold)
    }
}

/// 2^n as an exact f64 (n in -1022..=1023).
fn pow2(n: i32) -> f64 {
    f64::from_bits(((1023 + n) as u64) << 52)
}

// ---------------------------------------------------------------------------------------
// Raw <-> physical

/// Everything needed to turn payload bytes into a physical value, and back.
#[derive(Debug, Clone, Copy)]
struct Codec {
    layout: Layout,
    value_type: ValueType,
    len: u8,
    factor: f64,
    offset: f64,
    /// factor 1 and offset 0: the raw value is the physical value, untouched (this keeps
    /// -0.0 of a float signal, as cantools does).
    identity: bool,
}

impl Codec {
    #[inline]
    fn raw(&self, data: &[u8]) -> u64 {
        self.layout.extract(data)
    }

    #[inline]
    fn typed(&self, raw: u64) -> Raw {
        match self.value_type {
            ValueType::Unsigned => Raw::Unsigned(raw),
            ValueType::Signed => {
                let unused = 64 - u32::from(self.len);
                Raw::Signed(((raw << unused) as i64) >> unused)
            }
            ValueType::Float32 => Raw::Float32(f32::from_bits(raw as u32)),
            ValueType::Float64 => Raw::Float64(f64::from_bits(raw)),
        }
    }

    #[inline]
    fn decode(&self, data: &[u8]) -> f64 {
        self.apply(self.typed(self.raw(data)))
    }

    #[inline]
    fn apply(&self, raw: Raw) -> f64 {
        let v = match raw {
            Raw::Unsigned(v) => v as f64,
            Raw::Signed(v) => v as f64,
            Raw::Float32(v) => f64::from(v),
            Raw::Float64(v) => v,
        };
        self.scale(v)
    }

    #[inline]
    fn scale(&self, v: f64) -> f64 {
        if self.identity {
            v
        } else {
            v * self.factor + self.offset
        }
    }

    /// The raw bits for a physical value, rounded half to even like cantools (Python's
    /// `round`); `None` when the value does not fit the signal.
    fn encode(&self, physical: f64) -> Option<u64> {
        let v = if self.identity {
            physical
        } else {
            (physical - self.offset) / self.factor
        };
        match self.value_type {
            ValueType::Float64 => Some(v.to_bits()),
            ValueType::Float32 => {
                let f = v as f32;
                (f.is_finite() || !v.is_finite()).then_some(u64::from(f.to_bits()))
            }
            ValueType::Unsigned => {
                let r = v.round_ties_even();
                (r >= 0.0 && r < pow2(i32::from(self.len))).then_some(r as u64)
            }
            ValueType::Signed => {
                let r = v.round_ties_even();
                let half = pow2(i32::from(self.len) - 1);
                (r >= -half && r < half).then_some((r as i64 as u64) & self.layout.mask)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// A DBC file that cannot be used: where (file, line when known) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbcError {
    pub path: Option<PathBuf>,
    pub line: Option<usize>,
    pub reason: String,
}

impl DbcError {
    fn new(line: Option<usize>, reason: impl Into<String>) -> Self {
        Self {
            path: None,
            line,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DbcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line) {
            (Some(p), Some(l)) => write!(f, "{}:{l}: {}", p.display(), self.reason),
            (Some(p), None) => write!(f, "{}: {}", p.display(), self.reason),
            (None, Some(l)) => write!(f, "DBC line {l}: {}", self.reason),
            (None, None) => write!(f, "DBC: {}", self.reason),
        }
    }
}

impl std::error::Error for DbcError {}

/// A message or signal name that is not in the DBC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("DBC has no message `{message}`")]
    NoMessage { message: String },
    #[error("message `{message}` has no signal `{signal}` (it has: {available})")]
    NoSignal {
        message: String,
        signal: String,
        available: String,
    },
    #[error("signal reference from another DBC")]
    ForeignSignal,
}

/// Why a frame was not decoded. The caller counts these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("CAN id not in the decoder")]
    UnknownId,
    #[error("frame has {got} data bytes, the message needs {expected}")]
    TooShort { expected: usize, got: usize },
    #[error("multiplexor value {0} is not defined for the message")]
    UnknownMultiplexor(u64),
}

impl DecodeError {
    /// A stable short name, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::UnknownId => "unknown_id",
            DecodeError::TooShort { .. } => "too_short",
            DecodeError::UnknownMultiplexor(_) => "unknown_multiplexor",
        }
    }
}

/// Why values could not be encoded into a frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("message `{message}` needs {need} bytes, the buffer has {got}")]
    BufferTooSmall {
        message: String,
        need: usize,
        got: usize,
    },
    #[error("message `{message}` is multiplexed: give a value for `{multiplexor}`")]
    MissingMultiplexor {
        message: String,
        multiplexor: String,
    },
    #[error("message `{message}` defines no signals for multiplexor value {value}")]
    UnknownMultiplexor { message: String, value: u64 },
    #[error(
        "signal `{signal}` of `{message}` is sent with multiplexor value {needs}, not {selected}"
    )]
    WrongMultiplexor {
        message: String,
        signal: String,
        needs: u64,
        selected: u64,
    },
    #[error("{value} does not fit signal `{signal}` of `{message}` (range {min} to {max})")]
    OutOfRange {
        message: String,
        signal: String,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("signal `{signal}` of `{message}` is given twice")]
    Duplicate { message: String, signal: String },
}

// ---------------------------------------------------------------------------------------
// The database

/// A loaded, validated DBC. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dbc {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Distinguishes databases, so a `SignalRef` from another one is refused.
    token: u64,
    messages: Vec<MessageDef>,
    by_id: HashMap<u32, usize>,
    by_name: HashMap<String, usize>,
}

/// A signal of a `Dbc`, found by name with [`Dbc::signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalRef {
    token: u64,
    message: usize,
    signal: usize,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

impl Dbc {
    /// Reads a DBC file (UTF-8, or Windows-1252 as Vector tools write them).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DbcError> {
        let path = path.as_ref();
        let with_path = |mut e: DbcError| {
            e.path = Some(path.to_path_buf());
            e
        };
        let bytes =
            std::fs::read(path).map_err(|e| with_path(DbcError::new(None, e.to_string())))?;
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => can_dbc::decode_cp1252(&bytes).ok_or_else(|| {
                with_path(DbcError::new(None, "neither UTF-8 nor Windows-1252 text"))
            })?,
        };
        Self::from_text(&text).map_err(with_path)
    }

    pub fn from_text(text: &str) -> Result<Self, DbcError> {
        check_standard_ids(text)?;
        let parsed = can_dbc::Dbc::try_from(text).map_err(parse_error)?;
        let messages = build::messages(&parsed, text)?;
        let mut by_id = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            if let Some(prev) = by_id.insert(m.id.key(), i) {
                return Err(DbcError::new(
                    build::line_of(text, &m.name, None),
                    format!(
                        "messages `{}` and `{}` have the same id {}",
                        messages[prev].name, m.name, m.id
                    ),
                ));
            }
            if by_name.insert(m.name.clone(), i).is_some() {
                return Err(DbcError::new(
                    build::line_of(text, &m.name, None),
                    format!("two messages are named `{}`", m.name),
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                token: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
                messages,
                by_id,
                by_name,
            }),
        })
    }

    pub fn messages(&self) -> &[MessageDef] {
        &self.inner.messages
    }

    pub fn message(&self, name: &str) -> Result<&MessageDef, LookupError> {
        self.inner
            .by_name
            .get(name)
            .map(|&i| &self.inner.messages[i])
            .ok_or_else(|| LookupError::NoMessage {
                message: name.to_owned(),
            })
    }

    pub fn message_by_id(&self, id: u32, extended: bool) -> Option<&MessageDef> {
        let key = CanId { id, extended }.key();
        self.inner.by_id.get(&key).map(|&i| &self.inner.messages[i])
    }

    /// Finds `message`.`signal`; the error says which of the two is missing.
    pub fn signal(&self, message: &str, signal: &str) -> Result<SignalRef, LookupError> {
        let m = *self
            .inner
            .by_name
            .get(message)
            .ok_or_else(|| LookupError::NoMessage {
                message: message.to_owned(),
            })?;
        let def = &self.inner.messages[m];
        let s = def
            .signals
            .iter()
            .position(|s| s.name == signal)
            .ok_or_else(|| LookupError::NoSignal {
                message: message.to_owned(),
                signal: signal.to_owned(),
                available: def
                    .signals
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(SignalRef {
            token: self.inner.token,
            message: m,
            signal: s,
        })
    }

    /// The message and signal definitions behind a reference from this DBC.
    pub fn resolve(&self, r: SignalRef) -> Result<(&MessageDef, &SignalDef), LookupError> {
        if r.token != self.inner.token {
            return Err(LookupError::ForeignSignal);
        }
        let m = self
            .inner
            .messages
            .get(r.message)
            .ok_or(LookupError::ForeignSignal)?;
        let s = m.signals.get(r.signal).ok_or(LookupError::ForeignSignal)?;
        Ok((m, s))
    }

    /// Every signal the frame carries, by name, with its physical value. Allocates: for
    /// tests and tools; the agent uses [`Decoder::decode`].
    pub fn decode_all(
        &self,
        id: u32,
        extended: bool,
        data: &[u8],
    ) -> Result<Vec<(String, f64)>, DecodeError> {
        self.decode_all_with(id, extended, data, |s, raw| s.physical(raw))
    }

    /// Like [`Dbc::decode_all`], with raw values (exact for 64-bit integers).
    pub fn decode_all_raw(
        &self,
        id: u32,
        extended: bool,
        data: &[u8],
    ) -> Result<Vec<(String, Raw)>, DecodeError> {
        self.decode_all_with(id, extended, data, |_, raw| raw)
    }

    fn decode_all_with<T>(
        &self,
        id: u32,
        extended: bool,
        data: &[u8],
        value: impl Fn(&SignalDef, Raw) -> T,
    ) -> Result<Vec<(String, T)>, DecodeError> {
        let msg = self
            .message_by_id(id, extended)
            .ok_or(DecodeError::UnknownId)?;
        let selected = msg.check_frame(data)?;
        Ok(msg
            .signals
            .iter()
            .filter(|s| present(s.mux, selected))
            .map(|s| {
                let raw = s.codec.typed(s.codec.raw(data));
                (s.name.clone(), value(s, raw))
            })
            .collect())
    }

    /// Encodes physical values into `data` as message `message`; returns the payload
    /// length. Signals not given are raw 0; a multiplexed message needs its multiplexor's
    /// value, and only signals of that multiplexor value may be given. Values are checked
    /// against what the bits can hold (not against the DBC's min/max).
    pub fn encode(
        &self,
        message: &str,
        values: &[(&str, f64)],
        data: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let msg = self.message(message)?;
        let size = msg.size;
        let Some(payload) = data.get_mut(..size) else {
            return Err(EncodeError::BufferTooSmall {
                message: msg.name.clone(),
                need: size,
                got: data.len(),
            });
        };
        payload.fill(0);
        let mut resolved = Vec::with_capacity(values.len());
        for &(name, value) in values {
            let r = self.signal(message, name)?;
            if resolved.iter().any(|&(s, _)| s == r.signal) {
                return Err(EncodeError::Duplicate {
                    message: msg.name.clone(),
                    signal: name.to_owned(),
                });
            }
            resolved.push((r.signal, value));
        }
        let raw_of = |index: usize, value: f64| {
            let s = &msg.signals[index];
            s.codec.encode(value).ok_or_else(|| {
                let (min, max) = s.physical_range();
                EncodeError::OutOfRange {
                    message: msg.name.clone(),
                    signal: s.name.clone(),
                    value,
                    min,
                    max,
                }
            })
        };
        let selected = match msg.multiplexor {
            None => None,
            Some(mux) => {
                let &(_, value) = resolved.iter().find(|&&(s, _)| s == mux).ok_or_else(|| {
                    EncodeError::MissingMultiplexor {
                        message: msg.name.clone(),
                        multiplexor: msg.signals[mux].name.clone(),
                    }
                })?;
                let raw = raw_of(mux, value)?;
                check_mux(raw, &msg.mux_values).map_err(|_| EncodeError::UnknownMultiplexor {
                    message: msg.name.clone(),
                    value: raw,
                })?;
                Some(raw)
            }
        };
        for &(index, value) in &resolved {
            let s = &msg.signals[index];
            if let (MuxRole::Multiplexed(needs), Some(selected)) = (s.mux, selected)
                && needs != selected
            {
                return Err(EncodeError::WrongMultiplexor {
                    message: msg.name.clone(),
                    signal: s.name.clone(),
                    needs,
                    selected,
                });
            }
            let raw = raw_of(index, value)?;
            s.codec.layout.insert(payload, raw);
        }
        Ok(size)
    }
}

/// can-dbc stores a standard id in 16 bits and silently truncates larger ones; catch ids
/// above 11 bits without the extended flag (bit 31) before that happens.
fn check_standard_ids(text: &str) -> Result<(), DbcError> {
    for (n, line) in text.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("BO_ ") else {
            continue;
        };
        let Some(Ok(id)) = rest.split_whitespace().next().map(str::parse::<u64>) else {
            continue; // the parser reports it
        };
        if id > 0x7FF && id & (1 << 31) == 0 {
            return Err(DbcError::new(
                Some(n + 1),
                format!(
                    "id {id} (0x{id:X}) is above 0x7FF, so must be an extended id: write it with \
                     bit 31 set ({})",
                    id | (1 << 31)
                ),
            ));
        }
    }
    Ok(())
}

fn parse_error(err: can_dbc::DbcError) -> DbcError {
    match &err {
        can_dbc::DbcError::Pest(e) => {
            // pest renders the position as ` --> LINE:COL`; its types are not re-exported.
            let rendered = e.to_string();
            let line = rendered
                .lines()
                .find_map(|l| l.trim_start().strip_prefix("--> "))
                .and_then(|pos| pos.split(':').next())
                .and_then(|n| n.trim().parse().ok());
            DbcError::new(
                line,
                format!(
                    "syntax error: {} in `{}`",
                    e.variant.message(),
                    e.line().trim()
                ),
            )
        }
        other => DbcError::new(None, other.to_string()),
    }
}

/// Turning can-dbc's tree into validated messages.
mod build {
    use super::*;

    /// Line number (1-based) of a message's `BO_` line, or of one of its `SG_` lines.
    pub(super) fn line_of(text: &str, message: &str, signal: Option<&str>) -> Option<usize> {
        let mut in_message = false;
        for (n, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("BO_") => {
                    let name = words.nth(1).map(|w| w.trim_end_matches(':'));
                    in_message = name == Some(message);
                    if in_message && signal.is_none() {
                        return Some(n + 1);
                    }
                }
                Some("SG_")
                    if in_message && words.next().map(|w| w.trim_end_matches(':')) == signal =>
                {
                    return Some(n + 1);
                }
                _ => {}
            }
        }
        None
    }

    fn valtype_line(text: &str, signal: &str) -> Option<usize> {
        text.lines()
            .position(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some("SIG_VALTYPE_") && words.nth(1) == Some(signal)
            })
            .map(|n| n + 1)
    }

    pub(super) fn messages(dbc: &can_dbc::Dbc, text: &str) -> Result<Vec<MessageDef>, DbcError> {
        if let Some(x) = dbc.extended_multiplex.first() {
            let name = dbc
                .messages
                .iter()
                .find(|m| m.id == x.message_id)
                .map_or("?", |m| m.name.as_str());
            return Err(DbcError::new(
                line_of(text, name, None),
                format!("message `{name}` uses extended multiplexing (SG_MUL_VAL_): not supported"),
            ));
        }
        let mut float_types = HashMap::new();
        for v in &dbc.signal_extended_value_type_list {
            let Some(m) = dbc.messages.iter().find(|m| m.id == v.message_id) else {
                return Err(DbcError::new(
                    valtype_line(text, &v.signal_name),
                    format!(
                        "SIG_VALTYPE_ for signal `{}` names message id {}, which does not exist",
                        v.signal_name,
                        v.message_id.raw()
                    ),
                ));
            };
            if !m.signals.iter().any(|s| s.name == v.signal_name) {
                return Err(DbcError::new(
                    valtype_line(text, &v.signal_name),
                    format!(
                        "SIG_VALTYPE_ names signal `{}`, which message `{}` does not have",
                        v.signal_name, m.name
                    ),
                ));
            }
            float_types.insert(
                (v.message_id, v.signal_name.as_str()),
                v.signal_extended_value_type,
            );
        }
        dbc.messages
            .iter()
            // Vector tools park signals that belong to no message here.
            .filter(|m| m.name != "VECTOR__INDEPENDENT_SIG_MSG")
            .map(|m| message(dbc, m, &float_types, text))
            .collect()
    }

    fn message(
        dbc: &can_dbc::Dbc,
        m: &can_dbc::Message,
        float_types: &HashMap<(can_dbc::MessageId, &str), SignalExtendedValueType>,
        text: &str,
    ) -> Result<MessageDef, DbcError> {
        let err = |signal: Option<&str>, reason: String| {
            let what = match signal {
                Some(s) => format!("signal `{s}` of message `{}`", m.name),
                None => format!("message `{}`", m.name),
            };
            DbcError::new(line_of(text, &m.name, signal), format!("{what}: {reason}"))
        };
        let size = usize::try_from(m.size)
            .ok()
            .filter(|&s| s <= MAX_PAYLOAD)
            .ok_or_else(|| err(None, format!("size {} is above 64 bytes", m.size)))?;
        let id = match m.id {
            can_dbc::MessageId::Standard(id) => CanId {
                id: u32::from(id),
                extended: false,
            },
            can_dbc::MessageId::Extended(id) => CanId { id, extended: true },
        };
        let mut signals: Vec<SignalDef> = Vec::with_capacity(m.signals.len());
        for s in &m.signals {
            if signals.iter().any(|d| d.name == s.name) {
                return Err(err(Some(&s.name), "is defined twice".into()));
            }
            let float = float_types.get(&(m.id, s.name.as_str())).copied();
            signals.push(signal(dbc, m, s, float, size).map_err(|r| err(Some(&s.name), r))?);
        }
        let mut multiplexor = None;
        for (i, s) in signals.iter().enumerate() {
            if s.mux == MuxRole::Multiplexor {
                if multiplexor.is_some() {
                    return Err(err(None, "has more than one multiplexor (M)".into()));
                }
                if matches!(s.value_type, ValueType::Float32 | ValueType::Float64) {
                    return Err(err(Some(&s.name), "a multiplexor cannot be a float".into()));
                }
                multiplexor = Some(i);
            }
        }
        let mut mux_values: Vec<u64> = signals
            .iter()
            .filter_map(|s| match s.mux {
                MuxRole::Multiplexed(n) => Some(n),
                _ => None,
            })
            .collect();
        mux_values.sort_unstable();
        mux_values.dedup();
        if multiplexor.is_none() && !mux_values.is_empty() {
            return Err(err(
                None,
                "has multiplexed (m<N>) signals but no multiplexor (M)".into(),
            ));
        }
        check_overlaps(&signals, &mux_values).map_err(|r| err(None, r))?;
        if mux_values.is_empty() {
            // A multiplexor that selects nothing is just a plain signal.
            multiplexor = None;
        }
        Ok(MessageDef {
            name: m.name.clone(),
            id,
            size,
            transmitter: m.transmitter.clone(),
            comment: dbc.message_comment(m.id).map(str::to_owned),
            signals,
            multiplexor,
            mux_values,
        })
    }

    fn signal(
        dbc: &can_dbc::Dbc,
        m: &can_dbc::Message,
        s: &can_dbc::Signal,
        float: Option<SignalExtendedValueType>,
        size: usize,
    ) -> Result<SignalDef, String> {
        let byte_order = match s.byte_order {
            can_dbc::ByteOrder::LittleEndian => ByteOrder::LittleEndian,
            can_dbc::ByteOrder::BigEndian => ByteOrder::BigEndian,
        };
        let value_type = match (float, s.value_type) {
            (Some(SignalExtendedValueType::IEEEfloat32Bit), _) => ValueType::Float32,
            (Some(SignalExtendedValueType::IEEEdouble64bit), _) => ValueType::Float64,
            (_, can_dbc::ValueType::Signed) => ValueType::Signed,
            (_, can_dbc::ValueType::Unsigned) => ValueType::Unsigned,
        };
        let needed = match value_type {
            ValueType::Float32 => Some(32),
            ValueType::Float64 => Some(64),
            _ => None,
        };
        if let Some(bits) = needed.filter(|&b| b != s.size) {
            return Err(format!(
                "is declared a {bits}-bit float (SIG_VALTYPE_) but is {} bits long",
                s.size
            ));
        }
        let mux = match s.multiplexer_indicator {
            MultiplexIndicator::Plain => MuxRole::Plain,
            MultiplexIndicator::Multiplexor => MuxRole::Multiplexor,
            MultiplexIndicator::MultiplexedSignal(n) => MuxRole::Multiplexed(n),
            MultiplexIndicator::MultiplexorAndMultiplexedSignal(_) => {
                return Err("extended multiplexing (m<N>M) is not supported".into());
            }
        };
        if !(s.factor.is_finite() && s.offset.is_finite()) {
            return Err(format!(
                "factor {} and offset {} must be finite",
                s.factor, s.offset
            ));
        }
        let layout = Layout::new(s.start_bit, s.size, byte_order, size)?;
        let len = s.size as u8; // 1..=64, checked by Layout::new
        Ok(SignalDef {
            name: s.name.clone(),
            start_bit: s.start_bit as u16, // < 512, checked by Layout::new
            len,
            byte_order,
            value_type,
            factor: s.factor,
            offset: s.offset,
            min: numeric(s.min),
            max: numeric(s.max),
            unit: s.unit.clone(),
            mux,
            receivers: s.receivers.clone(),
            comment: dbc.signal_comment(m.id, &s.name).map(str::to_owned),
            codec: Codec {
                layout,
                value_type,
                len,
                factor: s.factor,
                offset: s.offset,
                identity: s.factor == 1.0 && s.offset == 0.0,
            },
        })
    }

    fn numeric(v: can_dbc::NumericValue) -> f64 {
        match v {
            can_dbc::NumericValue::Uint(v) => v as f64,
            can_dbc::NumericValue::Int(v) => v as f64,
            can_dbc::NumericValue::Double(v) => v,
        }
    }

    /// Signals that can be in the same frame must not share bits.
    fn check_overlaps(signals: &[SignalDef], mux_values: &[u64]) -> Result<(), String> {
        let variants: Vec<Option<u64>> = if mux_values.is_empty() {
            vec![None]
        } else {
            mux_values.iter().copied().map(Some).collect()
        };
        for selected in variants {
            let mut owner: [Option<usize>; MAX_PAYLOAD * 8] = [None; MAX_PAYLOAD * 8];
            for (i, s) in signals.iter().enumerate() {
                if !present(s.mux, selected) {
                    continue;
                }
                for (byte, mask) in s.codec.layout.occupied() {
                    for bit in (0..8).filter(|b| mask & (1 << b) != 0) {
                        let slot = &mut owner[byte * 8 + bit];
                        if let Some(other) = slot.replace(i) {
                            return Err(format!(
                                "signals `{}` and `{}` overlap (byte {byte}, bit {bit})",
                                signals[other].name, s.name
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The hot path

/// Decodes the bound signals of a `Dbc` from frames, without allocating.
#[derive(Debug, Clone)]
pub struct Decoder {
    dbc: Dbc,
    /// Standard ids index this table directly; `NONE` marks ids not bound.
    standard: Box<[u16]>,
    /// Extended ids, sorted, with their plan.
    extended: Vec<(u32, u16)>,
    plans: Vec<Plan>,
}

const NONE: u16 = u16::MAX;

#[derive(Debug, Clone)]
struct Plan {
    id: CanId,
    size: usize,
    mux: Option<(Codec, Box<[u64]>)>,
    signals: Vec<Bound>,
}

#[derive(Debug, Clone)]
struct Bound {
    codec: Codec,
    field: usize,
    mux: MuxRole,
}

impl Decoder {
    /// A decoder for `bindings`: each signal's physical value goes out with its field id. A
    /// signal may be bound to several fields.
    pub fn new(dbc: &Dbc, bindings: &[(SignalRef, usize)]) -> Result<Self, LookupError> {
        let mut plans: Vec<Plan> = Vec::new();
        let mut plan_of_message: HashMap<usize, usize> = HashMap::new();
        for &(r, field) in bindings {
            let (msg, sig) = dbc.resolve(r)?;
            let p = *plan_of_message.entry(r.message).or_insert_with(|| {
                plans.push(Plan {
                    id: msg.id,
                    size: msg.size,
                    mux: msg
                        .multiplexor()
                        .map(|m| (m.codec, msg.mux_values.clone().into_boxed_slice())),
                    signals: Vec::new(),
                });
                plans.len() - 1
            });
            plans[p].signals.push(Bound {
                codec: sig.codec,
                field,
                mux: sig.mux,
            });
        }
        let mut standard = vec![NONE; 0x800].into_boxed_slice();
        let mut extended = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            // At most one plan per message, and a DBC has far fewer than 65535 messages.
            let i = u16::try_from(i).unwrap_or(NONE);
            match plan.id {
                CanId {
                    id,
                    extended: false,
                } => {
                    if let Some(slot) = standard.get_mut(id as usize) {
                        *slot = i;
                    }
                }
                CanId { id, extended: true } => extended.push((id, i)),
            }
        }
        extended.sort_unstable();
        Ok(Self {
            dbc: dbc.clone(),
            standard,
            extended,
            plans,
        })
    }

    /// The CAN ids carrying bound signals, for a receive filter.
    pub fn ids(&self) -> Vec<CanId> {
        let mut ids: Vec<CanId> = self.plans.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids
    }

    pub fn dbc(&self) -> &Dbc {
        &self.dbc
    }

    /// Pushes `(field, physical value)` for every bound signal the frame carries (no
    /// allocation once `out` has grown to the largest message). A frame
    /// longer than the message is fine (extra bytes are ignored, as cantools does); remote
    /// frames carry no data and should not be passed in.
    #[inline]
    pub fn decode(
        &mut self,
        id: u32,
        extended: bool,
        data: &[u8],
        out: &mut Vec<(usize, f64)>,
    ) -> Result<(), DecodeError> {
        let plan = self.plan(id, extended).ok_or(DecodeError::UnknownId)?;
        check_len(plan.size, data)?;
        let selected = match &plan.mux {
            None => None,
            Some((codec, known)) => Some(check_mux(codec.raw(data), known)?),
        };
        for b in &plan.signals {
            if present(b.mux, selected) {
                out.push((b.field, b.codec.decode(data)));
            }
        }
        Ok(())
    }

    #[inline]
    fn plan(&self, id: u32, extended: bool) -> Option<&Plan> {
        let index = if extended {
            let i = self.extended.binary_search_by_key(&id, |&(k, _)| k).ok()?;
            self.extended[i].1
        } else {
            *self.standard.get(id as usize)?
        };
        self.plans.get(usize::from(index))
    }

    /// Every signal of any message of the DBC (bound or not); see [`Dbc::decode_all`].
    pub fn decode_all(
        &self,
        id: u32,
        extended: bool,
        data: &[u8],
    ) -> Result<Vec<(String, f64)>, DecodeError> {
        self.dbc.decode_all(id, extended, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
VERSION ""
NS_ :
BS_:
BU_: ECU BTS
BO_ 768 BrakeTemps: 4 BTS
 SG_ DiscFL_raw : 0|16@1+ (0.1,-40) [-40|1400] "degC" ECU
 SG_ DiscFR : 16|16@1+ (0.1,-40) [-40|1400] "degC" ECU
BO_ 256 Engine: 8 ECU
 SG_ RPM : 7|16@0+ (1,0) [0|16000] "rpm" BTS
 SG_ Gear : 19|4@0- (1,0) [-1|6] "" BTS
 SG_ Mux M : 32|8@1+ (1,0) [0|0] "" BTS
 SG_ A m1 : 40|8@1+ (1,0) [0|0] "" BTS
 SG_ B m2 : 40|16@1+ (1,0) [0|0] "" BTS
"#;

    fn small() -> Dbc {
        Dbc::from_text(SMALL).expect("small DBC")
    }

    #[test]
    fn lookup_errors_name_message_and_signal() {
        let dbc = small();
        assert_eq!(
            dbc.signal("Brakes", "DiscFL").unwrap_err().to_string(),
            "DBC has no message `Brakes`"
        );
        assert_eq!(
            dbc.signal("BrakeTemps", "DiscFL").unwrap_err().to_string(),
            "message `BrakeTemps` has no signal `DiscFL` (it has: DiscFL_raw, DiscFR)"
        );
        let other = small();
        let r = other.signal("BrakeTemps", "DiscFR").unwrap();
        assert_eq!(
            Decoder::new(&dbc, &[(r, 0)]).unwrap_err(),
            LookupError::ForeignSignal
        );
    }

    #[test]
    fn motorola_start_bit_is_the_msb() {
        let dbc = small();
        let rpm = dbc.message("Engine").unwrap().signal("RPM").unwrap();
        // 7|16@0: MSB is bit 7 of byte 0, LSB bit 0 of byte 1.
        let mut data = [0u8; 8];
        data[0] = 0x12;
        data[1] = 0x34;
        data[4] = 1;
        assert_eq!(rpm.codec.decode(&data), f64::from(0x1234u16));
        // 19|4@0-: bits 3..0 of byte 2.
        data[2] = 0x0F;
        let all = dbc.decode_all(256, false, &data).unwrap();
        assert!(all.contains(&("Gear".to_string(), -1.0)));
    }

    #[test]
    fn decoder_pushes_bound_fields_and_counts_errors() {
        let dbc = small();
        let refs = [
            (dbc.signal("BrakeTemps", "DiscFR").unwrap(), 7),
            (dbc.signal("Engine", "A").unwrap(), 1),
            (dbc.signal("Engine", "B").unwrap(), 2),
        ];
        let mut dec = Decoder::new(&dbc, &refs).unwrap();
        assert_eq!(
            dec.ids(),
            vec![
                CanId {
                    id: 256,
                    extended: false
                },
                CanId {
                    id: 768,
                    extended: false
                }
            ]
        );
        let mut out = Vec::new();
        dec.decode(768, false, &[0, 0, 0x9C, 0x18], &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 7);
        assert!((out[0].1 - (6300.0 * 0.1 - 40.0)).abs() < 1e-9);
        out.clear();
        dec.decode(256, false, &[0, 0, 0, 0, 2, 0x34, 0x12, 0], &mut out)
            .unwrap();
        assert_eq!(out, vec![(2, f64::from(0x1234u16))]);
        assert_eq!(
            dec.decode(768, true, &[0; 4], &mut out),
            Err(DecodeError::UnknownId)
        );
        assert_eq!(
            dec.decode(768, false, &[0; 3], &mut out),
            Err(DecodeError::TooShort {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            dec.decode(256, false, &[0, 0, 0, 0, 9, 0, 0, 0], &mut out),
            Err(DecodeError::UnknownMultiplexor(9))
        );
    }

    #[test]
    fn encode_checks_multiplexor_and_range() {
        let dbc = small();
        let mut data = [0u8; 8];
        assert!(matches!(
            dbc.encode("Engine", &[("A", 1.0)], &mut data),
            Err(EncodeError::MissingMultiplexor { .. })
        ));
        assert!(matches!(
            dbc.encode("Engine", &[("Mux", 2.0), ("A", 1.0)], &mut data),
            Err(EncodeError::WrongMultiplexor {
                needs: 1,
                selected: 2,
                ..
            })
        ));
        assert!(matches!(
            dbc.encode("Engine", &[("Mux", 3.0)], &mut data),
            Err(EncodeError::UnknownMultiplexor { value: 3, .. })
        ));
        assert!(matches!(
            dbc.encode("Engine", &[("Mux", 1.0), ("Gear", 8.0)], &mut data),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            dbc.encode("Engine", &[("Mux", 1.0)], &mut data[..4]),
            Err(EncodeError::BufferTooSmall {
                need: 8,
                got: 4,
                ..
            })
        ));
        let n = dbc
            .encode(
                "Engine",
                &[("Mux", 1.0), ("Gear", -1.0), ("RPM", 7850.4)],
                &mut data,
            )
            .unwrap();
        assert_eq!(n, 8);
        assert_eq!(data, [0x1E, 0xAA, 0x0F, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn invalid_files_are_refused_with_a_line() {
        let bad_syntax =
            "VERSION \"\"\nBU_: A\nBO_ 1 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A B C ,\n";
        let e = Dbc::from_text(bad_syntax).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");

        let too_big = "VERSION \"\"\nBU_: A\nBO_ 4096 M: 8 A\n";
        let e = Dbc::from_text(too_big).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.reason.contains("extended"), "{e}");

        let overflow = "VERSION \"\"\nBU_: A\nBO_ 1 M: 2 A\n SG_ S : 7|16@0+ (1,0) [0|0] \"\" A\n SG_ T : 12|8@1+ (1,0) [0|0] \"\" A\n";
        let e = Dbc::from_text(overflow).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.to_string().contains("`T` of message `M`"), "{e}");

        let overlap = "VERSION \"\"\nBU_: A\nBO_ 1 M: 2 A\n SG_ S : 0|9@1+ (1,0) [0|0] \"\" A\n SG_ T : 8|8@1+ (1,0) [0|0] \"\" A\n";
        let e = Dbc::from_text(overlap).unwrap_err();
        assert!(e.reason.contains("`S` and `T` overlap"), "{e}");

        let float = "VERSION \"\"\nBU_: A\nBO_ 1 M: 8 A\n SG_ S : 0|16@1+ (1,0) [0|0] \"\" A\nSIG_VALTYPE_ 1 S : 1;\n";
        let e = Dbc::from_text(float).unwrap_err();
        assert!(e.reason.contains("32-bit float"), "{e}");
    }

    #[test]
    fn layout_extracts_at_the_end_of_a_64_byte_payload() {
        let l = Layout::new(504, 8, ByteOrder::LittleEndian, 64).unwrap();
        let mut data = [0u8; 64];
        data[63] = 0xAB;
        assert_eq!(l.extract(&data), 0xAB);
        assert_eq!(l.extract(&data[..10]), 0);
        // 64 bits starting mid-byte span nine bytes.
        let l = Layout::new(4, 64, ByteOrder::LittleEndian, 9).unwrap();
        let mut data = [0xFFu8; 9];
        assert_eq!(l.extract(&data), u64::MAX);
        l.insert(&mut data, 0);
        assert_eq!(data, [0x0F, 0, 0, 0, 0, 0, 0, 0, 0xF0]);
        let l = Layout::new(3, 64, ByteOrder::BigEndian, 9).unwrap();
        let mut data = [0u8; 9];
        l.insert(&mut data, u64::MAX);
        assert_eq!(data, [0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xF0]);
        assert_eq!(l.extract(&data), u64::MAX);
    }
}
