//! The opendbc corpus: the 115 DBC files of the PyPI wheel `opendbc==0.3.1` (real cars, as
//! vendors and reverse engineers write them), pinned by SHA-256.
//!
//! - Every file is accepted, with exactly the expected defects (the files issue 15 names,
//!   one by one); a strict load refuses exactly the files with a defect; a binding to a
//!   message left out is an error naming its defect.
//! - Every message the agent can use decodes like cantools 45.1 (`strict=False`; a file
//!   cantools refuses is repaired the one obvious way first, by `scripts/opendbc_vectors.py`,
//!   which says how) over random frames of each multiplexor value, value for value.
//! - In each file, randomly chosen signals (Intel and Motorola, signed, float, scaled,
//!   multiplexed, 1 to 64 bits, CAN FD) are bound to record fields and the frames replayed
//!   through `redline-agent replay`: every field of every record, tick by tick, equals
//!   cantools' value from the last frame before the tick.
//!
//! The wheel is fetched once into `target/opendbc` (scripts/test.sh does it); without it the
//! test fails saying how:
//!     python3 -m pip download opendbc==0.3.1 --no-deps --only-binary=:all: -d target/opendbc
//! Needs python3 with cantools (`pip install cantools==45.1.0`).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use redline_agent::source::candump::parse_line;
use redline_agent::source::dbc::{
    ByteOrder, Dbc, Decoder, Effect, LookupError, MessageDef, MuxRole, Raw, SignalDef, ValueType,
};
use serde_json::Value;

const VERSION: &str = "0.3.1";
const WHEEL: &str = "opendbc-0.3.1-py3-none-any.whl";
const SHA256: &str = "5552994344a885d85836f2487b85e958e69ab1a0e8d11e30ec508d316bf58ae1";
const FILES: usize = 115;
/// Random frames per multiplexor value of each message; frames in all of a message with a
/// bound signal.
const FRAMES: usize = 3;
const BUSY_FRAMES: usize = 24;
/// Signals bound to record fields per file (at most).
const BOUND: usize = 8;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `.dbc` files of the wheel, unpacked under `target/opendbc/0.3.1`: name (relative to
/// `opendbc/dbc`) and path, sorted by name.
fn corpus() -> &'static [(String, PathBuf)] {
    static CORPUS: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = repo("target/opendbc");
        let wheel = dir.join(WHEEL);
        assert!(
            wheel.is_file(),
            "the opendbc corpus is missing: {} does not exist. Fetch it (scripts/test.sh \
             does) with\n    python3 -m pip download opendbc=={VERSION} --no-deps \
             --only-binary=:all: -d target/opendbc\nand run the test again",
            wheel.display()
        );
        let out = dir.join(VERSION);
        let listed = Command::new("python3")
            .arg(repo("scripts/opendbc_vectors.py"))
            .arg("extract")
            .arg(&wheel)
            .arg(SHA256)
            .arg(&out)
            .output()
            .expect("run python3");
        assert!(
            listed.status.success(),
            "opendbc_vectors.py extract: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let base = out.join("opendbc/dbc");
        let mut files: Vec<(String, PathBuf)> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(|l| {
                let path = out.join(l);
                let name = path
                    .strip_prefix(&base)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                (name, path)
            })
            .collect();
        files.sort();
        assert_eq!(files.len(), FILES, "{files:?}");
        files
    })
}

fn load(name: &str, path: &Path) -> Dbc {
    Dbc::load(path).unwrap_or_else(|e| panic!("{name}: refused: {e}"))
}

// ---------------------------------------------------------------------------------------
// Acceptance and defects

/// Every file with a defect: (file, messages left out, statements ignored, read as
/// written). Every other file has none.
const DEFECTS: &[(&str, usize, usize, usize)] = &[
    ("FORD_CADS_64.dbc", 1, 0, 0),
    ("chrysler_cusw.dbc", 0, 0, 2),
    ("fca_giorgio.dbc", 0, 0, 1),
    (
        "generator/chrysler/chrysler_pacifica_2017_hybrid.dbc",
        0,
        2,
        0,
    ),
    ("generator/gm/gm_global_a_powertrain.dbc", 0, 1, 0),
    ("generator/honda/_bosch_2018.dbc", 0, 2, 2),
    ("generator/honda/_steering_control_c.dbc", 1, 0, 0),
    ("generator/honda/honda_bosch_radarless.dbc", 0, 0, 1),
    ("generator/honda/honda_crv_ex_2017_body.dbc", 0, 0, 2),
    ("generator/hyundai/hyundai_canfd.dbc", 1, 0, 0),
    ("generator/hyundai/hyundai_palisade_2023.dbc", 3, 3, 0),
    ("generator/subaru/subaru_global_2017.dbc", 0, 2, 0),
    ("generator/toyota/_toyota_2017.dbc", 1, 0, 0),
    ("gm_global_a_lowspeed.dbc", 0, 1, 13),
    ("gm_global_a_lowspeed_1818125.dbc", 177, 0, 0),
    ("gwm_haval_h6_phev_2024.dbc", 3, 0, 0),
    ("hongqi_hs5.dbc", 1, 0, 0),
    ("hyundai_i30_2014.dbc", 1, 0, 0),
    ("mazda_2017.dbc", 2, 0, 7),
    ("mazda_3_2019.dbc", 2, 0, 0),
    ("nissan_xterra_2011.dbc", 2, 0, 0),
    ("psa_aee2010_r3.dbc", 1, 0, 2),
    ("rivian_primary_actuator.dbc", 0, 1, 0),
    ("tesla_can.dbc", 0, 1, 0),
    ("toyota_2017_ref_pt.dbc", 32, 0, 0),
    ("volvo_v40_2017_pt.dbc", 1, 0, 0),
    ("vw_meb.dbc", 0, 0, 16),
    ("vw_mqb.dbc", 1, 0, 0),
    ("vw_mqbevo.dbc", 0, 0, 10),
    ("vw_pq.dbc", 5, 0, 1),
];

