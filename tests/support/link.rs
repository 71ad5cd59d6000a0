//! A link emulator: a TCP proxy on loopback that gives the car's uplink a rate,
//! a delay, jitter, stalls and outages, plus a subscriber that timestamps every
//! message it receives.
//!
//! Why a userspace proxy: this container's kernel has no `sch_netem` (`tc qdisc
//! add ... netem` reports "Specified qdisc kind is unknown") and cannot load
//! modules, so the link has to be emulated between the agent and the broker.
//! See /work/shared/notes/thin-links.md for the links it stands for.
//!
//! How it works, per direction of every connection:
//! - a *reader* waits until the source has data, takes tokens from the link's
//!   bucket for that direction (one bucket shared by all connections, like one
//!   modem), reads at most that many bytes (never more than one 1460-byte
//!   packet), and queues the chunk with a release time of now + delay + jitter;
//! - a *writer* sleeps until the release time and writes the chunk on.
//!
//! Back-pressure is real: bytes the link cannot carry yet stay in the sender's
//! socket. The proxy's own sockets get a small receive buffer (`RCVBUF`), and
//! the delay line holds at most `DELAY_LINE_CHUNKS` packets.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::broker::{Broker, find_exe, mosquitto_pub};
use super::process::{Proc, poll, tail};

/// One TCP packet's payload on a 1500-byte MTU: the most a reader takes at once.
const PACKET: usize = 1460;

/// SO_RCVBUF asked for on the proxy's sockets (the accepted one and the upstream
/// one). Linux doubles the value for its bookkeeping, so getsockopt reports
/// 16 KiB; the TCP window it advertises is a part of that, about 8 to 16 KiB.
/// That is the most a proxy socket can hold of bytes the link has not carried
/// yet; the rest stays in the sender's send buffer, where it belongs.
const RCVBUF: i32 = 8 * 1024;

/// Chunks (of at most `PACKET` bytes) a direction's delay line may hold: 365 KiB,
/// more than rate × delay of any thin link (30 KiB/s × 1 s), and a bound when
/// the receiving peer stops reading.
const DELAY_LINE_CHUNKS: usize = 256;

/// What the emulated link does, per direction.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkSpec {
    /// Bytes per second client→server (the car's uplink); 0 = unlimited.
    pub up_rate: u64,
    /// Bytes per second server→client; 0 = unlimited.
    pub down_rate: u64,
    /// One-way added delay (so RTT = 2 × delay + queueing).
    pub delay: Duration,
    /// Random extra one-way delay in 0..=jitter, order preserved (never reorders bytes).
    pub jitter: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// client → server
    Up,
    /// server → client
    Down,
}

/// A token bucket: `rate` bytes per second, at most `burst` bytes at once.
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            tokens: burst(rate),
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(burst(self.rate));
    }

    fn set_rate(&mut self, rate: u64) {
        self.refill();
        self.rate = rate;
        self.tokens = self.tokens.min(burst(rate));
    }

    /// How long until `need` tokens are there (after a refill).
    fn wait_for(&self, need: usize) -> Duration {
        let missing = need as f64 - self.tokens;
        Duration::from_secs_f64(missing.max(0.0) / self.rate as f64)
    }
}

/// Burst: one packet or 20 ms of the rate, whichever is larger (a smooth link).
fn burst(rate: u64) -> f64 {
    (PACKET as f64).max(rate as f64 / 50.0)
}

/// The least worth waking up for: 10 ms of the rate, at least 1 byte, at most a packet.
fn quantum(rate: u64) -> usize {
    ((rate / 100) as usize).clamp(1, PACKET)
}

/// Both sockets of one proxied connection (clones of the ones the threads use).
struct ConnSockets {
    client: TcpStream,
    server: Option<TcpStream>,
}

