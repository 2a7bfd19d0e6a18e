//! Staging overlays from directories, local archives and HTTP into the store: source order and
//! fallback, hostile archives, every way a download goes wrong, GC, and two stagers at once.
//! After every scenario the store holds only complete, verified overlays and no leftovers.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::archive::{compress, overlay_archive, Compression, ManifestAt};
use crate::common::host::{BareHost, STORE};
use crate::common::http::{HttpServer, Route};
use crate::common::modules::FixtureModule;
use crate::common::overlay::{OverlayBuilder, Packing, DRIVER};
use nvdriver_agent::config::StageSettings;
use nvdriver_agent::fsutil::TEMP_PREFIX;
use nvdriver_agent::overlay::source::archive::ArchiveError;
use nvdriver_agent::overlay::source::http::FetchError;
use nvdriver_agent::overlay::source::{AttemptError, OverlayKey, SourceError};
use nvdriver_agent::overlay::store::ImportOutcome;

const KVER: &str = "6.1.0-28-cloud-amd64";

fn key() -> OverlayKey {
    OverlayKey {
        kernel_release: KVER.into(),
        driver_version: DRIVER.into(),
        arch: std::env::consts::ARCH.into(),
    }
}

fn settings(sources: &[&str]) -> StageSettings {
    StageSettings {
        sources: sources.iter().map(|s| s.to_string()).collect(),
        max_download_bytes: 64 << 20,
        download_timeout: Duration::from_secs(20),
        allow_http: true,
        keep_extra: 1,
        signatures: Default::default(),
        oci: Default::default(),
        keep_free: nvdriver_agent::overlay::space::Reserve::NONE,
        fetcher: None,
    }
}

fn good_archive(compression: Compression, at: ManifestAt) -> Vec<u8> {
    overlay_archive(&OverlayBuilder::nvidia(KVER), compression, at).0
}

/// An overlay whose nvidia.ko is big enough that downloads take several reads.
fn big_archive() -> Vec<u8> {
    let builder = OverlayBuilder::nvidia(KVER).module(
        FixtureModule::new("nvidia", KVER, DRIVER).padded(600 << 10, 200 << 10, 7),
        Packing::Plain,
    );
    overlay_archive(&builder, Compression::Zstd, ManifestAt::First).0
}

fn staged_dir() -> PathBuf {
    PathBuf::from(format!("{STORE}/{KVER}/{DRIVER}"))
}

