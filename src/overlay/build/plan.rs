//! The pure part of `overlay build`: what a kernel tree says of itself, which layout a driver
//! source has, which compiler to use and whether it is the kernel's, the `make` command, and
//! the compiler errors in a build log. Everything here takes text and returns data; reading
//! files and running processes is `run.rs`'s.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::error::{BuildError, CompileError};

/// What a kernel build tree says, read by [`kernel_tree`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTree {
    /// The tree as given: Kbuild's output tree (`SYSOUT`, `make -C` for external modules).
    pub output: PathBuf,
    /// The kernel source tree (`SYSSRC`): the same, except in split trees (Debian's
    /// `linux-headers-<kver>` includes `linux-headers-<kver>-common`).
    pub source: PathBuf,
    /// The kernel release the tree builds modules for (their vermagic).
    pub release: String,
    /// `CONFIG_CC_VERSION_TEXT`: the first line of the kernel compiler's `--version`.
    pub cc_version_text: Option<String>,
    /// `CONFIG_MODULE_SIG_HASH`, for `sign-file` (sha256 when the config names none).
    pub sig_hash: String,
    /// The directory the tree's packages were unpacked in (`<work>/kernel`), when it was
    /// given as packages: mapped to `/` in what the compiler writes, so the modules are those
    /// of the same tree installed.
    pub unpacked_in: Option<PathBuf>,
}

/// The files of a kernel tree [`kernel_tree`] looks at (`None`: absent).
#[derive(Clone, Debug, Default)]
pub struct KernelTreeFiles {
    /// `include/generated/utsrelease.h`.
    pub utsrelease_h: Option<String>,
    /// `include/config/kernel.release`.
    pub kernel_release: Option<String>,
    /// `include/config/auto.conf`.
    pub auto_conf: Option<String>,
    /// `include/generated/autoconf.h`.
    pub autoconf_h: Option<String>,
    /// `Makefile`.
    pub makefile: Option<String>,
    /// Where the tree's `source` link points, if it has one (an `O=` output tree).
    pub source_link: Option<PathBuf>,
}

/// `#define UTS_RELEASE "…"` of `utsrelease.h`.
pub fn uts_release(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("#define")?.trim_start();
        let value = rest.strip_prefix("UTS_RELEASE")?.trim();
        Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
    })
}

/// `KEY=value` of `auto.conf` / `.config` (quotes removed), or `#define KEY "value"` of
/// `autoconf.h`.
pub fn config_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let value = match line.strip_prefix("#define") {
            Some(rest) => rest
                .trim_start()
                .strip_prefix(key)?
                .strip_prefix([' ', '\t'])?,
            None => line.strip_prefix(key)?.strip_prefix('=')?,
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some(value.replace("\\\"", "\""))
    })
}

/// The source tree a wrapper `Makefile` includes (Debian's headers: the whole file is
/// `include /usr/src/linux-headers-<kver>-common/Makefile`).
pub fn makefile_include(text: &str) -> Option<PathBuf> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let first = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let included = Path::new(first.strip_prefix("include ")?.trim());
    (included.file_name()? == "Makefile" && included.is_absolute())
        .then(|| included.parent().map(Path::to_path_buf))
        .flatten()
}

/// How the kernel tree is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelInput {
    /// An installed tree (a directory).
    Tree(PathBuf),
    /// Packages to unpack together: `.deb` and/or `.rpm` files.
    Packages(Vec<PathBuf>),
}

/// Whether `path` names a package file `overlay build` can unpack.
pub fn is_package(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "deb" || e == "rpm")
}

