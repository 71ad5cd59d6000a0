//! Operations: what every stage uses to be observed and kept honest. Counters (`stats`),
//! the status snapshot and file (`health`), the systemd watchdog (`notify`), log lines
//! (`logging`) and the wall clock's trust and the boot→UTC offset (`clock`).

pub mod clock;
pub mod health;
pub mod logging;
pub mod notify;
pub mod stats;
