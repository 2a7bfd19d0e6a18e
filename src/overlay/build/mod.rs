//! `nvdriver-agent overlay build`: build the NVIDIA kernel modules for one kernel from source,
//! then pack them as `overlay pack` does.
//!
//! The kernel tree and the source are read and planned purely ([`plan`]): the release
//! (`UTS_RELEASE`, which the modules' vermagic carries), the kernel's compiler
//! (`CONFIG_CC_VERSION_TEXT`, compared with `<cc> --version`), the source's layout and the
//! `make` command. The edges ([`run`]) copy the source into a work directory (never building
//! in the original), apply `--patch` files with `patch -p1`, run make with all cores, strip
//! debug info, sign with the tree's `scripts/sign-file`, and hand the modules to
//! [`crate::overlay::pack::plan`].
//!
//! Reproducible: the work directory's path is mapped to `.` (`KCFLAGS=-ffile-prefix-map`),
//! Kbuild's timestamp, user and host are fixed, debug info is stripped, and `sign-file`'s
//! PKCS#7 signature carries no signing time (RSA PKCS#1 v1.5 is deterministic), so the same
//! inputs give the same modules, manifest and archive.

pub mod error;
pub mod plan;
pub mod run;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::warn;

pub use error::{BuildError, CompileError};
pub use plan::{CompilerCheck, KernelTree, SourceKind};

use crate::fsutil::WithPath;
use crate::overlay::pack::{self, PackInput, Packed};
use run::Progress;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The kernel build tree (one directory), or the packages holding it.
    pub kernel_tree: Vec<PathBuf>,
    /// The driver source: a directory or a tarball.
    pub source: PathBuf,
    /// Patches for `patch -p1`, in order.
    pub patches: Vec<PathBuf>,
    /// Firmware directory, packed as `overlay pack --firmware`.
    pub firmware: Option<PathBuf>,
    /// User space tree, packed as `overlay pack --userspace`.
    pub userspace: Option<PathBuf>,
    /// (private key, certificate) to sign every module with.
    pub sign_modules: Option<(PathBuf, PathBuf)>,
    /// Build with another compiler than the kernel's.
    pub allow_compiler_mismatch: bool,
    /// Do not strip debug info.
    pub keep_debug: bool,
    /// make's `-j`.
    pub jobs: usize,
    /// Build here (kept) instead of in a temporary directory (removed).
    pub work_dir: Option<PathBuf>,
    /// The overlay's architecture (`uname -m`).
    pub arch: String,
    /// The `CC` environment variable.
    pub env_cc: Option<String>,
    /// Rewrite a progress line on the terminal (else one log line per step).
    pub terminal: bool,
}

/// Where a build ran: a temporary directory (removed when dropped) or the caller's.
#[derive(Debug)]
pub enum WorkDir {
    /// A temporary directory.
    Temporary(tempfile::TempDir),
    /// `--work-dir`.
    Given(PathBuf),
}

impl WorkDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        match self {
            WorkDir::Temporary(dir) => dir.path(),
            WorkDir::Given(path) => path,
        }
    }
}

/// A finished build, ready to write (the packed files live in the work directory, so keep
/// this until they are written).
#[derive(Debug)]
pub struct Built {
    /// The overlay, as `overlay pack` plans it.
    pub packed: Packed,
    /// The kernel tree.
    pub kernel: KernelTree,
    /// The source's layout.
    pub kind: SourceKind,
    /// The compiler used and how it compares with the kernel's.
    pub compiler: (String, CompilerCheck),
    /// The build log.
    pub log: PathBuf,
    /// Seconds `make` ran.
    pub make_seconds: f64,
    /// The work directory.
    pub work: WorkDir,
}

const STEPS: usize = 6;

/// Make the work directory: a temporary one, or the given one with an earlier build's
/// files (only those `overlay build` writes) removed.
fn work_dir(given: Option<&Path>) -> Result<WorkDir, BuildError> {
    let Some(dir) = given else {
        let temp = tempfile::Builder::new()
            .prefix("nvdriver-agent-build.")
            .tempdir()
            .with_action("create a temporary directory in", std::env::temp_dir())?;
        return Ok(WorkDir::Temporary(temp));
    };
    plan::check_path_words(dir, "the work directory")?;
    fs::create_dir_all(dir).with_action("create directory", dir)?;
    for name in ["src", "unpacked", "modules", "kernel"] {
        let old = dir.join(name);
        if fs::symlink_metadata(&old).is_ok() {
            fs::remove_dir_all(&old).with_action("remove", &old)?;
        }
    }
    Ok(WorkDir::Given(fs::canonicalize(dir).with_path(dir)?))
}

