//! The DBC decoder against cantools (the reference implementation), on random frames of
//! `tests/data/cases.dbc` (every decoding case) and of the shipped `config/redline-gt3.dbc`;
//! plus decode errors, encode/decode round trips and never-panic properties.
//!
//! Needs python3 with cantools (`pip install cantools`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use redline_agent::source::candump::parse_line;
use redline_agent::source::dbc::{Dbc, DecodeError, Decoder, MessageDef, MuxRole, Raw, ValueType};
use serde_json::Value;

const CASES: &str = "tests/data/cases.dbc";
const SHIPPED: &str = "config/redline-gt3.dbc";
const FRAMES: usize = 3000;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load(path: &str) -> Dbc {
    Dbc::load(repo(path)).unwrap_or_else(|e| panic!("{e}"))
}

/// A decoder with every signal of the DBC bound; field ids count up from 0.
fn decode_everything(dbc: &Dbc) -> (Decoder, Vec<(String, String)>) {
    let mut names = Vec::new();
    let mut bindings = Vec::new();
    for m in dbc.messages() {
        for s in &m.signals {
            let r = dbc.signal(&m.name, &s.name).expect("signal of the DBC");
            bindings.push((r, names.len()));
            names.push((m.name.clone(), s.name.clone()));
        }
    }
    (Decoder::new(dbc, &bindings).expect("bindings"), names)
}

// ---------------------------------------------------------------------------------------
// Against cantools

fn cantools_vectors(dbc: &str, seed: u64, frames: usize) -> (String, Vec<Value>) {
    let have = Command::new("python3")
        .args(["-c", "import cantools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(have, "cantools not installed: pip install cantools");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("frames.log");
    let expected = dir.path().join("expected.jsonl");
    let out = Command::new("python3")
        .arg(repo("scripts/cantools_vectors.py"))
        .arg(repo(dbc))
        .arg(seed.to_string())
        .arg(frames.to_string())
        .arg(&log)
        .arg(&expected)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "cantools_vectors.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(log).expect("log");
    let expected = std::fs::read_to_string(expected)
        .expect("expected")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    (log, expected)
}

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    exact_integers: usize,
    scaled: usize,
    scaled_bitwise: usize,
    floats: usize,
}

fn compare_with_cantools(path: &str, seed: u64) -> Tally {
    let (log, expected) = cantools_vectors(path, seed, FRAMES);
    assert_eq!(expected.len(), FRAMES);
    compare(path, &log, &expected)
}

/// Decodes every frame of `log` and checks it against cantools' decoding in `expected`.
fn compare(path: &str, log: &str, expected: &[Value]) -> Tally {
    let dbc = load(path);
    let (mut decoder, names) = decode_everything(&dbc);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), expected.len());
    let mut tally = Tally::default();
    let mut out = Vec::new();
    for exp in expected {
        let n = exp["line"].as_u64().expect("line") as usize;
        let line = lines[n - 1];
        let frame = parse_line(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
        let msg = dbc
            .message_by_id(frame.id, frame.extended)
            .unwrap_or_else(|| panic!("{line}: id not in the DBC"));
        assert_eq!(
            msg.name,
            exp["message"].as_str().expect("message"),
            "{line}"
        );

        let raws = dbc
            .decode_all_raw(frame.id, frame.extended, frame.data())
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let values = decoder
            .decode_all(frame.id, frame.extended, frame.data())
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let want = exp["signals"].as_object().expect("signals");
        let mut got: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = want.keys().map(String::as_str).collect();
        got.sort_unstable();
        want_names.sort_unstable();
        assert_eq!(got, want_names, "{line}: signals present");

        for ((name, value), (_, raw)) in values.iter().zip(&raws) {
            let sig = msg.signal(name).expect("signal");
            let context = format!("{line}: {}.{name}", msg.name);
            let bits = exp["f64_bits"].get(name).and_then(Value::as_u64);
            let want = &want[name];
            match sig.value_type {
                ValueType::Float32 | ValueType::Float64 => {
                    tally.floats += 1;
                    assert_eq!(Some(value.to_bits()), bits, "{context}: {value} vs {want}");
                }
                _ if sig.factor == 1.0 && sig.offset == 0.0 => {
                    tally.exact_integers += 1;
                    let exact = match *raw {
                        Raw::Unsigned(v) => want.as_u64() == Some(v),
                        Raw::Signed(v) => want.as_i64() == Some(v),
                        _ => false,
                    };
                    assert!(exact, "{context}: {raw:?} vs {want}");
                    assert_eq!(Some(*value), want.as_f64(), "{context}");
                }
                _ => {
                    tally.scaled += 1;
                    let w = bits.map(f64::from_bits).or(want.as_f64()).expect("number");
                    let close = value == &w || (value - w).abs() <= 1e-9 * value.abs().max(w.abs());
                    assert!(close, "{context}: {value} vs {w}");
                    tally.scaled_bitwise += usize::from(value.to_bits() == w.to_bits());
                }
            }
        }

        // The hot path agrees with decode_all, bit for bit.
        out.clear();
        decoder
            .decode(frame.id, frame.extended, frame.data(), &mut out)
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(out.len(), values.len(), "{line}");
        for &(field, value) in &out {
            let (m, s) = &names[field];
            assert_eq!(m, &msg.name);
            let (_, v) = values.iter().find(|(n, _)| n == s).expect("decoded");
            assert_eq!(value.to_bits(), v.to_bits(), "{line}: {s}");
        }
        tally.frames += 1;
    }
    eprintln!("{path}: {tally:?}");
    tally
}

