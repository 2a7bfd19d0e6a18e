//! The NVIDIA Container Toolkit's `config.toml`: point `[nvidia-container-cli] root` at the
//! driver root the agent exposes, and change nothing else.
//!
//! The edit is format-preserving (`toml_edit`): every comment, key, ordering and blank line of
//! the file stays as it was. The shipped files carry a commented-out `#root = "/run/nvidia/driver"`
//! line in the `[nvidia-container-cli]` table; it stays, and the real key is placed right after it
//! so the file still reads as documentation.
//!
//! Pure core, thin edge: [`set_cli_root`] and [`current_cli_root`] work on text;
//! [`plan_cli_root`] and [`apply_cli_root`] read (and write) the file under a [`Root`]. Nothing
//! is written when the value is already right, so the file keeps its bytes and mtime and no
//! container runtime restart is needed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml_edit::visit::{self, Visit};
use toml_edit::visit_mut::{self, VisitMut};
use toml_edit::{DocumentMut, InlineTable, Item, Key, RawString, Table, Value};

use crate::fsutil;
use crate::host::Root;

/// Where the container toolkit reads its configuration on the host.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nvidia-container-runtime/config.toml";

/// The table and key the agent owns.
pub const CLI_TABLE: &str = "nvidia-container-cli";
/// The key in [`CLI_TABLE`] that holds the driver root.
pub const ROOT_KEY: &str = "root";

/// Mode of a config file the agent creates (an existing file keeps its own).
const CONFIG_MODE: u32 = 0o644;
/// Mode of the parent directories the agent creates.
const DIR_MODE: u32 = 0o755;

/// Why the toolkit config could not be read or edited; on every one the file is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The existing file is not valid TOML.
    #[error(
        "{path} is not valid TOML (line {line}, column {column}: {message}); it was left \
         untouched. Fix the syntax, or move the file aside so nvdriver-agent creates a minimal one"
    )]
    InvalidToml {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// 1-based line of the parse error.
        line: usize,
        /// 1-based column of the parse error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// `nvidia-container-cli` exists but is not a table (e.g. a string or an array).
    #[error(
        "{path}: expected `{CLI_TABLE}` to be a table (`[{CLI_TABLE}]`), found {found}; it was left \
         untouched. Make `{CLI_TABLE}` a table so nvdriver-agent can set `{ROOT_KEY}` in it"
    )]
    CliNotTable {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// What it is instead ("a string", "an array", …).
        found: &'static str,
    },
    /// `[nvidia-container-cli] root` exists but is not a string.
    #[error(
        "{path}: expected `[{CLI_TABLE}] {ROOT_KEY}` to be a string (a directory path), found \
         {found}; it was left untouched. Remove or fix that key so nvdriver-agent can set it"
    )]
    RootNotString {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// What it is instead ("an integer", "a table", …).
        found: &'static str,
    },
    /// The driver root to write is not an absolute path.
    #[error(
        "expected the driver root to be an absolute path, found {found:?}; fix the driver root in \
         the nvdriver-agent configuration"
    )]
    InvalidDriverRoot {
        /// The driver root as configured.
        found: String,
    },
    /// The existing file is not UTF-8.
    #[error(
        "{path}: expected UTF-8 text, found invalid bytes; it was left untouched. Fix or move the \
         file aside so nvdriver-agent can edit it"
    )]
    NotUtf8 {
        /// The config file (a path under the root, as read).
        path: PathBuf,
    },
    /// Something other than a regular file (a directory, a device, …) sits at the config path.
    #[error(
        "expected {path} to be a regular file, found {found}; remove it (nvdriver-agent then \
         creates the file) or point the agent's container toolkit config path elsewhere"
    )]
    NotAFile {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// "a directory" or "a special file".
        found: &'static str,
    },
    /// A parent of the config path is a regular file (`ENOTDIR`).
    #[error(
        "expected the parents of {path} to be directories, found a file among them; it was left \
         untouched. Move that file aside or point the agent's container toolkit config path \
         elsewhere"
    )]
    ParentNotDirectory {
        /// The config file (a path under the root, as read).
        path: PathBuf,
    },
    /// The existing file could not be read (other than not existing).
    #[error(
        "cannot read {path}: {error}; expected a readable regular file or nothing at that path"
    )]
    Read {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The parent directories of a new config file could not be created.
    #[error(
        "cannot create directory {path} for the container toolkit config: {error}; make sure \
         it can be created (is a parent a regular file, or the filesystem read-only?)"
    )]
    CreateDir {
        /// The directory that could not be created (under the root).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// The atomic write of the new text failed; the old file is intact.
    #[error(
        "cannot write {path}: {error}; the file is as it was or fully replaced, never half \
         written. Make it writable (is /etc read-only?) or point the agent's container toolkit \
         config path elsewhere"
    )]
    Write {
        /// The config file (a path under the root, as read).
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
}

