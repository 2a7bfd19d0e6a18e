//! What happens at boot: the load of the running kernel's overlay ([`load`]), the execution
//! of its plan against the kernel and the host ([`execute`]), and what the node does when that
//! load fails ([`fallback`]).

pub mod execute;
pub mod fallback;
pub mod load;
