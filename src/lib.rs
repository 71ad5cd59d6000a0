//! redline-agent: race-car telemetry from the ECU to AWS IoT Core.
//!
//! Data flows one way: `source` → `sampler` → `batch` → `spool` → `uplink`;
//! acknowledgements flow back once, from the uplink's scheduler to the spool.

pub mod batch;
pub mod can;
pub mod candump;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dbc;
pub mod gps_time;
pub mod health;
pub mod line_framer;
pub mod line_protocol;
pub mod logging;
pub mod notify;
pub mod pipeline;
pub mod preflight;
pub mod record;
pub mod reopen;
pub mod replay;
pub mod sampler;
pub mod serial;
pub mod signal;
pub mod simulator;
pub mod source;
pub mod spool;
pub mod stats;
pub mod tls;
pub mod units;
pub mod uplink;

pub use uplink::{link_error, publisher};