/// What [`apply_cli_root`] did, or what [`plan_cli_root`] says it would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootChange {
    /// `root` already had the value; the file was not touched.
    Unchanged,
    /// The file existed and `root` was set; `previous` is the old value, if there was one.
    Updated {
        /// The old `root` value; `None` when the key was absent.
        previous: Option<String>,
    },
    /// There was no file; a minimal one was created.
    Created,
}

/// The text of `existing` (or of a new file when `None`) with `[nvidia-container-cli] root` set
/// to `root`; `None` when it already is, so the caller writes nothing. Errors name
/// [`DEFAULT_CONFIG_PATH`]; [`apply_cli_root`] names the real file.
pub fn set_cli_root(existing: Option<&str>, root: &str) -> Result<Option<String>, RuntimeError> {
    set_cli_root_in(Path::new(DEFAULT_CONFIG_PATH), existing, root)
}

/// The current `[nvidia-container-cli] root`, `None` when absent (no table or no key).
pub fn current_cli_root(text: &str) -> Result<Option<String>, RuntimeError> {
    current_cli_root_in(Path::new(DEFAULT_CONFIG_PATH), text)
}

/// Report what [`apply_cli_root`] would do, writing nothing.
pub fn plan_cli_root(
    root: &Root,
    config_host_path: &Path,
    driver_root: &str,
) -> Result<RootChange, RuntimeError> {
    Ok(plan(root, config_host_path, driver_root)?.change)
}

/// Set `[nvidia-container-cli] root = driver_root` in the config file at `config_host_path`
/// (a host path, resolved under `root`), creating the file if it is absent. Writes atomically and
/// only when something changes; an existing file keeps its mode. On any error before the write
/// (bad TOML, wrong types, unreadable file) the file is left byte-identical, and a failed write
/// never leaves it half written.
///
/// A symlink at the path is followed for reading and replaced by a regular file on write, so a
/// link into a read-only `/usr` becomes a local copy and its target is never modified.
pub fn apply_cli_root(
    root: &Root,
    config_host_path: &Path,
    driver_root: &str,
) -> Result<RootChange, RuntimeError> {
    let Plan {
        path,
        change,
        contents,
    } = plan(root, config_host_path, driver_root)?;
    let Some(contents) = contents else {
        tracing::debug!(
            DRIVER_ROOT = driver_root,
            path = %path.display(),
            "container toolkit config already points at the driver root"
        );
        return Ok(change);
    };
    if change == RootChange::Created {
        if let Some(parent) = path.parent() {
            fsutil::create_dir_all_mode(parent, DIR_MODE).map_err(|source| {
                RuntimeError::CreateDir {
                    path: parent.to_path_buf(),
                    error: source,
                }
            })?;
        }
    }
    fsutil::write_atomic(&path, contents.as_bytes(), CONFIG_MODE).map_err(|source| {
        RuntimeError::Write {
            path: path.clone(),
            error: source,
        }
    })?;
    match &change {
        RootChange::Updated { previous } => tracing::info!(
            DRIVER_ROOT = driver_root,
            path = %path.display(),
            previous = previous.as_deref().unwrap_or("(unset)"),
            "pointed the container toolkit at the driver root"
        ),
        _ => tracing::info!(
            DRIVER_ROOT = driver_root,
            path = %path.display(),
            "created the container toolkit config pointing at the driver root"
        ),
    }
    Ok(change)
}

/// The outcome of reading the file: what changes, and the new text when something does.
struct Plan {
    path: PathBuf,
    change: RootChange,
    contents: Option<String>,
}

fn plan(root: &Root, config_host_path: &Path, driver_root: &str) -> Result<Plan, RuntimeError> {
    let path = root.join(config_host_path);
    let existing = read_existing(&path)?;
    let contents = set_cli_root_in(&path, existing.as_deref(), driver_root)?;
    let change = match (&existing, &contents) {
        (None, _) => RootChange::Created,
        (Some(_), None) => RootChange::Unchanged,
        (Some(text), Some(_)) => RootChange::Updated {
            previous: current_cli_root_in(&path, text)?,
        },
    };
    Ok(Plan {
        path,
        change,
        contents,
    })
}

