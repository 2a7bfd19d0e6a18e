//! A real registry on 127.0.0.1 (Debian's `docker-registry`, the CNCF distribution server)
//! with its storage in a temp dir, images written as OCI layouts by the test and pushed with
//! `skopeo`, and a registry that accepts connections and never answers.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvdriver_agent::overlay::verify::sha256_bytes;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub struct Registry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    /// `user:password` when the registry demands Basic auth.
    pub credentials: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// Start a registry; with `credentials` (`user:password`) it demands them (htpasswd).
    pub fn start(credentials: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        if let Some(credentials) = credentials {
            let (user, password) = credentials.split_once(':').unwrap();
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is installed");
            assert!(out.status.success(), "{out:?}");
            let file = dir.path().join("htpasswd");
            fs::write(&file, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                file.display()
            ));
        }
        let config_file = dir.path().join("config.yml");
        fs::write(&config_file, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed (scripts/setup)");
        let registry = Registry {
            child,
            port,
            dir,
            credentials: credentials.map(str::to_string),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                fs::read_to_string(registry.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Push the OCI layout at `layout` (tag `tag` in it) as `repo:tag`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let mut command = Command::new("skopeo");
        // --preserve-digests: skopeo would otherwise compress uncompressed layers, changing digests.
        command.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--multi-arch=all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some(credentials) = &self.credentials {
            command.args(["--dest-creds", credentials]);
        }
        let out = command
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .output()
            .expect("skopeo is installed (scripts/setup)");
        assert!(out.status.success(), "skopeo: {out:?}");
    }

    /// Where the registry keeps a blob's bytes (to tamper with them).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One image layer: its (possibly compressed) bytes, media type and uncompressed digest.
pub struct Layer {
    pub bytes: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
}

impl Layer {
    pub fn tar(tar: Vec<u8>) -> Layer {
        Layer {
            diff_id: format!("sha256:{}", sha256_bytes(&tar)),
            bytes: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    pub fn gzip(tar: Vec<u8>) -> Layer {
        let bytes = super::archive::compress(&tar, super::archive::Compression::Gzip);
        Layer {
            diff_id: format!("sha256:{}", sha256_bytes(&tar)),
            bytes,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }

    pub fn zstd(compressed: Vec<u8>) -> Layer {
        let tar = zstd::decode_all(compressed.as_slice()).unwrap();
        Layer {
            diff_id: format!("sha256:{}", sha256_bytes(&tar)),
            bytes: compressed,
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What [`write_layout`] wrote.
pub struct Image {
    pub manifest_digest: String,
    pub layer_digests: Vec<String>,
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = sha256_bytes(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len() as u64)
}

/// Write a linux/amd64 image of `layers` as an OCI layout at `layout`, tagged `tag`.
pub fn write_layout(layout: &Path, tag: &str, layers: &[Layer]) -> Image {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let (config_digest, config_size) = put_blob(layout, config.to_string().as_bytes());
    let mut descriptors = Vec::new();
    let mut layer_digests = Vec::new();
    for layer in layers {
        let (digest, size) = put_blob(layout, &layer.bytes);
        descriptors.push(
            serde_json::json!({"mediaType": layer.media_type, "digest": digest, "size": size}),
        );
        layer_digests.push(digest);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = put_blob(layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    Image {
        manifest_digest,
        layer_digests,
    }
}

/// Turn the single image of the layout at `layout` into an image index listing it as
/// linux/amd64 beside a linux/arm64 image whose layer is junk; returns the index's digest.
pub fn make_index(layout: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let amd64 = index["manifests"][0].clone();
    let hex = amd64["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(
            layout.join("blobs/sha256").join(
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("sha256:")
                    .unwrap(),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    config["architecture"] = "arm64".into();
    let (config_digest, config_size) = put_blob(layout, config.to_string().as_bytes());
    // The arm64 image's only layer is not a tar at all: choosing it would fail the stage.
    let (junk_digest, junk_size) = put_blob(layout, b"not a layer for this machine");
    let mut arm = manifest.clone();
    arm["config"]["digest"] = config_digest.into();
    arm["config"]["size"] = config_size.into();
    arm["layers"] = serde_json::json!([{
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": junk_digest,
        "size": junk_size,
    }]);
    let (arm_digest, arm_size) = put_blob(layout, arm.to_string().as_bytes());
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm_size,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": amd64["digest"], "size": amd64["size"],
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    });
    let (list_digest, list_size) = put_blob(layout, list.to_string().as_bytes());
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": list_digest,
            "size": list_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(layout.join("index.json"), top.to_string()).unwrap();
    list_digest
}

/// A "registry" that accepts connections and never answers.
pub struct Stalling {
    pub port: u16,
    _thread: std::thread::JoinHandle<()>,
}

impl Stalling {
    pub fn start() -> Stalling {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Stalling {
            port,
            _thread: thread,
        }
    }
}
