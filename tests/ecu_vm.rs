//! The ECU in a box (issue 13): the Debian package on a real systemd, in a QEMU VM of the
//! target (`scripts/ecu-vm.sh`: Debian 12 arm64, `-M virt`, systemd as PID 1), publishing
//! over QEMU user networking to a real Mosquitto with mutual TLS on this machine.
//!
//! One VM, one disk, the scenarios in order (each timed, each a list of checks):
//!  1. boot to `running`; `apt install ./redline-agent_*.deb`: enabled, not started;
//!  2. the integrator's steps: certificates into /etc/redline-agent (key root:root 0600),
//!     agent.toml edited (vehicle, endpoint, CAN interface), `systemctl start`: READY
//!     (Type=notify), the STATUS line in `systemctl status`;
//!  3. readings: `redline-agent simulate --can vcan0` drives the bus, the records arrive at
//!     the broker in the documented schema with the bus's values;
//!  4. the sandbox on the running unit: `systemd-analyze security` <= 2.0, the key only
//!     through LoadCredential, the status file written;
//!  5. TLS reconnect across a broker restart, every reading of the outage delivered, one
//!     journal line per fault;
//!  6. a strict pass: the unit with every filtered system call killing (and audited) instead
//!     of EPERM, through CAN traffic, spool and status writes and a TLS reconnect;
//!  7. watchdog (SIGSTOP), 8. crash (kill -9), 9. upgrade (the package over itself while
//!     running), 10. power cut (QEMU killed with a backlog, booted again with a wrong RTC,
//!     the backlog re-sent, the readings of the untrusted clock held until
//!     `timedatectl set-ntp true`), 11. garage boot: GPS time, no NTP (`clock.gps` bound,
//!     NTP off, a power cut and a wrong RTC; `simulate --can vcan0` with its GPS receiver
//!     on the true time: the clock trusted from GPS time, the readings held before it and
//!     the live ones at the broker on the true time; NTP back takes over), 12. CPU cost on
//!     a live 2,000 frames/s bus next to `candump`, 13. clean stop; then the whole
//!     journal: no SECCOMP audit, no EPERM/EACCES.
//!
//! The clock in the VM comes from systemd-timesyncd, synchronised from an SNTP responder
//! this test runs on 127.0.0.1:123 (the host is 10.0.2.2 in the guest), as a car takes
//! its time from NTP: the shipped `clock.trust = "synced"` is what is tested; in the
//! garage boot (11) NTP is off and the time comes from GPS time on the CAN bus.
//!
//! Run by `scripts/ci-ecu.sh` (which installs what is needed and finds the .deb), as root:
//! `cargo test --features test-hooks --test ecu_vm -- --nocapture --exact ecu_in_a_box`. Not
//! in the plain test run (`test = false` in Cargo.toml) only because it needs the arm64 .deb
//! that `scripts/ci-package.sh` builds and about 7 minutes; it never skips: without the package, root, QEMU or the
//! image it fails and says how to get them. Env: `ECU_VM_ARCH` (arm64, or amd64),
//! `REDLINE_DEB_DIR` (default target/debian), `ECU_VM_KEEP` (keep the work dir).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::{self, PayloadMode};

const VEHICLE: &str = "GT3-ECU";
/// The unit's figures (systemd/redline-agent.service).
const WATCHDOG_SEC: u64 = 30;
const RESTART_SEC: u64 = 2;
const TIMEOUT_STOP_SEC: u64 = 15;
/// A reading is durable once its batch is closed (batch.max_age 1 s) and synced
/// (spool.sync_interval 1 s); plus the grid and the control channel's latency.
const DURABLE_MS: i64 = 2_500;
const MAX_EXPOSURE: f64 = 2.0;
/// The live-bus goals of the issue.
const CPU_RATIO_GOAL: f64 = 1.5;
const RSS_GOAL_KIB: u64 = 10 * 1024;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `ms` since the epoch as RFC 3339 UTC, to the millisecond (`simulate --start`).
fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| panic!("{ms} ms is not a time"))
}

// --- base64 (the control channel's framing) --------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// --- an SNTP server for the guest's systemd-timesyncd ----------------------------------

/// Answers SNTP requests on 127.0.0.1:123 with this machine's clock (stratum 1), for the
/// whole test process. The guest reaches it as 10.0.2.2:123.
fn sntp_server() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        // Another run of this test may still be ending: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        let sock = loop {
            match UdpSocket::bind("127.0.0.1:123") {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => break other,
            }
        };
        let sock = sock.unwrap_or_else(|e| {
            panic!(
                "cannot bind 127.0.0.1:123 for the guest's time server ({e}): run as root \
                 (CI does), and stop any NTP daemon listening on 127.0.0.1:123"
            )
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if n < 48 {
                    continue;
                }
                let ntp_now = || {
                    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                    let secs = d.as_secs() + 2_208_988_800;
                    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&(secs as u32).to_be_bytes());
                    b[4..].copy_from_slice(&(frac as u32).to_be_bytes());
                    b
                };
                let received = ntp_now();
                let version = (buf[0] >> 3) & 7;
                let mut r = [0u8; 48];
                r[0] = (version << 3) | 4; // no leap warning, server mode
                r[1] = 1; // stratum 1
                r[2] = buf[2]; // poll
                r[3] = 0xEC; // precision 2^-20
                r[8..12].copy_from_slice(&16u32.to_be_bytes()); // root dispersion ~0.25 ms
                r[12..16].copy_from_slice(b"GPS\0");
                r[16..24].copy_from_slice(&received); // reference
                r[24..32].copy_from_slice(&buf[40..48]); // originate = their transmit
                r[32..40].copy_from_slice(&received);
                r[40..48].copy_from_slice(&ntp_now());
                let _ = sock.send_to(&r, peer);
            }
        });
    });
}

// --- certificates for the broker at 10.0.2.2 -------------------------------------------

fn params(cn: &str, sans: Vec<String>) -> CertificateParams {
    let mut p = CertificateParams::new(sans).expect("subject alt names");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2099, 12, 31);
    p
}

/// A PKI whose server certificate names 10.0.2.2 (the host as the guest sees it), in
/// the shape `support::broker::Broker` takes.
fn pki(dir: &Path) -> Pki {
    let mut ca_params = params("redline ECU test CA", Vec::new());
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str, sans: Vec<String>, eku| {
        let mut p = params(cn, sans);
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        "10.0.2.2",
        vec!["10.0.2.2".into(), "127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(VEHICLE, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: w("ca.pem", &ca_pem),
        server_cert: w("server.pem", &server),
        server_key: w("server.key", &server_key),
        client_cert: w("client.pem", &client),
        client_key: w("client.key", &client_key),
        other_ca: dir.join("ca.pem"),
        other_client_cert: dir.join("client.pem"),
        other_client_key: dir.join("client.key"),
    }
}

// --- the VM and its control channel -----------------------------------------------------

struct Out {
    rc: i32,
    text: String,
}

impl Out {
    /// `key=value` lines (systemctl show, and our own echo lines).
    fn props(&self) -> HashMap<String, String> {
        self.text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    fn prop(&self, key: &str) -> String {
        self.props().get(key).cloned().unwrap_or_default()
    }
}

struct Vm {
    arch: String,
    dir: PathBuf,
    disk: PathBuf,
    files: PathBuf,
    /// The host end of the guest's USB-serial adapter (/dev/ttyUSB0).
    serial: PathBuf,
    listener: TcpListener,
    qemu: Option<Child>,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
    boots: usize,
    next_id: u64,
}

impl Vm {
    fn script() -> PathBuf {
        repo().join("scripts/ecu-vm.sh")
    }

    /// Builds (or finds) the cached image and makes a fresh disk from it.
    fn new(arch: &str, dir: &Path, files: PathBuf) -> Vm {
        let disk = dir.join("disk.img");
        let t = Instant::now();
        let out = Command::new(Self::script())
            .args(["disk", arch])
            .arg(&disk)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/ecu-vm.sh");
        assert!(
            out.status.success(),
            "scripts/ecu-vm.sh disk {arch} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "ecu_vm: image and disk ready in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Vm {
            arch: arch.to_owned(),
            dir: dir.to_owned(),
            disk,
            files,
            serial: dir.join("serial.sock"),
            listener,
            qemu: None,
            conn: None,
            boots: 0,
            next_id: 0,
        }
    }

    fn console(&self) -> PathBuf {
        self.dir.join(format!("console-{}.log", self.boots))
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.console()).unwrap_or_default();
        support::process::tail(&text, 4000).to_owned()
    }

    /// Boots the disk and waits for the guest's control channel; returns the HELLO fields
    /// (boot id, uptime, `systemctl is-system-running`) and the seconds since qemu started.
    fn boot(&mut self, rtc: Option<&str>) -> (Vec<String>, f64) {
        assert!(self.qemu.is_none(), "already running");
        self.boots += 1;
        let log = std::fs::File::create(self.console()).unwrap();
        let port = self.listener.local_addr().unwrap().port().to_string();
        let mut cmd = Command::new(Self::script());
        cmd.args(["boot", &self.arch])
            .arg(&self.disk)
            .arg("-f")
            .arg(&self.files)
            .args(["-p", &port])
            .arg("-s")
            .arg(&self.serial)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(rtc) = rtc {
            cmd.env("ECU_VM_RTC", rtc);
        }
        let t0 = Instant::now();
        self.qemu = Some(cmd.spawn().expect("start scripts/ecu-vm.sh boot"));
        self.listener.set_nonblocking(true).unwrap();
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(st) = self.qemu.as_mut().unwrap().try_wait().unwrap() {
                        self.qemu = None;
                        panic!(
                            "qemu exited ({st}) before the guest called back; console:\n{}",
                            self.console_tail()
                        );
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(300),
                        "the guest did not call back within 300 s; console:\n{}",
                        self.console_tail()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut hello = String::new();
        reader.read_line(&mut hello).expect("read HELLO");
        let fields: Vec<String> = hello.split_whitespace().map(str::to_owned).collect();
        assert_eq!(
            fields.first().map(String::as_str),
            Some("HELLO"),
            "bad greeting {hello:?}"
        );
        self.conn = Some((reader, stream));
        (fields[1..].to_vec(), t0.elapsed().as_secs_f64())
    }

    /// Runs a bash script in the guest as root; its rc and output (stdout and stderr).
    fn run(&mut self, script: &str, timeout: Duration) -> Out {
        self.next_id += 1;
        let id = self.next_id;
        let console = self.console_tail();
        let (reader, stream) = self
            .conn
            .as_mut()
            .expect("no control connection (VM not booted)");
        stream
            .write_all(format!("RUN {id} {}\n", b64_encode(script.as_bytes())).as_bytes())
            .expect("send to the guest");
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            other => panic!(
                "no answer from the guest within {timeout:?} ({other:?}) to:\n{script}\nconsole:\n{console}"
            ),
        }
        let mut it = line.trim_end().splitn(4, ' ');
        let (verb, got, rc, body) = (it.next(), it.next(), it.next(), it.next().unwrap_or(""));
        assert_eq!(verb, Some("DONE"), "bad answer {line:?}");
        assert_eq!(
            got,
            Some(id.to_string().as_str()),
            "answer to another command"
        );
        Out {
            rc: rc.and_then(|r| r.parse().ok()).unwrap_or(-1),
            text: String::from_utf8_lossy(&b64_decode(body)).into_owned(),
        }
    }

    /// `run` with a 2-minute limit.
    fn sh(&mut self, script: &str) -> Out {
        self.run(script, Duration::from_secs(120))
    }

    /// Kills qemu (SIGKILL): the power is cut, the disk keeps what was written.
    fn power_cut(&mut self) {
        self.conn = None;
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
    }
}

// --- a sensor board on the USB-serial adapter --------------------------------------------

/// Values the serial "sensor board" sends, as NMEA-style `$RDLTM` sentences (the format of
/// config/agent.toml's serial example).
const SERIAL_VALUES: [f64; 4] = [612.5, 601.0, 6500.0, 98.5];

fn nmea(values: &[f64; 4]) -> String {
    let body = format!(
        "RDLTM,{:.1},{:.1},{},{:.1}",
        values[0], values[1], values[2] as i64, values[3]
    );
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

/// Writes a sentence every 100 ms into QEMU's end of the adapter until dropped, and reads
/// (and drops) whatever the guest writes to the tty: a tty echoes what it receives until
/// its reader turns echo off, and QEMU's usb-serial blocks its whole main loop (the
/// guest's network included) once a socket peer stops reading.
struct SerialFeed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stream: std::os::unix::net::UnixStream,
}

impl SerialFeed {
    fn start(socket: &Path) -> SerialFeed {
        let stream = std::os::unix::net::UnixStream::connect(socket).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the VM's serial socket {}: {e}",
                socket.display()
            )
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let line = nmea(&SERIAL_VALUES);
        let mut writer = stream.try_clone().unwrap();
        let mut reader = stream.try_clone().unwrap();
        let threads = vec![
            std::thread::spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    if writer.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }),
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(std::io::Read::read(&mut reader, &mut buf), Ok(n) if n > 0) {}
            }),
        ];
        SerialFeed {
            stop,
            threads,
            stream,
        }
    }
}

