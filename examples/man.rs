//! Writes the man pages: `nvdriver-agent.8`, one `nvdriver-agent-<subcommand>.8` per
//! subcommand (from the clap tree, `nvdriver_agent::cli::Cli`, with clap_mangen) and
//! `nvdriver-agent.toml.5` (from the comments and defaults of dist/config.toml).
//!
//! ```text
//! cargo run --example man -- target/man   # the pages to read: man ./target/man/nvdriver-agent.8
//! cargo run --example man -- docs/man     # refresh the committed pages the packages install
//! ```
//!
//! An example rather than a hidden subcommand: clap_mangen and the page text stay out of the
//! shipped binary (a dev-dependency only), and the packages install the committed docs/man/
//! pages, so building them needs no generator run. tests/it/cli_docs.rs includes this file to check
//! that docs/man/ is what it writes now.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

/// The manual every page belongs to (the centre of its footer).
const MANUAL: &str = "nvdriver-agent";

/// Every page, as (file name, roff text).
pub fn pages() -> Vec<(String, String)> {
    let mut cmd = nvdriver_agent::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    command_pages(&cmd, None, &mut out);
    out.push(("nvdriver-agent.toml.5".to_string(), config_page()));
    out.sort();
    out
}

/// The page of `cmd` and of each of its visible subcommands, section 8 (a system daemon and
/// its administration commands).
fn command_pages(cmd: &clap::Command, parent: Option<&str>, out: &mut Vec<(String, String)>) {
    let page_name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        command_pages(sub, Some(page_name), out);
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .source(format!("nvdriver-agent {}", env!("CARGO_PKG_VERSION")))
        .manual(MANUAL);
    let mut text = Vec::new();
    man.render(&mut text).expect("render into memory");
    let mut text = String::from_utf8(text).expect("roff is UTF-8");
    let name = man.get_filename();
    let mut see_also: Vec<String> = Vec::new();
    if let Some(parent) = parent {
        see_also.push(format!("{parent}(8)"));
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = sub.get_display_name().unwrap_or_else(|| sub.get_name());
        see_also.push(format!("{sub_name}(8)"));
    }
    see_also.push("nvdriver-agent.toml(5)".into());
    text.push_str(".SH \"SEE ALSO\"\n");
    text.push_str(
        &see_also
            .iter()
            .map(|s| bold_ref(s))
            .collect::<Vec<_>>()
            .join(",\n"),
    );
    text.push('\n');
    out.push((name, text));
}

/// `name(8)` as a bold name and its section, as man pages cite each other.
fn bold_ref(reference: &str) -> String {
    let (name, section) = reference.split_once('(').expect("name(section)");
    format!("\\fB{}\\fR({section}", escape(name))
}

/// Text safe in a roff line: backslashes doubled as `\e`, hyphens as `\-` (so they copy as
/// ASCII hyphens), a leading `.` or `'` kept from being read as a request.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// The text of dist/config.toml, the built-in defaults.
const DEFAULT_CONFIG: &str = include_str!("../dist/config.toml");

/// `nvdriver-agent.toml(5)`: how the files are layered (as docs/usage/configuration.md says),
/// then every table and key of dist/config.toml with its comment and default, so the page
/// cannot drift from the defaults the agent is built with.
fn config_page() -> String {
    let mut page = String::new();
    let version = env!("CARGO_PKG_VERSION");
    page.push_str(&format!(
        ".TH NVDRIVER-AGENT.TOML 5 \"\" \"nvdriver-agent {version}\" \"{MANUAL}\"\n"
    ));
    page.push_str(CONFIG_INTRO);
    let mut comment: Vec<&str> = Vec::new();
    for line in DEFAULT_CONFIG.lines() {
        let line = line.trim();
        if let Some(text) = line.strip_prefix('#') {
            comment.push(text.strip_prefix(' ').unwrap_or(text));
        } else if line.is_empty() {
            // The file's opening comment is the page's introduction, written above.
            comment.clear();
        } else if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            page.push_str(&format!(".SS \"[{}]\"\n", escape(table)));
            paragraph(&mut page, &comment);
            comment.clear();
        } else if let Some((key, value)) = line.split_once('=') {
            page.push_str(&format!(
                ".TP\n\\fB{}\\fR = {}\n",
                escape(key.trim()),
                escape(value.trim())
            ));
            paragraph(&mut page, &comment);
            comment.clear();
        }
    }
    page.push_str(CONFIG_OUTRO);
    page
}

/// Comment lines as roff: examples (indented lines, TOML tables and `key = value` lines) keep
/// their lines; the rest fills.
fn paragraph(page: &mut String, lines: &[&str]) {
    let mut literal = false;
    for line in lines {
        let toml_key = line
            .split_once(" = ")
            .is_some_and(|(key, _)| !key.is_empty() && !key.contains(' '));
        let keep = line.starts_with(' ') || line.starts_with('[') || toml_key;
        if keep && !literal {
            page.push_str(".nf\n");
        } else if !keep && literal {
            page.push_str(".fi\n");
        }
        literal = keep;
        page.push_str(&escape(line));
        page.push('\n');
    }
    if literal {
        page.push_str(".fi\n");
    }
}

const CONFIG_INTRO: &str = r#".SH NAME
nvdriver\-agent.toml \- configuration of nvdriver\-agent
.SH SYNOPSIS
/usr/lib/nvdriver\-agent/config.toml
.br
/etc/nvdriver\-agent/config.toml
.br
/etc/nvdriver\-agent/config.d/*.toml
.SH DESCRIPTION
\fBnvdriver\-agent\fR(8) reads its configuration in this order, later keys winning: the
built\-in defaults, /usr/lib/nvdriver\-agent/config.toml (the defaults as the package ships them;
do not edit it), /etc/nvdriver\-agent/config.toml, then the drop\-ins
/etc/nvdriver\-agent/config.d/*.toml in lexical order. Tables merge key by key; a list replaces
the earlier list. An unknown key or a wrong type is an error naming the file, line and key.
.PP
All paths are absolute host paths (resolved under \fB\-\-root\fR). \fB\-\-config\fR \fIFILE\fR
replaces the layered files with that one file (read after the built\-in defaults).
.PP
The files are TOML. The tables and keys below are shown with their defaults.
.SH OPTIONS
"#;

const CONFIG_OUTRO: &str = r#".SH FILES
.TP
/etc/nvdriver\-agent/keys.d/*.pub
minisign public keys that overlay signatures are checked against (\fB[trust]\fR).
.TP
/etc/nvdriver\-agent/auth.json
registry credentials for oci:// sources, in the containers auth.json format (\fB[oci]\fR).
.SH "SEE ALSO"
\fBnvdriver\-agent\fR(8),
\fBnvdriver\-agent\-plan\fR(8),
\fBnvdriver\-agent\-stage\fR(8),
\fBnvdriver\-agent\-status\fR(8)
"#;

/// Writes every page into `dir` (created), replacing what is there.
pub fn write_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, text) in pages() {
        let path = dir.join(name);
        let mut file = std::fs::File::create(&path)?;
        file.write_all(text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[allow(dead_code)] // tests/it/cli_docs.rs includes this file for `pages` alone.
fn main() -> std::process::ExitCode {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from("target/man"),
    };
    match write_pages(&dir) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("man: cannot write the pages into {}: {e}", dir.display());
            std::process::ExitCode::FAILURE
        }
    }
}
