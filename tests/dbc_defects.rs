//! A DBC file with defects, through the agent's commands: a defect outside the bound
//! messages is one warning line at start (file, line, message) and the file is used; a
//! binding to a message with a defect is a configuration error naming it; `source.dbc_strict
//! = true` refuses the file; `check-config --no-files` checks the DBC and its bindings too
//! (it skips the certificate and key files only).

mod support;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use redline_agent::source::can::GT3_DBC;
use redline_agent::source::dbc::Dbc;

const QUICK: Duration = Duration::from_secs(30);

/// The GT3 bus and, from line `first + 1` on, messages a vendor got wrong: `Junk`
/// (overlapping signals), `Wide` (id 4096 without the extended bit: read as extended),
/// `Mux2` (a signal past its frame), and a `VAL_` for a signal no message has.
fn dbc_text() -> (String, usize) {
    let mut text = GT3_DBC.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let first = text.lines().count();
    text.push_str(concat!(
        "BO_ 1792 Junk: 8 ECU\n",
        " SG_ A : 0|16@1+ (1,0) [0|0] \"\" TLM\n",
        " SG_ B : 8|8@1+ (1,0) [0|0] \"\" TLM\n",
        "BO_ 4096 Wide: 8 ECU\n",
        " SG_ Temp : 0|16@1+ (0.1,-40) [0|0] \"degC\" TLM\n",
        "BO_ 1793 Mux2: 2 ECU\n",
        " SG_ Late : 12|8@1+ (1,0) [0|0] \"\" TLM\n",
        "VAL_ 1792 Nope 1 \"on\" 0 \"off\" ;\n",
    ));
    (text, first)
}

struct Setup {
    dir: tempfile::TempDir,
    dbc_first: usize,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (text, first) = dbc_text();
        std::fs::write(dir.path().join("car.dbc"), text).expect("write dbc");
        Self {
            dir,
            dbc_first: first,
        }
    }

    fn dbc(&self) -> std::path::PathBuf {
        self.dir.path().join("car.dbc")
    }

    /// A CAN config binding `rpm` (and `oil`) as given, `extra` appended to `[source]`.
    fn config(&self, rpm: &str, extra: &str, mqtt: bool) -> std::path::PathBuf {
        let mut text = format!(
            "[vehicle]\nid = \"GT3\"\n[fields]\nengine_rpm = {{ type = \"int\", min = 0, max = 20000 }}\n\
             oil = {{ type = \"float\", min = -50, max = 7000, decimals = 1 }}\n[source]\nkind = \"can\"\n\
             interface = \"can0\"\ndbc = {}\n{extra}\n[source.signals]\nengine_rpm = \"{rpm}\"\n\
             oil = \"Wide.Temp\"\n",
            support::toml_path(&self.dbc())
        );
        if mqtt {
            // Certificates that are not installed yet.
            let _ = write!(
                text,
                "[mqtt]\nendpoint = \"example.invalid\"\nca = \"nope/ca.pem\"\n\
                 cert = \"nope/cert.pem\"\nkey = \"nope/key.pem\"\n"
            );
        }
        let path = self.dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn line(&self, k: usize) -> usize {
        self.dbc_first + k
    }
}

fn check_config(config: &Path, no_files: bool) -> support::process::Finished {
    let mut args = vec!["check-config"];
    if no_files {
        args.push("--no-files");
    }
    args.extend(["--config", config.to_str().expect("utf-8")]);
    support::run_agent(&args, QUICK)
}

/// The warning lines of a run's stderr that concern the DBC.
fn warnings(stderr: &str, dbc: &Path) -> Vec<String> {
    let at = format!("{}:", dbc.display());
    stderr
        .lines()
        .filter(|l| l.contains(&at))
        .map(str::to_owned)
        .collect()
}

#[test]
fn defects_outside_the_bindings_are_one_warning_line_each() {
    let s = Setup::new();
    let config = s.config("Engine.RPM", "", false);
    let out = check_config(&config, false);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let w = warnings(&out.stderr, &s.dbc());
    let dbc = s.dbc().display().to_string();
    let expected = [
        (
            s.line(1),
            "message `Junk`: signals `A` and `B` overlap (byte 1, bit 0); message `Junk` left out",
        ),
        (
            s.line(4),
            "message `Wide`: id 4096 (0x1000) is above 0x7FF without the extended-id bit (bit 31): \
             only an extended frame can carry it, read as extended id 0x00001000",
        ),
        (
            s.line(7),
            "signal `Late` of message `Mux2`: bits 12..=19 run past the end of the 2-byte message; \
             message `Mux2` left out",
        ),
        (
            s.line(8),
            "VAL_ names signal `Nope`, which message `Junk` does not have",
        ),
    ];
    assert_eq!(w.len(), expected.len(), "{}", out.describe());
    for (line, (n, words)) in w.iter().zip(expected) {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&format!("{dbc}:{n}: {words}")), "{line}");
    }
}

