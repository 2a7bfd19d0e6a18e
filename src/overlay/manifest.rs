//! `overlay.toml`: the versioned manifest of an overlay. Parsing is pure and strict: every
//! path is relative and stays inside the overlay, nothing is listed twice, modes carry no
//! setuid/setgid bits, digests are well-formed.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MANIFEST_NAME: &str = "overlay.toml";
/// The only manifest format this agent reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Files a store generates inside an overlay after verification (not part of the manifest).
pub const GENERATED_FILES: [&str; 1] = ["etc/ld.so.cache"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// NVIDIA's open GPU kernel modules (need the GSP firmware).
    Open,
    /// The proprietary kernel modules.
    Proprietary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    #[serde(default = "default_mode", skip_serializing_if = "is_default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

fn is_default_mode(mode: &u32) -> bool {
    *mode == 0o644
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkEntry {
    pub path: PathBuf,
    pub target: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    pub format: u32,
    pub kernel_release: String,
    pub driver_version: String,
    pub arch: String,
    pub flavor: Flavor,
    #[serde(default, rename = "file", skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    #[serde(default, rename = "symlink", skip_serializing_if = "Vec::is_empty")]
    pub symlinks: Vec<SymlinkEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{file}: manifest format {found} is not supported (this agent reads format {FORMAT_VERSION}); upgrade nvdriver-agent or rebuild the overlay")]
    UnsupportedFormat { file: PathBuf, found: u32 },
    #[error("{file}: {field} {value:?} is not valid: {why}")]
    BadField {
        file: PathBuf,
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{file}: entry {path:?} {why}; overlay paths must be relative, without \".\" or \"..\", and stay inside the overlay")]
    BadPath {
        file: PathBuf,
        path: PathBuf,
        why: &'static str,
    },
    #[error("{file}: {path:?} is listed twice")]
    Duplicate { file: PathBuf, path: PathBuf },
    #[error("{file}: {path:?} is listed as a file or link but {child:?} is listed beneath it")]
    NotADirectory {
        file: PathBuf,
        path: PathBuf,
        child: PathBuf,
    },
    #[error("{file}: symlink {path:?} -> {target:?} leaves the overlay; links must be relative and resolve inside it")]
    EscapingSymlink {
        file: PathBuf,
        path: PathBuf,
        target: PathBuf,
    },
    #[error("{file}: {path:?} has mode {mode:o}; only permission bits up to 0755 are allowed (no setuid, setgid, sticky or world-writable)")]
    BadMode {
        file: PathBuf,
        path: PathBuf,
        mode: u32,
    },
    #[error("{file}: {path:?} sha256 {value:?} is not 64 lowercase hex digits")]
    BadDigest {
        file: PathBuf,
        path: PathBuf,
        value: String,
    },
    #[error("{file}: {path:?}: {why}")]
    Layout {
        file: PathBuf,
        path: PathBuf,
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