/// Build and plan the overlay. When make fails, a temporary work directory is kept so its
/// log can be read (the error names it); after any other failure it is removed.
pub fn build(request: &BuildRequest) -> Result<Built, BuildError> {
    let progress = Progress {
        terminal: request.terminal,
    };
    // A kernel given as packages is unpacked into the work directory, so it comes first.
    let work = work_dir(request.work_dir.as_deref())?;
    plan::check_path_words(work.path(), "the work directory")?;
    let kernel = match plan::kernel_input(&request.kernel_tree)? {
        plan::KernelInput::Tree(tree) => run::read_kernel_tree(&tree)?,
        plan::KernelInput::Packages(packages) => {
            let root = work.path().join("kernel");
            progress.step(
                1,
                STEPS,
                &format!("unpacking {} kernel package(s)", packages.len()),
            );
            run::unpack_packages(&packages, &root)?;
            run::read_unpacked_kernel(&root)?
        }
    };
    progress.step(
        1,
        STEPS,
        &format!(
            "kernel {} ({}); checking the compiler",
            kernel.release,
            kernel.output.display()
        ),
    );
    let cc = plan::choose_cc(
        request.env_cc.as_deref(),
        kernel.cc_version_text.as_deref(),
        run::on_path,
    );
    let check = plan::check_compiler(
        &kernel,
        &cc,
        &run::compiler_version(&cc)?,
        request.allow_compiler_mismatch,
    )?;
    match &check {
        CompilerCheck::Allowed { expected, found } => warn!(
            kernel = %kernel.release, expected, found,
            "building with another compiler than the kernel's (--allow-compiler-mismatch)"
        ),
        CompilerCheck::Unknown => warn!(
            kernel = %kernel.release,
            "the kernel's config has no CONFIG_CC_VERSION_TEXT; the compiler is not checked"
        ),
        CompilerCheck::Same => {}
    }
    let sign_file = match &request.sign_modules {
        Some(_) => Some(run::sign_file(&kernel)?),
        None => None,
    };
    plan::check_path_words(&kernel.output, "the kernel tree")?;
    plan::check_path_words(&kernel.source, "the kernel source tree")?;
    match build_in(
        request,
        &kernel,
        &cc,
        sign_file.as_deref(),
        &work,
        &progress,
    ) {
        Ok((packed, kind, make_seconds)) => Ok(Built {
            packed,
            log: work.path().join("build.log"),
            kernel,
            kind,
            compiler: (cc, check),
            make_seconds,
            work,
        }),
        Err(e) => {
            // Kept only when make ran: its log is what the error points at.
            if let (WorkDir::Temporary(temp), true) =
                (work, matches!(e, BuildError::Compile { .. }))
            {
                let kept = temp.keep();
                warn!(work_dir = %kept.display(), "the failed build's work directory is kept");
            }
            Err(e)
        }
    }
}

/// Steps 2–6 in the work directory.
fn build_in(
    request: &BuildRequest,
    kernel: &KernelTree,
    cc: &str,
    sign_file: Option<&Path>,
    work: &WorkDir,
    progress: &Progress,
) -> Result<(Packed, SourceKind, f64), BuildError> {
    let copy = work.path().join("src");
    progress.step(
        2,
        STEPS,
        &format!("copying {} to {}", request.source.display(), copy.display()),
    );
    let kind = run::copy_source(&request.source, &copy)?;
    for patch in &request.patches {
        progress.step(2, STEPS, &format!("applying {}", patch.display()));
        run::apply_patch(&copy, patch, &request.source)?;
    }
    let make = plan::make_plan(kind, kernel, &copy, cc, request.jobs);
    let log = work.path().join("build.log");
    progress.step(
        3,
        STEPS,
        &format!("building ({kind:?}): make {}", make.args.join(" ")),
    );
    let started = Instant::now();
    let ok = run::run_make(&make, &log, progress)?;
    let make_seconds = started.elapsed().as_secs_f64();
    if !ok {
        let text = String::from_utf8_lossy(&fs::read(&log).with_path(&log)?).into_owned();
        return Err(BuildError::Compile {
            kernel_release: kernel.release.clone(),
            errors: plan::compile_errors(&text, &copy),
            log,
            tail: plan::tail(&text, 20),
        });
    }
    let modules_dir = work.path().join("modules");
    let modules = run::collect_modules(&make.output, &modules_dir)?;
    progress.step(
        4,
        STEPS,
        &format!(
            "{} modules built in {make_seconds:.0} s{}",
            modules.len(),
            if request.keep_debug {
                ""
            } else {
                "; stripping debug info"
            }
        ),
    );
    for module in &modules {
        if !request.keep_debug {
            run::strip_debug(module)?;
        }
    }
    if let (Some((key, cert)), Some(sign_file)) = (&request.sign_modules, sign_file) {
        progress.step(
            5,
            STEPS,
            &format!("signing the modules ({})", kernel.sig_hash),
        );
        for module in &modules {
            run::sign_module(sign_file, &kernel.sig_hash, key, cert, module)?;
        }
    }
    progress.step(6, STEPS, "packing");
    let packed = pack_built(request, kernel, &modules_dir, &log)?;
    Ok((packed, kind, make_seconds))
}

/// Pack the collected modules; they must be for the tree's kernel.
fn pack_built(
    request: &BuildRequest,
    kernel: &KernelTree,
    modules_dir: &Path,
    log: &Path,
) -> Result<Packed, BuildError> {
    let wrong = |found: String| BuildError::WrongOutput {
        kernel_release: kernel.release.clone(),
        found,
        dir: modules_dir.to_path_buf(),
        log: log.to_path_buf(),
    };
    let packed = pack::plan(&PackInput {
        modules: modules_dir.to_path_buf(),
        firmware: request.firmware.clone(),
        userspace: request.userspace.clone(),
        arch: request.arch.clone(),
    })
    .map_err(|e| match e {
        pack::PackError::NoModules { .. } => wrong("no nvidia*.ko".into()),
        other => BuildError::Pack(other),
    })?;
    if packed.manifest.kernel_release != kernel.release {
        return Err(wrong(format!(
            "modules for kernel {}",
            packed.manifest.kernel_release
        )));
    }
    Ok(packed)
}
