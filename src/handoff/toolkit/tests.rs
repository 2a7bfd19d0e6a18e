use super::*;
use std::os::unix::fs::PermissionsExt;

use pretty_assertions::assert_eq;

const FLATCAR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/toolkit/flatcar-sysext-bakery.nvidia-runtime.config.toml"
);
const TOOLKIT_DEFAULT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/toolkit/nvidia-container-toolkit.default-config.toml"
);
const SHIPPED: [&str; 2] = [FLATCAR, TOOLKIT_DEFAULT];

const DRIVER_ROOT: &str = "/run/nvidia/driver";
const CONFIG: &str = DEFAULT_CONFIG_PATH;

fn shipped(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("reading fixture {path}: {err}"))
}

/// The parsed document without `[nvidia-container-cli] root`, for "nothing else changed".
fn without_root(text: &str) -> toml::Table {
    let mut table: toml::Table = toml::from_str(text).expect("valid TOML");
    if let Some(cli) = table.get_mut(CLI_TABLE).and_then(|v| v.as_table_mut()) {
        cli.remove(ROOT_KEY);
    }
    table
}

fn comment_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| line.trim_start().starts_with('#'))
        .collect()
}

/// A fake host root holding `text` (if any) at the config path.
fn host_with_config(text: Option<&str>) -> (tempfile::TempDir, Root, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(dir.path());
    let path = root.join(CONFIG);
    if let Some(text) = text {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
    }
    (dir, root, path)
}

#[test]
fn shipped_files_get_root_right_after_the_commented_line() {
    for fixture in SHIPPED {
        let original = shipped(fixture);
        assert_eq!(current_cli_root(&original).unwrap(), None, "{fixture}");
        let edited = set_cli_root(Some(&original), DRIVER_ROOT)
            .unwrap()
            .expect("root is not set in the shipped files");

        // Exactly one line is added, right after the commented-out default.
        let expected = original.replace(
            "#root = \"/run/nvidia/driver\"\n",
            "#root = \"/run/nvidia/driver\"\nroot = \"/run/nvidia/driver\"\n",
        );
        assert_eq!(edited, expected, "{fixture}");

        // Every comment line survives, in order; nothing else changed.
        assert_eq!(
            comment_lines(&edited),
            comment_lines(&original),
            "{fixture}"
        );
        assert_eq!(without_root(&edited), without_root(&original), "{fixture}");
        let parsed: toml::Table = toml::from_str(&edited).unwrap();
        assert_eq!(
            parsed[CLI_TABLE][ROOT_KEY].as_str(),
            Some(DRIVER_ROOT),
            "{fixture}"
        );
        assert_eq!(
            current_cli_root(&edited).unwrap().as_deref(),
            Some(DRIVER_ROOT)
        );

        // A second application changes nothing.
        assert_eq!(set_cli_root(Some(&edited), DRIVER_ROOT).unwrap(), None);
    }
}

#[test]
fn an_existing_root_is_replaced_in_place_keeping_its_comment() {
    let original = shipped(FLATCAR);
    let first = set_cli_root(Some(&original), "/").unwrap().unwrap();
    let with_comment = first.replace("root = \"/\"\n", "root = \"/\"   # set by hand\n");
    let second = set_cli_root(Some(&with_comment), DRIVER_ROOT)
        .unwrap()
        .unwrap();
    assert_eq!(
        second,
        with_comment.replace(
            "root = \"/\"   # set by hand\n",
            "root = \"/run/nvidia/driver\"   # set by hand\n"
        )
    );
    assert_eq!(comment_lines(&second), comment_lines(&with_comment));
    assert_eq!(without_root(&second), without_root(&original));
}

#[test]
fn commented_root_in_the_middle_of_the_table() {
    let original = "[nvidia-container-cli]\n\
                    environment = []\n\
                    # root = \"/run/nvidia/driver\"\n\
                    load-kmods = true\n\
                    \n\
                    [nvidia-ctk]\n\
                    path = \"nvidia-ctk\"\n";
    let edited = set_cli_root(Some(original), "/").unwrap().unwrap();
    assert_eq!(
        edited,
        "[nvidia-container-cli]\n\
         environment = []\n\
         # root = \"/run/nvidia/driver\"\n\
         root = \"/\"\n\
         load-kmods = true\n\
         \n\
         [nvidia-ctk]\n\
         path = \"nvidia-ctk\"\n"
    );
}