fn only_attempt(err: &SourceError) -> &AttemptError {
    match err {
        SourceError::NotFound { tried, .. } | SourceError::Failed { tried, .. } => {
            assert_eq!(tried.len(), 1, "{err}");
            &tried[0].error
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn directory_source_with_template() {
    let host = BareHost::new(key());
    let src = host.root.join(format!("/srv/overlays/{KVER}/{DRIVER}"));
    fs::create_dir_all(&src).unwrap();
    OverlayBuilder::nvidia(KVER).with_userspace().build(&src);
    let report = host
        .stage(&settings(&["/srv/overlays/{kernel}/{driver}"]))
        .unwrap();
    assert_eq!(report.source, format!("/srv/overlays/{KVER}/{DRIVER}"));
    assert_eq!(
        report.outcome,
        ImportOutcome::Imported { dir: staged_dir() }
    );
    assert!(report.tried.is_empty());
    assert_eq!(
        host.assert_store_clean(false),
        [(KVER.into(), DRIVER.into())]
    );
}

#[test]
fn local_archives_in_every_compression_either_manifest_order() {
    let cases = [
        (Compression::None, ManifestAt::First, "o.tar"),
        (Compression::Gzip, ManifestAt::Last, "o.tar.gz"),
        (Compression::Xz, ManifestAt::First, "o.tar.xz"),
        (Compression::Zstd, ManifestAt::Last, "o.tar.zst"),
        // Told apart by content, not by name.
        (Compression::Zstd, ManifestAt::First, "o.tgz"),
        (Compression::Gzip, ManifestAt::First, "o.tar"),
    ];
    for (compression, at, name) in cases {
        let host = BareHost::new(key());
        host.put(&format!("/srv/{name}"), &good_archive(compression, at));
        let report = host
            .stage(&settings(&[&format!("/srv/{name}")]))
            .unwrap_or_else(|e| panic!("{compression:?} {at:?} {name}: {e}"));
        assert_eq!(
            report.outcome,
            ImportOutcome::Imported { dir: staged_dir() }
        );
        assert_eq!(host.assert_store_clean(false).len(), 1);
        // The copy is byte-identical to what was packed.
        let overlay = host.store().open(KVER, DRIVER).unwrap();
        assert_eq!(overlay.manifest.files.len(), 5);
    }
}

/// A module bigger than the extractor's background-writeback chunk (16 MiB) goes through the
/// path that flushes it to disk while it is still being written: staged byte for byte, or, with
/// one byte altered, refused with nothing left in the store.
#[test]
fn a_module_larger_than_the_writeback_chunk_is_staged_whole_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER)
        .module(
            FixtureModule::new("nvidia", KVER, DRIVER).padded(30 << 20, 10 << 20, 11),
            Packing::Plain,
        )
        .build(dir.path());
    let module = format!("usr/lib/modules/{KVER}/extra/nvidia/nvidia.ko");
    let original = fs::read(dir.path().join(&module)).unwrap();
    assert!(original.len() > 32 << 20, "{} bytes", original.len());

    let host = BareHost::new(key());
    host.put(
        "/srv/big.tar",
        &crate::common::archive::pack_dir(dir.path(), ManifestAt::First),
    );
    host.stage(&settings(&["/srv/big.tar"])).unwrap();
    host.assert_store_clean(false);
    let staged = fs::read(host.root.join(staged_dir()).join(&module)).unwrap();
    assert!(staged == original, "the staged nvidia.ko differs");

    let mut altered = original;
    let middle = altered.len() / 2;
    altered[middle] ^= 1;
    fs::write(dir.path().join(&module), &altered).unwrap();
    let host = BareHost::new(key());
    host.put(
        "/srv/big.tar",
        &crate::common::archive::pack_dir(dir.path(), ManifestAt::First),
    );
    let err = host.stage(&settings(&["/srv/big.tar"])).unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");
    assert!(host.assert_store_clean(false).is_empty());
}

#[test]
fn archive_with_userspace_gets_its_links_and_modes() {
    let host = BareHost::new(key());
    let (archive, manifest) = overlay_archive(
        &OverlayBuilder::nvidia(KVER).with_userspace(),
        Compression::Gzip,
        ManifestAt::Last,
    );
    host.put("/srv/o.tgz", &archive);
    host.stage(&settings(&["/srv/o.tgz"])).unwrap();
    host.assert_store_clean(false);
    let dir = host.root.join(staged_dir());
    use std::os::unix::fs::PermissionsExt;
    let smi = fs::metadata(dir.join("usr/bin/nvidia-smi")).unwrap();
    assert_eq!(smi.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_link(dir.join("usr/lib64/libnvidia-ml.so.1")).unwrap(),
        manifest.symlinks[0].target
    );
}

#[test]
fn sources_are_tried_in_order_and_each_failure_is_recorded() {
    let host = BareHost::new(key());
    // A different kernel's overlay where this kernel's was expected.
    let other = overlay_archive(
        &OverlayBuilder::nvidia("6.1.0-99-cloud-amd64"),
        Compression::Zstd,
        ManifestAt::First,
    )
    .0;
    host.put("/srv/wrong-kernel.tar.zst", &other);
    // A module built for another kernel inside an overlay that claims this one.
    let bad_module = overlay_archive(
        &OverlayBuilder::nvidia(KVER).module(
            FixtureModule::new("nvidia", "6.1.0-99-cloud-amd64", DRIVER),
            Packing::Plain,
        ),
        Compression::Zstd,
        ManifestAt::First,
    )
    .0;
    host.put("/srv/bad-vermagic.tar.zst", &bad_module);
    host.put(
        "/srv/not-an-archive.tar",
        b"hello, this is not a tar archive at all",
    );
    host.put(
        "/srv/good.tar.xz",
        &good_archive(Compression::Xz, ManifestAt::Last),
    );
    let sources = [
        "/srv/missing/{kernel}",
        "/srv/wrong-kernel.tar.zst",
        "/srv/bad-vermagic.tar.zst",
        "/srv/not-an-archive.tar",
        "ftp://example.com/{kernel}.tar",
        "/srv/{kver}.tar",
        "/srv/good.tar.xz",
        "/srv/never-tried.tar",
    ];
    let report = host.stage(&settings(&sources)).unwrap();
    assert_eq!(report.source, "/srv/good.tar.xz");
    let tried: Vec<_> = report.tried.iter().map(|a| a.source.as_str()).collect();
    assert_eq!(
        tried,
        [
            &format!("/srv/missing/{KVER}")[..],
            "/srv/wrong-kernel.tar.zst",
            "/srv/bad-vermagic.tar.zst",
            "/srv/not-an-archive.tar",
            &format!("ftp://example.com/{KVER}.tar"),
            "/srv/{kver}.tar",
        ]
    );
    let errors: Vec<_> = report.tried.iter().map(|a| &a.error).collect();
    assert!(errors[0].is_not_found(), "{}", errors[0]);
    assert!(
        matches!(
            errors[1],
            AttemptError::Archive(ArchiveError::WrongOverlay {
                field: "kernel-release",
                ..
            })
        ),
        "{}",
        errors[1]
    );
    assert!(
        matches!(errors[2], AttemptError::Module(_)),
        "{}",
        errors[2]
    );
    assert!(
        matches!(
            errors[3],
            AttemptError::Archive(ArchiveError::NotAnArchive { .. })
        ),
        "{}",
        errors[3]
    );
    assert!(
        matches!(errors[4], AttemptError::Unsupported),
        "{}",
        errors[4]
    );
    assert!(errors[5].to_string().contains("{kver}"), "{}", errors[5]);
    for e in &errors[1..3] {
        assert!(e.is_invalid(), "{e}");
    }
    host.assert_store_clean(false);
}

#[test]
fn nothing_anywhere_is_not_found_and_lists_every_source() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    let url = server.url("/nvidia-{driver}-{kernel}.tar.zst");
    let err = host
        .stage(&settings(&["/srv/{kernel}/{driver}", &url]))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SourceError::NotFound { .. }), "{text}");
    assert!(!err.any_invalid());
    assert!(text.contains(&format!("/srv/{KVER}/{DRIVER}")), "{text}");
    assert!(text.contains("HTTP 404"), "{text}");
    assert!(
        text.contains(&format!("nvidia-{DRIVER}-{KVER}.tar.zst")),
        "{text}"
    );
    assert!(host.store().kernel_releases().unwrap().is_empty());
    host.assert_store_clean(false);
}

