//! `overlay.toml`: the versioned manifest of an overlay. Parsing is pure and strict: every
//! path is relative and stays inside the overlay, nothing is listed twice, modes carry no
//! setuid/setgid bits, digests are well-formed.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name, at the top of every overlay tree and archive.
pub const MANIFEST_NAME: &str = "overlay.toml";
/// The only manifest format this agent reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Files a store generates inside an overlay after verification (not part of the manifest).
pub const GENERATED_FILES: [&str; 1] = ["etc/ld.so.cache"];

/// Which kind of NVIDIA kernel modules an overlay carries (`flavor = "open"` or
/// `"proprietary"` in the manifest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// NVIDIA's open GPU kernel modules (need the GSP firmware).
    Open,
    /// The proprietary kernel modules.
    Proprietary,
}

/// One regular file of the overlay (a `[[file]]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Where the file lies, relative to the overlay root (normal form, no `..`).
    pub path: PathBuf,
    /// Its expected size in bytes.
    pub size: u64,
    /// Its expected SHA-256, as 64 lowercase hex digits.
    pub sha256: String,
    /// Its permission bits; 0o644 when omitted, and never above 0o755.
    #[serde(default = "default_mode", skip_serializing_if = "is_default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

fn is_default_mode(mode: &u32) -> bool {
    *mode == 0o644
}

/// One symbolic link of the overlay (a `[[symlink]]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkEntry {
    /// Where the link lies, relative to the overlay root.
    pub path: PathBuf,
    /// What it points to: a relative target that must resolve inside the overlay.
    pub target: PathBuf,
}

/// A parsed and validated `overlay.toml`: what the overlay is for and every file and link
/// it contains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// The manifest format version; must equal [`FORMAT_VERSION`].
    pub format: u32,
    /// The kernel release the modules are built for (`kernel-release`).
    pub kernel_release: String,
    /// The NVIDIA driver version (`driver-version`).
    pub driver_version: String,
    /// The architecture the overlay is built for (e.g. `x86_64`).
    pub arch: String,
    /// Open or proprietary kernel modules.
    pub flavor: Flavor,
    /// The regular files (`[[file]]` tables), in manifest order.
    #[serde(default, rename = "file", skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    /// The symbolic links (`[[symlink]]` tables), in manifest order.
    #[serde(default, rename = "symlink", skip_serializing_if = "Vec::is_empty")]
    pub symlinks: Vec<SymlinkEntry>,
}

/// Why a manifest was rejected by [`Manifest::parse`]. Every variant's `file` is the
/// manifest as the caller named it (`origin`).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not valid TOML or does not match the manifest's schema (unknown key,
    /// missing field, wrong type).
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The 1-based line of the error, or 0 when the parser gave no position.
        line: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// `format` is not [`FORMAT_VERSION`].
    #[error("{file}: manifest format {found} is not supported (this agent reads format {FORMAT_VERSION}); upgrade nvdriver-agent or rebuild the overlay")]
    UnsupportedFormat {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The `format` the manifest declares.
        found: u32,
    },
    /// `kernel-release`, `driver-version` or `arch` is empty, longer than 128 bytes, starts
    /// with `.` or has a character outside letters, digits and `. - _ + ~`.
    #[error("{file}: {field} {value:?} is not valid: {why}")]
    BadField {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The manifest key (`kernel-release`, `driver-version` or `arch`).
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What a valid value looks like.
        why: &'static str,
    },
    /// An entry's path is empty, absolute, not in normal form, contains `..` or a control
    /// character, or is a name the agent reserves (the manifest, the signature, generated
    /// files).
    #[error("{file}: entry {path:?} {why}; overlay paths must be relative, without \".\" or \"..\", and stay inside the overlay")]
    BadPath {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The rejected entry path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Two entries (files or links) share a path.
    #[error("{file}: {path:?} is listed twice")]
    Duplicate {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The path listed more than once.
        path: PathBuf,
    },
    /// An entry lies beneath another entry's path, which would have to be a directory.
    #[error("{file}: {path:?} is listed as a file or link but {child:?} is listed beneath it")]
    NotADirectory {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The file or link entry that another entry lies beneath.
        path: PathBuf,
        /// The entry beneath it.
        child: PathBuf,
    },
    /// A symlink target is absolute, empty, or climbs above the overlay root.
    #[error("{file}: symlink {path:?} -> {target:?} leaves the overlay; links must be relative and resolve inside it")]
    EscapingSymlink {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The link's path.
        path: PathBuf,
        /// Its target, as written.
        target: PathBuf,
    },
    /// A file's mode has a bit outside 0o755.
    #[error("{file}: {path:?} has mode {mode:o}; only permission bits up to 0755 are allowed (no setuid, setgid, sticky or world-writable)")]
    BadMode {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The file entry's path.
        path: PathBuf,
        /// The rejected mode.
        mode: u32,
    },
    /// A file's `sha256` is not 64 lowercase hex digits.
    #[error("{file}: {path:?} sha256 {value:?} is not 64 lowercase hex digits")]
    BadDigest {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The file entry's path.
        path: PathBuf,
        /// The rejected digest.
        value: String,
    },
    /// A kernel module lies outside `usr/lib/modules/<kernel-release>/`, or the overlay
    /// carries a module index (`modules.*` under `usr/lib/modules`).
    #[error("{file}: {path:?}: {why}")]
    Layout {
        /// The manifest, as named by the caller.
        file: PathBuf,
        /// The offending entry's path.
        path: PathBuf,
        /// What the layout requires.
        why: String,
    },
}