#[test]
fn decodes_the_cases_like_cantools() {
    let t = compare_with_cantools(CASES, 1);
    assert!(t.exact_integers > 0 && t.scaled > 0 && t.floats > 0);
}

/// A sample made with `scripts/cantools_vectors.py tests/data/cases.dbc 3 300 ...` (cantools
/// 45.1), kept so that a change of cantools' behaviour shows up as a difference here.
#[test]
fn decodes_the_committed_sample_like_cantools_did() {
    let read = |p: &str| std::fs::read_to_string(repo(p)).expect(p);
    let log = read("tests/data/cases.log");
    let expected: Vec<Value> = read("tests/data/cases.expected.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let t = compare(CASES, &log, &expected);
    assert_eq!(t.frames, 300);
}

#[test]
fn decodes_the_shipped_dbc_like_cantools() {
    let t = compare_with_cantools(SHIPPED, 2);
    assert!(t.exact_integers > 0 && t.scaled > 0 && t.floats > 0);
}

// ---------------------------------------------------------------------------------------
// Errors

#[test]
fn short_frame_is_too_short() {
    let dbc = load(CASES);
    let (mut decoder, _) = decode_everything(&dbc);
    let mut out = Vec::new();
    // `Short` is 3 bytes, `IntelMix` 8, `FdBig` 64.
    for (id, need) in [(0x10, 3), (100, 8), (0x300, 64)] {
        let data = [0u8; 64];
        assert!(decoder.decode(id, false, &data[..need], &mut out).is_ok());
        let got = need - 1;
        assert_eq!(
            decoder.decode(id, false, &data[..got], &mut out),
            Err(DecodeError::TooShort {
                expected: need,
                got
            })
        );
        assert_eq!(
            dbc.decode_all(id, false, &data[..got]),
            Err(DecodeError::TooShort {
                expected: need,
                got
            })
        );
    }
}

#[test]
fn unknown_id_is_unknown() {
    let dbc = load(CASES);
    let (mut decoder, _) = decode_everything(&dbc);
    let mut out = Vec::new();
    for (id, extended) in [
        (0x11, false),
        (0x64, true),
        (0x200, false),
        (0x7FF_FFFF, true),
    ] {
        assert_eq!(
            decoder.decode(id, extended, &[0; 8], &mut out),
            Err(DecodeError::UnknownId)
        );
        assert_eq!(
            dbc.decode_all(id, extended, &[0; 8]),
            Err(DecodeError::UnknownId)
        );
    }
    // Bound to one message only: the others are unknown to the decoder.
    let only = [(dbc.signal("Short", "A").expect("Short.A"), 0)];
    let mut decoder = Decoder::new(&dbc, &only).expect("decoder");
    assert_eq!(
        decoder.decode(100, false, &[0; 8], &mut out),
        Err(DecodeError::UnknownId)
    );
    assert_eq!(decoder.ids().len(), 1);
}

#[test]
fn unknown_multiplexor_value_is_refused() {
    let dbc = load(CASES);
    let (mut decoder, _) = decode_everything(&dbc);
    let mut out = Vec::new();
    // `Muxed` (id 400) defines 0, 1, 5 and 15 in its low 4 bits.
    for sel in [2u8, 3, 4, 6, 14] {
        let data = [sel, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decoder.decode(400, false, &data, &mut out),
            Err(DecodeError::UnknownMultiplexor(u64::from(sel)))
        );
        assert_eq!(
            dbc.decode_all(400, false, &data),
            Err(DecodeError::UnknownMultiplexor(u64::from(sel)))
        );
    }
    out.clear();
    decoder
        .decode(400, false, &[0xF5, 0, 0, 0, 0, 0, 0, 0], &mut out)
        .expect("mux 5");
    // Sel, Common, F5.
    assert_eq!(out.len(), 3);
}

// ---------------------------------------------------------------------------------------
// Encoding

/// Raw values worth trying for a signal: its extremes, zero and random ones.
fn raw_samples(rng: &mut rand_pcg::Pcg64, ty: ValueType, len: u8) -> Vec<Raw> {
    let mut v = Vec::new();
    match ty {
        ValueType::Unsigned => {
            let max = if len == 64 { u64::MAX } else { (1 << len) - 1 };
            v.extend([0, max, max / 2].map(Raw::Unsigned));
            v.extend((0..20).map(|_| Raw::Unsigned(rng.random_range(0..=max))));
        }
        ValueType::Signed => {
            let half = 1i64 << (len - 1).min(62);
            let (min, max) = if len == 64 {
                (i64::MIN, i64::MAX)
            } else {
                (-half, half - 1)
            };
            v.extend([min, max, 0, -1].map(Raw::Signed));
            v.extend((0..20).map(|_| Raw::Signed(rng.random_range(min..=max))));
        }
        ValueType::Float32 => {
            v.extend([0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, 1.5].map(Raw::Float32));
            v.extend((0..20).map(|_| Raw::Float32(rng.random_range(-1e6..1e6))));
        }
        ValueType::Float64 => {
            v.extend([0.0, -0.0, f64::MAX, 1.7e9].map(Raw::Float64));
            v.extend((0..20).map(|_| Raw::Float64(rng.random_range(-1e12..1e12))));
        }
    }
    v
}

/// The multiplexor values to try for a message: none, or each defined one.
fn variants(m: &MessageDef) -> Vec<Option<u64>> {
    if m.mux_values().is_empty() {
        vec![None]
    } else {
        m.mux_values().iter().copied().map(Some).collect()
    }
}

fn same_raw(a: Raw, b: Raw) -> bool {
    match (a, b) {
        (Raw::Float32(a), Raw::Float32(b)) => a.to_bits() == b.to_bits(),
        (Raw::Float64(a), Raw::Float64(b)) => a.to_bits() == b.to_bits(),
        (a, b) => a == b,
    }
}

/// Encodes raw values (as physical values) into a frame of `m` and checks that decoding
/// gives back exactly those raw values, and raw 0 for the signals not given.
fn round_trip(dbc: &Dbc, m: &MessageDef, selected: Option<u64>, given: &[(&str, Raw)]) {
    let mut values: Vec<(&str, f64)> = given
        .iter()
        .map(|&(n, raw)| (n, m.signal(n).expect("signal").physical(raw)))
        .collect();
    if let (Some(mux), Some(sel)) = (m.multiplexor(), selected) {
        values.push((mux.name.as_str(), sel as f64));
    }
    let mut data = [0u8; 64];
    let len = dbc
        .encode(&m.name, &values, &mut data)
        .unwrap_or_else(|e| panic!("{}: {e}", m.name));
    assert_eq!(len, m.size);
    let back = dbc
        .decode_all_raw(m.id.id, m.id.extended, &data[..len])
        .unwrap_or_else(|e| panic!("{}: {e}", m.name));
    let mux_name = m.multiplexor().map(|x| x.name.as_str());
    for (name, got) in back {
        if Some(name.as_str()) == mux_name {
            assert_eq!(
                got,
                Raw::Unsigned(selected.unwrap_or(0)),
                "{}.{name}",
                m.name
            );
            continue;
        }
        let want = given
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Raw::Unsigned(0), |&(_, raw)| raw);
        let untouched = matches!(got, Raw::Signed(0))
            || matches!(got, Raw::Float32(f) if f.to_bits() == 0)
            || matches!(got, Raw::Float64(f) if f.to_bits() == 0);
        let ok = same_raw(want, got) || (want == Raw::Unsigned(0) && untouched);
        assert!(ok, "{}.{name}: gave {want:?}, got back {got:?}", m.name);
    }
}

