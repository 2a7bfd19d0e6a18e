//! Kernel modules: reading `.modinfo`, planning the load, and the thin syscall edge.

pub mod devices;
pub mod execute;
pub mod plan;
pub mod sys;
