//! The keys the running kernel trusts for module signatures, read from `/proc/keys` (and the
//! keyrings' member lists), and whether a module's signer is one of them.
//!
//! What the kernel does, and what this module can see of it:
//!
//! - A module signature is checked against `.secondary_trusted_keys` when the kernel has it,
//!   else `.builtin_trusted_keys` (`mod_verify_sig` → `verify_pkcs7_signature(…,
//!   VERIFY_USE_SECONDARY_KEYRING, …)`, certs/system_keyring.c `verify_pkcs7_message_sig`).
//!   The secondary keyring has the builtin one linked into it, and on 5.18+ the `.machine`
//!   keyring (MOK keys) too (`set_machine_trusted_keys`); the search
//!   (crypto/asymmetric_keys/pkcs7_trust.c `pkcs7_validate_trust_one` → `find_asymmetric_key`)
//!   descends into linked keyrings. `.platform` (UEFI db) is used for kexec images and IMA
//!   (`VERIFY_USE_PLATFORM_KEYRING`), not for modules, unless a distribution links it into the
//!   secondary keyring: following the links finds that case too.
//! - `/proc/keys` does not list membership. Each line is one key; a keyring's line only says
//!   how many keys it holds (security/keys/keyring.c `keyring_describe`). The members are read
//!   with `keyctl(KEYCTL_READ, keyring)` (what `keyctl list` does), starting from the trusted
//!   keyring and following linked keyrings.
//! - An X.509 key's description is `<subject name>: <hex>`, the hex being the certificate's
//!   subject key identifier when it has one, else its serial number
//!   (crypto/asymmetric_keys/x509_public_key.c `x509_key_preparse`, "Propose a description").
//!   `/proc/keys` then adds the subtype (`X509.rsa`) and, when the certificate has a subject key
//!   identifier, its last four bytes (crypto/asymmetric_keys/asymmetric_type.c
//!   `asymmetric_key_describe`, `kids->id[1]`).
//! - A module's PKCS#7 signature names its key by issuer and serial number (sign-file's
//!   default) or by subject key identifier (`sign-file -k`); the kernel finds the key by that id
//!   alone (`asymmetric_key_generate_id(serial, issuer)` or `(skid)`).
//!
//! So a module named by subject key identifier is matched exactly. A module named by issuer
//! and serial is matched exactly against a key without a subject key identifier (its
//! description shows the serial) whose name is the issuer's (a self-signed certificate).
//! Against a key whose description shows a subject key identifier the serial cannot be
//! compared: that is "cannot tell", never a guess.

use std::collections::BTreeSet;
use std::fs;
use std::io;

use super::{HostError, Root};
use crate::modinfo::ModuleSignature;

/// Host path of the kernel's list of keys the reader may view.
pub const PROC_KEYS: &str = "/proc/keys";
/// On a fake root (tests, `--root DIR`), where no `keyctl` can ask a kernel: each line is
/// `<keyring serial>: <member serial> …` (hex, as `/proc/keys` spells them), what
/// `keyctl(KEYCTL_READ)` answers for that keyring on a real host.
pub const SIMULATED_KEYRINGS: &str = "/run/nvdriver-agent/simulated-keyrings";

/// The keyring module signatures are checked against when the kernel has it.
pub const SECONDARY: &str = ".secondary_trusted_keys";
/// The kernel's built-in keys; checked alone when there is no secondary keyring.
pub const BUILTIN: &str = ".builtin_trusted_keys";
/// UEFI db keys: kexec and IMA only, not modules (unless linked into the secondary keyring).
pub const PLATFORM: &str = ".platform";

/// One line of `/proc/keys` (security/keys/proc.c `proc_keys_show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcKey {
    /// The key's serial number.
    pub serial: u32,
    /// The type, cut to 9 characters as the kernel prints it (`keyring`, `asymmetri`).
    pub kind: String,
    /// What the type's `describe` printed (for an asymmetric key: description, subtype, id).
    pub text: String,
}

/// An X.509 key as `/proc/keys` describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AsymmetricKey {
    /// The key's serial number (the keyring's, not the certificate's).
    #[serde(skip)]
    pub serial: u32,
    /// The subject name the kernel made of the certificate (its CN, or `O: CN`).
    pub name: String,
    /// The hex after the name: the subject key identifier, or the serial number when the
    /// certificate has none; lower case, no colons. `None` for a description of another shape.
    pub id: Option<String>,
    /// Whether the certificate has a subject key identifier (so `id` is it, not the serial).
    pub has_skid: bool,
    /// The keyring it is directly in.
    pub keyring: String,
}

