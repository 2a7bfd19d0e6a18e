//! What happens at boot: the load of the running kernel's overlay ([`load`]: find it, check it,
//! plan with [`crate::kmod::plan`], execute with [`crate::kmod::execute`]) and what the node
//! does when that load fails ([`fallback`]).

pub mod fallback;
pub mod load;
