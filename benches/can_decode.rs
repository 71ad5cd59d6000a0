//! Decoding throughput for a realistic frame mix of the GT3 bus (every message in
//! proportion to its cycle time): the four record fields bound (what the agent does), and
//! every signal bound (the worst case). `cargo bench --bench can_decode`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use redline_agent::source::can::{GT3_BINDINGS, GT3_DBC};
use redline_agent::source::dbc::{Dbc, Decoder};
use std::hint::black_box;

/// (id, extended, 8 data bytes): a shuffled second of the bus.
fn bus_mix(dbc: &Dbc) -> Vec<(u32, bool, [u8; 8])> {
    // Frames per second by message, as on the car (engine 100 Hz, brakes 20 Hz, ...).
    let rate = |name: &str| match name {
        "Engine" | "WheelSpeeds" | "Accelerations" | "SteeringAngle" => 100,
        "BrakePressures" | "Drivetrain" => 50,
        "BrakeTemps" | "EngineTemps" => 20,
        "TyreData" => 8,
        _ => 10,
    };
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let mut frames = Vec::new();
    for m in dbc.messages() {
        for _ in 0..rate(&m.name) {
            let mut data = [0u8; 8];
            rng.fill(&mut data);
            if m.name == "TyreData" {
                data[0] &= 0x03;
            }
            frames.push((m.id.id, m.id.extended, data));
        }
    }
    for i in (1..frames.len()).rev() {
        frames.swap(i, rng.random_range(0..=i));
    }
    frames
}

fn bench(c: &mut Criterion) {
    let dbc = Dbc::from_text(GT3_DBC).expect("GT3 DBC");
    let frames = bus_mix(&dbc);
    let four: Vec<_> = GT3_BINDINGS
        .iter()
        .enumerate()
        .map(|(i, (_, s))| {
            let (m, sig) = s.split_once('.').expect("Message.Signal");
            (dbc.signal(m, sig).expect("bound"), i)
        })
        .collect();
    let mut all = Vec::new();
    for m in dbc.messages() {
        for s in &m.signals {
            all.push((dbc.signal(&m.name, &s.name).expect("signal"), all.len()));
        }
    }
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(frames.len() as u64));
    for (name, bindings) in [("four_fields", &four), ("every_signal", &all)] {
        let mut decoder = Decoder::new(&dbc, bindings).expect("decoder");
        let mut out = Vec::with_capacity(64);
        group.bench_function(name, |b| {
            b.iter(|| {
                for (id, ext, data) in &frames {
                    out.clear();
                    let _ = decoder.decode(*id, *ext, data, &mut out);
                    black_box(&out);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
