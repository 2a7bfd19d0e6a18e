//! The edges of `overlay build`: reading the kernel tree, unpacking and copying the source,
//! `patch`, `make`, `strip` and `sign-file`. Each function does one thing to disk or runs one
//! process; what to do comes from `plan.rs`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tracing::info;

use super::error::BuildError;
use super::plan::{self, KernelTree, KernelTreeFiles, MakePlan, SourceKind, SOURCE_PROBES};
use crate::fsutil::WithPath;

/// How far a tarball's tree may sit below its top (`modules/nvidia-open-kernel/`).
const MAX_WRAPPING_DIRS: usize = 3;

fn read_optional(path: &Path) -> Result<Option<String>, BuildError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::fsutil::PathIoError::new(path, e).into()),
    }
}

/// Read a kernel build tree's release, compiler and signing hash.
pub fn read_kernel_tree(path: &Path) -> Result<KernelTree, BuildError> {
    if !path.is_dir() {
        return Err(BuildError::KernelTree {
            path: path.to_path_buf(),
            why: "no such directory".into(),
        });
    }
    // A symlink such as /lib/modules/<kver>/build is used as the real tree it names.
    let path = fs::canonicalize(path).with_path(path)?;
    let files = KernelTreeFiles {
        utsrelease_h: read_optional(&path.join("include/generated/utsrelease.h"))?,
        kernel_release: read_optional(&path.join("include/config/kernel.release"))?,
        auto_conf: read_optional(&path.join("include/config/auto.conf"))?,
        autoconf_h: read_optional(&path.join("include/generated/autoconf.h"))?,
        makefile: read_optional(&path.join("Makefile"))?,
        source_link: fs::read_link(path.join("source"))
            .ok()
            .map(|target| path.join(target)),
    };
    plan::kernel_tree(&path, &files)
}

/// Unpack kernel packages into `root` (created): `dpkg-deb -x` for a `.deb`, `rpm2cpio | cpio`
/// for an `.rpm`.
pub fn unpack_packages(packages: &[PathBuf], root: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(root).with_action("create directory", root)?;
    for package in packages {
        let absolute = fs::canonicalize(package).with_path(package)?;
        if absolute.extension().is_some_and(|e| e == "deb") {
            run_tool(
                Command::new("dpkg-deb").arg("-x").arg(&absolute).arg(root),
                "dpkg-deb",
            )?;
            continue;
        }
        let mut rpm2cpio = Command::new("rpm2cpio")
            .arg(&absolute)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error("rpm2cpio", e))?;
        let stdout = rpm2cpio.stdout.take().expect("piped");
        let mut cpio = Command::new("cpio");
        cpio.args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(root)
            .stdin(stdout);
        let unpacked = run_tool(&mut cpio, "cpio");
        let converted = rpm2cpio
            .wait_with_output()
            .map_err(|e| spawn_error("rpm2cpio", e))?;
        if !converted.status.success() {
            return Err(BuildError::Tool {
                command: format!("rpm2cpio {}", absolute.display()),
                status: converted.status.to_string(),
                output: output_text(&converted),
            });
        }
        unpacked?;
    }
    Ok(())
}

/// The kernel tree in unpacked packages: the one configured tree under `usr/src` (or
/// `usr/src/kernels`). A Debian tree's wrapper Makefile names its `-common` half by absolute
/// path; it is pointed at the unpacked one.
pub fn read_unpacked_kernel(root: &Path) -> Result<KernelTree, BuildError> {
    let mut candidates = Vec::new();
    for base in ["usr/src", "usr/src/kernels"] {
        let dir = root.join(base);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let configured = path.join("include/generated/utsrelease.h").is_file()
                || path.join("include/config/kernel.release").is_file();
            let name = path.strip_prefix(root.join("usr/src")).unwrap_or(&path);
            candidates.push((name.display().to_string(), configured));
        }
    }
    candidates.sort();
    let trees = plan::unpacked_trees(&candidates);
    let [tree] = trees.as_slice() else {
        return Err(BuildError::KernelTree {
            path: root.to_path_buf(),
            why: format!(
                "the packages hold {} configured kernel trees under usr/src ({}); give the headers of one kernel",
                trees.len(),
                trees.join(", ")
            ),
        });
    };
    let tree = root.join("usr/src").join(tree);
    let incomplete = |why: String| BuildError::KernelTree {
        path: tree.clone(),
        why,
    };
    let makefile = tree.join("Makefile");
    if let Some(text) = read_optional(&makefile)? {
        if let Some(source) = plan::makefile_include(&text) {
            let unpacked = plan::reroot(&source, root);
            if !unpacked.is_dir() {
                return Err(incomplete(format!(
                    "its Makefile includes {}, which none of the packages holds; add that package (Debian: linux-headers-<kver>-common) as another --kernel-tree",
                    source.display()
                )));
            }
            let text = format!("include {}/Makefile\n", unpacked.display());
            fs::write(&makefile, text).with_action("write", &makefile)?;
        }
    }
    if !tree.join("scripts").is_dir() {
        return Err(incomplete(
            "its scripts/ is missing or a dangling link; add the package holding it (Debian: linux-kbuild-<version>) as another --kernel-tree".into(),
        ));
    }
    let mut kernel = read_kernel_tree(&tree)?;
    kernel.unpacked_in = Some(fs::canonicalize(root).with_path(root)?);
    Ok(kernel)
}