#[test]
fn already_staged_returns_without_fetching() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    server.route(
        "/o.tar.zst",
        Route::file(good_archive(Compression::Zstd, ManifestAt::First)),
    );
    let sources = settings(&[&server.url("/o.tar.zst")]);
    assert!(matches!(
        host.stage(&sources).unwrap().outcome,
        ImportOutcome::Imported { .. }
    ));
    let again = host.stage(&sources).unwrap();
    assert_eq!(
        again.outcome,
        ImportOutcome::AlreadyPresent { dir: staged_dir() }
    );
    assert_eq!(server.requests("/o.tar.zst").len(), 1, "fetched once");

    // A damaged copy is not "present": it is fetched and replaced.
    let module = host.root.join(staged_dir()).join(format!(
        "usr/lib/modules/{KVER}/extra/nvidia/nvidia-modeset.ko"
    ));
    fs::write(&module, b"damaged").unwrap();
    let repaired = host.stage(&sources).unwrap();
    assert_eq!(
        repaired.outcome,
        ImportOutcome::Replaced { dir: staged_dir() }
    );
    assert_eq!(server.requests("/o.tar.zst").len(), 2);
    host.assert_store_clean(false);
}

// Hostile archives (traversal, links, device nodes, modes, bombs, entry counts) are the
// corpus in tests/it/hostile.rs.

