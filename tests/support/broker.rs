//! A real Mosquitto broker with mutual TLS, and a checking subscriber.
//!
//! See /work/shared/notes/mqtt-tls.md for why the config looks like this.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::certs::Pki;
use super::process::{Finished, Proc, poll, run, tail};

const INSTALL_HINT: &str = "apt-get install -y mosquitto mosquitto-clients";

/// Finds an executable on PATH or in the sbin directories (mosquitto lives in
/// /usr/sbin, which a normal user's PATH may lack). Never skips: panics.
pub fn find_exe(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in [
        "/usr/sbin",
        "/usr/local/sbin",
        "/sbin",
        "/usr/bin",
        "/usr/local/bin",
    ] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: {INSTALL_HINT}"))
}

/// Panics unless mosquitto, mosquitto_sub and mosquitto_pub are installed.
pub fn require_mosquitto() {
    for exe in ["mosquitto", "mosquitto_sub", "mosquitto_pub"] {
        find_exe(exe);
    }
}

/// A port that was free a moment ago (bind 127.0.0.1:0).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().unwrap().port();
    }
    ports
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A Mosquitto child process: a mutual-TLS listener and a plain, anonymous one
/// (for the checking subscriber), both on 127.0.0.1.
pub struct Broker {
    pub tls_port: u16,
    pub plain_port: u16,
    dir: PathBuf,
    conf: PathBuf,
    proc: Option<Proc>,
    /// stderr of instances already stopped.
    past_logs: String,
}

impl Broker {
    /// Starts a broker with fresh ports (retrying with other ports if one was taken).
    /// `persistence`: keep sessions (the subscriber's queue) across a restart.
    pub fn start(pki: &Pki, dir: &Path, persistence: bool) -> Broker {
        require_mosquitto();
        let mut last_err = String::new();
        for _ in 0..5 {
            let [tls_port, plain_port] = free_ports::<2>();
            let mut b = Broker {
                tls_port,
                plain_port,
                dir: dir.to_owned(),
                conf: dir.join("mosquitto.conf"),
                proc: None,
                past_logs: String::new(),
            };
            b.write_conf(pki, persistence);
            match b.launch() {
                Ok(()) => return b,
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("mosquitto failed to start:\n{e}"),
            }
        }
        panic!("mosquitto could not bind free ports:\n{last_err}")
    }

    fn write_conf(&self, pki: &Pki, persistence: bool) {
        let mut c = String::new();
        if running_as_root() {
            // Otherwise mosquitto drops to user `mosquitto` before reading the
            // certificates in our 0700 temp dir.
            c.push_str("user root\n");
        }
        c.push_str("per_listener_settings true\n");
        if persistence {
            let store = self.dir.join("mosquitto-db");
            std::fs::create_dir_all(&store).unwrap();
            c.push_str("persistence true\n");
            c.push_str(&format!("persistence_location {}/\n", store.display()));
        } else {
            c.push_str("persistence false\n");
        }
        c.push_str("log_dest stderr\n");
        c.push_str(&format!("listener {} 127.0.0.1\n", self.tls_port));
        c.push_str(&format!("cafile {}\n", pki.ca.display()));
        c.push_str(&format!("certfile {}\n", pki.server_cert.display()));
        c.push_str(&format!("keyfile {}\n", pki.server_key.display()));
        c.push_str("require_certificate true\n");
        c.push_str("use_identity_as_username true\n");
        c.push_str("allow_anonymous false\n");
        c.push_str(&format!("listener {} 127.0.0.1\n", self.plain_port));
        c.push_str("allow_anonymous true\n");
        std::fs::write(&self.conf, c).unwrap();
    }