#[test]
fn a_binding_to_a_message_with_a_defect_is_an_error_naming_it() {
    let s = Setup::new();
    for (binding, words) in [
        ("Junk.A", ["Junk", "signals `A` and `B` overlap"]),
        (
            "Mux2.Late",
            ["Mux2", "signal `Late`: bits 12..=19 run past"],
        ),
    ] {
        let config = s.config(binding, "", false);
        for no_files in [false, true] {
            let out = check_config(&config, no_files);
            assert_eq!(out.code(), Some(2), "{binding}: {}", out.describe());
            assert!(
                out.stderr
                    .contains("key `source.signals.engine_rpm`: message"),
                "{}",
                out.describe()
            );
            for w in words {
                assert!(out.stderr.contains(w), "{w}: {}", out.describe());
            }
            assert!(
                out.stderr.contains(&format!("line {}", s.line(1)))
                    || out.stderr.contains(&format!("line {}", s.line(7))),
                "{}",
                out.describe()
            );
        }
    }
}

#[test]
fn dbc_strict_refuses_a_file_with_any_defect() {
    let s = Setup::new();
    let config = s.config("Engine.RPM", "dbc_strict = true", false);
    for no_files in [false, true] {
        let out = check_config(&config, no_files);
        assert_eq!(out.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains(&format!(
                "key `source.dbc`: {}:{}: message `Junk`: signals `A` and `B` overlap",
                s.dbc().display(),
                s.line(1)
            )),
            "{}",
            out.describe()
        );
        assert!(
            out.stderr
                .contains("a strict load refuses any defect; 4 in the file"),
            "{}",
            out.describe()
        );
    }
    // The GT3 bus alone passes, and the effective config says it is strict.
    std::fs::write(s.dbc(), GT3_DBC).expect("write dbc");
    let config = s.config("Engine.RPM", "dbc_strict = true", false);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("config")
            .replace("oil = \"Wide.Temp\"\n", "oil = \"EngineTemps.OilTemp\"\n"),
    )
    .expect("config");
    let out = check_config(&config, false);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout_text.contains("dbc_strict = true"),
        "{}",
        out.describe()
    );
}

#[test]
fn check_config_no_files_checks_the_dbc_but_not_the_certificates() {
    let s = Setup::new();
    // Certificates not installed: --no-files passes, a full check does not.
    let config = s.config("Engine.RPM", "", true);
    let out = check_config(&config, true);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        warnings(&out.stderr, &s.dbc()).len(),
        4,
        "{}",
        out.describe()
    );
    let out = check_config(&config, false);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("key `mqtt.ca`"), "{}", out.describe());
    // A binding to a signal the DBC lacks, and a DBC that is not there: refused with
    // --no-files too, as `run` would refuse them.
    let config = s.config("Engine.Rpm", "", true);
    let out = check_config(&config, true);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("key `source.signals.engine_rpm`")
            && out.stderr.contains("has no signal `Rpm`"),
        "{}",
        out.describe()
    );
    std::fs::remove_file(s.dbc()).expect("remove dbc");
    let config = s.config("Engine.RPM", "", true);
    let out = check_config(&config, true);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("key `source.dbc`"),
        "{}",
        out.describe()
    );
}

#[test]
fn replay_decodes_the_bound_signals_of_a_file_with_defects() {
    let s = Setup::new();
    let config = s.config("Engine.RPM", "", false);
    let dbc = Dbc::load(s.dbc()).expect("lenient load");
    assert_eq!(dbc.defects().len(), 4);
    // Ten frames 50 ms apart: RPM on 0x100, Wide's temperature on extended id 0x1000, and
    // a frame of the left-out Junk (0x700), which is not bound.
    let mut log = String::new();
    for k in 0..10u32 {
        let t = 1_705_267_200.0 + f64::from(k) * 0.05 + 0.000_5;
        let mut data = [0u8; 8];
        dbc.encode("Engine", &[("RPM", f64::from(6000 + k))], &mut data)
            .expect("encode");
        let hex = |d: &[u8]| d.iter().fold(String::new(), |s, b| s + &format!("{b:02X}"));
        let _ = writeln!(log, "({t:.6}) can0 100#{}", hex(&data));
        dbc.encode("Wide", &[("Temp", 90.5)], &mut data)
            .expect("encode");
        let _ = writeln!(log, "({t:.6}) can0 00001000#{}", hex(&data));
        let _ = writeln!(log, "({t:.6}) can0 700#0102030405060708");
    }
    let log_path = s.dir.path().join("stint.log");
    std::fs::write(&log_path, log).expect("write log");
    let out = support::run_agent(
        &[
            "replay",
            log_path.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
            "--stdout",
        ],
        QUICK,
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    // Warned once each, at start.
    assert_eq!(
        warnings(&out.stderr, &s.dbc()).len(),
        4,
        "{}",
        out.describe()
    );
    let records: Vec<serde_json::Value> = out
        .stdout_text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| v["records"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(!records.is_empty(), "{}", out.describe());
    for r in &records {
        let rpm = r["engine_rpm"].as_i64().unwrap_or(0);
        assert!((6000..=6009).contains(&rpm), "{r}");
        assert_eq!(r["oil"].as_f64(), Some(90.5), "{r}");
    }
}
