//! Writes an overlay tree for the staging benchmark (`bench/stage-throughput`): the usual
//! fixture NVIDIA modules, with `nvidia.ko` (uncompressed, as the open modules ship it) padded
//! to a real module's size with a section of incompressible pseudo-random bytes followed by
//! zeros.
//!
//! ```text
//! cargo run --release --example bench-overlay -- DIR KERNEL RANDOM_MIB ZERO_MIB
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use common::modules::FixtureModule;
use common::overlay::{OverlayBuilder, Packing, DRIVER};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, kernel, random_mib, zero_mib] = &args[..] else {
        eprintln!("usage: bench-overlay DIR KERNEL RANDOM_MIB ZERO_MIB");
        std::process::exit(2);
    };
    let mib = |s: &str| -> usize {
        s.parse::<usize>().unwrap_or_else(|_| {
            eprintln!("{s:?} is not a whole number of MiB");
            std::process::exit(2)
        }) << 20
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the overlay directory");
    let nvidia =
        FixtureModule::new("nvidia", kernel, DRIVER).padded(mib(random_mib), mib(zero_mib), 0x5eed);
    let manifest = OverlayBuilder::nvidia(kernel)
        .module(nvidia, Packing::Plain)
        .build(&dir);
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    println!(
        "{} {} {bytes}",
        manifest.driver_version,
        manifest.files.len()
    );
}