impl Drop for SerialFeed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// --- what arrived at the broker ---------------------------------------------------------

#[derive(Clone, Debug)]
struct Rec {
    vehicle: String,
    /// brake_disc_temp_fl, brake_disc_temp_fr, engine_rpm, engine_oil_temp
    values: [Option<f64>; 4],
}

impl Rec {
    fn all_values(&self) -> bool {
        self.values.iter().all(Option::is_some)
    }
}

#[derive(Default)]
struct Seen {
    /// distinct readings by timestamp
    by_ts: BTreeMap<i64, Rec>,
    messages: usize,
    /// schema violations (first few), and how many messages had one
    schema: Vec<String>,
    schema_bad: usize,
}

impl Seen {
    fn of(sub: &Subscriber) -> Seen {
        let mut s = Seen::default();
        for (topic, payload) in sub.telemetry() {
            if topic != format!("redline/telemetry/{VEHICLE}") {
                s.schema
                    .push(format!("telemetry on an unexpected topic {topic}"));
                continue;
            }
            s.messages += 1;
            if let Err(e) = json::check_message(&payload, PayloadMode::Records) {
                s.schema_bad += 1;
                if s.schema.len() < 3 {
                    s.schema.push(e);
                }
            }
            // Leniently, so that one schema fault does not hide every other check.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&payload) else {
                continue;
            };
            for r in v["records"].as_array().into_iter().flatten() {
                let Some(ts) = r["timestamp"].as_i64() else {
                    continue;
                };
                let values = [
                    "brake_disc_temp_fl",
                    "brake_disc_temp_fr",
                    "engine_rpm",
                    "engine_oil_temp",
                ]
                .map(|k| r[k].as_f64());
                s.by_ts.insert(
                    ts,
                    Rec {
                        vehicle: r["vehicle_id"].as_str().unwrap_or("").to_owned(),
                        values,
                    },
                );
            }
        }
        s
    }

    /// Grid ticks (whole 100 ms) in [from, to] with no reading.
    fn missing(&self, from_ms: i64, to_ms: i64) -> Vec<i64> {
        let first = (from_ms + 99).div_euclid(100) * 100;
        (0..)
            .map(|k| first + 100 * k)
            .take_while(|t| *t <= to_ms)
            .filter(|t| !self.by_ts.contains_key(t))
            .collect()
    }
}

fn describe_missing(m: &[i64]) -> String {
    let head: Vec<String> = m.iter().take(8).map(i64::to_string).collect();
    format!("{} tick(s) missing, first {}", m.len(), head.join(", "))
}

/// Waits until every tick in [from, to] has arrived; the ticks still missing otherwise.
/// Gives up early when only short runs of ticks (see `Gaps`) have been missing, unchanged,
/// for 15 s: ticks that were never sampled do not come later.
fn wait_delivered(sub: &Subscriber, from_ms: i64, to_ms: i64, timeout: Duration) -> Vec<i64> {
    let mut wait = Settle::new(timeout);
    loop {
        let missing = Seen::of(sub).missing(from_ms, to_ms);
        if wait.done(&missing) {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// When to stop waiting for missing ticks: none missing, the deadline, or only short runs
/// left and unchanged for 15 s.
struct Settle {
    deadline: Instant,
    last: Vec<i64>,
    since: Instant,
}

impl Settle {
    fn new(timeout: Duration) -> Settle {
        Settle {
            deadline: Instant::now() + timeout,
            last: Vec::new(),
            since: Instant::now(),
        }
    }

    fn done(&mut self, missing: &[i64]) -> bool {
        if missing != self.last.as_slice() {
            self.last = missing.to_vec();
            self.since = Instant::now();
        }
        let short_only = !missing.is_empty() && Gaps::default().judge("", missing).is_empty();
        missing.is_empty()
            || Instant::now() >= self.deadline
            || (short_only && self.since.elapsed() >= Duration::from_secs(15))
    }
}

// --- the scenarios ----------------------------------------------------------------------

/// What the garage-boot scenario (GPS time, no NTP) gathers while the simulated car runs.
#[derive(Default)]
struct GarageGps {
    /// The journal's "clock trusted from GPS time" line (`-o short-unix`), if any.
    line: String,
    /// Whether /run/systemd/timesync/synchronized existed when that line was found.
    synced_at_trust: String,
    /// The quickest round trip of the control channel (ms), from which the two below.
    rtt: i64,
    /// This machine's clock minus the guest's wall clock (ms).
    host_minus_guest: i64,
    /// This machine's clock at the guest's boot-clock zero (ms).
    host_at_boot: i64,
    /// The end of the simulated car's run (its log, and whether NTP had synchronised).
    sim: String,
    /// The readings of the boot: the first, and the ticks missing from it to `end`.
    first: Option<i64>,
    end: i64,
    missing: Vec<i64>,
    /// When each reading was first seen at the broker (this machine's clock, ms).
    seen_at: BTreeMap<i64, i64>,
}

impl GarageGps {
    /// Reads the guest's wall and boot clocks against this machine's; keeps the reading
    /// with the quickest round trip.
    fn probe_clocks(&mut self, vm: &mut Vm) {
        let before = now_ms();
        // Both clocks read by bash itself, microseconds apart (no process started).
        let j =
            vm.sh("read -r up _ < /proc/uptime; echo \"wall=$EPOCHREALTIME\"; echo \"uptime=$up\"");
        let after = now_ms();
        if let (Ok(wall), Ok(up)) = (
            j.prop("wall").parse::<f64>(),
            j.prop("uptime").parse::<f64>(),
        ) && after - before < self.rtt
        {
            self.rtt = after - before;
            self.host_minus_guest = (before + after) / 2 - (wall * 1000.0).round() as i64;
            self.host_at_boot = (before + after) / 2 - (up * 1000.0).round() as i64;
        }
    }

    /// How late the GpsTime frames candump kept were on the bus against their UtcTime, on
    /// this machine's clock (ms): `(sec.usec) vcan0 18FEE61C#<IEEE double, Intel>`.
    fn receiver_lags(&self) -> Vec<i64> {
        let mut lags: Vec<i64> = self
            .sim
            .lines()
            .filter_map(|l| {
                let (stamp, rest) = l.strip_prefix('(')?.split_once(')')?;
                let hex = rest.split_once("18FEE61C#")?.1.trim();
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect::<Option<_>>()?;
                let utc = f64::from_le_bytes(bytes.try_into().ok()?);
                let heard = stamp.parse::<f64>().ok()? * 1000.0;
                Some((heard - utc * 1000.0).round() as i64 + self.host_minus_guest)
            })
            .collect();
        lags.sort_unstable();
        lags
    }
}

struct Report {
    problems: Vec<String>,
    times: Vec<(String, f64)>,
    figures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("ecu_vm: PROBLEM: {w}");
            self.problems.push(w);
        }
    }
    fn time(&mut self, what: &str, since: Instant) {
        let s = since.elapsed().as_secs_f64();
        eprintln!("ecu_vm: {what}: {s:.1}s");
        self.times.push((what.to_owned(), s));
    }
    fn figure(&mut self, f: String) {
        eprintln!("ecu_vm: {f}");
        self.figures.push(f);
    }
}

fn find_deb(arch: &str) -> PathBuf {
    let dir = std::env::var_os("REDLINE_DEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debian"));
    let suffix = format!("_{arch}.deb");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("redline-agent_") && n.ends_with(&suffix))
        })
        .unwrap_or_else(|| {
            panic!(
                "no redline-agent_*{suffix} in {}: build it with scripts/ci-aarch64.sh then \
                 scripts/ci-package.sh (as root on Debian 12), or point REDLINE_DEB_DIR at it",
                dir.display()
            )
        })
}

const MAIN_PID: &str = "systemctl show -p MainPID --value redline-agent";

