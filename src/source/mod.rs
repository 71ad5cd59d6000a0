//! Sources: turn a wire (or a model) into `SourceEvent`s for the signal table.
//!
//! A CAN bus (`can`, decoded with a `dbc` file), a serial line (`serial`, cut into lines by
//! `line_framer` and parsed by `line_protocol`), a candump log (`replay` of `candump` lines)
//! and the simulated car (`simulator`, run by `sim_run`) all end in the same
//! `SignalUpdate`s, so a bench run exercises the path the car uses. `reopen` is the
//! back-off both live sources use when their device goes away.

pub mod can;
pub mod candump;
pub mod dbc;
pub mod line_framer;
pub mod line_protocol;
pub mod reopen;
pub mod replay;
pub mod serial;
pub mod sim_run;
pub mod simulator;