impl ConnSockets {
    fn shutdown(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(s) = &self.server {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Everything the control methods change, under one mutex with one condvar.
struct Control {
    spec: LinkSpec,
    up_bucket: Bucket,
    down_bucket: Bucket,
    link_up: bool,
    stalled: bool,
    stopping: bool,
    /// Open connections by id. A connection whose entry is gone must stop.
    conns: HashMap<u64, ConnSockets>,
    next_id: u64,
}

impl Control {
    fn alive(&self, id: u64) -> bool {
        !self.stopping && self.conns.contains_key(&id)
    }

    fn bucket(&mut self, dir: Dir) -> &mut Bucket {
        match dir {
            Dir::Up => &mut self.up_bucket,
            Dir::Down => &mut self.down_bucket,
        }
    }

    /// Shuts down every open connection's sockets and forgets them.
    fn close_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.shutdown();
        }
    }
}

struct Shared {
    target_port: u16,
    ctl: Mutex<Control>,
    changed: Condvar,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        // A panicking forwarding thread must not take the whole proxy with it.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the condvar at most `timeout`.
    fn wait<'a>(&self, g: MutexGuard<'a, Control>, timeout: Duration) -> MutexGuard<'a, Control> {
        match self.changed.wait_timeout(g, timeout) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }

    fn counter(&self, dir: Dir) -> &AtomicU64 {
        match dir {
            Dir::Up => &self.up_bytes,
            Dir::Down => &self.down_bytes,
        }
    }

    fn spawn(self: &Arc<Self>, name: String, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("spawn a link thread");
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|h| !h.is_finished());
        threads.push(handle);
    }
}

/// A TCP proxy (on 127.0.0.1 unless told otherwise) emulating a thin, delayed, flapping link.
pub struct LinkProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to 127.0.0.1:target_port.
    pub fn start(target_port: u16, spec: LinkSpec) -> LinkProxy {
        Self::start_on(Ipv4Addr::LOCALHOST, target_port, spec)
    }

    /// Listens on `addr` (an address of a test network, say) instead of 127.0.0.1.
    pub fn start_on(addr: Ipv4Addr, target_port: u16, spec: LinkSpec) -> LinkProxy {
        let listener = TcpListener::bind((addr, 0)).expect("bind the link emulator's listener");
        // Accepted sockets inherit the listener's buffer size from their SYN on.
        set_rcvbuf(listener.as_raw_fd());
        let port = listener.local_addr().expect("listener address").port();
        let shared = Arc::new(Shared {
            target_port,
            ctl: Mutex::new(Control {
                spec,
                up_bucket: Bucket::new(spec.up_rate),
                down_bucket: Bucket::new(spec.down_rate),
                link_up: true,
                stalled: false,
                stopping: false,
                conns: HashMap::new(),
                next_id: 0,
            }),
            changed: Condvar::new(),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("link-accept-{port}"))
            .spawn(move || accept_loop(&s, &listener))
            .expect("spawn the link acceptor");
        LinkProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Changes rates/delay on the fly.
    pub fn set_spec(&self, spec: LinkSpec) {
        let mut c = self.shared.lock();
        c.spec = spec;
        c.up_bucket.set_rate(spec.up_rate);
        c.down_bucket.set_rate(spec.down_rate);
        drop(c);
        self.shared.changed.notify_all();
    }

    /// Link down: closes every open connection at once (both sockets, so both peers see the
    /// connection die, like a car leaving Wi-Fi) and, while down, accepts and immediately
    /// closes new connections. `set_up(true)` brings it back.
    pub fn set_up(&self, up: bool) {
        let mut c = self.shared.lock();
        c.link_up = up;
        if !up {
            c.close_all();
        }
        drop(c);
        self.shared.changed.notify_all();
    }

    /// Stall (black hole): while on, nothing is forwarded in either direction and new
    /// connections are accepted but not forwarded; open connections stay open. Off: bytes flow again.
    pub fn set_stalled(&self, on: bool) {
        self.shared.lock().stalled = on;
        self.shared.changed.notify_all();
    }

    /// Total bytes forwarded client→server (all connections, all time), counted as each
    /// chunk is handed to the receiving socket: a peer that has a byte finds it counted.
    pub fn up_bytes(&self) -> u64 {
        self.shared.up_bytes.load(Ordering::SeqCst)
    }

    /// Total bytes forwarded server→client (all connections, all time), counted likewise.
    pub fn down_bytes(&self) -> u64 {
        self.shared.down_bytes.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded (not counting those refused while down).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connection attempts refused while down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.stopping = true;
            c.close_all();
        }
        self.shared.changed.notify_all();
        // Wake the acceptor out of accept(); it sees `stopping` and returns.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let woke = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
        if let Some(a) = self.acceptor.take()
            && woke
        {
            let _ = a.join();
        }
        // Every socket is shut down and every wait sees `stopping`: the threads end.
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for client in listener.incoming() {
        if shared.lock().stopping {
            return;
        }
        let Ok(client) = client else {
            // Out of file descriptors or the like: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = {
            let mut c = shared.lock();
            if !c.link_up {
                drop(c);
                shared.refused.fetch_add(1, Ordering::SeqCst);
                let _ = client.shutdown(Shutdown::Both);
                continue; // dropping `client` closes it
            }
            let Ok(clone) = client.try_clone() else {
                continue;
            };
            let id = c.next_id;
            c.next_id += 1;
            c.conns.insert(
                id,
                ConnSockets {
                    client: clone,
                    server: None,
                },
            );
            id
        };
        let s = shared.clone();
        shared.spawn(format!("link-conn-{id}"), move || serve(&s, id, client));
    }
}

/// Waits out a stall, connects upstream, and forwards both directions until both end.
fn serve(shared: &Arc<Shared>, id: u64, client: TcpStream) {
    set_rcvbuf(client.as_raw_fd());
    let _ = client.set_nodelay(true);
    if !wait_while_stalled(shared, id) {
        return forget(shared, id, &client, None);
    }
    let server = match connect_upstream(shared.target_port) {
        Ok(s) => s,
        Err(_) => return forget(shared, id, &client, None),
    };
    let _ = server.set_nodelay(true);
    if !register_server(shared, id, &server) {
        return forget(shared, id, &client, Some(&server));
    }
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let clones = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    );
    let (Ok(c_up), Ok(s_up), Ok(c_down), Ok(s_down)) = clones else {
        return forget(shared, id, &client, Some(&server));
    };
    let s = shared.clone();
    let down = std::thread::Builder::new()
        .name(format!("link-{id}-down"))
        .spawn(move || pipe(&s, id, Dir::Down, s_down, c_down));
    if let Ok(down) = down {
        pipe(shared, id, Dir::Up, c_up, s_up);
        let _ = down.join();
    }
    // Both directions are over (EOF both ways, an error, the link down or Drop).
    forget(shared, id, &client, Some(&server));
}