fn probe(dir: &Path) -> BTreeSet<&'static str> {
    SOURCE_PROBES
        .iter()
        .copied()
        .filter(|p| match p.strip_suffix('/') {
            Some(d) => dir.join(d).is_dir(),
            None => dir.join(p).exists(),
        })
        .collect()
}

/// The source tree under `dir`: `dir` itself, or down a chain of lone directories (a tarball's
/// top directory, Debian's `modules/nvidia-open-kernel/`).
fn find_source_root(dir: &Path) -> Result<(PathBuf, SourceKind), BuildError> {
    let mut candidate = dir.to_path_buf();
    for _ in 0..=MAX_WRAPPING_DIRS {
        let error = match plan::detect_source(&probe(&candidate), &candidate) {
            Ok(kind) => return Ok((candidate, kind)),
            Err(e @ BuildError::KernelOpenWithoutCore { .. }) => return Err(e),
            Err(e) => e,
        };
        let entries: Vec<PathBuf> = fs::read_dir(&candidate)
            .with_path(&candidate)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        match entries.as_slice() {
            [only] if only.is_dir() => candidate = only.clone(),
            _ => return Err(error),
        }
    }
    Err(BuildError::UnknownSource {
        path: dir.to_path_buf(),
        why: format!("nothing buildable within {MAX_WRAPPING_DIRS} directories"),
    })
}

/// Put a copy of the driver source at `copy` (which must not exist) and tell its layout: a
/// directory is copied, a tarball unpacked beside it first. The original is never written.
pub fn copy_source(source: &Path, copy: &Path) -> Result<SourceKind, BuildError> {
    let work = copy
        .parent()
        .expect("the copy is inside the work directory");
    let meta = fs::metadata(source).with_path(source)?;
    if meta.is_file() {
        let unpacked = work.join("unpacked");
        fs::create_dir(&unpacked).with_action("create directory", &unpacked)?;
        let mut tar = Command::new("tar");
        tar.arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(&unpacked)
            .arg("--no-same-owner");
        run_tool(&mut tar, "tar")?;
        let (root, kind) = find_source_root(&unpacked)?;
        fs::rename(&root, copy).with_action("move", &root)?;
        return Ok(kind);
    }
    let (root, kind) = find_source_root(source)?;
    let mut cp = Command::new("cp");
    cp.arg("-R").arg(&root).arg(copy);
    run_tool(&mut cp, "cp")?;
    Ok(kind)
}

fn spawn_error(program: &str, error: std::io::Error) -> BuildError {
    BuildError::Spawn {
        program: program.to_string(),
        error,
    }
}

fn output_text(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    plan::tail(text.trim_end(), 40)
}

/// Run a short tool to completion; its output goes into the error when it fails.
fn run_tool(command: &mut Command, program: &str) -> Result<Output, BuildError> {
    let output = command.output().map_err(|e| spawn_error(program, e))?;
    if !output.status.success() {
        return Err(BuildError::Tool {
            command: format!("{command:?}").chars().take(300).collect(),
            status: output.status.to_string(),
            output: output_text(&output),
        });
    }
    Ok(output)
}

