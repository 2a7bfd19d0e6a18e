# Shared by the shell benchmarks (sourced, not run; bench/run skips it).

# bench_line NAME VALUE UNIT BASELINE_NAME BASELINE RATIO TARGET MET: the machine-readable line
# bench/run collects. BASELINE and RATIO may be "null"; MET is "true" or "false". Names and
# targets must not contain double quotes or backslashes (they go into JSON as they are).
bench_line() {
  printf 'BENCH {"name": "%s", "value": %s, "unit": "%s", "baseline_name": "%s", "baseline": %s, "ratio": %s, "target": "%s", "met": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8"
}

# Median of the numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Nanoseconds since the epoch.
now_ns() { date +%s%N; }

# Seconds (3 decimals) from nanoseconds.
seconds() { awk -v ns="$1" 'BEGIN { printf "%.3f", ns / 1e9 }'; }

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT: return once something accepts connections on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# oci_layout LAYOUT LAYER: an OCI image layout at LAYOUT holding one linux/amd64 image, tagged
# "bench", whose only layer is the zstd-compressed tar LAYER (an overlay archive).
oci_layout() {
  python3 - "$1" "$2" <<'PY'
import hashlib, json, os, shutil, subprocess, sys
layout, layer = sys.argv[1], sys.argv[2]
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs)
def put(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}
h = hashlib.sha256()
with open(layer, "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
              "digest": "sha256:" + h.hexdigest(), "size": os.path.getsize(layer)}
shutil.copyfile(layer, os.path.join(blobs, h.hexdigest()))
diff = hashlib.sha256(subprocess.run(["zstd", "-q", "-d", "-c", layer], check=True,
                                     capture_output=True).stdout).hexdigest()
config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff]}}).encode())
config["mediaType"] = "application/vnd.oci.image.config.v1+json"
manifest = put(json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer_desc]}).encode())
manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
manifest["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [manifest]}, f)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
PY
}
