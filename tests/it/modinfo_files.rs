//! `read_module_file` on fixture modules written to disk, through the crate's public API.

use crate::common::modules::{FixtureModule, FIXTURE_KEY_ID, FIXTURE_SIGNER};
use crate::common::Compression;
use nvdriver_agent::modinfo::{check_vermagic, modinfo_lines, read_module_file};

const KVER: &str = "5.14.0-503.15.1.el9_5.x86_64";

#[test]
fn every_compression_reads_back_the_same_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = FixtureModule::new("nvidia-modeset", KVER, "570.86.15")
        .depends(&["nvidia"])
        .signed();
    for c in [Compression::None, Compression::Xz, Compression::Zstd] {
        let path = dir.path().join(module.file_name(c));
        std::fs::write(&path, module.bytes(c)).unwrap();
        let info = read_module_file(&path).unwrap();
        assert_eq!(info.name, "nvidia_modeset");
        assert_eq!(info.compression, c);
        assert_eq!(info.depends, vec!["nvidia"]);
        check_vermagic(&info, &path, KVER).unwrap();
        let sig = info.signature.as_ref().unwrap();
        assert_eq!(sig.signer.as_deref(), Some(FIXTURE_SIGNER));
        assert_eq!(sig.key_id.as_deref(), Some(FIXTURE_KEY_ID));
        let text = modinfo_lines(&info, &path);
        assert!(text.contains("sig_hashalgo:   sha256\n"), "{text}");
    }
}