/// A defect expected of a file: (message or "", effect, words of its warning line).
type Expected = (&'static str, Effect, &'static str);

/// The files issue 15 names, with defects expected of each (the others are counted in
/// `DEFECTS`): 11 files cantools loads and the agent refused as a whole, then the 12
/// cantools refuses.
const ISSUE_FILES: &[(&str, &[Expected])] = &[
    // Overlapping signals.
    (
        "vw_mqb.dbc",
        &[(
            "PLA_01",
            LEFT_OUT,
            "signals `PLA_Bremsmoment` and `PLA_Bremsverzoegerung` overlap",
        )],
    ),
    (
        "hyundai_i30_2014.dbc",
        &[("EMS2", LEFT_OUT, "signals `TQ_STND` and `CAN_VERS` overlap")],
    ),
    (
        "nissan_xterra_2011.dbc",
        &[
            ("ABS_1", LEFT_OUT, "signals `WHEEL_1` and `WHEEL_2` overlap"),
            ("ABS_2", LEFT_OUT, "signals `WHEEL_3` and `WHEEL_4` overlap"),
        ],
    ),
    (
        "gm_global_a_lowspeed_1818125.dbc",
        &[(
            "Unlock_Key_Store_Crypt_2_LS",
            LEFT_OUT,
            "overlap (byte 0, bit 0)",
        )],
    ),
    (
        "gwm_haval_h6_phev_2024.dbc",
        &[
            ("CAR_OVERALL_SIGNALS", LEFT_OUT, "overlap"),
            ("BRAKE", LEFT_OUT, "overlap"),
            ("UNDEFINED_INTERESTING_SIGNALS", LEFT_OUT, "overlap"),
        ],
    ),
    ("hongqi_hs5.dbc", &[("ABS_3", LEFT_OUT, "overlap")]),
    ("volvo_v40_2017_pt.dbc", &[("FSM5", LEFT_OUT, "overlap")]),
    // A standard id above 0x7FF: only Vector's VECTOR__INDEPENDENT_SIG_MSG, which holds
    // signals of no message and is no defect; FORD_CADS_64 has a signal outside its frame.
    ("FORD_CADS.dbc", &[]),
    (
        "FORD_CADS_64.dbc",
        &[(
            "MRR_Detection_022",
            LEFT_OUT,
            "start bit 200 is outside the 24-byte message",
        )],
    ),
    // A Motorola signal past the end of its frame.
    (
        "mazda_3_2019.dbc",
        &[
            (
                "CAM_KEEP_ALIVE_1",
                LEFT_OUT,
                "Motorola signal from bit 55 (30 bits) runs past the end of the 8-byte message",
            ),
            ("NEW_MSG_21", LEFT_OUT, "overlap"),
        ],
    ),
    // SG_MUL_VAL_ (Bremse_1 and the others) only restates simple multiplexing: used.
    (
        "vw_pq.dbc",
        &[
            ("Motor_2", READ, "read as the multiplexor (M)"),
            ("Slave_1", LEFT_OUT, "overlap"),
            ("Lenkhilfe_1", LEFT_OUT, "outside the 2-byte message"),
        ],
    ),
    // cantools refuses these. Standard ids above 11 bits.
    (
        "chrysler_cusw.dbc",
        &[
            ("BSM_LEFT", READ, "read as extended id 0x062CC033"),
            ("BSM_RIGHT", READ, "read as extended id 0x062CC034"),
        ],
    ),
    (
        "fca_giorgio.dbc",
        &[("CAM_UNKNOWN_6", READ, "read as extended id 0x1E36001E")],
    ),
    (
        "gm_global_a_lowspeed.dbc",
        &[
            ("DriverDoorStatus", READ, "read as extended id 0x10630000"),
            ("", IGNORED, "VAL_ names signal `BSM_Indicator_Right`"),
        ],
    ),
    (
        "toyota_2017_ref_pt.dbc",
        &[(
            "BDB1F01_14",
            LEFT_OUT,
            "above 29 bits even as an extended id",
        )],
    ),
    (
        "vw_meb.dbc",
        &[("MEB_Camera_04", READ, "read as extended id 0x12DD54A7")],
    ),
    (
        "vw_mqbevo.dbc",
        &[("CAMERA_NEW_6", READ, "read as extended id 0x12DD54A7")],
    ),
    // Names starting with a digit.
    (
        "mazda_2017.dbc",
        &[
            ("2017_5", READ, "starts with a digit"),
            ("HVAC", LEFT_OUT, "runs past the end of the 8-byte message"),
            ("CRZ_CTRL", LEFT_OUT, "overlap"),
        ],
    ),
    (
        "psa_aee2010_r3.dbc",
        &[
            ("STEERING_ALT", READ, "signal `0_COUNTER`"),
            ("STEERING_ALT", READ, "signal `0_CHECKSUM`"),
            ("HS2_DYN_ABR_38D", LEFT_OUT, "overlap"),
        ],
    ),
    // VAL_ for signals that do not exist.
    (
        "rivian_primary_actuator.dbc",
        &[("", IGNORED, "VAL_ names signal `ACM_VehicleHoldRequired`")],
    ),
    (
        "tesla_can.dbc",
        &[("", IGNORED, "VAL_ names signal `UI_mapSpeedLimit`")],
    ),
    // Comments cantools cannot read (`CM_ 145 "..."`, a `CM_` without `;`): can-dbc can.
    ("hyundai_kia_generic.dbc", &[]),
    ("toyota_radar_dsu_tssp.dbc", &[]),
];

