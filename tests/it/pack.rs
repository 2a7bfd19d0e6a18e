//! `overlay pack` through the binary (reproducible archives, a correct manifest, signing) and
//! minisign signatures checked at stage time: good, wrong key, manifest changed after signing,
//! missing while required. A refused overlay leaves the store empty.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::agent;
use crate::common::host::{BareHost, STORE};
use crate::common::modules::FixtureModule;
use crate::common::overlay::DRIVER;
use crate::common::Compression;
use nvdriver_agent::config::StageSettings;
use nvdriver_agent::overlay::signature::{SignatureError, SignaturePolicy};
use nvdriver_agent::overlay::source::{AttemptError, OverlayKey, SourceError};
use nvdriver_agent::overlay::verify::sha256_bytes;

const KVER: &str = "6.1.0-28-cloud-amd64";

/// A kernel-open style build output: the four modules side by side, plus a non-NVIDIA module
/// and a build by-product that pack must leave out.
fn build_output(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for name in ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"] {
        let module = FixtureModule::new(name, KVER, DRIVER);
        fs::write(
            dir.join(module.file_name(Compression::None)),
            module.bytes(Compression::None),
        )
        .unwrap();
    }
    let other = FixtureModule::new("i915", KVER, "1");
    fs::write(dir.join("i915.ko"), other.bytes(Compression::None)).unwrap();
    fs::write(dir.join("nvidia.mod.c"), "/* generated */").unwrap();
}

