//! CAN databases (DBC files) and the decoding and encoding of CAN frames with them.
//!
//! `can-dbc` parses the text; validation, bit layout, decoding and encoding are ours and
//! are checked against cantools by `tests/cantools_decode.rs` and, on the opendbc
//! collection of real car DBC files, by `tests/opendbc_corpus.rs`.
//!
//! Supported: standard and extended ids, Intel (`@1`) and Motorola (`@0`) signals of 1 to 64
//! bits, signed and unsigned integers, IEEE float32/float64 (`SIG_VALTYPE_`), factor and
//! offset, simple multiplexing (one `M` signal, `m<N>` signals), payloads up to 64 bytes
//! (CAN FD), `SG_MUL_VAL_` lines that only restate simple multiplexing (`m<N>` signal, the
//! multiplexor, range N-N). Not supported: extended multiplexing (`m<N>M`, `SG_MUL_VAL_`
//! with other ranges or multiplexors).
//!
//! # Files as the field writes them
//!
//! Vendors and reverse-engineering projects write DBC files with defects in messages a
//! team never uses. A load is lenient by default: every defect becomes a [`Defect`] (one
//! warning line: file, line, message) and the rest of the file is used.
//! - A message with a defect (overlapping signals, a signal outside the frame, extended
//!   multiplexing, an id above 29 bits, two messages with one id or one name, a `BO_` or
//!   `SG_` line the parser cannot read, or a `SIG_VALTYPE_` or `SG_MUL_VAL_` line about it
//!   that it cannot read) is left out: looking up one of its signals is an error naming the
//!   defect ([`LookupError::Unusable`]), so a binding to it never starts.
//! - A statement that describes no signal's bits and cannot be read or names what does not
//!   exist (`VAL_`, `SIG_VALTYPE_` for an unknown signal, an unreadable `BA_` or `CM_`) is
//!   ignored.
//! - What can be read without guessing is read, with a warning: a name starting with a
//!   digit (`BO_ 1275 2017_5`, `SG_ 0_COUNTER`), an id above 0x7FF without the
//!   extended-id bit, which only an extended frame can carry: it is read as that extended
//!   id (cantools refuses both); a multiplexor marked `m` with no value that `SG_MUL_VAL_`
//!   names the multiplexor: read as `M`.
//!
//! A strict load ([`Dbc::load_with`], `source.dbc_strict`) refuses a file with any defect.
//!
//! can-dbc parses a file as a whole and gives up at the first line it cannot read, so the
//! load splits the text into statements first (a keyword at the start of a line, with the
//! lines of a quoted string that runs on), blanks the statement the parser stopped at (a
//! message with all its signal lines), notes the defect and parses again. Blanking keeps
//! every line number. can-dbc also keeps a standard id in 16 bits (an id above 0xFFFF
//! without the extended bit silently becomes another id): ids are read from the text and
//! rewritten in the extended form before parsing (`BO_`, and the `CM_`, `BA_`, `VAL_`,
//! `SIG_VALTYPE_`, `BO_TX_BU_`, `SG_MUL_VAL_`, `SIG_GROUP_` statements that refer to them).
//! No crate fits better: can-dbc has no recovery, and dbc-rs's one leniency
//! (`ParseOptions::lenient`, signals past the end of the frame) does not skip a line either.

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

/// Something wrong in a DBC file that a lenient load works around (see the module
/// documentation); a strict load refuses the file instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    pub path: Option<PathBuf>,
    /// 1-based line of the statement concerned, when known.
    pub line: Option<usize>,
    /// The message concerned, if any.
    pub message: Option<String>,
    /// The signal concerned, if any (of `message`).
    pub signal: Option<String>,
    pub effect: Effect,
    /// What is wrong, without the names above.
    pub reason: String,
}

/// What a lenient load does about a [`Defect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The message is left out: a lookup of it or of its signals is an error.
    MessageLeftOut,
    /// The statement is ignored: it describes no signal's bits.
    Ignored,
    /// Read as the reason says, without guessing; the message can be used.
    ReadAsWritten,
}

impl Defect {
    fn new(line: Option<usize>, effect: Effect, reason: impl Into<String>) -> Self {
        Self {
            path: None,
            line,
            message: None,
            signal: None,
            effect,
            reason: reason.into(),
        }
    }

    fn of(mut self, message: &str, signal: Option<&str>) -> Self {
        self.message = Some(message.to_owned());
        self.signal = signal.map(str::to_owned);
        self
    }

    /// What is wrong and where in the file's structure, without file and line.
    pub fn describe(&self) -> String {
        match (&self.message, &self.signal) {
            (Some(m), Some(s)) => format!("signal `{s}` of message `{m}`: {}", self.reason),
            (Some(m), None) => format!("message `{m}`: {}", self.reason),
            _ => self.reason.clone(),
        }
    }

