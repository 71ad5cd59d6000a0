//! Lines of `candump -L` logs (the can-utils log file format):
//!
//! ```text
//! (1469439874.299654) can0 123#DEADBEEF          classic frame, standard id
//! (1469439874.299654) can0 1F334455#0011         extended id (8 hex digits)
//! (1469439874.299654) can0 123#R                 remote frame (also 123#R4: with its DLC)
//! (1469439874.299654) can0 123##1DEADBEEF        CAN FD: `##`, a flags digit, up to 64 bytes
//! (1469439874.299654) can0 123#1122334455667788_E   classic frame with a raw DLC above 8
//! (1469439874.299654) can0 123#DEADBEEF T        `candump -x`: T (sent) or R (received)
//! ```
//!
//! Parsing borrows the interface name from the line and does not allocate.

use std::fmt;

/// Largest CAN FD payload.
pub const MAX_DATA: usize = 64;
const MAX_CLASSIC: usize = 8;
/// `CAN_ERR_FLAG`: candump writes error frames with this bit set in an 8-digit id.
const ERR_FLAG: u32 = 0x2000_0000;

/// One frame of a candump log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFrame<'a> {
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
    pub interface: &'a str,
    pub id: u32,
    pub extended: bool,
    /// Remote transmission request: no data; `remote_len` is the requested length.
    pub remote: bool,
    pub remote_len: u8,
    pub fd: bool,
    /// CAN FD flags digit (BRS = 1, ESI = 2).
    pub fd_flags: u8,
    pub len: u8,
    pub data: [u8; MAX_DATA],
}

impl LogFrame<'_> {
    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len).min(MAX_DATA)]
    }
}

/// Why a line is not a candump frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// Nothing but white space.
    Empty,
    /// The line does not start with `(seconds.micros)`.
    MissingTimestamp,
    /// The timestamp is not `digits.digits` or does not fit.
    BadTimestamp,
    MissingInterface,
    /// The interface name is not UTF-8.
    BadInterface,
    MissingFrame,
    /// The id is not 3 or 8 hex digits followed by `#`, or is out of range.
    BadId,
    /// A CAN error frame (8-digit id with CAN_ERR_FLAG): not data.
    ErrorFrame,
    /// A data byte is not two hex digits.
    OddHexDigits,
    /// A character that should be a hex digit is not.
    NonHex,
    /// More data bytes than the frame type allows.
    TooLong {
        max: usize,
    },
    /// `R` followed by something other than a length 0 to 8.
    BadRemoteLength,
    /// The `_` raw DLC of a classic frame is not 9 to F after 8 bytes.
    BadDlc,
    /// Something after the frame other than a `T`/`R` direction.
    TrailingGarbage,
}

impl LineError {
    /// A stable short name, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            LineError::Empty => "empty",
            LineError::MissingTimestamp => "missing_timestamp",
            LineError::BadTimestamp => "bad_timestamp",
            LineError::MissingInterface => "missing_interface",
            LineError::BadInterface => "bad_interface",
            LineError::MissingFrame => "missing_frame",
            LineError::BadId => "bad_id",
            LineError::ErrorFrame => "error_frame",
            LineError::OddHexDigits => "odd_hex_digits",
            LineError::NonHex => "non_hex",
            LineError::TooLong { .. } => "too_long",
            LineError::BadRemoteLength => "bad_remote_length",
            LineError::BadDlc => "bad_dlc",
            LineError::TrailingGarbage => "trailing_garbage",
        }
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            LineError::Empty => "empty line",
            LineError::MissingTimestamp => "missing `(seconds.micros)` timestamp",
            LineError::BadTimestamp => "bad timestamp",
            LineError::MissingInterface => "missing interface name",
            LineError::BadInterface => "interface name is not UTF-8",
            LineError::MissingFrame => "missing frame",
            LineError::BadId => "bad CAN id (3 hex digits up to 7FF, or 8 up to 1FFFFFFF, then #)",
            LineError::ErrorFrame => "CAN error frame",
            LineError::OddHexDigits => "odd number of hex digits in the data",
            LineError::NonHex => "non-hex character in the data",
            LineError::TooLong { max } => return write!(f, "more than {max} data bytes"),
            LineError::BadRemoteLength => "bad remote frame length",
            LineError::BadDlc => "bad raw DLC after `_`",
            LineError::TrailingGarbage => "unexpected text after the frame",
        };
        f.write_str(text)
    }
}

