//! Minisign signatures over an overlay's manifest: `overlay.toml.minisig` beside
//! `overlay.toml`. The manifest lists every file's sha256, so a good signature over it covers
//! the whole overlay once the tree is verified against the manifest.
//!
//! Trusted public keys are minisign `.pub` files in `/etc/nvdriver-agent/keys.d/`. The policy
//! (`[trust] signatures`) says whether a signature is required, checked when present, or
//! ignored. Checking is pure: the caller reads the files.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Serialize;

use crate::host::Root;

/// The signature file beside the manifest.
pub const SIGNATURE_NAME: &str = "overlay.toml.minisig";
/// Where trusted public keys live (a host path).
pub const KEYS_DIR: &str = "/etc/nvdriver-agent/keys.d";
/// A signature file larger than this is not a minisign signature.
pub const MAX_SIGNATURE_BYTES: u64 = 4096;

pub use crate::config::SignaturePolicy;

/// A minisign key id, printed as minisign prints it (16 upper-case hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// One trusted public key.
pub struct TrustedKey {
    /// The key's id, by which a signature names the key that made it.
    pub id: KeyId,
    /// The file it came from (host path).
    pub file: PathBuf,
    key: minisign_verify::PublicKey,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKey")
            .field("id", &self.id)
            .field("file", &self.file)
            .finish()
    }
}

/// What a signature check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum SignatureStatus {
    /// A good signature by a trusted key.
    Verified {
        /// The key's id, as minisign prints it (16 upper-case hex digits).
        key_id: String,
    },
    /// No signature (accepted by the policy).
    Unsigned,
    /// The policy is `off`.
    NotChecked,
}

impl fmt::Display for SignatureStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureStatus::Verified { key_id } => write!(f, "signed by trusted key {key_id}"),
            SignatureStatus::Unsigned => f.write_str("unsigned"),
            SignatureStatus::NotChecked => f.write_str("not checked (trust.signatures = \"off\")"),
        }
    }
}

/// Why a signature check, a key file or signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The policy is `require` and the overlay has no signature.
    #[error("{origin}: no {SIGNATURE_NAME} beside the manifest, and trust.signatures = \"require\"; sign the overlay (nvdriver-agent overlay pack --sign KEY) or relax the policy")]
    Missing {
        /// Names the overlay in messages (the caller's `origin`).
        origin: String,
    },
    /// The signature text cannot be decoded as a minisign signature.
    #[error("{origin}: {SIGNATURE_NAME} is not a minisign signature: {why}")]
    Malformed {
        /// Names the overlay in messages (the caller's `origin`).
        origin: String,
        /// What is wrong with it.
        why: String,
    },
    /// The signature was made by a key that is not among the trusted keys.
    #[error("{origin}: signed by key {key_id}, which is not trusted; put its public key into {KEYS_DIR}/ if it should be")]
    UnknownKey {
        /// Names the overlay in messages (the caller's `origin`).
        origin: String,
        /// The key the signature names.
        key_id: KeyId,
    },
    /// The signature names a trusted key but does not verify over the manifest's bytes.
    #[error("{origin}: the signature by trusted key {key_id} ({file}) does not match {manifest}: the manifest changed after signing, or the signature is forged")]
    BadSignature {
        /// Names the overlay in messages (the caller's `origin`).
        origin: String,
        /// The trusted key the signature names.
        key_id: KeyId,
        /// Host path of that key's file.
        file: PathBuf,
        /// The manifest's file name (`overlay.toml`), for the message.
        manifest: &'static str,
    },
    /// A key file cannot be used: a public key in [`KEYS_DIR`], or the secret key given for
    /// signing.
    #[error("{file}: not a usable minisign key: {why}; expected the two-line .pub or .key file `minisign -G` writes")]
    BadKey {
        /// The key file: a host path under [`KEYS_DIR`], or the secret key's path as given.
        file: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// [`KEYS_DIR`] or a key file in it could not be read.
    #[error("{path}: {error}")]
    Io {
        /// Its path on this machine (under the root).
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
}

/// The key id a minisign signature or public key names: the 8 bytes after the 2-byte algorithm
/// of its base64 line (little-endian, as minisign prints it).
fn key_id_of(text: &str, line: usize) -> Result<KeyId, String> {
    let encoded = text
        .lines()
        .nth(line)
        .ok_or_else(|| format!("expected at least {} lines", line + 1))?
        .trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("line {} is not base64: {e}", line + 1))?;
    let id: [u8; 8] = bytes
        .get(2..10)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("line {} is too short", line + 1))?;
    Ok(KeyId(u64::from_le_bytes(id)))
}