impl AsymmetricKey {
    /// `name: id`, as the key's description reads.
    pub fn description(&self) -> String {
        match &self.id {
            Some(id) => format!("{}: {} ({})", self.name, id, self.id_kind()),
            None => self.name.clone(),
        }
    }

    fn id_kind(&self) -> &'static str {
        if self.has_skid {
            "subject key id"
        } else {
            "serial"
        }
    }
}

/// The keys the kernel checks module signatures against, and the `.platform` keys beside them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrustedKeys {
    /// The keyring the search starts at ([`SECONDARY`], else [`BUILTIN`]).
    pub keyring: String,
    /// Every X.509 key reachable from it.
    pub keys: Vec<AsymmetricKey>,
    /// `.platform` keys not reachable from it: trusted for kexec and IMA, not for modules.
    pub platform_only: Vec<AsymmetricKey>,
    /// Keyrings whose members could not be read, with why; while any is, no module is said
    /// to be untrusted.
    pub unreadable: Vec<String>,
}

/// Split `/proc/keys` into lines of [`ProcKey`]; malformed lines are skipped.
pub fn parse_proc_keys(text: &str) -> Vec<ProcKey> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<ProcKey> {
    // "%08x %c%c%c%c%c%c%c %5d %4s %08x %5d %5d %-9.9s " then the type's describe.
    let mut rest = line;
    let mut fields = Vec::with_capacity(8);
    for _ in 0..8 {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        fields.push(&rest[..end]);
        rest = &rest[end..];
    }
    let serial = u32::from_str_radix(fields[0], 16).ok()?;
    if fields[7].is_empty() {
        return None;
    }
    Some(ProcKey {
        serial,
        kind: fields[7].to_string(),
        text: rest.trim_start_matches(' ').to_string(),
    })
}

/// A keyring line's name (`.builtin_trusted_keys: 1` → `.builtin_trusted_keys`).
fn keyring_name(key: &ProcKey) -> Option<&str> {
    (key.kind == "keyring").then(|| key.text.rsplit_once(": ").map_or(&*key.text, |(n, _)| n))
}

/// An asymmetric key line's name, id and whether the id is a subject key identifier:
/// `Build time autogenerated kernel key: 4d51…e8: X509.rsa 9d0babe8 []`.
pub fn parse_asymmetric(key: &ProcKey, keyring: &str) -> Option<AsymmetricKey> {
    if key.kind != "asymmetri" {
        return None;
    }
    let text = key.text.trim_end();
    let text = text.rsplit_once(" [").map_or(text, |(head, _)| head);
    // "<description>: <subtype> [<last 4 bytes of the skid>]"; the description has ": " too.
    let (description, subtype) = text.rsplit_once(": ")?;
    let tail = subtype
        .split_whitespace()
        .nth(1)
        .map(str::to_ascii_lowercase);
    let (name, id) = match description.rsplit_once(": ") {
        Some((name, hex)) if is_hex(hex) => (name, Some(hex.to_ascii_lowercase())),
        _ => (description, None),
    };
    let has_skid = match (&tail, &id) {
        (Some(tail), Some(id)) => id.ends_with(tail.as_str()),
        (Some(_), None) => true,
        (None, _) => false,
    };
    Some(AsymmetricKey {
        serial: key.serial,
        name: name.to_string(),
        id,
        has_skid,
        keyring: keyring.to_string(),
    })
}

