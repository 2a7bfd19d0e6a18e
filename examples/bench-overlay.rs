//! Writes an overlay tree for the staging benchmark (`bench/stage-throughput`): the usual
//! fixture NVIDIA modules, with `nvidia.ko` (uncompressed, as the open modules ship it) padded
//! to a real module's size with a section of incompressible pseudo-random bytes followed by
//! zeros.
//!
//! ```text
//! cargo run --release --example bench-overlay -- DIR KERNEL RANDOM_MIB ZERO_MIB
//! cargo run --release --example bench-overlay -- --sha256 FILE
//! ```
//!
//! `--sha256 FILE` hashes FILE with the agent's own hasher (`sha2`, SHA-NI where the CPU has
//! it) and prints the digest and the seconds it took: the benchmark's hashing limit.

// The examples use a few of the test fixtures, not all of them.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use common::modules::FixtureModule;
use common::overlay::{OverlayBuilder, Packing, DRIVER};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, file] = &args[..] {
        if flag == "--sha256" {
            return hash_file(file);
        }
    }
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

/// Hash `file` the way the agent does (1 MiB reads into `sha2`), timing only the hashing loop.
fn hash_file(file: &str) {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut input = std::fs::File::open(file).expect("open the file to hash");
    let mut buffer = vec![0u8; 1 << 20];
    let mut hasher = Sha256::new();
    let start = std::time::Instant::now();
    loop {
        let n = input.read(&mut buffer).expect("read the file to hash");
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    println!("{digest} {:.6}", start.elapsed().as_secs_f64());
}
