//! The disk spool: every batch is written here before it is offered for publishing, and
//! leaves only when the broker has acknowledged it.

mod acks;
pub mod boots;
#[cfg(any(test, feature = "test-hooks"))]
pub mod fault;
pub mod frame;
pub mod held;
pub mod inspect;
pub mod log;
pub mod segment;
pub mod seqset;
pub mod service;

pub use log::{Options, SpoolLog};
pub use service::{Channels, Cmd, Parcel, Settings, SpoolStats};
