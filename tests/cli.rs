//! The command line of `redline-agent`, without a broker: help and version,
//! `simulate --stdout`, determinism, `check-config` and config errors.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::certs::Pki;
use support::json::{PayloadMode, assert_exact_grid, coverage};
use support::process::Finished;
use support::{ConfigSpec, SESSION_ID, START, START_MS, VEHICLE_ID, run_agent, stdout_records};

const QUICK: Duration = Duration::from_secs(20);

fn assert_exit(out: &Finished, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: expected exit code {code}\n{}",
        out.describe()
    );
}

fn assert_no_panic(out: &Finished, what: &str) {
    for bad in [
        "panicked",
        "stack backtrace",
        "Stack backtrace",
        "RUST_BACKTRACE",
    ] {
        assert!(
            !out.stderr.contains(bad),
            "{what}: stderr contains {bad:?}\n{}",
            out.describe()
        );
    }
}

/// A tempdir with certificates and a valid config file using them.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pki: Pki,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), VEHICLE_ID);
        let path = dir.path().to_owned();
        Fixture {
            _dir: dir,
            path,
            pki,
        }
    }

    fn spec(&self, payload: &'static str) -> ConfigSpec<'_> {
        ConfigSpec {
            // Nothing listens here: --stdout and check-config must not connect.
            port: 18883,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload,
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

// 5.
#[test]
fn version_and_help() {
    let out = run_agent(&["--version"], QUICK);
    assert_exit(&out, 0, "--version");
    assert!(
        out.stdout_text.contains(env!("CARGO_PKG_VERSION")),
        "--version must print the crate version {}\n{}",
        env!("CARGO_PKG_VERSION"),
        out.describe()
    );

    let expected: [(&str, &[&str]); 3] = [
        ("run", &["--config"]),
        ("check-config", &["--config"]),
        (
            "simulate",
            &[
                "--config",
                "--stdout",
                "--duration",
                "--speed",
                "--seed",
                "--start",
                "--faults",
            ],
        ),
    ];
    for (sub, options) in expected {
        let out = run_agent(&[sub, "--help"], QUICK);
        assert_exit(&out, 0, &format!("{sub} --help"));
        for opt in options {
            assert!(
                out.stdout_text.contains(opt),
                "`{sub} --help` does not mention {opt}\n{}",
                out.describe()
            );
        }
    }
}

// 6.
#[test]
fn simulate_stdout_without_config() {
    let out = run_agent(
        &[
            "simulate",
            "--stdout",
            "--duration",
            "5s",
            "--speed",
            "max",
            "--seed",
            "3",
            "--start",
            START,
        ],
        QUICK,
    );
    assert_exit(&out, 0, "simulate --stdout without config");
    assert!(
        !out.stdout_text.trim().is_empty(),
        "no output\n{}",
        out.describe()
    );
    let records = stdout_records(&out, PayloadMode::Any);
    assert_eq!(
        records.len(),
        50,
        "5 s at 10 Hz must print 50 records\n{}",
        out.describe()
    );
    let cov = coverage(&records).unwrap();
    assert_eq!(cov.duplicates, 0, "stdout repeats readings");
    assert_exact_grid(&cov, START_MS, 50);
    let sessions: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.session_id.as_str()).collect();
    assert_eq!(sessions.len(), 1, "one run, one session id: {sessions:?}");
    // The summary says what was printed, not `published=0`.
    let summary = out
        .stderr
        .lines()
        .find(|l| l.contains("summary:"))
        .unwrap_or_else(|| panic!("no summary\n{}", out.describe()));
    let lines = out.stdout_text.lines().count();
    assert!(
        summary.contains(&format!("printed_messages={lines} ")) && !summary.contains("published="),
        "the summary of a stdout run: {summary}"
    );
}

#[test]
fn a_bad_duration_says_what_is_expected_without_parser_positions() {
    let out = run_agent(&["simulate", "--duration", "banana"], QUICK);
    assert_exit(&out, 2, "simulate --duration banana");
    assert!(
        out.stderr.contains("expected a duration such as `30s`")
            && out.stderr.contains("\"banana\"")
            && !out.stderr.contains(" at 0"),
        "{}",
        out.describe()
    );
}

fn simulate_with_config(config: &Path, seed: &str, speed: &str) -> Finished {
    let out = run_agent(
        &[
            "simulate",
            "--config",
            path_str(config),
            "--stdout",
            "--duration",
            "5s",
            "--speed",
            speed,
            "--seed",
            seed,
            "--start",
            START,
        ],
        QUICK,
    );
    assert_exit(&out, 0, &format!("simulate --seed {seed} --speed {speed}"));
    out
}

// 7.
#[test]
fn simulate_is_deterministic_at_any_speed() {
    let fx = Fixture::new();
    let config = fx.spec("records").write(&fx.path, "agent.toml");

    let max = simulate_with_config(&config, "11", "max");
    let records = stdout_records(&max, PayloadMode::Records);
    assert_eq!(records.len(), 50, "{}", max.describe());
    assert!(
        records
            .iter()
            .all(|r| r.session_id == SESSION_ID && r.vehicle_id == VEHICLE_ID),
        "vehicle_id/session_id must come from the config"
    );
    assert_exact_grid(&coverage(&records).unwrap(), START_MS, 50);

    let fifty = simulate_with_config(&config, "11", "50");
    assert!(
        max.stdout == fifty.stdout,
        "same seed/start/session: --speed max and --speed 50 differ\n--- max ---\n{}\n--- 50 ---\n{}",
        max.stdout_text,
        fifty.stdout_text
    );

    let again = simulate_with_config(&config, "11", "max");
    assert!(max.stdout == again.stdout, "two --speed max runs differ");

    let other_seed = simulate_with_config(&config, "12", "max");
    assert_eq!(
        stdout_records(&other_seed, PayloadMode::Records).len(),
        50,
        "{}",
        other_seed.describe()
    );
    assert!(
        max.stdout != other_seed.stdout,
        "--seed 11 and --seed 12 give the same output"
    );
}

/// Copies a shipped config into `dir` (at `rel`, e.g. `config/bench.toml`) and
/// puts test certificates where its `mqtt.ca`, `mqtt.cert` and `mqtt.key` point
/// (relative paths are taken from the config file's directory). The shipped
/// configs name deployment files (AWS IoT certificates, the bench broker's
/// certificates) that are not in the repository.
fn install_shipped_config(file: &str, dir: &Path, pki: &Pki) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    assert!(src.is_file(), "{file} does not exist");
    let text = std::fs::read_to_string(&src).unwrap();
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not valid TOML: {e}"));
    let dest = dir.join(file);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, &text).unwrap();
    let mqtt = table
        .get("mqtt")
        .and_then(|m| m.as_table())
        .unwrap_or_else(|| panic!("{file} has no [mqtt] table"));
    for (key, material) in [
        ("ca", &pki.ca),
        ("cert", &pki.client_cert),
        ("key", &pki.client_key),
    ] {
        let Some(rel) = mqtt.get(key).and_then(|v| v.as_str()) else {
            continue; // a default applies
        };
        assert!(
            Path::new(rel).is_relative(),
            "{file}: mqtt.{key} = {rel:?} is absolute; the test cannot provide it"
        );
        let target = dest.parent().unwrap().join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(material, &target).unwrap();
    }
    // A DBC named relative to the config ships beside it in the repository.
    if let Some(rel) = table
        .get("source")
        .and_then(|s| s.get("dbc"))
        .and_then(|v| v.as_str())
    {
        let from = src.parent().unwrap().join(rel);
        let target = dest.parent().unwrap().join(rel);
        std::fs::copy(&from, &target)
            .unwrap_or_else(|e| panic!("{file}: source.dbc {}: {e}", from.display()));
    }
    dest
}