/// Parse a public key file's text (`untrusted comment: …` then the base64 key).
pub fn parse_public_key(text: &str, file: &Path) -> Result<TrustedKey, SignatureError> {
    let bad = |why: String| SignatureError::BadKey {
        file: file.to_path_buf(),
        why,
    };
    let key = minisign_verify::PublicKey::decode(text.trim()).map_err(|e| bad(e.to_string()))?;
    let id = key_id_of(text.trim(), 1).map_err(bad)?;
    Ok(TrustedKey {
        id,
        file: file.to_path_buf(),
        key,
    })
}

/// The trusted keys: every `*.pub` in [`KEYS_DIR`] under `root`, sorted by file name. A
/// missing directory means no trusted keys; an unreadable key file is an error (a key an
/// administrator put there must not silently not count).
pub fn load_trusted_keys(root: &Root) -> Result<Vec<TrustedKey>, SignatureError> {
    let dir = root.join(KEYS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SignatureError::Io {
                path: dir,
                error: source,
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pub"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = fs::read_to_string(path).map_err(|source| SignatureError::Io {
                path: path.clone(),
                error: source,
            })?;
            let host = Path::new(KEYS_DIR).join(path.file_name().unwrap_or_default());
            parse_public_key(&text, &host)
        })
        .collect()
}

/// Check `signature` (the text of `overlay.toml.minisig`, if there is one) over `manifest`
/// (the exact bytes of `overlay.toml`) under `policy`. `origin` names the overlay in messages.
pub fn check(
    policy: SignaturePolicy,
    keys: &[TrustedKey],
    manifest: &[u8],
    signature: Option<&str>,
    origin: &str,
) -> Result<SignatureStatus, SignatureError> {
    if policy == SignaturePolicy::Off {
        return Ok(SignatureStatus::NotChecked);
    }
    let Some(signature) = signature else {
        return match policy {
            SignaturePolicy::Require => Err(SignatureError::Missing {
                origin: origin.to_string(),
            }),
            _ => Ok(SignatureStatus::Unsigned),
        };
    };
    let malformed = |why: String| SignatureError::Malformed {
        origin: origin.to_string(),
        why,
    };
    let decoded =
        minisign_verify::Signature::decode(signature).map_err(|e| malformed(e.to_string()))?;
    let key_id = key_id_of(signature, 1).map_err(malformed)?;
    let Some(key) = keys.iter().find(|k| k.id == key_id) else {
        return Err(SignatureError::UnknownKey {
            origin: origin.to_string(),
            key_id,
        });
    };
    // Legacy (non-prehashed) signatures are accepted: minisign < 0.10 made them by default.
    key.key
        .verify(manifest, &decoded, true)
        .map_err(|_| SignatureError::BadSignature {
            origin: origin.to_string(),
            key_id,
            file: key.file.clone(),
            manifest: crate::overlay::MANIFEST_NAME,
        })?;
    Ok(SignatureStatus::Verified {
        key_id: key_id.to_string(),
    })
}

