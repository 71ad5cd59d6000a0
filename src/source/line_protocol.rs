//! Turns one framed serial line into field values, and field values into a line.
//!
//! Formats ([`LineFormat`]):
//! - `kv`: `brake_disc_temp_fl=652.3 engine_rpm=7850`, pairs separated by any mix and number of
//!   spaces, commas and tabs.
//! - `csv`: `652.3,648.1,7850,105.2`, a fixed column order; an empty cell is no value.
//! - `nmea`: `$RDLTM,652.3,648.1,7850,105.2*68`, a sentence id, fixed columns as in csv, and
//!   the XOR of every byte between `$` and `*` as two hex digits (either case).
//!
//! What is lost when a line is bad: a line is rejected whole when its structure cannot be
//! trusted (not UTF-8; wrong column count; nmea checksum, sentence id or structure). A bad value
//! or an unknown key in an otherwise sound line costs only that value: the rest is taken.
//! Every problem is reported once to the caller, so counters by [`LineError::reason`] add up.
//! In kv, a token without `key=` is malformed, as is a line of separators only; each unknown
//! key counts once; a key given twice yields both values, in line order. In nmea, bytes before
//! the last `$` are counted as malformed (a device reset mid-sentence leaves them) and the
//! sentence after it is still tried, since its checksum vouches for it.
//!
//! Numbers are what `f64::from_str` accepts, if finite: `nan`, `inf` or `1e999` are bad numbers.
//! csv and nmea cells may be padded with spaces or tabs.

use crate::source::line_framer::FrameError;

/// How a sensor prints its lines; field ids are the caller's (e.g. indexes into its field list).
#[derive(Debug, Clone, PartialEq)]
pub enum LineFormat {
    /// The line's key names and the field each one feeds. Several keys may feed one field.
    Kv { keys: Vec<(String, usize)> },
    /// One entry per column; `None` ignores that column.
    Csv { columns: Vec<Option<usize>> },
    /// `sentence` is the id after `$`, e.g. `RDLTM`; `columns` as for csv.
    Nmea {
        sentence: String,
        columns: Vec<Option<usize>>,
    },
}

/// Why a line, or part of one, was not taken. Frame errors are included so that one counter set
/// covers the whole serial path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than the limit")]
    Overlong,
    #[error("partial line at the start of the stream")]
    PartialAtStart,
    #[error("line is not UTF-8")]
    NotUtf8,
    #[error("unknown key")]
    UnknownKey,
    #[error("value for field {field} is not a finite number")]
    BadNumber { field: usize },
    #[error("expected {expected} columns, got {got}")]
    WrongColumnCount { expected: usize, got: usize },
    #[error("unknown sentence id")]
    UnknownSentence,
    #[error("checksum mismatch: computed {computed:02X}, line says {received:02X}")]
    BadChecksum { computed: u8, received: u8 },
    #[error("no checksum")]
    MissingChecksum,
    #[error("malformed line")]
    Malformed,
}

impl LineError {
    /// Every reason, indexed by [`LineError::reason_index`], e.g. to lay out a counter array.
    pub const REASONS: [&'static str; 10] = [
        "overlong",
        "partial_at_start",
        "not_utf8",
        "unknown_key",
        "bad_number",
        "wrong_column_count",
        "unknown_sentence",
        "bad_checksum",
        "missing_checksum",
        "malformed",
    ];

    pub fn reason_index(&self) -> usize {
        match self {
            LineError::Overlong => 0,
            LineError::PartialAtStart => 1,
            LineError::NotUtf8 => 2,
            LineError::UnknownKey => 3,
            LineError::BadNumber { .. } => 4,
            LineError::WrongColumnCount { .. } => 5,
            LineError::UnknownSentence => 6,
            LineError::BadChecksum { .. } => 7,
            LineError::MissingChecksum => 8,
            LineError::Malformed => 9,
        }
    }

    /// A stable snake_case name, for counters and logs.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.reason_index()]
    }
}

impl From<FrameError> for LineError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Overlong => LineError::Overlong,
            FrameError::PartialAtStart => LineError::PartialAtStart,
        }
    }
}

