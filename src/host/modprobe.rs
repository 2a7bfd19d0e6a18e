//! modprobe's own configuration, read as kmod reads it: `options`, `softdep` and `blacklist`
//! lines of the `modprobe.d` directories, and `module.param=value` / `modprobe.blacklist=` from
//! the kernel command line. The agent loads the overlay's modules with `finit_module`, not with
//! `modprobe`, so it applies what `modprobe` would have applied itself.
//!
//! Upstream: kmod `libkmod/libkmod.c` (`default_config_paths`), `libkmod/libkmod-config.c`
//! (`kmod_config_new`, `conf_files_list`, `conf_files_filter_out`, `conf_files_insert_sorted`,
//! `kmod_config_parse`, `kmod_config_add_softdep`, `kmod_config_parse_kcmdline`,
//! `kcmdline_parse_result`); the kernel's `lib/cmdline.c` `next_arg()` for how a module's
//! parameter string is split.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::kernel::normalize_module_name;
use super::{HostError, Root};

/// Where kmod looks for configuration, most important first (`default_config_paths` in
/// `libkmod/libkmod.c`; `/usr/lib/modprobe.d` is its `DISTCONFDIR` on every distribution the
/// agent supports). A file name in an earlier directory hides the same name in later ones.
pub const MODPROBE_DIRS: [&str; 5] = [
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
];

/// Host path of the kernel command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// The name depmod's `modules.softdep` (the modules' own `softdep=`) has among the
/// `modprobe.d` files: kmod sorts it in with them by name (`kmod_config_new`), and the first
/// `softdep` line that matches a module is the one used.
pub const MODULES_SOFTDEP: &str = "modules.softdep";

/// An `options <module> …` line, or a `<module>.<param>=…` word of the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleOptions {
    /// The module (underscores, as kmod's `underscores()` spells it).
    pub module: String,
    /// The options as written (quotes kept): what `modprobe` hands the kernel.
    pub options: String,
    /// Where it came from: the file's host path, or [`PROC_CMDLINE`].
    pub source: String,
}

/// A `softdep <module> pre: … post: …` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Softdep {
    /// The module, a shell glob as kmod matches it with `fnmatch()` (underscores).
    pub pattern: String,
    /// Modules `modprobe` loads before it, as written.
    pub pre: Vec<String>,
    /// Modules `modprobe` loads after it, as written.
    pub post: Vec<String>,
    /// The file's name, the key kmod sorts the files by ([`MODULES_SOFTDEP`] for a module's own).
    pub file_name: String,
    /// Where it came from (a host path, or `softdep= of <module>`).
    pub source: String,
}

/// What `modprobe` would read before loading a module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModprobeConfig {
    /// In kmod's order: the files (sorted by name), then the kernel command line.
    pub options: Vec<ModuleOptions>,
    /// In the files' order (sorted by name).
    pub softdeps: Vec<Softdep>,
    /// `modprobe.blacklist=` of the kernel command line (underscores).
    pub cmdline_blacklist: BTreeSet<String>,
    /// The kernel's own `module_blacklist=` (kernel/module/main.c `blacklisted()`): the kernel
    /// refuses these whoever loads them.
    pub kernel_blacklist: BTreeSet<String>,
}