/// Sign manifest bytes with a minisign secret key file's text (unencrypted, or encrypted with
/// `password`). The trusted comment is fixed, so the same key and manifest give a signature
/// that differs only by the signature's own randomness.
pub fn sign(
    manifest: &[u8],
    secret_key: &str,
    password: Option<String>,
    trusted_comment: &str,
    file: &Path,
) -> Result<String, SignatureError> {
    let bad = |why: String| SignatureError::BadKey {
        file: file.to_path_buf(),
        why,
    };
    let encoded = secret_key
        .lines()
        .nth(1)
        .ok_or_else(|| bad("expected two lines".into()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| bad(format!("line 2 is not base64: {e}")))?;
    // An unencrypted key (`minisign -G -W`): read directly, because minisign 0.11 writes such
    // keys with a zero checksum that the minisign crate's loader rejects.
    let sk = if bytes.get(2..4) == Some(&[0, 0][..]) {
        minisign::SecretKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?
    } else {
        let Some(password) = password else {
            return Err(bad(
                "the key is encrypted; put its password into NVDRIVER_AGENT_SIGN_PASSWORD".into(),
            ));
        };
        minisign::SecretKeyBox::from_string(secret_key)
            .and_then(|b| b.into_secret_key(Some(password)))
            .map_err(|e| bad(e.to_string()))?
    };
    let signature = minisign::sign(
        None,
        &sk,
        io::Cursor::new(manifest),
        Some(trusted_comment),
        Some("signature from nvdriver-agent overlay pack"),
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(signature.into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        public: String,
        secret: String,
    }

    fn pair() -> Pair {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        Pair {
            public: kp.pk.to_box().unwrap().into_string(),
            secret: kp.sk.to_box(None).unwrap().into_string(),
        }
    }

    fn trusted(p: &Pair) -> TrustedKey {
        parse_public_key(&p.public, Path::new("/etc/nvdriver-agent/keys.d/a.pub")).unwrap()
    }

    const MANIFEST: &[u8] = b"format = 1\nkernel-release = \"6.1.0\"\n";

    fn signed(p: &Pair, manifest: &[u8]) -> String {
        sign(manifest, &p.secret, None, "t", Path::new("k.key")).unwrap()
    }

    #[test]
    fn good_signature_names_the_key() {
        let p = pair();
        let key = trusted(&p);
        let sig = signed(&p, MANIFEST);
        let status = check(SignaturePolicy::Require, &[key], MANIFEST, Some(&sig), "o").unwrap();
        let SignatureStatus::Verified { key_id } = status else {
            panic!("{status:?}")
        };
        assert_eq!(key_id.len(), 16);
    }

    #[test]
    fn wrong_key_is_unknown_with_its_id() {
        let (a, b) = (pair(), pair());
        let sig = signed(&b, MANIFEST);
        let err = check(
            SignaturePolicy::IfPresent,
            &[trusted(&a)],
            MANIFEST,
            Some(&sig),
            "o",
        )
        .unwrap_err();
        let id = trusted(&b).id;
        assert!(matches!(err, SignatureError::UnknownKey { key_id, .. } if key_id == id));
        assert!(err.to_string().contains(&id.to_string()), "{err}");
    }

    #[test]
    fn changed_manifest_is_a_bad_signature() {
        let p = pair();
        let sig = signed(&p, MANIFEST);
        let mut changed = MANIFEST.to_vec();
        changed.extend_from_slice(b"arch = \"x86_64\"\n");
        let err = check(
            SignaturePolicy::IfPresent,
            &[trusted(&p)],
            &changed,
            Some(&sig),
            "o",
        )
        .unwrap_err();
        assert!(matches!(err, SignatureError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("changed after signing"), "{err}");
    }

    #[test]
    fn policy_decides_about_a_missing_signature() {
        let err = check(SignaturePolicy::Require, &[], MANIFEST, None, "o").unwrap_err();
        assert!(matches!(err, SignatureError::Missing { .. }));
        assert_eq!(
            check(SignaturePolicy::IfPresent, &[], MANIFEST, None, "o").unwrap(),
            SignatureStatus::Unsigned
        );
        assert_eq!(
            check(SignaturePolicy::Off, &[], MANIFEST, Some("garbage"), "o").unwrap(),
            SignatureStatus::NotChecked
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let err = check(
            SignaturePolicy::IfPresent,
            &[],
            MANIFEST,
            Some("untrusted comment: x\nnot base64!\n"),
            "o",
        )
        .unwrap_err();
        assert!(matches!(err, SignatureError::Malformed { .. }), "{err}");
    }
}
