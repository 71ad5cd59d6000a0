//! The systemd notify protocol against a real datagram socket: READY after start-up,
//! WATCHDOG pings while the pipeline moves and none once the sampler is stalled, STATUS
//! lines that say whether the agent is working.
//!
//! Times are the agent's own: the kernel stamps each datagram when the agent sends it
//! (`SO_TIMESTAMPNS` on the receiving socket), and log lines carry the agent's wall clock.
//! The test waits for events, with generous upper bounds, and never measures its own
//! reading of the socket, which a loaded machine delays.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::Broker;
use support::certs::Pki;
use support::process::{Proc, poll};

/// WATCHDOG_USEC given to the agent: it must ping at least this often.
const WATCHDOG: Duration = Duration::from_millis(900);

/// One datagram from the agent and when the agent sent it (wall clock, ns since the epoch).
#[derive(Debug, Clone)]
struct Datagram {
    sent_ns: i64,
    text: String,
}

impl Datagram {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }
}

/// The notify socket, with kernel timestamps on.
struct NotifySocket {
    sock: UnixDatagram,
    got: Vec<Datagram>,
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
        NotifySocket {
            sock,
            got: Vec::new(),
        }
    }

    /// Receives what has arrived (waiting up to 50 ms for the first datagram).
    fn drain(&mut self) {
        while let Some(d) = self.recv() {
            self.got.push(d);
        }
    }

    fn recv(&self) -> Option<Datagram> {
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
        let mut sent_ns = None;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    sent_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let sent_ns = sent_ns.expect("the kernel gave no SCM_TIMESTAMPNS");
        assert!(sent_ns > 0, "a zero kernel timestamp");
        Some(Datagram {
            sent_ns,
            text: String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        })
    }

    /// Receives until `done` holds for what was received (panics after `timeout`).
    fn until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&[Datagram]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.got) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; received {:?}",
                self.texts()
            );
            self.drain();
        }
    }

    fn pings(&self) -> Vec<i64> {
        self.got
            .iter()
            .filter(|d| d.has("WATCHDOG=1"))
            .map(|d| d.sent_ns)
            .collect()
    }

    fn texts(&self) -> Vec<&str> {
        self.got.iter().map(|d| d.text.as_str()).collect()
    }
}

fn start_agent(dir: &Path, cfg: &Path, socket: &Path, stall_ms: Option<u64>) -> Proc {
    let mut cmd = support::agent();
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
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

/// The agent honours a test hook only when built with the `test-hooks` feature, and then says
/// so at start. Fails, saying why, when it does not.
fn expect_hook(agent: &mut Proc, var: &str) {
    let needle = format!("test hook active: {var}=");
    let seen = poll(Duration::from_secs(30), || {
        let err = agent.stderr_text();
        if err.contains(&needle) {
            return Some(true);
        }
        (!agent.is_running()).then_some(false)
    });
    assert_eq!(
        seen,
        Some(true),
        "the agent does not honour {var}: it was built without the `test-hooks` feature. \
         Run the tests with `cargo test --features test-hooks` (scripts/test.sh does).\n{}",
        agent.stderr_text()
    );
}

fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

/// Gaps between consecutive pings, in ms.
fn gaps_ms(pings: &[i64]) -> Vec<f64> {
    pings.windows(2).map(|w| ms(w[1] - w[0])).collect()
}

#[test]
fn ready_status_and_watchdog_while_moving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let cfg = config(&pki, &broker, dir.path());
    let socket = dir.path().join("notify.sock");
    let mut sock = NotifySocket::bind(&socket);
    let mut agent = start_agent(dir.path(), &cfg, &socket, None);

    // READY, then a STATUS that says connected and publishing, then 10 more pings.
    sock.until(Duration::from_secs(60), "READY=1", |got| {
        got.iter().any(|d| d.has("READY=1"))
    });
    sock.until(Duration::from_secs(60), "a STATUS while connected", |got| {
        got.iter().any(|d| {
            d.text
                .lines()
                .any(|l| l.starts_with("STATUS=connected") && !l.contains("last PUBACK never"))
        })
    });
    let before = sock.pings().len();
    sock.until(Duration::from_secs(60), "10 WATCHDOG=1 pings", |got| {
        got.iter().filter(|d| d.has("WATCHDOG=1")).count() >= before + 10
    });
    assert!(agent.is_running(), "{}", agent.stderr_text());
    agent.terminate();
    sock.until(Duration::from_secs(15), "STOPPING=1 after SIGTERM", |got| {
        got.iter().any(|d| d.has("STOPPING=1"))
    });
    let stderr = agent.stderr_text();

    let ready = sock
        .got
        .iter()
        .position(|d| d.has("READY=1"))
        .expect("READY");
    let first_ping = sock
        .got
        .iter()
        .position(|d| d.has("WATCHDOG=1"))
        .expect("a ping");
    assert!(
        ready < first_ping,
        "a WATCHDOG=1 before READY=1: {:?}",
        sock.texts()
    );
    // Between the first ping and SIGTERM, by the agent's clock: never a gap that reaches
    // WATCHDOG_USEC (systemd would kill the service).
    let pings = sock.pings();
    let gaps = gaps_ms(&pings);
    let widest = gaps.iter().copied().fold(0.0, f64::max);
    assert!(
        widest < WATCHDOG.as_secs_f64() * 1000.0,
        "a gap of {widest:.0} ms between pings reached WATCHDOG_USEC: gaps {gaps:.0?}\n{stderr}"
    );
    let status = sock
        .got
        .iter()
        .rev()
        .flat_map(|d| d.text.lines())
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
    eprintln!(
        "{} pings, widest gap {widest:.0} ms (agent's send times); last STATUS {status:?}",
        pings.len()
    );
}