/// The file's text, `None` when nothing is there.
fn read_existing(path: &Path) -> Result<Option<String>, RuntimeError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32) => {
            return Err(RuntimeError::ParentNotDirectory {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(RuntimeError::Read {
                path: path.to_path_buf(),
                error: source,
            })
        }
    };
    if !meta.is_file() {
        let found = if meta.is_dir() {
            "a directory"
        } else {
            "a special file"
        };
        return Err(RuntimeError::NotAFile {
            path: path.to_path_buf(),
            found,
        });
    }
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::InvalidData => Err(RuntimeError::NotUtf8 {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(RuntimeError::Read {
            path: path.to_path_buf(),
            error: source,
        }),
    }
}

/// The text of a config file the agent creates from nothing.
fn new_file(root: &str) -> String {
    let mut table = Table::new();
    table.insert(ROOT_KEY, toml_edit::value(root));
    let mut doc = DocumentMut::new();
    doc.insert(CLI_TABLE, Item::Table(table));
    format!(
        "# Created by nvdriver-agent, which keeps `[{CLI_TABLE}] {ROOT_KEY}` pointing at the\n\
         # NVIDIA driver root it exposes. Every other setting takes the NVIDIA Container\n\
         # Toolkit's default; add any here, nvdriver-agent only ever edits `{ROOT_KEY}`.\n\n{doc}"
    )
}

fn check_driver_root(root: &str) -> Result<(), RuntimeError> {
    if root.starts_with('/') {
        Ok(())
    } else {
        Err(RuntimeError::InvalidDriverRoot {
            found: root.to_string(),
        })
    }
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, RuntimeError> {
    text.parse::<DocumentMut>().map_err(|err| {
        let offset = err.span().map(|span| span.start).unwrap_or(0);
        let (line, column) = crate::text::line_column(text, offset);
        RuntimeError::InvalidToml {
            path: path.to_path_buf(),
            line,
            column,
            message: err.message().trim().to_string(),
        }
    })
}

/// Like [`current_cli_root`], but errors name `path` (the file `text` was read from).
pub fn current_cli_root_in(path: &Path, text: &str) -> Result<Option<String>, RuntimeError> {
    let doc = parse(path, text)?;
    let Some(item) = doc.get(CLI_TABLE) else {
        return Ok(None);
    };
    let table = item.as_table_like().ok_or(RuntimeError::CliNotTable {
        path: path.to_path_buf(),
        found: describe(item),
    })?;
    match table.get(ROOT_KEY) {
        None => Ok(None),
        Some(item) => match item.as_str() {
            Some(value) => Ok(Some(value.to_string())),
            None => Err(RuntimeError::RootNotString {
                path: path.to_path_buf(),
                found: describe(item),
            }),
        },
    }
}

fn set_cli_root_in(
    path: &Path,
    existing: Option<&str>,
    root: &str,
) -> Result<Option<String>, RuntimeError> {
    check_driver_root(root)?;
    let Some(text) = existing else {
        return Ok(Some(new_file(root)));
    };
    let mut doc = parse(path, text)?;
    let changed = match doc.get(CLI_TABLE) {
        None => {
            add_cli_table(&mut doc, root);
            true
        }
        Some(item) if !item.is_table_like() => {
            return Err(RuntimeError::CliNotTable {
                path: path.to_path_buf(),
                found: describe(item),
            })
        }
        Some(_) => set_in_existing_table(path, &mut doc, root)?,
    };
    Ok(changed.then(|| doc.to_string()))
}

/// Append a new `[nvidia-container-cli]` table at the end of the document.
fn add_cli_table(doc: &mut DocumentMut, root: &str) {
    let position = last_position(doc) + 1;
    // The document's trailing comments and blank lines stay where they were, ahead of the new
    // table, which is set off from what precedes it by one blank line.
    let rendered = doc.to_string();
    let separator = if rendered.trim().is_empty() || rendered.ends_with("\n\n") {
        ""
    } else if rendered.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    let prefix = format!("{}{separator}", raw_str(doc.trailing()));
    let mut table = Table::new();
    table.insert(ROOT_KEY, toml_edit::value(root));
    table.set_position(Some(position));
    table.decor_mut().set_prefix(prefix);
    doc.set_trailing("");
    doc.insert(CLI_TABLE, Item::Table(table));
}

/// Set `root` in the existing `nvidia-container-cli` table (a `[header]` table, an implicit one,
/// a dotted-key table or an inline table). Returns whether anything changed.
fn set_in_existing_table(
    path: &Path,
    doc: &mut DocumentMut,
    root: &str,
) -> Result<bool, RuntimeError> {
    // The commented-out `#root = …` line, when the table has a `[header]` and one is found.
    let anchor = match doc.get(CLI_TABLE) {
        Some(Item::Table(table))
            if !table.is_dotted() && !table.is_implicit() && !table.contains_key(ROOT_KEY) =>
        {
            find_commented_root(doc, table)
        }
        _ => None,
    };
    let item = doc
        .get_mut(CLI_TABLE)
        .expect("the caller checked that the table exists");
    let table = item
        .as_table_like_mut()
        .expect("the caller checked that this is a table");
    if let Some(existing) = table.get_mut(ROOT_KEY) {
        let found = describe(existing);
        let value =
            existing
                .as_value_mut()
                .filter(|v| v.is_str())
                .ok_or(RuntimeError::RootNotString {
                    path: path.to_path_buf(),
                    found,
                })?;
        if value.as_str() == Some(root) {
            return Ok(false);
        }
        // Keep whatever surrounds the value (spacing, a trailing comment).
        let decor = value.decor().clone();
        *value = Value::from(root);
        *value.decor_mut() = decor;
        return Ok(true);
    }
    if let Some(anchor) = anchor {
        insert_after_comment(doc, anchor, root);
        return Ok(true);
    }
    match item {
        Item::Value(Value::InlineTable(inline)) => append_to_inline_table(inline, root),
        Item::Table(table) => {
            // A table only implied by `[nvidia-container-cli.sub]` gets its own header now.
            table.set_implicit(false);
            table.insert(ROOT_KEY, toml_edit::value(root));
        }
        _ => unreachable!("the caller checked that this is a table"),
    }
    Ok(true)
}

/// Append `root` to `{ … }`, moving the space before `}` behind the new last value.
fn append_to_inline_table(table: &mut InlineTable, root: &str) {
    let mut value = Value::from(root);
    if let Some((_, last)) = table.iter_mut().last() {
        let suffix = last.decor().suffix().map(raw_str).unwrap_or("").to_string();
        last.decor_mut().set_suffix("");
        value.decor_mut().set_prefix(" ");
        value.decor_mut().set_suffix(suffix);
    }
    table.insert(ROOT_KEY, value);
}

/// Where the commented-out `#root = …` line of the `[nvidia-container-cli]` table sits.
/// `toml_edit` keeps comments in the prefix of what follows them: a key of the table, or, for
/// comments after the table's last key, the next `[header]` (or the end of the document).
#[derive(Debug)]
enum Anchor {
    /// In the prefix of this key of the table; `split` is the byte offset just past the line.
    Key { key: String, split: usize },
    /// In the prefix of the table header at this document position.
    Header { position: isize, split: usize },
    /// In the document's trailing text.
    Trailing { split: usize },
}

fn find_commented_root(doc: &DocumentMut, table: &Table) -> Option<Anchor> {
    for (key, _) in table.iter() {
        let prefix = table
            .key(key)
            .and_then(|k| k.leaf_decor().prefix())
            .map(raw_str)
            .unwrap_or("");
        if let Some(split) = commented_root_end(prefix) {
            return Some(Anchor::Key {
                key: key.to_string(),
                split,
            });
        }
    }
    let mut finder = NextHeader {
        after: table.position()?,
        found: None,
    };
    finder.visit_document(doc);
    match finder.found {
        Some((position, prefix)) => {
            commented_root_end(prefix).map(|split| Anchor::Header { position, split })
        }
        None => commented_root_end(raw_str(doc.trailing())).map(|split| Anchor::Trailing { split }),
    }
}

/// Byte offset just past the first line of `text` that is a commented-out `root = …` key.
fn commented_root_end(text: &str) -> Option<usize> {
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        if let Some(rest) = line.trim_start().strip_prefix('#') {
            if let Some(rest) = rest.trim_start().strip_prefix(ROOT_KEY) {
                if rest.trim_start().starts_with('=') {
                    return Some(end);
                }
            }
        }
        start = end;
    }
    None
}

/// Add `root` to the table right after the commented-out line the anchor names: the text up to
/// and including that line moves in front of the new key, the rest stays in front of whatever
/// followed it.
fn insert_after_comment(doc: &mut DocumentMut, anchor: Anchor, root: &str) {
    let mut new_key = Key::new(ROOT_KEY);
    match anchor {
        Anchor::Key { key, split } => {
            let table = cli_table_mut(doc);
            {
                let mut key_mut = table.key_mut(&key).expect("the anchor key is in the table");
                let prefix = key_mut.leaf_decor().prefix().map(raw_str).unwrap_or("");
                let (before, after) = prefix.split_at(split);
                let (before, after) = (before.to_string(), after.to_string());
                new_key.leaf_decor_mut().set_prefix(before);
                key_mut.leaf_decor_mut().set_prefix(after);
            }
            // Insert before `key`: append the new key, then move `key` and every key after it
            // to the end, in order (removal keeps the others' order and every key's decor).
            let later: Vec<String> = table
                .iter()
                .map(|(k, _)| k.to_string())
                .skip_while(|k| *k != key)
                .collect();
            table.insert_formatted(&new_key, toml_edit::value(root));
            for name in later {
                if let Some((k, item)) = table.remove_entry(&name) {
                    table.insert_formatted(&k, item);
                }
            }
        }
        Anchor::Header { position, split } => {
            let mut splitter = SplitHeaderPrefix {
                position,
                split,
                taken: None,
            };
            splitter.visit_document_mut(doc);
            new_key
                .leaf_decor_mut()
                .set_prefix(splitter.taken.unwrap_or_default());
            cli_table_mut(doc).insert_formatted(&new_key, toml_edit::value(root));
        }
        Anchor::Trailing { split } => {
            let trailing = raw_str(doc.trailing());
            let (before, after) = trailing.split_at(split);
            let (before, after) = (before.to_string(), after.to_string());
            new_key.leaf_decor_mut().set_prefix(before);
            doc.set_trailing(after);
            cli_table_mut(doc).insert_formatted(&new_key, toml_edit::value(root));
        }
    }
}

fn cli_table_mut(doc: &mut DocumentMut) -> &mut Table {
    doc.get_mut(CLI_TABLE)
        .and_then(Item::as_table_mut)
        .expect("an anchor is only found for a [nvidia-container-cli] table")
}

/// Finds the `[header]` table that comes first after document position `after`, and its prefix.
struct NextHeader<'doc> {
    after: isize,
    found: Option<(isize, &'doc str)>,
}

impl<'doc> Visit<'doc> for NextHeader<'doc> {
    fn visit_table(&mut self, node: &'doc Table) {
        if let Some(position) = header_position(node) {
            let closer = self.found.is_none_or(|(best, _)| position < best);
            if position > self.after && closer {
                let prefix = node.decor().prefix().map(raw_str).unwrap_or("");
                self.found = Some((position, prefix));
            }
        }
        visit::visit_table(self, node);
    }
}

