//! Writes `overlay.toml` for a root-shaped tree: every regular file with its size, sha256 and
//! mode, every symbolic link with its target. `tests/vm/run` packs its fixture modules with it;
//! `nvdriver-agent overlay verify DIR` checks the result.
//!
//! ```text
//! cargo run --release --example pack-overlay -- DIR KERNEL_RELEASE DRIVER_VERSION
//! ```
//!
//! It records what is there and checks nothing about it (a tree of modules built for another
//! kernel packs fine): refusing bad overlays is the agent's job, and the VM tests need one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nvdriver_agent::overlay::manifest::{
    FileEntry, Flavor, Manifest, SymlinkEntry, FORMAT_VERSION, MANIFEST_NAME,
};
use nvdriver_agent::overlay::verify::sha256_reader;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, kernel_release, driver_version] = args.as_slice() else {
        eprintln!("usage: pack-overlay DIR KERNEL_RELEASE DRIVER_VERSION");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let mut manifest = Manifest {
        format: FORMAT_VERSION,
        kernel_release: kernel_release.clone(),
        driver_version: driver_version.clone(),
        arch: std::env::consts::ARCH.into(),
        flavor: Flavor::Open,
        files: Vec::new(),
        symlinks: Vec::new(),
    };
    if let Err(e) = walk(&dir, Path::new(""), &mut manifest) {
        eprintln!("pack-overlay: {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    // Sorted, so the same tree always gives the same manifest.
    manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
    manifest.symlinks.sort_by(|a, b| a.path.cmp(&b.path));
    if let Err(e) = fs::write(dir.join(MANIFEST_NAME), manifest.to_toml()) {
        eprintln!("pack-overlay: writing {MANIFEST_NAME}: {e}");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn walk(top: &Path, rel: &Path, manifest: &mut Manifest) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(top.join(rel))? {
        let entry = entry?;
        let path = rel.join(entry.file_name());
        if path == Path::new(MANIFEST_NAME) {
            continue;
        }
        let meta = fs::symlink_metadata(top.join(&path))?;
        if meta.is_dir() {
            walk(top, &path, manifest)?;
        } else if meta.is_symlink() {
            let target = fs::read_link(top.join(&path))?;
            manifest.symlinks.push(SymlinkEntry { path, target });
        } else if meta.is_file() {
            let (size, sha256) = sha256_reader(fs::File::open(top.join(&path))?, meta.len())?;
            // The format allows 0o644 and 0o755-like modes; keep the executable bits only.
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            manifest.files.push(FileEntry {
                path,
                size,
                sha256,
                mode,
            });
        } else {
            return Err(std::io::Error::other(format!(
                "{}: not a file, directory or symbolic link",
                path.display()
            )));
        }
    }
    Ok(())
}