#[test]
fn archive_without_manifest_or_with_a_missing_file_is_refused() {
    let host = BareHost::new(key());
    let dir = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(dir.path());
    fs::remove_file(dir.path().join("overlay.toml")).unwrap();
    host.put(
        "/srv/no-manifest.tar",
        &crate::common::archive::pack_dir(dir.path(), ManifestAt::First),
    );
    let dir = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(dir.path());
    fs::remove_file(
        dir.path()
            .join(format!("usr/lib/firmware/nvidia/{DRIVER}/gsp_ga10x.bin")),
    )
    .unwrap();
    host.put(
        "/srv/missing-file.tar",
        &crate::common::archive::pack_dir(dir.path(), ManifestAt::First),
    );
    let err = host
        .stage(&settings(&[
            "/srv/no-manifest.tar",
            "/srv/missing-file.tar",
        ]))
        .unwrap_err();
    let SourceError::Failed { tried, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            tried[0].error,
            AttemptError::Archive(ArchiveError::NoManifest { .. })
        ),
        "{err}"
    );
    assert!(tried[1].error.to_string().contains("missing"), "{err}");
    host.assert_store_clean(false);
}

#[test]
fn http_good_and_not_found_and_plain_http_refused() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    server.route(
        "/good.tar.gz",
        Route::file(good_archive(Compression::Gzip, ManifestAt::Last)),
    );
    let mut no_http = settings(&[&server.url("/good.tar.gz")]);
    no_http.allow_http = false;
    let err = host.stage(&no_http).unwrap_err();
    assert!(
        matches!(
            only_attempt(&err),
            AttemptError::Fetch(FetchError::HttpRefused { .. })
        ),
        "{err}"
    );
    assert!(
        server.requests("/good.tar.gz").is_empty(),
        "refused before connecting"
    );

    let report = host
        .stage(&settings(&[
            &server.url("/none.tar.gz"),
            &server.url("/good.tar.gz"),
        ]))
        .unwrap();
    assert_eq!(
        report.outcome,
        ImportOutcome::Imported { dir: staged_dir() }
    );
    assert!(report.tried[0].error.is_not_found());
    host.assert_store_clean(false);
}

#[test]
fn http_corrupt_and_truncated_are_refused() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    // Digest mismatch: a file altered after the manifest was written.
    let dir = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(dir.path());
    let fw = dir
        .path()
        .join(format!("usr/lib/firmware/nvidia/{DRIVER}/gsp_ga10x.bin"));
    fs::write(&fw, b"GSP firmware fixturX").unwrap();
    let corrupt = compress(
        &crate::common::archive::pack_dir(dir.path(), ManifestAt::First),
        Compression::Zstd,
    );
    server.route("/corrupt.tar.zst", Route::file(corrupt));
    // Served completely, but the archive itself is cut short.
    let whole = big_archive();
    server.route(
        "/truncated.tar.zst",
        Route::file(whole[..whole.len() / 2].to_vec()),
    );
    let err = host
        .stage(&settings(&[
            &server.url("/corrupt.tar.zst"),
            &server.url("/truncated.tar.zst"),
        ]))
        .unwrap_err();
    let SourceError::Failed { tried, .. } = &err else {
        panic!("{err}")
    };
    assert!(tried[0].error.to_string().contains("sha256"), "{err}");
    assert!(
        matches!(
            tried[1].error,
            AttemptError::Archive(ArchiveError::Read { .. } | ArchiveError::Truncated { .. })
        ),
        "{err}"
    );
    assert!(err.any_invalid());
    host.assert_store_clean(false);
}

#[test]
fn http_oversize_with_and_without_content_length() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    let big = big_archive();
    assert!(big.len() > 600 << 10);
    server.route("/announced.tar.zst", Route::file(big.clone()));
    server.route(
        "/unannounced.tar.zst",
        Route {
            content_length: false,
            ..Route::file(big.clone())
        },
    );
    let mut limited = settings(&[
        &server.url("/announced.tar.zst"),
        &server.url("/unannounced.tar.zst"),
    ]);
    limited.max_download_bytes = 256 << 10;
    let err = host.stage(&limited).unwrap_err();
    let SourceError::Failed { tried, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            tried[0].error,
            AttemptError::Fetch(FetchError::TooLarge { announced: Some(n), .. }) if n == big.len() as u64
        ),
        "{err}"
    );
    assert!(
        matches!(
            tried[1].error,
            AttemptError::Fetch(FetchError::TooLarge {
                announced: None,
                ..
            })
        ),
        "{err}"
    );
    host.assert_store_clean(false);

    // Without Content-Length the whole body is read (close-delimited) when it fits.
    let report = host
        .stage(&settings(&[&server.url("/unannounced.tar.zst")]))
        .unwrap();
    assert!(matches!(report.outcome, ImportOutcome::Imported { .. }));
    host.assert_store_clean(false);
}

