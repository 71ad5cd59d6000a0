//! Delivery behaviour end to end, against a real Mosquitto with mutual TLS:
//! 1. `delivery.order`: with a backlog in the spool, `live-first` delivers new readings
//!    before the backlog has drained; `fifo` delivers strictly in time order;
//! 2. systemd READY: sent only once the spool is open, never when the agent cannot start
//!    (a configuration error, a spool it cannot open).
//!
//! Orders are read from the subscriber's arrival order (one connection, QoS 1: the broker
//! forwards in the order it received), never from arrival times.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::{PayloadMode, Record, assert_exact_grid, check_message, coverage};
use support::process::{Proc, poll, tail};
use support::spool::{Tuning, run_agent_to_end, simulate_args, write_config};
use support::{ConfigSpec, START, START_MS, TOPIC, VEHICLE_ID};

/// A second simulated day: the live run, whose readings must not meet the backlog's.
const DAY2: &str = "2024-01-15T21:20:00Z";
const DAY2_MS: i64 = START_MS + 86_400_000;

struct Rig {
    // Field order is drop order: subscriber, then broker, then the files.
    sub: Subscriber,
    broker: Broker,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(persistence: bool) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::generate(dir.path(), VEHICLE_ID);
        let broker = Broker::start(&pki, dir.path(), persistence);
        let sub = Subscriber::start(&broker);
        Rig {
            sub,
            broker,
            pki,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, name: &str, t: &Tuning) -> PathBuf {
        let spec = ConfigSpec {
            port: self.broker.tls_port,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload: "records",
        };
        write_config(&spec, t, self.dir.path(), name)
    }

    /// The records of each telemetry message, in arrival order.
    fn messages(&self) -> Vec<Vec<Record>> {
        self.sub
            .telemetry()
            .iter()
            .map(|(topic, p)| {
                assert_eq!(topic, TOPIC, "telemetry on an unexpected topic");
                check_message(p, PayloadMode::Records)
                    .unwrap_or_else(|e| panic!("a message breaks the contract: {e}"))
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "--- broker log (tail) ---\n{}\n--- subscriber stderr ---\n{}",
            tail(&self.broker.log(), 3000),
            self.sub.stderr_text()
        )
    }
}

// 1. ---------------------------------------------------------------------------------------

/// Backlog readings of START's day (the spool), live ones of DAY2.
const BACKLOG: i64 = 1500;
const LIVE: i64 = 80;

/// A backlog of BACKLOG readings in the spool (the broker down), then a live run of LIVE
/// readings at --speed 1 with the broker up and `delivery.order = order`, the bytes limited
/// so that the backlog takes seconds to drain. Returns every message, in arrival order.
fn backlog_then_live(order: &'static str) -> Vec<Vec<Record>> {
    let mut rig = Rig::new(true);
    let tuning = Tuning {
        spool_dir: Some(rig.path("spool")),
        order,
        max_publish_per_sec: 0,
        max_bytes_per_sec: "16KiB",
        shutdown_timeout: "60s",
        ..Tuning::default()
    };
    let config = rig.config("agent.toml", &tuning);
    // The same spool, without waiting for acknowledgements that cannot come.
    let offline = rig.config(
        "offline.toml",
        &Tuning {
            shutdown_timeout: "1s",
            ..tuning.clone()
        },
    );
    rig.broker.stop();
    let out = run_agent_to_end(
        &simulate_args(
            &offline,
            Some(&format!("{}s", BACKLOG / 10)),
            "max",
            1,
            START,
        ),
        Duration::from_secs(120),
    );
    assert_eq!(
        out.code(),
        Some(3),
        "broker down: nothing acknowledged, exit 3\n{}",
        out.describe()
    );
    rig.broker.start_again();
    rig.sub.sync();
    assert!(
        rig.sub.telemetry().is_empty(),
        "published with the broker down?"
    );

    let out = run_agent_to_end(
        &simulate_args(&config, Some(&format!("{}s", LIVE / 10)), "1", 2, DAY2),
        Duration::from_secs(180),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "{order}: every batch acknowledged in the end: exit 0\n{}\n{}",
        out.describe(),
        rig.describe()
    );
    let all = poll(Duration::from_secs(30), || {
        let n = coverage(&rig.messages().concat()).ok()?.distinct.len() as i64;
        (n >= BACKLOG + LIVE).then_some(())
    });
    rig.sub.sync();
    let messages = rig.messages();
    let cov = coverage(&messages.concat()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        all.is_some(),
        "{order}: {} of {} readings arrived\n{}",
        cov.distinct.len(),
        BACKLOG + LIVE,
        rig.describe()
    );
    // Both days complete, nothing else.
    let day1 = support::json::Coverage {
        distinct: cov
            .distinct
            .range(..DAY2_MS)
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        duplicates: 0,
    };
    let day2 = support::json::Coverage {
        distinct: cov
            .distinct
            .range(DAY2_MS..)
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        duplicates: 0,
    };
    assert_exact_grid(&day1, START_MS, BACKLOG);
    assert_exact_grid(&day2, DAY2_MS, LIVE);
    messages
}

/// Timestamps in arrival order.
fn arrival_order(messages: &[Vec<Record>]) -> Vec<i64> {
    messages.iter().flatten().map(|r| r.timestamp).collect()
}

fn strictly_increasing(ts: &[i64]) -> Result<(), String> {
    match ts.windows(2).position(|w| w[1] <= w[0]) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{} arrived after {} (arrival position {})",
            ts[i + 1],
            ts[i],
            i + 1
        )),
    }
}