#[test]
fn commented_root_in_the_last_table_of_the_file() {
    let original = "top = 1\n\n[nvidia-container-cli]\nload-kmods = true\n#root = \"/x\"\n#user = \"root:video\"\n";
    let edited = set_cli_root(Some(original), DRIVER_ROOT).unwrap().unwrap();
    assert_eq!(
        edited,
        "top = 1\n\n[nvidia-container-cli]\nload-kmods = true\n#root = \"/x\"\nroot = \"/run/nvidia/driver\"\n#user = \"root:video\"\n"
    );
}

#[test]
fn without_a_commented_line_root_is_appended_to_the_table() {
    let original = "[nvidia-container-cli]\nload-kmods = true\n\n# about the runtime\n[nvidia-container-runtime]\nmode = \"auto\"\n";
    let edited = set_cli_root(Some(original), DRIVER_ROOT).unwrap().unwrap();
    assert_eq!(
        edited,
        "[nvidia-container-cli]\nload-kmods = true\nroot = \"/run/nvidia/driver\"\n\n# about the runtime\n[nvidia-container-runtime]\nmode = \"auto\"\n"
    );
}

#[test]
fn a_missing_table_is_added_at_the_end() {
    let original = "disable-require = false\n\n[nvidia-ctk]\npath = \"nvidia-ctk\"\n# the end\n";
    let edited = set_cli_root(Some(original), DRIVER_ROOT).unwrap().unwrap();
    assert_eq!(
        edited,
        format!("{original}\n[nvidia-container-cli]\nroot = \"/run/nvidia/driver\"\n")
    );
    assert_eq!(
        without_root(&edited)[CLI_TABLE].as_table().unwrap().len(),
        0
    );
    // An empty existing file gets just the table.
    assert_eq!(
        set_cli_root(Some(""), DRIVER_ROOT).unwrap().unwrap(),
        "[nvidia-container-cli]\nroot = \"/run/nvidia/driver\"\n"
    );
}

#[test]
fn other_spellings_of_the_table_are_tables_too() {
    let cases = [
        (
            "nvidia-container-cli = { load-kmods = true }\n",
            "nvidia-container-cli = { load-kmods = true, root = \"/run/nvidia/driver\" }\n",
        ),
        (
            "nvidia-container-cli.root = \"/old\"\n",
            "nvidia-container-cli.root = \"/run/nvidia/driver\"\n",
        ),
        (
            "[nvidia-container-cli.sub]\nx = 1\n",
            "[nvidia-container-cli]\nroot = \"/run/nvidia/driver\"\n[nvidia-container-cli.sub]\nx = 1\n",
        ),
    ];
    for (original, expected) in cases {
        let edited = set_cli_root(Some(original), DRIVER_ROOT).unwrap().unwrap();
        assert_eq!(edited, expected);
        assert_eq!(set_cli_root(Some(&edited), DRIVER_ROOT).unwrap(), None);
    }
}

#[test]
fn new_file_has_a_header_and_only_the_root() {
    let text = set_cli_root(None, DRIVER_ROOT).unwrap().unwrap();
    assert!(text.starts_with("# Created by nvdriver-agent"), "{text}");
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    let expected: toml::Table =
        toml::from_str("[nvidia-container-cli]\nroot = \"/run/nvidia/driver\"\n").unwrap();
    assert_eq!(parsed, expected);
    assert_eq!(set_cli_root(Some(&text), DRIVER_ROOT).unwrap(), None);
}

#[test]
fn wrong_shapes_are_errors_naming_what_was_found() {
    let err = set_cli_root(Some("nvidia-container-cli = \"x\"\n"), "/").unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::CliNotTable {
                found: "a string",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("expected `nvidia-container-cli` to be a table"));

    let err = set_cli_root(Some("[[nvidia-container-cli]]\nroot = \"/\"\n"), "/").unwrap_err();
    assert!(matches!(err, RuntimeError::CliNotTable { .. }), "{err:?}");

    let err = set_cli_root(Some("[nvidia-container-cli]\nroot = 3\n"), "/").unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::RootNotString {
                found: "an integer",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("found an integer"), "{err}");
    assert!(matches!(
        current_cli_root("[nvidia-container-cli]\nroot = [\"/\"]\n"),
        Err(RuntimeError::RootNotString {
            found: "an array",
            ..
        })
    ));

    assert!(matches!(
        set_cli_root(None, "run/nvidia/driver"),
        Err(RuntimeError::InvalidDriverRoot { .. })
    ));
}

