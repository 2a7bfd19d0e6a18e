//! `oci://` sources against a real registry on 127.0.0.1 (Debian's docker-registry, images
//! pushed with skopeo): by tag and by digest, a tampered blob, a tampered manifest, 401 without
//! credentials and success with them from auth.json, a missing tag, a stalling registry, and a
//! plain container image (shape b) with a whiteout. Whatever is refused leaves the store empty.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::archive::{raw_tar, Raw};
use crate::common::host::{BareHost, STORE};
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, DRIVER};
use crate::common::registry::{make_index, write_layout, Image, Layer, Registry, Stalling};
use crate::common::Compression;
use nvdriver_agent::config::{OciSettings, StageSettings};
use nvdriver_agent::overlay::pack::{self, PackInput};
use nvdriver_agent::overlay::source::oci::OciError;
use nvdriver_agent::overlay::source::{stage, AttemptError, OverlayKey, SourceError};
use nvdriver_agent::overlay::Store;

const KVER: &str = "6.1.0-28-cloud-amd64";

fn key() -> OverlayKey {
    OverlayKey {
        kernel_release: KVER.into(),
        driver_version: DRIVER.into(),
        arch: "x86_64".into(),
    }
}

fn settings(source: &str, insecure: &[String], timeout: Duration) -> StageSettings {
    StageSettings {
        sources: vec![source.to_string()],
        max_download_bytes: 64 << 20,
        download_timeout: timeout,
        allow_http: false,
        keep_extra: 1,
        signatures: Default::default(),
        oci: OciSettings {
            insecure_registries: insecure.to_vec(),
            mirrors: Default::default(),
        },
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    }
}

fn oci_error(err: SourceError) -> OciError {
    let (SourceError::Failed { tried, .. } | SourceError::NotFound { tried, .. }) = err else {
        panic!("expected a source error: {err}")
    };
    match tried.into_iter().next().unwrap().error {
        AttemptError::Oci(e) => e,
        other => panic!("expected an OCI error, got: {other}"),
    }
}

/// Shape (a): the overlay packed by `overlay pack`'s code as the image's only layer.
fn overlay_image(layout: &Path, tag: &str) -> Image {
    let tree = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(tree.path());
    let modules = tree.path().join(format!("usr/lib/modules/{KVER}"));
    let packed = pack::plan(&PackInput {
        modules,
        firmware: Some(
            tree.path()
                .join(format!("usr/lib/firmware/nvidia/{DRIVER}")),
        ),
        userspace: None,
        arch: "x86_64".into(),
    })
    .unwrap();
    let archive = tree.path().join("overlay.tar.zst");
    packed.write_archive(&archive).unwrap();
    write_layout(layout, tag, &[Layer::zstd(fs::read(&archive).unwrap())])
}