impl std::error::Error for LineError {}

/// Parses one log line (a trailing `\n` or `\r\n` is fine).
pub fn parse_line(line: &[u8]) -> Result<LogFrame<'_>, LineError> {
    let line = trim_end(line);
    let rest = trim_start(line);
    if rest.is_empty() {
        return Err(LineError::Empty);
    }
    let rest = rest.strip_prefix(b"(").ok_or(LineError::MissingTimestamp)?;
    let close = rest
        .iter()
        .position(|&b| b == b')')
        .ok_or(LineError::BadTimestamp)?;
    let time_us = parse_time(&rest[..close])?;

    let (interface, rest) = word(&rest[close + 1..]).ok_or(LineError::MissingInterface)?;
    let interface = std::str::from_utf8(interface).map_err(|_| LineError::BadInterface)?;
    let (frame, rest) = word(rest).ok_or(LineError::MissingFrame)?;
    match word(rest) {
        None => {}
        Some((b"T" | b"R", rest)) if word(rest).is_none() => {}
        Some(_) => return Err(LineError::TrailingGarbage),
    }

    let mut out = LogFrame {
        time_us,
        interface,
        id: 0,
        extended: false,
        remote: false,
        remote_len: 0,
        fd: false,
        fd_flags: 0,
        len: 0,
        data: [0; MAX_DATA],
    };
    parse_frame(frame, &mut out)?;
    Ok(out)
}

fn parse_frame(frame: &[u8], out: &mut LogFrame<'_>) -> Result<(), LineError> {
    let hash = frame
        .iter()
        .position(|&b| b == b'#')
        .ok_or(LineError::BadId)?;
    let (id_digits, body) = (&frame[..hash], &frame[hash + 1..]);
    let id = hex_value(id_digits).ok_or(LineError::BadId)?;
    match id_digits.len() {
        3 if id <= 0x7FF => {}
        8 if id & ERR_FLAG != 0 => return Err(LineError::ErrorFrame),
        8 if id <= 0x1FFF_FFFF => out.extended = true,
        _ => return Err(LineError::BadId),
    }
    out.id = id;

    if let Some(r) = body.strip_prefix(b"R").or_else(|| body.strip_prefix(b"r")) {
        out.remote = true;
        let (len, dlc) = split_dlc(r);
        out.remote_len = match len {
            [] => 0,
            [d] => hex_digit(*d)
                .filter(|&n| usize::from(n) <= MAX_CLASSIC)
                .ok_or(LineError::BadRemoteLength)?,
            _ => return Err(LineError::BadRemoteLength),
        };
        return check_dlc(dlc, usize::from(out.remote_len));
    }

    if let Some(fd) = body.strip_prefix(b"#") {
        let (&flags, data) = fd.split_first().ok_or(LineError::NonHex)?;
        out.fd = true;
        out.fd_flags = hex_digit(flags).ok_or(LineError::NonHex)?;
        out.len = parse_data(data, &mut out.data, MAX_DATA)?;
        return Ok(());
    }

    let (data, dlc) = split_dlc(body);
    out.len = parse_data(data, &mut out.data, MAX_CLASSIC)?;
    check_dlc(dlc, usize::from(out.len))
}

/// Splits off the `_X` raw DLC of a classic frame.
fn split_dlc(body: &[u8]) -> (&[u8], Option<&[u8]>) {
    match body.iter().position(|&b| b == b'_') {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    }
}

/// A raw DLC (9 to F) only makes sense on an 8-byte classic frame.
fn check_dlc(dlc: Option<&[u8]>, len: usize) -> Result<(), LineError> {
    match dlc {
        None => Ok(()),
        Some([d]) if len == MAX_CLASSIC && hex_digit(*d).is_some_and(|n| n > 8) => Ok(()),
        Some(_) => Err(LineError::BadDlc),
    }
}