const LEFT_OUT: Effect = Effect::MessageLeftOut;
const IGNORED: Effect = Effect::Ignored;
const READ: Effect = Effect::ReadAsWritten;

/// Messages the issue found refused that must be usable now.
const USABLE: &[(&str, &str, &str)] = &[
    ("vw_pq.dbc", "Bremse_1", "BR1_ASRMo_fa"),
    ("vw_pq.dbc", "Motor_2", "MO2_max_Mo"),
    ("mazda_2017.dbc", "2017_5", ""),
    ("psa_aee2010_r3.dbc", "STEERING_ALT", "0_COUNTER"),
    ("chrysler_cusw.dbc", "BSM_LEFT", ""),
];

#[test]
fn every_file_is_accepted_with_the_expected_defects() {
    let mut table = String::new();
    let mut accepted = 0;
    let mut with_defects = 0;
    let mut left_out = 0;
    for (name, path) in corpus() {
        let dbc = load(name, path);
        accepted += 1;
        let count = |e: Effect| dbc.defects().iter().filter(|d| d.effect == e).count();
        let counts = (
            count(Effect::MessageLeftOut),
            count(Effect::Ignored),
            count(Effect::ReadAsWritten),
        );
        if counts != (0, 0, 0) {
            with_defects += 1;
            let _ = writeln!(
                table,
                "    (\"{name}\", {}, {}, {}),",
                counts.0, counts.1, counts.2
            );
        }
        left_out += counts.0;
        for d in dbc.defects() {
            // One line: file, line, what (and the message, when there is one).
            let text = d.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.starts_with(&format!("{}:", path.display())), "{text}");
            assert!(d.line.is_some(), "{name}: no line: {text}");
            if let Some(m) = &d.message {
                assert!(text.contains(&format!("`{m}`")), "{text}");
            }
            // A binding to a message left out fails, naming its defect and line.
            if let (Effect::MessageLeftOut, Some(m)) = (d.effect, &d.message) {
                match dbc.signal(m, "Any") {
                    Err(LookupError::Unusable { message, reason }) => {
                        assert_eq!(&message, m);
                        assert!(
                            reason.contains(&format!("line {}", d.line.unwrap_or(0))),
                            "{reason}"
                        );
                    }
                    other => panic!("{name}: {m} is left out but: {other:?}"),
                }
            }
        }
        // Strict: refused exactly when there is a defect, naming the first.
        match (Dbc::load_with(path, true), dbc.defects().first()) {
            (Ok(_), None) => {}
            (Err(e), Some(first)) => assert_eq!(e.line, first.line, "{name}: {e}"),
            (Ok(_), Some(d)) => panic!("{name}: strict load accepts despite {d}"),
            (Err(e), None) => panic!("{name}: strict load refuses without a defect: {e}"),
        }
    }
    let expected: String = DEFECTS
        .iter()
        .map(|(f, a, b, c)| format!("    (\"{f}\", {a}, {b}, {c}),\n"))
        .collect();
    assert_eq!(
        table, expected,
        "defects per file (left out, ignored, read as written) differ; now:\n{table}"
    );
    eprintln!(
        "opendbc {VERSION}: {accepted} of {FILES} files accepted, {with_defects} with \
         defects ({left_out} messages left out)"
    );
    assert_eq!(accepted, FILES);
}