// 8.
#[test]
fn shipped_configs_are_valid() {
    let fx = Fixture::new();
    for file in ["config/agent.toml", "config/bench.toml"] {
        let path = install_shipped_config(file, &fx.path.join("installed"), &fx.pki);
        let out = run_agent(&["check-config", "--config", path_str(&path)], QUICK);
        assert_exit(&out, 0, &format!("check-config {file}"));
        assert!(
            out.stdout_text.contains("GT3"),
            "check-config {file} must print the effective config (with the vehicle id)\n{}",
            out.describe()
        );
        assert_no_panic(&out, file);
        // In place, before the certificates are installed.
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = run_agent(
            &["check-config", "--no-files", "--config", path_str(&here)],
            QUICK,
        );
        assert_exit(&out, 0, &format!("check-config --no-files {file}"));
    }
}

// 9. (control: the base config the bad ones are made from is valid)
#[test]
fn check_config_accepts_the_base_config() {
    let fx = Fixture::new();
    let config = fx.spec("records").write(&fx.path, "good.toml");
    let out = run_agent(&["check-config", "--config", path_str(&config)], QUICK);
    assert_exit(&out, 0, "check-config on a valid config");
    assert!(
        out.stdout_text.contains(VEHICLE_ID),
        "check-config must print the effective config\n{}",
        out.describe()
    );
}