/// Ticks with no reading, judged. The sampler never back-fills a tick it could not take
/// in time (a starved process under emulation): it counts it as `ticks_missed` (README,
/// "What it sends"). So a short run of missing ticks (at most 3, 300 ms) is set aside and
/// must, at the end, be covered by what the agents counted as missed; a longer run is a
/// loss at once (the spool's unit of loss is a batch of up to 10 readings).
#[derive(Default)]
struct Gaps {
    /// (where, tick) of the short runs set aside
    short: Vec<(String, i64)>,
    /// the largest `ticks_missed` each agent process (by main PID) reported
    missed: HashMap<String, u64>,
}

impl Gaps {
    /// The ticks of `missing` that are a loss; the short runs are kept for the accounting.
    fn judge(&mut self, what: &str, missing: &[i64]) -> Vec<i64> {
        let mut lost = Vec::new();
        let mut run: Vec<i64> = Vec::new();
        let mut flush = |run: &mut Vec<i64>, short: &mut Vec<(String, i64)>| {
            if run.len() <= 3 {
                short.extend(run.iter().map(|t| (what.to_owned(), *t)));
            } else {
                lost.extend(run.iter().copied());
            }
            run.clear();
        };
        for &t in missing {
            if run.last().is_some_and(|l| t != l + 100) {
                flush(&mut run, &mut self.short);
            }
            run.push(t);
        }
        if !run.is_empty() {
            flush(&mut run, &mut self.short);
        }
        lost
    }

    /// Records the running agent's `ticks_missed` (from its status file, rewritten every
    /// 5 s); called before every stop, restart or kill of the agent and at the end.
    fn note(&mut self, vm: &mut Vm) {
        let out = vm.sh(&format!(
            "echo \"pid=$({MAIN_PID})\"; redline-agent status --json --config /etc/redline-agent/agent.toml 2>/dev/null | grep -o '\"ticks_missed\": *[0-9]*' | head -n 1 | sed 's/.*: */missed=/'"
        ));
        if let Ok(n) = out.prop("missed").parse::<u64>() {
            self.add(format!("{}:{}", vm.boots, out.prop("pid")), n);
        }
    }

    fn add(&mut self, process: String, n: u64) {
        let e = self.missed.entry(process).or_default();
        *e = (*e).max(n);
    }

    /// Adds the exact counts of the exit summaries (`ticks_missed=N`) of every agent that
    /// stopped cleanly, in this boot and the one before.
    fn note_summaries(&mut self, vm: &mut Vm) {
        for back in 0..vm.boots.min(2) {
            let out = vm.sh(&format!(
                "journalctl -b -{back} -u redline-agent -o short-unix --no-pager | \
                 sed -n 's/.*redline-agent\\[\\([0-9]*\\)\\]:.*ticks_missed=\\([0-9]*\\).*/\\1 \\2/p'"
            ));
            for line in out.text.lines() {
                if let Some((pid, n)) = line.split_once(' ')
                    && let Ok(n) = n.trim().parse()
                {
                    self.add(format!("{}:{pid}", vm.boots - back), n);
                }
            }
        }
    }

    fn counted(&self) -> u64 {
        self.missed.values().sum()
    }
}

/// Waits (in the guest) until the unit is active with a main PID other than `old`.
fn wait_new_pid(old: &str, limit_s: u64) -> String {
    format!(
        r#"t0=$(date +%s%N)
for i in $(seq 1 {n}); do
  p=$({MAIN_PID}); s=$(systemctl is-active redline-agent)
  if [ "$p" != 0 ] && [ "$p" != "{old}" ] && [ "$s" = active ]; then break; fi
  sleep 0.2
done
echo "pid=$({MAIN_PID})"; echo "state=$(systemctl is-active redline-agent)"
echo "elapsed_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
systemctl show -p NRestarts,Result,StatusText redline-agent"#,
        n = limit_s * 5
    )
}

/// What both tests start from: the integrator's files in a tar (the package, the CA, the
/// device certificate and key), the broker with mutual TLS and a checking subscriber on
/// this machine, the guest's time server, and the VM on a fresh disk.
struct Bench {
    work: tempfile::TempDir,
    broker: Broker,
    sub: Subscriber,
    vm: Vm,
    deb_name: String,
}

impl Bench {
    fn new(arch: &str) -> Bench {
        let deb = find_deb(arch);
        sntp_server();
        let work = tempfile::Builder::new()
            .prefix("ecu-vm-test.")
            .tempdir()
            .unwrap();
        let dir = work.path().to_owned();
        let pki = pki(&dir);
        let files = dir.join("files");
        std::fs::create_dir(&files).unwrap();
        let deb_name = deb.file_name().unwrap().to_str().unwrap().to_owned();
        std::fs::copy(&deb, files.join(&deb_name)).unwrap();
        std::fs::copy(&pki.ca, files.join("ca.pem")).unwrap();
        std::fs::copy(&pki.client_cert, files.join("client.pem")).unwrap();
        std::fs::copy(&pki.client_key, files.join("client.key")).unwrap();
        let tar = dir.join("files.tar");
        let st = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&files)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success(), "tar of the guest's files failed");
        let broker_dir = dir.join("broker");
        std::fs::create_dir(&broker_dir).unwrap();
        let broker = Broker::start(&pki, &broker_dir, true);
        let sub = Subscriber::start(&broker);
        let vm = Vm::new(arch, &dir, tar);
        Bench {
            work,
            broker,
            sub,
            vm,
            deb_name,
        }
    }
}

/// `apt install` of the package from the files disk, as an integrator would.
fn install_script(deb_name: &str) -> String {
    format!(
        r#"set -e
mkdir -p /root/files && tar -xf /dev/disk/by-id/virtio-files -C /root/files
cd /root/files
DEBIAN_FRONTEND=noninteractive apt install -y ./{deb_name} 2>&1 | tail -n 15
echo "enabled=$(systemctl is-enabled redline-agent)"
echo "active=$(systemctl is-active redline-agent || true)"
echo "groups=$(id -nG redline-agent)""#
    )
}

/// The README's steps on the ECU: certificates and key into /etc/redline-agent, agent.toml
/// edited (vehicle, endpoint, port, CAN interface; the rest as shipped) and checked; then
/// the clock synchronised by systemd-timesyncd (the shipped `clock.trust = "synced"`).
fn configure_script(port: u16) -> String {
    format!(
        r#"set -e
cd /etc/redline-agent
install -m 0644 -o root -g root /root/files/ca.pem AmazonRootCA1.pem
install -m 0644 -o root -g root /root/files/client.pem device.pem.crt
install -m 0600 -o root -g root /root/files/client.key private.pem.key
sed -i -e 's/^id = "GT3-RACER-01"/id = "{VEHICLE}"/' -e 's/^interface = "can0"/interface = "vcan0"/' \
  -e 's/^endpoint = .*/endpoint = "10.0.2.2"/' -e 's/^port = 8883/port = {port}/' agent.toml
for want in 'id = "{VEHICLE}"' 'interface = "vcan0"' 'endpoint = "10.0.2.2"' 'port = {port}' 'trust = "synced"'; do
  grep -q "^$want" agent.toml || {{ echo "agent.toml has no line '$want' after editing"; exit 1; }}
done
redline-agent check-config --config /etc/redline-agent/agent.toml > /dev/null
for i in $(seq 1 240); do [ -e /run/systemd/timesync/synchronized ] && break; sleep 0.5; done
[ -e /run/systemd/timesync/synchronized ] || {{ echo "systemd-timesyncd did not synchronise from 10.0.2.2"; timedatectl timesync-status; exit 1; }}
echo "guest_ms=$(( $(date +%s%N) / 1000000 ))""#
    )
}

const START_SCRIPT: &str = r#"t0=$(date +%s%N); systemctl start redline-agent; rc=$?
echo "start_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
systemctl show -p ActiveState,SubState,StatusText,MainPID,NRestarts,Type redline-agent
systemctl status --no-pager redline-agent | head -n 12
exit $rc"#;