#[test]
fn http_too_slow_times_out_and_the_next_source_is_tried() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    let archive = big_archive();
    server.route(
        "/slow.tar.zst",
        Route {
            pace: Some((4096, Duration::from_millis(20))),
            ..Route::file(archive.clone())
        },
    );
    server.route("/fast.tar.zst", Route::file(archive));
    let mut quick = settings(&[&server.url("/slow.tar.zst"), &server.url("/fast.tar.zst")]);
    quick.download_timeout = Duration::from_millis(700);
    let started = std::time::Instant::now();
    let report = host.stage(&quick).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.source, server.url("/fast.tar.zst"));
    assert!(
        matches!(
            report.tried[0].error,
            AttemptError::Fetch(FetchError::TimedOut { received, .. }) if received > 0
        ),
        "{}",
        report.tried[0]
    );
    // The slow part is kept for the next stage to resume.
    host.assert_store_clean(true);
}

#[test]
fn http_dropped_connection_resumes_with_range() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    let archive = big_archive();
    let len = archive.len();
    server.route(
        "/flaky.tar.zst",
        Route {
            drop_after: len / 3,
            drops: 2,
            ..Route::file(archive)
        },
    );
    let report = host
        .stage(&settings(&[&server.url("/flaky.tar.zst")]))
        .unwrap();
    assert!(matches!(report.outcome, ImportOutcome::Imported { .. }));
    let requests = server.requests("/flaky.tar.zst");
    let statuses: Vec<_> = requests
        .iter()
        .map(|r| (r.status, r.range.clone()))
        .collect();
    assert_eq!(
        statuses,
        [
            (200, None),
            (206, Some(format!("bytes={}-", len / 3))),
            (206, Some(format!("bytes={}-", 2 * (len / 3)))),
        ]
    );
    // Resumed with the validator, so a changed file would have been sent whole.
    assert!(requests[1].if_range.is_some());
    host.assert_store_clean(false);
}

#[test]
fn http_server_ignoring_range_restarts_cleanly() {
    let host = BareHost::new(key());
    let server = HttpServer::start();
    let archive = big_archive();
    let len = archive.len();
    server.route(
        "/norange.tar.zst",
        Route {
            drop_after: len / 2,
            drops: 1,
            ranges: false,
            ..Route::file(archive)
        },
    );
    host.stage(&settings(&[&server.url("/norange.tar.zst")]))
        .unwrap();
    let requests = server.requests("/norange.tar.zst");
    assert_eq!(requests.len(), 2);
    assert!(requests[1].range.is_some(), "asked to resume");
    assert_eq!(requests[1].status, 200, "got the whole file instead");
    host.assert_store_clean(false);
}

#[test]
fn http_part_is_resumed_by_the_next_stage_or_restarted_when_the_file_changed() {
    let server = HttpServer::start();
    let archive = big_archive();
    let len = archive.len();
    // Always drops: the stage gives up after its attempts, keeping the part.
    server.route(
        "/o.tar.zst",
        Route {
            drop_after: len / 4,
            drops: usize::MAX,
            ranges: false,
            ..Route::file(archive.clone())
        },
    );
    let sources = settings(&[&server.url("/o.tar.zst")]);

    let host = BareHost::new(key());
    let err = host.stage(&sources).unwrap_err();
    assert!(
        matches!(
            only_attempt(&err),
            AttemptError::Fetch(FetchError::Interrupted { .. })
        ),
        "{err}"
    );
    host.assert_store_clean(true);

    // Same file, now served well: the next stage resumes where the part ends.
    server.route("/o.tar.zst", Route::file(archive.clone()));
    host.stage(&sources).unwrap();
    let last = server.requests("/o.tar.zst").pop().unwrap();
    assert_eq!(last.status, 206);
    assert_eq!(last.range, Some(format!("bytes={}-", len / 4)));
    host.assert_store_clean(false);

    // A second host whose part is of an older file: If-Range makes the server send it whole.
    let host = BareHost::new(key());
    server.route(
        "/o.tar.zst",
        Route {
            drop_after: len / 10,
            drops: usize::MAX,
            ..Route::file(archive.clone())
        },
    );
    host.stage(&sources).unwrap_err();
    let changed = good_archive(Compression::Xz, ManifestAt::First);
    server.route("/o.tar.zst", Route::file(changed));
    host.stage(&sources).unwrap();
    let last = server.requests("/o.tar.zst").pop().unwrap();
    assert!(last.range.is_some() && last.if_range.is_some());
    assert_eq!(last.status, 200);
    host.assert_store_clean(false);
}