/// Replaces exactly one occurrence of `from` in `text`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} must occur once in the base config"
    );
    text.replacen(from, to, 1)
}

fn assert_config_error(fx: &Fixture, name: &str, text: &str, key: &str) {
    let path = fx.write(name, text);
    for sub in ["check-config", "run"] {
        let out = run_agent(&[sub, "--config", path_str(&path)], QUICK);
        let what = format!("{sub} with {name} (expects an error naming {key})");
        assert_exit(&out, 2, &what);
        assert!(
            out.stderr.contains(path_str(&path)),
            "{what}: stderr must name the file {}\n{}",
            path.display(),
            out.describe()
        );
        assert!(
            out.stderr.contains(key),
            "{what}: stderr must name the key {key}\n{}",
            out.describe()
        );
        assert_no_panic(&out, &what);
    }
}

// 9.
#[test]
fn bad_configs_name_file_and_key() {
    let fx = Fixture::new();
    let base = fx.spec("records").render();

    assert_config_error(
        &fx,
        "unknown-key.toml",
        &replace_once(&base, "[batch]\n", "[batch]\nfoo = 1\n"),
        "batch.foo",
    );
    assert_config_error(
        &fx,
        "max-bytes.toml",
        &replace_once(&base, "max_bytes = \"128KiB\"", "max_bytes = \"200KiB\""),
        "batch.max_bytes",
    );
    assert_config_error(
        &fx,
        "max-records.toml",
        &replace_once(&base, "max_records = 10", "max_records = 501"),
        "batch.max_records",
    );
    assert_config_error(
        &fx,
        "topic.toml",
        &replace_once(
            &base,
            "topic = \"redline/telemetry/{vehicle_id}\"",
            "topic = \"x/{nope}\"",
        ),
        "mqtt.topic",
    );
    let missing = fx.path.join("no-such-client.pem");
    assert_config_error(
        &fx,
        "missing-cert.toml",
        &replace_once(
            &base,
            &format!("cert = {}", support::toml_path(&fx.pki.client_cert)),
            &format!("cert = {}", support::toml_path(&missing)),
        ),
        "mqtt.cert",
    );
    assert_config_error(
        &fx,
        "type-error.toml",
        &replace_once(&base, "rate_hz = 10", "rate_hz = \"ten\""),
        "sampling.rate_hz",
    );
}

// 9. (syntax error: file path and line number)
#[test]
fn toml_syntax_error_names_file_and_line() {
    let fx = Fixture::new();
    let base = fx.spec("records").render();
    let text = replace_once(&base, "max_inflight = 20", "max_inflight = = 20");
    let line = text
        .lines()
        .position(|l| l.starts_with("max_inflight = = 20"))
        .unwrap()
        + 1;
    assert!(line > 9, "pick a line number that cannot match by accident");
    let path = fx.write("syntax.toml", &text);
    let out = run_agent(&["check-config", "--config", path_str(&path)], QUICK);
    assert_exit(&out, 2, "TOML syntax error");
    assert!(
        out.stderr.contains(path_str(&path)),
        "stderr must name the file\n{}",
        out.describe()
    );
    let line_marks = [format!("line {line}"), format!(":{line}:")];
    assert!(
        line_marks.iter().any(|m| out.stderr.contains(m)),
        "stderr must give the line number {line} (as `line {line}` or `:{line}:`)\n{}",
        out.describe()
    );
    assert_no_panic(&out, "TOML syntax error");
}

