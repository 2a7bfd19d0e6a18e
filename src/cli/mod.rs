//! The command line: the clap tree (also the source of the man pages, see examples/man.rs) and
//! the commands that only the command line runs. `src/main.rs` parses [`Cli`] and dispatches.

// The doc comments below are also the `--help` text and the man pages, written for a terminal:
// `<root>` and `[stage] sources` there are words, not HTML or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod overlay;

/// Keeps precompiled NVIDIA driver overlays loaded across kernel updates.
///
/// The whole command line: global options and one [`Command`].
#[derive(Debug, Parser)]
#[command(name = "nvdriver-agent", version, about, long_about = None)]
pub struct Cli {
    /// Resolve every host path under DIR (a whole fake host for tests).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// Read this config file (after the built-in defaults) instead of
    /// /usr/lib/nvdriver-agent/config.toml, /etc/nvdriver-agent/config.toml and config.d/*.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Do not call the kernel: simulate it inside --root and record every syscall to
    /// <root>/run/nvdriver-agent/simulated-kernel.log (for tests and demos).
    #[arg(long, global = true, hide = true)]
    pub simulate_kernel: bool,

    /// Stage through the unprivileged fetcher listening on SOCKET (nvdriver-agent-fetch.socket)
    /// instead of downloading and unpacking in this process. The shipped unit sets it.
    #[arg(
        long,
        global = true,
        value_name = "SOCKET",
        env = "NVDRIVER_AGENT_FETCHER"
    )]
    pub fetcher: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands (each has its own man page, `nvdriver-agent-NAME(8)`).
