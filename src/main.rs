//! The `nvdriver-agent` command line: parse, call the library, print, map errors to exit codes.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tracing::error;

use nvdriver_agent::app::{self, exit, CommandError, Context};
use nvdriver_agent::boot::load::{self, LoadOutcome, Prepared};
use nvdriver_agent::cli::overlay as overlay_cmd;
use nvdriver_agent::cli::{Cli, Command, HoldCommand, OverlayCommand};
use nvdriver_agent::config::ConfigSource;
use nvdriver_agent::daemon::{self, DaemonError};
use nvdriver_agent::host::{HostFacts, Root};
use nvdriver_agent::kmod::plan::{
    DriverRootStep, LoadPlan, MajorSource, ModuleAction, OsModuleAction, OsModuleStep, ToolkitStep,
};
use nvdriver_agent::kmod::sys::{Kernel, LinuxKernel, SimulatedKernel};
use nvdriver_agent::modinfo;
use nvdriver_agent::overlay::store::ImportOutcome;
use nvdriver_agent::overlay::{build, pack};
use nvdriver_agent::report::{bus as agent_bus, doctor, status};
use nvdriver_agent::update::hold::{HoldAction, HostLevers, LeverScope, OSTREE_FINALIZATION_LOCK};
use nvdriver_agent::update::stage::{self, NextBootReadiness, StageError, Target};
use nvdriver_agent::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let to_journal = init_logging(cli.verbose);
    #[cfg(feature = "failpoints")]
    let _failpoints = nvdriver_agent::failpoints::setup();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report_error(&e, to_journal);
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// The exit code of the first cause that has one (exit codes: docs/usage/status-and-exit-codes.md).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    e.chain()
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
        .unwrap_or(exit::FAILURE)
}

/// Say what failed once: as a journal entry (priority err) under systemd, as one
/// `nvdriver-agent: error:` line on stderr otherwise. The stderr log layer would print the same
/// error a second time, so it is not used for this. Under systemd, a terminal on stderr (a
/// JOURNAL_STREAM inherited by a shell) still gets the line.
fn report_error(e: &anyhow::Error, to_journal: bool) {
    if to_journal {
        error!("{e:#}");
    }
    if !to_journal || std::io::stderr().is_terminal() {
        eprintln!("nvdriver-agent: error: {e:#}");
    }
    app::notify_status(&format!("failed: {e}"), false);
}

/// Log to the journal under systemd (JOURNAL_STREAM set), to stderr otherwise. Returns whether
/// the journal gets the logs.
fn init_logging(verbose: u8) -> bool {
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
            return true;
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level)
        .with_target(false)
        .init();
    false
}

/// What every subcommand is given: the host root, where the config comes from, and the kernel
/// it calls (the real one, or the one simulated under --root).
struct Invocation {
    root: Root,
    source: ConfigSource,
    kernel: Box<dyn Kernel>,
    /// `--fetcher`: the unprivileged fetcher's socket, when staging goes through it.
    fetcher: Option<PathBuf>,
}

