//! Operations: what every stage uses to be observed and kept honest. Counters (`stats`),
//! the status snapshot and file (`health`), the systemd watchdog (`notify`), log lines
//! (`logging`), the wall clock's trust and the boot→UTC offset (`clock`), and GPS time
//! from the CAN bus as a clock source (`gps_time`).

pub mod clock;
pub mod gps_time;
pub mod health;
pub mod logging;
pub mod notify;
pub mod stats;
