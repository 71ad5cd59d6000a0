//! The watchdog's second branch: readings still being made but the publisher loop no longer
//! turning (a wedged publisher). No running agent can be put in that state from outside
//! (its publisher keeps turning through outages, frozen brokers and full disks), so this
//! drives the agent's supervisor (`notify::supervise`) itself with the counters it watches,
//! against a real notify socket: it must stop feeding the watchdog, say why, and feed it
//! again once the loop turns. Its own test binary: it sets NOTIFY_SOCKET in this process.

use redline_agent::ops::notify;
use redline_agent::ops::stats::Stats;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// WATCHDOG_USEC: the supervisor looks every third of it.
const WATCHDOG_US: u64 = 300_000;
/// The supervisor's grace (`notify::supervise`): a loop turn within the last 2 s.
const GRACE_MS: i64 = 2000;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Datagrams with the kernel's send time (ns since the epoch).
fn receive(sock: &UnixDatagram) -> Option<(i64, String)> {
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
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
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

/// The log lines, captured.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }

    /// The time (ns since the epoch) of the first line holding `needle`.
    fn at(&self, needle: &str) -> Option<i64> {
        let text = self.text();
        let stamp = text
            .lines()
            .find(|l| l.contains(needle))?
            .split_whitespace()
            .next()?
            .to_owned();
        let t = time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339)
            .ok()?;
        Some(t.unix_timestamp_nanos() as i64)
    }
}

#[test]
fn the_watchdog_stops_while_the_publisher_loop_does_not_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
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
    assert_eq!(rc, 0, "SO_TIMESTAMPNS");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    // SAFETY: the only test of this binary, before it starts any thread of its own; the
    // harness's threads do not read the environment meanwhile.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", WATCHDOG_US.to_string());
        std::env::remove_var("WATCHDOG_PID");
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while !done.load(Ordering::Relaxed) {
                got.extend(receive(&sock));
            }
            got
        })
    };

    let log = Log::default();
    let subscriber = {
        let log = log.clone();
        tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_ansi(false)
            .finish()
    };
    let stats = Arc::new(Stats::new(vec!["brake_disc_temp_fl".into()]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let (mut last_beat, mut resumed) = (0, 0);
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let stop = CancellationToken::new();
            let supervisor =
                tokio::spawn(notify::supervise(stats.clone(), None, true, stop.clone()));
            // Readings every 100 ms throughout; the loop turns, then stops, then turns again.
            // Each phase waits for the supervisor's answer (generous bounds).
            let tick = || async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Stats::add(&stats.readings, 1);
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                tick().await;
                Stats::add(&stats.publisher_beats, 1);
                last_beat = now_ns();
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while log.at("pipeline stalled").is_none() && Instant::now() < deadline {
                tick().await;
            }
            // Readings go on, the loop still does not turn: no pings meanwhile.
            let still = Instant::now();
            while still.elapsed() < Duration::from_millis(1000) {
                tick().await;
            }
            resumed = now_ns();
            let deadline = Instant::now() + Duration::from_secs(30);
            while log.at("pipeline moving again").is_none() && Instant::now() < deadline {
                tick().await;
                Stats::add(&stats.publisher_beats, 1);
            }
            let more = Instant::now();
            while more.elapsed() < Duration::from_millis(1000) {
                tick().await;
                Stats::add(&stats.publisher_beats, 1);
            }
            stop.cancel();
            let _ = supervisor.await;
        });
    });
    done.store(true, Ordering::Relaxed);
    let got = reader.join().expect("reader");
    let text = log.text();
    let stalled = log
        .at("pipeline stalled")
        .unwrap_or_else(|| panic!("no `pipeline stalled` line:\n{text}"));
    let moving = log
        .at("pipeline moving again")
        .unwrap_or_else(|| panic!("no `pipeline moving again` line:\n{text}"));
    assert!(
        text.contains("pipeline stalled (publisher loop not turning)"),
        "the stall is the publisher's, readings went on:\n{text}"
    );
    let pings: Vec<i64> = got
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    let ms = |ns: i64| ns as f64 / 1e6;
    assert!(
        pings.iter().any(|t| *t < last_beat),
        "no pings while the loop turned: {got:?}"
    );
    let during: Vec<f64> = pings
        .iter()
        .filter(|t| **t > stalled && **t < moving)
        .map(|t| ms(t - stalled))
        .collect();
    assert!(
        during.is_empty(),
        "WATCHDOG=1 while the loop did not turn, {during:.0?} ms after the stall was logged"
    );
    assert!(
        pings.iter().any(|t| *t > moving),
        "no pings once the loop turned again:\n{text}"
    );
    // Noticed after the grace, within it and two looks (plus 1 s for a loaded machine);
    // the last ping before it within the grace of the last turn.
    let noticed = ms(stalled - last_beat);
    let bound = GRACE_MS as f64 + 2.0 * WATCHDOG_US as f64 / 3000.0 + 1000.0;
    assert!(
        noticed >= GRACE_MS as f64 - 150.0 && noticed <= bound,
        "the stall was logged {noticed:.0} ms after the last turn of the loop \
         (grace {GRACE_MS} ms, at most {bound:.0})"
    );
    let last_ping = pings
        .iter()
        .copied()
        .filter(|t| *t < stalled)
        .max()
        .expect("pings before");
    assert!(ms(last_ping - last_beat) <= bound);
    assert!(
        moving >= resumed,
        "moving again before the loop turned again"
    );
    eprintln!(
        "{} pings; stall noticed {noticed:.0} ms after the last turn, last ping {:.0} ms after \
         it; none while stalled; moving again {:.0} ms after the loop turned again",
        pings.len(),
        ms(last_ping - last_beat),
        ms(moving - resumed)
    );
}