#[test]
fn encode_then_decode_gives_back_every_signal_of_the_shipped_dbc() {
    let dbc = load(SHIPPED);
    let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
    let mut checked = 0;
    for m in dbc.messages() {
        for selected in variants(m) {
            let samples: Vec<(&str, Vec<Raw>)> = m
                .signals
                .iter()
                .filter(|s| match s.mux {
                    MuxRole::Multiplexed(n) => Some(n) == selected,
                    MuxRole::Multiplexor => false,
                    MuxRole::Plain => true,
                })
                .map(|s| (s.name.as_str(), raw_samples(&mut rng, s.value_type, s.len)))
                .collect();
            // One signal at a time: the others must stay 0.
            for (name, raws) in &samples {
                for &raw in raws {
                    round_trip(&dbc, m, selected, &[(name, raw)]);
                    checked += 1;
                }
            }
            // All signals of the frame at once.
            for k in 0..20 {
                let given: Vec<(&str, Raw)> = samples
                    .iter()
                    .map(|(name, raws)| (*name, raws[(k * 7 + name.len()) % raws.len()]))
                    .collect();
                round_trip(&dbc, m, selected, &given);
                checked += given.len();
            }
        }
    }
    assert!(checked > 2000, "{checked}");
}

#[test]
fn shipped_dbc_carries_the_documented_sensors() {
    let dbc = load(SHIPPED);
    for (m, s) in [
        ("BrakeTemps", "DiscFL"),
        ("BrakeTemps", "DiscFR"),
        ("Engine", "RPM"),
        ("EngineTemps", "OilTemp"),
    ] {
        let r = dbc.signal(m, s).unwrap_or_else(|e| panic!("{e}"));
        let (_, sig) = dbc.resolve(r).expect("resolve");
        assert!(!sig.unit.is_empty() && sig.comment.is_some(), "{m}.{s}");
    }
    // Worked example: 652.3 degC on the front-left disc is raw 6923 = 0x1B0B.
    let mut data = [0u8; 8];
    dbc.encode("BrakeTemps", &[("DiscFL", 652.3)], &mut data)
        .expect("encode");
    assert_eq!(data[..2], [0x0B, 0x1B]);
    // RPM is Motorola: 7850 = 0x1EAA, most significant byte first.
    dbc.encode("Engine", &[("RPM", 7850.0)], &mut data)
        .expect("encode");
    assert_eq!(data[..2], [0x1E, 0xAA]);
}