impl ModprobeConfig {
    /// Read the `modprobe.d` directories and [`PROC_CMDLINE`] under `root`. Missing files and
    /// directories count as empty; one that exists and cannot be read is an error.
    pub fn read(root: &Root) -> Result<Self, HostError> {
        let mut config = ModprobeConfig::default();
        for (name, host_path) in config_files(root)? {
            let path = root.join(&host_path);
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                // kmod skips a file it cannot open (`kmod_config_new`); a vanished one is that.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(HostError::Read { path, error }),
            };
            config.add_file(&name, &host_path.to_string_lossy(), &text);
        }
        let cmdline = match fs::read_to_string(root.join(PROC_CMDLINE)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(HostError::Read {
                    path: root.join(PROC_CMDLINE),
                    error,
                })
            }
        };
        config.add_cmdline(&cmdline);
        Ok(config)
    }

    /// Add one `modprobe.d` file's lines (`kmod_config_parse`): `options` and `softdep` lines
    /// are kept; every other command is not the agent's business.
    pub fn add_file(&mut self, file_name: &str, source: &str, text: &str) {
        for line in logical_lines(text) {
            // kmod: a line is a comment only when `#` is its very first character.
            if line.starts_with('#') {
                continue;
            }
            let mut words = line.trim_start_matches([' ', '\t']);
            let Some(command) = next_word(&mut words) else {
                continue;
            };
            let Some(module) = next_word(&mut words) else {
                continue;
            };
            // The rest of the line after one separator, as `strtok_r(NULL, "\0")` leaves it.
            let rest = words.trim();
            if rest.is_empty() {
                continue;
            }
            let module = normalize_module_name(module);
            match command {
                "options" => self.options.push(ModuleOptions {
                    module,
                    options: rest.to_string(),
                    source: source.to_string(),
                }),
                "softdep" => self
                    .softdeps
                    .push(parse_softdep(&module, rest, file_name, source)),
                _ => {}
            }
        }
    }

    /// Add what the kernel command line says to modprobe (after the files, as kmod does).
    pub fn add_cmdline(&mut self, cmdline: &str) {
        for (module, option) in parse_kcmdline(cmdline) {
            // kcmdline_parse_result: `modprobe.blacklist=a,b` blacklists; the rest are options.
            if module == "modprobe" {
                if let Some(list) = option.strip_prefix("blacklist=") {
                    self.cmdline_blacklist.extend(
                        list.split(',')
                            .filter(|m| !m.is_empty())
                            .map(normalize_module_name),
                    );
                    continue;
                }
            }
            self.options.push(ModuleOptions {
                module: normalize_module_name(&module),
                options: option,
                source: PROC_CMDLINE.to_string(),
            });
        }
        // The kernel's own parameter: a charp, so the last one on the line counts.
        let mut rest = cmdline.trim_start();
        let mut kernel_blacklist = None;
        while !rest.is_empty() {
            let (param, value, next) = next_arg(rest);
            if param == "module_blacklist" {
                kernel_blacklist = value;
            }
            rest = next;
        }
        if let Some(list) = kernel_blacklist {
            self.kernel_blacklist = list
                .split(',')
                .filter(|m| !m.is_empty())
                .map(normalize_module_name)
                .collect();
        }
    }

    /// The options for `module` in kmod's order, each with its source
    /// (`kmod_module_get_options`: every `options` line naming it, concatenated).
    pub fn options_for(&self, module: &str) -> impl Iterator<Item = &ModuleOptions> {
        let module = normalize_module_name(module);
        self.options.iter().filter(move |o| o.module == module)
    }

    /// The softdep that applies to `module` (`kmod_module_get_softdeps`: the first matching
    /// line of the files and of `modules.softdep`, sorted together by file name). `own` is the
    /// module's own `softdep=`, which depmod writes to `modules.softdep`.
    pub fn softdep_for<'a>(
        &'a self,
        module: &str,
        own: Option<&'a Softdep>,
    ) -> Option<&'a Softdep> {
        let module = normalize_module_name(module);
        let before = |s: &&Softdep| s.file_name.as_str() < MODULES_SOFTDEP;
        let matching = |s: &&'a Softdep| glob_match(&s.pattern, &module);
        self.softdeps
            .iter()
            .filter(before)
            .find(matching)
            .or(own)
            .or_else(|| self.softdeps.iter().filter(|s| !before(s)).find(matching))
    }
}

/// The `.conf` files of [`MODPROBE_DIRS`] under `root` as kmod lists them
/// (`conf_files_list`): names not starting with `.`, ending in `.conf`, not directories; a
/// name already seen in an earlier directory is ignored; all of them sorted by name (byte
/// order, `strcmp`), whatever directory each is in. Returns (name, host path).
pub fn config_files(root: &Root) -> Result<Vec<(String, PathBuf)>, HostError> {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in MODPROBE_DIRS {
        let entries = match fs::read_dir(root.join(dir)) {
            Ok(entries) => entries,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(error) => {
                return Err(HostError::Read {
                    path: root.join(dir),
                    error,
                })
            }
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name.len() < 6 || !name.ends_with(".conf") {
                continue;
            }
            if fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            files
                .entry(name.clone())
                .or_insert_with(|| Path::new(dir).join(&name));
        }
    }
    Ok(files.into_iter().collect())
}

/// The file's lines as kmod's `freadline_wrapped` (shared/util.c) returns them: a backslash
/// before a newline joins the next line; before any other character it is dropped and the
/// character kept.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\n' => lines.push(std::mem::take(&mut current)),
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(next) => current.push(next),
            },
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// The next word separated by spaces or tabs (`strtok_r(…, "\t ")`), advancing `rest` past it
/// and the one separator after it.
fn next_word<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let text = rest.trim_start_matches([' ', '\t']);
    if text.is_empty() {
        return None;
    }
    let end = text.find([' ', '\t']).unwrap_or(text.len());
    let (word, tail) = text.split_at(end);
    *rest = tail.get(1..).unwrap_or("");
    Some(word)
}

