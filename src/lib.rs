//! redline-agent: race-car telemetry from the ECU to AWS IoT Core.
//!
//! Data flows one way: `source` → `sample` (signal table, sampler, batcher) → `spool` →
//! `uplink`; acknowledgements flow back once, from the uplink's scheduler to the spool.
//! `ops` holds what every stage uses (counters, status, watchdog, logs, clock); `config`
//! parses and validates the TOML; `pipeline` wires the stages; `cli` is the command line.
//! ARCHITECTURE.md walks through it.

// A function longer than clippy.toml's threshold has its reason written above it.
#![warn(clippy::too_many_lines)]

pub mod cli;
pub mod config;
pub mod ops;
pub mod pipeline;
pub mod preflight;
pub mod sample;
pub mod source;
pub mod spool;
pub mod units;
pub mod uplink;