impl Invocation {
    fn context(&self) -> anyhow::Result<Context> {
        let mut ctx = Context::new(self.root.clone(), &self.source)?;
        ctx.settings.stage.fetcher = self.fetcher.clone();
        Ok(ctx)
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let root = Root::new(&cli.root);
    let source = match &cli.config {
        Some(file) => ConfigSource::File(file.clone()),
        None => ConfigSource::Layered,
    };
    let kernel: Box<dyn Kernel> = if cli.simulate_kernel {
        Box::new(SimulatedKernel::new(root.clone()))
    } else {
        Box::new(LinuxKernel)
    };
    let mut inv = Invocation {
        root,
        source,
        kernel,
        fetcher: cli.fetcher.clone(),
    };
    match cli.command {
        Command::Plan { json } => plan(&inv, json),
        Command::Load => load_driver(&mut inv),
        Command::Run => {
            let ctx = inv.context()?;
            daemon::run(&ctx, &inv.source, inv.kernel.as_mut())?;
            Ok(exit::OK)
        }
        Command::Stage {
            now,
            kernel,
            driver,
        } => stage_next(&inv, now, kernel, driver),
        Command::Status { json } => show_status(&inv, json),
        Command::Hold(HoldCommand::Release) => hold_release(&inv),
        Command::Doctor { json } => doctor(&inv, json),
        Command::Overlay(command) => overlay(&inv, command),
        Command::Modinfo { files, json } => show_modinfo(&files, json),
        Command::FetchServe { listen, state_dir } => fetch_serve(&inv, listen, &state_dir),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `plan`: what `load` would do, touching nothing.
fn plan(inv: &Invocation, json: bool) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    match load::prepare_load(&ctx, inv.kernel.as_ref())? {
        Prepared::Ready(prepared) => {
            if json {
                print_json(&prepared.plan)?;
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
                println!(
                    "no overlay for kernel {kernel_release} in {store}: load would do nothing"
                );
            }
            Ok(exit::NO_OVERLAY)
        }
    }
}

/// `load`: load the driver for the running kernel.
fn load_driver(inv: &mut Invocation) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    let status = match load::load(&ctx, inv.kernel.as_mut())? {
        LoadOutcome::Loaded { plan, report } if report.is_noop() => format!(
            "driver {} already loaded for {}",
            plan.driver_version, plan.kernel_release
        ),
        LoadOutcome::Loaded { plan, report } => format!(
            "driver {} loaded for {} (modules: {})",
            plan.driver_version,
            plan.kernel_release,
            report.loaded.join(", ")
        ),
        LoadOutcome::NoOverlayWarned { kernel_release } => {
            format!("no overlay for kernel {kernel_release}; driver not loaded")
        }
    };
    println!("{status}");
    app::notify_status(&status, true);
    Ok(exit::OK)
}

/// `stage`: ask the daemon to look again, or stage in this process.
fn stage_next(
    inv: &Invocation,
    now: bool,
    kernel_release: Option<String>,
    driver: Option<String>,
) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    let in_process = now || kernel_release.is_some() || driver.is_some();
    if !in_process {
        if let Some(pid) = nvdriver_agent::state::instance::running_pid(&ctx.root) {
            nvdriver_agent::state::instance::poke(pid)
                .map_err(|e| anyhow::anyhow!("cannot signal the daemon (pid {pid}): {e}"))?;
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
    let mut levers = HostLevers::new(ctx.root.clone(), LeverScope::OneShot);
    let run = stage::stage_next(&ctx, &target, driver.as_deref(), &mut levers)?;
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
    let no_room = run
        .record
        .as_ref()
        .is_some_and(|r| r.result == nvdriver_agent::state::StageResult::NoRoom);
    // Held on ostree: with the finalization lock in place (ours, or Zincati's), ostree does not
    // finalize the staged deployment and the next boot is this one, whose driver is loaded.
    // Not a failure: at shutdown (ExecStop=) it would mark the unit failed at every held reboot.
    let held_here = matches!(run.hold, Some(HoldAction::Take { .. }))
        && ctx.root.join(OSTREE_FINALIZATION_LOCK).exists();
    if held_here && run.readiness == NextBootReadiness::Missing {
        println!(
            "held: ostree will not finalize the staged deployment ({OSTREE_FINALIZATION_LOCK} is in place); the next boot stays on this deployment and its driver"
        );
        return Ok(exit::OK);
    }
    Ok(match run.readiness {
        NextBootReadiness::Covered => exit::OK,
        NextBootReadiness::Missing if no_room => exit::NO_ROOM,
        // Some source had an overlay, but only an invalid one.
        NextBootReadiness::Missing if failed => exit::INVALID_OVERLAY,
        NextBootReadiness::Missing => exit::NO_OVERLAY,
    })
}

/// `hold release`: let a held update through, now and for good (for that kernel).
fn hold_release(inv: &Invocation) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    let mut levers = HostLevers::new(ctx.root.clone(), LeverScope::OneShot);
    let released = nvdriver_agent::update::hold::release_by_administrator(&ctx.root, &mut levers)?;
    match &released {
        Some(r) if r.kernel_release.is_empty() => println!("released the hold taken while the next kernel could not be told; it is not taken again for that"),
        Some(r) => println!("released the hold on the update to {}; it is not held again for that kernel", r.kernel_release),
        None => println!("no update was held (any reboot refusal or ostree lock of ours is removed anyway)"),
    }
    if let Some(pid) = nvdriver_agent::state::instance::running_pid(&ctx.root) {
        nvdriver_agent::state::instance::poke_hold_released(pid).map_err(|e| {
            anyhow::anyhow!("cannot signal the daemon (pid {pid}) to drop its logind inhibitor: {e}; `systemctl restart nvdriver-agent` does")
        })?;
        println!("told the running daemon (pid {pid}) to drop its logind inhibitor");
    }
    Ok(exit::OK)
}

/// `status`: from the daemon over D-Bus where it answers, from disk otherwise.
fn show_status(inv: &Invocation, json: bool) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    let mut report = status::gather(&ctx)?;
    if report.daemon_pid.is_some() {
        match agent_bus::read_daemon_properties() {
            Ok(daemon) => agent_bus::merge_daemon_view(&mut report, &daemon),
            Err(e) => tracing::debug!("{e}; status read from disk"),
        }
    }
    if json {
        print_json(&report)?;
    } else {
        print!("{}", status::render(&report));
    }
    Ok(report.readiness.exit_code())
}

