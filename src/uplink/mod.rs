//! The uplink: from the spool's batches to PUBACKs over one MQTT connection.
//!
//! `scheduler` decides what goes next (live before backlog, messages sized for the link,
//! the window of bytes in flight, overdue acknowledgements) from what `link_model` measures;
//! `connection` owns rumqttc's event loop and only moves bytes; `publisher` wires them,
//! applies AWS's rate limits and reports every acknowledged batch to the spool.

pub mod connection;
pub mod link_error;
pub mod link_model;
pub mod netwatch;
pub mod publisher;
pub mod rate_limit;
pub mod scheduler;
pub mod tls;