/// One directory, or only package files (`is_dir` tells a directory).
pub fn kernel_input(paths: &[PathBuf]) -> Result<KernelInput, BuildError> {
    let bad = |path: &Path, why: &str| BuildError::KernelTree {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    match paths {
        [] => Err(bad(Path::new(""), "none given")),
        [one] if !is_package(one) => Ok(KernelInput::Tree(one.clone())),
        many => match many.iter().find(|p| !is_package(p)) {
            Some(other) => Err(bad(
                other,
                "with several --kernel-tree, each must be a .deb or .rpm package file",
            )),
            None => Ok(KernelInput::Packages(many.to_vec())),
        },
    }
}

/// `path` (absolute, as a package's Makefile names it) inside the unpacked `root`.
pub fn reroot(path: &Path, root: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The build trees among an unpacked root's `usr/src` entries (names relative to `usr/src`,
/// each with whether it has `include/generated/utsrelease.h` or `include/config/kernel.release`):
/// `kernels/<kver>` of a kernel-devel RPM, `linux-headers-<kver>` of Debian's arch package
/// (its `-common` half has neither file).
pub fn unpacked_trees(candidates: &[(String, bool)]) -> Vec<String> {
    candidates
        .iter()
        .filter(|(_, configured)| *configured)
        .map(|(name, _)| name.clone())
        .collect()
}

/// Read what a kernel tree says. The release is `UTS_RELEASE`, which module vermagic carries;
/// `include/config/kernel.release` only when that is missing (Debian's headers have the
/// upstream version there, `6.1.192`, not the package's `6.1.0-57-cloud-amd64`).
pub fn kernel_tree(path: &Path, files: &KernelTreeFiles) -> Result<KernelTree, BuildError> {
    let bad = |why: &str| BuildError::KernelTree {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let release = files
        .utsrelease_h
        .as_deref()
        .and_then(uts_release)
        .or_else(|| {
            files
                .kernel_release
                .as_deref()
                .map(|t| t.trim().to_string())
        })
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad("no include/generated/utsrelease.h or include/config/kernel.release"))?;
    if release.contains(['/', ' ']) {
        return Err(bad(&format!("its kernel release {release:?} is not one")));
    }
    let config = files.auto_conf.as_deref().or(files.autoconf_h.as_deref());
    let Some(config) = config else {
        return Err(bad(
            "no include/config/auto.conf or include/generated/autoconf.h (an unconfigured tree)",
        ));
    };
    let source = files
        .source_link
        .clone()
        .or_else(|| files.makefile.as_deref().and_then(makefile_include))
        .unwrap_or_else(|| path.to_path_buf());
    Ok(KernelTree {
        output: path.to_path_buf(),
        source,
        release,
        cc_version_text: config_value(config, "CONFIG_CC_VERSION_TEXT").filter(|t| !t.is_empty()),
        sig_hash: config_value(config, "CONFIG_MODULE_SIG_HASH")
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_else(|| "sha256".to_string()),
        unpacked_in: None,
    })
}

/// Refuse a path make would split (`what` names it in the error).
pub fn check_path_words(path: &Path, what: &'static str) -> Result<(), BuildError> {
    if path.to_string_lossy().chars().any(char::is_whitespace) {
        return Err(BuildError::Whitespace {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(())
}

/// The layouts of driver source `overlay build` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// An open-gpu-kernel-modules checkout or release tarball: the top-level `make modules`
    /// builds the core objects, then `kernel-open/`.
    OpenGpuKernelModules,
    /// A `kernel-open` directory with the prebuilt core (`nvidia/nv-kernel.o_binary`): the one
    /// of an extracted `.run`, and Debian's `nvidia-open-kernel` tree (same Makefile).
    KernelOpen,
    /// Any other Kbuild external-module tree (`make -C <kernel> M=<tree> modules`).
    Kbuild,
}

/// The paths [`detect_source`] asks about, relative to the candidate directory; a directory's
/// ends in `/`.
pub const SOURCE_PROBES: &[&str] = &[
    "kernel-open/",
    "kernel-open/Makefile",
    "Makefile",
    "Kbuild",
    "nvidia/",
    "nvidia/nv-kernel.o_binary",
];

/// The layout of a source directory from which of [`SOURCE_PROBES`] exist. `Err` says why it
/// is none (for the caller to look one directory down, as tarballs wrap their tree).
pub fn detect_source(present: &BTreeSet<&str>, dir: &Path) -> Result<SourceKind, BuildError> {
    let has = |p: &str| present.contains(p);
    if has("kernel-open/") && has("kernel-open/Makefile") && has("Makefile") {
        return Ok(SourceKind::OpenGpuKernelModules);
    }
    if has("nvidia/") && has("Makefile") && has("Kbuild") {
        if !has("nvidia/nv-kernel.o_binary") {
            return Err(BuildError::KernelOpenWithoutCore {
                path: dir.to_path_buf(),
            });
        }
        return Ok(SourceKind::KernelOpen);
    }
    if has("Kbuild") || has("Makefile") {
        return Ok(SourceKind::Kbuild);
    }
    Err(BuildError::UnknownSource {
        path: dir.to_path_buf(),
        why: "no Makefile, Kbuild or kernel-open/ in it".into(),
    })
}

/// The compiler to build with: `CC` when set; else the kernel's own compiler (the first word of
/// `CONFIG_CC_VERSION_TEXT`, `gcc-12`) when it is on PATH, as NVIDIA's Makefile picks it; else
/// `gcc`. It is passed to make as `CC=`, so the check and the build use the same one.
pub fn choose_cc(
    env_cc: Option<&str>,
    cc_version_text: Option<&str>,
    on_path: impl Fn(&str) -> bool,
) -> String {
    if let Some(cc) = env_cc.filter(|c| !c.trim().is_empty()) {
        return cc.trim().to_string();
    }
    cc_version_text
        .and_then(|t| t.split_whitespace().next())
        .filter(|first| on_path(first))
        .unwrap_or("gcc")
        .to_string()
}

/// What the compiler check concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompilerCheck {
    /// `<cc> --version` says exactly `CONFIG_CC_VERSION_TEXT`.
    Same,
    /// The kernel's config does not say (kernels before 5.8): nothing to compare.
    Unknown,
    /// They differ, and --allow-compiler-mismatch was given.
    Allowed {
        /// The kernel's compiler.
        expected: String,
        /// This one.
        found: String,
    },
}

/// Compare the first line of `<cc> --version` with the kernel's `CONFIG_CC_VERSION_TEXT`.
pub fn check_compiler(
    tree: &KernelTree,
    cc: &str,
    version_output: &str,
    allow_mismatch: bool,
) -> Result<CompilerCheck, BuildError> {
    let Some(expected) = &tree.cc_version_text else {
        return Ok(CompilerCheck::Unknown);
    };
    let found = version_output.lines().next().unwrap_or_default().trim();
    if found == expected.trim() {
        return Ok(CompilerCheck::Same);
    }
    if allow_mismatch {
        return Ok(CompilerCheck::Allowed {
            expected: expected.clone(),
            found: found.to_string(),
        });
    }
    Err(BuildError::CompilerMismatch {
        kernel_release: tree.release.clone(),
        cc: cc.to_string(),
        expected: expected.clone(),
        found: found.to_string(),
    })
}

/// A `make` run: the program's arguments, its extra environment, and where the `.ko` land.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MakePlan {
    /// Arguments to `make`.
    pub args: Vec<String>,
    /// Environment added to the build's.
    pub env: Vec<(String, String)>,
    /// Where the built modules are (searched recursively).
    pub output: PathBuf,
    /// The source copy, left out of the progress line's paths.
    pub copy: PathBuf,
}

/// Fixed values for what Kbuild would take from the clock, the user and the host.
pub const FIXED_BUILD_ENV: &[(&str, &str)] = &[
    ("KBUILD_BUILD_TIMESTAMP", "1970-01-01"),
    ("KBUILD_BUILD_USER", "nvdriver-agent"),
    ("KBUILD_BUILD_HOST", "nvdriver-agent"),
    ("SOURCE_DATE_EPOCH", "0"),
    // Compiler messages in English with ASCII quotes, so their `error:` can be found in the
    // log (the kernel's Makefile unexports LC_ALL, so LANG and LC_MESSAGES too).
    ("LC_ALL", "C"),
    ("LANG", "C"),
    ("LC_MESSAGES", "C"),
];

/// The make command for `kind` with its source copy at `copy`. The copy's path (a temporary
/// directory unless --work-dir) is mapped to `.` in everything the compiler writes
/// (`-ffile-prefix-map` through `KCFLAGS`), so it does not change the modules' bytes.
pub fn make_plan(
    kind: SourceKind,
    tree: &KernelTree,
    copy: &Path,
    cc: &str,
    jobs: usize,
) -> MakePlan {
    let jobs = format!("-j{}", jobs.max(1));
    let sys = [
        format!("SYSSRC={}", tree.source.display()),
        format!("SYSOUT={}", tree.output.display()),
    ];
    let (args, output) = match kind {
        SourceKind::OpenGpuKernelModules | SourceKind::KernelOpen => {
            let mut args = vec![jobs, "-C".into(), copy.display().to_string()];
            args.extend(sys);
            let output = match kind {
                SourceKind::OpenGpuKernelModules => copy.join("kernel-open"),
                _ => copy.to_path_buf(),
            };
            (args, output)
        }
        SourceKind::Kbuild => (
            vec![
                jobs,
                "-C".into(),
                tree.output.display().to_string(),
                format!("M={}", copy.display()),
            ],
            copy.to_path_buf(),
        ),
    };
    let mut args = args;
    args.push(format!("CC={cc}"));
    args.push("modules".into());
    let mut env: Vec<(String, String)> = FIXED_BUILD_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The debug info is stripped, but the linker's build id was computed over it, and its
    // DW_AT_comp_dir is the kernel tree make runs in.
    let mut kcflags = format!("-ffile-prefix-map={}=.", copy.display());
    if let Some(root) = &tree.unpacked_in {
        kcflags.push_str(&format!(" -ffile-prefix-map={}=", root.display()));
    }
    env.push(("KCFLAGS".into(), kcflags));
    MakePlan {
        args,
        env,
        output,
        copy: copy.to_path_buf(),
    }
}

/// At most this many compiler errors are reported.
pub const MAX_ERRORS: usize = 10;

/// The compiler's `file:line[:col]: [fatal ]error: message` lines of a build log, files made
/// relative to `source` (the copy built in), duplicates dropped, the first [`MAX_ERRORS`].
pub fn compile_errors(log: &str, source: &Path) -> Vec<CompileError> {
    let prefix = format!("{}/", source.display());
    let mut found: Vec<CompileError> = Vec::new();
    for line in log.lines() {
        let Some((location, message)) = line
            .split_once(": error: ")
            .or_else(|| line.split_once(": fatal error: "))
        else {
            continue;
        };
        let mut parts = location.split(':');
        let (Some(file), Some(line_no)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(line_no) = line_no.parse::<u32>() else {
            continue;
        };
        if file.is_empty() || file.contains(' ') {
            continue;
        }
        let file = file.strip_prefix(&prefix).unwrap_or(file);
        let file = file.strip_prefix("./").unwrap_or(file).to_string();
        let error = CompileError {
            file,
            line: line_no,
            message: message.trim().to_string(),
        };
        if !found.contains(&error) {
            found.push(error);
        }
        if found.len() == MAX_ERRORS {
            break;
        }
    }
    found
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_AUTO_CONF: &str = "CONFIG_CC_VERSION_TEXT=gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\nCONFIG_MODULE_SIG_HASH=\"sha256\"\n";

    fn debian_files() -> KernelTreeFiles {
        KernelTreeFiles {
            utsrelease_h: Some("#define UTS_RELEASE \"6.1.0-57-cloud-amd64\"\n".into()),
            kernel_release: Some("6.1.192\n".into()),
            auto_conf: Some(DEBIAN_AUTO_CONF.into()),
            autoconf_h: None,
            makefile: Some("include /usr/src/linux-headers-6.1.0-57-common/Makefile\n".into()),
            source_link: None,
        }
    }

    #[test]
    fn a_debian_split_tree_reads_as_uts_release_and_common_source() {
        let path = Path::new("/usr/src/linux-headers-6.1.0-57-cloud-amd64");
        let tree = kernel_tree(path, &debian_files()).unwrap();
        // Not kernel.release's upstream version: modules carry UTS_RELEASE in their vermagic.
        assert_eq!(tree.release, "6.1.0-57-cloud-amd64");
        assert_eq!(
            tree.source,
            Path::new("/usr/src/linux-headers-6.1.0-57-common")
        );
        assert_eq!(tree.output, path);
        assert_eq!(
            tree.cc_version_text.as_deref(),
            Some("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0")
        );
        assert_eq!(tree.sig_hash, "sha256");
    }

    #[test]
    fn a_fedora_tree_is_its_own_source_and_reads_autoconf_h() {
        let files = KernelTreeFiles {
            utsrelease_h: None,
            kernel_release: Some("6.11.3-300.fc41.x86_64\n".into()),
            auto_conf: None,
            autoconf_h: Some("#define CONFIG_CC_VERSION_TEXT \"gcc (GCC) 14.2.1 20240912 (Red Hat 14.2.1-3)\"\n#define CONFIG_MODULE_SIG_HASH \"sha512\"\n".into()),
            makefile: Some("# SPDX\nVERSION = 6\nPATCHLEVEL = 11\n".into()),
            source_link: None,
        };
        let path = Path::new("/usr/src/kernels/6.11.3-300.fc41.x86_64");
        let tree = kernel_tree(path, &files).unwrap();
        assert_eq!(tree.release, "6.11.3-300.fc41.x86_64");
        assert_eq!(tree.source, path);
        assert_eq!(
            tree.cc_version_text.as_deref(),
            Some("gcc (GCC) 14.2.1 20240912 (Red Hat 14.2.1-3)")
        );
        assert_eq!(tree.sig_hash, "sha512");
    }

    #[test]
    fn trees_without_release_or_config_are_refused() {
        let path = Path::new("/tmp/x");
        let err = kernel_tree(path, &KernelTreeFiles::default()).unwrap_err();
        assert!(err.to_string().contains("utsrelease.h"), "{err}");
        let files = KernelTreeFiles {
            auto_conf: None,
            ..debian_files()
        };
        let err = kernel_tree(path, &files).unwrap_err();
        assert!(err.to_string().contains("unconfigured"), "{err}");
    }

    #[test]
    fn a_kernel_is_one_directory_or_package_files() {
        let paths = |p: &[&str]| p.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            kernel_input(&paths(&["/usr/src/kernels/6.11"])).unwrap(),
            KernelInput::Tree("/usr/src/kernels/6.11".into())
        );
        let debs = paths(&[
            "a/linux-headers-6.1.0-57-cloud-amd64.deb",
            "b/linux-headers-6.1.0-57-common.deb",
            "linux-kbuild-6.1.deb",
        ]);
        assert_eq!(
            kernel_input(&debs).unwrap(),
            KernelInput::Packages(debs.clone())
        );
        let rpm = paths(&["kernel-devel-6.11.3-300.fc41.x86_64.rpm"]);
        assert_eq!(
            kernel_input(&rpm).unwrap(),
            KernelInput::Packages(rpm.clone())
        );
        let mixed = paths(&["/usr/src/kernels/6.11", "x.deb"]);
        assert!(kernel_input(&mixed)
            .unwrap_err()
            .to_string()
            .contains(".deb or .rpm"));
        assert_eq!(
            reroot(
                Path::new("/usr/src/linux-headers-6.1.0-57-common"),
                Path::new("/w/kernel")
            ),
            Path::new("/w/kernel/usr/src/linux-headers-6.1.0-57-common")
        );
        let found = unpacked_trees(&[
            ("linux-headers-6.1.0-57-cloud-amd64".into(), true),
            ("linux-headers-6.1.0-57-common".into(), false),
        ]);
        assert_eq!(found, ["linux-headers-6.1.0-57-cloud-amd64"]);
    }

    #[test]
    fn paths_with_white_space_are_refused() {
        assert!(check_path_words(Path::new("/tmp/a-b"), "the work directory").is_ok());
        let err = check_path_words(Path::new("/tmp/a b"), "the work directory").unwrap_err();
        assert!(err.to_string().contains("--work-dir"), "{err}");
    }

    #[test]
    fn source_layouts_are_told_apart() {
        let dir = Path::new("/src");
        let set = |paths: &[&'static str]| paths.iter().copied().collect::<BTreeSet<&str>>();
        let repo = set(&[
            "kernel-open/",
            "kernel-open/Makefile",
            "Makefile",
            "README.md",
        ]);
        assert_eq!(
            detect_source(&repo, dir).unwrap(),
            SourceKind::OpenGpuKernelModules
        );
        let debian = set(&["Makefile", "Kbuild", "nvidia/", "nvidia/nv-kernel.o_binary"]);
        assert_eq!(detect_source(&debian, dir).unwrap(), SourceKind::KernelOpen);
        let checkout_kernel_open = set(&["Makefile", "Kbuild", "nvidia/"]);
        assert!(matches!(
            detect_source(&checkout_kernel_open, dir),
            Err(BuildError::KernelOpenWithoutCore { .. })
        ));
        assert_eq!(
            detect_source(&set(&["Kbuild"]), dir).unwrap(),
            SourceKind::Kbuild
        );
        assert!(matches!(
            detect_source(&set(&[]), dir),
            Err(BuildError::UnknownSource { .. })
        ));
    }

    #[test]
    fn the_compiler_is_cc_then_the_kernels_then_gcc() {
        let text = Some("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0");
        assert_eq!(choose_cc(Some("clang"), text, |_| true), "clang");
        assert_eq!(choose_cc(None, text, |c| c == "gcc-12"), "gcc-12");
        assert_eq!(choose_cc(None, text, |_| false), "gcc");
        assert_eq!(choose_cc(Some(" "), None, |_| true), "gcc");
    }

    #[test]
    fn a_compiler_mismatch_is_refused_unless_allowed() {
        let tree = kernel_tree(Path::new("/k"), &debian_files()).unwrap();
        let same = "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022\n";
        assert_eq!(
            check_compiler(&tree, "gcc-12", same, false).unwrap(),
            CompilerCheck::Same
        );
        let other = "gcc (Debian 12.2.0-14) 12.2.0\n";
        let err = check_compiler(&tree, "gcc", other, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("6.1.0-57-cloud-amd64")
                && text.contains("gcc (Debian 12.2.0-14) 12.2.0")
                && text.contains("--allow-compiler-mismatch"),
            "{text}"
        );
        assert!(matches!(
            check_compiler(&tree, "gcc", other, true).unwrap(),
            CompilerCheck::Allowed { .. }
        ));
        let old = KernelTree {
            cc_version_text: None,
            ..tree
        };
        assert_eq!(
            check_compiler(&old, "gcc", other, false).unwrap(),
            CompilerCheck::Unknown
        );
    }

    #[test]
    fn make_runs_nvidias_makefile_or_kbuild_with_fixed_paths_and_clock() {
        let tree = kernel_tree(Path::new("/k/out"), &debian_files()).unwrap();
        let copy = Path::new("/w/src");
        let plan = make_plan(SourceKind::KernelOpen, &tree, copy, "gcc-12", 4);
        assert_eq!(
            plan.args,
            [
                "-j4",
                "-C",
                "/w/src",
                "SYSSRC=/usr/src/linux-headers-6.1.0-57-common",
                "SYSOUT=/k/out",
                "CC=gcc-12",
                "modules"
            ]
        );
        assert_eq!(plan.output, copy);
        let repo = make_plan(SourceKind::OpenGpuKernelModules, &tree, copy, "gcc", 2);
        assert_eq!(repo.output, Path::new("/w/src/kernel-open"));
        let kbuild = make_plan(SourceKind::Kbuild, &tree, copy, "gcc", 0);
        assert_eq!(
            kbuild.args,
            ["-j1", "-C", "/k/out", "M=/w/src", "CC=gcc", "modules"]
        );
        let env: std::collections::BTreeMap<_, _> = kbuild.env.into_iter().collect();
        assert_eq!(env["KCFLAGS"], "-ffile-prefix-map=/w/src=.");
        let unpacked = KernelTree {
            unpacked_in: Some("/w/kernel".into()),
            ..tree
        };
        let env: std::collections::BTreeMap<_, _> =
            make_plan(SourceKind::Kbuild, &unpacked, copy, "gcc", 1)
                .env
                .into_iter()
                .collect();
        assert_eq!(
            env["KCFLAGS"],
            "-ffile-prefix-map=/w/src=. -ffile-prefix-map=/w/kernel="
        );
        assert_eq!(env["KBUILD_BUILD_TIMESTAMP"], "1970-01-01");
        assert_eq!(env["LC_ALL"], "C");
    }

    #[test]
    fn compiler_errors_are_found_with_files_relative_to_the_source() {
        let log = "\
  CC [M]  /w/src/nvidia/nv-pci.o
/w/src/nvidia/nv-pci.c: In function 'nv_resize_pcie_bars':
/w/src/nvidia/nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'
  223 |         r = pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);
/usr/src/linux-headers-6.1.0-57-common/include/linux/pci.h:1409:5: note: declared here
/w/src/nvidia/nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'
cc1: some warnings being treated as errors
./nvidia/os-interface.c:12:10: fatal error: linux/nope.h: No such file or directory
make[2]: *** [scripts/Makefile.build:250: /w/src/nvidia/nv-pci.o] Error 1
";
        let errors = compile_errors(log, Path::new("/w/src"));
        assert_eq!(
            errors,
            [
                CompileError {
                    file: "nvidia/nv-pci.c".into(),
                    line: 223,
                    message: "too few arguments to function 'pci_resize_resource'".into()
                },
                CompileError {
                    file: "nvidia/os-interface.c".into(),
                    line: 12,
                    message: "linux/nope.h: No such file or directory".into()
                },
            ]
        );
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
    }
}
