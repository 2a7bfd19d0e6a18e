//! PLACEHOLDER — being written by a helper. Public API agreed:

use std::path::{Path, PathBuf};

/// How a module file is compressed (detected by magic bytes, not by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleSignature {
    pub id_type: String,
    pub signature_len: u32,
    pub signer: Option<String>,
    pub key_id: Option<String>,
    pub hash_algo: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModInfo {
    pub name: String,
    pub vermagic: String,
    pub depends: Vec<String>,
    pub version: Option<String>,
    pub srcversion: Option<String>,
    pub license: Option<String>,
    /// `parmtype=` entries: (parameter name, type).
    pub parameters: Vec<(String, String)>,
    pub signature: Option<ModuleSignature>,
    pub compression: Compression,
}

#[derive(Debug, thiserror::Error)]
pub enum ModinfoError {
    #[error("placeholder")]
    Placeholder,
    #[error("module {module} was built for kernel {found:?} but the target kernel is {expected:?}")]
    VermagicMismatch {
        module: PathBuf,
        found: String,
        expected: String,
    },
}

pub fn detect_compression(_bytes: &[u8]) -> Compression {
    todo!()
}
pub fn decompress(_bytes: &[u8], _c: Compression, _limit: u64) -> Result<Vec<u8>, ModinfoError> {
    todo!()
}
pub fn parse_module(_bytes: &[u8], _origin: &Path) -> Result<ModInfo, ModinfoError> {
    todo!()
}
pub fn read_module_file(_path: &Path) -> Result<ModInfo, ModinfoError> {
    todo!()
}
pub fn vermagic_release(vermagic: &str) -> &str {
    vermagic.split_whitespace().next().unwrap_or("")
}
pub fn check_vermagic(_info: &ModInfo, _path: &Path, _kver: &str) -> Result<(), ModinfoError> {
    todo!()
}