#[test]
fn watchdog_pings_stop_when_the_sampler_stalls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let cfg = config(&pki, &broker, dir.path());
    let socket = dir.path().join("notify.sock");
    let mut sock = NotifySocket::bind(&socket);
    let mut agent = start_agent(dir.path(), &cfg, &socket, Some(2500));
    expect_hook(&mut agent, "REDLINE_TEST_STALL_SAMPLER_AFTER_MS");

    // Wait for the supervisor to notice, then watch for several ping periods more: pings
    // that went on would show up in that time.
    let noticed = poll(Duration::from_secs(60), || {
        sock.drain();
        agent
            .stderr_text()
            .contains("pipeline stalled (no new readings)")
            .then_some(())
    });
    let watch_until = Instant::now() + 4 * WATCHDOG;
    while Instant::now() < watch_until {
        sock.drain();
    }
    let stderr = agent.stderr_text();
    assert!(
        noticed.is_some(),
        "the stall is not logged as `pipeline stalled (no new readings)`:\n{stderr}"
    );
    assert!(
        agent.is_running(),
        "a stalled sampler must not end the process\n{stderr}"
    );
    agent.terminate();

    let stalled_at = logged_at_ns(&stderr, "test hook: sampler stalled on purpose")
        .unwrap_or_else(|| panic!("no `sampler stalled on purpose` line:\n{stderr}"));
    let noticed_at = logged_at_ns(&stderr, "pipeline stalled").expect("logged");
    let pings = sock.pings();
    assert!(
        pings.iter().any(|t| *t < stalled_at),
        "no pings before the stall: {:?}",
        sock.texts()
    );
    let late: Vec<f64> = pings
        .iter()
        .filter(|t| **t > noticed_at)
        .map(|t| ms(t - noticed_at))
        .collect();
    assert!(
        late.is_empty(),
        "WATCHDOG=1 went on after the agent logged the stall: {late:.0?} ms after it"
    );
    // The supervisor looks every WATCHDOG_USEC / 3 and wants a new reading within 2 s: the
    // last ping comes at most 2 s and two looks after the last reading (plus 1 s for a
    // loaded machine), by the agent's clock.
    let last_ping = pings.iter().copied().max().expect("pings");
    let bound = 2000.0 + 2.0 * WATCHDOG.as_secs_f64() * 1000.0 / 3.0 + 1000.0;
    assert!(
        ms(last_ping - stalled_at) <= bound && ms(noticed_at - stalled_at) <= bound,
        "the stall at {stalled_at} was noticed {:.0} ms later, the last ping {:.0} ms later \
         (at most {bound:.0} ms)",
        ms(noticed_at - stalled_at),
        ms(last_ping - stalled_at)
    );
    eprintln!(
        "stall noticed {:.0} ms after the sampler stopped, last ping {:.0} ms after; {} pings \
         before, none after",
        ms(noticed_at - stalled_at),
        ms(last_ping - stalled_at),
        pings.len()
    );
}