struct Inputs {
    _dir: tempfile::TempDir,
    modules: PathBuf,
    firmware: PathBuf,
    userspace: PathBuf,
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let modules = dir.path().join("kernel-open");
    build_output(&modules);
    let firmware = dir.path().join("firmware");
    fs::create_dir_all(&firmware).unwrap();
    fs::write(firmware.join("gsp_ga10x.bin"), b"GSP firmware").unwrap();
    let userspace = dir.path().join("userspace");
    fs::create_dir_all(userspace.join("usr/bin")).unwrap();
    fs::create_dir_all(userspace.join("usr/lib64")).unwrap();
    fs::write(userspace.join("usr/bin/nvidia-smi"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(
        userspace.join("usr/bin/nvidia-smi"),
        std::os::unix::fs::PermissionsExt::from_mode(0o775),
    )
    .unwrap();
    fs::write(userspace.join("usr/lib64/libcuda.so.1.1"), b"ELF").unwrap();
    std::os::unix::fs::symlink("libcuda.so.1.1", userspace.join("usr/lib64/libcuda.so.1")).unwrap();
    Inputs {
        _dir: dir,
        modules,
        firmware,
        userspace,
    }
}

fn pack(inputs: &Inputs, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "overlay".to_string(),
        "pack".into(),
        "--modules".into(),
        inputs.modules.display().to_string(),
        "--firmware".into(),
        inputs.firmware.display().to_string(),
        "--userspace".into(),
        inputs.userspace.display().to_string(),
        "--arch".into(),
        "x86_64".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent::run(Path::new("/nonexistent"), &args)
}

#[test]
fn packing_twice_gives_the_same_bytes_and_a_correct_manifest() {
    let inputs = inputs();
    let out = tempfile::tempdir().unwrap();
    let a = out.path().join("a.tar.zst");
    let b = out.path().join("b.tar.zst");
    let dir = out.path().join("tree");
    let first = pack(
        &inputs,
        &[
            "--out-archive",
            a.to_str().unwrap(),
            "--out-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(first.status.success(), "{}", agent::text(&first));
    // A different umask and newer mtimes must not matter.
    fs::set_permissions(
        inputs.firmware.join("gsp_ga10x.bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(inputs.firmware.join("gsp_ga10x.bin"), b"GSP firmware").unwrap();
    let second = pack(&inputs, &["--out-archive", b.to_str().unwrap()]);
    assert!(second.status.success(), "{}", agent::text(&second));
    let (bytes_a, bytes_b) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_eq!(sha256_bytes(&bytes_a), sha256_bytes(&bytes_b));

    let manifest = fs::read_to_string(dir.join("overlay.toml")).unwrap();
    let manifest =
        nvdriver_agent::overlay::Manifest::parse(&manifest, Path::new("overlay.toml")).unwrap();
    assert_eq!(manifest.kernel_release, KVER);
    assert_eq!(manifest.driver_version, DRIVER);
    let paths: Vec<String> = manifest
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "usr/bin/nvidia-smi".to_string(),
            format!("usr/lib/firmware/nvidia/{DRIVER}/gsp_ga10x.bin"),
            format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia-drm.ko"),
            format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia-modeset.ko"),
            format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia-uvm.ko"),
            format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko"),
            "usr/lib64/libcuda.so.1.1".to_string(),
        ]
    );
    assert_eq!(manifest.files[0].mode, 0o755);
    assert_eq!(manifest.files[1].mode, 0o644);
    assert_eq!(manifest.symlinks.len(), 1);
    // The tree and the archive both stage.
    let verify = agent::run(
        Path::new("/nonexistent"),
        &["overlay", "verify", dir.to_str().unwrap()],
    );
    assert!(verify.status.success(), "{}", agent::text(&verify));
    let host = BareHost::new(key());
    let source = host.copy_in(&a, "/srv/a.tar.zst");
    host.stage(&settings(&source, SignaturePolicy::IfPresent))
        .unwrap();
    assert!(host.stored().is_some());
}

#[test]
fn modules_of_two_kernels_are_refused() {
    let inputs = inputs();
    let stray = FixtureModule::new("nvidia-peermem", "6.1.0-99-amd64", DRIVER);
    fs::write(
        inputs.modules.join("nvidia-peermem.ko"),
        stray.bytes(Compression::None),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tree");
    let result = pack(&inputs, &["--out-dir", dir.to_str().unwrap()]);
    assert!(!result.status.success());
    assert!(
        agent::text(&result).contains("pack modules of one kernel at a time"),
        "{}",
        agent::text(&result)
    );
    assert!(!dir.exists());
}

/// A minisign key pair written by the `minisign` CLI (Debian's package), so the agent is
/// checked against the reference tool, not only against itself.
struct KeyPair {
    _dir: tempfile::TempDir,
    public: PathBuf,
    secret: PathBuf,
}

fn keypair() -> KeyPair {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("k.pub");
    let secret = dir.path().join("k.key");
    let out = std::process::Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret)
        .output()
        .expect("minisign is installed (scripts/setup)");
    assert!(out.status.success(), "{out:?}");
    KeyPair {
        _dir: dir,
        public,
        secret,
    }
}

fn key() -> OverlayKey {
    OverlayKey {
        kernel_release: KVER.into(),
        driver_version: DRIVER.into(),
        arch: "x86_64".into(),
    }
}

fn settings(source: &Path, policy: SignaturePolicy) -> StageSettings {
    StageSettings {
        sources: vec![source.display().to_string()],
        max_download_bytes: 64 << 20,
        download_timeout: Duration::from_secs(20),
        allow_http: false,
        keep_extra: 1,
        signatures: policy,
        oci: Default::default(),
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    }
}

fn signature_error(err: SourceError) -> SignatureError {
    let SourceError::Failed { tried, .. } = err else {
        panic!("expected a failed source: {err}")
    };
    match tried.into_iter().next().unwrap().error {
        AttemptError::Signature(e) => e,
        other => panic!("expected a signature refusal, got: {other}"),
    }
}

fn signed_archive(inputs: &Inputs, key: &KeyPair, out: &Path) {
    let result = pack(
        inputs,
        &[
            "--out-archive",
            out.to_str().unwrap(),
            "--sign",
            key.secret.to_str().unwrap(),
        ],
    );
    assert!(result.status.success(), "{}", agent::text(&result));
}

#[test]
fn signatures_are_checked_before_staging() {
    let inputs = inputs();
    let builder = keypair();
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("o.tar.zst");
    signed_archive(&inputs, &builder, &archive);

    // Good: trusted key, policy require.
    let host = BareHost::new(key());
    host.trust(&builder.public);
    let source = host.copy_in(&archive, "/srv/o.tar.zst");
    host.stage(&settings(&source, SignaturePolicy::Require))
        .unwrap();
    assert!(host.stored().is_some());

    // Wrong key: signed by one the host does not trust.
    let host = BareHost::new(key());
    host.trust(&keypair().public);
    let source = host.copy_in(&archive, "/srv/o.tar.zst");
    let err = signature_error(
        host.stage(&settings(&source, SignaturePolicy::IfPresent))
            .unwrap_err(),
    );
    assert!(matches!(err, SignatureError::UnknownKey { .. }), "{err}");
    assert!(err.to_string().contains("not trusted"), "{err}");
    assert!(host.stored().is_none());

    // Missing while required: the same overlay packed without --sign.
    let unsigned = out.path().join("u.tar.zst");
    let result = pack(&inputs, &["--out-archive", unsigned.to_str().unwrap()]);
    assert!(result.status.success(), "{}", agent::text(&result));
    let host = BareHost::new(key());
    host.trust(&builder.public);
    let source = host.copy_in(&unsigned, "/srv/u.tar.zst");
    let err = signature_error(
        host.stage(&settings(&source, SignaturePolicy::Require))
            .unwrap_err(),
    );
    assert!(matches!(err, SignatureError::Missing { .. }), "{err}");
    assert!(host.stored().is_none());
    // ... and accepted when signatures are only checked if present.
    host.stage(&settings(&source, SignaturePolicy::IfPresent))
        .unwrap();
}

#[test]
fn a_manifest_changed_after_signing_is_refused() {
    let inputs = inputs();
    let builder = keypair();
    let out = tempfile::tempdir().unwrap();
    let tree = out.path().join("tree");
    let result = pack(
        &inputs,
        &[
            "--out-dir",
            tree.to_str().unwrap(),
            "--sign",
            builder.secret.to_str().unwrap(),
        ],
    );
    assert!(result.status.success(), "{}", agent::text(&result));
    // The reference tool accepts what pack signed.
    let check = std::process::Command::new("minisign")
        .args(["-V", "-q", "-p"])
        .arg(&builder.public)
        .arg("-m")
        .arg(tree.join("overlay.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    let host = BareHost::new(key());
    host.trust(&builder.public);
    let staged_tree = host.root.join("/srv/tree");
    fs::create_dir_all(staged_tree.parent().unwrap()).unwrap();
    copy_tree(&tree, &staged_tree);
    // Drop user space from the manifest (and the tree): still a consistent overlay, but not
    // the one that was signed.
    let manifest_path = staged_tree.join("overlay.toml");
    let text = fs::read_to_string(&manifest_path).unwrap();
    let mut manifest =
        nvdriver_agent::overlay::Manifest::parse(&text, Path::new("overlay.toml")).unwrap();
    manifest.files.retain(|f| !f.path.starts_with("usr/bin"));
    fs::write(&manifest_path, manifest.to_toml()).unwrap();
    fs::remove_dir_all(staged_tree.join("usr/bin")).unwrap();
    let err = signature_error(
        host.stage(&settings(
            Path::new("/srv/tree"),
            SignaturePolicy::IfPresent,
        ))
        .unwrap_err(),
    );
    assert!(matches!(err, SignatureError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("changed after signing"), "{err}");
    assert!(host.stored().is_none());
}

fn copy_tree(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn unsigned_modules_are_refused_for_a_kernel_that_enforces_signatures() {
    use crate::common::overlay::{OverlayBuilder, Packing};
    let host = BareHost::new(key());
    let config = host.root.join(format!("/usr/lib/modules/{KVER}/config"));
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    fs::write(&config, "CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n").unwrap();

    OverlayBuilder::nvidia(KVER).build(&host.root.join("/srv/unsigned"));
    let err = host
        .stage(&settings(
            Path::new("/srv/unsigned"),
            SignaturePolicy::IfPresent,
        ))
        .unwrap_err();
    let SourceError::Failed { tried, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(tried[0].error, AttemptError::UnsignedModules { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("CONFIG_MODULE_SIG_FORCE=y"),
        "{err}"
    );
    assert!(host.stored().is_none());

    let mut signed = OverlayBuilder::nvidia(KVER);
    for (module, _) in OverlayBuilder::nvidia(KVER).modules {
        signed = signed.module(module.signed(), Packing::Plain);
    }
    signed.build(&host.root.join("/srv/signed"));
    host.stage(&settings(
        Path::new("/srv/signed"),
        SignaturePolicy::IfPresent,
    ))
    .unwrap();
    assert!(host.stored().is_some());
}

#[test]
fn inspect_shows_modules_signature_and_digest_without_staging() {
    let inputs = inputs();
    let builder = keypair();
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("o.tar.zst");
    signed_archive(&inputs, &builder, &archive);
    let host = BareHost::new(key());
    host.trust(&builder.public);
    let result = agent::run(
        host.root.path(),
        &["overlay", "inspect", "--json", archive.to_str().unwrap()],
    );
    assert!(result.status.success(), "{}", agent::text(&result));
    let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let digest = format!("sha256:{}", sha256_bytes(&fs::read(&archive).unwrap()));
    assert_eq!(json["digest"], digest.as_str());
    assert_eq!(json["contents"], "verified");
    assert_eq!(json["manifest"]["kernel-release"], KVER);
    assert!(
        json["signature"]
            .as_str()
            .unwrap()
            .starts_with("signed by trusted key "),
        "{json}"
    );
    let modules = json["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 4);
    assert!(modules
        .iter()
        .all(|m| m["kernel-release"] == KVER && m["signed"] == false));
    assert!(host.stored().is_none());
    assert!(!host.root.join(STORE).exists());

    // Text output, and an untrusted signer reported as refused.
    let stranger = BareHost::new(key());
    let result = agent::run(
        stranger.root.path(),
        &["overlay", "inspect", archive.to_str().unwrap()],
    );
    assert!(result.status.success(), "{}", agent::text(&result));
    let text = String::from_utf8_lossy(&result.stdout);
    assert!(
        text.contains("REFUSED") && text.contains("not trusted"),
        "{text}"
    );
    assert!(text.contains("nvidia.ko  nvidia"), "{text}");
}

/// `overlay inspect` lists the driver services the packed user space can run: the binaries
/// `--userspace` brought in usr/bin, nothing else.
#[test]
fn inspect_lists_the_driver_services_the_user_space_carries() {
    let inputs = inputs();
    let out = tempfile::tempdir().unwrap();
    let inspect = |archive: &Path| {
        let host = BareHost::new(key());
        let result = agent::run(
            host.root.path(),
            &["overlay", "inspect", "--json", archive.to_str().unwrap()],
        );
        assert!(result.status.success(), "{}", agent::text(&result));
        let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
        json["manifest"]["services"].clone()
    };
    let plain = out.path().join("plain.tar.zst");
    assert!(pack(&inputs, &["--out-archive", plain.to_str().unwrap()])
        .status
        .success());
    assert_eq!(inspect(&plain), serde_json::json!([]));

    for binary in ["nvidia-persistenced", "nv-fabricmanager"] {
        let path = inputs.userspace.join("usr/bin").join(binary);
        fs::write(&path, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let with = out.path().join("services.tar.zst");
    assert!(pack(&inputs, &["--out-archive", with.to_str().unwrap()])
        .status
        .success());
    assert_eq!(
        inspect(&with),
        serde_json::json!(["persistenced", "fabric-manager"])
    );
    let host = BareHost::new(key());
    let text = agent::run(
        host.root.path(),
        &["overlay", "inspect", with.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("services:  nvidia-persistenced, nv-fabricmanager"),
        "{text}"
    );
}
