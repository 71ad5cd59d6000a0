//! The systemd notify protocol against a real datagram socket: READY after start-up,
//! WATCHDOG pings while the pipeline moves and none once the sampler is stalled, STATUS
//! lines that say whether the agent is working.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::Broker;
use support::certs::Pki;
use support::process::Proc;

/// Every datagram received until `until`, with its arrival time since `t0`.
fn collect(sock: &UnixDatagram, t0: Instant, until: Duration) -> Vec<(Duration, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    while t0.elapsed() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((
                t0.elapsed(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    out
}

fn start_agent(dir: &Path, cfg: &Path, socket: &Path, stall_ms: Option<u64>) -> Proc {
    let mut cmd = support::agent();
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", "900000")
        .current_dir(dir);
    if let Some(ms) = stall_ms {
        cmd.env("REDLINE_TEST_STALL_SAMPLER_AFTER_MS", ms.to_string());
    }
    Proc::spawn("redline-agent", cmd)
}

fn config(pki: &Pki, broker: &Broker, dir: &Path) -> std::path::PathBuf {
    let spec = support::ConfigSpec {
        port: broker.tls_port,
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let path = dir.join("agent.toml");
    let text = format!(
        "{}\n[spool]\ndir = {}\n",
        spec.render(),
        support::toml_path(&dir.join("spool"))
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn ready_status_and_watchdog_while_moving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let cfg = config(&pki, &broker, dir.path());
    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).expect("bind notify socket");
    let t0 = Instant::now();
    let mut agent = start_agent(dir.path(), &cfg, &socket, None);
    let mut got = collect(&sock, t0, Duration::from_secs(5));
    agent.terminate();
    got.extend(collect(
        &sock,
        t0,
        t0.elapsed() + Duration::from_millis(300),
    ));
    let text: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    let ready = got
        .iter()
        .position(|(_, m)| m.lines().any(|l| l == "READY=1"));
    assert!(
        ready.is_some(),
        "no READY=1: {text:?}\n{}",
        agent.stderr_text()
    );
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    // A ping every 300 ms once running: at least 8 in the last 4 s.
    assert!(
        pings
            .iter()
            .filter(|t| **t > Duration::from_secs(1))
            .count()
            >= 8,
        "too few WATCHDOG=1 pings: {pings:?}"
    );
    assert!(
        pings
            .windows(2)
            .all(|w| w[1] - w[0] < Duration::from_millis(900)),
        "a gap between pings reached WATCHDOG_USEC: {pings:?}"
    );
    let status = got
        .iter()
        .rev()
        .flat_map(|(_, m)| m.lines())
        .find(|l| l.starts_with("STATUS=") && !l.contains("stopping"))
        .unwrap_or_default();
    assert!(
        status.contains("connected")
            && status.contains("backlog")
            && status.contains("last PUBACK"),
        "STATUS does not summarise the link: {status:?}"
    );
    assert!(
        !status.contains("not connected") && !status.contains("never"),
        "the agent was connected and publishing: {status:?}"
    );
    assert!(
        text.iter().any(|m| m.contains("STOPPING=1")),
        "SIGTERM should say STOPPING=1: {text:?}"
    );
}

#[test]
fn watchdog_pings_stop_when_the_sampler_stalls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let cfg = config(&pki, &broker, dir.path());
    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).expect("bind notify socket");
    let t0 = Instant::now();
    let mut agent = start_agent(dir.path(), &cfg, &socket, Some(2500));
    let got = collect(&sock, t0, Duration::from_secs(8));
    let stderr = agent.stderr_text();
    assert!(
        agent.is_running(),
        "a stalled sampler must not end the process"
    );
    agent.terminate();
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        pings.iter().any(|t| *t < Duration::from_millis(2500)),
        "pings before the stall: {pings:?}"
    );
    // The stall is noticed within 2 s (and one 300 ms look) of the last reading.
    let late: Vec<_> = pings
        .iter()
        .filter(|t| **t > Duration::from_millis(5200))
        .collect();
    assert!(
        late.is_empty(),
        "WATCHDOG=1 went on after the sampler stalled: {late:?}"
    );
    assert!(
        stderr.contains("pipeline stalled"),
        "the stall is logged:\n{stderr}"
    );
}