// Parsed once per process: `overlay build`'s many options make a large variant, and boxing it
// would only obscure the clap tree.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what `load` would do for the running kernel, touching nothing.
    Plan {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Load the driver for the running kernel from the store and hand it to containers.
    ///
    /// Idempotent: run it again after MIG reconfiguration (nvidia-smi mig, nvidia-mig-parted) to
    /// make the new /dev/nvidia-caps nodes and rewrite the CDI spec; nothing else changes.
    Load,
    /// The daemon: load the driver for the running kernel, then watch for the kernel the host
    /// boots next and stage its overlay before the reboot (run by nvdriver-agent.service).
    Run,
    /// Stage the overlay for the kernel the host boots next. With a daemon running, this asks
    /// it to look again and returns at once; with --now (or no daemon) it does the whole stage
    /// in this process and returns when done (the unit's ExecStop uses this at shutdown).
    Stage {
        /// Stage in this process and wait for the result, even when the daemon runs.
        #[arg(long)]
        now: bool,
        /// Stage for this kernel release instead of the detected next one (implies --now).
        #[arg(long, value_name = "KVER")]
        kernel: Option<String>,
        /// Stage this driver version instead of the pinned, loaded or stored one (implies --now).
        #[arg(long, value_name = "VERSION")]
        driver: Option<String>,
    },
    /// Show the running and the next kernel, the store, the last stage and any held update
    /// (from the running daemon over D-Bus where it answers, from disk otherwise).
    ///
    /// Exit status: 0 ready now and after the next reboot; 7 ready now, but the kernel booted
    /// next has no overlay staged (or which kernel boots next cannot be told); 8 not ready now (driver not loaded, or marked not ready by
    /// the [fallback] policy); 9 no NVIDIA GPU on this host (the boot load's nvidia init found
    /// none); 1 or 2 when status itself failed.
    Status {
        /// Machine-readable output (format: docs/schema/status.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Work with a held update (policy.missing-next-overlay = "hold").
    #[command(subcommand)]
    Hold(HoldCommand),
    /// Check, read-only, everything the driver needs: OS, kernel, pending kernel, module
    /// signing, nouveau, IOMMU, firmware path, device nodes, toolkit config, the store and the
    /// sources. One `ok`/`warn`/`fail` line each; exit status 1 when any check fails.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Work with overlays and the store.
    #[command(subcommand)]
    Overlay(OverlayCommand),
    /// Serve one request of the daemon as the unprivileged fetcher, then exit (run by
    /// nvdriver-agent-fetch.service): download, check and unpack the overlay into STATE_DIR/store,
    /// for the daemon to take over.
    FetchServe {
        /// Listen on this socket instead of the one systemd passes (LISTEN_FDS).
        #[arg(long, value_name = "SOCKET")]
        listen: Option<PathBuf>,
        /// The fetcher's own directory (systemd's StateDirectory=).
        #[arg(long, value_name = "DIR", env = "STATE_DIRECTORY")]
        state_dir: PathBuf,
    },
    /// Show what kernel module files say of themselves (like modinfo(8)).
    Modinfo {
        /// Module files (.ko, .ko.xz, .ko.zst).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// The subcommands of `nvdriver-agent hold` (pages `nvdriver-agent-hold-NAME(8)`).
#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Let the held update through now, without its overlay: remove the agent's reboot refusal
    /// and its ostree finalization lock (never one someone else took), record that the
    /// administrator released the hold for that kernel so it is not taken again, and ask the
    /// running daemon to drop its logind inhibitor. A later kernel is held again as usual.
    Release,
}

/// The subcommands of `nvdriver-agent overlay` (pages `nvdriver-agent-overlay-NAME(8)`).
#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// Check an overlay directory: manifest, every file's size and sha256, module vermagic.
    Verify {
        /// The overlay directory (holding overlay.toml); not resolved under --root.
        dir: PathBuf,
    },
    /// Verify an overlay directory and put it into the store atomically.
    Import {
        /// The overlay directory (holding overlay.toml); not resolved under --root.
        dir: PathBuf,
    },
    /// List the overlays in the store.
    List,
    /// Show what an overlay or image holds (manifest, modules and the kernel each was built
    /// for, signature status, digest) without staging it.
    Inspect {
        /// An overlay directory or archive (not resolved under --root), an http(s):// URL or
        /// an oci:// reference.
        reference: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Build an overlay from built modules, firmware and optional user space: a directory
    /// and/or a reproducible .tar.zst, with the kernel release and driver version read from the
    /// modules. Paths are not resolved under --root.
    #[command(arg_required_else_help = true)]
    Pack {
        /// Directory with the built nvidia*.ko* (kernel-open output, or /lib/modules/<kver>).
        #[arg(long, value_name = "DIR")]
        modules: PathBuf,
        /// Directory with the driver's firmware files (gsp_*.bin).
        #[arg(long, value_name = "DIR")]
        firmware: Option<PathBuf>,
        /// Root-shaped directory of user space to include as it is (usr/bin/…, usr/lib64/…).
        #[arg(long, value_name = "DIR")]
        userspace: Option<PathBuf>,
        /// Write the overlay tree here (must not exist).
        #[arg(long, value_name = "DIR", required_unless_present_any = ["out_archive", "push"])]
        out_dir: Option<PathBuf>,
        /// Write the overlay as a .tar.zst here.
        #[arg(long, value_name = "FILE")]
        out_archive: Option<PathBuf>,
        /// Target architecture (uname -m); defaults to this machine's.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// Sign the manifest with this minisign secret key (password of an encrypted key from
        /// NVDRIVER_AGENT_SIGN_PASSWORD).
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
        /// Push the archive to a registry as a one-layer OCI image (oci://REGISTRY/REPO:TAG;
        /// credentials from auth.json under --root, plain HTTP only for [oci]
        /// insecure-registries).
        #[arg(long, value_name = "REF")]
        push: Option<String>,
    },
    /// Build the NVIDIA kernel modules for one kernel from source and pack them as `pack`
    /// does: check the compiler against the kernel's, copy the source to a work directory,
    /// apply patches, build with all cores, strip debug info, optionally sign each module and
    /// the manifest, write a directory and/or a reproducible .tar.zst, optionally push it to
    /// an OCI registry. Paths are not resolved under --root.
    #[command(arg_required_else_help = true)]
    #[command(group(clap::ArgGroup::new("output").required(true).multiple(true).args(["out", "archive", "push"])))]
    Build {
        /// The kernel's build tree: /usr/src/linux-headers-<kver>, /usr/src/kernels/<kver> or
        /// /lib/modules/<kver>/build (the release is its UTS_RELEASE); or the packages holding
        /// it, unpacked together into the work directory (repeatable): a kernel-devel .rpm, or
        /// Debian's linux-headers-<kver>, linux-headers-<kver>-common and linux-kbuild .debs.
        #[arg(long, value_name = "PATH", required = true)]
        kernel_tree: Vec<PathBuf>,
        /// The NVIDIA source: an open-gpu-kernel-modules tree, its kernel-open directory,
        /// Debian's nvidia-open-kernel tree, a plain Kbuild external-module tree, or a tarball
        /// of any of these. Never modified: the build runs in a copy.
        #[arg(long, value_name = "PATH")]
        source: PathBuf,
        /// A patch applied with `patch -p1` to the copy of the source, in the order given
        /// (repeatable).
        #[arg(long, value_name = "FILE")]
        patch: Vec<PathBuf>,
        /// Directory with the driver's firmware files (gsp_*.bin).
        #[arg(long, value_name = "DIR")]
        firmware: Option<PathBuf>,
        /// Root-shaped directory of user space to include as it is (usr/bin/…, usr/lib64/…).
        #[arg(long, value_name = "DIR")]
        userspace: Option<PathBuf>,
        /// Sign every module with this private key and X.509 certificate (PEM), as the kernel's
        /// scripts/sign-file does (sha256).
        #[arg(long, num_args = 2, value_names = ["KEY", "CERT"])]
        sign_modules: Option<Vec<PathBuf>>,
        /// Sign the manifest with this minisign secret key (password of an encrypted key from
        /// NVDRIVER_AGENT_SIGN_PASSWORD).
        #[arg(long, value_name = "MINISIGN_KEY")]
        sign: Option<PathBuf>,
        /// Build even when the compiler is not the one the kernel was built with
        /// (CONFIG_CC_VERSION_TEXT).
        #[arg(long)]
        allow_compiler_mismatch: bool,
        /// Keep the modules' debug info (by default it is stripped with `strip --strip-debug`:
        /// nvidia.ko is about 185 MB with it).
        #[arg(long)]
        keep_debug: bool,
        /// Parallel make jobs; defaults to the number of CPUs.
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Build in this directory (created; an earlier build's src/, unpacked/ and modules/
        /// removed) and keep it, instead of a temporary one (removed, or kept when make fails).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Write the overlay tree here (must not exist).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Write the overlay as a .tar.zst here.
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
        /// Push the archive to a registry as a one-layer OCI image (oci://REGISTRY/REPO:TAG;
        /// credentials from auth.json under --root, plain HTTP only for [oci]
        /// insecure-registries).
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// Target architecture (uname -m); defaults to this machine's.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
    },
    /// Stage the overlay for a kernel from the configured [stage] sources into the store
    /// (tried in order; verified before it is published).
    Fetch {
        /// Kernel release (`uname -r` of the kernel the overlay is for).
        #[arg(long, value_name = "KVER")]
        kernel: String,
        /// Driver version; defaults to driver.version from the config.
        #[arg(long, value_name = "VER")]
        driver: Option<String>,
    },
    /// Remove overlays of kernels no longer needed: all but the running kernel's, the next
    /// boot's (found as the daemon finds it; when it cannot be read, every newer kernel's), the
    /// --keep kernels' and the stage.keep-extra newest others; also removes leftovers of
    /// interrupted stages.
    Gc {
        /// Kernel release whose overlays are kept (repeatable).
        #[arg(long, value_name = "KVER")]
        keep: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
