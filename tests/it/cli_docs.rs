//! What documents the command line: the man pages (docs/man/, written by examples/man.rs from
//! the clap tree and dist/config.toml) are current and complete, and the real `status --json`
//! and `plan --json` output validates against docs/schema/ (with python3-jsonschema, which
//! scripts/setup installs), schemas strict enough to refuse a missing field or a wrong type.

#[allow(dead_code)] // its `main` and `write_pages` are the example's alone
#[path = "../../examples/man.rs"]
mod man;

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use serde_json::{json, Value};

use crate::common::agent::text;
use crate::common::host::FakeHost;
use crate::common::overlay::OverlayBuilder;
use crate::common::tools;

const KVER: &str = "6.1.0-28-cloud-amd64";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn committed_man_pages_are_what_the_generator_writes() {
    let pages = man::pages();
    for (name, text) in &pages {
        let committed = std::fs::read_to_string(repo("docs/man").join(name)).unwrap_or_default();
        pretty_assertions::assert_eq!(
            &committed,
            text,
            "docs/man/{name} is not current: run `cargo run --example man -- docs/man`"
        );
    }
    let mut committed: Vec<String> = std::fs::read_dir(repo("docs/man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    committed.sort();
    let generated: Vec<String> = pages.iter().map(|(name, _)| name.clone()).collect();
    assert_eq!(
        committed, generated,
        "docs/man/ holds pages the generator no longer writes"
    );
}

/// The page names every visible subcommand needs, `nvdriver-agent-overlay-import.8` style.
fn expected_pages(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
    out.push(format!("{prefix}.8"));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        expected_pages(sub, &format!("{prefix}-{}", sub.get_name()), out);
    }
}

#[test]
fn every_subcommand_has_a_page_and_the_config_file_too() {
    let mut expected = vec!["nvdriver-agent.toml.5".to_string()];
    let cmd = nvdriver_agent::cli::Cli::command().disable_help_subcommand(true);
    expected_pages(&cmd, "nvdriver-agent", &mut expected);
    expected.sort();
    let pages: Vec<String> = man::pages().into_iter().map(|(name, _)| name).collect();
    assert_eq!(pages, expected);
    for page in ["nvdriver-agent-plan.8", "nvdriver-agent-overlay-import.8"] {
        assert!(pages.iter().any(|p| p == page), "no {page}: {pages:?}");
    }
    let config = man::pages()
        .into_iter()
        .find(|(name, _)| name == "nvdriver-agent.toml.5")
        .unwrap()
        .1;
    for key in [
        "missing-next-overlay",
        "download-timeout-secs",
        "on-load-failure",
    ] {
        assert!(
            config.contains(&key.replace('-', "\\-")),
            "nvdriver-agent.toml.5 lacks {key}"
        );
    }
}

/// Validate `instance` against docs/schema/`schema` with python3-jsonschema (Draft 2020-12,
/// the schema itself checked first); the validator's complaints on failure.
fn validate(schema: &str, instance: &Value) -> Result<(), String> {
    let script = r#"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
errors = list(jsonschema.Draft202012Validator(schema).iter_errors(json.load(open(sys.argv[2]))))
for e in errors:
    print(f"{list(e.absolute_path)}: {e.message}")
sys.exit(1 if errors else 0)
"#;
    tools::jsonschema_check(script, &repo("docs/schema").join(schema), instance)
}

/// The JSON a command prints, exiting with one of `codes`.
fn json_of(host: &FakeHost, args: &[&str], codes: &[i32]) -> Value {
    let out = crate::common::agent::run(host.dir.path(), args);
    let code = out.status.code().unwrap_or(-1);
    assert!(codes.contains(&code), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// A host whose store has the overlay of the running kernel, loaded (simulated kernel).
fn loaded_host() -> FakeHost {
    let host = FakeHost::new(KVER);
    let src = tempfile::tempdir().unwrap();
    OverlayBuilder::nvidia(KVER).build(src.path());
    let import = ["overlay", "import", src.path().to_str().unwrap()];
    let out = crate::common::agent::run(host.dir.path(), &import);
    assert!(out.status.success(), "{}", text(&out));
    let out = crate::common::agent::run(host.dir.path(), &["load"]);
    assert!(out.status.success(), "{}", text(&out));
    host
}

fn assert_invalid(schema: &str, instance: &Value, what: &str) {
    assert!(
        validate(schema, instance).is_err(),
        "{schema} accepts {what}: {instance:#}"
    );
}

#[test]
fn status_json_validates_against_its_schema() {
    let host = loaded_host();
    // 7: the fake host has no boot entries, so which kernel boots next cannot be told.
    let status = json_of(&host, &["status", "--json"], &[0, 7]);
    validate("status.schema.json", &status).unwrap();
    assert_eq!(status["store"][0]["kernel-release"], KVER, "{status:#}");

    let mut missing = status.clone();
    missing.as_object_mut().unwrap().remove("running-kernel");
    assert_invalid("status.schema.json", &missing, "a missing running-kernel");
    let mut wrong = status.clone();
    wrong["stage-failures"] = json!("0");
    assert_invalid("status.schema.json", &wrong, "a string stage-failures");
    let mut nested = status.clone();
    nested["policy"]["store-dir"] = json!(["/var/lib/nvdriver-agent/overlays"]);
    assert_invalid("status.schema.json", &nested, "a list as policy.store-dir");
    let mut record = status.clone();
    record["load"] = json!({"at": 1, "kernel-release": KVER, "result": "loaded",
        "driver-version": "570.124.06", "overlay": "/var/lib/nvdriver-agent/overlays", "error": null});
    validate("status.schema.json", &record).unwrap();
    record["load"] = json!({"at": 1, "kernel-release": KVER, "result": "loaded"});
    assert_invalid(
        "status.schema.json",
        &record,
        "a load record without its other fields",
    );
    let mut readiness = status;
    readiness["readiness"] = json!("fine");
    assert_invalid("status.schema.json", &readiness, "an unknown readiness");
}

#[test]
fn plan_json_validates_against_its_schema() {
    let host = loaded_host();
    // Parameters from modprobe.d and the kernel command line, shown with their sources.
    host.write("/etc/modprobe.d/nv.conf", "options nvidia NVreg_A=1 flag\n");
    host.write("/proc/cmdline", "quiet nvidia.NVreg_B=\"x y\"\n");
    let plan = json_of(&host, &["plan", "--json"], &[0]);
    validate("plan.schema.json", &plan).unwrap();
    assert_eq!(
        plan["modules"][0]["parameter_sources"],
        json!([
            {"name": "NVreg_A", "value": "1", "source": "/etc/modprobe.d/nv.conf"},
            {"name": "flag", "value": null, "source": "/etc/modprobe.d/nv.conf"},
            {"name": "NVreg_B", "value": "x y", "source": "/proc/cmdline"},
        ])
    );
    let out = crate::common::agent::run(host.dir.path(), &["plan"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("  parameter:  NVreg_A=1 (from /etc/modprobe.d/nv.conf)\n")
            && shown.contains("  parameter:  flag (from /etc/modprobe.d/nv.conf)\n")
            && shown.contains("  parameter:  NVreg_B=x y (from /proc/cmdline)\n"),
        "{}",
        text(&out)
    );
    let mut source = plan.clone();
    source["modules"][0]["parameter_sources"][0]["source"] = json!(1);
    assert_invalid(
        "plan.schema.json",
        &source,
        "a number as a parameter's source",
    );

    let mut missing = plan.clone();
    missing.as_object_mut().unwrap().remove("driver_root");
    assert_invalid("plan.schema.json", &missing, "a missing driver_root");
    let mut wrong = plan.clone();
    wrong["modules"][0]["signed"] = json!("no");
    assert_invalid("plan.schema.json", &wrong, "a string modules[0].signed");
    let mut action = plan;
    action["modules"][0]["action"] = json!("AlreadyLoaded");
    assert_invalid("plan.schema.json", &action, "a Rust enum name as action");

    // No overlay for the running kernel: the other shape, exit status 3.
    let empty = FakeHost::new(KVER);
    let none = json_of(&empty, &["plan", "--json"], &[3]);
    validate("plan.schema.json", &none).unwrap();
    let mut wrong = none;
    wrong["overlay"] = json!("/somewhere");
    assert_invalid("plan.schema.json", &wrong, "an overlay without a plan");
}