#[test]
fn ecu_in_a_box() {
    let arch = std::env::var("ECU_VM_ARCH").unwrap_or_else(|_| "arm64".to_owned());
    let t_all = Instant::now();
    let t_begin = now_ms();
    let mut rep = Report {
        problems: Vec::new(),
        times: Vec::new(),
        figures: Vec::new(),
    };
    let t = Instant::now();
    let Bench {
        work,
        mut broker,
        sub,
        mut vm,
        deb_name,
    } = Bench::new(&arch);
    rep.time("image (cached or built) and a fresh disk", t);
    let mut gaps = Gaps::default();

    // 1. Boot and install ------------------------------------------------------------------
    let t = Instant::now();
    let (hello, secs) = vm.boot(None);
    let up = vm.run(
        "systemctl is-system-running --wait; systemd-analyze | head -n1",
        Duration::from_secs(180),
    );
    rep.time("boot 1 (qemu start to the control channel)", t);
    rep.figure(format!(
        "boot 1: guest called back after {secs:.1}s (uptime {}); {}",
        hello.get(1).map_or("?", String::as_str),
        up.text.trim().replace('\n', "; ")
    ));
    rep.check(up.text.starts_with("running"), || {
        format!("system not `running` after boot:\n{}", up.text)
    });
    if !up.text.starts_with("running") {
        let failed =
            vm.sh("systemctl --failed --no-pager; journalctl -b -p err --no-pager | tail -n 30");
        eprintln!("{}", failed.text);
    }

    let t = Instant::now();
    let inst = vm.run(&install_script(&deb_name), Duration::from_secs(300));
    rep.time("apt install ./redline-agent.deb", t);
    assert_eq!(inst.rc, 0, "apt install failed:\n{}", inst.text);
    rep.check(inst.prop("enabled") == "enabled", || {
        format!("the unit is not enabled after install:\n{}", inst.text)
    });
    rep.check(inst.prop("active") == "inactive", || {
        format!("the package started the service on install:\n{}", inst.text)
    });
    rep.check(
        inst.prop("groups").split(' ').any(|g| g == "dialout"),
        || format!("redline-agent is not in dialout:\n{}", inst.text),
    );

    // 2. The integrator's steps, READY ---------------------------------------------------------
    let t = Instant::now();
    let port = broker.tls_port;
    let conf = vm.sh(&configure_script(port));
    assert_eq!(conf.rc, 0, "configuring the agent failed:\n{}", conf.text);
    let skew = conf.prop("guest_ms").parse::<i64>().unwrap_or(0) - now_ms();
    rep.figure(format!(
        "guest clock after timesyncd: {skew} ms from the host's"
    ));
    rep.check(skew.abs() < 2_000, || {
        format!("the guest clock is {skew} ms off the host's after synchronising")
    });

    let start = vm.sh(START_SCRIPT);
    rep.time("configure and systemctl start (to READY)", t);
    rep.figure(format!(
        "systemctl start returned after READY in {} ms",
        start.prop("start_ms")
    ));
    rep.check(start.rc == 0, || {
        format!("systemctl start failed:\n{}", start.text)
    });
    rep.check(
        start.prop("ActiveState") == "active" && start.prop("SubState") == "running",
        || format!("not active/running after start:\n{}", start.text),
    );
    rep.check(!start.prop("StatusText").is_empty(), || {
        format!("no STATUS= text after READY:\n{}", start.text)
    });
    rep.check(start.text.contains("Status: \""), || {
        format!("systemctl status shows no Status line:\n{}", start.text)
    });

    // 3. Readings from vcan0 at the broker ------------------------------------------------------
    let t = Instant::now();
    let sim_from = now_ms() + 1_000;
    vm.sh("redline-agent simulate --can vcan0 --duration 12s > /run/simulate.log 2>&1 &");
    let sim_to = sim_from + 10_000;
    let missing = wait_delivered(&sub, sim_from, sim_to, Duration::from_secs(60));
    rep.time("readings from vcan0 at the broker", t);
    let missing = gaps.judge("simulate window", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "readings of the simulate window not delivered: {}",
            describe_missing(&missing)
        )
    });
    let seen = Seen::of(&sub);
    let window: Vec<&Rec> = seen
        .by_ts
        .range(sim_from..=sim_to)
        .map(|(_, r)| r)
        .collect();
    let full = window.iter().filter(|r| r.all_values()).count();
    rep.figure(format!(
        "readings: {} message(s), {} reading(s) so far; in the simulate window {} of {} carry all four values",
        seen.messages,
        seen.by_ts.len(),
        full,
        window.len()
    ));
    rep.check(full * 2 >= window.len() && full > 0, || {
        format!(
            "only {full} of {} readings in the simulate window carry all four values from the bus",
            window.len()
        )
    });
    rep.check(window.iter().all(|r| r.vehicle == VEHICLE), || {
        "a reading with another vehicle_id".to_owned()
    });
    rep.check(seen.schema.is_empty(), || {
        format!(
            "{} of {} message(s) break the documented schema (README \"What it sends\"), e.g.: {}",
            seen.schema_bad,
            seen.messages,
            seen.schema.join(" | ")
        )
    });

    // 4. The sandbox of the running unit ------------------------------------------------------
    let t = Instant::now();
    let sb = vm.sh(&format!(
        r#"PID=$({MAIN_PID})
echo "uid=$(awk '/^Uid:/ {{print $2}}' /proc/$PID/status)"; echo "agent_uid=$(id -u redline-agent)"
echo "key=$(stat -c '%U:%G %a' /etc/redline-agent/private.pem.key)"
if runuser -u redline-agent -- cat /etc/redline-agent/private.pem.key > /dev/null 2> /run/key.err; then
  echo "user_reads_key=yes"; else echo "user_reads_key=no ($(cat /run/key.err))"; fi
echo "credentials_env=$(tr '\0' '\n' < /proc/$PID/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p')"
c=/run/credentials/redline-agent.service/mqtt.key
echo "credential=$(stat -c '%U:%G %a' $c 2>&1)"
cmp -s $c /etc/redline-agent/private.pem.key && echo "credential_is_key=yes"
echo "exposure=$(systemd-analyze security --no-pager redline-agent | sed -n 's/.*Overall exposure level for redline-agent.service: \([0-9.]*\).*/\1/p')"
sleep 2
echo "status_file=$(stat -c '%U %a %Y' /run/redline-agent/status.json 2>&1)"; echo "now=$(date +%s)"
redline-agent status --config /etc/redline-agent/agent.toml > /run/status.out 2>&1; echo "status_rc=$?"; head -n 3 /run/status.out"#
    ));
    rep.time("sandbox checks", t);
    rep.figure(format!(
        "systemd-analyze security redline-agent (running): {}",
        sb.prop("exposure")
    ));
    let exposure: f64 = sb.prop("exposure").parse().unwrap_or(99.0);
    rep.check(exposure <= MAX_EXPOSURE, || {
        format!("exposure {exposure} above {MAX_EXPOSURE}:\n{}", sb.text)
    });
    rep.check(
        sb.prop("uid") == sb.prop("agent_uid") && !sb.prop("uid").is_empty(),
        || format!("the agent does not run as redline-agent:\n{}", sb.text),
    );
    rep.check(sb.prop("key") == "root:root 600", || {
        format!("the key file is not root:root 0600:\n{}", sb.text)
    });
    rep.check(sb.prop("user_reads_key").starts_with("no"), || {
        format!(
            "the service user can read the key file in /etc:\n{}",
            sb.text
        )
    });
    rep.check(
        sb.prop("credentials_env") == "/run/credentials/redline-agent.service"
            && sb.text.contains("credential_is_key=yes"),
        || {
            format!(
                "the key does not reach the agent through LoadCredential:\n{}",
                sb.text
            )
        },
    );
    let fresh = {
        let file = sb.prop("status_file");
        let f: Vec<&str> = file.split(' ').collect();
        let now: i64 = sb.prop("now").parse().unwrap_or(0);
        f.len() == 3 && f[0] == "redline-agent" && f[2].parse::<i64>().is_ok_and(|m| now - m < 30)
    };
    rep.check(fresh && sb.prop("status_rc") == "0", || {
        format!(
            "the status file /run/redline-agent/status.json (agent.toml status.file) is not written \
             by the service, or `redline-agent status` cannot read it:\n{}",
            sb.text
        )
    });

    // 5. TLS reconnect across a broker restart; the journal of the outage --------------------
    let t = Instant::now();
    let before = vm.sh("date +%s").text.trim().to_owned();
    let down_from = now_ms();
    broker.stop();
    std::thread::sleep(Duration::from_secs(8));
    broker.start_again();
    let up_at = now_ms();
    let missing = wait_delivered(
        &sub,
        down_from - 1_000,
        up_at + 2_000,
        Duration::from_secs(90),
    );
    rep.time("broker restart: reconnect and the outage's readings", t);
    let missing = gaps.judge("broker outage", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "readings of the broker outage not delivered after the reconnect: {}",
            describe_missing(&missing)
        )
    });
    let j = vm.sh(&format!(
        "journalctl -u redline-agent -o cat --no-pager --since @{before} | grep -E ' (WARN|ERROR) ' || true"
    ));
    let lines = j.text.lines().filter(|l| !l.trim().is_empty()).count();
    rep.figure(format!(
        "journal of an 8 s broker outage: {lines} WARN/ERROR line(s)"
    ));
    rep.check((1..=3).contains(&lines), || {
        format!(
            "want one clear line per fault (1 to 3 WARN/ERROR lines for one outage), got {lines}:\n{}",
            j.text
        )
    });

    // 6. Strict pass: every filtered system call kills and is audited ------------------------
    let t = Instant::now();
    gaps.note(&mut vm);
    let strict = vm.sh(r#"mkdir -p /run/systemd/system/redline-agent.service.d
cat > /run/systemd/system/redline-agent.service.d/zz-strict-seccomp.conf <<'EOF'
# ecu_vm: a filtered system call kills the agent (SIGSYS, audited as SECCOMP) instead of
# failing with EPERM. adjtimex/clock_adjtime stay EPERM: ProtectClock=yes denies them on
# purpose and the agent then reads systemd-timesyncd's flag (see the unit).
[Service]
SystemCallErrorNumber=
SystemCallFilter=~adjtimex:EPERM clock_adjtime:EPERM
EOF
systemctl daemon-reload && systemctl restart redline-agent
echo "errno=$(systemctl show -p SystemCallErrorNumber --value redline-agent)"
systemctl show -p NRestarts redline-agent"#);
    rep.check(strict.rc == 0 && strict.prop("errno") != "1", || {
        format!("could not apply the strict filter:\n{}", strict.text)
    });
    vm.sh(
        "(cangen vcan0 -I 100 -L 8 -g 5 -n 2000; cangen vcan0 -I 300 -L 8 -g 5 -n 1000) > /dev/null 2>&1 &
redline-agent simulate --can vcan0 --duration 20s > /run/simulate2.log 2>&1 &",
    );
    std::thread::sleep(Duration::from_secs(5));
    let down_from = now_ms();
    broker.stop();
    std::thread::sleep(Duration::from_secs(4));
    broker.start_again();
    let up_at = now_ms();
    let missing = wait_delivered(
        &sub,
        down_from - 1_000,
        up_at + 2_000,
        Duration::from_secs(90),
    );
    // The serial source on the USB-serial adapter, still under the strict filter: the
    // integrator switches agent.toml to the sensor board (by its /dev/serial/by-id name).
    gaps.note(&mut vm);
    let feed = SerialFeed::start(&vm.serial);
    let ser = vm.sh(
        r##"set -e
cd /etc/redline-agent && cp agent.toml /root/agent.toml.can
# QEMU plugs the adapter in when the host end connects: wait for udev's by-id link.
for i in $(seq 1 150); do ls /dev/serial/by-id/* > /dev/null 2>&1 && break; sleep 0.2; done
dev=$(ls /dev/serial/by-id/* 2>/dev/null | head -n 1)
[ -n "$dev" ] || { echo "no /dev/serial/by-id/ link for the USB-serial adapter"; ls -l /dev/ttyUSB* 2>&1; exit 1; }
echo "tty=$(stat -L -c '%G %a' "$dev") $dev"
awk -v dev="$dev" '/^kind = "can"/ && !done {
    print "kind = \"serial\""; print "device = \"" dev "\""; print "baud = 115200"; print "format = \"nmea\""
    print "columns = [\"brake_disc_temp_fl\", \"brake_disc_temp_fr\", \"engine_rpm\", \"engine_oil_temp\"]"
    print "sentence = \"RDLTM\""; done = 1; next }
  { print }' /root/agent.toml.can > agent.toml
redline-agent check-config --config agent.toml > /dev/null
systemctl restart redline-agent
echo "pid=$(systemctl show -p MainPID --value redline-agent)""##,
    );
    rep.check(ser.rc == 0, || {
        format!(
            "switching the agent to the serial sensor failed:\n{}",
            ser.text
        )
    });
    let serial_from = now_ms() + 1_500;
    std::thread::sleep(Duration::from_secs(8));
    let serial_to = now_ms() - DURABLE_MS;
    let missing_serial = wait_delivered(&sub, serial_from, serial_to, Duration::from_secs(60));
    let missing_serial = gaps.judge("serial sensor", &missing_serial);
    drop(feed);
    let s = Seen::of(&sub);
    let window: Vec<&Rec> = s
        .by_ts
        .range(serial_from..=serial_to)
        .map(|(_, r)| r)
        .collect();
    let exact = window
        .iter()
        .filter(|r| r.values == SERIAL_VALUES.map(Some))
        .count();
    rep.figure(format!(
        "serial (USB adapter {}): {exact} of {} readings carry the sensor board's values",
        ser.prop("tty"),
        window.len()
    ));
    rep.check(
        missing_serial.is_empty() && exact * 10 >= window.len() * 8 && exact > 0,
        || {
            format!(
                "readings from the serial sensor: {exact} of {} carry its values; {}\n{}",
                window.len(),
                describe_missing(&missing_serial),
                ser.text
            )
        },
    );
    gaps.note(&mut vm);
    let after = vm.sh(&format!(
        r#"cp /root/agent.toml.can /etc/redline-agent/agent.toml
echo "pid=$({MAIN_PID})"; systemctl show -p NRestarts,ActiveState redline-agent
journalctl -k -o cat --no-pager | grep 'type=1326' || true
journalctl -u redline-agent -o cat --no-pager | grep -E 'status=31/SYS|Bad system call' || true
rm /run/systemd/system/redline-agent.service.d/zz-strict-seccomp.conf
systemctl daemon-reload && systemctl restart redline-agent && systemctl is-active redline-agent"#
    ));
    // Readings are continuous from here on until the next restart.
    let mut live_from = now_ms() + 500;
    rep.time(
        "strict seccomp pass (CAN, spool, status, TLS reconnect, serial sensor on USB)",
        t,
    );
    rep.check(
        after.prop("pid") == ser.prop("pid")
            && after.prop("NRestarts") == strict.prop("NRestarts")
            && !after.text.contains("type=1326")
            && !after.text.contains("31/SYS"),
        || {
            format!(
                "under the strict filter the agent was killed by a system call outside the filter:\n{}",
                after.text
            )
        },
    );
    let missing = gaps.judge("strict pass outage", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "strict pass: readings of the outage not delivered: {}",
            describe_missing(&missing)
        )
    });

    // 7. Watchdog: SIGSTOP ----------------------------------------------------------------------
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let pid = vm.sh(MAIN_PID).text.trim().to_owned();
    gaps.note(&mut vm);
    let stopped_at = now_ms();
    let wd = vm.run(
        &format!(
            "kill -STOP {pid}\n{}\njournalctl -u redline-agent -o cat --no-pager --since '-90s' | grep -i -E 'watchdog|SIGABRT|killed' | head -n 5",
            wait_new_pid(&pid, WATCHDOG_SEC + RESTART_SEC + 60)
        ),
        Duration::from_secs(150),
    );
    rep.time("watchdog: SIGSTOP to a new agent", t);
    let restarted = now_ms() + 500;
    let wd_ms: u64 = wd.prop("elapsed_ms").parse().unwrap_or(u64::MAX);
    rep.figure(format!(
        "watchdog: SIGSTOP to restarted agent in {:.1}s (WatchdogSec {WATCHDOG_SEC} + RestartSec {RESTART_SEC})",
        wd_ms as f64 / 1000.0
    ));
    rep.check(
        wd.prop("pid") != pid
            && wd.prop("state") == "active"
            && wd.text.to_lowercase().contains("watchdog"),
        || {
            format!(
                "the stalled agent was not killed by the watchdog and restarted:\n{}",
                wd.text
            )
        },
    );
    rep.check(wd_ms <= (WATCHDOG_SEC + RESTART_SEC + 10) * 1000, || {
        format!("watchdog restart took {wd_ms} ms, more than WatchdogSec + RestartSec + 10 s")
    });
    let missing = wait_delivered(
        &sub,
        (stopped_at - 20_000).max(live_from),
        stopped_at - DURABLE_MS,
        Duration::from_secs(60),
    );
    let missing = gaps.judge("before the watchdog", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "readings before the stall not delivered after the watchdog restart: {}",
            describe_missing(&missing)
        )
    });

    live_from = restarted;

    // 8. Crash: kill -9 -------------------------------------------------------------------------
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let pid = vm.sh(MAIN_PID).text.trim().to_owned();
    gaps.note(&mut vm);
    let killed_at = now_ms();
    let cr = vm.sh(&format!(
        "kill -9 {pid}\n{}",
        wait_new_pid(&pid, RESTART_SEC + 30)
    ));
    let cr_ms: u64 = cr.prop("elapsed_ms").parse().unwrap_or(u64::MAX);
    let restarted = now_ms() + 500;
    rep.check(
        cr.prop("pid") != pid && cr.prop("state") == "active",
        || format!("the agent did not come back after kill -9:\n{}", cr.text),
    );
    rep.check(cr_ms <= (RESTART_SEC + 10) * 1000, || {
        format!("restart after kill -9 took {cr_ms} ms")
    });
    let missing = wait_delivered(
        &sub,
        (killed_at - 5_000).max(live_from),
        killed_at - DURABLE_MS,
        Duration::from_secs(60),
    );
    rep.time("crash: kill -9, restart, nothing synced lost", t);
    rep.figure(format!(
        "crash: kill -9 to a new active agent in {:.1}s",
        cr_ms as f64 / 1000.0
    ));
    let missing = gaps.judge("before kill -9", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "readings synced before kill -9 not delivered: {}",
            describe_missing(&missing)
        )
    });

    live_from = restarted;

    // 9. Upgrade: the package over itself while running, with a backlog ---------------------
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let pid = vm.sh(MAIN_PID).text.trim().to_owned();
    let down_from = now_ms();
    broker.stop();
    std::thread::sleep(Duration::from_secs(4));
    let upgrade_at = now_ms();
    gaps.note(&mut vm);
    let up = vm.run(
        &format!(
            "cd /root/files && DEBIAN_FRONTEND=noninteractive apt install -y --reinstall ./{deb_name} 2>&1 | tail -n 5\n{}",
            wait_new_pid(&pid, 60)
        ),
        Duration::from_secs(300),
    );
    rep.check(
        up.prop("pid") != pid && up.prop("state") == "active",
        || {
            format!(
                "the upgrade did not restart the running service:\n{}",
                up.text
            )
        },
    );
    let restarted = now_ms() + 500;
    std::thread::sleep(Duration::from_secs(2));
    broker.start_again();
    let missing = wait_delivered(
        &sub,
        (down_from - 1_000).max(live_from),
        upgrade_at - DURABLE_MS,
        Duration::from_secs(90),
    );
    rep.time("upgrade over a running agent with a backlog", t);
    let missing = gaps.judge("backlog of the upgrade", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "the backlog spooled before the upgrade was not delivered after it: {}",
            describe_missing(&missing)
        )
    });

    live_from = restarted;

    // 10. Power cut with a backlog, a wrong RTC at the next boot, time from NTP later --------
    let t = Instant::now();
    let ntp_off = vm.sh(
        "timedatectl set-ntp false && sleep 1 && echo \"ntp=$(systemctl is-enabled systemd-timesyncd)\"",
    );
    rep.check(ntp_off.rc == 0, || {
        format!("timedatectl set-ntp false failed:\n{}", ntp_off.text)
    });
    std::thread::sleep(Duration::from_secs(3));
    let down_from = now_ms();
    broker.stop();
    std::thread::sleep(Duration::from_secs(6));
    gaps.note(&mut vm);
    let cut_at = now_ms();
    vm.power_cut();
    broker.start_again();
    let boot2 = now_ms();
    let t_boot = Instant::now();
    let (_, secs2) = vm.boot(Some("2001-01-01T00:00:00"));
    let b2 = vm.run(
        &format!(
            r#"systemctl is-system-running --wait > /dev/null
for i in $(seq 1 150); do [ "$(systemctl is-active redline-agent)" = active ] && break; sleep 0.2; done
echo "active=$(systemctl is-active redline-agent)"; echo "pid=$({MAIN_PID})"
echo "year=$(date +%Y)"; echo "synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)"
echo "guest_ms=$(( $(date +%s%N) / 1000000 ))"
journalctl -b -u redline-agent -o cat --no-pager | grep -i -E 'not trusted|starting' | head -n 3"#
        ),
        Duration::from_secs(180),
    );
    rep.time("boot 2 (after the power cut, wrong RTC)", t_boot);
    let skew2 = b2.prop("guest_ms").parse::<i64>().unwrap_or(0) - now_ms();
    rep.figure(format!(
        "boot 2: guest called back after {secs2:.1}s; RTC set to 2001-01-01, the clock at boot \
         {:.1} days off real time until NTP",
        skew2 as f64 / 86_400_000.0
    ));
    rep.check(b2.prop("active") == "active", || {
        format!(
            "the agent did not start at boot after the power cut:\n{}",
            b2.text
        )
    });
    rep.check(
        b2.prop("synced") == "no" && b2.text.contains("not trusted"),
        || {
            format!(
                "the second boot should start with an untrusted clock:\n{}",
                b2.text
            )
        },
    );
    let missing = wait_delivered(
        &sub,
        (down_from - 1_000).max(live_from),
        cut_at - DURABLE_MS,
        Duration::from_secs(120),
    );
    let missing = gaps.judge("backlog at the power cut", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "the backlog on disk at the power cut was not re-sent after the boot: {}",
            describe_missing(&missing)
        )
    });
    // Readings of this boot are held while the clock is untrusted: nothing stamped after
    // the cut, nothing stamped on a wrong clock (before this test began).
    std::thread::sleep(Duration::from_secs(6));
    let s = Seen::of(&sub);
    // Published before the clock was trusted, so of boot 1: its last synced readings may be
    // stamped a little after `cut_at` (its NTP clock can be ahead of this machine's).
    let before_trust: Vec<i64> = s.by_ts.range(cut_at..).map(|(ts, _)| *ts).collect();
    let early = s.by_ts.range(cut_at + 1_000..).count();
    let wrong_clock = s.by_ts.range(..t_begin - 60_000).count();
    rep.check(early == 0 && wrong_clock == 0, || {
        format!(
            "before the clock was trusted, {early} reading(s) stamped after the cut and \
             {wrong_clock} stamped before this test began were published"
        )
    });
    // ... and published, converted to UTC, once timesyncd has synchronised the clock.
    let ntp_at = now_ms();
    let ntp_on = vm.sh(
        r#"timedatectl set-ntp true
for i in $(seq 1 240); do [ -e /run/systemd/timesync/synchronized ] && break; sleep 0.5; done
echo "synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)"; echo "year=$(date +%Y)""#,
    );
    rep.check(ntp_on.prop("synced") == "yes", || {
        format!(
            "timedatectl set-ntp true: no synchronisation:\n{}",
            ntp_on.text
        )
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut wait = Settle::new(Duration::from_secs(90));
    let (first_new, missing) = loop {
        let s = Seen::of(&sub);
        let first = s
            .by_ts
            .range(cut_at..)
            .map(|(ts, _)| *ts)
            .find(|ts| !before_trust.contains(ts));
        let missing = first.map_or(vec![], |f| s.missing(f, ntp_at - 1_000));
        if (first.is_some() && wait.done(&missing)) || Instant::now() >= deadline {
            break (first, missing);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    rep.time(
        "power cut: backlog re-sent, held readings released by NTP",
        t,
    );
    match first_new {
        None => rep.check(false, || {
            "no reading of the second boot arrived after the clock became trusted".to_owned()
        }),
        Some(first) => {
            rep.figure(format!(
                "power cut: first reading of boot 2 stamped {:.1}s after qemu started again; NTP at +{:.1}s",
                (first - boot2) as f64 / 1000.0,
                (ntp_at - boot2) as f64 / 1000.0
            ));
            rep.check(
                first >= boot2 && first <= boot2 + (secs2 as i64 + 60) * 1000 && first < ntp_at - 5_000,
                || {
                    format!(
                        "the held readings of boot 2 are not stamped in its real time: first at {first}, \
                         qemu started at {boot2}, clock trusted at {ntp_at}"
                    )
                },
            );
            let missing = gaps.judge("held readings of boot 2", &missing);
            rep.check(missing.is_empty(), || {
                format!(
                    "readings held before the clock was trusted not all delivered: {}",
                    describe_missing(&missing)
                )
            });
        }
    }

    // 11. Garage boot: GPS time on the bus, no NTP ------------------------------------------
    // The car in a garage: the wall clock wrong at boot and never synchronised, the time
    // from the GNSS receiver on the CAN bus (`[clock] gps`).
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // Readings are continuous from here on until the power cut.
    live_from = now_ms();
    let garage = vm.sh(
        r#"set -e
timedatectl set-ntp false; sleep 1
echo "ntp=$(systemctl is-enabled systemd-timesyncd || true)"
cd /etc/redline-agent
grep -q '^# gps = "GpsTime.UtcTime"$' agent.toml || { echo 'agent.toml has no line `# gps = "GpsTime.UtcTime"` to uncomment'; exit 1; }
sed -i 's/^# gps = "GpsTime.UtcTime"$/gps = "GpsTime.UtcTime"/' agent.toml
# The effective configuration: the binding is in [clock], and the service reads vcan0.
redline-agent check-config --config agent.toml 2>/dev/null | awk '/^\[/ { s = $0 }
  s == "[clock]" && /^gps = "GpsTime.UtcTime"/ { print "gps_bound=yes" }
  s == "[source]" && /^interface = / { gsub(/"/, "", $3); print "interface=" $3 }'"#,
    );
    rep.check(
        garage.rc == 0
            && garage.prop("ntp") == "disabled"
            && garage.prop("gps_bound") == "yes"
            && garage.prop("interface") == "vcan0",
        || {
            format!(
                "garage boot: could not turn NTP off or bind `gps = \"GpsTime.UtcTime\"` in \
                 [clock] of agent.toml, or the service does not read vcan0:\n{}",
                garage.text
            )
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    gaps.note(&mut vm);
    let cut_at = now_ms();
    vm.power_cut();
    let boot3 = now_ms();
    let t_boot = Instant::now();
    let (_, secs3) = vm.boot(Some("2001-01-01T00:00:00"));
    let b3 = vm.run(
        &format!(
            r#"systemctl is-system-running --wait > /dev/null
for i in $(seq 1 150); do [ "$(systemctl is-active redline-agent)" = active ] && break; sleep 0.2; done
echo "active=$(systemctl is-active redline-agent)"; echo "pid=$({MAIN_PID})"
echo "ntp=$(systemctl is-enabled systemd-timesyncd || true)"
echo "synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)"
echo "guest_ms=$(( $(date +%s%N) / 1000000 ))"
journalctl -b -u redline-agent -o cat --no-pager | grep -i -E 'not trusted|starting' | head -n 3"#
        ),
        Duration::from_secs(180),
    );
    rep.time("boot 3 (garage: wrong RTC, NTP off)", t_boot);
    let skew3 = b3.prop("guest_ms").parse::<i64>().unwrap_or(0) - now_ms();
    rep.figure(format!(
        "boot 3 (garage): guest called back after {secs3:.1}s; the clock at boot {:.1} days off \
         real time, NTP {}",
        skew3 as f64 / 86_400_000.0,
        b3.prop("ntp")
    ));
    rep.check(b3.prop("active") == "active", || {
        format!("the agent did not start at the garage boot:\n{}", b3.text)
    });
    rep.check(
        b3.prop("synced") == "no"
            && b3.prop("ntp") == "disabled"
            && b3.text.contains("not trusted"),
        || {
            format!(
                "the garage boot should start with NTP off and an untrusted clock:\n{}",
                b3.text
            )
        },
    );
    let missing = wait_delivered(
        &sub,
        live_from,
        cut_at - DURABLE_MS,
        Duration::from_secs(120),
    );
    let missing = gaps.judge("before the garage power cut", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "readings synced before the garage power cut not delivered: {}",
            describe_missing(&missing)
        )
    });
    // No GPS time on the bus yet: the readings of this boot are held (published, they
    // would carry the boot clock or the wrong wall clock). What is stamped past the cut
    // by now is the last of the boot before, its NTP clock a little ahead of this
    // machine's, re-sent from the spool: not of this boot.
    std::thread::sleep(Duration::from_secs(3));
    let s = Seen::of(&sub);
    let early = s.by_ts.range(..t_begin - 60_000).count();
    let before_boot: Vec<i64> = s.by_ts.range(cut_at..).map(|(ts, _)| *ts).collect();
    rep.check(
        early == 0 && before_boot.iter().all(|ts| *ts < boot3 + 1_000),
        || {
            format!(
                "garage boot: before any GPS time was on the bus, {early} reading(s) stamped \
                 before this test began, and of the boot before the cut {} stamped more than \
                 1 s after it (qemu started at {boot3}): {before_boot:?}",
                before_boot
                    .iter()
                    .filter(|ts| **ts >= boot3 + 1_000)
                    .count()
            )
        },
    );

    // The simulated car with its GPS receiver, on the true time (this machine's clock; the
    // guest's is wrong), on the bus the service reads.
    let sim_start = now_ms();
    // candump keeps its first GpsTime frames (0x18FEE61C), stamped on the guest's clock:
    // how late the receiver's time is on the bus.
    let sim = vm.sh(&format!(
        "timeout 60 candump -L -n 40 vcan0,18FEE61C:1FFFFFFF > /run/gps-frames.log 2>&1 &
redline-agent simulate --config /etc/redline-agent/agent.toml --can vcan0 \
         --duration 25s --start {} > /run/simulate-gps.log 2>&1 &\necho \"sim_pid=$!\"",
        rfc3339_ms(sim_start)
    ));
    let stop_watch = std::sync::atomic::AtomicBool::new(false);
    let g = std::thread::scope(|scope| {
        // When each reading is first seen at the broker, on this machine's clock.
        let watcher = scope.spawn(|| {
            let mut seen_at: BTreeMap<i64, i64> = BTreeMap::new();
            let mut done = 0;
            while !stop_watch.load(std::sync::atomic::Ordering::Relaxed) {
                let msgs = sub.telemetry();
                let now = now_ms();
                for (_, payload) in msgs.iter().skip(done) {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
                        continue;
                    };
                    for r in v["records"].as_array().into_iter().flatten() {
                        if let Some(ts) = r["timestamp"].as_i64() {
                            seen_at.entry(ts).or_insert(now);
                        }
                    }
                }
                done = msgs.len();
                std::thread::sleep(Duration::from_millis(100));
            }
            seen_at
        });
        // The journal's "clock trusted from GPS time" line.
        let mut g = GarageGps {
            rtt: i64::MAX,
            ..GarageGps::default()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while g.line.is_empty() && Instant::now() < deadline {
            let j = vm.sh(
                "echo \"synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)\"
journalctl -b -u redline-agent -o short-unix --no-pager | grep -m 1 'clock trusted from GPS time' | sed 's/^/trusted_line=/'",
            );
            match j.text.lines().find_map(|l| l.strip_prefix("trusted_line=")) {
                Some(line) => {
                    g.line = line.to_owned();
                    g.synced_at_trust = j.prop("synced");
                }
                None => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        for _ in 0..5 {
            g.probe_clocks(&mut vm);
        }
        // The simulated car's run to its end, then its readings in.
        g.sim = vm
            .run(
                &format!(
                    "for i in $(seq 1 120); do kill -0 {} 2>/dev/null || break; sleep 0.5; done
echo \"synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)\"
tail -n 3 /run/simulate-gps.log; cat /run/gps-frames.log",
                    sim.prop("sim_pid")
                ),
                Duration::from_secs(120),
            )
            .text;
        g.end = now_ms() - DURABLE_MS;
        let mut wait = Settle::new(Duration::from_secs(90));
        loop {
            let s = Seen::of(&sub);
            g.first = s
                .by_ts
                .range(cut_at..)
                .map(|(ts, _)| *ts)
                .find(|ts| !before_boot.contains(ts));
            g.missing = g.first.map_or(vec![], |f| s.missing(f, g.end));
            if (g.first.is_some() && wait.done(&g.missing)) || Instant::now() >= wait.deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        stop_watch.store(true, std::sync::atomic::Ordering::Relaxed);
        g.seen_at = watcher.join().expect("the broker watcher");
        g
    });
    let synced_after = g.sim.contains("synced=yes");
    rep.check(g.synced_at_trust == "no" && !synced_after, || {
        format!(
            "garage boot: the clock was synchronised (NTP) during the GPS run (at trust: \
                 {:?}; after the run:\n{})",
            g.synced_at_trust, g.sim
        )
    });
    // From the journal line: the offset taken, and how far the guest's wall clock was
    // from GPS time; with the guest's clock against this machine's, GPS time against the
    // true time.
    let number_after = |key: &str| {
        g.line
            .split_once(key)
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.trim_start_matches('+').parse::<f64>().ok())
    };
    let journal_guest_ms = g
        .line
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| (s * 1000.0).round() as i64);
    match (
        journal_guest_ms,
        number_after("offset of "),
        number_after("the wall clock is "),
    ) {
        (Some(at_guest), Some(offset_s), Some(wall_minus_gps_s)) => {
            let to_trust = at_guest + g.host_minus_guest - sim_start;
            // wall − GPS (logged), host − wall (measured): GPS − host.
            let gps_minus_host = -(wall_minus_gps_s * 1000.0).round() as i64 - g.host_minus_guest;
            // Untrusted at its start, the agent samples on the boot clock: a reading
            // sampled at boot time b is stamped b + offset, and was taken at
            // host_at_boot + b on this machine's clock.
            let stamps_minus_host = (offset_s * 1000.0).round() as i64 - g.host_at_boot;
            rep.figure(format!(
                "garage boot: clock trusted from GPS time {:.1}s after the simulated car started \
                 (journal against this machine's clock, ±{} ms), NTP off",
                to_trust as f64 / 1000.0,
                g.rtt / 2
            ));
            rep.figure(format!(
                "garage boot: GPS time as believed {gps_minus_host:+} ms from this machine's \
                 clock; readings stamped {stamps_minus_host:+} ms from it (offset {offset_s:.3} s \
                 on the boot clock's grid)"
            ));
            // Against the receiver itself: its time when least late on the bus (what the
            // agent takes), both on the guest's clock, so the clock probe cancels out.
            let rx = g.receiver_lags();
            match rx.first() {
                Some(&least) => {
                    let vs_receiver = gps_minus_host + least;
                    rep.figure(format!(
                        "garage boot: the simulated receiver's GpsTime frames on the bus {least} to {} ms \
                         after their UtcTime ({} frames kept by candump; its clock starts with the \
                         process, after `--start` was taken here); GPS time as believed \
                         {vs_receiver:+} ms from the receiver's",
                        rx.last().copied().unwrap_or(least),
                        rx.len()
                    ));
                    rep.check(vs_receiver.abs() <= 250, || {
                        format!(
                            "garage boot: GPS time believed {vs_receiver:+} ms from the receiver's \
                             own time on the bus (want within about one tick):\n{}",
                            g.line
                        )
                    });
                }
                None => rep.check(false, || {
                    format!(
                        "garage boot: candump kept no GpsTime frame (0x18FEE61C) of the simulated \
                         car:\n{}",
                        g.sim
                    )
                }),
            }
            rep.check((0..=15_000).contains(&to_trust), || {
                format!(
                    "garage boot: clock trusted from GPS time {to_trust} ms after the simulated \
                     car started (want 2-3 s of agreeing samples and the watcher's second):\n{}",
                    g.line
                )
            });
            rep.check(
                gps_minus_host.abs() <= 2_000 && stamps_minus_host.abs() <= 2_000,
                || {
                    format!(
                        "garage boot: GPS time believed {gps_minus_host:+} ms, stamps \
                         {stamps_minus_host:+} ms from the true time (want within 2 s):\n{}",
                        g.line
                    )
                },
            );
        }
        _ => rep.check(false, || {
            format!(
                "garage boot: no \"clock trusted from GPS time: ... offset of ... (the wall clock \
                 is ... from GPS time)\" in the journal within 60 s of the simulated car's start, \
                 NTP off; the simulated car:\n{}",
                g.sim
            )
        }),
    }
    // What arrived from this boot: on the true time, the held readings of its start too.
    let s = Seen::of(&sub);
    let wrong_clock = s.by_ts.range(..t_begin - 60_000).count();
    rep.check(wrong_clock == 0, || {
        format!(
            "{wrong_clock} reading(s) stamped before this test began (the guest's wrong clock, \
             or its boot clock) were published"
        )
    });
    let this_boot: Vec<(i64, &Rec)> = s
        .by_ts
        .range(cut_at..)
        .filter(|(ts, _)| !before_boot.contains(ts))
        .map(|(ts, r)| (*ts, r))
        .collect();
    let arrived = |ts: i64| g.seen_at.get(&ts).copied().unwrap_or_else(now_ms);
    let future: Vec<i64> = this_boot
        .iter()
        .filter(|(ts, _)| *ts > arrived(*ts) + 1_000)
        .map(|(ts, _)| *ts)
        .collect();
    rep.check(future.is_empty(), || {
        format!(
            "garage boot: {} reading(s) arrived more than 1 s before their timestamp, e.g. {:?}",
            future.len(),
            &future[..future.len().min(5)]
        )
    });
    // Readings with the bus's values were sampled while the simulated car ran.
    let from_bus: Vec<i64> = this_boot
        .iter()
        .filter(|(_, r)| r.all_values())
        .map(|(ts, _)| *ts)
        .collect();
    let off_window: Vec<i64> = from_bus
        .iter()
        .copied()
        .filter(|ts| *ts < sim_start - 2_000 || *ts > arrived(*ts) + 1_000)
        .collect();
    rep.check(!from_bus.is_empty() && off_window.is_empty(), || {
        format!(
            "garage boot: of {} reading(s) with the simulated car's values, {} stamped outside \
             [its start − 2 s, their arrival + 1 s] (start {sim_start}), e.g. {:?}",
            from_bus.len(),
            off_window.len(),
            &off_window[..off_window.len().min(5)]
        )
    });
    let held = this_boot.iter().filter(|(ts, _)| *ts < sim_start).count();
    // Live: sampled after the clock was trusted (the held ones wait for it).
    let live_after = journal_guest_ms.map_or(i64::MAX, |j| j + g.host_minus_guest + 1_000);
    let mut lags: Vec<i64> = this_boot
        .iter()
        .filter(|(ts, _)| *ts >= live_after && g.seen_at.contains_key(ts))
        .map(|(ts, _)| arrived(*ts) - ts)
        .collect();
    lags.sort_unstable();
    match g.first {
        None => rep.check(false, || {
            "garage boot: no reading of this boot arrived at the broker".to_owned()
        }),
        Some(first) => {
            rep.figure(format!(
                "garage boot: {} reading(s) of this boot delivered, {held} of them held on the boot \
                 clock before GPS time (first stamped {:.1}s after qemu started, the simulated car \
                 at +{:.1}s), {} with the bus's values; live ones arrived {} to {} ms (median {}) \
                 after their stamps",
                this_boot.len(),
                (first - boot3) as f64 / 1000.0,
                (sim_start - boot3) as f64 / 1000.0,
                from_bus.len(),
                lags.first().copied().unwrap_or(-1),
                lags.last().copied().unwrap_or(-1),
                lags.get(lags.len() / 2).copied().unwrap_or(-1)
            ));
            rep.check(
                held > 0
                    && first >= boot3
                    && first <= boot3 + (secs3 as i64 + 60) * 1000
                    && first < sim_start,
                || {
                    format!(
                        "garage boot: the readings held before GPS time are not stamped at their \
                         real time: first at {first}, qemu started at {boot3}, the simulated car \
                         at {sim_start} ({held} held)"
                    )
                },
            );
            let missing = gaps.judge("garage boot on GPS time", &g.missing);
            rep.check(missing.is_empty(), || {
                format!(
                    "garage boot: readings of this boot not all delivered (held ones and live \
                     ones up to {}): {}",
                    g.end,
                    describe_missing(&missing)
                )
            });
        }
    }
    // NTP back (and the shipped config for the next steps, at the next restart): the wall
    // clock takes over from GPS time.
    let back = vm.sh(
        r#"sed -i 's/^gps = "GpsTime.UtcTime"$/# gps = "GpsTime.UtcTime"/' /etc/redline-agent/agent.toml
echo "gps_lines=$(grep -c '^gps = ' /etc/redline-agent/agent.toml)"
timedatectl set-ntp true
for i in $(seq 1 240); do [ -e /run/systemd/timesync/synchronized ] && break; sleep 0.5; done
echo "synced=$([ -e /run/systemd/timesync/synchronized ] && echo yes || echo no)"; echo "year=$(date +%Y)"
for i in $(seq 1 40); do
  l=$(journalctl -b -u redline-agent -o cat --no-pager | grep -m 1 'takes over from GPS time') && break; sleep 0.5
done
echo "handover=$l""#,
    );
    rep.check(
        back.prop("synced") == "yes" && back.prop("gps_lines") == "0",
        || {
            format!(
                "garage boot: could not restore the config or synchronise with NTP again:\n{}",
                back.text
            )
        },
    );
    let handover = back.prop("handover");
    rep.check(handover.contains("takes over from GPS time"), || {
        format!(
            "garage boot: NTP synchronised again but the journal has no \"wall clock trusted \
             now: it takes over from GPS time\":\n{}",
            back.text
        )
    });
    rep.figure(format!(
        "garage boot: NTP back, the wall clock took over {}",
        handover
            .split_once("takes over ")
            .map_or("(no hand-over logged)", |(_, r)| r)
            .trim()
    ));
    rep.time("garage boot: GPS time on the bus, no NTP", t);

    // 12. CPU cost on a live bus next to candump --------------------------------------------
    let t = Instant::now();
    gaps.note(&mut vm);
    let cost = vm.run(
        r#"# 2,000 frames/s of the three bound messages (Engine, EngineTemps, BrakeTemps) for
# 60 s, replayed by canplayer in bursts every 2 ms (cangen's per-frame sleep cannot keep
# that rate under emulation).
awk 'BEGIN { split("100 101 300", id, " ")
  for (i = 0; i < 130000; i++) { d = sprintf("%04X", i % 65536)
    printf "(%d.%06d) vcan0 %s#%s%s%s%s\n", 1000 + int(i / 2000), (i % 2000) * 500, id[i % 3 + 1], d, d, d, d } }' > /run/bus.log
systemctl restart redline-agent; sleep 3
PID=$(systemctl show -p MainPID --value redline-agent)
candump -L vcan0 > /dev/null & CD=$!
sleep 1
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }
a0=$(cpu $PID); c0=$(cpu $CD); f0=$(cat /sys/class/net/vcan0/statistics/tx_packets); t0=$(date +%s%N)
canplayer -I /run/bus.log -g 2 & g=$!
sleep 60
kill $g; wait $g 2>/dev/null
a1=$(cpu $PID); c1=$(cpu $CD); f1=$(cat /sys/class/net/vcan0/statistics/tx_packets); t1=$(date +%s%N)
echo "hz=$(getconf CLK_TCK)"; echo "agent_ticks=$((a1 - a0))"; echo "candump_ticks=$((c1 - c0))"
echo "frames=$((f1 - f0))"; echo "ms=$(( (t1 - t0) / 1000000 ))"
echo "agent_hwm=$(awk '/^VmHWM:/ {print $2}' /proc/$PID/status)"
echo "candump_hwm=$(awk '/^VmHWM:/ {print $2}' /proc/$CD/status)"
echo "same_pid=$([ "$PID" = "$(systemctl show -p MainPID --value redline-agent)" ] && echo yes)"
kill $CD"#,
        Duration::from_secs(200),
    );
    rep.time("live bus: 60 s at 2,000 frames/s, agent next to candump", t);
    live_from = now_ms() - 61_000;
    let p = cost.props();
    let num = |k: &str| {
        p.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (hz, ms) = (num("hz"), num("ms"));
    let agent_s = num("agent_ticks") / hz;
    let candump_s = num("candump_ticks") / hz;
    let rate = num("frames") / (ms / 1000.0);
    let ratio = agent_s / candump_s;
    let hwm = num("agent_hwm");
    rep.figure(format!(
        "live bus ({}): {rate:.0} frames/s for {:.0} s; agent {agent_s:.2} s CPU, candump {candump_s:.2} s CPU, \
         ratio {ratio:.2} (goal <= {CPU_RATIO_GOAL}); peak RSS agent {:.1} MiB (goal <= {} MiB), candump {:.1} MiB",
        arch,
        ms / 1000.0,
        hwm / 1024.0,
        RSS_GOAL_KIB / 1024,
        num("candump_hwm") / 1024.0
    ));
    rep.check(p.get("same_pid").is_some_and(|v| v == "yes"), || {
        format!(
            "the agent restarted during the live-bus run:\n{}",
            cost.text
        )
    });
    rep.check(rate >= 1_800.0, || {
        format!(
            "the bus carried only {rate:.0} frames/s (want about 2,000):\n{}",
            cost.text
        )
    });
    rep.check(ratio <= CPU_RATIO_GOAL, || {
        format!("agent CPU {agent_s:.2} s is {ratio:.2} x candump's {candump_s:.2} s (goal <= {CPU_RATIO_GOAL})")
    });
    rep.check(hwm <= RSS_GOAL_KIB as f64, || {
        format!(
            "agent peak RSS {:.1} MiB above {} MiB",
            hwm / 1024.0,
            RSS_GOAL_KIB / 1024
        )
    });

    // 13. Clean stop ------------------------------------------------------------------------------
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    gaps.note(&mut vm);
    let stop_at = now_ms();
    let stop = vm.sh(
        r#"t0=$(date +%s%N); systemctl stop redline-agent; rc=$?
echo "stop_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
systemctl show -p Result,ExecMainStatus,ExecMainCode,ActiveState redline-agent
echo "credentials_left=$(ls /run/credentials/redline-agent.service 2>/dev/null | wc -l)"
journalctl -u redline-agent -o cat --no-pager --since '-20s' | grep -i -E 'timed out|killing|SIGKILL' || true
exit $rc"#,
    );
    let stop_ms: u64 = stop.prop("stop_ms").parse().unwrap_or(u64::MAX);
    rep.figure(format!(
        "clean stop: systemctl stop took {stop_ms} ms (TimeoutStopSec {TIMEOUT_STOP_SEC} s)"
    ));
    rep.check(
        stop.rc == 0 && stop.prop("Result") == "success" && stop_ms < TIMEOUT_STOP_SEC * 1000,
        || format!("systemctl stop was not clean:\n{}", stop.text),
    );
    rep.check(stop.prop("credentials_left") == "0", || {
        format!(
            "the credential is still in /run after the stop:\n{}",
            stop.text
        )
    });
    let missing = wait_delivered(
        &sub,
        (stop_at - 5_000).max(live_from),
        stop_at - 600,
        Duration::from_secs(30),
    );
    let missing = gaps.judge("before the clean stop", &missing);
    rep.check(missing.is_empty(), || {
        format!(
            "the last batch before the stop was not delivered: {}",
            describe_missing(&missing)
        )
    });
    let offline = sub
        .messages()
        .iter()
        .rev()
        .find(|(t, _)| t.starts_with("redline/status/"))
        .cloned();
    rep.check(
        offline
            .as_ref()
            .is_some_and(|(_, p)| p.contains("\"offline\"") && p.contains("stopped")),
        || format!("the last status message is not a retained offline/stopped: {offline:?}"),
    );
    rep.time("clean stop", t);

    // The whole run's journal (both boots): no SECCOMP audit, no EPERM/EACCES ----------------
    let j = vm.sh(
        r#"journalctl -u redline-agent -o cat --no-pager | grep -i -E 'permission denied|operation not permitted|os error (1|13|30)\)|EPERM|EACCES|read-only file system|seccomp|bad system call' || true
echo ---
journalctl -k -o cat --no-pager | grep 'type=1326' || true"#,
    );
    let summaries = vm.sh(
        "journalctl -u redline-agent -o cat --no-pager | grep -o 'ticks_missed=[0-9]*' | tr '\\n' ' '",
    );
    rep.figure(format!(
        "ticks_missed in the agents' exit summaries: {}",
        summaries.text.trim()
    ));
    let bad: Vec<&str> = j
        .text
        .lines()
        .filter(|l| !l.trim().is_empty() && *l != "---")
        .collect();
    rep.check(bad.is_empty(), || {
        let mut lines: Vec<&str> = bad.clone();
        lines.dedup();
        format!(
            "the journal of the whole run has {} SECCOMP/EPERM/EACCES line(s), e.g.:\n{}",
            bad.len(),
            lines.iter().take(5).copied().collect::<Vec<_>>().join("\n")
        )
    });

    // Short gaps against what the agents counted as missed ticks.
    gaps.note_summaries(&mut vm);
    let counted = gaps.counted();
    if !gaps.short.is_empty() {
        let list: Vec<String> = gaps
            .short
            .iter()
            .map(|(w, t)| format!("{t} ({w})"))
            .collect();
        rep.figure(format!(
            "{} tick(s) never sampled (starved sampler), the agents counted {counted} missed: {}",
            gaps.short.len(),
            list.join(", ")
        ));
    }
    rep.check(gaps.short.len() as u64 <= counted, || {
        format!(
            "{} short gap tick(s) in the delivered readings but the agents counted only {counted} \
             missed tick(s): readings were lost: {:?}",
            gaps.short.len(),
            gaps.short
        )
    });
    let seen = Seen::of(&sub);
    rep.check(seen.schema.is_empty(), || {
        format!(
            "over the whole run {} of {} message(s) break the documented schema",
            seen.schema_bad, seen.messages
        )
    });
    rep.time("all", t_all);

    eprintln!("\n==== ecu_vm ({arch}) times");
    for (what, s) in &rep.times {
        eprintln!("  {s:7.1}s  {what}");
    }
    eprintln!("==== figures");
    for f in &rep.figures {
        eprintln!("  {f}");
    }
    if std::env::var_os("ECU_VM_KEEP").is_some() {
        let kept = work.keep();
        eprintln!("work dir kept: {}", kept.display());
    }
    drop(vm);
    assert!(
        rep.problems.is_empty(),
        "{} problem(s) in the virtual ECU:\n- {}",
        rep.problems.len(),
        rep.problems.join("\n- ")
    );
}

/// The README's "Try it on a virtual ECU" (`scripts/ecu-vm.sh demo`): boots the box,
/// installs the package, starts the service, drives vcan0 with the simulated car for 30 s
/// and prints each reading as it arrives at the broker on this machine.
#[test]
fn try_it_on_a_virtual_ecu() {
    let arch = std::env::var("ECU_VM_ARCH").unwrap_or_else(|_| "arm64".to_owned());
    let secs: u64 = std::env::var("ECU_VM_DEMO_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let t = Instant::now();
    let Bench {
        work: _work,
        broker,
        sub,
        mut vm,
        deb_name,
    } = Bench::new(&arch);
    println!(
        "== image ready ({:.0}s); booting Debian 12 {arch} with systemd in QEMU",
        t.elapsed().as_secs_f64()
    );
    let (_, boot) = vm.boot(None);
    let up = vm.run(
        "systemctl is-system-running --wait; uname -srm",
        Duration::from_secs(180),
    );
    println!(
        "== booted in {boot:.0}s: {}",
        up.text.trim().replace('\n', ", ")
    );
    println!("== apt install ./{deb_name}");
    let inst = vm.run(&install_script(&deb_name), Duration::from_secs(300));
    assert_eq!(inst.rc, 0, "apt install failed:\n{}", inst.text);
    println!(
        "== certificates into /etc/redline-agent, agent.toml: endpoint 10.0.2.2:{} (Mosquitto with mutual TLS on this machine), interface vcan0",
        broker.tls_port
    );
    let conf = vm.sh(&configure_script(broker.tls_port));
    assert_eq!(conf.rc, 0, "configuring the agent failed:\n{}", conf.text);
    println!("== systemctl start redline-agent");
    let start = vm.sh(START_SCRIPT);
    assert_eq!(start.rc, 0, "systemctl start failed:\n{}", start.text);
    for l in start.text.lines().skip_while(|l| !l.starts_with('●')) {
        println!("   {l}");
    }
    println!(
        "== redline-agent simulate --can vcan0 for {secs}s; the readings as they arrive at the broker:"
    );
    vm.sh(&format!(
        "redline-agent simulate --can vcan0 --duration {secs}s > /run/simulate.log 2>&1 &"
    ));
    let end = Instant::now() + Duration::from_secs(secs + 3);
    let mut shown = 0;
    while Instant::now() < end {
        let msgs = sub.telemetry();
        for (_, payload) in &msgs[shown.min(msgs.len())..] {
            let inner = payload
                .strip_prefix("{\"records\":[")
                .and_then(|p| p.strip_suffix("]}"))
                .unwrap_or(payload);
            for rec in inner.split("},{") {
                let rec = rec.trim_start_matches('{').trim_end_matches('}');
                println!("{{{rec}}}");
            }
        }
        shown = msgs.len();
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = vm.sh("systemctl status --no-pager redline-agent | sed -n 's/^ *Status: /Status: /p'; redline-agent status --config /etc/redline-agent/agent.toml 2>&1 | head -n 4");
    println!("== {} message(s) received\n{}", shown, st.text.trim_end());
}