#[test]
fn pulls_by_tag_and_digest_and_refuses_tampering() {
    let registry = Registry::start(None);
    let layout = tempfile::tempdir().unwrap();
    let tag = format!("{DRIVER}-{KVER}");
    let image = overlay_image(layout.path(), &tag);
    registry.push(layout.path(), &tag, "nvidia/overlay");
    registry.push(layout.path(), &tag, "nvidia/second");
    let insecure = [registry.host()];
    let timeout = Duration::from_secs(30);

    // By tag, through the template.
    let host = BareHost::new(key());
    let template = format!(
        "oci://{}/nvidia/overlay:{{driver}}-{{kernel}}",
        registry.host()
    );
    let report = host
        .stage(&settings(&template, &insecure, timeout))
        .unwrap();
    assert_eq!(
        report.digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    let stored = host.stored().expect("staged");
    assert!(stored
        .join(format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko.zst"))
        .is_file());

    // By digest.
    let host = BareHost::new(key());
    let by_digest = format!(
        "oci://{}/nvidia/overlay@{}",
        registry.host(),
        image.manifest_digest
    );
    let report = host
        .stage(&settings(&by_digest, &insecure, timeout))
        .unwrap();
    assert_eq!(
        report.digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert!(host.stored().is_some());

    // Plain HTTP only for listed registries: unlisted means https, which this one does not speak.
    let host = BareHost::new(key());
    assert!(host.stage(&settings(&by_digest, &[], timeout)).is_err());
    host.assert_empty();

    // A missing tag is "not there", not "broken".
    let host = BareHost::new(key());
    let missing = format!("oci://{}/nvidia/overlay:no-such-tag", registry.host());
    let err = host
        .stage(&settings(&missing, &insecure, timeout))
        .unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    assert!(matches!(
        oci_error(err),
        OciError::NotFound { status: 404, .. }
    ));
    host.assert_empty();

    // A tampered layer blob: same size, other bytes.
    let blob = registry.blob_file(&image.layer_digests[0]);
    let mut bytes = fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let host = BareHost::new(key());
    let err = host
        .stage(&settings(&template, &insecure, timeout))
        .unwrap_err();
    assert!(err.any_invalid(), "{err}");
    let err = oci_error(err);
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&image.layer_digests[0]), "{err}");
    host.assert_empty();

    // A tampered manifest (valid JSON, other bytes), asked for by digest and by tag.
    let manifest = registry.blob_file(&image.manifest_digest);
    let mut text = fs::read_to_string(&manifest).unwrap();
    text.push(' ');
    fs::write(&manifest, text).unwrap();
    for source in [
        by_digest.replace("nvidia/overlay", "nvidia/second"),
        template.replace("nvidia/overlay", "nvidia/second"),
    ] {
        let host = BareHost::new(key());
        let err = oci_error(
            host.stage(&settings(&source, &insecure, timeout))
                .unwrap_err(),
        );
        assert!(
            matches!(err, OciError::DigestMismatch { .. }),
            "{source}: {err}"
        );
        host.assert_empty();
    }
}

#[test]
fn credentials_come_from_auth_json() {
    let registry = Registry::start(Some("builder:s3cret"));
    let layout = tempfile::tempdir().unwrap();
    overlay_image(layout.path(), "v1");
    registry.push(layout.path(), "v1", "private/overlay");
    let insecure = [registry.host()];
    let source = format!("oci://{}/private/overlay:v1", registry.host());

    let host = BareHost::new(key());
    let err = oci_error(
        host.stage(&settings(&source, &insecure, Duration::from_secs(30)))
            .unwrap_err(),
    );
    assert!(
        matches!(err, OciError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("auth.json"), "{err}");
    host.assert_empty();

    let auth = host.root.join("/etc/nvdriver-agent/auth.json");
    fs::create_dir_all(auth.parent().unwrap()).unwrap();
    let encoded = base64_encode(b"builder:s3cret");
    fs::write(
        &auth,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{encoded}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    host.stage(&settings(&source, &insecure, Duration::from_secs(30)))
        .unwrap();
    assert!(host.stored().is_some());
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_stalling_registry_hits_the_deadline() {
    let stalling = Stalling::start();
    let host_port = format!("127.0.0.1:{}", stalling.port);
    let host = BareHost::new(key());
    let started = Instant::now();
    let err = host
        .stage(&settings(
            &format!("oci://{host_port}/x/y:t"),
            std::slice::from_ref(&host_port),
            Duration::from_secs(2),
        ))
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = oci_error(err);
    assert!(matches!(err, OciError::TimedOut { .. }), "{err}");
    host.assert_empty();
}

fn module_bytes(name: &str) -> Vec<u8> {
    FixtureModule::new(name, KVER, DRIVER).bytes(Compression::None)
}

#[test]
fn a_plain_image_becomes_an_overlay() {
    let registry = Registry::start(None);
    let video = format!("usr/lib/modules/{KVER}/kernel/drivers/video");
    let (nvidia, uvm, drm, modeset) = (
        module_bytes("nvidia"),
        module_bytes("nvidia-uvm"),
        module_bytes("nvidia-drm"),
        module_bytes("nvidia-modeset"),
    );
    let firmware = format!("usr/lib/firmware/nvidia/{DRIVER}/gsp_ga10x.bin");
    let other_kernel = "usr/lib/modules/6.1.0-99-amd64/nvidia.ko".to_string();
    let base = raw_tar(&[
        Raw::Dir("usr/"),
        Raw::Dir("usr/lib/"),
        Raw::Symlink("lib", "usr/lib"),
        Raw::File("etc/os-release", b"ID=debian\n"),
        Raw::File(&format!("{video}/nvidia.ko"), &nvidia),
        Raw::File(&format!("{video}/nvidia-uvm.ko"), &uvm),
        Raw::File(&format!("{video}/nvidia-drm.ko"), &drm),
        Raw::File(&firmware, b"GSP firmware"),
        Raw::File(&other_kernel, b"not for this kernel"),
    ]);
    // The second layer deletes nvidia-drm and adds nvidia-modeset, both through the `lib`
    // symlink, as a Dockerfile `RUN` on a merged-/usr image would record them.
    let top = raw_tar(&[
        Raw::File(
            &format!("lib/modules/{KVER}/kernel/drivers/video/.wh.nvidia-drm.ko"),
            b"",
        ),
        Raw::File(
            &format!("lib/modules/{KVER}/extra/nvidia-modeset.ko"),
            &modeset,
        ),
    ]);
    let layout = tempfile::tempdir().unwrap();
    let image = write_layout(
        layout.path(),
        "plain",
        &[Layer::gzip(base), Layer::tar(top)],
    );
    registry.push(layout.path(), "plain", "nvidia/driver");

    let host = BareHost::new(key());
    let source = format!("oci://{}/nvidia/driver:plain", registry.host());
    let report = host
        .stage(&settings(
            &source,
            &[registry.host()],
            Duration::from_secs(30),
        ))
        .unwrap();
    assert_eq!(
        report.digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    let stored = host.stored().expect("staged");
    let text = fs::read_to_string(stored.join("overlay.toml")).unwrap();
    let manifest =
        nvdriver_agent::overlay::Manifest::parse(&text, Path::new("overlay.toml")).unwrap();
    let mut modules: Vec<String> = manifest
        .module_files()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    modules.sort();
    assert_eq!(modules, ["nvidia-modeset.ko", "nvidia-uvm.ko", "nvidia.ko"]);
    assert_eq!(
        fs::read(stored.join(format!(
            "usr/lib/modules/{KVER}/extra/nvidia/nvidia-modeset.ko"
        )))
        .unwrap(),
        modeset
    );
    assert_eq!(fs::read(stored.join(&firmware)).unwrap(), b"GSP firmware");
    assert!(manifest.files.iter().all(|f| !f.path.starts_with("etc")));

    // `overlay inspect` lists what the image holds, for every kernel, and stages nothing.
    let config = host.root.join("/etc/inspect.toml");
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    fs::write(
        &config,
        format!("[oci]\ninsecure-registries = [\"{}\"]\n", registry.host()),
    )
    .unwrap();
    let out = crate::common::agent::run(
        host.root.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "overlay",
            "inspect",
            "--json",
            &source,
        ],
    );
    assert!(out.status.success(), "{}", crate::common::agent::text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kind"], "oci-image");
    assert_eq!(json["digest"], image.manifest_digest.as_str());
    let mut names: Vec<&str> = crate::common::str_fields(&json["modules"], "name");
    names.sort();
    assert_eq!(names, ["nvidia", "nvidia_modeset", "nvidia_uvm"]);

    // The same image asked for another kernel has nothing for it.
    let host = BareHost::new(key());
    let settings_key = OverlayKey {
        kernel_release: "6.1.0-77-amd64".into(),
        ..key()
    };
    let settings = StageSettings {
        sources: vec![source],
        max_download_bytes: 64 << 20,
        download_timeout: Duration::from_secs(30),
        allow_http: false,
        keep_extra: 1,
        signatures: Default::default(),
        oci: OciSettings {
            insecure_registries: vec![registry.host()],
            mirrors: Default::default(),
        },
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    };
    let err = stage(
        &host.root,
        &Store::new(&host.root, STORE),
        &settings,
        &settings_key,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    host.assert_empty();
}

#[test]
fn an_image_index_is_narrowed_to_this_arch() {
    let registry = Registry::start(None);
    let layout = tempfile::tempdir().unwrap();
    let image = overlay_image(layout.path(), "multi");
    let index_digest = make_index(layout.path(), "multi");
    registry.push(layout.path(), "multi", "nvidia/overlay");
    let host = BareHost::new(key());
    let source = format!("oci://{}/nvidia/overlay:multi", registry.host());
    let report = host
        .stage(&settings(
            &source,
            &[registry.host()],
            Duration::from_secs(30),
        ))
        .unwrap();
    // The index's digest is what the reference names; the amd64 image is what was staged.
    assert_eq!(report.digest.as_deref(), Some(index_digest.as_str()));
    assert!(host.stored().is_some());
    assert_ne!(index_digest, image.manifest_digest);
}