/// A [`LineFormat`] that can never work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the line format feeds no field")]
    NoFields,
    #[error("kv key {0:?} is empty or holds a space, comma, tab or '='")]
    BadKey(String),
    #[error("kv key {0:?} is listed twice")]
    DuplicateKey(String),
    #[error("nmea sentence id {0:?} must be ASCII letters and digits")]
    BadSentence(String),
}

#[derive(Debug, Clone)]
pub struct LineParser {
    format: LineFormat,
}

const KV_SEPARATORS: [char; 3] = [' ', ',', '\t'];
const PADDING: [char; 2] = [' ', '\t'];

impl LineParser {
    pub fn new(format: LineFormat) -> Result<Self, FormatError> {
        match &format {
            LineFormat::Kv { keys } => {
                if keys.is_empty() {
                    return Err(FormatError::NoFields);
                }
                for (i, (key, _)) in keys.iter().enumerate() {
                    if key.is_empty() || key.contains(KV_SEPARATORS) || key.contains('=') {
                        return Err(FormatError::BadKey(key.clone()));
                    }
                    if keys[..i].iter().any(|(k, _)| k == key) {
                        return Err(FormatError::DuplicateKey(key.clone()));
                    }
                }
            }
            LineFormat::Csv { columns } => check_columns(columns)?,
            LineFormat::Nmea { sentence, columns } => {
                if sentence.is_empty() || !sentence.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(FormatError::BadSentence(sentence.clone()));
                }
                check_columns(columns)?;
            }
        }
        Ok(Self { format })
    }

    pub fn format(&self) -> &LineFormat {
        &self.format
    }

    /// Appends the values of `line` (one framed line, no terminator) to `out` in line order, and
    /// reports each problem to `on_error`. A line rejected whole appends nothing.
    pub fn parse(
        &self,
        line: &[u8],
        out: &mut Vec<(usize, f64)>,
        on_error: &mut impl FnMut(LineError),
    ) {
        let Ok(line) = std::str::from_utf8(line) else {
            on_error(LineError::NotUtf8);
            return;
        };
        match &self.format {
            LineFormat::Kv { keys } => parse_kv(keys, line, out, on_error),
            LineFormat::Csv { columns } => parse_cells(columns, line, out, on_error),
            LineFormat::Nmea { sentence, columns } => {
                parse_nmea(sentence, columns, line, out, on_error)
            }
        }
    }

    /// Appends one line (no terminator) carrying `values`, for the bench simulator.
    ///
    /// Values whose field the format does not carry, and non-finite values, are left out; for
    /// csv and nmea, where a field appears twice in `values` the last one is written. `parse`
    /// gives back exactly the values written: for kv in the order given, for csv and nmea in
    /// column order.
    pub fn format_line(&self, values: &[(usize, f64)], out: &mut Vec<u8>) {
        let mut num = ryu::Buffer::new();
        match &self.format {
            LineFormat::Kv { keys } => {
                let mut first = true;
                for &(field, value) in values {
                    let Some((key, _)) = keys.iter().find(|(_, f)| *f == field) else {
                        continue;
                    };
                    if !value.is_finite() {
                        continue;
                    }
                    if !first {
                        out.push(b' ');
                    }
                    first = false;
                    out.extend_from_slice(key.as_bytes());
                    out.push(b'=');
                    out.extend_from_slice(num.format_finite(value).as_bytes());
                }
            }
            LineFormat::Csv { columns } => write_cells(columns, values, out, &mut num),
            LineFormat::Nmea { sentence, columns } => {
                out.push(b'$');
                let body = out.len();
                out.extend_from_slice(sentence.as_bytes());
                out.push(b',');
                write_cells(columns, values, out, &mut num);
                let sum = nmea_checksum(&out[body..]);
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.extend_from_slice(&[
                    b'*',
                    HEX[usize::from(sum >> 4)],
                    HEX[usize::from(sum & 15)],
                ]);
            }
        }
    }
}

