//! Kernel modules: planning the load ([`plan`], pure), the thin syscall edge ([`sys`]; a
//! simulated kernel for tests), the device nodes ([`devices`], and the MIG/IMEX capability nodes, [`caps`]) and running a plan ([`execute`]).
//! What a module file says of itself is [`crate::modinfo`].

pub mod caps;
pub mod devices;
pub mod execute;
pub mod plan;
pub mod sys;
