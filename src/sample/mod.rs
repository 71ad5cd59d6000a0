//! Sampling: the latest value of every field (`signal`), one `Reading` per tick
//! (`sampler`), rendered as a record (`record`), closed into batches (`batch`).

pub mod batch;
pub mod record;
pub mod sampler;
pub mod signal;