/// Hex bytes, optionally separated by single dots (as `cansend` accepts).
fn parse_data(text: &[u8], data: &mut [u8; MAX_DATA], max: usize) -> Result<u8, LineError> {
    let mut len = 0;
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'.' && len > 0 {
            i += 1;
            continue;
        }
        let hi = hex_digit(text[i]).ok_or(LineError::NonHex)?;
        let Some(&lo) = text.get(i + 1) else {
            return Err(LineError::OddHexDigits);
        };
        let lo = hex_digit(lo).ok_or(if lo == b'.' {
            LineError::OddHexDigits
        } else {
            LineError::NonHex
        })?;
        if len == max {
            return Err(LineError::TooLong { max });
        }
        data[len] = (hi << 4) | lo;
        len += 1;
        i += 2;
    }
    // len <= max <= 64
    Ok(len as u8)
}

/// `seconds.fraction` to microseconds; digits beyond the sixth are dropped.
fn parse_time(text: &[u8]) -> Result<i64, LineError> {
    let dot = text
        .iter()
        .position(|&b| b == b'.')
        .ok_or(LineError::BadTimestamp)?;
    let (secs, frac) = (&text[..dot], &text[dot + 1..]);
    if secs.is_empty() || frac.is_empty() || frac.len() > 9 {
        return Err(LineError::BadTimestamp);
    }
    let secs = decimal(secs).ok_or(LineError::BadTimestamp)?;
    let mut micros = decimal(&frac[..frac.len().min(6)]).ok_or(LineError::BadTimestamp)?;
    if !frac[6.min(frac.len())..].iter().all(u8::is_ascii_digit) {
        return Err(LineError::BadTimestamp);
    }
    for _ in frac.len()..6 {
        micros *= 10;
    }
    secs.checked_mul(1_000_000)
        .and_then(|us| us.checked_add(micros))
        .ok_or(LineError::BadTimestamp)
}

fn decimal(digits: &[u8]) -> Option<i64> {
    digits.iter().try_fold(0i64, |acc, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(i64::from(d - b'0'))
    })
}

fn hex_value(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    digits
        .iter()
        .try_fold(0u32, |acc, &d| Some((acc << 4) | u32::from(hex_digit(d)?)))
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_space(b)).unwrap_or(s.len());
    &s[start..]
}

fn trim_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| !is_space(b)).map_or(0, |i| i + 1);
    &s[..end]
}

