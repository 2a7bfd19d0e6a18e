//! The `nvdriver-agent` command line: parse, call the library, print, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::error;

use nvdriver_agent::app::{self, exit, CommandError, Context};
use nvdriver_agent::boot::load::{self, LoadOutcome, Prepared};
use nvdriver_agent::cli::overlay as overlay_cmd;
use nvdriver_agent::config::ConfigSource;
use nvdriver_agent::daemon::{self, DaemonError};
use nvdriver_agent::host::{HostFacts, Root};
use nvdriver_agent::kmod::sys::{Kernel, LinuxKernel, SimulatedKernel};
use nvdriver_agent::modinfo;
use nvdriver_agent::overlay::pack;
use nvdriver_agent::overlay::store::ImportOutcome;
use nvdriver_agent::report::{bus as agent_bus, doctor, status};
use nvdriver_agent::update::stage::{self, NextBootReadiness, StageError, Target};
use nvdriver_agent::watch;

/// Keeps precompiled NVIDIA driver overlays loaded across kernel updates.
#[derive(Debug, Parser)]
#[command(name = "nvdriver-agent", version, about, long_about = None)]
struct Cli {
    /// Resolve every host path under DIR (a whole fake host for tests).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    root: PathBuf,

    /// Read this config file (after the built-in defaults) instead of
    /// /usr/lib/nvdriver-agent/config.toml, /etc/nvdriver-agent/config.toml and config.d/*.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Do not call the kernel: simulate it inside --root and record every syscall to
    /// <root>/run/nvdriver-agent/simulated-kernel.log (for tests and demos).
    #[arg(long, global = true, hide = true)]
    simulate_kernel: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what `load` would do for the running kernel, touching nothing.
    Plan {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Load the driver for the running kernel from the store and hand it to containers.
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
    /// the [fallback] policy); 1 or 2 when status itself failed.
    Status {
        /// Machine-readable output (format documented in the README).
        #[arg(long)]
        json: bool,
    },
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

#[derive(Debug, Subcommand)]
enum OverlayCommand {
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
        #[arg(long, value_name = "DIR", required_unless_present = "out_archive")]
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
    /// Remove overlays of kernels no longer needed: all but the running kernel's, the --keep
    /// kernels' and the stage.keep-extra newest others; also removes leftovers of interrupted
    /// stages.
    Gc {
        /// Kernel release whose overlays are kept (repeatable).
        #[arg(long, value_name = "KVER")]
        keep: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    #[cfg(feature = "failpoints")]
    let _failpoints = nvdriver_agent::failpoints::setup();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .chain()
                .find_map(|cause| {
                    cause
                        .downcast_ref::<CommandError>()
                        .map(CommandError::exit_code)
                        .or_else(|| {
                            cause
                                .downcast_ref::<StageError>()
                                .map(StageError::exit_code)
                        })
                        .or_else(|| {
                            cause
                                .downcast_ref::<DaemonError>()
                                .map(DaemonError::exit_code)
                        })
                })
                .unwrap_or(exit::FAILURE);
            error!("{e:#}");
            eprintln!("nvdriver-agent: error: {e:#}");
            app::notify_status(&format!("failed: {e}"), false);
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::prelude::*;
    let level = match verbose {
        0 => tracing::Level::INFO,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    // Under systemd, stderr is the journal: send structured entries instead.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            // Fields under their own names (KERNEL_RELEASE, DRIVER_VERSION, OVERLAY), not
            // F_KERNEL_RELEASE: `journalctl KERNEL_RELEASE=…` is how operators filter.
            let journald = journald.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(journald.with_filter(filter))
                .init();
            return;
        }
    }
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level)
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let root = Root::new(&cli.root);
    let source = match &cli.config {
        Some(file) => ConfigSource::File(file.clone()),
        None => ConfigSource::Layered,
    };
    let mut kernel: Box<dyn Kernel> = if cli.simulate_kernel {
        Box::new(SimulatedKernel::new(root.clone()))
    } else {
        Box::new(LinuxKernel)
    };
    match cli.command {
        Command::Plan { json } => {
            let ctx = Context::new(root, &source)?;
            match load::prepare_load(&ctx, kernel.as_ref())? {
                Prepared::Ready(prepared) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&prepared.plan)?);
                    } else {
                        print!("{}", render_plan(&prepared.plan));
                    }
                    Ok(exit::OK)
                }
                Prepared::NoOverlay { kernel_release } => {
                    let store = ctx.settings.store_dir.display();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"kernel_release": kernel_release, "overlay": null, "store": store.to_string()})
                        );
                    } else {
                        println!("no overlay for kernel {kernel_release} in {store}: load would do nothing");
                    }
                    Ok(exit::NO_OVERLAY)
                }
            }
        }
        Command::Load => {
            let ctx = Context::new(root, &source)?;
            match load::load(&ctx, kernel.as_mut())? {
                LoadOutcome::Loaded { plan, report } => {
                    let status = if report.is_noop() {
                        format!(
                            "driver {} already loaded for {}",
                            plan.driver_version, plan.kernel_release
                        )
                    } else {
                        format!(
                            "driver {} loaded for {} (modules: {})",
                            plan.driver_version,
                            plan.kernel_release,
                            report.loaded.join(", ")
                        )
                    };
                    println!("{status}");
                    app::notify_status(&status, true);
                    Ok(exit::OK)
                }
                LoadOutcome::NoOverlayWarned { kernel_release } => {
                    let status =
                        format!("no overlay for kernel {kernel_release}; driver not loaded");
                    println!("{status}");
                    app::notify_status(&status, true);
                    Ok(exit::OK)
                }
            }
        }
        Command::Run => {
            let ctx = Context::new(root, &source)?;
            daemon::run(&ctx, &source, kernel.as_mut())?;
            Ok(exit::OK)
        }
        Command::Stage {
            now,
            kernel: kernel_release,
            driver,
        } => {
            let ctx = Context::new(root, &source)?;
            let in_process = now || kernel_release.is_some() || driver.is_some();
            if !in_process {
                if let Some(pid) = nvdriver_agent::state::instance::running_pid(&ctx.root) {
                    nvdriver_agent::state::instance::poke(pid).map_err(|e| {
                        anyhow::anyhow!("cannot signal the daemon (pid {pid}): {e}")
                    })?;
                    println!("asked the running daemon (pid {pid}) to look again; `nvdriver-agent status` shows the result");
                    return Ok(exit::OK);
                }
            }
            let target = match kernel_release {
                Some(kernel_release) => Target::Kernel(kernel_release),
                None => {
                    let host = HostFacts::read(&ctx.root).map_err(CommandError::from)?;
                    let family = watch::choose(ctx.settings.detector, &ctx.root, &host.os)
                        .ok_or(StageError::DetectorOff)?;
                    Target::Detect {
                        family,
                        update_engine: nvdriver_agent::state::last_update_engine_state(&ctx.root),
                    }
                }
            };
            let run = stage::stage_next(&ctx, &target, driver.as_deref())?;
            match (&run.pending, &run.record) {
                (None, _) => println!("no kernel update pending: nothing to stage"),
                (Some(next), Some(record)) => println!(
                    "next kernel {} ({}): {}{}",
                    next.kernel_release,
                    next.origin,
                    record.result,
                    record
                        .detail
                        .as_deref()
                        .or(record.source.as_deref())
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
                (Some(next), None) => println!("next kernel {}", next.kernel_release),
            }
            let failed = run
                .record
                .as_ref()
                .is_some_and(|r| r.result == nvdriver_agent::state::StageResult::Failed);
            Ok(match run.readiness {
                NextBootReadiness::Covered => exit::OK,
                // Some source had an overlay, but only an invalid one.
                NextBootReadiness::Missing if failed => exit::INVALID_OVERLAY,
                NextBootReadiness::Missing => exit::NO_OVERLAY,
            })
        }
        Command::Status { json } => {
            let ctx = Context::new(root, &source)?;
            let mut report = status::gather(&ctx)?;
            if report.daemon_pid.is_some() {
                match agent_bus::read_daemon_properties() {
                    Ok(daemon) => agent_bus::merge_daemon_view(&mut report, &daemon),
                    Err(e) => tracing::debug!("{e}; status read from disk"),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(report.readiness.exit_code())
        }
        Command::Doctor { json } => {
            let ctx = Context::new(root, &source)?;
            let checks = doctor::diagnose(&doctor::gather(&ctx)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", doctor::render(&checks));
            }
            let failed = checks.iter().any(|c| c.verdict == doctor::Verdict::Fail);
            Ok(if failed { exit::FAILURE } else { exit::OK })
        }
        Command::Overlay(OverlayCommand::Verify { dir }) => {
            let manifest = overlay_cmd::overlay_verify(&dir)?;
            let modules = overlay_cmd::overlay_verify_modules(&dir, &manifest)?;
            println!(
                "{}: valid overlay for kernel {} driver {} ({}, {}): {} files, {} links, modules: {}",
                dir.display(),
                manifest.kernel_release,
                manifest.driver_version,
                manifest.arch,
                serde_json::to_value(manifest.flavor)?.as_str().unwrap_or_default(),
                manifest.files.len(),
                manifest.symlinks.len(),
                modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            );
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::Import { dir }) => {
            let ctx = Context::new(root, &source)?;
            let outcome = overlay_cmd::overlay_import(&ctx, &dir)?;
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::Pack {
            modules,
            firmware,
            userspace,
            out_dir,
            out_archive,
            arch,
            sign,
        }) => {
            let input = pack::PackInput {
                modules,
                firmware,
                userspace,
                arch: arch.unwrap_or_else(nvdriver_agent::host::machine_arch),
            };
            let mut packed = pack::plan(&input)?;
            if let Some(key_file) = &sign {
                let secret = std::fs::read_to_string(key_file).with_context(|| {
                    format!("{}: cannot read the secret key", key_file.display())
                })?;
                let password = std::env::var("NVDRIVER_AGENT_SIGN_PASSWORD").ok();
                packed.sign(&secret, password, key_file)?;
            }
            if let Some(dir) = &out_dir {
                packed.write_dir(dir)?;
                println!("wrote {}", dir.display());
            }
            if let Some(file) = &out_archive {
                packed.write_archive(file)?;
                let digest = nvdriver_agent::overlay::verify::sha256_reader(
                    std::fs::File::open(file)?,
                    u64::MAX,
                )?
                .1;
                println!("wrote {} (sha256 {digest})", file.display());
            }
            let m = &packed.manifest;
            println!(
                "overlay for kernel {} driver {} ({}): {} files, {} links{}",
                m.kernel_release,
                m.driver_version,
                m.arch,
                m.files.len(),
                m.symlinks.len(),
                if packed.signature.is_some() {
                    ", signed"
                } else {
                    ""
                }
            );
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::Inspect { reference, json }) => {
            let ctx = Context::new(root, &source)?;
            let inspection = nvdriver_agent::overlay::inspect::inspect(
                &ctx.root,
                &ctx.settings.stage,
                &reference,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inspection)?);
            } else {
                print!("{}", nvdriver_agent::overlay::inspect::render(&inspection));
            }
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::List) => {
            let ctx = Context::new(root, &source)?;
            let store = ctx.store();
            for (kernel_release, drivers) in store.inventory()? {
                for driver in drivers {
                    println!("{kernel_release}\t{driver}");
                }
            }
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::Fetch { kernel, driver }) => {
            let ctx = Context::new(root, &source)?;
            let report = overlay_cmd::overlay_fetch(&ctx, &kernel, driver.as_deref())?;
            for attempt in &report.tried {
                println!("tried {attempt}");
            }
            let (what, dir) = match &report.outcome {
                ImportOutcome::Imported { dir } => ("staged", dir),
                ImportOutcome::Replaced { dir } => ("staged (replacing a different copy)", dir),
                ImportOutcome::AlreadyPresent { dir } => ("already in the store", dir),
            };
            println!("{what}: {} from {}", dir.display(), report.source);
            Ok(exit::OK)
        }
        Command::Overlay(OverlayCommand::Gc { keep }) => {
            let ctx = Context::new(root, &source)?;
            for removed in overlay_cmd::overlay_gc(&ctx, &keep)? {
                println!("removed {}", removed.display());
            }
            Ok(exit::OK)
        }
        Command::Modinfo { files, json } => {
            let mut infos = Vec::new();
            for file in &files {
                let info = modinfo::read_module_file(file).map_err(CommandError::from)?;
                infos.push((file, info));
            }
            if json {
                let list: Vec<_> = infos
                    .iter()
                    .map(|(file, info)| serde_json::json!({"filename": file, "modinfo": info}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for (file, info) in &infos {
                    print!("{}", modinfo::modinfo_lines(info, file));
                }
            }
            Ok(exit::OK)
        }
    }
}

fn render_plan(plan: &nvdriver_agent::kmod::plan::LoadPlan) -> String {
    use nvdriver_agent::kmod::plan::{DriverRootStep, MajorSource, ToolkitStep};
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "kernel:       {} ({})", plan.kernel_release, plan.arch);
    let _ = writeln!(
        out,
        "overlay:      {} (driver {})",
        plan.overlay.display(),
        plan.driver_version
    );
    match &plan.firmware {
        Some(fw) if fw.change => {
            let _ = writeln!(
                out,
                "firmware:     set firmware_class.path = {}",
                fw.path.display()
            );
        }
        Some(fw) => {
            let _ = writeln!(
                out,
                "firmware:     firmware_class.path already {}",
                fw.path.display()
            );
        }
        None => {
            let _ = writeln!(out, "firmware:     none in overlay");
        }
    }
    for m in &plan.os_modules {
        let _ = writeln!(
            out,
            "os module:    {} ({:?}, {})",
            m.name, m.action, m.reason
        );
    }
    for (i, m) in plan.modules.iter().enumerate() {
        let _ = writeln!(
            out,
            "module {}:     {} {:?} {} [{}]{}",
            i + 1,
            m.name,
            m.action,
            m.file.display(),
            m.parameters,
            if m.signed { " signed" } else { "" }
        );
    }
    for n in &plan.device_nodes {
        let major = match &n.major {
            MajorSource::Fixed(m) => m.to_string(),
            MajorSource::ProcDevices(name) => format!("<{name} from /proc/devices>"),
        };
        let minor = n
            .minor
            .map(|m| m.to_string())
            .unwrap_or_else(|| "<per GPU>".into());
        let _ = writeln!(out, "device node:  {} c {major}:{minor}", n.path);
    }
    let root = match &plan.driver_root {
        DriverRootStep::Mount { source, path, .. } => {
            format!("mount {} read-only at {}", source.display(), path.display())
        }
        DriverRootStep::AlreadyMounted { path, .. } => {
            format!("{} (already mounted)", path.display())
        }
        DriverRootStep::HostRoot => "/ (overlay has no user space)".into(),
    };
    let _ = writeln!(out, "driver root:  {root}");
    let toolkit = match &plan.toolkit {
        ToolkitStep::Unchanged { config, root } => {
            format!("{} root = {root:?} (unchanged)", config.display())
        }
        ToolkitStep::Set {
            config,
            root,
            previous,
        } => format!("{} root: {previous:?} -> {root:?}", config.display()),
        ToolkitStep::Create { config, root } => {
            format!("create {} with root = {root:?}", config.display())
        }
        ToolkitStep::NotManaged => "not managed".into(),
    };
    let _ = writeln!(out, "toolkit:      {toolkit}");
    let _ = writeln!(out, "driver-ready: {}", plan.driver_ready.display());
    for w in &plan.warnings {
        let _ = writeln!(out, "warning:      {w}");
    }
    out
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
