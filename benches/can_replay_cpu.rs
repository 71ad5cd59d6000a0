//! The whole agent's CPU time replaying a one-hour log of a busy bus (2,000 frames/s,
//! 7.2 million frames) at `--speed max`, as a fraction of that hour. A bench binary:
//! `cargo bench --bench can_replay_cpu` runs the hour; under `cargo test` a minute.

use rand::{Rng, SeedableRng};
use redline_agent::source::can::GT3_DBC;
use redline_agent::source::dbc::Dbc;
use std::io::Write;
use std::process::Command;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds: u64 = if full { 3600 } else { 60 };
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("busy.log");
    let dbc = Dbc::from_text(GT3_DBC).expect("GT3 DBC");
    let ids: Vec<(u32, bool)> = dbc
        .messages()
        .iter()
        .map(|m| (m.id.id, m.id.extended))
        .collect();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&log).expect("create log"));
    let t0 = 1_705_267_200_000_000i64;
    let frames = seconds * 2000;
    for k in 0..frames {
        let t = t0 + (k as i64) * 500;
        let (id, ext) = ids[rng.random_range(0..ids.len())];
        let mut data = [0u8; 8];
        rng.fill(&mut data);
        data[0] &= 0x03; // keep TyreData's multiplexor valid
        let idtxt = if ext {
            format!("{id:08X}")
        } else {
            format!("{id:03X}")
        };
        let hex: String = data.iter().map(|b| format!("{b:02X}")).collect();
        writeln!(
            out,
            "({}.{:06}) can0 {idtxt}#{hex}",
            t / 1_000_000,
            t % 1_000_000
        )
        .expect("write");
    }
    out.flush().expect("flush");
    drop(out);
    let agent = env!("CARGO_BIN_EXE_redline-agent");
    // bash's `times` prints the children's user and system CPU time.
    let script = format!(
        "'{agent}' replay '{}' --stdout --speed max > /dev/null 2>&1; echo rc=$?; times",
        log.display()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&output.stdout);
    let children = text.lines().last().unwrap_or_default().to_string();
    let cpu: f64 = children
        .split_whitespace()
        .map(|t| {
            let (m, s) = t
                .trim_end_matches('s')
                .split_once('m')
                .unwrap_or(("0", "0"));
            m.parse::<f64>().unwrap_or(0.0) * 60.0 + s.parse::<f64>().unwrap_or(0.0)
        })
        .sum();
    assert!(text.contains("rc=0"), "replay failed: {text}");
    println!(
        "replay of {seconds} s of a 2,000 frames/s bus ({frames} frames): {cpu:.2} s of CPU (user+sys), {:.4}% of the logged time",
        100.0 * cpu / seconds as f64
    );
}
