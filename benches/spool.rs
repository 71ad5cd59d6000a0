//! Spool benchmarks (a bench binary, not timed tests):
//! 1. append cost per batch (buffered, and with an fsync per batch);
//! 2. replay of a one-hour 10 Hz backlog (36,000 readings) to a local Mosquitto with mutual
//!    TLS and the rate limits off: start of the agent to its exit with everything acknowledged;
//! 3. restart with a full spool (1 GiB) to the first message at the subscriber;
//! 4. the agent's peak RSS (VmHWM) draining spools of 0 to 1 GiB (issue 12, item 6);
//! 5. restart and release time with batches held for a clock (issue 12, item 5).
//!
//! `cargo bench --bench spool` runs the full sizes; under `cargo test` it runs a small
//! version of each so the code path stays exercised. `SPOOL_BENCH_ONLY=rss` (`append`,
//! `held`, `replay`, `restart`) runs one part.

#[path = "../tests/support/mod.rs"]
mod support;

use redline_agent::sample::batch::Batch;
use redline_agent::spool::{Options, SpoolLog};
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::process::Proc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (readings, spool_bytes) = if full {
        (36_000usize, 1u64 << 30)
    } else {
        (3_600, 16 << 20)
    };
    println!(
        "spool benchmarks ({} sizes); machine: {} cores",
        if full { "full" } else { "smoke" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // SPOOL_BENCH_ONLY=rss (or held): that part alone.
    let only = std::env::var("SPOOL_BENCH_ONLY").ok();
    let all = only.is_none();
    let part = |name: &str| all || only.as_deref() == Some(name);
    if part("append") {
        append_cost(if full { 20_000 } else { 500 });
    }
    let work = tempfile::tempdir().expect("tempdir");
    if part("held") {
        held_release(work.path(), if full { 256 << 20 } else { 4 << 20 });
    }
    if !(part("replay") || part("restart") || part("rss")) {
        return;
    }
    let pki = Pki::generate(work.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, work.path(), false);
    if part("replay") {
        replay(&pki, &broker, work.path(), readings);
    }
    if part("restart") {
        restart(&pki, &broker, work.path(), spool_bytes);
    }
    if !part("rss") {
        return;
    }
    let sizes: &[u64] = if full {
        &[0, 64 << 20, 256 << 20, 1 << 30]
    } else {
        &[0, 4 << 20, 16 << 20]
    };
    for &size in sizes {
        rss(&pki, &broker, work.path(), size, None);
    }
    let live = Duration::from_secs(if full { 20 } else { 3 });
    for &size in sizes {
        rss(&pki, &broker, work.path(), size, Some(live));
    }
}

/// The peak RSS (VmHWM, KiB) of the process `pid`, as last seen.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The agent's peak RSS, read from /proc while it runs with a spool of `bytes`:
/// `live`: `None`, rate limits off, the whole spool sent, to the exit; `Some(d)`, the
/// default delivery settings (AWS's limits) for `d` of a live run.
fn rss(pki: &Pki, broker: &Broker, dir: &Path, bytes: u64, live: Option<Duration>) {
    let drain = live.is_none();
    let spool = dir.join(format!("spool-rss-{}", bytes >> 20));
    let one = {
        let mut v = Vec::new();
        redline_agent::spool::frame::encode(&batch(0), &mut v);
        v.len() as u64
    };
    let batches = bytes / one;
    fill(&spool, batches, 2 << 30);
    let mut cfg = config(pki, broker, dir, &spool);
    if !drain {
        let text = std::fs::read_to_string(&cfg).expect("read config");
        let text = text
            .replace("max_publish_per_sec = 0\n", "")
            .replace("max_bytes_per_sec = 0\n", "");
        cfg = cfg.with_extension("limits.toml");
        std::fs::write(&cfg, text).expect("write config");
    }
    let t = Instant::now();
    let mut agent = support::agent();
    agent.args(["simulate", "--config"]).arg(&cfg);
    if drain {
        agent.args([
            "--duration",
            "100ms",
            "--speed",
            "max",
            "--start",
            "2030-01-01T00:00:00Z",
        ]);
    } else {
        agent.args(["--duration", "1h", "--speed", "1"]);
    }
    let mut p = Proc::spawn("redline-agent", agent);
    let pid = p.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(k) = vm_hwm_kib(pid) {
                    peak = peak.max(k);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    if let Some(d) = live {
        std::thread::sleep(d);
    }
    let status = if drain {
        p.wait_or_panic(Duration::from_secs(1800))
    } else {
        p.terminate()
    };
    let took = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = poller.join().unwrap_or(0);
    let stderr = p.stderr_text();
    if drain {
        assert!(status.success(), "agent failed: {stderr}");
        assert!(
            !stderr.contains("spool keeps"),
            "the spool was not drained: {stderr}"
        );
        println!(
            "RSS draining a {} MiB spool ({batches} batches) to Mosquitto, rate limits off, every batch acknowledged: VmHWM {:.1} MiB ({peak} KiB), {:.1} s to exit",
            bytes >> 20,
            peak as f64 / 1024.0,
            took.as_secs_f64()
        );
    } else {
        println!(
            "RSS in {} s of a live run with a {} MiB spool ({batches} batches), default delivery limits: VmHWM {:.1} MiB ({peak} KiB)",
            live.map_or(0, |d| d.as_secs()),
            bytes >> 20,
            peak as f64 / 1024.0,
        );
    }
    let _ = std::fs::remove_dir_all(&spool);
}

/// A spool whose held segments (batches of a boot whose clock never became trusted) hold
/// `bytes`: the restart (open, nothing read of them) and the release once the offset of
/// that boot is known (only the held segments read, converted, appended to the log).
fn held_release(dir: &Path, bytes: u64) {
    let spool = dir.join("spool-held");
    let boot = [0x5a; 16];
    let opts = Options {
        dir: spool.clone(),
        segment_bytes: 8 << 20,
        max_bytes: 4 << 30,
    };
    let mut log = SpoolLog::open(opts.clone()).expect("open spool");
    let mut k = 0;
    while log.held_counts().2 < bytes {
        let mut b = batch(k);
        b.boot = Some(boot);
        log.append_held(&b, boot).expect("append held");
        k += 1;
    }
    // Some acknowledged data in the log too (deleted as it is acknowledged).
    log.close().expect("close");
    let t = Instant::now();
    let mut log = SpoolLog::open(opts).expect("open spool");
    let restart = t.elapsed();
    let read_at_start = log.frames_read;
    let t = Instant::now();
    let mut released = 0;
    while let Some((n, _, _)) = log
        .release_step(&boot, 1_700_000_000_000_000)
        .expect("release")
    {
        released += n;
    }
    log.sync().expect("sync");
    let release = t.elapsed();
    println!(
        "held for a clock: {k} batches ({} MiB): restart {:.1} ms ({read_at_start} frames read), release (converted, appended to the log, synced) {:.2} s for {released} batches",
        bytes >> 20,
        restart.as_secs_f64() * 1e3,
        release.as_secs_f64()
    );
    assert_eq!(released, k);
    drop(log);
    let _ = std::fs::remove_dir_all(&spool);
}

/// A realistic batch: ten records as the agent writes them.
fn batch(k: u64) -> Batch {
    let mut body = Vec::new();
    let mut ends = Vec::new();
    let t0 = support::START_MS + k as i64 * 1000;
    for i in 0..10 {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            format!(
                "{{\"vehicle_id\":\"{}\",\"timestamp\":{},\"session_id\":\"{}\",\"brake_disc_temp_fl\":{:.1},\"brake_disc_temp_fr\":{:.1},\"engine_rpm\":{},\"engine_oil_temp\":{:.1}}}",
                support::VEHICLE_ID,
                t0 + i * 100,
                support::SESSION_ID,
                600.0 + (k % 97) as f64,
                590.0 + (k % 89) as f64,
                6000 + (k * 37 + i as u64) % 2500,
                104.0 + (k % 7) as f64 / 10.0
            )
            .as_bytes(),
        );
        ends.push(body.len() as u32);
    }
    Batch {
        seq: 0,
        first_at: t0 * 1000,
        last_at: (t0 + 900) * 1000,
        body,
        ends,
        boot: None,
    }
}

fn fill(dir: &Path, batches: u64, max_bytes: u64) -> u64 {
    let mut log = SpoolLog::open(Options {
        dir: dir.to_path_buf(),
        segment_bytes: 8 << 20,
        max_bytes,
    })
    .expect("open spool");
    for k in 0..batches {
        log.append(&mut batch(k)).expect("append");
    }
    let bytes = log.bytes();
    log.close().expect("close");
    bytes
}

fn append_cost(n: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = SpoolLog::open(Options {
        dir: dir.path().to_path_buf(),
        segment_bytes: 8 << 20,
        max_bytes: 1 << 30,
    })
    .expect("open");
    let batches: Vec<Batch> = (0..n).map(batch).collect();
    let t = Instant::now();
    for b in &batches {
        let mut b = b.clone();
        log.append(&mut b).expect("append");
    }
    log.sync().expect("sync");
    let buffered = t.elapsed() / n as u32;
    let m = (n / 20).max(10);
    let t = Instant::now();
    for b in batches.iter().take(m as usize) {
        let mut b = b.clone();
        log.append(&mut b).expect("append");
        log.sync().expect("sync");
    }
    let synced = t.elapsed() / m as u32;
    println!(
        "append, one 10-record batch ({} bytes): {:?} written, {:?} with an fsync each (sync_interval = \"always\"); {n} batches",
        batches[0].body.len(),
        buffered,
        synced
    );
}

fn config(pki: &Pki, broker: &Broker, dir: &Path, spool: &Path) -> std::path::PathBuf {
    let spec = support::ConfigSpec {
        port: broker.tls_port,
        ca: &pki.ca,
        cert: &pki.client_cert,
        key: &pki.client_key,
        payload: "records",
    };
    let text = format!(
        "{}\n[spool]\ndir = {}\nmax_bytes = \"2GiB\"\n\n[delivery]\nmax_publish_per_sec = 0\nmax_bytes_per_sec = 0\nshutdown_timeout = \"10s\"\n",
        spec.render(),
        support::toml_path(spool)
    );
    let path = dir.join(format!(
        "bench-{}.toml",
        spool.file_name().and_then(|s| s.to_str()).unwrap_or("x")
    ));
    std::fs::write(&path, text).expect("write config");
    path
}

fn replay(pki: &Pki, broker: &Broker, dir: &Path, readings: usize) {
    let spool = dir.join("spool-replay");
    let batches = (readings / 10) as u64;
    fill(&spool, batches, 2 << 30);
    let cfg = config(pki, broker, dir, &spool);
    let mut sub = Subscriber::start(broker);
    let t = Instant::now();
    let mut agent = support::agent();
    agent.args(["simulate", "--config"]).arg(&cfg).args([
        "--duration",
        "100ms",
        "--speed",
        "max",
        "--start",
        "2030-01-01T00:00:00Z",
    ]);
    let mut p = Proc::spawn("redline-agent", agent);
    let status = p.wait_or_panic(Duration::from_secs(120));
    let took = t.elapsed();
    sub.sync();
    let msgs = sub.telemetry();
    // Delivered: distinct readings of the stored backlog. A duplicate (a batch re-sent after
    // a cut) is counted apart, never towards the delivered total.
    let mut seen = std::collections::BTreeSet::new();
    let mut records = 0usize;
    for (_, m) in &msgs {
        let v: serde_json::Value = serde_json::from_str(m).expect("telemetry is JSON");
        for r in v["records"].as_array().expect("{\"records\":[...]}") {
            records += 1;
            seen.insert(r["timestamp"].as_i64().expect("timestamp"));
        }
    }
    let stored: std::collections::BTreeSet<i64> = (0..batches as i64)
        .flat_map(|k| (0..10).map(move |i| support::START_MS + k * 1000 + i * 100))
        .collect();
    let delivered = seen.intersection(&stored).count();
    let duplicates = records - seen.len();
    assert!(status.success(), "agent failed: {}", p.stderr_text());
    assert_eq!(
        delivered, readings,
        "only {delivered} of the {readings} stored readings arrived ({duplicates} duplicates not counted)"
    );
    println!(
        "replay of {readings} stored readings ({batches} batches) to Mosquitto over mutual TLS, rate limits off: {:.2} s from start to exit, {} messages, {delivered} distinct readings delivered, {duplicates} duplicate(s)",
        took.as_secs_f64(),
        msgs.len()
    );
}

fn restart(pki: &Pki, broker: &Broker, dir: &Path, bytes: u64) {
    let spool = dir.join("spool-full");
    let one = {
        let mut v = Vec::new();
        redline_agent::spool::frame::encode(&batch(0), &mut v);
        v.len() as u64
    };
    let t = Instant::now();
    let filled = fill(&spool, bytes / one, 2 << 30);
    println!(
        "filled a spool with {} MiB of unacknowledged batches in {:.1} s",
        filled >> 20,
        t.elapsed().as_secs_f64()
    );
    let cfg = config(pki, broker, dir, &spool);
    let sub = Subscriber::start(broker);
    let before = sub.telemetry().len();
    let t = Instant::now();
    let mut agent = support::agent();
    agent
        .args(["simulate", "--config"])
        .arg(&cfg)
        .args(["--duration", "1h", "--speed", "1"]);
    let mut p = Proc::spawn("redline-agent", agent);
    let first = support::process::poll(Duration::from_secs(30), || {
        (sub.telemetry().len() > before).then(Instant::now)
    });
    let _ = p.terminate();
    match first {
        Some(at) => println!(
            "restart with a {} MiB spool to the first message at the subscriber: {:.3} s",
            filled >> 20,
            (at - t).as_secs_f64()
        ),
        None => panic!("no message within 30 s of the restart: {}", p.stderr_text()),
    }
}
