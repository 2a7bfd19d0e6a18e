//! Why `overlay build` failed: one error type for the whole build, from the kernel tree's
//! reading to the push.

use std::path::PathBuf;

use crate::fsutil::PathIoError;
use crate::overlay::pack::PackError;

/// One `file:line: error: message` of the compiler, with the file relative to the source.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CompileError {
    /// The file, relative to the source tree when it lies inside it.
    pub file: String,
    /// Its line number.
    pub line: u32,
    /// The compiler's message after `error:`.
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Why `overlay build` failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `--kernel-tree` is not a configured kernel build tree.
    #[error("{path}: not a kernel build tree: {why}; expected a configured tree such as /usr/src/linux-headers-<kver>, /usr/src/kernels/<kver> or /lib/modules/<kver>/build (install the kernel's headers / kernel-devel package)")]
    KernelTree {
        /// The tree as given.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// `--source` is none of the layouts `overlay build` knows.
    #[error("{path}: not a driver source: {why}; expected an open-gpu-kernel-modules tree (with kernel-open/), a kernel-open directory (Makefile, Kbuild, nvidia/), Debian's nvidia-open-kernel tree, a Kbuild external-module tree, or a tarball of one")]
    UnknownSource {
        /// The source as given (or the directory its tarball unpacked to).
        path: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// A `kernel-open` directory of a git checkout: its prebuilt core objects are made by the
    /// repository's top-level Makefile.
    #[error("{path}: this kernel-open directory has no nvidia/nv-kernel.o_binary (the driver core, built by the repository's top-level make); pass the open-gpu-kernel-modules root as --source instead")]
    KernelOpenWithoutCore {
        /// The kernel-open directory.
        path: PathBuf,
    },
    /// The compiler is not the one the kernel was built with.
    #[error("the compiler {cc} says {found:?}, but kernel {kernel_release} was built with {expected:?} (CONFIG_CC_VERSION_TEXT); modules built by another compiler may not load or may misbehave. Install that compiler and put it first on PATH or name it in CC, or pass --allow-compiler-mismatch")]
    CompilerMismatch {
        /// The kernel release.
        kernel_release: String,
        /// The command asked (`CC` or the default).
        cc: String,
        /// The kernel's `CONFIG_CC_VERSION_TEXT`.
        expected: String,
        /// The first line of `<cc> --version`.
        found: String,
    },
    /// A path Kbuild cannot build in (make splits words on white space).
    #[error("{path}: {what} has white space in its path, which Kbuild cannot build in; use a path without spaces (for the work directory: --work-dir, or TMPDIR)")]
    Whitespace {
        /// The path.
        path: PathBuf,
        /// Which one it is.
        what: &'static str,
    },
    /// A patch did not apply.
    #[error("patch {patch} does not apply to {source_dir} (patch -p1 in a copy; the source is untouched):\n{output}\nRebase the patch on this driver version, or drop it if the driver has the fix")]
    Patch {
        /// The patch file.
        patch: PathBuf,
        /// The driver source (as given).
        source_dir: PathBuf,
        /// What `patch` printed.
        output: String,
    },
    /// The driver does not compile against this kernel.
    #[error("the driver source does not build against kernel {kernel_release}{}\nfull log: {log}{}\nA kernel change the driver does not know yet: use a driver version that supports this kernel, or carry a fix as --patch",
        if errors.is_empty() { String::new() } else { format!(":{}", errors.iter().map(|e| format!("\n    {e}")).collect::<String>()) },
        if errors.is_empty() { format!("\nlast lines of the log:\n{tail}") } else { String::new() })]
    Compile {
        /// The kernel release.
        kernel_release: String,
        /// The compiler errors found in the log (first ones first; at most 10).
        errors: Vec<CompileError>,
        /// The build log.
        log: PathBuf,
        /// The log's last lines, for failures that are no compiler error.
        tail: String,
    },
    /// The build finished but gave no module, or modules for another kernel.
    #[error("the build produced {found} in {dir}; expected nvidia*.ko for kernel {kernel_release}. Check the build log {log}")]
    WrongOutput {
        /// The kernel release the tree is for.
        kernel_release: String,
        /// What was found.
        found: String,
        /// Where modules were looked for.
        dir: PathBuf,
        /// The build log.
        log: PathBuf,
    },
    /// The kernel tree has no usable `scripts/sign-file`.
    #[error("{path}: no executable sign-file in the kernel tree, needed by --sign-modules; the kernel's headers / kernel-devel package ships it as scripts/sign-file")]
    NoSignFile {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A tool ran and failed (`tar`, `cp`, `strip`, `sign-file`, the compiler's `--version`).
    #[error("{command} failed ({status}):\n{output}")]
    Tool {
        /// The command line, shortened.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (the last lines).
        output: String,
    },
    /// A tool could not be started.
    #[error("cannot run {program}: {error}; install it (it is needed to build kernel modules)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        error: std::io::Error,
    },
    /// Packing the built modules failed.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// Reading the kernel tree or source, or writing in the work directory, failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}
