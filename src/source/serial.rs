//! The serial source: lines from a UART or USB adapter, framed, parsed and counted.
//!
//! The device may be missing at start, unplugged (EIO, ENODEV), or replaced: the source
//! reopens it with backoff for ever, logs one line per outage, and the fields go stale
//! meanwhile. A line is stamped when its end arrives.

use crate::config::{Config, Parity};
use crate::ops::clock::LiveClock;
use crate::ops::stats::Stats;
use crate::sample::signal::{SignalUpdate, SourceEvent};
use crate::source::line_framer::LineFramer;
use crate::source::line_protocol::{LineError, LineParser};
use crate::source::reopen::Reopen;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

pub fn builder(config: &Config) -> tokio_serial::SerialPortBuilder {
    let src = &config.source;
    let path = src
        .device
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let data_bits = match src.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match src.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = match src.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    tokio_serial::new(path, src.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
}

/// Reads the configured device until `stop`.
pub async fn run(
    config: &Config,
    parser: LineParser,
    clock: LiveClock,
    tx: mpsc::Sender<SourceEvent>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let device = config
        .source
        .device
        .as_ref()
        .map_or_else(String::new, |d| d.display().to_string());
    let builder = builder(config);
    let mut framer = LineFramer::new(config.source.max_line, false);
    let mut values = Vec::with_capacity(16);
    let mut buf = vec![0u8; 4096];
    let mut reopen = Reopen::new(format!("serial device {device}"));
    loop {
        let mut port = match builder.clone().open_native_async() {
            Ok(p) => p,
            Err(e) => {
                if !reopen.failed(e, &stop).await {
                    return;
                }
                continue;
            }
        };
        reopen.opened("");
        // Whatever arrives first may be the tail of a line cut by the reconnect.
        framer.reset(false);
        let lost = loop {
            let n = tokio::select! {
                r = port.read(&mut buf) => r,
                _ = stop.cancelled() => return,
            };
            let n = match n {
                Ok(0) => break "end of file".to_string(),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break e.to_string(),
            };
            let at = clock.now();
            let mut events = Vec::new();
            framer.push(&buf[..n], &mut |line| match line {
                Ok(line) => {
                    values.clear();
                    parser.parse(line, &mut values, &mut |err: LineError| {
                        stats.source_error(err.reason())
                    });
                    Stats::add(&stats.lines, 1);
                    events.extend(values.iter().map(|&(field, value)| {
                        SourceEvent::Update(SignalUpdate { field, value, at })
                    }));
                }
                Err(err) => stats.source_error(LineError::from(err).reason()),
            });
            for ev in events {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        };
        drop(port);
        if !reopen.lost(lost, &stop).await {
            return;
        }
    }
}