#[test]
fn the_files_of_issue_15_are_accepted_with_the_expected_warnings() {
    assert_eq!(ISSUE_FILES.len(), 23);
    for (file, expected) in ISSUE_FILES {
        let (name, path) = corpus()
            .iter()
            .find(|(n, _)| n == file)
            .unwrap_or_else(|| panic!("{file} is not in the corpus"));
        let dbc = load(name, path);
        let lines: Vec<String> = dbc.defects().iter().map(ToString::to_string).collect();
        for (message, effect, words) in *expected {
            let found = dbc.defects().iter().any(|d| {
                d.effect == *effect
                    && (message.is_empty() || d.message.as_deref() == Some(*message))
                    && d.to_string().contains(words)
            });
            assert!(
                found,
                "{file}: no {effect:?} defect of `{message}` saying {words:?}:\n{}",
                lines.join("\n")
            );
            if *effect == Effect::ReadAsWritten && !message.is_empty() {
                assert!(dbc.message(message).is_ok(), "{file}: {message} usable");
            }
        }
        if expected.is_empty() {
            assert!(lines.is_empty(), "{file}:\n{}", lines.join("\n"));
        }
    }
    for (file, message, signal) in USABLE {
        let (name, path) = corpus()
            .iter()
            .find(|(n, _)| n == file)
            .unwrap_or_else(|| panic!("{file} is not in the corpus"));
        let dbc = load(name, path);
        let m = dbc
            .message(message)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let s = if signal.is_empty() {
            &m.signals[0].name
        } else {
            *signal
        };
        dbc.signal(message, s)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// Decoding against cantools

/// What a signal is, for choosing bound signals that cover every kind.
fn kinds(m: &MessageDef, s: &SignalDef) -> Vec<&'static str> {
    let mut k = vec![match s.byte_order {
        ByteOrder::LittleEndian => "Intel",
        ByteOrder::BigEndian => "Motorola",
    }];
    k.push(match s.value_type {
        ValueType::Unsigned => "unsigned",
        ValueType::Signed => "signed",
        ValueType::Float32 => "float32",
        ValueType::Float64 => "float64",
    });
    if s.factor != 1.0 || s.offset != 0.0 {
        k.push("scaled");
    }
    match s.mux {
        MuxRole::Multiplexed(_) => k.push("multiplexed"),
        MuxRole::Multiplexor if !m.mux_values().is_empty() => k.push("multiplexor"),
        _ => {}
    }
    if s.len == 1 {
        k.push("1 bit");
    }
    if s.len > 32 {
        k.push("33 to 64 bits");
    }
    if s.len == 64 {
        k.push("64 bits");
    }
    if m.size > 8 {
        k.push("CAN FD");
    }
    k
}

const KINDS: [&str; 13] = [
    "Intel",
    "Motorola",
    "unsigned",
    "signed",
    "float32",
    "float64",
    "scaled",
    "multiplexed",
    "multiplexor",
    "1 bit",
    "33 to 64 bits",
    "64 bits",
    "CAN FD",
];

/// Up to `BOUND` signals of the file: one of each kind it has first, then random ones.
fn choose_bound(dbc: &Dbc, seed: u64) -> Vec<(String, String)> {
    let mut all: Vec<(&MessageDef, &SignalDef)> = dbc
        .messages()
        .iter()
        .flat_map(|m| m.signals.iter().map(move |s| (m, s)))
        .collect();
    all.shuffle(&mut rand_pcg::Pcg64::seed_from_u64(seed));
    let mut chosen: Vec<(&MessageDef, &SignalDef)> = Vec::new();
    for kind in KINDS {
        if let Some(&pick) = all.iter().find(|(m, s)| kinds(m, s).contains(&kind))
            && !chosen
                .iter()
                .any(|(m, s)| m.name == pick.0.name && s.name == pick.1.name)
        {
            chosen.push(pick);
        }
    }
    for &pick in &all {
        if chosen.len() >= BOUND {
            break;
        }
        if !chosen
            .iter()
            .any(|(m, s)| m.name == pick.0.name && s.name == pick.1.name)
        {
            chosen.push(pick);
        }
    }
    chosen
        .into_iter()
        .map(|(m, s)| (m.name.clone(), s.name.clone()))
        .collect()
}

/// The repairs cantools needed, per file (`scripts/opendbc_vectors.py`): the files it
/// refuses as they are. Every other file loads as it is.
const REPAIRS: &[(&str, &[&str])] = &[
    ("chrysler_cusw.dbc", &["ids: 2 read as extended"]),
    ("fca_giorgio.dbc", &["ids: 1 read as extended"]),
    (
        "generator/chrysler/_stellantis_common.dbc",
        &[
            "number: line 16",
            "number: line 17",
            "semicolon: added on line 178",
        ],
    ),
    (
        "generator/chrysler/chrysler_pacifica_2017_hybrid.dbc",
        &["unused-VAL_: 2"],
    ),
    (
        "generator/gm/gm_global_a_powertrain.dbc",
        &["unused-VAL_: 1"],
    ),
    (
        "generator/honda/_bosch_2018.dbc",
        &["ids: 2 read as extended", "unused-VAL_: 2"],
    ),
    (
        "generator/honda/_honda_common.dbc",
        &["comment: removed line 207", "comment: removed line 207"],
    ),
    (
        "generator/honda/honda_bosch_radarless.dbc",
        &["ids: 1 read as extended"],
    ),
    (
        "generator/honda/honda_crv_ex_2017_body.dbc",
        &["ids: 2 read as extended"],
    ),
    (
        "generator/hyundai/hyundai_palisade_2023.dbc",
        &["unused-VAL_: 3"],
    ),
    (
        "generator/subaru/subaru_global_2017.dbc",
        &["unused-VAL_: 2"],
    ),
    (
        "gm_global_a_lowspeed.dbc",
        &["ids: 13 read as extended", "unused-VAL_: 1"],
    ),
    (
        "hyundai_kia_generic.dbc",
        &["comment: removed line 1656", "comment: removed line 1656"],
    ),
    (
        "mazda_2017.dbc",
        &[
            "digit-names: ['2017_1', '2017_2', '2017_3', '2017_5', '2017_6', '2017_7', '2017_8', '5_SEC_DISABLE_TIMER']",
            "semicolon: added on line 790",
        ],
    ),
    (
        "psa_aee2010_r3.dbc",
        &["digit-names: ['0_CHECKSUM', '0_COUNTER']"],
    ),
    ("rivian_primary_actuator.dbc", &["unused-VAL_: 1"]),
    ("tesla_can.dbc", &["unused-VAL_: 1"]),
    (
        "toyota_2017_ref_pt.dbc",
        &["ids: 0 read as extended, 32 messages above 29 bits removed"],
    ),
    (
        "toyota_radar_dsu_tssp.dbc",
        &[
            "semicolon: added on line 138",
            "semicolon: added on line 147",
            "semicolon: added on line 156",
            "semicolon: added on line 166",
            "semicolon: added on line 176",
            "semicolon: added on line 186",
        ],
    ),
    ("vw_meb.dbc", &["ids: 16 read as extended"]),
    ("vw_mqbevo.dbc", &["ids: 10 read as extended"]),
    ("vw_pq.dbc", &["multiplexor: Motor_2.MO2_Mp_Code"]),
];

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    values: usize,
    bitwise: usize,
    differences: Vec<String>,
}

