//! `overlay build` against the kernel headers installed on this machine
//! (`/usr/src/linux-headers-*`; scripts/setup installs Debian's cloud-amd64 ones): a small
//! Kbuild tree with NVIDIA's module names is built for real by make and gcc, then packed.
//! Skipped where make or headers are missing (a failure under CI).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::agent;
use crate::common::tools::tool_or_skip;
use nvdriver_agent::overlay::build::plan::uts_release;
use nvdriver_agent::overlay::Manifest;

const NVIDIA_C: &str = r#"// SPDX-License-Identifier: GPL-2.0 OR MIT
#include <linux/module.h>
/* __FILE__ is the work directory's path unless the build maps it away. */
static const char *origin = __FILE__;
int nvidia_build_test_core(void) { return origin[0]; }
EXPORT_SYMBOL(nvidia_build_test_core);
static int __init nvidia_init(void) { return 0; }
static void __exit nvidia_exit(void) { }
module_init(nvidia_init);
module_exit(nvidia_exit);
MODULE_LICENSE("Dual MIT/GPL");
MODULE_VERSION("570.124.06");
"#;

const UVM_C: &str = r#"// SPDX-License-Identifier: GPL-2.0 OR MIT
#include <linux/module.h>
extern int nvidia_build_test_core(void);
static int __init uvm_init(void) { return nvidia_build_test_core() ? 0 : 0; }
static void __exit uvm_exit(void) { }
module_init(uvm_init);
module_exit(uvm_exit);
MODULE_LICENSE("Dual MIT/GPL");
MODULE_VERSION("570.124.06");
"#;

/// The first installed kernel build tree (not Debian's `-common` half), or `None` after
/// saying why the test is skipped.
fn kernel_tree(test: &str) -> Option<PathBuf> {
    tool_or_skip("make", test)?;
    tool_or_skip("gcc", test)?;
    let mut trees: Vec<PathBuf> = fs::read_dir("/usr/src")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("include/generated/utsrelease.h").is_file())
        .filter(|p| p.join("include/config/auto.conf").is_file())
        .collect();
    trees.sort();
    if trees.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kernel headers are required under CI; scripts/setup installs linux-headers-cloud-amd64"
        );
        eprintln!("skipping {test}: no kernel headers in /usr/src (scripts/setup installs them)");
    }
    trees.pop()
}

fn release_of(tree: &Path) -> String {
    uts_release(&fs::read_to_string(tree.join("include/generated/utsrelease.h")).unwrap()).unwrap()
}

/// A Kbuild tree with nvidia.ko and nvidia-uvm.ko at `dir`.
fn write_source(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("Kbuild"), "obj-m := nvidia.o nvidia-uvm.o\n").unwrap();
    fs::write(dir.join("nvidia.c"), NVIDIA_C).unwrap();
    fs::write(dir.join("nvidia-uvm.c"), UVM_C).unwrap();
}

