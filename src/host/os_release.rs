//! `/etc/os-release` (falling back to `/usr/lib/os-release`), and which OS family it names.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Root;

/// The OS families the agent knows how to watch; everything else is `Other`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OsFamily {
    /// Fedora CoreOS (`ID=fedora`, `VARIANT_ID=coreos`).
    FedoraCoreos,
    /// Red Hat Enterprise Linux CoreOS (`ID=rhcos`).
    Rhcos,
    /// CentOS Stream CoreOS (`ID=scos`, or `ID=centos` with `VARIANT_ID=coreos`).
    CentosStreamCoreos,
    /// Flatcar Container Linux (`ID=flatcar`).
    Flatcar,
    /// Garden Linux (`ID=gardenlinux`).
    GardenLinux,
    /// Any other OS; the `auto` detector watches it with the generic detector (ostree's on an ostree
    /// host).
    Other,
}

impl OsFamily {
    /// Does this OS update itself through rpm-ostree?
    pub fn is_rpm_ostree(&self) -> bool {
        matches!(
            self,
            OsFamily::FedoraCoreos | OsFamily::Rhcos | OsFamily::CentosStreamCoreos
        )
    }
}

/// The fields of os-release(5) the agent uses, plus the OS family derived from them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OsRelease {
    /// The family derived from `ID` and `VARIANT_ID` (`ID_LIKE` is not consulted).
    pub family: OsFamily,
    /// `ID`, `linux` when absent (as os-release(5) specifies).
    pub id: String,
    /// Absent on Garden Linux, which has no `VERSION_ID`.
    pub version_id: Option<String>,
    /// `VARIANT_ID`, if set.
    pub variant_id: Option<String>,
    /// `PRETTY_NAME`, if set.
    pub pretty_name: Option<String>,
    /// Where it was read from (host path).
    pub source: PathBuf,
}

/// Errors reading or parsing os-release.
#[derive(Debug, thiserror::Error)]
pub enum OsReleaseError {
    /// Neither `/etc/os-release` nor `/usr/lib/os-release` exists under the root.
    #[error("no os-release found: tried {tried}; expected an os-release(5) file under the root")]
    Missing {
        /// The candidates tried, as host paths joined with `, `.
        tried: String,
    },
    /// An os-release file exists but could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file, resolved under the root.
        path: PathBuf,
        /// The I/O error from the read.
        error: std::io::Error,
    },
    /// A non-blank, non-comment line is not `KEY=value` with a key of ASCII letters, digits and
    /// `_`.
    #[error("{path}:{line}: expected KEY=value, found {text:?}")]
    Syntax {
        /// The file, as a host path.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line, untrimmed.
        text: String,
    },
}

const CANDIDATES: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

impl OsRelease {
    /// Read `/etc/os-release`, or `/usr/lib/os-release` when the first does not exist, under
    /// `root`.
    pub fn read(root: &Root) -> Result<Self, OsReleaseError> {
        for candidate in CANDIDATES {
            let path = root.join(candidate);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Self::parse(&text, PathBuf::from(candidate)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(OsReleaseError::Read {
                        path,
                        error: source,
                    })
                }
            }
        }
        Err(OsReleaseError::Missing {
            tried: CANDIDATES.join(", "),
        })
    }

    /// Parse os-release text; `source` is the host path it came from (recorded, and named in
    /// errors).
    pub fn parse(text: &str, source: PathBuf) -> Result<Self, OsReleaseError> {
        let fields = parse_fields(text).map_err(|(line, text)| OsReleaseError::Syntax {
            path: source.clone(),
            line,
            text,
        })?;
        let get = |key: &str| fields.get(key).cloned();
        let id = get("ID").unwrap_or_else(|| "linux".to_string());
        let variant_id = get("VARIANT_ID");
        let id_like = get("ID_LIKE").unwrap_or_default();
        let family = family_of(&id, variant_id.as_deref(), &id_like);
        Ok(OsRelease {
            family,
            id,
            version_id: get("VERSION_ID"),
            variant_id,
            pretty_name: get("PRETTY_NAME"),
            source,
        })
    }
}