#[test]
fn invalid_toml_names_the_line() {
    let text = "a = 1\n\n[nvidia-container-cli]\nroot = = \"/\"\n";
    let err = set_cli_root(Some(text), "/").unwrap_err();
    match &err {
        RuntimeError::InvalidToml { line, column, .. } => {
            assert_eq!((*line, *column), (4, 8), "{err}");
        }
        other => panic!("expected InvalidToml, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(DEFAULT_CONFIG_PATH), "{message}");
    assert!(message.contains("line 4"), "{message}");
    assert!(message.contains("left untouched"), "{message}");
}

#[test]
fn apply_then_reapply_leaves_bytes_and_mtime_alone() {
    let original = shipped(FLATCAR);
    let (_dir, root, path) = host_with_config(Some(&original));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let config = Path::new(CONFIG);

    assert_eq!(
        plan_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Updated { previous: None }
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        original,
        "plan writes nothing"
    );

    assert_eq!(
        apply_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Updated { previous: None }
    );
    let written = fs::read_to_string(&path).unwrap();
    assert_eq!(
        written,
        set_cli_root(Some(&original), DRIVER_ROOT).unwrap().unwrap()
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    let before = fs::metadata(&path).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        plan_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Unchanged
    );
    assert_eq!(
        apply_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Unchanged
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), written);
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);

    assert_eq!(
        apply_cli_root(&root, config, "/").unwrap(),
        RootChange::Updated {
            previous: Some(DRIVER_ROOT.to_string())
        }
    );
    let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no temporary file left behind");
}

#[test]
fn apply_creates_the_file_and_its_directory() {
    let (_dir, root, path) = host_with_config(None);
    let config = Path::new(CONFIG);
    assert_eq!(
        plan_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Created
    );
    assert!(!path.parent().unwrap().exists(), "plan writes nothing");

    assert_eq!(
        apply_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Created
    );
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text, set_cli_root(None, DRIVER_ROOT).unwrap().unwrap());
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let dir_mode = fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o755);
    assert_eq!(
        apply_cli_root(&root, config, DRIVER_ROOT).unwrap(),
        RootChange::Unchanged
    );
}

#[test]
fn invalid_toml_on_disk_is_left_untouched() {
    let text = "[nvidia-container-cli\nroot = \"/\"\n";
    let (_dir, root, path) = host_with_config(Some(text));
    let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
    assert!(
        matches!(err, RuntimeError::InvalidToml { line: 1, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 1"), "{message}");
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
}

#[test]
fn wrong_shapes_on_disk_are_left_untouched() {
    for text in [
        "nvidia-container-cli = 1\n",
        "[nvidia-container-cli]\nroot = true\n",
    ] {
        let (_dir, root, path) = host_with_config(Some(text));
        let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
        assert!(
            matches!(
                err,
                RuntimeError::CliNotTable { .. } | RuntimeError::RootNotString { .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}

#[test]
fn not_utf8_is_an_error() {
    let (_dir, root, path) = host_with_config(None);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"root = \"\xff\"\n").unwrap();
    let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
    assert!(matches!(err, RuntimeError::NotUtf8 { .. }), "{err:?}");
    assert_eq!(fs::read(&path).unwrap(), b"root = \"\xff\"\n");
}

#[test]
fn a_directory_at_the_config_path_is_an_error() {
    let (_dir, root, path) = host_with_config(None);
    fs::create_dir_all(path.join("keep")).unwrap();
    let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::NotAFile {
                found: "a directory",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("expected"), "{err}");
    assert!(path.join("keep").is_dir(), "the directory is left alone");
}

#[test]
fn a_regular_file_as_parent_is_an_error_and_stays_untouched() {
    // Fails as root too: no permission bit is involved.
    let (_dir, root, path) = host_with_config(None);
    let parent = path.parent().unwrap();
    fs::create_dir_all(parent.parent().unwrap()).unwrap();
    fs::write(parent, "not a directory\n").unwrap();
    let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
    assert!(
        matches!(err, RuntimeError::ParentNotDirectory { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(fs::read_to_string(parent).unwrap(), "not a directory\n");
}

#[test]
fn a_place_where_nothing_can_be_created_is_an_error() {
    // procfs refuses new directories even to root.
    let root = Root::new("/proc");
    let err = apply_cli_root(&root, Path::new(CONFIG), DRIVER_ROOT).unwrap_err();
    assert!(matches!(err, RuntimeError::CreateDir { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("cannot create directory /proc/etc"),
        "{err}"
    );
}

#[test]
fn root_change_serializes_kebab_case() {
    assert_eq!(
        serde_json::to_value(RootChange::Unchanged).unwrap(),
        serde_json::json!("unchanged")
    );
    assert_eq!(
        serde_json::to_value(RootChange::Created).unwrap(),
        serde_json::json!("created")
    );
    assert_eq!(
        serde_json::to_value(RootChange::Updated {
            previous: Some("/".into())
        })
        .unwrap(),
        serde_json::json!({ "updated": { "previous": "/" } })
    );
}