/// `doctor`: read-only checks; exit status 1 when any fails.
fn doctor(inv: &Invocation, json: bool) -> anyhow::Result<u8> {
    let ctx = inv.context()?;
    let checks = doctor::diagnose(&doctor::gather(&ctx)?);
    if json {
        print_json(&checks)?;
    } else {
        print!("{}", doctor::render(&checks));
    }
    let failed = checks.iter().any(|c| c.verdict == doctor::Verdict::Fail);
    Ok(if failed { exit::FAILURE } else { exit::OK })
}

/// `overlay …`.
fn overlay(inv: &Invocation, command: OverlayCommand) -> anyhow::Result<u8> {
    match command {
        OverlayCommand::Verify { dir } => overlay_verify(&dir)?,
        OverlayCommand::Import { dir } => {
            let outcome = overlay_cmd::overlay_import(&inv.context()?, &dir)?;
            println!("{}", serde_json::to_string(&outcome)?);
        }
        OverlayCommand::List => {
            for (kernel_release, drivers) in inv.context()?.store().inventory()? {
                for driver in drivers {
                    println!("{kernel_release}\t{driver}");
                }
            }
        }
        OverlayCommand::Inspect { reference, json } => {
            let ctx = inv.context()?;
            let inspection = nvdriver_agent::overlay::inspect::inspect(
                &ctx.root,
                &ctx.settings.stage,
                &reference,
            )?;
            if json {
                print_json(&inspection)?;
            } else {
                print!("{}", nvdriver_agent::overlay::inspect::render(&inspection));
            }
        }
        OverlayCommand::Pack {
            modules,
            firmware,
            userspace,
            out_dir,
            out_archive,
            arch,
            sign,
            push,
        } => {
            let input = pack::PackInput {
                modules,
                firmware,
                userspace,
                arch: arch.unwrap_or_else(nvdriver_agent::host::machine_arch),
            };
            overlay_pack(inv, &input, sign, out_dir, out_archive, push)?;
        }
        OverlayCommand::Build {
            kernel_tree,
            source,
            patch,
            firmware,
            userspace,
            sign_modules,
            sign,
            allow_compiler_mismatch,
            keep_debug,
            jobs,
            work_dir,
            out,
            archive,
            push,
            arch,
        } => {
            let request = build::BuildRequest {
                kernel_tree,
                source,
                patches: patch,
                firmware,
                userspace,
                sign_modules: sign_modules.map(|pair| (pair[0].clone(), pair[1].clone())),
                allow_compiler_mismatch,
                keep_debug,
                jobs: jobs.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                }),
                work_dir,
                arch: arch.unwrap_or_else(nvdriver_agent::host::machine_arch),
                env_cc: std::env::var("CC").ok(),
                terminal: std::io::stderr().is_terminal() && std::env::var_os("CI").is_none(),
            };
            overlay_build(inv, &request, sign, out, archive, push)?;
        }
        OverlayCommand::Fetch { kernel, driver } => {
            overlay_fetch(&inv.context()?, &kernel, driver.as_deref())?
        }
        OverlayCommand::Gc { keep } => {
            for removed in overlay_cmd::overlay_gc(&inv.context()?, &keep)? {
                println!("removed {}", removed.display());
            }
        }
    }
    Ok(exit::OK)
}