#[test]
fn live_first_delivers_new_readings_before_the_backlog_has_drained() {
    let t0 = Instant::now();
    let messages = backlog_then_live("live-first");
    let ts = arrival_order(&messages);
    let backlog: Vec<i64> = ts.iter().copied().filter(|t| *t < DAY2_MS).collect();
    let live: Vec<i64> = ts.iter().copied().filter(|t| *t >= DAY2_MS).collect();
    // Each lane in its own order.
    strictly_increasing(&backlog).unwrap_or_else(|e| panic!("the backlog out of order: {e}"));
    strictly_increasing(&live).unwrap_or_else(|e| panic!("live readings out of order: {e}"));
    let first_live = ts
        .iter()
        .position(|t| *t >= DAY2_MS)
        .expect("live readings");
    let last_backlog = ts.iter().rposition(|t| *t < DAY2_MS).expect("backlog");
    let backlog_after = backlog.len() - ts[..first_live].iter().filter(|t| **t < DAY2_MS).count();
    assert!(
        first_live < last_backlog,
        "live-first: the first live reading arrived only after the whole backlog \
         ({} backlog readings, then live from arrival position {first_live})",
        backlog.len()
    );
    assert!(
        backlog_after >= 10,
        "live-first: only {backlog_after} backlog reading(s) arrived after the first live one"
    );
    eprintln!(
        "live-first: {} messages; the first live reading arrived at position {first_live} of {}, \
         with {backlog_after} of {BACKLOG} backlog readings still to come; test took {:?}",
        messages.len(),
        ts.len(),
        t0.elapsed()
    );
}

#[test]
fn fifo_delivers_strictly_in_time_order() {
    let t0 = Instant::now();
    let messages = backlog_then_live("fifo");
    let ts = arrival_order(&messages);
    strictly_increasing(&ts).unwrap_or_else(|e| {
        panic!(
            "fifo: not strictly oldest first: {e}; {} messages",
            messages.len()
        )
    });
    eprintln!(
        "fifo: {} messages, {} readings, all in time order (the {LIVE} live ones after the \
         {BACKLOG} of the backlog); test took {:?}",
        messages.len(),
        ts.len(),
        t0.elapsed()
    );
}

// 2. ---------------------------------------------------------------------------------------

/// The notify socket with kernel timestamps: (send time in ns since the epoch, datagram).
struct NotifySocket {
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from the valid pointer we pass.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        NotifySocket { sock }
    }

    fn recv(&self) -> Option<(i64, String)> {
        let mut buf = [0u8; 4096];
        let mut cmsg = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers we set point to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: msg describes valid buffers for the kernel to fill.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return None;
        }
        let mut sent_ns = 0;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    sent_ns = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        assert!(sent_ns > 0, "the kernel gave no SCM_TIMESTAMPNS");
        Some((
            sent_ns,
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        ))
    }

    /// Everything received until `agent` has exited (and a moment more).
    fn until_exit(&self, agent: &mut Proc, timeout: Duration) -> Vec<(i64, String)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while agent.is_running() {
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}\n{}",
                agent.stderr_text()
            );
            got.extend(self.recv());
        }
        while let Some(d) = self.recv() {
            got.push(d);
        }
        got
    }
}

fn agent_with_notify(args: &[&str], socket: &Path) -> Proc {
    let mut cmd = support::agent();
    cmd.args(args)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", "900000");
    Proc::spawn("redline-agent", cmd)
}