fn build(tree: &Path, source: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "overlay",
        "build",
        "--kernel-tree",
        tree.to_str().unwrap(),
        "--source",
        source.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut command = agent::command(Path::new("/"), &args);
    command.env_remove("CC").env_remove("CI");
    command.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", agent::text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "{}", agent::text(out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn digest(stdout: &str) -> String {
    let at = stdout
        .find("(sha256 ")
        .expect("the archive's digest is printed")
        + 8;
    stdout[at..at + 64].to_string()
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push((path.clone(), fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn builds_reproducibly_from_a_tree_and_a_tarball_in_any_work_dir() {
    let Some(tree) = kernel_tree("build::builds_reproducibly") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("driver-src");
    write_source(&source);
    let before = snapshot(&source);
    let (a, b, out) = (
        temp.path().join("a.tar.zst"),
        temp.path().join("b.tar.zst"),
        temp.path().join("overlay"),
    );
    let work = temp.path().join("some/work-dir");
    let first = ok(&build(
        &tree,
        &source,
        &[
            "--archive",
            a.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
            "--jobs",
            "2",
        ],
    ));
    // Kbuild splits paths on spaces: refused up front, not after a confusing make error.
    let spaced = temp.path().join("work dir");
    let err = failed(&build(
        &tree,
        &source,
        &[
            "--archive",
            a.to_str().unwrap(),
            "--work-dir",
            spaced.to_str().unwrap(),
        ],
    ));
    assert!(
        err.contains("white space") && err.contains("--work-dir"),
        "{err}"
    );
    // The original is never built in or written.
    assert_eq!(snapshot(&source), before);
    assert!(work.join("build.log").is_file(), "--work-dir is kept");

    // The same source as a tarball with a top directory, built in a temporary directory.
    let tarball = temp.path().join("driver-src.tar.gz");
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(temp.path())
        .arg("driver-src")
        .status()
        .unwrap();
    assert!(tar.success());
    let second = ok(&build(&tree, &tarball, &["--archive", b.to_str().unwrap()]));
    assert_eq!(
        digest(&first),
        digest(&second),
        "two builds of the same inputs give the same archive\n{first}\n{second}"
    );

    let manifest = Manifest::parse(
        &fs::read_to_string(out.join("overlay.toml")).unwrap(),
        Path::new("overlay.toml"),
    )
    .unwrap();
    assert_eq!(manifest.kernel_release, release_of(&tree));
    assert_eq!(manifest.driver_version, "570.124.06");
    let mut names: Vec<String> = manifest
        .module_files()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["nvidia-uvm.ko", "nvidia.ko"]);
    // Debug info stripped (unless --keep-debug), and the overlay verifies.
    let module = out.join(format!(
        "usr/lib/modules/{}/extra/nvidia/nvidia.ko",
        manifest.kernel_release
    ));
    let bytes = fs::read(&module).unwrap();
    assert!(
        !bytes.windows(11).any(|w| w == b".debug_info"),
        "debug info is stripped"
    );
    let verify = agent::run(
        Path::new("/"),
        &["overlay", "verify", out.to_str().unwrap()],
    );
    ok(&verify);
}

#[test]
fn a_patch_is_applied_to_a_copy_and_one_that_does_not_apply_is_named() {
    let Some(tree) = kernel_tree("build::a_patch_is_applied") else {
        return;
    };
    tool_or_skip("patch", "build::a_patch_is_applied").unwrap();
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    let before = snapshot(&source);
    let patch = temp.path().join("version.patch");
    fs::write(
        &patch,
        "--- a/nvidia.c\n+++ b/nvidia.c\n@@ -11,2 +11,2 @@\n MODULE_LICENSE(\"Dual MIT/GPL\");\n-MODULE_VERSION(\"570.124.06\");\n+MODULE_VERSION(\"570.124.06-patched\");\n",
    )
    .unwrap();
    let out = temp.path().join("overlay");
    ok(&build(
        &tree,
        &source,
        &[
            "--patch",
            patch.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let manifest = fs::read_to_string(out.join("overlay.toml")).unwrap();
    assert!(
        manifest.contains("driver-version = \"570.124.06-patched\""),
        "{manifest}"
    );
    assert_eq!(snapshot(&source), before, "the patch went into a copy");

    // The same patch twice: the second does not apply (already applied).
    let archive = temp.path().join("never.tar.zst");
    let err = failed(&build(
        &tree,
        &source,
        &[
            "--patch",
            patch.to_str().unwrap(),
            "--patch",
            patch.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
        ],
    ));
    assert!(
        err.contains(&format!("patch {} does not apply", patch.display())),
        "{err}"
    );
    assert!(!archive.exists());
}

#[test]
fn a_compile_error_names_the_kernel_and_the_file_and_line() {
    let Some(tree) = kernel_tree("build::a_compile_error") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    // Line 4: a call with too few arguments, as a kernel API change makes one.
    fs::write(
        source.join("nvidia-uvm.c"),
        UVM_C.replacen(
            "extern int nvidia_build_test_core(void);",
            "static int two(int a, int b) { return a + b; }\nstatic int broken(void) { return two(1); }\nextern int nvidia_build_test_core(void);",
            1,
        ),
    )
    .unwrap();
    let work = temp.path().join("work");
    let err = failed(&build(
        &tree,
        &source,
        &[
            "--archive",
            temp.path().join("x.tar.zst").to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
        ],
    ));
    let kver = release_of(&tree);
    assert!(
        err.contains(&format!("does not build against kernel {kver}")),
        "{err}"
    );
    assert!(
        err.contains("nvidia-uvm.c:4: too few arguments to function 'two'"),
        "{err}"
    );
    assert!(
        err.contains(&format!("full log: {}", work.join("build.log").display())),
        "{err}"
    );
    // One error, not the ones that follow from it.
    assert!(!err.contains("nvidia-uvm.c:5"), "{err}");
}

#[test]
fn another_compiler_than_the_kernels_is_refused_unless_allowed() {
    let Some(tree) = kernel_tree("build::another_compiler") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    let fake = temp.path().join("fake-cc");
    fs::write(&fake, "#!/bin/sh\necho 'gcc-99 (Fake 99.1-1) 99.1.0'\n").unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let archive = temp.path().join("x.tar.zst");
    let mut command = agent::command(
        Path::new("/"),
        &[
            "overlay",
            "build",
            "--kernel-tree",
            tree.to_str().unwrap(),
            "--source",
            source.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
        ],
    );
    let tmpdir = temp.path().join("tmp");
    fs::create_dir(&tmpdir).unwrap();
    let out = command
        .env("CC", &fake)
        .env("TMPDIR", &tmpdir)
        .output()
        .unwrap();
    let err = failed(&out);
    assert_eq!(
        fs::read_dir(&tmpdir).unwrap().count(),
        0,
        "the temporary work directory is removed when make did not run"
    );
    assert!(
        err.contains("says \"gcc-99 (Fake 99.1-1) 99.1.0\"")
            && err.contains("CONFIG_CC_VERSION_TEXT")
            && err.contains("--allow-compiler-mismatch")
            && err.contains(&release_of(&tree)),
        "{err}"
    );
    assert!(!archive.exists(), "nothing is built");
}

#[test]
fn signed_modules_carry_the_certificates_serial_and_sign_reproducibly() {
    let Some(tree) = kernel_tree("build::signed_modules") else {
        return;
    };
    if tool_or_skip("openssl", "build::signed_modules").is_none() {
        return;
    }
    if !tree.join("scripts/sign-file").is_file() {
        eprintln!(
            "skipping build::signed_modules: {} has no scripts/sign-file",
            tree.display()
        );
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    let (key, cert) = (temp.path().join("key.pem"), temp.path().join("cert.pem"));
    let openssl = Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=nvdriver-agent build test",
            "-set_serial",
            "0x5EED01",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(openssl.status.success(), "{openssl:?}");
    let sign = [
        "--sign-modules",
        key.to_str().unwrap(),
        cert.to_str().unwrap(),
    ];
    let out = temp.path().join("overlay");
    let a = temp.path().join("a.tar.zst");
    let b = temp.path().join("b.tar.zst");
    let mut args = sign.to_vec();
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--archive",
        a.to_str().unwrap(),
    ]);
    let first = ok(&build(&tree, &source, &args));
    let mut args = sign.to_vec();
    args.extend(["--archive", b.to_str().unwrap()]);
    let second = ok(&build(&tree, &source, &args));
    assert_eq!(
        digest(&first),
        digest(&second),
        "sign-file's PKCS#7 (RSA, PKCS#1 v1.5, no signing time) is deterministic"
    );
    let kver = release_of(&tree);
    for name in ["nvidia.ko", "nvidia-uvm.ko"] {
        let module = out.join(format!("usr/lib/modules/{kver}/extra/nvidia/{name}"));
        let info = nvdriver_agent::modinfo::read_module_file(&module).unwrap();
        let signature = info.signature.expect("the module is signed");
        assert_eq!(signature.key_id.as_deref(), Some("5E:ED:01"), "{name}");
        assert_eq!(
            signature.signer.as_deref(),
            Some("nvdriver-agent build test")
        );
        assert_eq!(signature.hash_algo.as_deref(), Some("sha256"));
    }
}

#[cfg(feature = "oci")]
#[test]
fn pushes_to_a_registry_and_pulls_back_with_inspect() {
    let Some(tree) = kernel_tree("build::pushes") else {
        return;
    };
    if tool_or_skip("docker-registry", "build::pushes").is_none() {
        return;
    }
    let registry = crate::common::registry::Registry::start(None);
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    let config = temp.path().join("config.toml");
    fs::write(
        &config,
        format!("[oci]\ninsecure-registries = [\"{}\"]\n", registry.host()),
    )
    .unwrap();
    let reference = format!("oci://{}/nvidia/overlays:test-tag", registry.host());
    let archive = temp.path().join("a.tar.zst");
    let push = |extra: &[&str]| {
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--push",
            reference.as_str(),
        ];
        args.extend_from_slice(extra);
        ok(&build(&tree, &source, &args))
    };
    let overlay = temp.path().join("overlay");
    let first = push(&[
        "--archive",
        archive.to_str().unwrap(),
        "--out",
        overlay.to_str().unwrap(),
    ]);
    assert!(first.contains("0 blob(s) already there"), "{first}");
    let pushed_digest = first
        .split("pushed ")
        .nth(1)
        .and_then(|rest| rest.split(['(', ';']).nth(1))
        .unwrap()
        .to_string();
    // Without --archive the archive is written in the work directory; the blobs are there.
    let second = push(&[]);
    assert!(second.contains("2 blob(s) already there"), "{second}");
    assert!(
        second.contains(&pushed_digest),
        "same image digest: {first}\n{second}"
    );

    let out = agent::run(
        Path::new("/"),
        &[
            "--config",
            config.to_str().unwrap(),
            "overlay",
            "inspect",
            "--json",
            &reference,
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json["digest"], pushed_digest.as_str(), "{json}");
    assert_eq!(json["kind"], "oci-overlay", "{json}");
    assert_eq!(
        json["manifest"]["kernel-release"],
        release_of(&tree).as_str(),
        "{json}"
    );
    assert_eq!(json["contents"], "verified", "{json}");

    // `overlay pack --push` of the same modules pushes the very same image.
    let packed_ref = format!("oci://{}/nvidia/packed:test-tag", registry.host());
    let pack = agent::run(
        Path::new("/"),
        &[
            "--config",
            config.to_str().unwrap(),
            "overlay",
            "pack",
            "--modules",
            overlay.join("usr/lib/modules").to_str().unwrap(),
            "--push",
            &packed_ref,
        ],
    );
    let pack = ok(&pack);
    assert!(
        pack.contains(&format!("pushed {packed_ref} ({pushed_digest};")),
        "{pack}\n{first}"
    );
}

#[cfg(feature = "oci")]
#[test]
fn a_push_takes_its_credentials_from_auth_json_under_the_root() {
    use base64::Engine;
    let Some(tree) = kernel_tree("build::a_push_takes_its_credentials") else {
        return;
    };
    if tool_or_skip("docker-registry", "build::a_push_takes_its_credentials").is_none() {
        return;
    }
    let registry = crate::common::registry::Registry::start(Some("builder:s3cret"));
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("src");
    write_source(&source);
    let root = temp.path().join("root");
    let config = root.join("etc/nvdriver-agent/config.toml");
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    fs::write(
        &config,
        format!("[oci]\ninsecure-registries = [\"{}\"]\n", registry.host()),
    )
    .unwrap();
    let reference = format!("oci://{}/private/overlays:v1", registry.host());
    let push = || {
        let mut command = agent::command(
            &root,
            &[
                "overlay",
                "build",
                "--kernel-tree",
                tree.to_str().unwrap(),
                "--source",
                source.to_str().unwrap(),
                "--push",
                &reference,
            ],
        );
        command.env_remove("CC").env_remove("CI").output().unwrap()
    };
    let err = failed(&push());
    assert!(
        err.contains("HTTP 401")
            && err.contains(&format!("add credentials for {}", registry.host())),
        "{err}"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode("builder:s3cret");
    fs::write(
        root.join("etc/nvdriver-agent/auth.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{encoded}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let out = ok(&push());
    assert!(
        out.contains(&format!("pushed {reference} (sha256:")),
        "{out}"
    );
}

/// Debian's three packages of a kernel tree (`linux-headers-<kver>`, its `-common` half and
/// `linux-kbuild-<ver>`), rebuilt with `dpkg-deb` from the installed files; `None` where the
/// tree is not Debian's split layout.
fn debian_packages(tree: &Path, into: &Path) -> Option<Vec<PathBuf>> {
    let wrapper = fs::read_to_string(tree.join("Makefile")).ok()?;
    let common = PathBuf::from(
        wrapper
            .trim()
            .strip_prefix("include ")?
            .strip_suffix("/Makefile")?,
    );
    let kbuild = fs::canonicalize(tree.join("scripts"))
        .ok()?
        .parent()?
        .to_path_buf();
    let mut packages = Vec::new();
    for (n, dir) in [tree.to_path_buf(), common, kbuild].iter().enumerate() {
        let staging = into.join(format!("staging-{n}"));
        let target = staging.join(dir.strip_prefix("/").unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(dir)
            .arg(&target)
            .status()
            .unwrap();
        assert!(cp.success());
        fs::create_dir_all(staging.join("DEBIAN")).unwrap();
        fs::write(
            staging.join("DEBIAN/control"),
            format!("Package: test-kernel-part-{n}\nVersion: 1\nArchitecture: all\nMaintainer: test <test@example.org>\nDescription: part {n} of a kernel tree\n"),
        )
        .unwrap();
        let deb = into.join(format!("part-{n}.deb"));
        let out = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Znone", "--build"])
            .arg(&staging)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        fs::remove_dir_all(&staging).unwrap();
        packages.push(deb);
    }
    Some(packages)
}

#[test]
fn a_kernel_given_as_debian_packages_builds_the_same_modules_as_installed() {
    let Some(tree) = kernel_tree("build::a_kernel_given_as_debian_packages") else {
        return;
    };
    if tool_or_skip("dpkg-deb", "build::a_kernel_given_as_debian_packages").is_none() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let Some(packages) = debian_packages(&tree, temp.path()) else {
        eprintln!(
            "skipping build::a_kernel_given_as_debian_packages: {} is not Debian's split tree",
            tree.display()
        );
        return;
    };
    let source = temp.path().join("src");
    write_source(&source);
    // The arch package alone is refused, naming what is missing (not built against the
    // host's installed -common half).
    let err = failed(&build(
        &packages[0],
        &source,
        &["--archive", temp.path().join("x.tar.zst").to_str().unwrap()],
    ));
    assert!(
        err.contains("which none of the packages holds") && err.contains("-common"),
        "{err}"
    );
    let installed = temp.path().join("installed.tar.zst");
    let first = ok(&build(
        &tree,
        &source,
        &["--archive", installed.to_str().unwrap()],
    ));

    let work = temp.path().join("work");
    let mut args = vec![
        "overlay".to_string(),
        "build".into(),
        "--source".into(),
        source.display().to_string(),
        "--work-dir".into(),
        work.display().to_string(),
        "--archive".into(),
        temp.path()
            .join("from-packages.tar.zst")
            .display()
            .to_string(),
    ];
    for package in &packages {
        args.extend(["--kernel-tree".to_string(), package.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = agent::command(Path::new("/"), &args);
    let second = ok(&command.env_remove("CC").env_remove("CI").output().unwrap());
    // make ran in the unpacked tree, not the installed one ...
    let log = fs::read_to_string(work.join("build.log")).unwrap();
    assert!(
        log.contains(&format!(
            "Entering directory '{}",
            work.join("kernel/usr/src").display()
        )),
        "{log}"
    );
    // ... and the modules are the same bytes (the unpack directory is mapped away).
    assert_eq!(digest(&first), digest(&second), "{first}\n{second}");
}