/// The next white-space separated word and what follows it.
fn word(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = trim_start(s);
    if s.is_empty() {
        return None;
    }
    let end = s.iter().position(|&b| is_space(b)).unwrap_or(s.len());
    Some(s.split_at(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> LogFrame<'_> {
        parse_line(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn err(line: &str) -> LineError {
        match parse_line(line.as_bytes()) {
            Ok(f) => panic!("{line:?} parsed: {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn classic_standard_frame() {
        let f = ok("(1469439874.299654) can0 123#DEADBEEF\n");
        assert_eq!(f.time_us, 1_469_439_874_299_654);
        assert_eq!(f.interface, "can0");
        assert_eq!(
            (f.id, f.extended, f.remote, f.fd),
            (0x123, false, false, false)
        );
        assert_eq!(f.data(), [0xDE, 0xAD, 0xBE, 0xEF]);
        assert_eq!(ok("(0.000001) vcan1 7FF#").data(), [] as [u8; 0]);
        assert_eq!(ok("(1.5) c 7ff#0102.03\r\n").data(), [1, 2, 3]);
        assert_eq!(ok("(1.5) c 123#0011223344556677_F").len, 8);
    }

    #[test]
    fn timestamps() {
        assert_eq!(ok("(1.5) c 123#").time_us, 1_500_000);
        assert_eq!(ok("(1.123456789) c 123#").time_us, 1_123_456);
        assert_eq!(err("(1) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(.5) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(1.) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(1.1234567890) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(1.12345678x) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(-1.5) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(99999999999999.5) c 123#"), LineError::BadTimestamp);
        assert_eq!(err("(1.5 c 123#"), LineError::BadTimestamp);
        assert_eq!(err("1.5 c 123#"), LineError::MissingTimestamp);
        assert_eq!(err("  \r\n"), LineError::Empty);
    }

    #[test]
    fn extended_ids() {
        let f = ok("(1.0) can1 1F334455#00");
        assert_eq!((f.id, f.extended), (0x1F33_4455, true));
        assert!(ok("(1.0) can1 00000123#").extended);
        assert_eq!(
            err("(1.0) can1 20000004#0000000000000000"),
            LineError::ErrorFrame
        );
        assert_eq!(err("(1.0) can1 3FFFFFFF#"), LineError::ErrorFrame);
        assert_eq!(err("(1.0) can1 4FFFFFFF#"), LineError::BadId);
        assert_eq!(err("(1.0) can1 800#"), LineError::BadId);
        assert_eq!(err("(1.0) can1 12#"), LineError::BadId);
        assert_eq!(err("(1.0) can1 1234#"), LineError::BadId);
        assert_eq!(err("(1.0) can1 12G#"), LineError::BadId);
        assert_eq!(err("(1.0) can1 123"), LineError::BadId);
    }

    #[test]
    fn remote_frames() {
        let f = ok("(1.0) can0 123#R");
        assert!(f.remote);
        assert_eq!((f.len, f.remote_len), (0, 0));
        let f = ok("(1.0) can0 1F334455#r4");
        assert!(f.remote && f.extended);
        assert_eq!(f.remote_len, 4);
        assert_eq!(ok("(1.0) can0 123#R8_F").remote_len, 8);
        assert_eq!(err("(1.0) can0 123#R9"), LineError::BadRemoteLength);
        assert_eq!(err("(1.0) can0 123#R12"), LineError::BadRemoteLength);
        assert_eq!(err("(1.0) can0 123#R4_F"), LineError::BadDlc);
    }

    #[test]
    fn fd_frames() {
        let f = ok("(1.0) can0 123##1DEADBEEF");
        assert!(f.fd);
        assert_eq!(f.fd_flags, 1);
        assert_eq!(f.data(), [0xDE, 0xAD, 0xBE, 0xEF]);
        let long = format!("(1.0) can0 1F334455##5{}", "A5".repeat(64));
        let f = ok(&long);
        assert_eq!((f.len, f.extended, f.fd_flags), (64, true, 5));
        assert!(f.data().iter().all(|&b| b == 0xA5));
        let too_long = format!("(1.0) can0 123##0{}", "00".repeat(65));
        assert_eq!(err(&too_long), LineError::TooLong { max: 64 });
        assert_eq!(err("(1.0) can0 123##"), LineError::NonHex);
        assert_eq!(err("(1.0) can0 123##X00"), LineError::NonHex);
        assert_eq!(ok("(1.0) can0 123##0").len, 0);
    }

    #[test]
    fn trailing_direction_flag() {
        assert_eq!(ok("(1.0) can0 123#01 T").data(), [1]);
        assert_eq!(ok("(1.0) can0 123#01 R\n").data(), [1]);
        assert_eq!(err("(1.0) can0 123#01 X"), LineError::TrailingGarbage);
        assert_eq!(err("(1.0) can0 123#01 T T"), LineError::TrailingGarbage);
    }

    #[test]
    fn data_errors() {
        assert_eq!(err("(1.0) can0 123#ABC"), LineError::OddHexDigits);
        assert_eq!(err("(1.0) can0 123#A.B"), LineError::OddHexDigits);
        assert_eq!(err("(1.0) can0 123#ZZ"), LineError::NonHex);
        assert_eq!(err("(1.0) can0 123#0Z"), LineError::NonHex);
        assert_eq!(err("(1.0) can0 123#.00"), LineError::NonHex);
        assert_eq!(
            err("(1.0) can0 123#001122334455667788"),
            LineError::TooLong { max: 8 }
        );
        assert_eq!(err("(1.0) can0 123#0011_F"), LineError::BadDlc);
        assert_eq!(err("(1.0) can0 123#0011223344556677_8"), LineError::BadDlc);
        assert_eq!(err("(1.0)"), LineError::MissingInterface);
        assert_eq!(err("(1.0) can0"), LineError::MissingFrame);
        assert_eq!(
            parse_line(b"(1.0) \xFF\xFE 123#"),
            Err(LineError::BadInterface)
        );
    }
}
