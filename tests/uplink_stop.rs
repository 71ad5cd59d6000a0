//! A clean stop (SIGTERM, as systemd sends it) publishes the batch closed at the stop and
//! ends as soon as every PUBACK is in, not after `delivery.shutdown_timeout`.

mod support;

use std::time::{Duration, Instant};

use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::{PayloadMode, check_message, coverage};
use support::process::{send_signal, tail};
use support::spool::{spawn_agent, spool_stats};
use support::{ConfigSpec, toml_path};

#[test]
fn sigterm_publishes_the_last_batch_and_exits_without_waiting_out_the_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let mut sub = Subscriber::start(&broker);
    let spec = ConfigSpec {
        port: broker.tls_port,
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let mut config = spec.render();
    config.push_str(&format!(
        "\n[spool]\ndir = {}\n\n[delivery]\nshutdown_timeout = \"20s\"\n",
        toml_path(&dir.path().join("spool"))
    ));
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("write config");
    let path_arg = path.to_str().expect("utf-8 path").to_owned();
    let mut agent = spawn_agent(&[
        "simulate".into(),
        "--config".into(),
        path_arg.clone(),
        "--speed".into(),
        "1".into(),
        "--seed".into(),
        "9".into(),
    ]);
    // Stop in the middle of a batch (batches close every 10 readings, once a second).
    std::thread::sleep(Duration::from_millis(6450));
    send_signal(agent.pid(), "TERM");
    let stopped = Instant::now();
    let status = agent.wait_timeout(Duration::from_secs(30));
    let took = stopped.elapsed();
    let log = agent.stderr_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "a clean stop with everything acknowledged exits 0\n{}",
        tail(&log, 3000)
    );
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?} with shutdown_timeout = 20s: it should end once every PUBACK is in\n{}",
        tail(&log, 3000)
    );
    sub.sync();
    let mut records = Vec::new();
    for (_, payload) in sub.telemetry() {
        records.extend(
            check_message(&payload, PayloadMode::Records)
                .unwrap_or_else(|e| panic!("contract: {e}")),
        );
    }
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    let made: usize = log
        .lines()
        .rev()
        .find(|l| l.contains("summary: readings="))
        .and_then(|l| l.split("readings=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line\n{}", tail(&log, 3000)));
    assert!(
        !made.is_multiple_of(10),
        "the stop fell on a batch boundary ({made} readings): the test proves nothing"
    );
    assert_eq!(
        cov.distinct.len(),
        made,
        "every reading made before the stop arrives, the partial last batch included\n{}",
        tail(&log, 3000)
    );
    let stats = spool_stats(&path);
    assert_eq!(
        stats.num("unacked batches"),
        0,
        "nothing left for the next start:\n{}",
        stats.text
    );
}

/// `simulate` without `[spool]` runs on a spool of its own that goes with it: when the
/// broker is unreachable, what was not delivered is said to go with that spool (never
/// "kept for the next start"), and the run exits 3 (undelivered).
#[test]
fn simulate_without_a_spool_table_says_its_undelivered_batches_go_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    // A port nothing listens on: bind one, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let spec = ConfigSpec {
        port,
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let mut config = spec.render();
    config.push_str("\n[delivery]\nshutdown_timeout = \"1s\"\n");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("write config");
    let out = support::run_agent(
        &[
            "simulate",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--duration",
            "3s",
            "--speed",
            "max",
        ],
        Duration::from_secs(60),
    );
    let log = &out.stderr;
    assert_eq!(
        out.code(),
        Some(3),
        "undelivered: exit 3\n{}",
        tail(log, 3000)
    );
    assert!(
        log.contains("go with this run's temporary spool"),
        "it says the batches go with the temporary spool:\n{}",
        tail(log, 3000)
    );
    assert!(
        !log.contains("for the next start"),
        "a temporary spool keeps nothing for a next start:\n{}",
        tail(log, 3000)
    );
}