#[test]
fn gc_keeps_the_listed_kernels_and_the_newest_others() {
    let host = BareHost::new(key());
    let store = host.store();
    let kernels = [
        "6.1.0-9-cloud-amd64",
        "6.1.0-10-cloud-amd64",
        "6.1.0-28-cloud-amd64",
        "6.1.0-30-cloud-amd64",
        "6.1.0-31-cloud-amd64",
    ];
    for kernel in kernels {
        let src = tempfile::tempdir().unwrap();
        OverlayBuilder::nvidia(kernel).build(src.path());
        store.import(src.path()).unwrap();
    }
    // Leftovers of a crashed stage and of a crashed GC, and a part for a doomed kernel.
    fs::create_dir_all(host.root.join(format!(
        "{STORE}/6.1.0-10-cloud-amd64/{TEMP_PREFIX}x.1.2/usr"
    )))
    .unwrap();
    fs::create_dir_all(
        host.root
            .join(format!("{STORE}/{TEMP_PREFIX}6.1.0-8-cloud-amd64.1.2/a")),
    )
    .unwrap();
    host.put(
        &format!("{STORE}/.downloads/6.1.0-9-cloud-amd64_{DRIVER}_0123.part"),
        b"x",
    );
    host.put(
        &format!("{STORE}/.downloads/6.1.0-30-cloud-amd64_{DRIVER}_0123.part"),
        b"x",
    );

    let removed = store
        .gc(
            &["6.1.0-10-cloud-amd64".into(), "6.1.0-28-cloud-amd64".into()],
            1,
        )
        .unwrap();
    let kept = store.kernel_releases().unwrap();
    assert_eq!(
        kept,
        [
            "6.1.0-10-cloud-amd64",
            "6.1.0-28-cloud-amd64",
            "6.1.0-31-cloud-amd64"
        ]
    );
    assert!(removed.contains(&PathBuf::from(format!("{STORE}/6.1.0-9-cloud-amd64"))));
    assert!(removed.contains(&PathBuf::from(format!("{STORE}/6.1.0-30-cloud-amd64"))));
    assert!(!host
        .root
        .join(format!(
            "{STORE}/.downloads/6.1.0-30-cloud-amd64_{DRIVER}_0123.part"
        ))
        .exists());
    host.assert_store_clean(false);

    // keep-extra 0 and nothing listed: everything goes.
    store.gc(&[], 0).unwrap();
    assert!(store.kernel_releases().unwrap().is_empty());
    host.assert_store_clean(false);
}

#[test]
fn two_stagers_at_once_take_turns() {
    let host = BareHost::new(key());
    host.put("/srv/o.tar.zst", &big_archive());
    let sources = settings(&["/srv/o.tar.zst"]);
    let outcomes: Vec<ImportOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| host.stage(&sources).unwrap().outcome))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let imported = outcomes
        .iter()
        .filter(|o| matches!(o, ImportOutcome::Imported { .. }))
        .count();
    assert_eq!(imported, 1, "{outcomes:?}");
    assert_eq!(host.assert_store_clean(false).len(), 1);
}

/// The CLI: `overlay fetch` and `overlay gc` as a user runs them, with their exit codes.
mod cli {
    use super::*;
    use std::process::Output;

    fn agent(host: &BareHost, args: &[&str]) -> Output {
        crate::common::agent::run(host.root.path(), args)
    }

