//! Before the reboot: one stage pass for the kernel the host boots next ([`stage`]) and the
//! hold that keeps an update from booting without its driver ([`hold`]).

pub mod hold;
pub mod stage;
