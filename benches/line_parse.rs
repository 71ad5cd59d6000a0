//! Lines per second through framer + parser, per format, on a realistic 4-field line arriving
//! in 64-byte reads as from a USB serial adapter.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redline_agent::source::line_framer::LineFramer;
use redline_agent::source::line_protocol::{LineFormat, LineParser};
use std::hint::black_box;

const LINES: usize = 1000;
const READ: usize = 64;
const KEYS: [&str; 4] = [
    "brake_disc_temp_fl",
    "brake_disc_temp_fr",
    "engine_rpm",
    "oil_temp",
];

fn formats() -> [(&'static str, LineFormat); 3] {
    let columns = vec![Some(0), Some(1), Some(2), Some(3)];
    [
        (
            "kv",
            LineFormat::Kv {
                keys: KEYS
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (k.to_string(), i))
                    .collect(),
            },
        ),
        (
            "csv",
            LineFormat::Csv {
                columns: columns.clone(),
            },
        ),
        (
            "nmea",
            LineFormat::Nmea {
                sentence: "RDLTM".into(),
                columns,
            },
        ),
    ]
}

/// `LINES` lines of slowly varying readings printed to one decimal, as sensors do.
fn stream(parser: &LineParser) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..LINES {
        let t = i as f64;
        let tenth = |v: f64| (v * 10.0).round() / 10.0;
        let car = [
            (0, tenth(650.0 + (t * 0.37).sin() * 40.0)),
            (1, tenth(645.0 + (t * 0.41).cos() * 40.0)),
            (2, (7800.0 + (t * 0.05).sin() * 900.0).round()),
            (3, tenth(105.0 + (t * 0.01).sin() * 3.0)),
        ];
        parser.format_line(&car, &mut out);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("line_parse");
    group.throughput(Throughput::Elements(LINES as u64));
    for (name, format) in formats() {
        let parser = LineParser::new(format).expect("valid format");
        let bytes = stream(&parser);
        let mut framer = LineFramer::new(512, true);
        let mut values = Vec::with_capacity(8);
        group.bench_function(name, |b| {
            b.iter(|| {
                let (mut taken, mut errors) = (0usize, 0usize);
                for read in black_box(&bytes).chunks(READ) {
                    framer.push(read, &mut |frame| match frame {
                        Ok(line) => {
                            values.clear();
                            parser.parse(line, &mut values, &mut |_| errors += 1);
                            taken += values.len();
                        }
                        Err(_) => errors += 1,
                    });
                }
                assert_eq!((taken, errors), (4 * LINES, 0));
                black_box(taken)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, line_parse);
criterion_main!(benches);
