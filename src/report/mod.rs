//! What the agent tells people and monitoring: `status` ([`status`]), `doctor` ([`doctor`]),
//! Prometheus metrics and NFD labels ([`metrics`]), and the daemon's D-Bus properties as a
//! client reads them ([`bus`]).

pub mod bus;
pub mod doctor;
pub mod metrics;
pub mod status;
pub mod usable;