/// XOR of the bytes between `$` and `*`.
pub fn nmea_checksum(body: &[u8]) -> u8 {
    body.iter().fold(0, |sum, b| sum ^ b)
}

fn check_columns(columns: &[Option<usize>]) -> Result<(), FormatError> {
    if columns.iter().any(Option::is_some) {
        Ok(())
    } else {
        Err(FormatError::NoFields)
    }
}

fn parse_number(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn parse_kv(
    keys: &[(String, usize)],
    line: &str,
    out: &mut Vec<(usize, f64)>,
    on_error: &mut impl FnMut(LineError),
) {
    let mut pairs = 0;
    for token in line.split(KV_SEPARATORS).filter(|t| !t.is_empty()) {
        pairs += 1;
        let Some((key, value)) = token.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            on_error(LineError::Malformed);
            continue;
        };
        let Some(&(_, field)) = keys.iter().find(|(k, _)| k == key) else {
            on_error(LineError::UnknownKey);
            continue;
        };
        match parse_number(value) {
            Some(v) => out.push((field, v)),
            None => on_error(LineError::BadNumber { field }),
        }
    }
    if pairs == 0 {
        on_error(LineError::Malformed);
    }
}

/// Comma-separated cells, as many as `columns`.
fn parse_cells(
    columns: &[Option<usize>],
    cells: &str,
    out: &mut Vec<(usize, f64)>,
    on_error: &mut impl FnMut(LineError),
) {
    let got = cells.bytes().filter(|&b| b == b',').count() + 1;
    if got != columns.len() {
        on_error(LineError::WrongColumnCount {
            expected: columns.len(),
            got,
        });
        return;
    }
    for (cell, column) in cells.split(',').zip(columns) {
        let Some(field) = *column else { continue };
        let cell = cell.trim_matches(PADDING);
        if cell.is_empty() {
            continue;
        }
        match parse_number(cell) {
            Some(v) => out.push((field, v)),
            None => on_error(LineError::BadNumber { field }),
        }
    }
}

fn parse_nmea(
    sentence: &str,
    columns: &[Option<usize>],
    line: &str,
    out: &mut Vec<(usize, f64)>,
    on_error: &mut impl FnMut(LineError),
) {
    let line = line.trim_matches(PADDING);
    // A device reset mid-sentence leaves the broken start on the same line as the next
    // sentence: count the noise, and try the last sentence, which the checksum vouches for.
    let Some(dollar) = line.rfind('$') else {
        on_error(LineError::Malformed);
        return;
    };
    if dollar > 0 {
        on_error(LineError::Malformed);
    }
    let Some((body, checksum)) = line[dollar + 1..].split_once('*') else {
        on_error(LineError::MissingChecksum);
        return;
    };
    let checksum = checksum.trim_end_matches(PADDING);
    if checksum.is_empty() {
        on_error(LineError::MissingChecksum);
        return;
    }
    let Some(received) = parse_hex_byte(checksum.as_bytes()) else {
        on_error(LineError::Malformed);
        return;
    };
    let computed = nmea_checksum(body.as_bytes());
    if computed != received {
        on_error(LineError::BadChecksum { computed, received });
        return;
    }
    let (id, cells) = match body.split_once(',') {
        Some((id, cells)) => (id, Some(cells)),
        None => (body, None),
    };
    if id != sentence {
        on_error(LineError::UnknownSentence);
        return;
    }
    match cells {
        Some(cells) => parse_cells(columns, cells, out, on_error),
        None => on_error(LineError::WrongColumnCount {
            expected: columns.len(),
            got: 0,
        }),
    }
}

fn parse_hex_byte(text: &[u8]) -> Option<u8> {
    let &[hi, lo] = text else { return None };
    let digit = |b: u8| char::from(b).to_digit(16);
    Some(((digit(hi)? << 4) | digit(lo)?) as u8)
}

