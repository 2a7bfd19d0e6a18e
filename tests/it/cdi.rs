//! The CDI spec after `load`: the agent's own (complete: device, MIG access and control nodes,
//! mounts, nvidia-ctk's create-symlinks and update-ldcache hooks; valid against the CDI JSON
//! schema in tests/fixtures/cdi-schema/), none without nvidia-cdi-hook, and nvidia-ctk's, given
//! `--dev-root` and refused when it lacks the device nodes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::agent;
use crate::common::host::FakeHost;
use crate::common::overlay::{OverlayBuilder, DRIVER};
use crate::common::tools;
use serde_json::{json, Value};

const KVER: &str = "6.1.0-28-cloud-amd64";
const CDI: &str = "/var/run/cdi/nvidia.json";

/// A host with a stored overlay with user space, one GPU, and (as on the GPU machine) MIG
/// capabilities, one MIG instance's included.
fn host() -> FakeHost {
    let host = FakeHost::new(KVER);
    host.import(&OverlayBuilder::nvidia(KVER).with_userspace());
    host.write(
        "/proc/driver/nvidia/gpus/0000:3b:00.0/information",
        "Model: \t\t NVIDIA H200\nDevice Minor: \t 0\n",
    );
    let caps = "/proc/driver/nvidia/capabilities";
    host.write(
        &format!("{caps}/mig/config"),
        "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n",
    );
    host.write(
        &format!("{caps}/mig/monitor"),
        "DeviceFileMinor: 2\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
    );
    host.write(
        &format!("{caps}/gpu0/mig/gi1/access"),
        "DeviceFileMinor: 12\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
    );
    host.write(
        "/proc/devices",
        "Character devices:\n  1 mem\n241 nvidia-caps\n",
    );
    host
}

fn executable(host: &FakeHost, path: &str, script: &str) {
    host.write(path, script);
    fs::set_permissions(host.path(path), fs::Permissions::from_mode(0o755)).unwrap();
}

fn load(host: &FakeHost) -> String {
    let out = agent::run(host.dir.path(), &["load"]);
    // A CDI failure is said, not fatal: containers are served without CDI too.
    assert!(out.status.success(), "{}", agent::text(&out));
    agent::text(&out)
}

/// Validate `spec` against the CDI schema (python3-jsonschema, as tests/it/cli_docs.rs does);
/// the 0.5.2 schema does not reach the top-level containerEdits, so that is checked against
/// defs.json's containerEdits too.
fn validate_cdi(spec: &Value) -> Result<(), String> {
    let schema_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cdi-schema");
    let script = r#"
import json, sys
import jsonschema
d = sys.argv[1]
schema, defs = json.load(open(d + "/schema.json")), json.load(open(d + "/defs.json"))
jsonschema.Draft7Validator.check_schema(schema)
resolver = jsonschema.RefResolver(base_uri="file://" + d + "/schema.json", referrer=schema,
                                  store={"defs.json": defs, "file://" + d + "/defs.json": defs})
spec = json.load(open(sys.argv[2]))
errors = list(jsonschema.Draft7Validator(schema, resolver=resolver).iter_errors(spec))
edits = {"$ref": "defs.json#/definitions/containerEdits"}
errors += list(jsonschema.Draft7Validator(edits, resolver=resolver).iter_errors(spec.get("containerEdits", {})))
for e in errors:
    print(f"{list(e.absolute_path)}: {e.message}")
sys.exit(1 if errors else 0)
"#;
    tools::jsonschema_check(script, &schema_dir, spec)
}

fn node_paths(nodes: &Value) -> Vec<&str> {
    crate::common::str_fields(nodes, "path")
}