/// Cuts the prefix of the `[header]` table at `position`: keeps what follows `split`, hands back
/// what precedes it.
struct SplitHeaderPrefix {
    position: isize,
    split: usize,
    taken: Option<String>,
}

impl VisitMut for SplitHeaderPrefix {
    fn visit_table_mut(&mut self, node: &mut Table) {
        if self.taken.is_none() && header_position(node) == Some(self.position) {
            let prefix = node.decor().prefix().map(raw_str).unwrap_or("");
            let (before, after) = prefix.split_at(self.split.min(prefix.len()));
            let (before, after) = (before.to_string(), after.to_string());
            self.taken = Some(before);
            node.decor_mut().set_prefix(after);
            return;
        }
        visit_mut::visit_table_mut(self, node);
    }
}

/// The document position of a table that is written with its own `[header]` line.
fn header_position(table: &Table) -> Option<isize> {
    if table.is_dotted() || table.is_implicit() {
        None
    } else {
        table.position()
    }
}

/// The largest document position in use (the root table is 0).
fn last_position(doc: &DocumentMut) -> isize {
    struct Last(isize);
    impl<'doc> Visit<'doc> for Last {
        fn visit_table(&mut self, node: &'doc Table) {
            if let Some(position) = node.position() {
                self.0 = self.0.max(position);
            }
            visit::visit_table(self, node);
        }
    }
    let mut last = Last(0);
    last.visit_document(doc);
    last.0
}

/// A parsed document's decor is plain text; anything else (never produced by parsing) reads as
/// empty.
fn raw_str(raw: &RawString) -> &str {
    raw.as_str().unwrap_or("")
}

/// "a string", "an integer", … for error messages.
fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(Value::String(_)) => "a string",
        Item::Value(Value::Integer(_)) => "an integer",
        Item::Value(Value::Float(_)) => "a float",
        Item::Value(Value::Boolean(_)) => "a boolean",
        Item::Value(Value::Datetime(_)) => "a date-time",
        Item::Value(Value::Array(_)) => "an array",
        Item::Value(Value::InlineTable(_)) => "an inline table",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables (`[[...]]`)",
    }
}

#[cfg(test)]
mod tests;