impl Tally {
    fn differ(&mut self, what: String) {
        self.differences.push(what);
    }
}

/// cantools' value of `name` in an expected line: exact for floats (their bits), else the
/// JSON number.
fn cantools_value(exp: &Value, name: &str) -> Option<f64> {
    match exp["f64_bits"].get(name).and_then(Value::as_u64) {
        Some(bits) => Some(f64::from_bits(bits)),
        None => exp["signals"].get(name).and_then(Value::as_f64),
    }
}

/// Ours against cantools': float signals bit for bit, scaled integers within 1e-9 (cantools
/// computes integer factor and offset in exact integers), the rest exactly.
fn agrees(sig: &SignalDef, ours: f64, theirs: f64) -> bool {
    match sig.value_type {
        ValueType::Float32 | ValueType::Float64 => ours.to_bits() == theirs.to_bits(),
        _ if sig.factor == 1.0 && sig.offset == 0.0 => ours == theirs,
        _ => ours == theirs || (ours - theirs).abs() <= 1e-9 * ours.abs().max(theirs.abs()),
    }
}

/// Every frame of `log` decoded with every signal bound, against cantools' `expected`.
fn compare_decoding(file: &str, dbc: &Dbc, log: &str, expected: &[Value], tally: &mut Tally) {
    let mut names = Vec::new();
    let mut bindings = Vec::new();
    for m in dbc.messages() {
        for s in &m.signals {
            if let Ok(r) = dbc.signal(&m.name, &s.name) {
                bindings.push((r, names.len()));
                names.push((m.name.clone(), s.name.clone()));
            }
        }
    }
    let mut decoder = Decoder::new(dbc, &bindings).expect("bindings");
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for exp in expected {
        let n = exp["line"].as_u64().unwrap_or(0) as usize;
        let Some(line) = n.checked_sub(1).and_then(|i| lines.get(i)) else {
            tally.differ(format!("{file}: no log line {n}"));
            continue;
        };
        let context = |what: &str| format!("{file}: {line}: {what}");
        let Ok(frame) = parse_line(line.as_bytes()) else {
            tally.differ(context("not a candump line"));
            continue;
        };
        let Some(msg) = dbc.message_by_id(frame.id, frame.extended) else {
            tally.differ(context("id unknown to the agent"));
            continue;
        };
        if Some(msg.name.as_str()) != exp["message"].as_str() {
            tally.differ(context(&format!(
                "message {} vs {}",
                msg.name, exp["message"]
            )));
            continue;
        }
        let (Ok(values), Ok(raws)) = (
            dbc.decode_all(frame.id, frame.extended, frame.data()),
            dbc.decode_all_raw(frame.id, frame.extended, frame.data()),
        ) else {
            tally.differ(context("not decoded"));
            continue;
        };
        let want = exp["signals"].as_object().cloned().unwrap_or_default();
        let mut got_names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = want.keys().map(String::as_str).collect();
        got_names.sort_unstable();
        want_names.sort_unstable();
        if got_names != want_names {
            tally.differ(context(&format!("signals {got_names:?} vs {want_names:?}")));
            continue;
        }
        for ((name, value), (_, raw)) in values.iter().zip(&raws) {
            let Some(sig) = msg.signal(name) else {
                continue;
            };
            tally.values += 1;
            let Some(theirs) = cantools_value(exp, name) else {
                tally.differ(context(&format!("{name}: {} is no number", want[name])));
                continue;
            };
            // Unscaled integers: the raw value exactly, 64 bits included.
            let exact = match (*raw, sig.factor == 1.0 && sig.offset == 0.0) {
                (Raw::Unsigned(v), true) => want[name].as_u64() == Some(v),
                (Raw::Signed(v), true) => want[name].as_i64() == Some(v),
                _ => true,
            };
            if !exact || !agrees(sig, *value, theirs) {
                tally.differ(context(&format!(
                    "{name}: {value} ({raw:?}) vs {}",
                    want[name]
                )));
            } else if value.to_bits() == theirs.to_bits() {
                tally.bitwise += 1;
            }
        }
        // The agent's own path (every signal bound) agrees with decode_all, bit for bit.
        out.clear();
        if decoder
            .decode(frame.id, frame.extended, frame.data(), &mut out)
            .is_err()
            || out.len() != values.len()
            || out.iter().any(|&(field, v)| {
                let (m, s) = &names[field];
                m != &msg.name
                    || !values
                        .iter()
                        .any(|(n, w)| n == s && w.to_bits() == v.to_bits())
            })
        {
            tally.differ(context("Decoder::decode differs from decode_all"));
        }
        tally.frames += 1;
    }
}