/// Closes a connection's sockets and drops its entry.
fn forget(shared: &Shared, id: u64, client: &TcpStream, server: Option<&TcpStream>) {
    shared.lock().conns.remove(&id);
    let _ = client.shutdown(Shutdown::Both);
    if let Some(s) = server {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Blocks while the link is stalled; false if the connection was closed meanwhile.
fn wait_while_stalled(shared: &Shared, id: u64) -> bool {
    let mut c = shared.lock();
    loop {
        if !c.alive(id) {
            return false;
        }
        if !c.stalled {
            return true;
        }
        c = shared.wait(c, Duration::from_secs(1));
    }
}

/// Records the upstream socket so `set_up(false)` can close it; false if the
/// connection was closed while it was being made.
fn register_server(shared: &Shared, id: u64, server: &TcpStream) -> bool {
    let Ok(clone) = server.try_clone() else {
        return false;
    };
    match shared.lock().conns.get_mut(&id) {
        Some(entry) => {
            entry.server = Some(clone);
            true
        }
        None => false,
    }
}

/// One direction of a connection: this thread reads, a writer thread delays and writes.
fn pipe(shared: &Arc<Shared>, id: u64, dir: Dir, src: TcpStream, dst: TcpStream) {
    let (tx, rx) = sync_channel::<Chunk>(DELAY_LINE_CHUNKS);
    let writer = {
        let (s, src, dst) = (shared.clone(), src.try_clone(), dst.try_clone());
        std::thread::Builder::new()
            .name(format!("link-{id}-{dir:?}-w"))
            .spawn(move || {
                if let (Ok(src), Ok(dst)) = (src, dst) {
                    write_loop(&s, id, dir, rx, &src, &dst);
                }
            })
    };
    match writer {
        Ok(w) => {
            read_loop(shared, id, dir, &src, &dst, tx);
            let _ = w.join();
        }
        Err(_) => close_both(&src, &dst),
    }
}

/// Bytes read from the source and the instant they may be delivered.
struct Chunk {
    release: Instant,
    bytes: Vec<u8>,
}

/// Reads what the link may carry now and queues it with its release time. Ends on
/// EOF (dropping `tx` tells the writer to half-close) or on an error (closing both).
fn read_loop(
    shared: &Shared,
    id: u64,
    dir: Dir,
    src: &TcpStream,
    dst: &TcpStream,
    tx: SyncSender<Chunk>,
) {
    let mut buf = [0u8; PACKET];
    let mut last_release = Instant::now();
    loop {
        // Block until the source has data, without taking it out of its socket.
        let available = match src.peek(&mut buf) {
            Ok(0) => return, // EOF: drop tx, the writer flushes and half-closes
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return close_both(src, dst),
        };
        let Some((grant, spec)) = take_tokens(shared, id, dir, available) else {
            return close_both(src, dst);
        };
        let n = match read_some(src, &mut buf[..grant]) {
            Ok(0) | Err(_) => {
                give_back(shared, dir, grant);
                return close_both(src, dst);
            }
            Ok(n) => n,
        };
        give_back(shared, dir, grant - n);
        last_release = release_time(&spec, last_release);
        let chunk = Chunk {
            release: last_release,
            bytes: buf[..n].to_vec(),
        };
        if tx.send(chunk).is_err() {
            return close_both(src, dst); // the writer is gone: dst failed
        }
    }
}

fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match io::Read::read(&mut &*src, buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Waits until the link is not stalled and the direction's bucket holds enough
/// tokens, then takes up to `available` of them (at most a packet). Returns the
/// grant and the spec in force, or None if the connection was closed.
fn take_tokens(shared: &Shared, id: u64, dir: Dir, available: usize) -> Option<(usize, LinkSpec)> {
    let mut c = shared.lock();
    loop {
        if !c.alive(id) {
            return None;
        }
        if c.stalled {
            c = shared.wait(c, Duration::from_secs(1));
            continue;
        }
        let spec = c.spec;
        let bucket = c.bucket(dir);
        if bucket.rate == 0 {
            return Some((available.min(PACKET), spec));
        }
        bucket.refill();
        let need = available.min(quantum(bucket.rate));
        if bucket.tokens >= need as f64 {
            let grant = available.min(PACKET).min(bucket.tokens as usize);
            bucket.tokens -= grant as f64;
            return Some((grant, spec));
        }
        let wait = bucket.wait_for(need);
        c = shared.wait(c, wait.max(Duration::from_millis(1)));
    }
}

/// Returns tokens a read did not use (it read fewer bytes than granted).
fn give_back(shared: &Shared, dir: Dir, unused: usize) {
    if unused > 0 {
        let mut c = shared.lock();
        let b = c.bucket(dir);
        if b.rate > 0 {
            b.tokens = (b.tokens + unused as f64).min(burst(b.rate));
        }
    }
}

/// now + delay + a jitter sample, never before the previous chunk's release.
fn release_time(spec: &LinkSpec, previous: Instant) -> Instant {
    let jitter_ns = u64::try_from(spec.jitter.as_nanos()).unwrap_or(u64::MAX);
    let jitter = if jitter_ns == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(rand::random_range(0..=jitter_ns))
    };
    (Instant::now() + spec.delay + jitter).max(previous)
}

/// Delivers each chunk at its release time (not while stalled). When the reader
/// ends, half-closes `dst` so the peer sees the EOF after the last byte.
fn write_loop(
    shared: &Shared,
    id: u64,
    dir: Dir,
    rx: Receiver<Chunk>,
    src: &TcpStream,
    dst: &TcpStream,
) {
    while let Ok(chunk) = rx.recv() {
        if !wait_release(shared, id, chunk.release) {
            return close_both(src, dst);
        }
        // Counted before the write, so that a peer that has the bytes always finds
        // them counted; a failed write takes its chunk back out.
        let n = chunk.bytes.len() as u64;
        shared.counter(dir).fetch_add(n, Ordering::SeqCst);
        if (&mut &*dst).write_all(&chunk.bytes).is_err() {
            shared.counter(dir).fetch_sub(n, Ordering::SeqCst);
            return close_both(src, dst);
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
}

/// Sleeps until `release` and until the link is not stalled; false if the
/// connection was closed meanwhile.
fn wait_release(shared: &Shared, id: u64, release: Instant) -> bool {
    let mut c = shared.lock();
    loop {
        if !c.alive(id) {
            return false;
        }
        let now = Instant::now();
        if c.stalled {
            c = shared.wait(c, Duration::from_secs(1));
        } else if now < release {
            c = shared.wait(c, release - now);
        } else {
            return true;
        }
    }
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Sets SO_RCVBUF to `RCVBUF` (best effort: a test link without it is only deeper).
fn set_rcvbuf(fd: RawFd) {
    let v: libc::c_int = RCVBUF;
    // SAFETY: fd is an open socket owned by the caller; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The socket's SO_RCVBUF as the kernel reports it (twice what was asked for).
fn rcvbuf_of(s: &impl AsRawFd) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow; v and len are valid for writing.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 { v } else { -1 }
}

/// Connects to 127.0.0.1:port with the small receive buffer set *before* the
/// handshake, so the window the proxy advertises upstream is small from the start
/// (std's `TcpStream::connect` offers no hook between socket() and connect()).
fn connect_upstream(port: u16) -> io::Result<TcpStream> {
    // SAFETY: plain socket calls; the fd is owned by `stream` from its creation on,
    // so every error path closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        set_rcvbuf(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

static TIMED_SUBSCRIBERS: AtomicUsize = AtomicUsize::new(0);

/// mosquitto_sub on the broker's plain port, printing the wall-clock arrival time of each message.
///
/// Uses `-F '%U %t %p'`: `%U` is the Unix time with nanoseconds taken by
/// mosquitto_sub when the message arrived (checked with mosquitto_sub 2.0.11), so
/// the time does not depend on when this process reads the pipe.
pub struct TimedSubscriber {
    proc: Proc,
    port: u16,
    id: String,
    probes: usize,
}

impl TimedSubscriber {
    /// Subscribes to `redline/#` at QoS 1 and returns once a probe message has come back.
    pub fn start(broker: &Broker) -> TimedSubscriber {
        let id = format!(
            "timed-{}-{}",
            std::process::id(),
            TIMED_SUBSCRIBERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new(find_exe("mosquitto_sub"));
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(broker.plain_port.to_string())
            .args(["-q", "1", "-t", "redline/#", "-F", "%U %t %p", "-c", "-i"])
            .arg(&id);
        let mut s = TimedSubscriber {
            proc: Proc::spawn("mosquitto_sub", cmd),
            port: broker.plain_port,
            id,
            probes: 0,
        };
        s.sync();
        s
    }

    fn probe_topic(&self) -> String {
        format!("redline/probe/{}", self.id)
    }

    /// Publishes a probe and waits until it comes back: the subscription is live
    /// and everything published before it has been seen (as `Subscriber::sync`).
    pub fn sync(&mut self) {
        self.probes += 1;
        let topic = self.probe_topic();
        let payload = format!("probe-{}", self.probes);
        let port = self.port.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.proc.try_status() {
                panic!(
                    "mosquitto_sub exited ({status}); stderr:\n{}",
                    self.proc.stderr_text()
                );
            }
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
                self.lines()
                    .iter()
                    .any(|(_, t, p)| *t == topic && *p == payload)
                    .then_some(())
            });
            if seen.is_some() {
                return;
            }
        }
        panic!(
            "timed subscriber never received its probe on port {} within 10 s; stdout:\n{}\nstderr:\n{}",
            self.port,
            tail(&self.proc.stdout_text(), 2000),
            self.proc.stderr_text()
        );
    }

    /// Every message line so far, probes included.
    fn lines(&self) -> Vec<(f64, String, String)> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| parse_timed_line(l))
            .collect()
    }

    /// Every message so far: (arrival epoch milliseconds as f64, topic, payload); probes excluded.
    pub fn messages(&self) -> Vec<(f64, String, String)> {
        self.lines()
            .into_iter()
            .filter(|(_, t, _)| !t.starts_with("redline/probe/"))
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn stderr_text(&self) -> String {
        self.proc.stderr_text()
    }
}

impl Drop for TimedSubscriber {
    fn drop(&mut self) {
        self.proc.terminate();
    }
}

/// `1796230220.791652371 topic payload` → (epoch ms, topic, payload).
fn parse_timed_line(line: &str) -> Option<(f64, String, String)> {
    let (time, rest) = line.split_once(' ')?;
    let secs: f64 = time.parse().ok()?;
    let (topic, payload) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((secs * 1000.0, topic.to_owned(), payload.to_owned()))
}

/// Now as epoch milliseconds (to compare with `TimedSubscriber::messages`).
pub fn now_epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