fn family_of(id: &str, variant_id: Option<&str>, _id_like: &str) -> OsFamily {
    match (id, variant_id) {
        ("fedora", Some("coreos")) => OsFamily::FedoraCoreos,
        ("rhcos", _) => OsFamily::Rhcos,
        ("scos", _) => OsFamily::CentosStreamCoreos,
        ("centos", Some("coreos")) => OsFamily::CentosStreamCoreos,
        ("flatcar", _) => OsFamily::Flatcar,
        ("gardenlinux", _) => OsFamily::GardenLinux,
        _ => OsFamily::Other,
    }
}

/// os-release(5) is a restricted shell syntax: `KEY=value`, values optionally in single or
/// double quotes, `\` escapes inside double quotes, `#` comments and blank lines.
fn parse_fields(text: &str) -> Result<BTreeMap<String, String>, (usize, String)> {
    let mut out = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((index + 1, raw.to_string()));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((index + 1, raw.to_string()));
        }
        out.insert(key.to_string(), unquote(value.trim()));
    }
    Ok(out)
}

fn unquote(value: &str) -> String {
    let bytes = value.as_bytes();
    if bytes.len() >= 2 && bytes[0] == b'\'' && bytes[bytes.len() - 1] == b'\'' {
        return value[1..value.len() - 1].to_string();
    }
    if bytes.len() >= 2 && bytes[0] == b'"' && bytes[bytes.len() - 1] == b'"' {
        let mut out = String::new();
        let mut chars = value[1..value.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(text: &str) -> OsFamily {
        OsRelease::parse(text, "/etc/os-release".into())
            .unwrap()
            .family
    }

    #[test]
    fn recognises_each_family() {
        assert_eq!(
            family("NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=41\nVARIANT_ID=coreos\n"),
            OsFamily::FedoraCoreos
        );
        assert_eq!(
            family("ID=fedora\nVARIANT_ID=workstation\n"),
            OsFamily::Other
        );
        assert_eq!(
            family("NAME=\"Red Hat Enterprise Linux CoreOS\"\nID=\"rhcos\"\nID_LIKE=\"rhel fedora\"\nVERSION_ID=\"4.16\"\n"),
            OsFamily::Rhcos
        );
        assert_eq!(
            family("ID=scos\nID_LIKE=\"rhel fedora\"\n"),
            OsFamily::CentosStreamCoreos
        );
        assert_eq!(
            family("NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nID_LIKE=coreos\nVERSION_ID=4081.2.0\n"),
            OsFamily::Flatcar
        );
        assert_eq!(
            family("ID=gardenlinux\nNAME=\"Garden Linux\"\nGARDENLINUX_VERSION=1592.3\n"),
            OsFamily::GardenLinux
        );
    }

    #[test]
    fn garden_linux_has_no_version_id() {
        let os = OsRelease::parse("ID=gardenlinux\n", "/etc/os-release".into()).unwrap();
        assert_eq!(os.version_id, None);
    }

    #[test]
    fn quotes_and_escapes() {
        let os = OsRelease::parse(
            "# comment\n\nPRETTY_NAME=\"A \\\"quoted\\\" name\"\nID='debian'\n",
            "/etc/os-release".into(),
        )
        .unwrap();
        assert_eq!(os.pretty_name.as_deref(), Some("A \"quoted\" name"));
        assert_eq!(os.id, "debian");
    }

    #[test]
    fn syntax_error_names_line() {
        let err = OsRelease::parse("ID=x\nthis is not a field\n", "/etc/os-release".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/os-release:2"), "{err}");
    }

    #[test]
    fn falls_back_to_usr_lib() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::fs::write(dir.path().join("usr/lib/os-release"), "ID=flatcar\n").unwrap();
        let os = OsRelease::read(&Root::new(dir.path())).unwrap();
        assert_eq!(os.family, OsFamily::Flatcar);
        assert_eq!(os.source, PathBuf::from("/usr/lib/os-release"));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            OsRelease::read(&Root::new(empty.path())),
            Err(OsReleaseError::Missing { .. })
        ));
    }
}