#[test]
fn own_spec_is_complete_and_valid_cdi() {
    let host = host();
    executable(&host, "/usr/bin/nvidia-cdi-hook", "#!/bin/sh\n");
    load(&host);
    let spec: Value = serde_json::from_str(&host.read(CDI)).unwrap();
    validate_cdi(&spec).unwrap();

    let all = spec["devices"].as_array().unwrap().last().unwrap();
    assert_eq!(all["name"], "all");
    // The MIG instance's access node; not mig/config or mig/monitor (MIG administration).
    assert_eq!(
        node_paths(&all["containerEdits"]["deviceNodes"]),
        ["/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap12"]
    );
    assert!(host.exists("/dev/nvidia-caps/nvidia-cap12"));
    let edits = &spec["containerEdits"];
    assert_eq!(
        node_paths(&edits["deviceNodes"]),
        ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    );
    // Files are mounted; the overlay's SONAME links are made by the hook, as nvidia-ctk does.
    let mounted: Vec<&str> = crate::common::str_fields(&edits["mounts"], "containerPath");
    assert_eq!(
        mounted,
        [
            "/usr/bin/nvidia-smi".to_string(),
            format!("/usr/lib64/libcuda.so.{DRIVER}"),
            format!("/usr/lib64/libnvidia-ml.so.{DRIVER}"),
        ]
    );
    let hook = |args: Value| {
        json!({"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
               "args": args, "env": ["NVIDIA_CTK_DEBUG=false"]})
    };
    assert_eq!(
        edits["hooks"],
        json!([
            hook(json!([
                "nvidia-cdi-hook",
                "create-symlinks",
                "--link",
                "libcuda.so.1::/usr/lib64/libcuda.so",
                "--link",
                format!("libcuda.so.{DRIVER}::/usr/lib64/libcuda.so.1"),
                "--link",
                format!("libnvidia-ml.so.{DRIVER}::/usr/lib64/libnvidia-ml.so.1")
            ])),
            hook(json!([
                "nvidia-cdi-hook",
                "update-ldcache",
                "--folder",
                "/usr/lib64"
            ])),
        ])
    );

    // The schema can fail: a hook without hookName, a mount without containerPath.
    let mut bad = spec.clone();
    bad["containerEdits"]["hooks"][0]
        .as_object_mut()
        .unwrap()
        .remove("hookName");
    assert!(validate_cdi(&bad).unwrap_err().contains("hookName"));
    let mut bad = spec;
    bad["devices"][0]["containerEdits"]["mounts"] = json!([{"hostPath": "/x"}]);
    assert!(validate_cdi(&bad).unwrap_err().contains("containerPath"));
}

#[test]
fn no_hook_no_spec_and_a_stale_one_is_removed() {
    let host = host();
    host.write(CDI, "{\"stale\": true}\n");
    let said = load(&host);
    assert!(!host.exists(CDI), "a spec without hooks was claimed");
    assert!(said.contains("no nvidia-cdi-hook"), "{said}");
}

/// A stand-in for `nvidia-ctk cdi generate` that behaves as upstream does about the dev root:
/// NVIDIA/nvidia-container-toolkit `pkg/nvcdi/options.go`, `populateOptions`, takes the driver
/// root when `--dev-root` is not given; the device nodes are the `dev/nvidia*` found there.
/// `OLD=1`: a v1.14 nvidia-ctk, which has no --dev-root (urfave/cli's error).
const NVIDIA_CTK: &str = r#"#!/bin/sh
driver_root=/ dev_root= output= format=yaml
for arg in "$@"; do
  case "$arg" in
    --driver-root=*) driver_root=${arg#*=} ;;
    --dev-root=*)
      if [ -n "$OLD" ]; then
        echo 'Incorrect Usage: flag provided but not defined: -dev-root' >&2; exit 1
      fi
      dev_root=${arg#*=} ;;
    --output=*) output=${arg#*=} ;;
    --format=*) format=${arg#*=} ;;
  esac
done
[ -n "$dev_root" ] || dev_root=$driver_root
nodes=
for n in "$dev_root"/dev/nvidia*; do
  [ -c "$n" ] || [ -f "$n" ] || continue
  nodes="$nodes{\"path\": \"/dev/${n##*/}\"},"
done
printf '{"cdiVersion":"0.5.0","kind":"nvidia.com/gpu","devices":[{"name":"all","containerEdits":{"deviceNodes":[%s]}}],"containerEdits":{}}\n' "${nodes%,}" >"$output"
"#;

#[test]
fn nvidia_ctk_gets_the_dev_root_and_its_spec_has_the_nodes() {
    let host = host();
    executable(&host, "/usr/bin/nvidia-ctk", NVIDIA_CTK);
    load(&host);
    let spec: Value = serde_json::from_str(&host.read(CDI)).unwrap();
    let mut nodes = node_paths(&spec["devices"][0]["containerEdits"]["deviceNodes"]);
    nodes.sort();
    for want in [
        "/dev/nvidia0",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    ] {
        assert!(nodes.contains(&want), "{want} not in {nodes:?}");
    }
}

#[test]
fn a_spec_without_device_nodes_is_refused() {
    let host = host();
    // What an nvidia-ctk without --dev-root does: look under the driver root, find no nodes.
    executable(
        &host,
        "/usr/bin/nvidia-ctk",
        &NVIDIA_CTK.replace("dev_root=${arg#*=} ;;", ";;"),
    );
    host.write(CDI, "{\"stale\": true}\n");
    let said = load(&host);
    assert!(!host.exists(CDI), "a spec without device nodes was claimed");
    assert!(
        said.contains("has no device node") && said.contains("/dev/nvidiactl"),
        "{said}"
    );
}

#[test]
fn an_nvidia_ctk_without_dev_root_is_named() {
    let host = host();
    executable(
        &host,
        "/usr/bin/nvidia-ctk",
        &NVIDIA_CTK.replace("#!/bin/sh\n", "#!/bin/sh\nOLD=1\n"),
    );
    let said = load(&host);
    assert!(!host.exists(CDI));
    assert!(
        said.contains("has no --dev-root") && said.contains("1.15.0"),
        "{said}"
    );
}