    /// Starts mosquitto on the configured ports and waits until both accept TCP.
    fn launch(&mut self) -> Result<(), String> {
        assert!(self.proc.is_none(), "broker already running");
        let mut cmd = Command::new(find_exe("mosquitto"));
        cmd.arg("-c").arg(&self.conf);
        let mut p = Proc::spawn("mosquitto", cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = p.try_status() {
                let _ = p.wait_timeout(Duration::from_secs(1));
                return Err(format!(
                    "mosquitto exited ({status}) during startup; stderr:\n{}",
                    p.stderr_text()
                ));
            }
            if p.stderr_text().contains(" running")
                && accepts_tcp(self.tls_port)
                && accepts_tcp(self.plain_port)
            {
                self.proc = Some(p);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = p.stderr_text();
                p.terminate();
                panic!(
                    "mosquitto did not accept TCP on 127.0.0.1:{} and :{} within 10 s; stderr:\n{log}",
                    self.tls_port, self.plain_port
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the broker with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
            self.past_logs.push_str(&p.stderr_text());
        }
    }

    /// Starts the broker again on the same ports with the same config.
    pub fn start_again(&mut self) {
        if let Err(e) = self.launch() {
            panic!("mosquitto failed to restart on the same ports:\n{e}");
        }
    }

    /// The broker's whole log (all instances so far).
    pub fn log(&self) -> String {
        let mut s = self.past_logs.clone();
        if let Some(p) = &self.proc {
            s.push_str(&p.stderr_text());
        }
        s
    }

    /// How many TCP connections the TLS listener has accepted so far. Mosquitto logs a
    /// connection whose TLS handshake fails at once as "Client connection from ... failed"
    /// instead of "New connection from ... on port P".
    pub fn tls_connections(&self) -> usize {
        let needle = format!(" on port {}.", self.tls_port);
        self.log()
            .lines()
            .filter(|l| {
                (l.contains("New connection from") && l.contains(&needle))
                    || (l.contains("Client connection from") && l.contains(" failed"))
            })
            .count()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs mosquitto_pub with the given extra arguments (10 s limit).
pub fn mosquitto_pub(args: &[&str]) -> Finished {
    let mut cmd = Command::new(find_exe("mosquitto_pub"));
    cmd.args(args);
    run("mosquitto_pub", cmd, Duration::from_secs(10))
}

static SUBSCRIBERS: AtomicUsize = AtomicUsize::new(0);

/// `mosquitto_sub -v` on the plain listener, QoS 1, persistent session.
pub struct Subscriber {
    proc: Proc,
    port: u16,
    id: String,
    probes: usize,
}

impl Subscriber {
    /// Subscribes to `redline/#` and returns once a probe message has come back.
    pub fn start(broker: &Broker) -> Subscriber {
        let id = format!(
            "checker-{}-{}",
            std::process::id(),
            SUBSCRIBERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new(find_exe("mosquitto_sub"));
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(broker.plain_port.to_string())
            .args(["-q", "1", "-t", "redline/#", "-v", "-c", "-i"])
            .arg(&id);
        let mut s = Subscriber {
            proc: Proc::spawn("mosquitto_sub", cmd),
            port: broker.plain_port,
            id,
            probes: 0,
        };
        s.sync();
        s
    }

    /// Publishes a probe on the plain port and waits until the subscriber prints it:
    /// proves the subscription is live and everything published before has been seen.
    pub fn sync(&mut self) {
        self.probes += 1;
        let topic = format!("redline/probe/{}", self.id);
        let payload = format!("probe-{}", self.probes);
        let expected = format!("{topic} {payload}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.proc.try_status() {
                panic!(
                    "mosquitto_sub exited ({status}); stderr:\n{}",
                    self.proc.stderr_text()
                );
            }
            let port = self.port.to_string();
            let _ = mosquitto_pub(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                &topic,
                "-m",
                &payload,
            ]);
            let seen = poll(Duration::from_millis(700), || {
                self.proc.stdout_lines().contains(&expected).then_some(())
            });
            if seen.is_some() {
                return;
            }
        }
        panic!(
            "subscriber never received its probe on port {} within 10 s; stdout:\n{}\nstderr:\n{}",
            self.port,
            tail(&self.proc.stdout_text(), 2000),
            self.proc.stderr_text()
        );
    }

    /// All messages so far as (topic, payload), probes included.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.proc
            .stdout_lines()
            .into_iter()
            .map(|l| match l.split_once(' ') {
                Some((t, p)) => (t.to_owned(), p.to_owned()),
                None => (l, String::new()),
            })
            .collect()
    }

    /// Messages on any `redline/telemetry/...` topic.
    pub fn telemetry(&self) -> Vec<(String, String)> {
        self.messages()
            .into_iter()
            .filter(|(t, _)| t.starts_with("redline/telemetry/"))
            .collect()
    }

    /// The `timestamp` of every record received so far, sorted (duplicates kept).
    pub fn telemetry_timestamps(&self) -> Vec<i64> {
        let mut ts: Vec<i64> = self
            .telemetry()
            .iter()
            .flat_map(|(_, p)| {
                let v: serde_json::Value = serde_json::from_str(p).expect("telemetry is JSON");
                v["records"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|r| r["timestamp"].as_i64())
            })
            .collect();
        ts.sort_unstable();
        ts
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn stderr_text(&self) -> String {
        self.proc.stderr_text()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.proc.terminate();
    }
}