/// A softdep's `pre: a b post: c` (`kmod_config_add_softdep`): words split on whitespace only
/// (a comma is part of a name, so NVIDIA's `pre: ecdh_generic,ecdsa_generic` names one module
/// that does not exist, which `modprobe` skips); `pre:` and `post:` switch lists; words before
/// either are ignored.
pub fn parse_softdep(module: &str, text: &str, file_name: &str, source: &str) -> Softdep {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    let mut list: Option<&mut Vec<String>> = None;
    for word in text.split_ascii_whitespace() {
        match word {
            "pre:" => list = Some(&mut pre),
            "post:" => list = Some(&mut post),
            word => {
                if let Some(list) = list.as_mut() {
                    list.push(word.to_string());
                }
            }
        }
    }
    Softdep {
        pattern: normalize_module_name(module),
        pre,
        post,
        file_name: file_name.to_string(),
        source: source.to_string(),
    }
}

/// `fnmatch()` without flags, for the `*`, `?` and `[…]` kmod's softdep patterns may use.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some(b'?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some(b'[') => {
                let Some(close) = p.iter().skip(2).position(|&b| b == b']').map(|i| i + 2) else {
                    return n.first() == Some(&b'[') && go(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let set = &p[1..close];
                let (negate, set) = match set.first() {
                    Some(b'!' | b'^') => (true, &set[1..]),
                    _ => (false, set),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == b'-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != negate && go(&p[close + 1..], &n[1..])
            }
            Some(&b) => n.first() == Some(&b) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// `module.option` words of the kernel command line, as kmod's `kmod_config_parse_kcmdline`
/// reads them: (module as written, `param=value` with quotes kept). Its state machine,
/// ported: a word whose module part has `=` or a second `.` in its parameter is not one; a
/// value may be quoted (`nvidia.p="a b"`); a word quoted whole by a boot loader
/// (`"nvidia.p=a b"`) is re-quoted around the value (`p="a b"`), as kmod does.
pub fn parse_kcmdline(cmdline: &str) -> Vec<(String, String)> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum State {
        Ignore,
        Modname,
        Param,
        Value,
    }
    let b = cmdline.as_bytes();
    let mut out = Vec::new();
    let mut state = State::Modname;
    let (mut modname, mut modname_end, mut param, mut value) = (0, 0, 0, None::<usize>);
    let mut quote_start: Option<usize> = None;
    let mut quoted = false;
    for i in 0..=b.len() {
        let c = b.get(i).copied().unwrap_or(0);
        let mut complete = false;
        match c {
            b'"' => {
                quoted = !quoted;
                if quoted && state == State::Modname && i == modname {
                    quote_start = Some(i);
                    modname = i + 1;
                } else if state != State::Value {
                    state = State::Ignore;
                }
            }
            0 | b' ' | b'\n' | b'\t' | 0x0b | 0x0c | b'\r' => {
                if quoted && state == State::Value {
                } else if quoted {
                    state = State::Ignore;
                } else if matches!(state, State::Value | State::Param) {
                    complete = true;
                } else {
                    modname = i + 1;
                    state = State::Modname;
                    quote_start = None;
                }
            }
            b'.' if state == State::Modname => {
                modname_end = i;
                param = i + 1;
                value = None;
                state = State::Param;
            }
            b'.' if state == State::Param => state = State::Ignore,
            b'=' if state == State::Param => {
                value = Some(i + 1);
                state = State::Value;
            }
            b'=' if state == State::Modname => state = State::Ignore,
            _ => {}
        }
        if complete {
            let module = cmdline[modname..modname_end].to_string();
            let option = match (quote_start, value) {
                (Some(_), Some(value)) => {
                    format!("{}\"{}", &cmdline[param..value], &cmdline[value..i])
                }
                _ => cmdline[param..i].to_string(),
            };
            if !module.is_empty() && !option.is_empty() {
                out.push((module, option));
            }
            modname = i + 1;
            state = State::Modname;
            quote_start = None;
        }
    }
    out
}

/// The kernel's `next_arg()` (lib/cmdline.c, and kernel/params.c before it): the first
/// `param[=value]` of `args`, quotes around the value (or the whole word) removed; returns
/// (param, value, the rest with leading spaces skipped). A value cannot contain a `"`.
pub fn next_arg(args: &str) -> (&str, Option<&str>, &str) {
    let (args, mut in_quote, quoted) = match args.strip_prefix('"') {
        Some(rest) => (rest, true, true),
        None => (args, false, false),
    };
    let b = args.as_bytes();
    let mut i = 0;
    let mut equals = None;
    while i < b.len() {
        if b[i].is_ascii_whitespace() && !in_quote {
            break;
        }
        if equals.is_none() && b[i] == b'=' {
            equals = Some(i);
        }
        if b[i] == b'"' {
            in_quote = !in_quote;
        }
        i += 1;
    }
    let mut word = &args[..i];
    let rest = args.get(i + 1..).unwrap_or("").trim_start();
    let (param, value) = match equals {
        None => {
            if quoted {
                word = word.strip_suffix('"').unwrap_or(word);
            }
            (word, None)
        }
        Some(eq) => {
            let mut value = &word[eq + 1..];
            if let Some(v) = value.strip_prefix('"') {
                value = v.strip_suffix('"').unwrap_or(v);
            } else if quoted {
                value = value.strip_suffix('"').unwrap_or(value);
            }
            (&word[..eq], Some(value))
        }
    };
    (param, value, rest)
}

/// A module's parameter string split as the kernel splits it (`parse_args` → `next_arg`):
/// (name, value) pairs in order.
pub fn split_params(options: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = options.trim_start();
    while !rest.is_empty() {
        let (param, value, next) = next_arg(rest);
        out.push((param.to_string(), value.map(str::to_string)));
        rest = next;
    }
    out
}

/// `name=value` as the kernel's `next_arg()` reads it back: the value quoted when it has
/// whitespace.
pub fn quote_param(name: &str, value: &str) -> String {
    if value.chars().any(|c| c.is_ascii_whitespace()) {
        format!("{name}=\"{value}\"")
    } else {
        format!("{name}={value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Root, path: &str, text: &str) {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn files_sorted_by_name_across_dirs_and_etc_hides_usr() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        write(
            &root,
            "/usr/lib/modprobe.d/nvidia.conf",
            "options nvidia A=usr\n",
        );
        write(
            &root,
            "/etc/modprobe.d/nvidia.conf",
            "options nvidia A=etc\n",
        );
        write(
            &root,
            "/usr/lib/modprobe.d/10-first.conf",
            "options nvidia B=1\n",
        );
        write(
            &root,
            "/run/modprobe.d/zz-last.conf",
            "options nvidia C=1\n",
        );
        write(
            &root,
            "/etc/modprobe.d/.hidden.conf",
            "options nvidia D=1\n",
        );
        write(&root, "/etc/modprobe.d/notes.txt", "options nvidia E=1\n");
        write(&root, "/lib/modprobe.d/.conf", "options nvidia F=1\n");
        fs::create_dir_all(root.join("/etc/modprobe.d/dir.conf")).unwrap();
        write(
            &root,
            PROC_CMDLINE,
            "BOOT_IMAGE=/vmlinuz nvidia.G=cmd quiet\n",
        );
        let config = ModprobeConfig::read(&root).unwrap();
        let got: Vec<_> = config
            .options_for("nvidia")
            .map(|o| (o.options.as_str(), o.source.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("B=1", "/usr/lib/modprobe.d/10-first.conf"),
                ("A=etc", "/etc/modprobe.d/nvidia.conf"),
                ("C=1", "/run/modprobe.d/zz-last.conf"),
                ("G=cmd", PROC_CMDLINE),
            ]
        );
    }

    #[test]
    fn file_lines_as_kmod_parses_them() {
        let mut config = ModprobeConfig::default();
        config.add_file(
            "x.conf",
            "/etc/modprobe.d/x.conf",
            "# options nvidia commented=1\n\
             options nvidia-drm modeset=1 fbdev=1\n\
             options\tnvidia  NVreg_A=\"a b\" \\\n  NVreg_B=2\n\
             options nvidia\n\
             blacklist nvidia\n\
             softdep nvidia pre: ecdh_generic,ecdsa_generic post: nvidia-uvm\n",
        );
        let opts: Vec<_> = config
            .options
            .iter()
            .map(|o| (o.module.as_str(), o.options.as_str()))
            .collect();
        assert_eq!(
            opts,
            [
                ("nvidia_drm", "modeset=1 fbdev=1"),
                ("nvidia", "NVreg_A=\"a b\"   NVreg_B=2"),
            ]
        );
        assert_eq!(config.softdeps.len(), 1);
        assert_eq!(config.softdeps[0].pre, ["ecdh_generic,ecdsa_generic"]);
        assert_eq!(config.softdeps[0].post, ["nvidia-uvm"]);
    }

    #[test]
    fn softdep_words() {
        let s = parse_softdep("m", "x pre: a  b post: c pre: d", "f", "src");
        assert_eq!(s.pre, ["a", "b", "d"]);
        assert_eq!(s.post, ["c"]);
        let s = parse_softdep("m", "pre:a post:", "f", "src");
        assert!(s.pre.is_empty() && s.post.is_empty(), "{s:?}");
    }

    #[test]
    fn softdep_precedence_first_match_by_file_name() {
        let mut config = ModprobeConfig::default();
        config.add_file(
            "nvidia.conf",
            "/etc/modprobe.d/nvidia.conf",
            "softdep nvidia pre: late\n",
        );
        let own = parse_softdep("nvidia", "pre: own", MODULES_SOFTDEP, "softdep= of nvidia");
        // "nvidia.conf" sorts after "modules.softdep": the module's own softdep wins.
        assert_eq!(
            config.softdep_for("nvidia", Some(&own)).unwrap().pre,
            ["own"]
        );
        config.add_file(
            "50-nv.conf",
            "/etc/modprobe.d/50-nv.conf",
            "softdep nvidia* pre: early\n",
        );
        config
            .softdeps
            .sort_by(|a, b| a.file_name.cmp(&b.file_name));
        assert_eq!(
            config.softdep_for("nvidia", Some(&own)).unwrap().pre,
            ["early"]
        );
        assert_eq!(
            config.softdep_for("nvidia-uvm", None).unwrap().pre,
            ["early"]
        );
        assert!(config.softdep_for("nouveau", None).is_none());
    }

    #[test]
    fn globs() {
        assert!(glob_match("nvidia*", "nvidia_uvm"));
        assert!(glob_match("nvidia_?vm", "nvidia_uvm"));
        assert!(glob_match("nvidia_[a-v]vm", "nvidia_uvm"));
        assert!(!glob_match("nvidia_[!u]vm", "nvidia_uvm"));
        assert!(!glob_match("nvidia", "nvidia_uvm"));
    }

    #[test]
    fn kcmdline_words() {
        let got = parse_kcmdline(
            "BOOT_IMAGE=/vmlinuz-6.1 root=UUID=x rd.driver.blacklist=nouveau nvidia.NVreg_A=1 \
             nvidia-drm.modeset=1 nvidia.NVreg_B=\"a b\" \"nvidia.NVreg_C=c d\" nvidia.flag \
             modprobe.blacklist=nouveau,nvidia_drm quiet",
        );
        let got: Vec<_> = got.iter().map(|(m, o)| (m.as_str(), o.as_str())).collect();
        assert_eq!(
            got,
            [
                ("nvidia", "NVreg_A=1"),
                ("nvidia-drm", "modeset=1"),
                ("nvidia", "NVreg_B=\"a b\""),
                ("nvidia", "NVreg_C=\"c d\""),
                ("nvidia", "flag"),
                ("modprobe", "blacklist=nouveau,nvidia_drm"),
            ]
        );
    }

    #[test]
    fn cmdline_blacklists() {
        let mut config = ModprobeConfig::default();
        config.add_cmdline(
            "modprobe.blacklist=nouveau,nvidia-drm module_blacklist=a module_blacklist=nvidia_uvm\n",
        );
        assert_eq!(
            config.cmdline_blacklist,
            BTreeSet::from(["nouveau".to_string(), "nvidia_drm".to_string()])
        );
        assert_eq!(
            config.kernel_blacklist,
            BTreeSet::from(["nvidia_uvm".to_string()])
        );
        assert!(config.options.is_empty(), "{:?}", config.options);
    }

    #[test]
    fn params_split_as_the_kernel_does() {
        let got = split_params("  NVreg_A=1 NVreg_B=\"a b\"  \"NVreg_C=c d\" flag NVreg_D=");
        let want: Vec<(String, Option<String>)> = vec![
            ("NVreg_A".into(), Some("1".into())),
            ("NVreg_B".into(), Some("a b".into())),
            ("NVreg_C".into(), Some("c d".into())),
            ("flag".into(), None),
            ("NVreg_D".into(), Some(String::new())),
        ];
        assert_eq!(got, want);
        assert_eq!(quote_param("p", "a b"), "p=\"a b\"");
        assert_eq!(
            split_params(&quote_param("p", "a b"))[0].1.as_deref(),
            Some("a b")
        );
        assert_eq!(quote_param("p", "x"), "p=x");
    }
}