fn write_cells(
    columns: &[Option<usize>],
    values: &[(usize, f64)],
    out: &mut Vec<u8>,
    num: &mut ryu::Buffer,
) {
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let value = column.and_then(|field| values.iter().rev().find(|(f, _)| *f == field));
        if let Some(&(_, v)) = value.filter(|(_, v)| v.is_finite()) {
            out.extend_from_slice(num.format_finite(v).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::line_framer::LineFramer;

    const FL: usize = 0;
    const FR: usize = 1;
    const RPM: usize = 2;
    const OIL: usize = 3;

    fn kv() -> LineParser {
        let keys = [
            "brake_disc_temp_fl",
            "brake_disc_temp_fr",
            "engine_rpm",
            "oil_temp",
        ];
        let keys = keys.iter().enumerate().map(|(i, k)| (k.to_string(), i));
        LineParser::new(LineFormat::Kv {
            keys: keys.collect(),
        })
        .expect("valid format")
    }

    fn four_columns() -> Vec<Option<usize>> {
        vec![Some(FL), Some(FR), Some(RPM), Some(OIL)]
    }

    fn csv() -> LineParser {
        LineParser::new(LineFormat::Csv {
            columns: four_columns(),
        })
        .expect("valid format")
    }

    fn nmea() -> LineParser {
        LineParser::new(LineFormat::Nmea {
            sentence: "RDLTM".into(),
            columns: four_columns(),
        })
        .expect("valid format")
    }

    fn parse(p: &LineParser, line: &[u8]) -> (Vec<(usize, f64)>, Vec<LineError>) {
        let (mut values, mut errors) = (Vec::new(), Vec::new());
        p.parse(line, &mut values, &mut |e| errors.push(e));
        (values, errors)
    }

    fn taken(p: &LineParser, line: &[u8]) -> Vec<(usize, f64)> {
        let (values, errors) = parse(p, line);
        assert_eq!(errors, vec![], "{}", String::from_utf8_lossy(line));
        values
    }

    fn rejected(p: &LineParser, line: &[u8]) -> Vec<LineError> {
        let (values, errors) = parse(p, line);
        assert_eq!(values, vec![], "{}", String::from_utf8_lossy(line));
        errors
    }

    const CAR: [(usize, f64); 4] = [(FL, 652.3), (FR, 648.1), (RPM, 7850.0), (OIL, 105.2)];

    #[test]
    fn kv_takes_every_pair_with_any_separators() {
        let line =
            b"brake_disc_temp_fl=652.3 brake_disc_temp_fr=648.1,engine_rpm=7850 ,, oil_temp=105.2";
        assert_eq!(taken(&kv(), line), CAR);
        assert_eq!(taken(&kv(), b"  oil_temp=-1e2\t"), vec![(OIL, -100.0)]);
    }

    #[test]
    fn kv_unknown_keys_are_counted_and_known_pairs_kept() {
        let (values, errors) = parse(&kv(), b"tyre_fl=80 engine_rpm=7850 tyre_fr=81");
        assert_eq!(values, vec![(RPM, 7850.0)]);
        assert_eq!(errors, vec![LineError::UnknownKey; 2]);
    }

    #[test]
    fn kv_bad_number_costs_only_that_pair() {
        let (values, errors) = parse(&kv(), b"engine_rpm=78x0 oil_temp=105.2 brake_disc_temp_fl=");
        assert_eq!(values, vec![(OIL, 105.2)]);
        let bad = |field| LineError::BadNumber { field };
        assert_eq!(errors, vec![bad(RPM), bad(FL)]);
    }

    #[test]
    fn non_finite_numbers_are_bad() {
        for text in [
            "nan", "NaN", "inf", "-inf", "infinity", "1e999", "0x10", "1_0", "--1",
        ] {
            let line = format!("{text},1,2,3");
            let (values, errors) = parse(&csv(), line.as_bytes());
            assert_eq!(errors, vec![LineError::BadNumber { field: FL }], "{text}");
            assert_eq!(values.len(), 3);
        }
        let errors = rejected(&kv(), b"oil_temp=nan engine_rpm=inf");
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn kv_tokens_without_key_or_equals_are_malformed() {
        let (values, errors) = parse(&kv(), b"=5 garbage oil_temp=90");
        assert_eq!(values, vec![(OIL, 90.0)]);
        assert_eq!(errors, vec![LineError::Malformed; 2]);
        assert_eq!(rejected(&kv(), b" , ,"), vec![LineError::Malformed]);
    }

    #[test]
    fn csv_takes_columns_in_order_skipping_ignored_and_empty_ones() {
        assert_eq!(taken(&csv(), b"652.3,648.1,7850,105.2"), CAR);
        assert_eq!(
            taken(&csv(), b" 652.3 ,,\t7850,"),
            vec![(FL, 652.3), (RPM, 7850.0)]
        );
        let with_label = LineParser::new(LineFormat::Csv {
            columns: vec![None, Some(RPM), None],
        })
        .expect("valid format");
        assert_eq!(taken(&with_label, b"ECU,7850,ok"), vec![(RPM, 7850.0)]);
    }

    #[test]
    fn csv_wrong_column_count_rejects_the_line() {
        let got = |line: &[u8]| rejected(&csv(), line);
        let wrong = |got| vec![LineError::WrongColumnCount { expected: 4, got }];
        assert_eq!(got(b"652.3,648.1,7850"), wrong(3));
        assert_eq!(got(b"652.3,648.1,7850,105.2,"), wrong(5));
        assert_eq!(got(b"x"), wrong(1));
    }

    #[test]
    fn csv_bad_number_costs_only_that_cell() {
        let (values, errors) = parse(&csv(), b"652.3,ERR,7850,105.2");
        assert_eq!(values, vec![(FL, 652.3), (RPM, 7850.0), (OIL, 105.2)]);
        assert_eq!(errors, vec![LineError::BadNumber { field: FR }]);
    }

    #[test]
    fn nmea_checksum_of_the_example_sentence() {
        assert_eq!(nmea_checksum(b"RDLTM,652.3,648.1,7850,105.2"), 0x68);
        assert_eq!(taken(&nmea(), b"$RDLTM,652.3,648.1,7850,105.2*68"), CAR);
        let padded = b"  $RDLTM,652.3,648.1,7850,105.2*68 ";
        assert_eq!(taken(&nmea(), padded), CAR);
    }

    #[test]
    fn nmea_checksum_hex_is_case_insensitive() {
        assert_eq!(nmea_checksum(b"RDLTM,8,,,"), 0x7B);
        assert_eq!(taken(&nmea(), b"$RDLTM,8,,,*7b"), vec![(FL, 8.0)]);
        assert_eq!(taken(&nmea(), b"$RDLTM,8,,,*7B"), vec![(FL, 8.0)]);
    }

    #[test]
    fn nmea_errors() {
        let p = nmea();
        let errors = |line: &str| rejected(&p, line.as_bytes());
        assert_eq!(
            errors("$RDLTM,652.3,648.1,7850,105.2*5A"),
            vec![LineError::BadChecksum {
                computed: 0x68,
                received: 0x5A
            }]
        );
        assert_eq!(
            errors("$RDLTM,652.3,648.1,7850,105.2"),
            vec![LineError::MissingChecksum]
        );
        assert_eq!(
            errors("$RDLTM,652.3,648.1,7850,105.2*"),
            vec![LineError::MissingChecksum]
        );
        let other = format!("$GPGGA,1,2,3,4*{:02X}", nmea_checksum(b"GPGGA,1,2,3,4"));
        assert_eq!(errors(&other), vec![LineError::UnknownSentence]);
        for malformed in [
            "RDLTM,652.3,648.1,7850,105.2*68",
            "$RDLTM,652.3,648.1,7850,105.2*6",
            "$RDLTM,652.3,648.1,7850,105.2*6G",
            "$RDLTM,652.3,648.1,7850,105.2*680",
            "$RDLTM,652.3,648.1,7850,105.2*68*68",
        ] {
            assert_eq!(errors(malformed), vec![LineError::Malformed], "{malformed}");
        }
        let short = format!("$RDLTM,1,2*{:02X}", nmea_checksum(b"RDLTM,1,2"));
        let wrong = |got| vec![LineError::WrongColumnCount { expected: 4, got }];
        assert_eq!(errors(&short), wrong(2));
        let bare = format!("$RDLTM*{:02X}", nmea_checksum(b"RDLTM"));
        assert_eq!(errors(&bare), wrong(0));
        assert_eq!(nmea_checksum(b"RDLTM,x,648.1,,"), 0x1E);
        let (values, errs) = parse(&p, b"$RDLTM,x,648.1,,*1E");
        assert_eq!(values, vec![(FR, 648.1)]);
        assert_eq!(errs, vec![LineError::BadNumber { field: FL }]);
    }

    #[test]
    fn nmea_sentence_after_a_mid_line_reset_is_recovered_and_the_noise_counted() {
        let (values, errors) = parse(&nmea(), b"$RDLTM,652.3,64$RDLTM,652.3,648.1,7850,105.2*68");
        assert_eq!(values, CAR);
        assert_eq!(errors, vec![LineError::Malformed]);
    }

    #[test]
    fn non_utf8_lines_are_rejected_whole_in_every_format() {
        let line = b"engine_rpm=7850 oil_temp=\xff105";
        assert_eq!(rejected(&kv(), line), vec![LineError::NotUtf8]);
        assert_eq!(
            rejected(&csv(), b"652.3,\xc3,7850,1"),
            vec![LineError::NotUtf8]
        );
        assert_eq!(
            rejected(&nmea(), b"$RDLTM,\x80*00"),
            vec![LineError::NotUtf8]
        );
    }

    #[test]
    fn format_line_writes_lines_that_parse_back() {
        let mut line = Vec::new();
        kv().format_line(&CAR, &mut line);
        assert_eq!(
            line,
            b"brake_disc_temp_fl=652.3 brake_disc_temp_fr=648.1 engine_rpm=7850.0 oil_temp=105.2"
        );
        line.clear();
        nmea().format_line(&CAR, &mut line);
        let sum = nmea_checksum(b"RDLTM,652.3,648.1,7850.0,105.2");
        assert_eq!(
            line,
            format!("$RDLTM,652.3,648.1,7850.0,105.2*{sum:02X}").as_bytes()
        );
        line.clear();
        csv().format_line(&[(OIL, 1.5), (9, 2.0), (FL, f64::NAN)], &mut line);
        assert_eq!(line, b",,,1.5");
        for p in [kv(), csv(), nmea()] {
            line.clear();
            p.format_line(&CAR, &mut line);
            assert_eq!(taken(&p, &line), CAR);
        }
    }

    #[test]
    fn reasons_are_distinct_snake_case_names() {
        let all = [
            LineError::Overlong,
            LineError::PartialAtStart,
            LineError::NotUtf8,
            LineError::UnknownKey,
            LineError::BadNumber { field: 0 },
            LineError::WrongColumnCount {
                expected: 1,
                got: 2,
            },
            LineError::UnknownSentence,
            LineError::BadChecksum {
                computed: 0,
                received: 1,
            },
            LineError::MissingChecksum,
            LineError::Malformed,
        ];
        let names: Vec<_> = all.iter().map(LineError::reason).collect();
        assert_eq!(names, LineError::REASONS);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.reason_index(), i);
        }
        assert_eq!(LineError::from(FrameError::Overlong).reason(), "overlong");
        assert_eq!(
            LineError::from(FrameError::PartialAtStart).reason(),
            "partial_at_start"
        );
    }

    #[test]
    fn impossible_formats_are_refused() {
        let kv_of = |keys: &[&str]| {
            let keys = keys.iter().map(|k| (k.to_string(), 0)).collect();
            LineParser::new(LineFormat::Kv { keys }).err()
        };
        assert_eq!(kv_of(&[]), Some(FormatError::NoFields));
        assert_eq!(kv_of(&["a b"]), Some(FormatError::BadKey("a b".into())));
        assert_eq!(kv_of(&["a=b"]), Some(FormatError::BadKey("a=b".into())));
        assert_eq!(
            kv_of(&["a", "a"]),
            Some(FormatError::DuplicateKey("a".into()))
        );
        let csv = LineParser::new(LineFormat::Csv {
            columns: vec![None, None],
        });
        assert_eq!(csv.err(), Some(FormatError::NoFields));
        let nmea = LineParser::new(LineFormat::Nmea {
            sentence: "RD,LTM".into(),
            columns: vec![Some(0)],
        });
        assert_eq!(nmea.err(), Some(FormatError::BadSentence("RD,LTM".into())));
    }

    /// Framer and parser together, as the serial source will run them: values of the lines
    /// taken whole, and the count of each reason.
    struct Run {
        lines: Vec<Vec<(usize, f64)>>,
        counts: [usize; LineError::REASONS.len()],
    }

    fn run(p: &LineParser, framer: &mut LineFramer, chunks: &[&[u8]]) -> Run {
        let mut run = Run {
            lines: Vec::new(),
            counts: [0; LineError::REASONS.len()],
        };
        let mut values = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut |frame| match frame {
                Ok(line) => {
                    values.clear();
                    let mut clean = true;
                    p.parse(line, &mut values, &mut |e| {
                        clean = false;
                        run.counts[e.reason_index()] += 1;
                    });
                    if clean {
                        run.lines.push(values.clone());
                    }
                }
                Err(e) => run.counts[LineError::from(e).reason_index()] += 1,
            });
            assert!(framer.buffered() <= framer.max_line());
        }
        run
    }

    fn count(run: &Run, reason: &str) -> usize {
        let i = LineError::REASONS.iter().position(|r| *r == reason);
        run.counts[i.expect("known reason")]
    }

    #[test]
    fn noisy_nmea_stream_keeps_the_good_lines_and_counts_the_rest() {
        let good = "$RDLTM,652.3,648.1,7850,105.2*68\r\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(b"48.1,7850,105.2*68\r\n"); // opened mid-line
        stream.extend_from_slice(good.as_bytes());
        stream.extend_from_slice(b"\x00\xff\xfe$RD\n"); // electrical noise
        stream.extend_from_slice(good.as_bytes());
        stream.extend_from_slice(&[b'#'; 1000]); // a stuck transmitter
        stream.extend_from_slice(b"\n$RDLTM,652.3,648.1,7850,105.3*68\n"); // bit flip
        stream.extend_from_slice(good.as_bytes());
        let expected = |run: &Run| {
            assert_eq!(run.lines, vec![CAR.to_vec(); 3]);
            assert_eq!(count(run, "partial_at_start"), 1);
            assert_eq!(count(run, "not_utf8"), 1);
            assert_eq!(count(run, "overlong"), 1);
            assert_eq!(count(run, "bad_checksum"), 1);
            assert_eq!(run.counts.iter().sum::<usize>(), 4);
        };
        expected(&run(&nmea(), &mut LineFramer::default(), &[&stream]));
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        expected(&run(&nmea(), &mut LineFramer::default(), &bytes));
    }

    #[test]
    fn noisy_kv_stream_counts_each_reason() {
        let stream = b"m=7850 oil_temp=1\n\
            engine_rpm=7850 oil_temp=105.2\n\
            engine_rpm=78\xe250\n\
            engine_rpm=7850 tyre=3 oil_temp=hot\n\
            oil_temp=105.2\n";
        let run = run(&kv(), &mut LineFramer::new(64, false), &[stream]);
        assert_eq!(
            run.lines,
            vec![vec![(RPM, 7850.0), (OIL, 105.2)], vec![(OIL, 105.2)]]
        );
        assert_eq!(count(&run, "partial_at_start"), 1);
        assert_eq!(count(&run, "not_utf8"), 1);
        assert_eq!(count(&run, "unknown_key"), 1);
        assert_eq!(count(&run, "bad_number"), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn finite() -> impl Strategy<Value = f64> {
            any::<f64>().prop_filter("finite", |v| v.is_finite())
        }

        /// Values for the four fields, some missing.
        fn car() -> impl Strategy<Value = Vec<(usize, f64)>> {
            proptest::collection::vec(proptest::option::of(finite()), 4).prop_map(|cells| {
                let present = cells.into_iter().enumerate();
                present.filter_map(|(i, v)| Some((i, v?))).collect()
            })
        }

        fn parsers() -> [LineParser; 3] {
            [kv(), csv(), nmea()]
        }

        /// Bytes a noisy link might carry: anything, with 0x80..=0x9F turned into the bytes the
        /// formats care about so that lines, pairs, cells and sentences are common.
        fn garbage() -> impl Strategy<Value = Vec<u8>> {
            const SPECIAL: &[u8] = b"\n\n\n\n\n\r\r$$**,,==  ..--e0123456789";
            let bytes = proptest::collection::vec(any::<u8>(), 0..600);
            bytes.prop_map(|bytes| {
                let special = |b: u8| SPECIAL[usize::from(b) % SPECIAL.len()];
                let pick = |b| match b {
                    0x80..=0x9F => special(b),
                    _ => b,
                };
                bytes.into_iter().map(pick).collect()
            })
        }

        fn chunked<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
            let mut chunks = Vec::new();
            let mut rest = stream;
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                chunks.push(chunk);
                rest = tail;
            }
            chunks
        }

        fn same(a: &[(usize, f64)], b: &[(usize, f64)]) -> bool {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
        }

        proptest! {
            #[test]
            fn arbitrary_chunks_never_panic_or_overfill(
                chunks in proptest::collection::vec(garbage(), 0..8),
                max_line in 0usize..80,
                synced: bool,
            ) {
                let mut framer = LineFramer::new(max_line, synced);
                let mut values = Vec::new();
                for chunk in &chunks {
                    framer.push(chunk, &mut |frame| {
                        if let Ok(line) = frame {
                            assert!(!line.is_empty() && line.len() <= max_line);
                            assert!(!line.contains(&b'\n'));
                            for p in parsers() {
                                values.clear();
                                p.parse(line, &mut values, &mut |e| {
                                    assert!(LineError::REASONS.contains(&e.reason()));
                                });
                            }
                        }
                    });
                    prop_assert!(framer.buffered() <= max_line);
                }
            }

            #[test]
            fn format_line_round_trips(car in car()) {
                for p in parsers() {
                    let mut line = Vec::new();
                    p.format_line(&car, &mut line);
                    let (values, errors) = parse(&p, &line);
                    if !(car.is_empty() && matches!(p.format(), LineFormat::Kv { .. })) {
                        prop_assert_eq!(errors, vec![]);
                    }
                    prop_assert!(same(&values, &car), "{:?} -> {:?}", car, values);
                }
            }

            #[test]
            fn valid_lines_between_garbage_are_recovered(
                items in proptest::collection::vec((garbage(), any::<usize>(), car()), 1..8),
                trailing in garbage(),
                sizes in proptest::collection::vec(1usize..50, 1..10),
                crlf: bool,
            ) {
                for p in parsers() {
                    let mut stream = Vec::new();
                    let mut expected = Vec::new();
                    let mut line = Vec::new();
                    for (noise, cut, car) in &items {
                        stream.extend_from_slice(noise);
                        // The start of the previous line again, cut short as by a device reset.
                        stream.extend_from_slice(&line[..cut % (line.len() + 1)]);
                        stream.push(b'\n');
                        line.clear();
                        p.format_line(car, &mut line);
                        if !line.is_empty() {
                            expected.push(car.clone());
                        }
                        stream.extend_from_slice(&line);
                        stream.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
                    }
                    stream.extend_from_slice(&trailing);
                    let chunks = chunked(&stream, &sizes);
                    let run = run(&p, &mut LineFramer::new(256, false), &chunks);
                    // Garbage may happen to form valid lines too: ours must appear, in order.
                    let mut recovered = run.lines.iter();
                    for car in &expected {
                        prop_assert!(
                            recovered.any(|line| same(line, car)),
                            "{:?} lost from {:?}", car, String::from_utf8_lossy(&stream)
                        );
                    }
                }
            }
        }
    }
}
