//! The link emulator of the tests (tests/support/link.rs) does what it says:
//! rate, delay, outage and stall against plain TCP servers, and the timed
//! subscriber against a real Mosquitto.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::VEHICLE_ID;
use support::broker::{Broker, mosquitto_pub};
use support::certs::Pki;
use support::link::{LinkProxy, LinkSpec, TimedSubscriber, now_epoch_ms};
use support::process::poll;

/// A TCP echo server on 127.0.0.1 that counts the connections it accepted and
/// the ones whose client went away (EOF or error).
struct Echo {
    port: u16,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, c) = (accepted.clone(), closed.clone());
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Echo {
        port,
        accepted,
        closed,
    }
}

/// A server that accepts one connection and reads it to EOF: (bytes, when EOF came).
fn sink_server() -> (u16, JoinHandle<(usize, Instant)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut total = 0;
        let mut buf = [0u8; 8192];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return (total, Instant::now()),
                Ok(n) => total += n,
            }
        }
    });
    (port, h)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Writes `msg` and reads back as many bytes; returns the round-trip time.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t0 = Instant::now();
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
    t0.elapsed()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        poll(timeout, || f().then_some(())).is_some(),
        "{what} within {timeout:?}"
    );
}

#[test]
fn uplink_rate_is_honoured_and_bytes_counted() {
    let (port, sink) = sink_server();
    let proxy = LinkProxy::start(
        port,
        LinkSpec {
            up_rate: 4096,
            ..LinkSpec::default()
        },
    );
    let started = Instant::now();
    let mut c = connect(proxy.port());
    c.write_all(&vec![0x5a; 40 * 1024]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (received, eof_at) = sink.join().unwrap();
    let took = eof_at - started;
    assert_eq!(received, 40960);
    assert!(
        (9.5..=11.5).contains(&took.as_secs_f64()),
        "40 KiB at 4 KiB/s took {took:?}"
    );
    assert_eq!(proxy.up_bytes(), 40960);
    assert_eq!(proxy.down_bytes(), 0);
    assert_eq!(proxy.connections(), 1);
}

#[test]
fn delay_adds_two_delays_to_a_round_trip() {
    let echo = echo_server();
    let proxy = LinkProxy::start(
        echo.port,
        LinkSpec {
            delay: Duration::from_millis(200),
            ..LinkSpec::default()
        },
    );
    let mut c = connect(proxy.port());
    let rtt = round_trip(&mut c, b"ping");
    assert!(
        rtt >= Duration::from_millis(400),
        "round trip {rtt:?} through a 200 ms link"
    );
    assert!(rtt < Duration::from_secs(3), "round trip {rtt:?}");
    assert_eq!((proxy.up_bytes(), proxy.down_bytes()), (4, 4));

    // set_spec takes effect on the open connection; jitter never reorders bytes.
    proxy.set_spec(LinkSpec {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(50),
        ..LinkSpec::default()
    });
    let msg: Vec<u8> = (0..=255u8).cycle().take(20_000).collect();
    let rtt = round_trip(&mut c, &msg);
    assert!(rtt < Duration::from_secs(3), "round trip {rtt:?}");
}

#[test]
fn link_down_closes_both_sides_and_refuses_until_up() {
    let echo = echo_server();
    let proxy = LinkProxy::start(echo.port, LinkSpec::default());
    let mut c = connect(proxy.port());
    round_trip(&mut c, b"hello");
    assert_eq!(proxy.connections(), 1);

    let reader = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf);
        (r.map_err(|e| e.kind()), Instant::now())
    });
    thread::sleep(Duration::from_millis(200));
    let down_at = Instant::now();
    proxy.set_up(false);
    let (r, returned_at) = reader.join().unwrap();
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "the client's blocked read returned {r:?}"
    );
    assert!(
        returned_at - down_at < Duration::from_secs(1),
        "client saw the close after {:?}",
        returned_at - down_at
    );
    wait_for(
        "the server side sees the close",
        Duration::from_secs(1),
        || echo.closed.load(Ordering::SeqCst) == 1,
    );

    // While down: accepted and closed at once, never forwarded.
    let mut refused = connect(proxy.port());
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let r = refused.read(&mut buf).map_err(|e| e.kind());
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "a connection while down read {r:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    wait_for("refused() == 1", Duration::from_secs(1), || {
        proxy.refused() == 1
    });
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

    proxy.set_up(true);
    let mut again = connect(proxy.port());
    round_trip(&mut again, b"back");
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.refused(), 1);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn stall_holds_bytes_until_released() {
    let echo = echo_server();
    let proxy = LinkProxy::start(echo.port, LinkSpec::default());
    let mut c = connect(proxy.port());
    round_trip(&mut c, b"warm");
    let (up, down) = (proxy.up_bytes(), proxy.down_bytes());

    proxy.set_stalled(true);
    c.write_all(b"hello").unwrap();
    // A new connection during the stall is accepted but not forwarded.
    let mut late = connect(proxy.port());
    late.write_all(b"late").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 5];
    let r = c.read(&mut buf).map_err(|e| e.kind());
    assert!(
        matches!(r, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "read during a stall returned {r:?}"
    );
    assert_eq!((proxy.up_bytes(), proxy.down_bytes()), (up, down));
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.connections(), 1);

    proxy.set_stalled(false);
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    let mut buf = [0u8; 4];
    late.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"late");
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.up_bytes(), up + 9);
}

