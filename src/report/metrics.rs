//! Files the agent keeps up to date for others, made from one [`StatusReport`]: the Prometheus
//! text file for node_exporter's textfile collector and Node Feature Discovery's local feature
//! file. Rendering is pure; [`publish`] writes each atomically (temporary sibling + rename), and
//! only when its directory exists, so a host without that consumer is left alone.

use std::fmt::Write;
use std::path::PathBuf;

use crate::config::OutputSettings;
use crate::handoff::output_file::{write_if_dir_exists, OutputError};
use crate::host::Root;
use crate::report::status::{Readiness, StatusReport};

/// The Prometheus text exposition of a report.
pub fn metrics_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, labels: &[(&str, &str)], value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect::<Vec<_>>()
            .join(",");
        let labels = if labels.is_empty() {
            labels
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}{labels} {value}");
    };
    let bool_value = |b: bool| if b { 1.0 } else { 0.0 };
    let pending = report.pending.as_ref().map(|n| n.kernel_release.as_str());
    metric(
        "nvdriver_agent_info",
        "gauge",
        "The running kernel, the loaded driver and the kernel booted next (empty when none).",
        &[
            ("running_kernel", &report.running_kernel),
            (
                "driver_version",
                report.loaded_driver.as_deref().unwrap_or_default(),
            ),
            ("pending_kernel", pending.unwrap_or_default()),
        ],
        1.0,
    );
    metric(
        "nvdriver_agent_driver_loaded",
        "gauge",
        "Whether the NVIDIA driver is loaded for the running kernel.",
        &[],
        bool_value(report.loaded_driver.is_some()),
    );
    metric(
        "nvdriver_agent_ready",
        "gauge",
        "Whether the node is ready for GPU work now (driver loaded, not marked not ready).",
        &[],
        bool_value(report.readiness.ready_now()),
    );
    metric(
        "nvdriver_agent_no_gpu",
        "gauge",
        "Whether the boot load found no NVIDIA GPU on this host (nvidia's init returned ENODEV).",
        &[],
        bool_value(report.readiness == Readiness::NoGpu),
    );
    metric(
        "nvdriver_agent_update_pending",
        "gauge",
        "Whether the host boots a different kernel next.",
        &[],
        bool_value(pending.is_some()),
    );
    metric(
        "nvdriver_agent_pending_overlay_staged",
        "gauge",
        "Whether the overlay for the pending kernel is staged (0 when no update is pending).",
        &[],
        bool_value(report.pending_staged == Some(true)),
    );
    metric(
        "nvdriver_agent_next_boot_ready",
        "gauge",
        "Whether the next boot will have its driver (ready now and after the next reboot).",
        &[],
        bool_value(report.readiness == Readiness::Ready),
    );
    metric(
        "nvdriver_agent_update_held",
        "gauge",
        "Whether the agent holds a kernel update back until its overlay is staged (a lever in force).",
        &[],
        bool_value(update_held(report)),
    );
    let let_through = report.hold_released.as_ref();
    metric(
        "nvdriver_agent_hold_let_through",
        "gauge",
        "Whether a held update was let through without its overlay (by: administrator = hold release, deadline = policy.hold-max-hours).",
        &[("by", let_through.map(|r| r.by.as_str()).unwrap_or("none"))],
        bool_value(let_through.is_some()),
    );
    metric(
        "nvdriver_agent_stage_failures_total",
        "counter",
        "Stages in this boot that found an overlay they could not use or failed to fetch.",
        &[],
        report.stage_failures as f64,
    );
    if let Some(stage) = &report.last_stage {
        metric(
            "nvdriver_agent_last_stage_duration_seconds",
            "gauge",
            "How long the last stage for the pending kernel took.",
            &[],
            stage.duration_ms as f64 / 1000.0,
        );
        metric(
            "nvdriver_agent_last_stage_timestamp_seconds",
            "gauge",
            "When the last stage for the pending kernel ran (Unix time).",
            &[],
            stage.at as f64,
        );
    }
    out
}

/// Prometheus label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Whether some hold lever is in force now (a record alone is not a hold).
fn update_held(report: &StatusReport) -> bool {
    report.hold_levers.iter().any(|l| l.in_force)
}

/// NFD's local feature file: `name=value` lines, each a node label
/// `feature.node.kubernetes.io/nvdriver-agent.<name>`.
pub fn nfd_features(report: &StatusReport) -> String {
    let mut out = String::from("# Written by nvdriver-agent; rewritten on every change.\n");
    let bool_str = |b: bool| if b { "true" } else { "false" };
    if let Some(version) = &report.loaded_driver {
        let _ = writeln!(
            out,
            "nvdriver-agent.driver-version={}",
            label_value(version)
        );
    }
    let _ = writeln!(
        out,
        "nvdriver-agent.ready={}",
        bool_str(report.readiness.ready_now())
    );
    if report.readiness == Readiness::NoGpu {
        out.push_str("nvdriver-agent.no-gpu=true\n");
    }
    let _ = writeln!(
        out,
        "nvdriver-agent.next-boot-ready={}",
        bool_str(report.readiness == Readiness::Ready)
    );
    let _ = writeln!(
        out,
        "nvdriver-agent.staged-for-next-kernel={}",
        bool_str(report.pending.is_none() || report.pending_staged == Some(true))
    );
    let _ = writeln!(
        out,
        "nvdriver-agent.update-held={}",
        bool_str(update_held(report))
    );
    out
}

/// A Kubernetes label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Write every configured output whose directory exists; returns the files written.
pub fn publish(
    root: &Root,
    outputs: &OutputSettings,
    report: &StatusReport,
) -> Result<Vec<PathBuf>, OutputError> {
    let mut written = Vec::new();
    let files = [
        ("metrics", outputs.metrics.as_ref(), metrics_text(report)),
        (
            "nfd-features",
            outputs.nfd_features.as_ref(),
            nfd_features(report),
        ),
    ];
    for (key, host_path, text) in files {
        let Some(host_path) = host_path else { continue };
        if write_if_dir_exists(root, host_path, key, text.as_bytes())? {
            written.push(host_path.clone());
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_kubernetes_labels_cleaned() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label_value("570.133.20"), "570.133.20");
        assert_eq!(label_value("570.1+custom"), "570.1_custom");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"9".repeat(80)).len(), 63);
    }
}
