//! What the agent hands to containers and to the node's other software once the driver is
//! loaded: the NVIDIA container toolkit's `config.toml` ([`toolkit`]), the GPU Operator's
//! `driver-ready` file ([`driver_ready`]) and a CDI spec ([`cdi`]).

pub mod cdi;
pub mod driver_ready;
pub mod output_file;
pub mod services;
pub mod toolkit;
