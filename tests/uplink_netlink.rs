//! The agent uses the network the moment it comes back: in a network namespace of its own,
//! reaching the broker over a veth pair whose car-side end starts down, the agent backs off
//! (to at most 4 s); bringing the link up is a real rtnetlink event, and the agent must
//! reconnect at once instead of waiting out its backoff.
//!
//! Needs root and iproute2 (`ip netns`, veth), as CI has; it fails, never skips, without them.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::broker::Broker;
use support::certs::Pki;
use support::json::{PayloadMode, check_message};
use support::link::{LinkProxy, LinkSpec, TimedSubscriber};
use support::process::{Proc, poll, tail};
use support::{ConfigSpec, toml_path};

const HINT: &str = "this test needs root and iproute2 (apt-get install -y iproute2)";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip`: {e}; {HINT}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}; {HINT}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair: host end `10.213.N.1/30`, car
/// end `10.213.N.2/30` inside the namespace, created down.
struct Netns {
    name: String,
    host_if: String,
    host_addr: Ipv4Addr,
}

impl Netns {
    fn new() -> Netns {
        let n = std::process::id() % 250 + 1;
        let name = format!("rl-uplink-{}", std::process::id());
        let host_if = format!("rlh{}", std::process::id() % 100_000);
        let car_if = format!("rla{}", std::process::id() % 100_000);
        let host_addr = Ipv4Addr::new(10, 213, n as u8, 1);
        let car_addr = format!("10.213.{n}.2/30");
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            host_addr,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &car_if,
            "netns",
            &ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &car_addr, "dev", &car_if]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        // `ip netns exec` shows /etc/netns/NAME/hosts as /etc/hosts: `localhost` (the name
        // the broker's certificate carries) is the host end of the veth for the agent.
        let etc = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
        std::fs::write(etc.join("hosts"), format!("{host_addr} localhost\n"))
            .expect("write the namespace's hosts file");
        ns
    }

    fn car_link(&self, up: bool) {
        let car_if = format!("rla{}", std::process::id() % 100_000);
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            &car_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

#[test]
fn reconnects_the_moment_the_link_comes_up() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let proxy = LinkProxy::start_on(ns.host_addr, broker.tls_port, LinkSpec::default());
    let sub = TimedSubscriber::start(&broker);
    let spec = ConfigSpec {
        port: proxy.port(),
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let mut config = spec.render();
    config.push_str("reconnect_min = \"1s\"\nreconnect_max = \"60s\"\n");
    config.push_str(&format!(
        "\n[spool]\ndir = {}\n",
        toml_path(&dir.path().join("spool"))
    ));
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config).expect("write config");

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_redline-agent"))
        .args(["simulate", "--config"])
        .arg(&config_path)
        .args(["--duration", "40s", "--speed", "1", "--seed", "5"])
        .env("RUST_LOG", "info")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let mut agent = Proc::spawn("redline-agent (in a netns)", cmd);
    // Long enough for the backoff to reach its cap.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        proxy.connections(),
        0,
        "the agent reached the broker through a link that is down"
    );
    assert!(
        agent.stderr_text().contains("cannot reach"),
        "no failed attempt while the link was down:\n{}",
        tail(&agent.stderr_text(), 3000)
    );
    ns.car_link(true);
    let up = Instant::now();
    let gap = poll(Duration::from_secs(10), || {
        (proxy.connections() > 0).then(|| up.elapsed())
    });
    let log = agent.stderr_text();
    let Some(gap) = gap else {
        panic!(
            "no connection within 10 s of the link coming up\n{}",
            tail(&log, 3000)
        );
    };
    eprintln!(
        "connected {:.2} s after the link came up",
        gap.as_secs_f64()
    );
    assert!(
        log.contains("network changed: reconnecting without waiting out the backoff"),
        "the link came up and the agent did not hear of it (netlink):\n{}",
        tail(&log, 3000)
    );
    // At most the one-CONNECT-a-second spacing, plus a TLS handshake on a loaded machine.
    assert!(
        gap <= Duration::from_millis(1800),
        "connected {gap:?} after the link came up\n{}",
        tail(&log, 3000)
    );
    let status = agent.wait_timeout(Duration::from_secs(60));
    let log = agent.stderr_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        tail(&log, 3000)
    );
    let mut readings = std::collections::BTreeSet::new();
    for (_, topic, payload) in sub.messages() {
        if topic.starts_with("redline/telemetry/") {
            for r in check_message(&payload, PayloadMode::Records).unwrap_or_default() {
                readings.insert(r.timestamp);
            }
        }
    }
    assert_eq!(
        readings.len(),
        400,
        "every reading of the 40 s arrives, those of the outage included"
    );
}