fn is_hex(text: &str) -> bool {
    !text.is_empty() && text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The trusted keys, from `/proc/keys` and each keyring's members (`members(serial)`: what
/// `KEYCTL_READ` gives, or why it could not be read). `None` when `/proc/keys` names neither
/// trusted keyring (a kernel without module signing, or a root without `/proc/keys`).
pub fn trusted_keys(
    keys: &[ProcKey],
    members: impl Fn(u32) -> Result<Vec<u32>, String>,
) -> Option<TrustedKeys> {
    let named = |name: &str| keys.iter().find(|k| keyring_name(k) == Some(name));
    let start = named(SECONDARY).or_else(|| named(BUILTIN))?;
    let mut out = TrustedKeys {
        keyring: keyring_name(start).unwrap_or_default().to_string(),
        ..TrustedKeys::default()
    };
    let mut reached = BTreeSet::new();
    collect(
        keys,
        start,
        &members,
        &mut reached,
        &mut out.keys,
        &mut out.unreadable,
    );
    if let Some(platform) = named(PLATFORM).filter(|p| !reached.contains(&p.serial)) {
        let mut ignored = Vec::new();
        collect(
            keys,
            platform,
            &members,
            &mut reached,
            &mut out.platform_only,
            &mut ignored,
        );
    }
    Some(out)
}

/// Every asymmetric key reachable from `keyring`, following linked keyrings once each.
fn collect(
    keys: &[ProcKey],
    keyring: &ProcKey,
    members: &impl Fn(u32) -> Result<Vec<u32>, String>,
    reached: &mut BTreeSet<u32>,
    found: &mut Vec<AsymmetricKey>,
    unreadable: &mut Vec<String>,
) {
    let mut queue = vec![keyring];
    while let Some(ring) = queue.pop() {
        if !reached.insert(ring.serial) {
            continue;
        }
        let name = keyring_name(ring).unwrap_or_default();
        let serials = match members(ring.serial) {
            Ok(serials) => serials,
            Err(why) => {
                unreadable.push(format!("{name} ({:08x}): {why}", ring.serial));
                continue;
            }
        };
        for serial in serials {
            let Some(member) = keys.iter().find(|k| k.serial == serial) else {
                unreadable.push(format!(
                    "{name}: member {serial:08x} is not in /proc/keys (not viewable)"
                ));
                continue;
            };
            if keyring_name(member).is_some() {
                queue.push(member);
            } else if let Some(key) = parse_asymmetric(member, name) {
                if reached.insert(member.serial) {
                    found.push(key);
                }
            }
        }
    }
}

/// Whether the kernel trusts a module's signing key, as far as `/proc/keys` shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict", content = "detail")]
pub enum KeyTrust {
    /// A trusted key is the module's signer; the text names it.
    Trusted(String),
    /// No trusted key can be the signer; the text says why.
    NotTrusted(String),
    /// The data cannot decide; the text says why.
    CannotTell(String),
}

/// Compare a module's signer with the trusted keys (see the module docs for the rules).
pub fn signer_trust(sig: &ModuleSignature, trusted: &TrustedKeys) -> KeyTrust {
    let Some(module_id) = sig.key_id.as_deref().map(plain_hex) else {
        return KeyTrust::CannotTell("the signature names no key (unreadable trailer)".into());
    };
    let by_skid = sig.key_id_is_skid;
    let cn = sig.signer.as_deref();
    let mut undecided = Vec::new();
    for key in &trusted.keys {
        let key_id = key.id.as_deref().map(plain_hex);
        let name_matches =
            cn.is_some_and(|cn| key.name == cn || key.name.ends_with(&format!(": {cn}")));
        match (by_skid, key.has_skid, key_id) {
            (true, true, Some(id)) if id == module_id => {
                return KeyTrust::Trusted(format!("{} in {}", key.description(), key.keyring))
            }
            (false, false, Some(id)) if id == module_id && name_matches => {
                return KeyTrust::Trusted(format!("{} in {}", key.description(), key.keyring))
            }
            // Same serial, another name: a certificate issued by a CA named as the module says.
            (false, false, Some(id)) if id == module_id => undecided.push(key),
            (false, true, _) | (_, _, None) => undecided.push(key),
            _ => {}
        }
    }
    let signer = describe_signer(sig);
    if !trusted.unreadable.is_empty() {
        return KeyTrust::CannotTell(format!(
            "{signer}: some trusted keyrings could not be read ({})",
            trusted.unreadable.join("; ")
        ));
    }
    if undecided.is_empty() {
        let platform = trusted
            .platform_only
            .iter()
            .any(|k| k.id.as_deref().map(plain_hex) == Some(module_id.clone()));
        return KeyTrust::NotTrusted(format!(
            "{signer} is none of the keys in {} [{}]{}",
            trusted.keyring,
            list(&trusted.keys),
            if platform {
                "; it is in .platform, which the kernel uses for kexec and IMA, not for modules"
            } else {
                ""
            }
        ));
    }
    let same_name: Vec<&AsymmetricKey> = undecided
        .iter()
        .copied()
        .filter(|k| cn.is_some_and(|cn| k.name == cn || k.name.ends_with(&format!(": {cn}"))))
        .collect();
    KeyTrust::CannotTell(format!(
        "{signer}; /proc/keys shows {} by subject key id, not by serial, so the ids cannot be compared{}",
        list_refs(&undecided),
        if same_name.is_empty() {
            "; no trusted key has the signer's name".to_string()
        } else {
            format!("; {} has the signer's name", list_refs(&same_name))
        }
    ))
}

/// `signer "CN", key id (serial) 01:03:…` as a message names a module's key.
pub fn describe_signer(sig: &ModuleSignature) -> String {
    let what = if sig.key_id_is_skid {
        "subject key id"
    } else {
        "serial"
    };
    format!(
        "signer {:?}, key {} {}",
        sig.signer.as_deref().unwrap_or("(not named)"),
        what,
        sig.key_id.as_deref().unwrap_or("(none)")
    )
}

/// The keys as a message lists them.
pub fn list(keys: &[AsymmetricKey]) -> String {
    if keys.is_empty() {
        return "no keys".into();
    }
    keys.iter()
        .map(AsymmetricKey::description)
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_refs(keys: &[&AsymmetricKey]) -> String {
    keys.iter()
        .map(|k| k.description())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Colon hex or plain hex, any case, without leading zero bytes (DER sign padding: the
/// description prints the raw INTEGER, `modinfo` drops the padding).
fn plain_hex(id: &str) -> String {
    let hex: String = id
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let mut rest = hex.as_str();
    while rest.len() > 2 && rest.starts_with("00") {
        rest = &rest[2..];
    }
    rest.to_string()
}

/// Read the trusted keys under `root`: `/proc/keys`, then each keyring's members with
/// `keyctl(KEYCTL_READ)` on the real host, or from [`SIMULATED_KEYRINGS`] on a fake root.
/// `Ok(None)` when there is no `/proc/keys` or it names no trusted keyring.
pub fn read_trusted_keys(root: &Root) -> Result<Option<TrustedKeys>, HostError> {
    let path = root.join(PROC_KEYS);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(HostError::Read { path, error }),
    };
    let keys = parse_proc_keys(&text);
    if root.is_host() {
        return Ok(trusted_keys(&keys, |serial| {
            keyctl_read(serial).map_err(|e| e.to_string())
        }));
    }
    let simulated = fs::read_to_string(root.join(SIMULATED_KEYRINGS)).unwrap_or_default();
    let table = parse_simulated(&simulated);
    Ok(trusted_keys(&keys, |serial| {
        table
            .iter()
            .find(|(ring, _)| *ring == serial)
            .map(|(_, members)| members.clone())
            .ok_or_else(|| format!("no entry in {SIMULATED_KEYRINGS}"))
    }))
}

fn parse_simulated(text: &str) -> Vec<(u32, Vec<u32>)> {
    text.lines()
        .filter_map(|line| {
            let (ring, members) = line.split_once(':')?;
            let ring = u32::from_str_radix(ring.trim(), 16).ok()?;
            let members = members
                .split_whitespace()
                .filter_map(|m| u32::from_str_radix(m, 16).ok())
                .collect();
            Some((ring, members))
        })
        .collect()
}

/// `keyctl(KEYCTL_READ, keyring, buf, len)`: the serials of a keyring's members
/// (security/keys/keyring.c `keyring_read`), as `keyctl list` reads them.
#[allow(unsafe_code)]
fn keyctl_read(keyring: u32) -> io::Result<Vec<u32>> {
    const KEYCTL_READ: libc::c_long = 11;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which lives across
        // the call; keyctl takes no other pointer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_READ,
                libc::c_long::from(keyring as i32),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > buf.len() {
            buf.resize(n, 0);
            continue;
        }
        return Ok(buf[..n]
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
}

/// A file of `tests/fixtures/keys/` (captured on real hosts; see its README).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> String {
    let path: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/keys", name]
        .iter()
        .collect();
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILD_KEY: &str = "Build time autogenerated kernel key";

    fn h200() -> TrustedKeys {
        let keys = parse_proc_keys(&fixture("h200-proc-keys.txt"));
        let table = parse_simulated(&fixture("h200-simulated-keyrings"));
        trusted_keys(&keys, |serial| {
            table
                .iter()
                .find(|(r, _)| *r == serial)
                .map(|(_, m)| m.clone())
                .ok_or_else(|| "none".to_string())
        })
        .unwrap()
    }

    fn sig(signer: Option<&str>, key_id: &str, by_skid: bool) -> ModuleSignature {
        ModuleSignature {
            id_type: "PKCS#7".into(),
            signature_len: 681,
            signer: signer.map(str::to_string),
            key_id: Some(key_id.into()),
            hash_algo: Some("sha512".into()),
            key_id_is_skid: by_skid,
        }
    }

    /// The real GPU host: one key, the kernel's build key, in the builtin keyring; its
    /// description shows the subject key id, and /proc/keys shows the last 4 bytes of it.
    #[test]
    fn real_gpu_host_proc_keys() {
        let keys = parse_proc_keys(&fixture("h200-proc-keys.txt"));
        assert_eq!(keys.len(), 7);
        assert_eq!(keys[0].serial, 0x0a3575af);
        assert_eq!(keys[0].kind, "asymmetri");
        let key = parse_asymmetric(&keys[0], BUILTIN).unwrap();
        assert_eq!(key.name, BUILD_KEY);
        assert_eq!(
            key.id.as_deref(),
            Some("4d516c58e525776e0df512e5a9f5033c9d0babe8")
        );
        assert!(key.has_skid);
        let trusted = h200();
        assert_eq!(trusted.keyring, BUILTIN);
        assert_eq!(trusted.keys, vec![key]);
        assert!(trusted.unreadable.is_empty() && trusted.platform_only.is_empty());
    }

    /// The members the real KEYCTL_READ gave (h200-keyring-members.txt) are what the
    /// simulated-keyrings fixture says.
    #[test]
    fn simulated_membership_matches_the_captured_one() {
        let captured = fixture("h200-keyring-members.txt");
        let line = captured
            .lines()
            .find(|l| l.contains(".builtin_trusted_keys"))
            .unwrap();
        assert!(line.contains("members=['0a3575af']"), "{line}");
        assert_eq!(
            parse_simulated(&fixture("h200-simulated-keyrings")),
            vec![(0x128347ee, vec![0x0a3575af])]
        );
    }

    /// A development VM without module signing: the builtin keyring is there and empty, so
    /// no signer is trusted.
    #[test]
    fn empty_builtin_keyring_trusts_nobody() {
        let keys = parse_proc_keys(&fixture("dev-proc-keys.txt"));
        let trusted = trusted_keys(&keys, |_| Ok(Vec::new())).unwrap();
        assert!(trusted.keys.is_empty());
        let verdict = signer_trust(&sig(Some(BUILD_KEY), "01:02", false), &trusted);
        assert!(
            matches!(&verdict, KeyTrust::NotTrusted(why) if why.contains("no keys")),
            "{verdict:?}"
        );
    }

    /// The real nvidia.ko signature (issuer CN + serial) against the real key (shown by
    /// subject key id): the ids are of different kinds, so "cannot tell", naming the key with
    /// the same name.
    #[test]
    fn real_nvidia_signature_against_real_keyring_cannot_tell() {
        let tails = fixture("h200-nvidia-580-module-tails.txt");
        let line = tails.lines().find(|l| l.starts_with("nvidia.ko ")).unwrap();
        let tail = base64_decode(line.rsplit(' ').next().unwrap());
        let mut module = crate::modinfo::fixture_modules::FixtureModule::new(
            "nvidia",
            "6.18.44-fc-v973-gpu",
            "580.159.04",
        )
        .elf_bytes();
        // The trailer: PKCS#7 (sig_len from the header), the 12-byte header, the magic.
        let header = &tail[tail.len() - 40..tail.len() - 28];
        let sig_len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
        module.extend_from_slice(&tail[tail.len() - 40 - sig_len..]);
        let info =
            crate::modinfo::parse_module(&module, std::path::Path::new("nvidia.ko")).unwrap();
        let signature = info.signature.unwrap();
        assert_eq!(signature.signer.as_deref(), Some(BUILD_KEY));
        assert!(!signature.key_id_is_skid);
        assert!(signature
            .key_id
            .as_deref()
            .unwrap()
            .starts_with("01:03:93:72"));
        match signer_trust(&signature, &h200()) {
            KeyTrust::CannotTell(why) => {
                assert!(why.contains("01:03:93:72"), "{why}");
                assert!(why.contains("4d516c58"), "{why}");
                assert!(why.contains("has the signer's name"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn skid_signatures_match_exactly() {
        let trusted = h200();
        let same = sig(
            None,
            "4D:51:6C:58:E5:25:77:6E:0D:F5:12:E5:A9:F5:03:3C:9D:0B:AB:E8",
            true,
        );
        assert!(matches!(
            signer_trust(&same, &trusted),
            KeyTrust::Trusted(_)
        ));
        let other = sig(None, "DE:AD:BE:EF", true);
        match signer_trust(&other, &trusted) {
            KeyTrust::NotTrusted(why) => {
                assert!(
                    why.contains("DE:AD:BE:EF") && why.contains("4d516c58"),
                    "{why}"
                )
            }
            verdict => panic!("{verdict:?}"),
        }
    }

    /// A key without a subject key identifier shows its serial: comparable with a serial
    /// signature; the name must agree (a self-signed certificate), else "cannot tell".
    #[test]
    fn serial_keys_match_by_name_and_serial() {
        let text = "11111111 I------     1 perm 1f0b0000     0     0 keyring   .secondary_trusted_keys: 2\n\
                    22222222 I------     1 perm 1f0b0000     0     0 keyring   .machine: 1\n\
                    33333333 I------     1 perm 1f030000     0     0 asymmetri Org: My MOK: 00c0ffee: X509.rsa []\n\
                    44444444 I------     1 perm 1f0b0000     0     0 keyring   .platform: 1\n\
                    55555555 I------     1 perm 1f010000     0     0 asymmetri Microsoft UEFI CA: 0a0b: X509.rsa []\n";
        let keys = parse_proc_keys(text);
        let trusted = trusted_keys(&keys, |serial| match serial {
            0x11111111 => Ok(vec![0x22222222]),
            0x22222222 => Ok(vec![0x33333333]),
            0x44444444 => Ok(vec![0x55555555]),
            _ => Err("EACCES".into()),
        })
        .unwrap();
        assert_eq!(trusted.keyring, SECONDARY);
        assert_eq!(trusted.keys.len(), 1);
        assert_eq!(trusted.keys[0].keyring, ".machine");
        assert!(!trusted.keys[0].has_skid);
        assert_eq!(trusted.platform_only.len(), 1);
        // Sign padding (00) in the description, none in modinfo's serial.
        assert!(matches!(
            signer_trust(&sig(Some("My MOK"), "C0:FF:EE", false), &trusted),
            KeyTrust::Trusted(_)
        ));
        assert!(matches!(
            signer_trust(&sig(Some("A CA"), "C0:FF:EE", false), &trusted),
            KeyTrust::CannotTell(_)
        ));
        match signer_trust(&sig(Some("Microsoft UEFI CA"), "0A:0B", false), &trusted) {
            KeyTrust::NotTrusted(why) => assert!(why.contains(".platform"), "{why}"),
            verdict => panic!("{verdict:?}"),
        }
    }

    #[test]
    fn unreadable_keyring_never_says_untrusted() {
        let keys = parse_proc_keys(&fixture("h200-proc-keys.txt"));
        let trusted = trusted_keys(&keys, |_| Err("Permission denied".into())).unwrap();
        match signer_trust(&sig(None, "DE:AD", true), &trusted) {
            KeyTrust::CannotTell(why) => assert!(why.contains("Permission denied"), "{why}"),
            verdict => panic!("{verdict:?}"),
        }
    }

    #[test]
    fn odd_lines_are_skipped_or_kept_without_an_id() {
        assert!(parse_proc_keys("garbage\n\nzz I 1 perm 0 0 0 keyring x\n").is_empty());
        let keys =
            parse_proc_keys("0000000a I------ 1 perm 1f030000 0 0 asymmetri my key: X509.rsa []\n");
        let key = parse_asymmetric(&keys[0], BUILTIN).unwrap();
        assert_eq!((key.name.as_str(), key.id.as_deref()), ("my key", None));
        assert!(trusted_keys(&keys, |_| Ok(Vec::new())).is_none());
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
        bytes
            .chunks(4)
            .flat_map(|c| {
                let n =
                    c.iter().fold(0u32, |acc, &v| acc << 6 | u32::from(v)) << (6 * (4 - c.len()));
                n.to_be_bytes()[1..c.len()].to_vec()
            })
            .collect()
    }
}
