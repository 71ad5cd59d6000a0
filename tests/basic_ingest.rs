//! AWS IoT Basic Ingest: a telemetry topic of `$aws/rules/RULE/…` is accepted and published
//! to as configured (the status topic stays a normal topic: retained messages and the last
//! will need the broker).

mod support;

use std::process::Command;
use std::time::Duration;

use support::broker::{Broker, find_exe};
use support::certs::Pki;
use support::json::{PayloadMode, check_message};
use support::process::{Proc, poll, tail};
use support::spool::run_agent_to_end;
use support::{ConfigSpec, toml_path};

const TOPIC: &str = "$aws/rules/redline_telemetry/redline/telemetry/GT3-TEST";

#[test]
fn telemetry_goes_to_the_basic_ingest_topic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    // `#` does not match topics that start with `$`: subscribe to the rule's topics.
    let mut sub_cmd = Command::new(find_exe("mosquitto_sub"));
    sub_cmd
        .args(["-h", "127.0.0.1", "-p"])
        .arg(broker.plain_port.to_string())
        .args(["-q", "1", "-v", "-t", "$aws/rules/#", "-t", "redline/#"]);
    let sub = Proc::spawn("mosquitto_sub", sub_cmd);
    std::thread::sleep(Duration::from_millis(500));
    let spec = ConfigSpec {
        port: broker.tls_port,
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let config = spec.render().replace(
        "topic = \"redline/telemetry/{vehicle_id}\"",
        "topic = \"$aws/rules/redline_telemetry/redline/telemetry/{vehicle_id}\"",
    );
    assert!(
        config.contains("$aws/rules/"),
        "the base config changed its topic line"
    );
    let config = format!(
        "{config}\n[spool]\ndir = {}\n",
        toml_path(&dir.path().join("spool"))
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("write config");
    let p = path.to_str().expect("utf-8 path").to_owned();

    let check = run_agent_to_end(
        &["check-config".into(), "--config".into(), p.clone()],
        Duration::from_secs(20),
    );
    assert_eq!(check.code(), Some(0), "{}", check.describe());

    let out = run_agent_to_end(
        &[
            "simulate".into(),
            "--config".into(),
            p,
            "--duration".into(),
            "3s".into(),
            "--speed".into(),
            "max".into(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let count = |sub: &Proc| -> usize {
        sub.stdout_lines()
            .iter()
            .filter(|l| l.starts_with(TOPIC))
            .filter_map(|l| l.split_once(' '))
            .map(|(_, payload)| {
                check_message(payload, PayloadMode::Records)
                    .unwrap_or_else(|e| panic!("contract: {e}"))
                    .len()
            })
            .sum()
    };
    let records = poll(Duration::from_secs(10), || {
        let n = count(&sub);
        (n >= 30).then_some(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every reading on {TOPIC}:\n{}",
            tail(&sub.stdout_text(), 2000)
        )
    });
    assert_eq!(records, 30, "3 s at 10 Hz on the Basic Ingest topic");
    assert!(
        sub.stdout_lines()
            .iter()
            .any(|l| l.starts_with("redline/status/GT3-TEST ")),
        "the status topic stays a normal topic"
    );
}
