//! Shared helpers of the integration tests: real peers (Mosquitto with mutual
//! TLS, mosquitto_sub), generated certificates, the agent binary, and the
//! checks of the record contract.
#![allow(dead_code)] // each test crate uses a different part of this module

pub mod broker;
pub mod certs;
pub mod json;
pub mod link;
pub mod process;
pub mod spool;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use process::{Finished, run};

/// The `ID#HEX` of a candump line: `message` of `dbc` carrying `values` (an extended id
/// in 8 hex digits, a standard one in 3).
pub fn candump_frame(
    dbc: &redline_agent::source::dbc::Dbc,
    message: &str,
    values: &[(&str, f64)],
) -> String {
    use std::fmt::Write as _;
    let mut data = [0u8; 64];
    let len = dbc.encode(message, values, &mut data).expect("encode");
    let id = dbc.message(message).expect("message").id;
    let hex = data[..len].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    });
    if id.extended {
        format!("{:08X}#{hex}", id.id)
    } else {
        format!("{:03X}#{hex}", id.id)
    }
}

/// This machine's wall clock, in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The agent's own time (ms since the epoch) of its first log line holding `needle`, from
/// the RFC 3339 stamp that starts each line.
pub fn logged_at(stderr: &str, needle: &str) -> Option<i64> {
    let stamp = stderr
        .lines()
        .find(|l| l.contains(needle))?
        .split_whitespace()
        .next()?;
    parse_rfc3339_ms(stamp)
}

/// An RFC 3339 time in ms since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// `--start` used by the tests, and the same instant in epoch milliseconds.
pub const START: &str = "2024-01-14T21:20:00Z";
pub const START_MS: i64 = 1_705_267_200_000;

pub const VEHICLE_ID: &str = "GT3-TEST";
pub const SESSION_ID: &str = "test-session";
pub const TOPIC: &str = "redline/telemetry/GT3-TEST";

/// The agent binary with a controlled environment: no RUST_LOG (default log
/// level), and RUST_BACKTRACE=1 so that a panic or an error printed with a
/// backtrace would show.
pub fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redline-agent"));
    cmd.env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// Runs the agent with `args` to its end (panics after `timeout`).
pub fn run_agent(args: &[&str], timeout: Duration) -> Finished {
    let mut cmd = agent();
    cmd.args(args);
    run("redline-agent", cmd, timeout)
}

/// A TOML basic string holding `p`.
pub fn toml_path(p: &Path) -> String {
    let s = p.to_str().expect("utf-8 path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The agent config the tests start from: every documented key, the simulator
/// source, the broker on `localhost:port`, and the given client certificate.
pub struct ConfigSpec<'a> {
    pub port: u16,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// `records` or `single`
    pub payload: &'a str,
}

impl<'a> ConfigSpec<'a> {
    /// The agent with `pki`'s client certificate on `broker`'s TLS port, batches as records.
    pub fn for_broker(pki: &'a certs::Pki, broker: &broker::Broker) -> Self {
        ConfigSpec {
            port: broker.tls_port,
            ca: &pki.ca,
            cert: &pki.client_cert,
            key: &pki.client_key,
            payload: "records",
        }
    }

    pub fn render(&self) -> String {
        format!(
            r#"[vehicle]
id = "{VEHICLE_ID}"
session_id = "{SESSION_ID}"

[sampling]
rate_hz = 10
stale_after = "500ms"

[source]
kind = "simulator"

[batch]
max_records = 10
max_age = "1s"
max_bytes = "128KiB"
payload = "{payload}"

[mqtt]
endpoint = "localhost"
port = {port}
client_id = "{VEHICLE_ID}"
topic = "redline/telemetry/{{vehicle_id}}"
ca = {ca}
cert = {cert}
key = {key}
keep_alive = "30s"
max_inflight = 20
"#,
            payload = self.payload,
            port = self.port,
            ca = toml_path(self.ca),
            cert = toml_path(self.cert),
            key = toml_path(self.key),
        )
    }

    /// Renders into `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.render()).unwrap();
        path
    }
}

/// Every record of every stdout line of a `simulate --stdout` run.
pub fn stdout_records(out: &Finished, mode: json::PayloadMode) -> Vec<json::Record> {
    let mut records = Vec::new();
    for (i, line) in out.stdout_text.lines().enumerate() {
        match json::check_message(line, mode) {
            Ok(rs) => records.extend(rs),
            Err(e) => panic!(
                "stdout line {} breaks the contract: {e}\n{}",
                i + 1,
                out.describe()
            ),
        }
    }
    records
}