/// `overlay verify`.
fn overlay_verify(dir: &std::path::Path) -> anyhow::Result<()> {
    let manifest = overlay_cmd::overlay_verify(dir)?;
    let modules = overlay_cmd::overlay_verify_modules(dir, &manifest)?;
    println!(
        "{}: valid overlay for kernel {} driver {} ({}, {}): {} files, {} links, modules: {}",
        dir.display(),
        manifest.kernel_release,
        manifest.driver_version,
        manifest.arch,
        serde_json::to_value(manifest.flavor)?
            .as_str()
            .unwrap_or_default(),
        manifest.files.len(),
        manifest.symlinks.len(),
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// `overlay pack`: plan, sign, then write a directory and/or an archive.
fn overlay_pack(
    inv: &Invocation,
    input: &pack::PackInput,
    sign: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    out_archive: Option<PathBuf>,
    push: Option<String>,
) -> anyhow::Result<()> {
    let push_target = push
        .as_deref()
        .map(|text| push_target(inv, text))
        .transpose()?;
    let mut packed = pack::plan(input)?;
    // Without --out-archive, a push sends an archive written in a temporary directory.
    let temp = tempfile::tempdir()?;
    let archive = match (&out_archive, &push_target) {
        (None, Some(_)) => Some(temp.path().join("overlay.tar.zst")),
        _ => out_archive,
    };
    write_packed(
        &mut packed,
        sign.as_deref(),
        out_dir.as_deref(),
        archive.as_deref(),
    )?;
    if let (Some((settings, credentials, reference)), Some(file)) = (push_target, &archive) {
        push_archive(&settings, &credentials, &reference, file, &packed.manifest)?;
    }
    Ok(())
}

/// Sign the manifest when asked, write the directory and/or archive, and say what was written;
/// returns the archive's sha256 when one was written.
fn write_packed(
    packed: &mut pack::Packed,
    sign: Option<&std::path::Path>,
    out_dir: Option<&std::path::Path>,
    out_archive: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    if let Some(key_file) = sign {
        let secret = std::fs::read_to_string(key_file)
            .with_context(|| format!("{}: cannot read the secret key", key_file.display()))?;
        let password = std::env::var("NVDRIVER_AGENT_SIGN_PASSWORD").ok();
        packed.sign(&secret, password, key_file)?;
    }
    if let Some(dir) = out_dir {
        packed.write_dir(dir)?;
        println!("wrote {}", dir.display());
    }
    let mut archive_digest = None;
    if let Some(file) = out_archive {
        packed.write_archive(file)?;
        let digest =
            nvdriver_agent::overlay::verify::sha256_reader(std::fs::File::open(file)?, u64::MAX)?.1;
        println!("wrote {} (sha256 {digest})", file.display());
        archive_digest = Some(digest);
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
    Ok(archive_digest)
}

/// `overlay build`: build, sign, write, push.
fn overlay_build(
    inv: &Invocation,
    request: &build::BuildRequest,
    sign: Option<PathBuf>,
    out: Option<PathBuf>,
    archive: Option<PathBuf>,
    push: Option<String>,
) -> anyhow::Result<()> {
    // A bad reference or config is found before the build, not after minutes of it.
    let push_target = match &push {
        Some(text) => Some(push_target(inv, text)?),
        None => None,
    };
    let mut built = build::build(request)?;
    let (cc, check) = &built.compiler;
    println!(
        "built {} modules for kernel {} from {:?} with {cc} ({}) in {:.0} s; log {}",
        built.packed.manifest.module_files().count(),
        built.kernel.release,
        built.kind,
        match check {
            build::CompilerCheck::Same => "the kernel's compiler",
            build::CompilerCheck::Unknown => "unchecked: the kernel does not name its compiler",
            build::CompilerCheck::Allowed { .. } => "NOT the kernel's compiler",
        },
        built.make_seconds,
        built.log.display()
    );
    let archive = match (&archive, &push_target) {
        (None, Some(_)) => Some(built.work.path().join("overlay.tar.zst")),
        _ => archive,
    };
    write_packed(
        &mut built.packed,
        sign.as_deref(),
        out.as_deref(),
        archive.as_deref(),
    )?;
    let manifest_digest =
        nvdriver_agent::overlay::verify::sha256_bytes(built.packed.manifest_text.as_bytes());
    println!("manifest sha256 {manifest_digest}");
    if let (Some((settings, credentials, reference)), Some(file)) = (push_target, &archive) {
        push_archive(
            &settings,
            &credentials,
            &reference,
            file,
            &built.packed.manifest,
        )?;
    }
    Ok(())
}

#[cfg(feature = "oci")]
type PushTarget = (
    nvdriver_agent::config::OciSettings,
    nvdriver_agent::overlay::source::oci::Credentials,
    nvdriver_agent::overlay::source::oci::Reference,
);
#[cfg(not(feature = "oci"))]
type PushTarget = ((), (), ());

/// The registry settings, credentials and reference of `--push`.
#[cfg(feature = "oci")]
fn push_target(inv: &Invocation, text: &str) -> anyhow::Result<PushTarget> {
    use nvdriver_agent::overlay::source::oci::{Credentials, Reference};
    let reference = Reference::parse(text)?;
    let ctx = inv.context()?;
    let credentials = Credentials::load(&ctx.root)?;
    Ok((ctx.settings.stage.oci, credentials, reference))
}

#[cfg(not(feature = "oci"))]
fn push_target(_: &Invocation, text: &str) -> anyhow::Result<PushTarget> {
    anyhow::bail!("{text}: this build of nvdriver-agent has no OCI support (cargo feature `oci`)")
}

#[cfg(feature = "oci")]
fn push_archive(
    settings: &nvdriver_agent::config::OciSettings,
    credentials: &nvdriver_agent::overlay::source::oci::Credentials,
    reference: &nvdriver_agent::overlay::source::oci::Reference,
    archive: &std::path::Path,
    manifest: &nvdriver_agent::overlay::Manifest,
) -> anyhow::Result<()> {
    let pushed = nvdriver_agent::overlay::source::push::push(
        settings,
        credentials,
        reference,
        archive,
        manifest,
    )?;
    println!(
        "pushed {} ({}; {} blob(s) already there)",
        pushed.reference, pushed.digest, pushed.skipped
    );
    Ok(())
}

#[cfg(not(feature = "oci"))]
fn push_archive(
    _: &(),
    _: &(),
    _: &(),
    _: &std::path::Path,
    _: &nvdriver_agent::overlay::Manifest,
) -> anyhow::Result<()> {
    unreachable!("push_target refuses without the oci feature")
}

/// `overlay fetch`.
fn overlay_fetch(ctx: &Context, kernel: &str, driver: Option<&str>) -> anyhow::Result<()> {
    let report = overlay_cmd::overlay_fetch(ctx, kernel, driver)?;
    for attempt in &report.tried {
        println!("tried {attempt}");
    }
    let (what, dir) = match &report.outcome {
        ImportOutcome::Imported { dir } => ("staged", dir),
        ImportOutcome::Replaced { dir } => ("staged (replacing a different copy)", dir),
        ImportOutcome::AlreadyPresent { dir } => ("already in the store", dir),
    };
    println!("{what}: {} from {}", dir.display(), report.source);
    Ok(())
}

/// `modinfo`.
fn show_modinfo(files: &[PathBuf], json: bool) -> anyhow::Result<u8> {
    let mut infos = Vec::new();
    for file in files {
        let info = modinfo::read_module_file(file).map_err(CommandError::from)?;
        infos.push((file, info));
    }
    if json {
        let list: Vec<_> = infos
            .iter()
            .map(|(file, info)| serde_json::json!({"filename": file, "modinfo": info}))
            .collect();
        print_json(&list)?;
    } else {
        for (file, info) in &infos {
            print!("{}", modinfo::modinfo_lines(info, file));
        }
    }
    Ok(exit::OK)
}

/// `plan`'s human form: one labelled line per step.
fn render_plan(plan: &LoadPlan) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "kernel:       {} ({})", plan.kernel_release, plan.arch);
    let _ = writeln!(
        out,
        "overlay:      {} (driver {})",
        plan.overlay.display(),
        plan.driver_version
    );
    let _ = writeln!(out, "firmware:     {}", render_firmware(plan));
    let os_line = |out: &mut String, label: &str, m: &OsModuleStep| {
        let action = match m.action {
            OsModuleAction::Modprobe => "modprobe",
            OsModuleAction::AlreadyLoaded => "already loaded",
        };
        let optional = if m.required { "" } else { ", optional" };
        let _ = writeln!(
            out,
            "{label:<13} {} ({action}, {}{optional})",
            m.name, m.reason
        );
    };
    for m in &plan.os_modules {
        os_line(&mut out, "os module:", m);
    }
    for (i, m) in plan.modules.iter().enumerate() {
        let _ = writeln!(
            out,
            "module {}:     {} {} {} [{}]{}",
            i + 1,
            m.name,
            module_action_words(&m.action),
            m.file.display(),
            m.parameters,
            if m.signed { " signed" } else { "" }
        );
        for p in &m.parameter_sources {
            let value = p
                .value
                .as_deref()
                .map(|v| format!("={v}"))
                .unwrap_or_default();
            let _ = writeln!(out, "  parameter:  {}{value} (from {})", p.name, p.source);
        }
    }
    for m in &plan.os_modules_after {
        os_line(&mut out, "os module after:", m);
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
    render_caps(&mut out, plan);
    let _ = writeln!(
        out,
        "driver root:  {}",
        render_driver_root(&plan.driver_root)
    );
    let _ = writeln!(out, "toolkit:      {}", render_toolkit(&plan.toolkit));
    let _ = writeln!(out, "driver-ready: {}", plan.driver_ready.display());
    for w in &plan.warnings {
        let _ = writeln!(out, "warning:      {w}");
    }
    out
}

/// The capability nodes: the ones procfs lists now, or when they will be known.
fn render_caps(out: &mut String, plan: &LoadPlan) {
    use std::fmt::Write as _;
    if plan.caps_nodes.is_empty() {
        let _ = writeln!(
            out,
            "cap nodes:    none listed now; made from {} after nvidia loads",
            nvdriver_agent::kmod::caps::CAPS_PROC_DIR
        );
    }
    for n in &plan.caps_nodes {
        let _ = writeln!(
            out,
            "cap node:     {} c {}:{} {:04o} {}:{}{} (from {})",
            n.path.display(),
            n.major,
            n.minor,
            n.mode,
            n.uid,
            n.gid,
            if n.modify {
                ""
            } else {
                " left as it is (DeviceFileModify: 0)"
            },
            n.source
        );
    }
}

/// A module step's action in words (the JSON keeps the kebab-case names).
fn module_action_words(action: &ModuleAction) -> &'static str {
    match action {
        ModuleAction::Load => "load",
        ModuleAction::LoadDecompressed => "load (decompressed here)",
        ModuleAction::AlreadyLoaded => "already loaded",
    }
}

fn render_firmware(plan: &LoadPlan) -> String {
    match &plan.firmware {
        Some(fw) if fw.change => format!("set firmware_class.path = {}", fw.path.display()),
        Some(fw) => format!("firmware_class.path already {}", fw.path.display()),
        None => "none in overlay".into(),
    }
}

fn render_driver_root(step: &DriverRootStep) -> String {
    match step {
        DriverRootStep::Mount { source, path, .. } => {
            format!("mount {} read-only at {}", source.display(), path.display())
        }
        DriverRootStep::AlreadyMounted { path, .. } => {
            format!("{} (already mounted)", path.display())
        }
        DriverRootStep::HostRoot => "/ (overlay has no user space)".into(),
    }
}

fn render_toolkit(step: &ToolkitStep) -> String {
    match step {
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
    }
}

/// `fetch-serve`: the unprivileged fetcher's one request (see `overlay::fetcher`).
fn fetch_serve(inv: &Invocation, listen: Option<PathBuf>, state_dir: &Path) -> anyhow::Result<u8> {
    use nvdriver_agent::overlay::source::serve;
    let listener = serve::listener(&inv.root, listen.as_deref())?;
    while !serve::serve_one(&inv.root, &listener, state_dir)? {}
    Ok(exit::OK)
}