/// The value a signal carries at each frame of the log that has it: (time, value).
type Track = Vec<(i64, f64)>;

/// `replay` of the log with `bound` bound to fields f0, f1, ...: every field of every record
/// against the last value cantools decoded before the record's tick.
#[allow(clippy::too_many_arguments)]
fn compare_replay(
    file: &str,
    path: &Path,
    dbc: &Dbc,
    bound: &[(String, String)],
    log_path: &Path,
    log: &str,
    expected: &[Value],
    dir: &Path,
    tally: &mut Tally,
    records: &mut usize,
) {
    let mut config = String::from(
        "[vehicle]\nid = \"CORPUS\"\nsession_id = \"corpus\"\n[sampling]\nstale_after = \"1h\"\n[fields]\n",
    );
    for k in 0..bound.len() {
        let _ = writeln!(
            config,
            "f{k} = {{ type = \"float\", min = -1.7976931348623157e308, max = 1.7976931348623157e308 }}"
        );
    }
    let _ = write!(
        config,
        "[source]\nkind = \"can\"\ninterface = \"can0\"\ndbc = {}\n[source.signals]\n",
        support::toml_path(path)
    );
    for (k, (m, s)) in bound.iter().enumerate() {
        let _ = writeln!(config, "f{k} = \"{m}.{s}\"");
    }
    let config_path = dir.join("replay.toml");
    std::fs::write(&config_path, config).expect("write config");

    // What cantools says each bound signal carries, frame by frame.
    let lines: Vec<&str> = log.lines().collect();
    let mut tracks: Vec<Track> = vec![Vec::new(); bound.len()];
    let mut first = i64::MAX;
    let mut last = i64::MIN;
    for exp in expected {
        let n = exp["line"].as_u64().unwrap_or(0) as usize;
        let Some(frame) = n
            .checked_sub(1)
            .and_then(|i| lines.get(i))
            .and_then(|l| parse_line(l.as_bytes()).ok())
        else {
            continue;
        };
        first = first.min(frame.time_us);
        last = last.max(frame.time_us);
        for (k, (m, s)) in bound.iter().enumerate() {
            if exp["message"].as_str() == Some(m.as_str())
                && let Some(v) = cantools_value(exp, s)
            {
                tracks[k].push((frame.time_us, v));
            }
        }
    }
    let signals: Vec<&SignalDef> = bound
        .iter()
        .filter_map(|(m, s)| dbc.message(m).ok().and_then(|m| m.signal(s)))
        .collect();
    assert_eq!(signals.len(), bound.len(), "{file}: bound signals");

    let out = support::run_agent(
        &[
            "replay",
            log_path.to_str().expect("utf-8"),
            "--config",
            config_path.to_str().expect("utf-8"),
            "--stdout",
            "--speed",
            "max",
        ],
        Duration::from_secs(120),
    );
    if out.code() != Some(0) {
        tally.differ(format!("{file}: replay failed: {}", out.describe()));
        return;
    }
    let mut ticks = Vec::new();
    for line in out.stdout_text.lines() {
        for record in line.split("{\"vehicle_id\":").skip(1) {
            let Some(t) = field_text(record, "timestamp").and_then(|t| t.parse::<i64>().ok())
            else {
                tally.differ(format!("{file}: record without timestamp: {record}"));
                continue;
            };
            ticks.push(t);
            *records += 1;
            for (k, sig) in signals.iter().enumerate() {
                let got = field_text(record, &format!("f{k}"));
                // The last frame before the tick (no frame is on a whole 100 ms).
                let want = tracks[k]
                    .iter()
                    .take_while(|(at, _)| *at < t * 1000)
                    .last()
                    .map(|&(_, v)| v);
                let context = || format!("{file}: tick {t}: f{k} = {}.{}", bound[k].0, bound[k].1);
                match (got.as_deref(), want) {
                    (Some("null"), None) => {}
                    (Some(text), Some(w)) => {
                        tally.values += 1;
                        match text.parse::<f64>() {
                            Ok(v) if agrees(sig, v, w) => {
                                tally.bitwise += usize::from(v.to_bits() == w.to_bits());
                            }
                            _ => tally.differ(format!("{}: {text} vs {w:?}", context())),
                        }
                    }
                    (got, want) => tally.differ(format!("{}: {got:?} vs {want:?}", context())),
                }
            }
        }
    }
    // A tick every 100 ms from the first frame to the last.
    let span = (first / 100_000 + 1)..=(last / 100_000);
    let want_ticks: Vec<i64> = span.map(|k| k * 100).collect();
    if ticks != want_ticks {
        tally.differ(format!(
            "{file}: ticks {:?}..{:?} ({}) vs {:?}..{:?} ({})",
            ticks.first(),
            ticks.last(),
            ticks.len(),
            want_ticks.first(),
            want_ticks.last(),
            want_ticks.len()
        ));
    }
}