// ---------------------------------------------------------------------------------------
// The hot path does not allocate

struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator; counting touches only a thread-local Cell.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

#[test]
fn parsing_and_decoding_do_not_allocate() {
    let dbc = load(SHIPPED);
    let (mut decoder, _) = decode_everything(&dbc);
    let lines: [&[u8]; 4] = [
        b"(1700000000.000100) can0 300#0B1B2C1D00000000\n",
        b"(1700000000.000200) can0 100#1EAA03E8000003E8\n",
        b"(1700000000.000300) can0 400#02FF0102030405FF\n",
        b"(1700000000.000400) can1 18FEE61C#0000000000C0DA41\n",
    ];
    let mut out = Vec::with_capacity(64);
    let before = ALLOCATIONS.with(Cell::get);
    for _ in 0..1000 {
        for line in lines {
            out.clear();
            let frame = parse_line(line).expect("line");
            decoder
                .decode(frame.id, frame.extended, frame.data(), &mut out)
                .expect("decode");
        }
    }
    assert_eq!(ALLOCATIONS.with(Cell::get), before);
}

// ---------------------------------------------------------------------------------------
// Never panic

proptest! {
    #[test]
    fn decode_never_panics(
        id in 0u32..0x2000_0000,
        extended: bool,
        data in proptest::collection::vec(any::<u8>(), 0..=64),
    ) {
        thread_local! {
            static DECODERS: (Dbc, Decoder) = {
                let dbc = load(CASES);
                let (decoder, _) = decode_everything(&dbc);
                (dbc, decoder)
            };
        }
        DECODERS.with(|(dbc, decoder)| {
            let mut decoder = decoder.clone();
            let mut out = Vec::new();
            // Known ids too, not only random ones.
            for (id, extended) in [(id, extended), (id % 0x800, false)]
                .into_iter()
                .chain(dbc.messages().iter().map(|m| (m.id.id, m.id.extended)))
            {
                let _ = decoder.decode(id, extended, &data, &mut out);
                let _ = dbc.decode_all(id, extended, &data);
            }
        });
    }

    #[test]
    fn parse_line_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_line(&line);
    }

    #[test]
    fn parse_line_never_panics_on_near_misses(
        time in "\\(?[0-9]{0,12}\\.?[0-9]{0,10}\\)?",
        iface in "[a-z0-9]{0,6}",
        id in "[0-9A-Fa-fRr#_.]{0,10}",
        body in "[0-9A-Fa-fRrTx#_. ]{0,140}",
    ) {
        let line = format!("{time} {iface} {id}#{body}\n");
        let _ = parse_line(line.as_bytes());
    }

    #[test]
    fn encode_never_panics(value: f64, pick in 0usize..1000) {
        thread_local! {
            static CASES_DBC: Dbc = load(CASES);
        }
        CASES_DBC.with(|dbc| {
            let m = &dbc.messages()[pick % dbc.messages().len()];
            let Some(s) = m.signals.get(pick % m.signals.len().max(1)) else {
                return;
            };
            let mut data = [0u8; 64];
            let _ = dbc.encode(&m.name, &[(s.name.as_str(), value)], &mut data);
            if let Some(mux) = m.multiplexor() {
                let given = [(mux.name.as_str(), value), (s.name.as_str(), value)];
                let _ = dbc.encode(&m.name, &given, &mut data);
            }
        });
    }
}