/// The agent's own time (ns since the epoch) of its first log line holding `needle`.
fn logged_at_ns(stderr: &str, needle: &str) -> Option<i64> {
    let stamp = stderr
        .lines()
        .find(|l| l.contains(needle))?
        .split_whitespace()
        .next()?;
    let t =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as i64)
}

fn is_ready(d: &(i64, String)) -> bool {
    d.1.lines().any(|l| l == "READY=1")
}

#[test]
fn ready_comes_only_after_the_spool_is_open() {
    let mut rig = Rig::new(false);
    let tuning = Tuning {
        spool_dir: Some(rig.path("spool")),
        ..Tuning::default()
    };
    let config = rig.config("agent.toml", &tuning);
    let offline = rig.config(
        "offline.toml",
        &Tuning {
            shutdown_timeout: "1s",
            ..tuning.clone()
        },
    );
    // A spool with a backlog, so that opening it is work the agent reports on.
    rig.broker.stop();
    let out = run_agent_to_end(
        &simulate_args(&offline, Some("300s"), "max", 3, START),
        Duration::from_secs(120),
    );
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    rig.broker.start_again();

    let socket = rig.path("notify.sock");
    let sock = NotifySocket::bind(&socket);
    let mut agent = agent_with_notify(
        &["run", "--config", config.to_str().expect("utf-8")],
        &socket,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        assert!(
            Instant::now() < deadline && agent.is_running(),
            "no READY=1\n{}",
            agent.stderr_text()
        );
        if let Some(d) = sock.recv().filter(is_ready) {
            break d;
        }
    };
    // The spool's own report on opening, by the agent's clock, comes before READY.
    let opened = poll(Duration::from_secs(10), || {
        logged_at_ns(&agent.stderr_text(), "batch(es) not yet acknowledged")
    });
    agent.terminate();
    let stderr = agent.stderr_text();
    let opened = opened.unwrap_or_else(|| {
        panic!("no `spool ...: N batch(es) not yet acknowledged` line:\n{stderr}")
    });
    assert!(
        opened <= ready.0,
        "READY=1 was sent {:.1} ms before the spool reported it was open:\n{stderr}",
        (opened - ready.0) as f64 / 1e6
    );
    eprintln!(
        "READY=1 {:.1} ms after the spool reported it was open (agent's clock)",
        (ready.0 - opened) as f64 / 1e6
    );
}

#[test]
fn no_ready_when_the_agent_cannot_start() {
    let rig = Rig::new(false);
    let tuning = Tuning {
        spool_dir: Some(rig.path("spool")),
        ..Tuning::default()
    };
    let config = rig.config("agent.toml", &tuning);
    let socket = rig.path("notify.sock");
    let sock = NotifySocket::bind(&socket);

    // A configuration error: refused before anything starts.
    let bad = rig.path("bad.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&bad, text.replacen("rate_hz = 10", "rate_hz = 0", 1)).expect("write");
    let mut agent = agent_with_notify(&["run", "--config", bad.to_str().expect("utf-8")], &socket);
    let got = sock.until_exit(&mut agent, Duration::from_secs(30));
    let status = agent.try_status().expect("exited");
    assert_eq!(status.code(), Some(2), "{}", agent.stderr_text());
    assert!(
        agent.stderr_text().contains("sampling.rate_hz"),
        "{}",
        agent.stderr_text()
    );
    assert!(
        !got.iter().any(is_ready),
        "READY=1 on a configuration error: {got:?}"
    );

    // A spool it cannot open (another agent holds it): refused at start, after the config
    // was read, naming `spool.dir`.
    let mut first = support::spool::spawn_agent(&simulate_args(&config, None, "1", 4, START));
    let locked = poll(Duration::from_secs(30), || {
        rig.path("spool").join("lock").exists().then_some(())
    });
    assert!(locked.is_some(), "{}", first.stderr_text());
    let mut second = agent_with_notify(
        &["run", "--config", config.to_str().expect("utf-8")],
        &socket,
    );
    let got2 = sock.until_exit(&mut second, Duration::from_secs(30));
    let status = second.try_status().expect("exited");
    first.terminate();
    assert_eq!(status.code(), Some(2), "{}", second.stderr_text());
    assert!(
        second.stderr_text().contains("spool.dir"),
        "{}",
        second.stderr_text()
    );
    assert!(
        !got2.iter().any(is_ready),
        "READY=1 although the spool could not be opened: {got2:?}"
    );
    eprintln!(
        "no READY on a configuration error ({} datagram(s)) nor on a locked spool ({} datagram(s))",
        got.len(),
        got2.len()
    );
}