    /// The defect as the lookup of a left-out message reports it.
    fn for_lookup(&self) -> String {
        let at = self.line.map(|l| format!("line {l}: ")).unwrap_or_default();
        match &self.signal {
            Some(s) => format!("{at}signal `{s}`: {}", self.reason),
            None => format!("{at}{}", self.reason),
        }
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line) {
            (Some(p), Some(l)) => write!(f, "{}:{l}: ", p.display())?,
            (Some(p), None) => write!(f, "{}: ", p.display())?,
            (None, Some(l)) => write!(f, "DBC line {l}: ")?,
            (None, None) => write!(f, "DBC: ")?,
        }
        f.write_str(&self.describe())?;
        match (self.effect, &self.message) {
            (Effect::MessageLeftOut, Some(m)) => write!(
                f,
                "; message `{m}` left out (a binding to it is an error), the rest of the file is used"
            ),
            (Effect::MessageLeftOut | Effect::Ignored, _) => f.write_str("; ignored"),
            (Effect::ReadAsWritten, _) => Ok(()),
        }
    }
}

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
    /// The message is in the file but was left out for a defect (see [`Defect`]).
    #[error("message `{message}` cannot be used ({reason})")]
    Unusable { message: String, reason: String },
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
    /// Every defect of the file, in line order.
    defects: Vec<Defect>,
    /// Messages left out, by name: the index of their defect.
    left_out: HashMap<String, usize>,
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
    /// Reads a DBC file (UTF-8, or Windows-1252 as Vector tools write them), leniently:
    /// see [`Dbc::defects`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DbcError> {
        Self::load_with(path, false)
    }

    /// Reads a DBC file; `strict`: a file with any defect is refused, naming the first.
    pub fn load_with(path: impl AsRef<Path>, strict: bool) -> Result<Self, DbcError> {
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
        let mut dbc = Self::from_text_with(&text, strict).map_err(with_path)?;
        if let Some(inner) = Arc::get_mut(&mut dbc.inner) {
            for d in &mut inner.defects {
                d.path = Some(path.to_path_buf());
            }
        }
        Ok(dbc)
    }

    /// Parses DBC text leniently: see [`Dbc::defects`].
    pub fn from_text(text: &str) -> Result<Self, DbcError> {
        Self::from_text_with(text, false)
    }

    /// Parses DBC text; `strict`: a text with any defect is refused, naming the first.
    pub fn from_text_with(text: &str, strict: bool) -> Result<Self, DbcError> {
        let (parsed, mut prepared) = text::parse(text)?;
        let mut messages = build::messages(&parsed, &mut prepared);
        build::names(&parsed, &messages, &mut prepared);
        build::drop_duplicates(&mut messages, &mut prepared);
        let mut defects = prepared.defects;
        defects.sort_by_key(|d| d.line.unwrap_or(usize::MAX));
        if strict && let Some(first) = defects.first() {
            return Err(DbcError::new(
                first.line,
                format!(
                    "{} (a strict load refuses any defect; {} in the file)",
                    first.describe(),
                    defects.len()
                ),
            ));
        }
        let mut left_out = HashMap::new();
        for (i, d) in defects.iter().enumerate() {
            if let (Effect::MessageLeftOut, Some(m)) = (d.effect, &d.message) {
                left_out.entry(m.clone()).or_insert(i);
            }
        }
        let by_id = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.key(), i))
            .collect();
        let by_name = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                token: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
                messages,
                by_id,
                by_name,
                defects,
                left_out,
            }),
        })
    }

    /// What a lenient load found wrong and worked around, in line order: one warning line
    /// each (their `Display` names file, line and message).
    pub fn defects(&self) -> &[Defect] {
        &self.inner.defects
    }

    /// The messages that can be used (every message of the file but those left out).
    pub fn messages(&self) -> &[MessageDef] {
        &self.inner.messages
    }

    fn message_index(&self, name: &str) -> Result<usize, LookupError> {
        if let Some(&i) = self.inner.by_name.get(name) {
            return Ok(i);
        }
        Err(match self.inner.left_out.get(name) {
            Some(&d) => LookupError::Unusable {
                message: name.to_owned(),
                reason: self
                    .inner
                    .defects
                    .get(d)
                    .map(Defect::for_lookup)
                    .unwrap_or_default(),
            },
            None => LookupError::NoMessage {
                message: name.to_owned(),
            },
        })
    }

    pub fn message(&self, name: &str) -> Result<&MessageDef, LookupError> {
        let i = self.message_index(name)?;
        Ok(&self.inner.messages[i])
    }

    pub fn message_by_id(&self, id: u32, extended: bool) -> Option<&MessageDef> {
        let key = CanId { id, extended }.key();
        self.inner.by_id.get(&key).map(|&i| &self.inner.messages[i])
    }

    /// Finds `message`.`signal`; the error says which of the two is missing.
    pub fn signal(&self, message: &str, signal: &str) -> Result<SignalRef, LookupError> {
        let m = self.message_index(message)?;
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

/// The text before can-dbc sees it: statements, ids, recovery from unreadable lines.
mod text {
    use super::*;

    /// A line that starts with one of these begins a statement.
    const KEYWORDS: &[&str] = &[
        "VERSION",
        "NS_",
        "NS_DESC_",
        "BS_",
        "BU_",
        "BO_",
        "SG_",
        "EV_",
        "ENVVAR_DATA_",
        "EV_DATA_",
        "CM_",
        "BA_DEF_",
        "BA_DEF_REL_",
        "BA_DEF_DEF_",
        "BA_DEF_DEF_REL_",
        "BA_DEF_SGTYPE_",
        "BA_",
        "BA_REL_",
        "BA_SGTYPE_",
        "VAL_",
        "VAL_TABLE_",
        "SIG_GROUP_",
        "SIG_VALTYPE_",
        "SIG_TYPE_REF_",
        "SGTYPE_",
        "SGTYPE_VAL_",
        "BO_TX_BU_",
        "SG_MUL_VAL_",
        "CAT_DEF_",
        "CAT_",
        "FILTER",
        "BU_SG_REL_",
        "BU_EV_REL_",
        "BU_BO_REL_",
    ];

    /// Statements left out at most before the file is refused: a file that bad is not
    /// the one the team meant to install.
    const MAX_UNREADABLE: usize = 100;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Message,
        Signal,
        Other,
    }

    /// Lines `first..end` (0-based) of the text.
    #[derive(Debug, Clone, Copy)]
    struct Statement {
        first: usize,
        end: usize,
        kind: Kind,
        /// Opens a quoted string that never closes.
        unterminated: bool,
    }

    fn first_word(line: &str) -> &str {
        let t = line.trim_start();
        let end = t
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len());
        &t[..end]
    }

    /// Whether a quoted string is open after `line`, given whether it was before (an
    /// escaped quote `\"` does not close it, as in can-dbc's grammar).
    fn string_open_after(line: &str, mut open: bool) -> bool {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if open && c == '\\' && chars.peek() == Some(&'"') {
                chars.next();
            } else if c == '"' {
                open = !open;
            }
        }
        open
    }

    fn is_blank(line: &str) -> bool {
        let t = line.trim();
        t.is_empty() || t.starts_with("//")
    }

    /// Splits the lines into statements: a keyword at the start of a line begins one; it
    /// runs on over indented lines (a `BU_` or `NS_` list) and over the lines of a quoted
    /// string (a comment); any other line that is not indented begins one of its own.
    fn statements(lines: &[String]) -> Vec<Statement> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            if is_blank(&lines[i]) {
                i += 1;
                continue;
            }
            let first = i;
            let word = first_word(&lines[i]);
            let kind = match word {
                "BO_" => Kind::Message,
                "SG_" => Kind::Signal,
                _ => Kind::Other,
            };
            let symbols = word == "NS_";
            let mut open = string_open_after(&lines[i], false);
            i += 1;
            while let Some(line) = lines.get(i) {
                if !open {
                    let indented = line.starts_with([' ', '\t']);
                    let symbol = symbols && indented && line.split_whitespace().count() == 1;
                    if is_blank(line)
                        || !indented
                        || (KEYWORDS.contains(&first_word(line)) && !symbol)
                    {
                        break;
                    }
                }
                open = string_open_after(line, open);
                i += 1;
            }
            if open {
                // A string that never closes: the statement is its first line.
                i = first + 1;
            }
            out.push(Statement {
                first,
                end: i,
                kind,
                unterminated: open,
            });
        }
        out
    }

    /// The tokens of a line with their byte offsets: a quoted string is one token.
    fn tokens(line: &str) -> Vec<(usize, &str)> {
        let mut out = Vec::new();
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_whitespace() {
                i += 1;
                continue;
            }
            let start = i;
            if bytes[i] == b'"' {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
            } else {
                while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
            }
            if let Some(t) = line.get(start..i) {
                out.push((start, t));
            }
        }
        out
    }

    /// Which token of a statement's first line is a message id, for the statements that
    /// name one.
    fn id_token(tokens: &[(usize, &str)]) -> Option<usize> {
        let word = |i: usize| tokens.get(i).map(|&(_, t)| t);
        let k = match word(0)? {
            "BO_" | "VAL_" | "SIG_VALTYPE_" | "BO_TX_BU_" | "SG_MUL_VAL_" | "SIG_GROUP_" => 1,
            "CM_" => match word(1)? {
                "BO_" | "SG_" => 2,
                _ => 1,
            },
            "BA_" => match word(2)? {
                "BO_" | "SG_" => 3,
                _ => return None,
            },
            "BA_REL_" => match (word(2)?, word(4)) {
                ("BU_SG_REL_", Some("SG_")) => 5,
                ("BU_BO_REL_", _) => 4,
                _ => return None,
            },
            _ => return None,
        };
        word(k)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .map(|_| k)
    }

    /// How a message id as written is read.
    enum Id {
        /// As written.
        Fine,
        /// Above 0x7FF without the extended bit, within 29 bits: read as that extended id.
        Extended(u64),
        /// No frame can carry it.
        Unusable(String),
    }

    fn read_id(token: &str) -> Id {
        const EXTENDED: u64 = 1 << 31;
        let Ok(v) = token.parse::<u64>() else {
            return Id::Unusable(format!("id {token} does not fit in 32 bits"));
        };
        if v > u64::from(u32::MAX) {
            Id::Unusable(format!("id {v} does not fit in 32 bits"))
        } else if v & EXTENDED != 0 {
            let id = v & !EXTENDED;
            if id > 0x1FFF_FFFF {
                Id::Unusable(format!(
                    "extended id {v} (0x{id:X} with bit 31 set) is above 29 bits"
                ))
            } else {
                Id::Fine
            }
        } else if v <= 0x7FF {
            Id::Fine
        } else if v <= 0x1FFF_FFFF {
            Id::Extended(v)
        } else {
            Id::Unusable(format!(
                "id {v} (0x{v:X}) is above 0x7FF without the extended-id bit (bit 31), and \
                 above 29 bits even as an extended id"
            ))
        }
    }

    /// Ids and lines can-dbc could not make sense of, before parsing, and what came of them.
    pub(super) struct Prepared {
        /// The text can-dbc parsed: the original with ids rewritten and statements blanked
        /// (same line numbers).
        pub text: String,
        pub defects: Vec<Defect>,
        /// Ids (as `CanId::key`) of messages whose decoding a dropped statement would have
        /// changed (`SIG_VALTYPE_`, `SG_MUL_VAL_`), with the defect that leaves them out.
        pub affected: HashMap<u32, Defect>,
        /// Ids (as written, after rewriting) of messages blanked before parsing: statements
        /// that refer to them are not defects of their own.
        pub blanked: Vec<u64>,
    }

    struct State {
        lines: Vec<String>,
        statements: Vec<Statement>,
        defects: Vec<Defect>,
        affected: HashMap<u32, Defect>,
        blanked: Vec<u64>,
    }

    impl State {
        /// The message block a statement belongs to (a `BO_` line and its `SG_` lines), or
        /// the statement alone.
        fn block(&self, j: usize) -> (usize, usize) {
            let mut start = j;
            while self.statements[start].kind == Kind::Signal && start > 0 {
                start -= 1;
            }
            if self.statements[start].kind != Kind::Message {
                return (j, j + 1);
            }
            let mut end = start + 1;
            while self
                .statements
                .get(end)
                .is_some_and(|s| s.kind == Kind::Signal)
            {
                end += 1;
            }
            (start, end)
        }

        fn blank(&mut self, from: usize, to: usize) {
            let first = self.statements[from].first;
            let end = self.statements[to - 1].end;
            for line in &mut self.lines[first..end] {
                line.clear();
            }
        }

        /// The name and id (as written) of the message a `BO_` statement defines.
        fn message_of(&self, j: usize) -> (Option<String>, Option<u64>) {
            let tokens = tokens(&self.lines[self.statements[j].first]);
            let name = tokens
                .get(2)
                .and_then(|(_, t)| t.split(':').next())
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            let id = tokens.get(1).and_then(|(_, t)| t.parse().ok());
            (name, id)
        }
    }

    /// Rewrites the ids can-dbc would misread and blanks what no frame can carry.
    fn prepare_ids(st: &mut State) {
        for j in 0..st.statements.len() {
            let first = st.statements[j].first;
            let line = &st.lines[first];
            let toks = tokens(line);
            let Some(k) = id_token(&toks) else { continue };
            let (at, token) = toks[k];
            let (at, token) = (at, token.to_owned());
            let message = st.statements[j].kind == Kind::Message;
            if message {
                let (name, id) = st.message_of(j);
                if name.as_deref() == Some("VECTOR__INDEPENDENT_SIG_MSG") {
                    // Vector tools park signals that belong to no message here.
                    let (a, b) = st.block(j);
                    st.blank(a, b);
                    st.blanked.extend(id);
                    continue;
                }
            }
            match read_id(&token) {
                Id::Fine => {}
                Id::Extended(v) => {
                    let written = (v | 1 << 31).to_string();
                    st.lines[first].replace_range(at..at + token.len(), &written);
                    if message {
                        let (name, _) = st.message_of(j);
                        let mut d = Defect::new(
                            Some(first + 1),
                            Effect::ReadAsWritten,
                            format!(
                                "id {v} (0x{v:X}) is above 0x7FF without the extended-id bit \
                                 (bit 31): only an extended frame can carry it, read as \
                                 extended id 0x{v:08X}"
                            ),
                        );
                        if let Some(name) = name {
                            d = d.of(&name, None);
                        }
                        st.defects.push(d);
                    }
                }
                Id::Unusable(reason) => {
                    if message {
                        let (name, id) = st.message_of(j);
                        let (a, b) = st.block(j);
                        st.blank(a, b);
                        st.blanked.extend(id);
                        let mut d = Defect::new(Some(first + 1), Effect::MessageLeftOut, reason);
                        if let Some(name) = name {
                            d = d.of(&name, None);
                        }
                        st.defects.push(d);
                    } else {
                        // Refers to a message no frame can carry.
                        st.blank(j, j + 1);
                    }
                }
            }
        }
    }

    /// The 1-based line can-dbc stopped at, when it says.
    fn error_line(err: &can_dbc::DbcError, lines: &[String]) -> Option<usize> {
        let needle = match err {
            can_dbc::DbcError::Pest(e) => {
                // pest renders the position as ` --> LINE:COL`; its types are not
                // re-exported.
                return e
                    .to_string()
                    .lines()
                    .find_map(|l| l.trim_start().strip_prefix("--> "))
                    .and_then(|pos| pos.split(':').next())
                    .and_then(|n| n.trim().parse().ok());
            }
            can_dbc::DbcError::InvalidFloat(s)
            | can_dbc::DbcError::InvalidInt(s)
            | can_dbc::DbcError::InvalidUint(s) => s.clone(),
            can_dbc::DbcError::MessageIdOutOfRange(v) => v.to_string(),
            _ => return None,
        };
        // Errors found after parsing name the text they could not convert: the first line
        // that has it as a word.
        let word = |c: char| !(c.is_ascii_alphanumeric() || "_.+-".contains(c));
        lines
            .iter()
            .position(|l| l.split(word).any(|w| w == needle))
            .map(|n| n + 1)
    }

    fn parse_error(err: &can_dbc::DbcError, line: Option<usize>) -> DbcError {
        match err {
            can_dbc::DbcError::Pest(e) => {
                // pest lists every rule it tried: past a few that says nothing.
                let expected = e.variant.message();
                let what = if expected.matches(", ").count() >= 3 {
                    "not a DBC statement".into()
                } else {
                    expected.into_owned()
                };
                DbcError::new(
                    line,
                    format!("syntax error: {what} in `{}`", e.line().trim()),
                )
            }
            other => DbcError::new(line, other.to_string()),
        }
    }

    /// Parses `text` with can-dbc; a statement it cannot read is blanked and becomes a
    /// defect (its message left out, or the statement ignored), and the text is parsed
    /// again.
    pub(super) fn parse(text: &str) -> Result<(can_dbc::Dbc, Prepared), DbcError> {
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let statements = statements(&lines);
        let mut st = State {
            lines,
            statements,
            defects: Vec::new(),
            affected: HashMap::new(),
            blanked: Vec::new(),
        };
        prepare_ids(&mut st);
        for j in 0..st.statements.len() {
            let s = st.statements[j];
            if s.unterminated && !st.lines[s.first].is_empty() {
                let defect = Defect::new(
                    Some(s.first + 1),
                    Effect::Ignored,
                    "cannot be read: a quoted string opens here and never closes",
                );
                if !st.drop_statement(j, defect) {
                    return Err(DbcError::new(
                        Some(s.first + 1),
                        "a quoted string opens here and never closes",
                    ));
                }
            }
        }
        let mut unreadable = 0;
        loop {
            let mut joined = st.lines.join("\n");
            joined.push('\n');
            let err = match can_dbc::Dbc::try_from(joined.as_str()) {
                Ok(parsed) => {
                    return Ok((
                        parsed,
                        Prepared {
                            text: joined,
                            defects: st.defects,
                            affected: st.affected,
                            blanked: st.blanked,
                        },
                    ));
                }
                Err(e) => e,
            };
            let line = error_line(&err, &st.lines);
            let refused = parse_error(&err, line);
            let Some(j) = line.and_then(|l| st.culprit(l)) else {
                return Err(refused);
            };
            unreadable += 1;
            if unreadable > MAX_UNREADABLE {
                return Err(DbcError::new(
                    refused.line,
                    format!(
                        "{}; more than {MAX_UNREADABLE} statements cannot be read",
                        refused.reason
                    ),
                ));
            }
            let defect = Defect::new(
                line,
                Effect::Ignored,
                format!("cannot be read: {}", refused.reason),
            );
            if !st.drop_statement(j, defect) {
                return Err(refused);
            }
        }
    }

    impl State {
        /// The statement to blame for an error at 1-based line `l`: the one holding it, or
        /// the one before the blank lines it is on; none past the end of the text (an
        /// open string or statement at the end: no statement can be blamed alone).
        fn culprit(&self, l: usize) -> Option<usize> {
            let idx = l.checked_sub(1).filter(|&i| i < self.lines.len())?;
            let j = self
                .statements
                .iter()
                .rposition(|s| s.first <= idx && !self.lines[s.first].is_empty())?;
            let s = self.statements[j];
            let between = self.lines.get(s.end..=idx).unwrap_or_default();
            (idx < s.end || between.iter().all(|l| is_blank(l))).then_some(j)
        }

        /// Blanks statement `j` (with its message block) and notes `defect` for it: its
        /// message left out, or the statement ignored. `false`: it cannot be dropped
        /// without changing how some unknown message decodes.
        fn drop_statement(&mut self, j: usize, mut defect: Defect) -> bool {
            let (a, b) = self.block(j);
            let statement = self.statements[a];
            if statement.kind == Kind::Message {
                let (name, id) = self.message_of(a);
                self.blanked.extend(id);
                if let Some(name) = name {
                    defect.effect = Effect::MessageLeftOut;
                    defect = defect.of(&name, None);
                }
                self.defects.push(defect);
            } else {
                let toks = tokens(&self.lines[statement.first]);
                if matches!(
                    toks.first().map(|&(_, t)| t),
                    Some("SIG_VALTYPE_" | "SG_MUL_VAL_")
                ) {
                    // Without it a signal of its message would decode differently: that
                    // message is left out (see `build::messages`).
                    let Some(id) = id_token(&toks)
                        .and_then(|k| toks.get(k))
                        .and_then(|(_, t)| t.parse::<u32>().ok())
                    else {
                        return false;
                    };
                    self.affected.entry(id).or_insert(defect);
                } else {
                    self.defects.push(defect);
                }
            }
            self.blank(a, b);
            true
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn statements_follow_keywords_strings_and_lists() {
            let text = "VERSION \"\"\nNS_ :\n\tCM_\n\tBA_\nBU_: A\n  B\nBO_ 1 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n\nCM_ \"two\nlines\";\ngarbage\nCM_ \"open\nBA_ \"x\" 1;\n";
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let got: Vec<(usize, usize)> = statements(&lines)
                .iter()
                .map(|s| (s.first, s.end))
                .collect();
            assert_eq!(
                got,
                vec![
                    (0, 1),
                    (1, 4),
                    (4, 6),
                    (6, 7),
                    (7, 8),
                    (9, 11),
                    (11, 12),
                    (12, 13),
                    (13, 14)
                ]
            );
        }

        #[test]
        fn ids_are_read_as_a_bus_can_carry_them() {
            assert!(matches!(read_id("2047"), Id::Fine));
            assert!(matches!(read_id("2048"), Id::Extended(2048)));
            assert!(matches!(read_id("536870911"), Id::Extended(0x1FFF_FFFF)));
            assert!(matches!(read_id("536870912"), Id::Unusable(_)));
            assert!(matches!(read_id("2684354559"), Id::Fine)); // 0x9FFFFFFF
            assert!(matches!(read_id("2684354560"), Id::Unusable(_)));
            assert!(matches!(
                read_id("99999999999999999999999"),
                Id::Unusable(_)
            ));
        }
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

    /// Line of the first statement `keyword id name ...` (`VAL_`, `SIG_VALTYPE_`).
    fn statement_line(text: &str, keyword: &str, id: u32, name: &str) -> Option<usize> {
        let id = id.to_string();
        text.lines()
            .position(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some(keyword)
                    && words.next() == Some(id.as_str())
                    && words.next().map(|w| w.trim_end_matches(':')) == Some(name)
            })
            .map(|n| n + 1)
    }

    fn key(id: can_dbc::MessageId) -> u32 {
        id.raw()
    }

    /// The messages that can be used; a defect for each one left out and for each
    /// statement ignored.
    pub(super) fn messages(dbc: &can_dbc::Dbc, prepared: &mut text::Prepared) -> Vec<MessageDef> {
        let text = prepared.text.as_str();
        let defects = &mut prepared.defects;
        let blanked = |id: can_dbc::MessageId| prepared.blanked.contains(&u64::from(key(id)));
        let mut float_types = HashMap::new();
        for v in &dbc.signal_extended_value_type_list {
            let line = || statement_line(text, "SIG_VALTYPE_", key(v.message_id), &v.signal_name);
            match dbc.messages.iter().find(|m| m.id == v.message_id) {
                None if blanked(v.message_id) => {}
                None => defects.push(Defect::new(
                    line(),
                    Effect::Ignored,
                    format!(
                        "SIG_VALTYPE_ for signal `{}` names message id {}, which no message has",
                        v.signal_name,
                        key(v.message_id)
                    ),
                )),
                Some(m) if !m.signals.iter().any(|s| s.name == v.signal_name) => {
                    defects.push(Defect::new(
                        line(),
                        Effect::Ignored,
                        format!(
                            "SIG_VALTYPE_ names signal `{}`, which message `{}` does not have",
                            v.signal_name, m.name
                        ),
                    ));
                }
                Some(_) => {
                    float_types.insert(
                        (v.message_id, v.signal_name.as_str()),
                        v.signal_extended_value_type,
                    );
                }
            }
        }
        let mut out = Vec::new();
        for m in &dbc.messages {
            if m.name == "VECTOR__INDEPENDENT_SIG_MSG" {
                continue;
            }
            if let Some(mut d) = prepared.affected.remove(&key(m.id)) {
                d.effect = Effect::MessageLeftOut;
                defects.push(d.of(&m.name, None));
                continue;
            }
            let multiplexor = match restated_multiplexing(dbc, m, text) {
                Ok(x) => x,
                Err(reason) => {
                    defects.push(
                        Defect::new(line_of(text, &m.name, None), Effect::MessageLeftOut, reason)
                            .of(&m.name, None),
                    );
                    continue;
                }
            };
            if let Some(x) = multiplexor {
                defects.push(
                    Defect::new(
                        line_of(text, &m.name, Some(x)),
                        Effect::ReadAsWritten,
                        "is marked `m` without a value and SG_MUL_VAL_ names it the \
                         multiplexor of the message's m<N> signals: read as the multiplexor (M)",
                    )
                    .of(&m.name, Some(x)),
                );
            }
            match message(dbc, m, &float_types, multiplexor, text) {
                Ok(def) => out.push(def),
                Err(d) => defects.push(d),
            }
        }
        // Dropped statements about messages that do not exist: ignored, nothing more.
        defects.extend(prepared.affected.drain().map(|(_, d)| d));
        out
    }

    /// Warnings for what is read as written (names that start with a digit) and defects
    /// for value descriptions (`VAL_`) of signals that do not exist.
    pub(super) fn names(
        dbc: &can_dbc::Dbc,
        messages: &[MessageDef],
        prepared: &mut text::Prepared,
    ) {
        let text = prepared.text.as_str();
        let digit = |name: &str| name.starts_with(|c: char| c.is_ascii_digit());
        let note = "starts with a digit, which a DBC name may not: read as written";
        for m in messages {
            if digit(&m.name) {
                prepared.defects.push(
                    Defect::new(
                        line_of(text, &m.name, None),
                        Effect::ReadAsWritten,
                        format!("the name {note}"),
                    )
                    .of(&m.name, None),
                );
            }
            for s in m.signals.iter().filter(|s| digit(&s.name)) {
                prepared.defects.push(
                    Defect::new(
                        line_of(text, &m.name, Some(&s.name)),
                        Effect::ReadAsWritten,
                        format!("the name {note}"),
                    )
                    .of(&m.name, Some(&s.name)),
                );
            }
        }
        for v in &dbc.value_descriptions {
            let can_dbc::ValueDescription::Signal {
                message_id, name, ..
            } = v
            else {
                continue;
            };
            let line = || statement_line(text, "VAL_", key(*message_id), name);
            let reason = match dbc.messages.iter().find(|m| m.id == *message_id) {
                None if prepared.blanked.contains(&u64::from(key(*message_id))) => continue,
                None => format!(
                    "VAL_ for signal `{name}` names message id {}, which no message has",
                    key(*message_id)
                ),
                Some(m) if !m.signals.iter().any(|s| s.name == *name) => format!(
                    "VAL_ names signal `{name}`, which message `{}` does not have",
                    m.name
                ),
                Some(_) => continue,
            };
            prepared
                .defects
                .push(Defect::new(line(), Effect::Ignored, reason));
        }
    }

    /// Two messages with one id (a frame would be ambiguous) or one name (a binding would
    /// be): all of them are left out.
    pub(super) fn drop_duplicates(messages: &mut Vec<MessageDef>, prepared: &mut text::Prepared) {
        let text = prepared.text.as_str();
        // The line of each message: the n-th `BO_` line with its name for its n-th use.
        let lines: Vec<Option<usize>> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let nth = messages[..i].iter().filter(|o| o.name == m.name).count();
                text.lines()
                    .enumerate()
                    .filter(|(_, l)| {
                        let mut words = l.split_whitespace();
                        words.next() == Some("BO_")
                            && words.nth(1).and_then(|w| w.split(':').next()) == Some(&m.name)
                    })
                    .nth(nth)
                    .map(|(n, _)| n + 1)
            })
            .collect();
        let mut first_id: HashMap<u32, usize> = HashMap::new();
        let mut first_name: HashMap<&str, usize> = HashMap::new();
        let mut clash: Vec<Option<String>> = vec![None; messages.len()];
        let at = |k: usize| lines[k].map_or(String::new(), |l| format!(" (line {l})"));
        for (i, m) in messages.iter().enumerate() {
            if let Some(&j) = first_id.get(&m.id.key()) {
                let other = &messages[j].name;
                clash[i] = Some(format!("has the same id {} as message `{other}`", m.id));
                clash[j].get_or_insert_with(|| {
                    format!("has the same id {} as message `{}`", m.id, m.name)
                });
            } else {
                first_id.insert(m.id.key(), i);
            }
            if let Some(&j) = first_name.get(m.name.as_str()) {
                clash[i] = Some(format!("another message has this name{}", at(j)));
                clash[j].get_or_insert_with(|| format!("another message has this name{}", at(i)));
            } else {
                first_name.insert(&m.name, i);
            }
        }
        let mut i = 0;
        messages.retain(|m| {
            let reason = clash[i].take();
            let line = lines[i];
            i += 1;
            match reason {
                None => true,
                Some(reason) => {
                    prepared
                        .defects
                        .push(Defect::new(line, Effect::MessageLeftOut, reason).of(&m.name, None));
                    false
                }
            }
        });
    }

    /// `SG_MUL_VAL_` lines that only restate simple multiplexing (each names an `m<N>`
    /// signal, the one multiplexor, and the range N-N) change nothing: `Ok`, with the name
    /// of a multiplexor marked `m` alone (no value) that they name, to be read as `M`. Any
    /// other `SG_MUL_VAL_` is extended multiplexing: `Err`, why.
    fn restated_multiplexing<'a>(
        dbc: &can_dbc::Dbc,
        m: &'a can_dbc::Message,
        text: &str,
    ) -> Result<Option<&'a str>, String> {
        use can_dbc::MultiplexIndicator as I;
        let mut named: Option<&str> = None;
        let mut entries = dbc
            .extended_multiplex
            .iter()
            .filter(|x| x.message_id == m.id)
            .peekable();
        if entries.peek().is_none() {
            return Ok(None);
        }
        let extended = |why: String| {
            Err(format!(
                "uses extended multiplexing (SG_MUL_VAL_), which is not supported: {why}"
            ))
        };
        for x in entries {
            let signal = m.signals.iter().find(|s| s.name == x.signal_name);
            let Some(I::MultiplexedSignal(n)) = signal.map(|s| s.multiplexer_indicator) else {
                return extended(format!("`{}` is not an m<N> signal", x.signal_name));
            };
            if x.mappings.len() != 1
                || x.mappings
                    .iter()
                    .any(|r| r.min_value != n || r.max_value != n)
            {
                return extended(format!(
                    "`{}` is m{n} but SG_MUL_VAL_ gives other values",
                    x.signal_name
                ));
            }
            if named.is_some_and(|y| y != x.multiplexor_signal_name) {
                return extended("more than one multiplexor".into());
            }
            named = Some(&x.multiplexor_signal_name);
        }
        let Some(named) = named else {
            return Ok(None);
        };
        let has_m = m
            .signals
            .iter()
            .any(|s| s.multiplexer_indicator == I::Multiplexor);
        match m.signals.iter().find(|s| s.name == named) {
            Some(s) if s.multiplexer_indicator == I::Multiplexor => Ok(None),
            // `m` alone: can-dbc reads it as plain.
            Some(s)
                if !has_m && s.multiplexer_indicator == I::Plain && marked_m_alone(text, m, s) =>
            {
                Ok(Some(s.name.as_str()))
            }
            _ => extended(format!("`{named}` is not the message's multiplexor")),
        }
    }

    /// Whether the signal's `SG_` line marks it `m` with no value (can-dbc reads that as
    /// a plain signal).
    fn marked_m_alone(text: &str, m: &can_dbc::Message, s: &can_dbc::Signal) -> bool {
        line_of(text, &m.name, Some(&s.name))
            .and_then(|n| text.lines().nth(n - 1))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("m"))
    }

    fn message(
        dbc: &can_dbc::Dbc,
        m: &can_dbc::Message,
        float_types: &HashMap<(can_dbc::MessageId, &str), SignalExtendedValueType>,
        multiplexor_override: Option<&str>,
        text: &str,
    ) -> Result<MessageDef, Defect> {
        let err = |signal: Option<&str>, reason: String| {
            Defect::new(
                line_of(text, &m.name, signal),
                Effect::MessageLeftOut,
                reason,
            )
            .of(&m.name, signal)
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
            let mut def = signal(dbc, m, s, float, size).map_err(|r| err(Some(&s.name), r))?;
            if multiplexor_override == Some(s.name.as_str()) {
                def.mux = MuxRole::Multiplexor;
            }
            signals.push(def);
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

    /// A good message `G` (line 3) after the header, then `tail`.
    fn with_good(tail: &str) -> String {
        format!(
            "VERSION \"\"\nBU_: A\nBO_ 5 G: 2 A\n SG_ Ok : 0|16@1+ (0.5,0) [0|0] \"\" A\n{tail}"
        )
    }

    /// The defect of `M` in a lenient load, with the checks that hold for every one: `G`
    /// still decodes, `M` and its signals are left out naming the line, a strict load
    /// refuses the file at that line.
    fn left_out(tail: &str, line: usize, reason: &str) -> Defect {
        let text = with_good(tail);
        let e = Dbc::from_text_with(&text, true).unwrap_err();
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.reason.contains(reason), "{e}");
        assert!(e.reason.contains("strict"), "{e}");

        let dbc = Dbc::from_text(&text).unwrap_or_else(|e| panic!("{e}"));
        let g = dbc.signal("G", "Ok").expect("G.Ok usable");
        let mut dec = Decoder::new(&dbc, &[(g, 0)]).expect("decoder");
        let mut out = Vec::new();
        dec.decode(5, false, &[0x10, 0x00], &mut out).expect("G");
        assert_eq!(out, vec![(0, 8.0)]);
        let d = dbc
            .defects()
            .iter()
            .find(|d| d.message.as_deref() == Some("M"))
            .unwrap_or_else(|| panic!("no defect for M: {:?}", dbc.defects()))
            .clone();
        assert_eq!(d.effect, Effect::MessageLeftOut, "{d}");
        assert_eq!(d.line, Some(line), "{d}");
        assert!(d.reason.contains(reason), "{d}");
        assert!(d.to_string().contains("message `M` left out"), "{d}");
        let lookup = dbc.signal("M", "S").unwrap_err();
        assert!(
            matches!(&lookup, LookupError::Unusable { message, reason: r }
                if message == "M" && r.contains(&format!("line {line}")) && r.contains(reason)),
            "{lookup}"
        );
        assert!(dbc.message("M").is_err());
        assert!(dbc.messages().iter().all(|m| m.name != "M"));
        d
    }

    #[test]
    fn a_defective_message_is_left_out_and_the_rest_is_used() {
        // A signal line the parser cannot read.
        let d = left_out(
            "BO_ 1 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A B C ,\n",
            6,
            "cannot be read: syntax error",
        );
        assert!(d.reason.contains("A B C ,"), "{d}");
        // A BO_ line the parser cannot read: its signal lines go with it (and do not
        // end up in the message before).
        left_out(
            "BO_ 1 M: 8 A B\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n SG_ T : 8|8@1+ (1,0) [0|0] \"\" A\n",
            5,
            "cannot be read",
        );
        left_out(
            "BO_ 1 M: 2 A\n SG_ S : 7|16@0+ (1,0) [0|0] \"\" A\n SG_ T : 12|8@1+ (1,0) [0|0] \"\" A\n",
            7,
            "past the end of the 2-byte message",
        );
        let d = left_out(
            "BO_ 1 M: 2 A\n SG_ S : 0|9@1+ (1,0) [0|0] \"\" A\n SG_ T : 8|8@1+ (1,0) [0|0] \"\" A\n",
            5,
            "`S` and `T` overlap",
        );
        assert_eq!(d.signal, None);
        let d = left_out(
            "BO_ 1 M: 8 A\n SG_ S : 0|16@1+ (1,0) [0|0] \"\" A\nSIG_VALTYPE_ 1 S : 1;\n",
            6,
            "32-bit float",
        );
        assert_eq!(d.signal.as_deref(), Some("S"));
        left_out(
            "BO_ 1 M: 8 A\n SG_ X M : 0|8@1+ (1,0) [0|0] \"\" A\n SG_ Y m1M : 8|8@1+ (1,0) [0|0] \"\" A\n SG_ S m1 : 16|8@1+ (1,0) [0|0] \"\" A\nSG_MUL_VAL_ 1 S Y 1-1;\n",
            5,
            "extended multiplexing",
        );
        // A SIG_VALTYPE_ line that cannot be read would change how `S` decodes.
        left_out(
            "BO_ 1 M: 8 A\n SG_ S : 0|32@1+ (1,0) [0|0] \"\" A\nSIG_VALTYPE_ 1 S : 7;\n",
            7,
            "cannot be read",
        );
        // Above 29 bits: no frame can carry it.
        left_out(
            "BO_ 1073741824 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            5,
            "above 29 bits",
        );
        left_out(
            "BO_ 4294967295 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            5,
            "above 29 bits",
        );
        left_out(
            "BO_ 1 M: 65 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            5,
            "above 64 bytes",
        );
    }

    #[test]
    fn messages_sharing_an_id_or_a_name_are_all_left_out() {
        let text = with_good(concat!(
            "BO_ 5 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            "BO_ 6 N: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            "BO_ 7 N: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
            "BO_ 8 K: 8 A\n SG_ S : 0|8@1+ (1,0) [0|0] \"\" A\n",
        ));
        let dbc = Dbc::from_text(&text).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = dbc.messages().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["K"]);
        let defects: Vec<String> = dbc.defects().iter().map(ToString::to_string).collect();
        assert_eq!(
            defects,
            [
                "DBC line 3: message `G`: has the same id 0x005 as message `M`; message `G` left out (a binding to it is an error), the rest of the file is used",
                "DBC line 5: message `M`: has the same id 0x005 as message `G`; message `M` left out (a binding to it is an error), the rest of the file is used",
                "DBC line 7: message `N`: another message has this name (line 9); message `N` left out (a binding to it is an error), the rest of the file is used",
                "DBC line 9: message `N`: another message has this name (line 7); message `N` left out (a binding to it is an error), the rest of the file is used",
            ]
        );
        assert!(matches!(
            dbc.signal("N", "S"),
            Err(LookupError::Unusable { .. })
        ));
    }

    #[test]
    fn a_statement_that_decodes_nothing_is_ignored() {
        let text = with_good(concat!(
            "BA_DEF_ BO_ \"GenMsgCycleTime\" INT 0 65535;\n",
            "BA_ \"GenMsgCycleTime\" BO_ 5 100 junk;\n",
            "VAL_ 5 Nope 1 \"on\" 0 \"off\" ;\n",
            "VAL_ 77 Ok 1 \"on\" ;\n",
            "SIG_VALTYPE_ 5 Nope : 1;\n",
            "CM_ SG_ 5 Ok \"never closed;\n",
            "this is no statement\n",
        ));
        let e = Dbc::from_text_with(&text, true).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.reason.contains("6 in the file"), "{e}");
        let dbc = Dbc::from_text(&text).unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(Option<usize>, Effect)> =
            dbc.defects().iter().map(|d| (d.line, d.effect)).collect();
        assert_eq!(
            got,
            (6..=11)
                .map(|l| (Some(l), Effect::Ignored))
                .collect::<Vec<_>>(),
            "{:#?}",
            dbc.defects()
        );
        for (d, words) in dbc.defects().iter().zip([
            &["cannot be read", "junk"][..],
            &["VAL_ names signal `Nope`, which message `G` does not have"],
            &["names message id 77, which no message has"],
            &["SIG_VALTYPE_ names signal `Nope`"],
            &["never closes"],
            &["cannot be read", "this is no statement"],
        ]) {
            for w in words {
                assert!(d.to_string().contains(w), "{w}: {d}");
            }
            assert!(d.to_string().ends_with("; ignored"), "{d}");
            assert!(d.message.is_none(), "{d}");
        }
        assert!(dbc.signal("G", "Ok").is_ok());
    }

    #[test]
    fn what_is_unambiguous_is_read_with_a_warning() {
        // An id above 0x7FF without bit 31 (opendbc's chrysler_cusw: 103596083), referred
        // to by CM_, SIG_VALTYPE_ and BA_ as written; above 0xFFFF too, which can-dbc would
        // truncate to 16 bits (to 0xC033 here).
        // A message and a signal whose names start with a digit (mazda_2017, psa).
        let text = with_good(concat!(
            "BO_ 103596083 BSM_LEFT: 8 A\n",
            " SG_ F : 0|32@1- (1,0) [0|0] \"\" A\n",
            " SG_ 0_COUNTER : 35|4@0+ (1,0) [0|15] \"\" A\n",
            "BO_ 1275 2017_5: 8 A\n",
            " SG_ 1X : 0|8@1+ (2,0) [0|0] \"\" A\n",
            "CM_ BO_ 103596083 \"blind spot\";\n",
            "BA_ \"GenMsgCycleTime\" BO_ 103596083 100;\n",
            "SIG_VALTYPE_ 103596083 F : 1;\n",
        ));
        let e = Dbc::from_text_with(&text, true).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let dbc = Dbc::from_text(&text).unwrap_or_else(|e| panic!("{e}"));
        type Row<'a> = (Option<usize>, Option<&'a str>, Option<&'a str>, Effect);
        let got: Vec<Row> = dbc
            .defects()
            .iter()
            .map(|d| (d.line, d.message.as_deref(), d.signal.as_deref(), d.effect))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(5), Some("BSM_LEFT"), None, Effect::ReadAsWritten),
                (
                    Some(7),
                    Some("BSM_LEFT"),
                    Some("0_COUNTER"),
                    Effect::ReadAsWritten
                ),
                (Some(8), Some("2017_5"), None, Effect::ReadAsWritten),
                (Some(9), Some("2017_5"), Some("1X"), Effect::ReadAsWritten),
            ]
        );
        let warning = dbc.defects()[0].to_string();
        assert!(
            warning.contains("read as extended id 0x062CC033"),
            "{warning}"
        );
        let bsm = dbc.message("BSM_LEFT").expect("BSM_LEFT");
        assert_eq!(
            bsm.id,
            CanId {
                id: 0x062C_C033,
                extended: true
            }
        );
        assert_eq!(bsm.comment.as_deref(), Some("blind spot"));
        assert_eq!(bsm.signal("F").expect("F").value_type, ValueType::Float32);
        assert!(dbc.message_by_id(0xC033, false).is_none());
        let refs = [
            (dbc.signal("BSM_LEFT", "F").expect("F"), 0),
            (dbc.signal("BSM_LEFT", "0_COUNTER").expect("0_COUNTER"), 1),
            (dbc.signal("2017_5", "1X").expect("1X"), 2),
        ];
        let mut dec = Decoder::new(&dbc, &refs).expect("decoder");
        let mut out = Vec::new();
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&1.5f32.to_le_bytes());
        data[4] = 0x09; // bits 35..32: 0_COUNTER = 9
        dec.decode(0x062C_C033, true, &data, &mut out)
            .expect("BSM_LEFT");
        assert_eq!(out, vec![(0, 1.5), (1, 9.0)]);
        assert_eq!(
            dec.decode(0x062C_C033, false, &data, &mut out),
            Err(DecodeError::UnknownId)
        );
        out.clear();
        dec.decode(1275, false, &[21, 0, 0, 0, 0, 0, 0, 0], &mut out)
            .expect("2017_5");
        assert_eq!(out, vec![(2, 42.0)]);
    }

    #[test]
    fn sg_mul_val_that_restates_simple_multiplexing_is_used() {
        let tail = |indicator: &str, range: &str| {
            format!(
                "BO_ 1 M: 8 A\n SG_ Sel {indicator} : 0|4@1+ (1,0) [0|0] \"\" A\n SG_ S m1 : 8|8@1+ (1,0) [0|0] \"\" A\n SG_ T m2 : 8|8@1+ (2,0) [0|0] \"\" A\nSG_MUL_VAL_ 1 S Sel {range};\nSG_MUL_VAL_ 1 T Sel 2-2;\n"
            )
        };
        let message = |indicator: &str, range: &str| with_good(&tail(indicator, range));
        // As vw_pq writes Bremse_1: no defect at all.
        let dbc = Dbc::from_text_with(&message("M", "1-1"), true).unwrap_or_else(|e| panic!("{e}"));
        let mut dec = Decoder::new(
            &dbc,
            &[
                (dbc.signal("M", "S").expect("S"), 0),
                (dbc.signal("M", "T").expect("T"), 1),
            ],
        )
        .expect("decoder");
        let mut out = Vec::new();
        dec.decode(1, false, &[2, 21, 0, 0, 0, 0, 0, 0], &mut out)
            .expect("mux 2");
        assert_eq!(out, vec![(1, 42.0)]);
        // As vw_pq writes Motor_2: the multiplexor marked `m` alone, named by SG_MUL_VAL_.
        let text = message("m", "1-1");
        assert!(Dbc::from_text_with(&text, true).is_err());
        let dbc = Dbc::from_text(&text).unwrap_or_else(|e| panic!("{e}"));
        let d = &dbc.defects()[0];
        assert_eq!(
            (d.line, d.effect, d.signal.as_deref()),
            (Some(6), Effect::ReadAsWritten, Some("Sel")),
            "{d}"
        );
        assert!(d.to_string().contains("read as the multiplexor (M)"), "{d}");
        assert_eq!(dbc.message("M").expect("M").mux_values(), [1, 2]);
        // A range of values: extended multiplexing, the message is left out.
        left_out(
            &tail("M", "1-3"),
            5,
            "`S` is m1 but SG_MUL_VAL_ gives other values",
        );
    }

    #[test]
    fn a_file_beyond_repair_is_refused() {
        // More statements than anyone meant to install cannot be read.
        let mut text = with_good("");
        for _ in 0..101 {
            text.push_str("garbage line\n");
        }
        let e = Dbc::from_text(&text).unwrap_err();
        assert!(e.reason.contains("more than 100 statements"), "{e}");
        // A SIG_VALTYPE_ that names no readable message: which signal it changes is
        // unknown.
        let e = Dbc::from_text(&with_good("SIG_VALTYPE_ x S : 1;\n")).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
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