impl Manifest {
    /// Parse and validate. `origin` names the file in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| crate::text::line_column(text, s.start).0)
                .unwrap_or(0);
            ManifestError::Syntax {
                file: origin.to_path_buf(),
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        manifest.validate(origin)?;
        Ok(manifest)
    }

    /// Serialise back to `overlay.toml` text (no validation; files in the default mode
    /// omit `mode`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("manifest serialises")
    }

    fn validate(&self, origin: &Path) -> Result<(), ManifestError> {
        let file = || origin.to_path_buf();
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat {
                file: file(),
                found: self.format,
            });
        }
        check_token(origin, "kernel-release", &self.kernel_release)?;
        check_token(origin, "driver-version", &self.driver_version)?;
        check_token(origin, "arch", &self.arch)?;

        let mut seen = BTreeSet::new();
        let all_paths = self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.symlinks.iter().map(|s| &s.path));
        for path in all_paths {
            check_relative(origin, path)?;
            if path == Path::new(MANIFEST_NAME)
                || path == Path::new(crate::overlay::signature::SIGNATURE_NAME)
                || GENERATED_FILES.iter().any(|g| path == Path::new(g))
            {
                return Err(ManifestError::BadPath {
                    file: file(),
                    path: path.clone(),
                    why: "is a name the agent reserves",
                });
            }
            if !seen.insert(path.clone()) {
                return Err(ManifestError::Duplicate {
                    file: file(),
                    path: path.clone(),
                });
            }
        }
        // A listed file or link cannot also be a directory of another entry.
        for path in &seen {
            for ancestor in path.ancestors().skip(1) {
                if seen.contains(ancestor) {
                    return Err(ManifestError::NotADirectory {
                        file: file(),
                        path: ancestor.to_path_buf(),
                        child: path.clone(),
                    });
                }
            }
        }
        for entry in &self.files {
            if entry.mode & !0o755 != 0 {
                return Err(ManifestError::BadMode {
                    file: file(),
                    path: entry.path.clone(),
                    mode: entry.mode,
                });
            }
            let digest_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !digest_ok {
                return Err(ManifestError::BadDigest {
                    file: file(),
                    path: entry.path.clone(),
                    value: entry.sha256.clone(),
                });
            }
        }
        for link in &self.symlinks {
            if !symlink_stays_inside(&link.path, &link.target) {
                return Err(ManifestError::EscapingSymlink {
                    file: file(),
                    path: link.path.clone(),
                    target: link.target.clone(),
                });
            }
        }
        self.check_layout(origin)
    }

    /// Modules live under `usr/lib/modules/<kernel-release>/`, and an overlay carries no
    /// module index of its own (a sysext-style overlay that does shadows the OS's index).
    fn check_layout(&self, origin: &Path) -> Result<(), ManifestError> {
        let modules_dir = self.modules_dir();
        for entry in &self.files {
            let path = &entry.path;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if is_module_file_name(name) && !path.starts_with(&modules_dir) {
                return Err(ManifestError::Layout {
                    file: origin.to_path_buf(),
                    path: path.clone(),
                    why: format!(
                        "kernel modules must be under {} (the manifest's kernel release)",
                        modules_dir.display()
                    ),
                });
            }
            if path.starts_with("usr/lib/modules") && name.starts_with("modules.") {
                return Err(ManifestError::Layout {
                    file: origin.to_path_buf(),
                    path: path.clone(),
                    why: "overlays must not carry a module index (modules.dep, modules.alias, …): it would shadow the OS's own; the agent loads by path".into(),
                });
            }
        }
        Ok(())
    }

    /// `usr/lib/modules/<kernel-release>` (relative).
    pub fn modules_dir(&self) -> PathBuf {
        Path::new("usr/lib/modules").join(&self.kernel_release)
    }

    /// The kernel module files, in manifest order.
    pub fn module_files(&self) -> impl Iterator<Item = &FileEntry> {
        let dir = self.modules_dir();
        self.files.iter().filter(move |f| {
            f.path.starts_with(&dir)
                && f.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_module_file_name)
        })
    }

    /// Does the overlay carry firmware (`usr/lib/firmware/…`)?
    pub fn has_firmware(&self) -> bool {
        self.files
            .iter()
            .any(|f| f.path.starts_with("usr/lib/firmware"))
    }

    /// Does the overlay carry user space (anything besides modules and firmware)?
    pub fn has_userspace(&self) -> bool {
        self.files
            .iter()
            .map(|f| &f.path)
            .chain(self.symlinks.iter().map(|s| &s.path))
            .any(|p| !p.starts_with("usr/lib/modules") && !p.starts_with("usr/lib/firmware"))
    }

    /// The file entry listed at `path` (relative to the overlay root), if any; links are not
    /// searched.
    pub fn file(&self, path: &Path) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// `nvidia.ko`, `nvidia-uvm.ko.xz`, `nvidia-drm.ko.zst`.