#[test]
fn drop_closes_open_connections() {
    let echo = echo_server();
    let proxy = LinkProxy::start(echo.port, LinkSpec::default());
    let mut c = connect(proxy.port());
    round_trip(&mut c, b"x");
    drop(proxy);
    let mut buf = [0u8; 1];
    let r = c.read(&mut buf).map_err(|e| e.kind());
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "{r:?}"
    );
    wait_for(
        "the server side sees the close",
        Duration::from_secs(1),
        || echo.closed.load(Ordering::SeqCst) == 1,
    );
}

#[test]
fn timed_subscriber_stamps_arrival_time() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path(), VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let sub = TimedSubscriber::start(&broker);
    let port = broker.plain_port.to_string();
    let before = now_epoch_ms();
    let out = mosquitto_pub(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-t",
        "redline/telemetry/T",
        "-m",
        "{\"a\": 1}",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let msgs = poll(Duration::from_secs(5), || {
        let m = sub.messages();
        (!m.is_empty()).then_some(m)
    })
    .unwrap_or_else(|| panic!("no message; stderr:\n{}", sub.stderr_text()));
    let now = now_epoch_ms();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let (at, topic, payload) = &msgs[0];
    assert_eq!(topic, "redline/telemetry/T");
    assert_eq!(payload, "{\"a\": 1}");
    assert!((now - at).abs() < 2000.0, "arrival {at} vs now {now}");
    assert!(
        *at >= before - 5.0,
        "arrival {at} before publishing {before}"
    );
}

#[test]
fn mqtt_through_a_delayed_link_arrives_late() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path(), VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let sub = TimedSubscriber::start(&broker);
    let proxy = LinkProxy::start(
        broker.plain_port,
        LinkSpec {
            up_rate: 3 * 1024,
            down_rate: 3 * 1024,
            delay: Duration::from_millis(150),
            jitter: Duration::from_millis(20),
        },
    );
    let port = proxy.port().to_string();
    let before = now_epoch_ms();
    let out = mosquitto_pub(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-t",
        "redline/telemetry/T",
        "-m",
        "late",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let msgs = poll(Duration::from_secs(5), || {
        let m = sub.messages();
        (!m.is_empty()).then_some(m)
    })
    .expect("the message through the link");
    // CONNECT → CONNACK is one round trip (300 ms), then PUBLISH one more delay.
    let waited = msgs[0].0 - before;
    assert!(waited >= 450.0, "arrived {waited} ms after publishing");
    assert!(proxy.up_bytes() > 0 && proxy.down_bytes() > 0);
}