    fn configure(host: &BareHost, extra: &str) {
        host.put(
            "/etc/nvdriver-agent/config.toml",
            format!("[stage]\nsources = [\"/srv/missing/{{kernel}}\", \"/srv/{{kernel}}-{{driver}}.tar.zst\"]\n{extra}")
                .as_bytes(),
        );
    }

    #[test]
    fn fetch_reports_the_source_and_what_was_tried() {
        let host = BareHost::new(key());
        configure(&host, "[driver]\nversion = \"570.124.06\"\n");
        host.put(
            &format!("/srv/{KVER}-{DRIVER}.tar.zst"),
            &good_archive(Compression::Zstd, ManifestAt::First),
        );
        let out = agent(&host, &["overlay", "fetch", "--kernel", KVER]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("tried /srv/missing/{KVER}: not there")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!(
                "staged: {STORE}/{KVER}/{DRIVER} from /srv/{KVER}-{DRIVER}.tar.zst"
            )),
            "{stdout}"
        );
        let again = agent(&host, &["overlay", "fetch", "--kernel", KVER]);
        assert!(String::from_utf8_lossy(&again.stdout).contains("already in the store"));

        let gc = agent(&host, &["overlay", "gc", "--keep", KVER]);
        assert_eq!(gc.status.code(), Some(0));
        assert_eq!(host.assert_store_clean(false).len(), 1, "kept");
    }

    #[test]
    fn gc_never_removes_the_running_kernels_overlay() {
        let host = BareHost::new(key());
        configure(&host, "keep-extra = 0\n");
        host.put("/proc/sys/kernel/osrelease", format!("{KVER}\n").as_bytes());
        let src = tempfile::tempdir().unwrap();
        OverlayBuilder::nvidia(KVER).build(src.path());
        host.store().import(src.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        OverlayBuilder::nvidia("6.1.0-99-cloud-amd64").build(other.path());
        host.store().import(other.path()).unwrap();
        let out = agent(&host, &["overlay", "gc"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("removed {STORE}/6.1.0-99-cloud-amd64")
        );
        assert_eq!(
            host.assert_store_clean(false),
            [(KVER.into(), DRIVER.into())]
        );
    }

    /// A Debian-like host (the generic detector) running KVER with `/usr/lib/modules/<k>/vmlinuz`
    /// for each of `images`, and an overlay in the store for each of `stored`.
    fn generic_host(images: &[&str], stored: &[&str]) -> BareHost {
        let host = BareHost::new(key());
        configure(&host, "keep-extra = 0\n");
        host.put("/etc/os-release", b"ID=debian\nVERSION_ID=12\n");
        host.put("/proc/sys/kernel/osrelease", format!("{KVER}\n").as_bytes());
        for kernel in images {
            host.put(
                &format!("/usr/lib/modules/{kernel}/vmlinuz"),
                b"kernel image",
            );
        }
        for kernel in stored {
            let src = tempfile::tempdir().unwrap();
            OverlayBuilder::nvidia(kernel).build(src.path());
            host.store().import(src.path()).unwrap();
        }
        host
    }

    /// Two kernel updates before one reboot, `keep-extra = 0`: a manual GC keeps the overlay
    /// of the kernel the host boots next (the newest installed one here), as the daemon's does.
    #[test]
    fn gc_keeps_the_next_boots_overlay() {
        let (skipped, next) = ("6.1.0-98-cloud-amd64", "6.1.0-99-cloud-amd64");
        let host = generic_host(&[KVER, skipped, next], &[KVER, skipped, next]);
        gc_removes_only(&host, skipped, &[KVER, next]);
    }

    /// When the next boot cannot be read, GC keeps every kernel newer than the running one and
    /// says why; older ones still go.
    #[test]
    fn gc_without_a_readable_next_boot_keeps_newer_kernels() {
        let (older, newer) = ("6.1.0-1-cloud-amd64", "6.1.0-99-cloud-amd64");
        // No kernel image at all: the generic detector finds nothing bootable.
        let host = generic_host(&[], &[older, KVER, newer]);
        let stderr = gc_removes_only(&host, older, &[KVER, newer]);
        assert!(
            stderr.contains("cannot tell which kernel boots next"),
            "{stderr}"
        );
        assert!(stderr.contains(newer), "{stderr}");
    }

    /// `overlay gc` succeeds, removes exactly `removed`'s overlays and leaves `kept`'s;
    /// returns what it said on stderr.
    fn gc_removes_only(host: &BareHost, removed: &str, kept: &[&str]) -> String {
        let out = agent(host, &["overlay", "gc"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("removed {STORE}/{removed}")
        );
        let stored: Vec<String> = host
            .assert_store_clean(false)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(stored, kept);
        stderr
    }

    #[test]
    fn exit_codes() {
        let host = BareHost::new(key());
        configure(&host, "");
        let out = agent(&host, &["overlay", "fetch", "--kernel", KVER]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "no driver version is a config error"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("--driver"));

        let out = agent(
            &host,
            &["overlay", "fetch", "--kernel", KVER, "--driver", DRIVER],
        );
        assert_eq!(out.status.code(), Some(3), "no source has it");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("/srv/{KVER}-{DRIVER}.tar.zst does not exist")),
            "{stderr}"
        );

        host.put(
            &format!("/srv/{KVER}-{DRIVER}.tar.zst"),
            b"not an archive, not at all",
        );
        let out = agent(
            &host,
            &["overlay", "fetch", "--kernel", KVER, "--driver", DRIVER],
        );
        assert_eq!(out.status.code(), Some(4), "invalid overlay");
        host.assert_store_clean(false);
    }

    #[test]
    fn help_names_the_commands() {
        let host = BareHost::new(key());
        let out = agent(&host, &["overlay", "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("fetch") && text.contains("gc"), "{text}");
        let out = agent(&host, &["overlay", "fetch", "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("--kernel") && text.contains("--driver"),
            "{text}"
        );
    }
}

#[test]
fn archive_over_the_size_cap_is_refused_before_it_is_opened() {
    let host = BareHost::new(key());
    host.put(
        "/srv/o.tar.zst",
        &good_archive(Compression::Zstd, ManifestAt::First),
    );
    let mut small = settings(&["/srv/o.tar.zst"]);
    small.max_download_bytes = 1024;
    let err = host.stage(&small).unwrap_err();
    assert!(
        matches!(only_attempt(&err), AttemptError::TooLarge { .. }),
        "{err}"
    );
    host.assert_store_clean(false);
}

#[test]
fn http_redirects_are_bounded_and_stay_on_http() {
    use nvdriver_agent::overlay::source::http::MAX_REDIRECTS;
    let host = BareHost::new(key());
    let server = HttpServer::start();
    server.route(
        "/good.tar.gz",
        Route::file(good_archive(Compression::Gzip, ManifestAt::Last)),
    );
    // A chain of MAX_REDIRECTS hops is followed.
    for hop in 0..MAX_REDIRECTS {
        let next = if hop + 1 == MAX_REDIRECTS {
            "/good.tar.gz".to_string()
        } else {
            format!("/hop{}", hop + 1)
        };
        server.route(&format!("/hop{hop}"), Route::redirect(&next));
    }
    let report = host.stage(&settings(&[&server.url("/hop0")])).unwrap();
    assert_eq!(
        report.outcome,
        ImportOutcome::Imported { dir: staged_dir() }
    );
    host.assert_store_clean(false);

    // A loop, a file:// location and a local path outside the server are refused, and nothing
    // is read from this machine's files.
    let host = BareHost::new(key());
    host.put("/etc/secret", b"not for the network");
    server.route("/loop", Route::redirect("/loop"));
    server.route("/file", Route::redirect("file:///etc/passwd"));
    let secret = host.root.join("/etc/secret").display().to_string();
    server.route("/local", Route::redirect(&format!("file://{secret}")));
    for path in ["/loop", "/file", "/local"] {
        let err = host.stage(&settings(&[&server.url(path)])).unwrap_err();
        assert!(
            matches!(only_attempt(&err), AttemptError::Fetch(_)),
            "{path}: {err}"
        );
        host.assert_store_clean(false);
    }
    assert!(server.requests("/loop").len() <= MAX_REDIRECTS as usize + 1);

    // With http not allowed, a redirect from https to http would be refused too; here the
    // first URL is already refused before any request.
    let mut no_http = settings(&[&server.url("/hop0")]);
    no_http.allow_http = false;
    assert!(host.stage(&no_http).is_err());
}