pub fn is_module_file_name(name: &str) -> bool {
    module_stem(name).is_some()
}

/// The module's file-name spelling (`nvidia-uvm`) of a module file name.
pub fn module_stem(name: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())
}

fn check_token(origin: &Path, field: &'static str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '~'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadField {
            file: origin.to_path_buf(),
            field,
            value: value.to_string(),
            why: "expected a non-empty name of letters, digits and . - _ + ~ not starting with '.'",
        })
    }
}

fn check_relative(origin: &Path, path: &Path) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::BadPath {
            file: origin.to_path_buf(),
            path: path.to_path_buf(),
            why,
        })
    };
    let text = path.to_string_lossy();
    if text.is_empty() {
        return bad("is empty");
    }
    if path.is_absolute() {
        return bad("is absolute");
    }
    if text.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    // Component iteration hides "a//b" and "a/./b"; compare the text with its normal form.
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => return bad("contains \"..\""),
            _ => return bad("is not a plain relative path"),
        }
    }
    if normal.as_os_str() != path.as_os_str() {
        return bad("is not in normal form (\"//\", \"./\" or a trailing \"/\")");
    }
    Ok(())
}

/// Resolve `target` lexically from the link's directory; it must stay at or below the root.
/// (Targets that pass through other links are checked when those links are checked.)
pub(crate) fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() || target.as_os_str().is_empty() {
        return false;
    }
    let mut depth: usize = link.components().count().saturating_sub(1);
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVER: &str = "6.1.0-28-cloud-amd64";

    fn manifest_text(extra: &str) -> String {
        format!(
            "format = 1\nkernel-release = \"{KVER}\"\ndriver-version = \"570.124.06\"\narch = \"x86_64\"\nflavor = \"open\"\n\n\
             [[file]]\npath = \"usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko.xz\"\nsize = 3\nsha256 = \"{}\"\n{extra}",
            "a".repeat(64)
        )
    }

    fn parse(extra: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(&manifest_text(extra), Path::new("/o/overlay.toml"))
    }

    #[test]
    fn parses_and_round_trips() {
        let m = parse(
            "[[symlink]]\npath = \"usr/lib64/libcuda.so\"\ntarget = \"libcuda.so.570.124.06\"\n",
        )
        .unwrap();
        assert_eq!(m.kernel_release, KVER);
        assert_eq!(m.flavor, Flavor::Open);
        assert_eq!(m.module_files().count(), 1);
        assert!(m.has_userspace());
        assert!(!m.has_firmware());
        let again = Manifest::parse(&m.to_toml(), Path::new("x")).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn rejects_absolute_and_dotdot() {
        let e = parse(&format!(
            "[[file]]\npath = \"/etc/passwd\"\nsize = 1\nsha256 = \"{}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(matches!(e, ManifestError::BadPath { .. }), "{e}");
        let e = parse(&format!(
            "[[file]]\npath = \"usr/../../etc/x\"\nsize = 1\nsha256 = \"{}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");
        let e = parse(&format!(
            "[[file]]\npath = \"usr//x\"\nsize = 1\nsha256 = \"{}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(matches!(e, ManifestError::BadPath { .. }), "{e}");
        let e = parse(&format!(
            "[[file]]\npath = \"usr/a\\nb\"\nsize = 1\nsha256 = \"{}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(e.to_string().contains("control"), "{e}");
    }

    #[test]
    fn rejects_duplicates() {
        let e = parse(&format!(
            "[[file]]\npath = \"usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko.xz\"\nsize = 3\nsha256 = \"{}\"\n",
            "a".repeat(64)
        ))
        .unwrap_err();
        assert!(matches!(e, ManifestError::Duplicate { .. }), "{e}");
        let e = parse(&format!("[[symlink]]\npath = \"usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko.xz\"\ntarget = \"x\"\n")).unwrap_err();
        assert!(matches!(e, ManifestError::Duplicate { .. }), "{e}");
    }

    #[test]
    fn rejects_escaping_symlinks() {
        for target in ["/usr/lib64/libc.so", "../../../etc/shadow", "../../.."] {
            let e = parse(&format!(
                "[[symlink]]\npath = \"usr/lib64/x\"\ntarget = \"{target}\"\n"
            ))
            .unwrap_err();
            assert!(
                matches!(e, ManifestError::EscapingSymlink { .. }),
                "{target}: {e}"
            );
        }
        parse("[[symlink]]\npath = \"usr/lib64/x\"\ntarget = \"../bin/y\"\n").unwrap();
    }

    #[test]
    fn rejects_setuid_and_bad_digest() {
        let e = parse(&format!(
            "[[file]]\npath = \"usr/bin/x\"\nsize = 1\nsha256 = \"{}\"\nmode = 0o4755\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(matches!(e, ManifestError::BadMode { .. }), "{e}");
        let e = parse("[[file]]\npath = \"usr/bin/x\"\nsize = 1\nsha256 = \"XYZ\"\n").unwrap_err();
        assert!(matches!(e, ManifestError::BadDigest { .. }), "{e}");
    }

    #[test]
    fn rejects_module_outside_its_kernel_dir_and_module_index() {
        let e = parse(&format!("[[file]]\npath = \"usr/lib/modules/9.9.9/extra/nvidia-uvm.ko\"\nsize = 1\nsha256 = \"{}\"\n", "b".repeat(64))).unwrap_err();
        assert!(e.to_string().contains(KVER), "{e}");
        let e = parse(&format!(
            "[[file]]\npath = \"usr/lib/modules/{KVER}/modules.dep\"\nsize = 1\nsha256 = \"{}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(e.to_string().contains("module index"), "{e}");
    }

    #[test]
    fn rejects_unknown_keys_and_formats() {
        let e = Manifest::parse(
            &manifest_text("").replace("format = 1", "format = 2"),
            Path::new("m"),
        )
        .unwrap_err();
        assert!(
            matches!(e, ManifestError::UnsupportedFormat { found: 2, .. }),
            "{e}"
        );
        let e = Manifest::parse(
            &format!("{}colour = \"red\"\n", manifest_text("")),
            Path::new("m"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Manifest::parse(&manifest_text("").replace("x86_64", "../x"), Path::new("m"))
            .unwrap_err();
        assert!(
            matches!(e, ManifestError::BadField { field: "arch", .. }),
            "{e}"
        );
    }

    #[test]
    fn file_under_a_file_is_refused() {
        let e = parse(&format!(
            "[[file]]\npath = \"usr/bin/x\"\nsize = 1\nsha256 = \"{0}\"\n[[file]]\npath = \"usr/bin/x/y\"\nsize = 1\nsha256 = \"{0}\"\n",
            "b".repeat(64)
        ))
        .unwrap_err();
        assert!(matches!(e, ManifestError::NotADirectory { .. }), "{e}");
    }

    #[test]
    fn module_stems() {
        assert_eq!(module_stem("nvidia-uvm.ko.xz"), Some("nvidia-uvm"));
        assert_eq!(module_stem("nvidia.ko"), Some("nvidia"));
        assert_eq!(module_stem("nvidia.ko.gz"), None);
        assert_eq!(module_stem(".ko"), None);
    }
}