// 10.
#[test]
fn faults_give_nulls_never_nan() {
    let out = run_agent(
        &[
            "simulate",
            "--faults",
            "--stdout",
            "--duration",
            "60s",
            "--speed",
            "max",
            "--seed",
            "5",
            "--start",
            START,
        ],
        QUICK,
    );
    assert_exit(&out, 0, "simulate --faults");
    let lower = out.stdout_text.to_ascii_lowercase();
    for bad in ["nan", "inf"] {
        assert!(
            !lower.contains(bad),
            "stdout contains {bad:?} text\n{}",
            out.describe()
        );
    }
    let records = stdout_records(&out, PayloadMode::Any);
    assert_eq!(records.len(), 600, "60 s at 10 Hz\n{}", out.describe());
    assert_exact_grid(&coverage(&records).unwrap(), START_MS, 600);
    let with_null = records.iter().filter(|r| r.has_null()).count();
    assert!(
        with_null > 0,
        "--faults for 60 s produced no null in {} records",
        records.len()
    );
}

#[test]
fn a_key_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let key = fx.path.join("open.key");
    std::fs::copy(&fx.pki.client_key, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = fx.spec("records").render();
    let text = base.replacen(
        &format!("key = {}", support::toml_path(&fx.pki.client_key)),
        &format!("key = {}", support::toml_path(&key)),
        1,
    );
    let path = fx.write("open-key.toml", &text);
    let out = run_agent(&["check-config", "--config", path_str(&path)], QUICK);
    assert_exit(&out, 0, "check-config with an open key");
    assert!(
        out.stderr.contains("readable by other users"),
        "{}",
        out.describe()
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_agent(&["check-config", "--config", path_str(&path)], QUICK);
    assert!(
        !out.stderr.contains("readable by other users"),
        "{}",
        out.describe()
    );
}

#[test]
fn the_key_comes_from_systemd_credentials_when_present() {
    let fx = Fixture::new();
    let creds = fx.path.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(&fx.pki.client_key, creds.join("mqtt.key")).unwrap();
    let base = fx.spec("records").render();
    // The key file the config names is not readable by the service: systemd copies it.
    let text = base.replacen(
        &format!("key = {}", support::toml_path(&fx.pki.client_key)),
        "key = \"/nonexistent/private.pem.key\"",
        1,
    );
    let path = fx.write("creds.toml", &text);
    let mut cmd = support::agent();
    cmd.args(["check-config", "--config", path_str(&path)])
        .env("CREDENTIALS_DIRECTORY", &creds);
    let out = support::process::run("redline-agent", cmd, QUICK);
    assert_exit(
        &out,
        0,
        "check-config with the key in CREDENTIALS_DIRECTORY",
    );
    assert!(
        out.stdout_text.contains("credentials/mqtt.key"),
        "{}",
        out.describe()
    );
    let out = run_agent(&["check-config", "--config", path_str(&path)], QUICK);
    assert_exit(&out, 2, "without the credentials the named key is missing");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = run_agent(
        &[
            "--log-format",
            "json",
            "simulate",
            "--stdout",
            "--duration",
            "1s",
            "--speed",
            "max",
        ],
        QUICK,
    );
    assert_exit(&out, 0, "simulate with JSON logs");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
    assert!(
        !out.stderr.contains("\u{1b}["),
        "no colour when stderr is not a terminal"
    );
}

#[test]
fn declared_fields_keep_their_order_in_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fields.toml");
    std::fs::write(
        &config,
        r#"[vehicle]
id = "GT3-TEST"

[fields]
engine_rpm = { type = "int", min = 0, max = 20000 }
brake_disc_temp_fr = { type = "float", min = -50, max = 1500, decimals = 1 }
engine_oil_temp = { type = "float", min = -50, max = 200, decimals = 1 }
brake_disc_temp_fl = { type = "float", min = -50, max = 1500, decimals = 1 }
"#,
    )
    .unwrap();
    let out = run_agent(
        &[
            "simulate",
            "--config",
            path_str(&config),
            "--stdout",
            "--duration",
            "1s",
            "--speed",
            "max",
        ],
        QUICK,
    );
    assert_exit(&out, 0, "simulate with declared fields");
    let line = out.stdout_text.lines().next().unwrap_or_default();
    let at = |key: &str| {
        line.find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    let order = [
        at("timestamp"),
        at("engine_rpm"),
        at("brake_disc_temp_fr"),
        at("engine_oil_temp"),
        at("brake_disc_temp_fl"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the record's keys are not in the declared order: {line}"
    );
}