/// The first line of `<cc> --version`.
pub fn compiler_version(cc: &str) -> Result<String, BuildError> {
    let output = run_tool(Command::new(cc).arg("--version"), cc)?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Whether `program` is an executable on PATH.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `patch -p1` of `patch` into `copy`; `source` names the original in the error.
pub fn apply_patch(copy: &Path, patch: &Path, source: &Path) -> Result<(), BuildError> {
    let absolute = fs::canonicalize(patch).with_path(patch)?;
    let output = Command::new("patch")
        .args([
            "-p1",
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-d",
        ])
        .arg(copy)
        .arg("-i")
        .arg(&absolute)
        .output()
        .map_err(|e| spawn_error("patch", e))?;
    if !output.status.success() {
        return Err(BuildError::Patch {
            patch: patch.to_path_buf(),
            source_dir: source.to_path_buf(),
            output: output_text(&output),
        });
    }
    Ok(())
}

/// Shows what a running build is doing: on a terminal, one line rewritten with the file being
/// compiled; elsewhere nothing between the steps' log lines.
pub struct Progress {
    /// Whether stderr is a terminal to rewrite a line on (not under CI).
    pub terminal: bool,
}

impl Progress {
    /// One step of the build: a line on a terminal, a log record elsewhere.
    pub fn step(&self, number: usize, total: usize, what: &str) {
        if self.terminal {
            eprintln!("\r\x1b[K[{number}/{total}] {what}");
        } else {
            info!(step = number, steps = total, "{what}");
        }
    }

    fn compiling(&self, count: usize, line: &str) {
        if self.terminal {
            let line: String = line.trim().chars().take(100).collect();
            eprint!("\r\x1b[K    {count} compiled  {line}");
            let _ = std::io::stderr().flush();
        }
    }

    fn done(&self) {
        if self.terminal {
            eprint!("\r\x1b[K");
        }
    }
}

/// Run `make` as planned, everything it prints going to `log`; `Ok(false)` when it failed.
pub fn run_make(plan: &MakePlan, log: &Path, progress: &Progress) -> Result<bool, BuildError> {
    let file = fs::File::create(log).with_action("create", log)?;
    let err = file.try_clone().with_action("create", log)?;
    let mut child = Command::new("make")
        .args(&plan.args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| spawn_error("make", e))?;
    let mut reader = fs::File::open(log).with_path(log)?;
    let mut pending = String::new();
    let mut compiled = 0;
    let status = loop {
        let finished = child.try_wait().with_action("wait for make", log)?;
        let mut chunk = Vec::new();
        reader.read_to_end(&mut chunk).with_path(log)?;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(end) = pending.rfind('\n') {
            let complete: String = pending.drain(..=end).collect();
            let mut last = None;
            for line in complete
                .lines()
                .filter(|l| l.trim_start().starts_with("CC"))
            {
                compiled += 1;
                last = Some(line);
            }
            if let Some(line) = last {
                let prefix = format!("{}/", plan.copy.display());
                progress.compiling(compiled, &line.replace(&prefix, ""));
            }
        }
        if let Some(status) = finished {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    progress.done();
    Ok(status.success())
}

/// Every `nvidia*.ko` under `dir`, copied into `into` (created).
pub fn collect_modules(dir: &Path, into: &Path) -> Result<Vec<PathBuf>, BuildError> {
    fs::create_dir_all(into).with_action("create directory", into)?;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).with_path(&current)? {
            let path = entry.with_path(&current)?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let meta = fs::symlink_metadata(&path).with_path(&path)?;
            if meta.is_dir() {
                pending.push(path.clone());
            } else if meta.is_file() && name.starts_with("nvidia") && name.ends_with(".ko") {
                let to = into.join(name);
                fs::copy(&path, &to).with_action("copy", &path)?;
                found.push(to);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `strip --strip-debug` (what the kernel's `INSTALL_MOD_STRIP=1` does).
pub fn strip_debug(module: &Path) -> Result<(), BuildError> {
    run_tool(
        Command::new("strip").arg("--strip-debug").arg(module),
        "strip",
    )?;
    Ok(())
}

/// The tree's `scripts/sign-file`.
pub fn sign_file(tree: &KernelTree) -> Result<PathBuf, BuildError> {
    let path = tree.output.join("scripts/sign-file");
    let usable =
        fs::metadata(&path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !usable {
        return Err(BuildError::NoSignFile { path });
    }
    Ok(path)
}

/// Append a module signature with `sign-file <hash> <key> <cert> <module>`.
pub fn sign_module(
    sign_file: &Path,
    hash: &str,
    key: &Path,
    cert: &Path,
    module: &Path,
) -> Result<(), BuildError> {
    run_tool(
        Command::new(sign_file)
            .arg(hash)
            .arg(key)
            .arg(cert)
            .arg(module),
        "sign-file",
    )?;
    Ok(())
}