/// The text of `"key":VALUE` in a flat JSON record.
fn field_text(record: &str, key: &str) -> Option<String> {
    let start = record.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = record.get(start..)?;
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

#[test]
fn every_file_decodes_like_cantools_frame_by_frame_and_tick_by_tick() {
    let have = Command::new("python3")
        .args(["-c", "import cantools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(have, "cantools not installed: pip install cantools==45.1.0");
    let dir = tempfile::tempdir().expect("temp dir");
    let files = corpus();
    let mut jobs = Vec::new();
    let mut bound_of = Vec::new();
    let mut usable_messages = Vec::new();
    for (i, (name, path)) in files.iter().enumerate() {
        let dbc = load(name, path);
        let mut skip: Vec<String> = dbc
            .defects()
            .iter()
            .filter(|d| d.effect == Effect::MessageLeftOut)
            .filter_map(|d| d.message.clone())
            .collect();
        skip.push("VECTOR__INDEPENDENT_SIG_MSG".into());
        let bound = choose_bound(&dbc, i as u64);
        let busy: HashSet<&String> = bound.iter().map(|(m, _)| m).collect();
        jobs.push(serde_json::json!({
            "dbc": path,
            "seed": i,
            "log": dir.path().join(format!("{i}.log")),
            "expected": dir.path().join(format!("{i}.jsonl")),
            "skip": skip,
            "busy": busy,
        }));
        usable_messages.push(
            dbc.messages()
                .iter()
                .filter(|m| !m.signals.is_empty())
                .count(),
        );
        bound_of.push(bound);
    }
    let spec = dir.path().join("jobs.json");
    let results_path = dir.path().join("results.json");
    std::fs::write(
        &spec,
        serde_json::json!({"frames": FRAMES, "busy_frames": BUSY_FRAMES, "jobs": jobs}).to_string(),
    )
    .expect("write jobs");
    let run = Command::new("python3")
        .arg(repo("scripts/opendbc_vectors.py"))
        .arg("vectors")
        .arg(&spec)
        .arg(&results_path)
        .output()
        .expect("run python3");
    assert!(
        run.status.success(),
        "opendbc_vectors.py vectors: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&results_path).expect("results"))
            .expect("results JSON");
    assert_eq!(results.len(), files.len());

    let mut decoding = Tally::default();
    let mut replay = Tally::default();
    let mut records = 0;
    let mut repairs_seen = String::new();
    let mut covered: BTreeMap<&str, usize> = BTreeMap::new();
    let mut in_corpus: HashSet<&str> = HashSet::new();
    let (mut shortest, mut longest) = (u8::MAX, 0u8);
    for (i, ((name, path), result)) in files.iter().zip(&results).enumerate() {
        let dbc = load(name, path);
        assert_eq!(
            result["loaded"], true,
            "{name}: cantools: {}",
            result["error"]
        );
        let repairs: Vec<&str> = result["repairs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !repairs.is_empty() {
            let _ = writeln!(repairs_seen, "    (\"{name}\", &{repairs:?}),");
        }
        assert_eq!(
            result["unencodable"].as_array().map(Vec::len),
            Some(0),
            "{name}: cantools could not encode {}",
            result["unencodable"]
        );
        // Every message the agent can use, and no other, has frames.
        assert_eq!(
            result["messages"].as_u64(),
            Some(usable_messages[i] as u64),
            "{name}: messages cantools encoded vs the agent's usable ones"
        );
        let log_path = dir.path().join(format!("{i}.log"));
        let log = std::fs::read_to_string(&log_path).expect("log");
        let expected: Vec<Value> = std::fs::read_to_string(dir.path().join(format!("{i}.jsonl")))
            .expect("expected")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(result["frames"].as_u64(), Some(expected.len() as u64));
        compare_decoding(name, &dbc, &log, &expected, &mut decoding);

        for m in dbc.messages() {
            for s in &m.signals {
                for k in kinds(m, s) {
                    in_corpus.insert(k);
                }
            }
        }
        let bound = &bound_of[i];
        for (m, s) in bound {
            if let Some((m, s)) = dbc.message(m).ok().and_then(|m| Some((m, m.signal(s)?))) {
                for k in kinds(m, s) {
                    *covered.entry(k).or_default() += 1;
                }
                shortest = shortest.min(s.len);
                longest = longest.max(s.len);
            }
        }
        if !bound.is_empty() {
            let run_dir = dir.path().join(format!("run{i}"));
            std::fs::create_dir_all(&run_dir).expect("run dir");
            compare_replay(
                name,
                path,
                &dbc,
                bound,
                &log_path,
                &log,
                &expected,
                &run_dir,
                &mut replay,
                &mut records,
            );
        }
    }
    let expected_repairs: String = REPAIRS
        .iter()
        .map(|(f, r)| format!("    (\"{f}\", &{r:?}),\n"))
        .collect();

    eprintln!(
        "opendbc {VERSION}, {} files against cantools 45.1:\n  decoding: {} frames, {} values \
         compared, {} bit for bit, {} differences\n  replay: {} files, {} bound signals, {} \
         records, {} values compared tick by tick, {} bit for bit, {} differences\n  bound \
         signals by kind: {covered:?}, {shortest} to {longest} bits",
        files.len(),
        decoding.frames,
        decoding.values,
        decoding.bitwise,
        decoding.differences.len(),
        bound_of.iter().filter(|b| !b.is_empty()).count(),
        bound_of.iter().map(Vec::len).sum::<usize>(),
        records,
        replay.values,
        replay.bitwise,
        replay.differences.len(),
    );
    let first = |t: &Tally| t.differences.iter().take(20).cloned().collect::<Vec<_>>();
    assert!(
        decoding.differences.is_empty(),
        "decoding differs:\n{}",
        first(&decoding).join("\n")
    );
    assert!(
        replay.differences.is_empty(),
        "replay differs:\n{}",
        first(&replay).join("\n")
    );
    assert_eq!(
        repairs_seen, expected_repairs,
        "cantools needed other repairs; now:\n{repairs_seen}"
    );
    // Tens of thousands of values, every kind of signal bound somewhere.
    assert!(decoding.values > 50_000, "{}", decoding.values);
    assert!(replay.values > 10_000, "{}", replay.values);
    // Every kind of signal the corpus has is bound somewhere (it has no float signal:
    // tests/cantools_decode.rs covers those).
    for kind in KINDS {
        assert_eq!(
            covered.contains_key(kind),
            in_corpus.contains(kind),
            "{kind}: bound {covered:?}"
        );
    }
    for kind in [
        "Intel",
        "Motorola",
        "signed",
        "scaled",
        "multiplexed",
        "1 bit",
        "64 bits",
        "CAN FD",
    ] {
        assert!(covered.contains_key(kind), "no bound signal is {kind}");
    }
}
