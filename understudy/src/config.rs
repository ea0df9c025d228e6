//! `--config FILE.toml` for `run`, `backup`, `receive` and `witness` (docs/operations.md,
//! "Config files").
//!
//! A config file holds the same settings as the command's long flags, keyed by the flag's name
//! (`memory = "256M"`, `verify = true`, `peer = ["1=primary@10.0.0.1:7100", ...]`). Nothing
//! here knows the flags: each key is looked up among the subcommand's clap arguments, its value
//! checked by that argument's own value parser (so a bad value fails with the error the flag
//! would give, plus the file and line), and then set as the argument's *default value*. Clap
//! then parses the real command line as usual, so a flag given there replaces the file's value
//! (for a repeated flag, its values replace the file's list), and every flag added later works
//! in config files without an edit here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::builder::ArgAction;
use toml::Spanned;

/// The subcommands that take `--config`.
pub const COMMANDS: [&str; 4] = ["run", "backup", "receive", "witness"];

/// The help of `--config`.
pub const HELP: &str = "Read settings from this TOML file: its keys are this command's long flags (memory = \"256M\", \
                        verify = true); a flag given on the command line overrides the file (docs/operations.md, \
                        \"Config files\")";

/// What is wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config {}, line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A key that is no flag of the command.
    #[error("config {}, line {line}: unknown key {key:?} for `understudy {command}`{hint}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// The key.
        key: String,
        /// The subcommand.
        command: String,
        /// ` (did you mean "memory"?)`, or nothing.
        hint: String,
    },
    /// A value the flag refuses, or of the wrong TOML type.
    #[error("config {}, line {line}: {key}: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong (the flag's own error for a value it refuses).
        message: String,
    },
}

/// If `argv` runs one of [`COMMANDS`] with `--config FILE`, returns `argv` with FILE's settings
/// inserted as flags right after the subcommand, but those the command line gives itself;
/// otherwise `argv` unchanged.
pub fn apply(cli: &clap::Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(command) = argv.get(1).and_then(|a| a.to_str()).filter(|a| COMMANDS.contains(a)) else {
        return Ok(argv);
    };
    let Some(sub) = cli.find_subcommand(command) else { return Ok(argv) };
    let Some(path) = config_path(&argv[2..]) else { return Ok(argv) };
    let settings = load(&path, sub)?;
    let given = &argv[2..];
    let mut flags = Vec::new();
    for (long, values) in &settings {
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(long.as_str())) else { continue };
        if on_command_line(arg, given) {
            tracing::debug!(config = %path.display(), key = %long, "the command line overrides the config file");
            continue;
        }
        flags.extend(values.iter().filter_map(|v| as_flag(arg, v)));
    }
    tracing::debug!(config = %path.display(), keys = settings.len(), "config file read");
    let mut out = argv;
    out.splice(2..2, flags);
    Ok(out)
}

/// `value` of `arg` as a command-line token: `--long=value`, or `--long` for a switch that is
/// on (none for one that is off).
fn as_flag(arg: &clap::Arg, value: &str) -> Option<OsString> {
    let long = arg.get_long()?;
    match arg.get_action() {
        ArgAction::SetTrue => (value == "true").then(|| format!("--{long}").into()),
        ArgAction::SetFalse => (value == "false").then(|| format!("--{long}").into()),
        _ => Some(format!("--{long}={value}").into()),
    }
}

/// Whether the command line (the subcommand's arguments) gives `arg`, by its long or short
/// flag or an alias (not after `--`).
fn on_command_line(arg: &clap::Arg, given: &[OsString]) -> bool {
    let longs: Vec<&str> = arg.get_long().into_iter().chain(arg.get_all_aliases().unwrap_or_default()).collect();
    let short = arg.get_short().map(|c| format!("-{c}"));
    given.iter().filter_map(|a| a.to_str()).take_while(|a| *a != "--").any(|a| {
        let name = a.split('=').next().unwrap_or(a);
        name.strip_prefix("--").is_some_and(|l| longs.contains(&l))
            || short.as_deref().is_some_and(|s| a.starts_with(s))
    })
}

/// The value of `--config` in a subcommand's arguments (`--config F` or `--config=F`; not
/// after `--`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Reads `path` and checks it against `sub`'s arguments: (long flag, values) per key, in the
/// file's order.
pub fn load(path: &Path, sub: &clap::Command) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(path, &text, sub)
}

/// A file's entries, by key.
type Entries = std::collections::BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// [`load`] on the file's text.
fn parse(path: &Path, text: &str, sub: &clap::Command) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let entries: Entries = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        line: line(e.span().map_or(0, |s| s.start)),
        message: e.message().trim_end().to_string(),
    })?;
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let keys = settable(sub);
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let at = line(key.span().start);
        let bad = |message: String| ConfigError::BadValue {
            path: path.into(),
            line: at,
            key: key.get_ref().clone(),
            message,
        };
        let Some(arg) = keys.iter().find(|a| a.get_long() == Some(key.get_ref().as_str())) else {
            let hint = suggest(key.get_ref(), &keys).map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
            return Err(ConfigError::UnknownKey {
                path: path.into(),
                line: at,
                key: key.into_inner(),
                command: sub.get_name().to_string(),
                hint,
            });
        };
        let values = values(arg, value.get_ref()).map_err(bad)?;
        check(arg, &values).map_err(bad)?;
        out.push((key.into_inner(), values));
    }
    Ok(out)
}

/// Runs `values` through `arg`'s value parser (alone: not its requirements or conflicts, which
/// clap checks on the whole command line later): the flag's own error for a value it refuses.
fn check(arg: &clap::Arg, values: &[String]) -> Result<(), String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return Ok(()); // `true` or `false`, made by [`values`]
    }
    let long = arg.get_long().unwrap_or_default().to_string();
    let mut one = clap::Arg::new(arg.get_id().clone())
        .long(long.clone())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Append);
    if let Some(names) = arg.get_value_names() {
        one = one.value_names(names.iter().cloned());
    }
    let argv = values.iter().map(|v| format!("--{long}={v}"));
    let cmd = clap::Command::new("understudy").no_binary_name(true).arg(one);
    cmd.try_get_matches_from(argv).map(drop).map_err(|e| clap_message(&e))
}

/// The arguments a config file may set: those with a long flag, but `--config` and `--help`.
fn settable(sub: &clap::Command) -> Vec<&clap::Arg> {
    sub.get_arguments().filter(|a| a.get_long().is_some_and(|l| l != "config" && l != "help")).collect()
}

/// The closest key to a mistyped one, as clap suggests flags.
fn suggest(key: &str, keys: &[&clap::Arg]) -> Option<String> {
    let (score, best) = keys
        .iter()
        .filter_map(|a| a.get_long())
        .map(|l| (strsim::jaro(key, l), l))
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    (score > 0.7).then(|| best.to_string())
}

/// The command-line values a TOML value stands for: a boolean for a switch, a list for a
/// repeated flag, a string or number otherwise.
fn values(arg: &clap::Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let repeated = matches!(arg.get_action(), ArgAction::Append);
    match value {
        toml::Value::Boolean(b) if switch => Ok(vec![b.to_string()]),
        _ if switch => Err(format!("is a switch: true or false, not {}", value.type_str())),
        toml::Value::Array(items) if repeated => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("takes one value, not a list".into()),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// One value as its command-line text.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        v => Err(format!("expected a string or a number, found {}", v.type_str())),
    }
}

/// A clap error's message without its `error: ` prefix and usage tips.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::BTreeSet;

    fn sub(name: &str) -> clap::Command {
        crate::Cli::command().find_subcommand(name).unwrap().clone()
    }

    fn parse_text(command: &str, text: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        parse(Path::new("/etc/understudy/x.toml"), text, &sub(command))
    }

    #[test]
    fn values_of_every_kind() {
        let got = parse_text(
            "backup",
            "memory = \"64M\"\nverify = true\nheartbeat-ms = 25\narbiter-peer = [\"1=primary@10.0.0.1:7100\"]\n",
        )
        .unwrap();
        let want: Vec<(String, Vec<String>)> = [
            ("memory", vec!["64M"]),
            ("verify", vec!["true"]),
            ("heartbeat-ms", vec!["25"]),
            ("arbiter-peer", vec!["1=primary@10.0.0.1:7100"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn errors_name_file_key_and_line() {
        let e = parse_text("run", "kernel = \"k\"\n\n# note\nmemroy = \"64M\"\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "config /etc/understudy/x.toml, line 4: unknown key \"memroy\" for `understudy run` (did you mean \"memory\"?)"
        );
        let e = parse_text("run", "vcpus = 1\nmemory = 256\n").unwrap_err().to_string();
        assert!(e.starts_with("config /etc/understudy/x.toml, line 2: memory: invalid value '256'"), "{e}");
        assert!(e.contains("did you mean 256M?"), "{e}");
        let e = parse_text("backup", "verify = \"yes\"\n").unwrap_err().to_string();
        assert_eq!(e, "config /etc/understudy/x.toml, line 1: verify: is a switch: true or false, not string");
        let e = parse_text("run", "tap = [\"a\", \"b\"]\n").unwrap_err().to_string();
        assert_eq!(e, "config /etc/understudy/x.toml, line 1: tap: takes one value, not a list");
        let e = parse_text("witness", "\nid = 3\nlisten = \n").unwrap_err().to_string();
        assert!(e.starts_with("config /etc/understudy/x.toml, line 3: "), "{e}");
        let e = parse_text("run", "[run]\nmemory = \"64M\"\n").unwrap_err().to_string();
        assert!(e.starts_with("config /etc/understudy/x.toml, line 1: unknown key \"run\""), "{e}");
        let e = parse_text("run", "config = \"other.toml\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown key \"config\""), "{e}");
    }

    #[test]
    fn config_path_forms() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(config_path(&args(&["--memory", "1G", "--config", "a.toml"])), Some("a.toml".into()));
        assert_eq!(config_path(&args(&["--config=b.toml"])), Some("b.toml".into()));
        assert_eq!(config_path(&args(&["--", "--config", "a.toml"])), None);
        assert_eq!(config_path(&args(&["--memory", "1G"])), None);
    }

    /// `text` with every left-out setting (`# key = value`) put in.
    fn uncommented(text: &str) -> String {
        let setting =
            |l: &str| l.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
        let lines = text.lines().map(|l| l.strip_prefix("# ").filter(|r| setting(r)).unwrap_or(l));
        lines.collect::<Vec<_>>().join("\n")
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// The raw values of every argument of `command` in `argv`'s matches (clap must accept it).
    fn raw(command: &str, argv: Vec<OsString>) -> Vec<(String, Option<Vec<OsString>>)> {
        let m = crate::Cli::command().try_get_matches_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let m = m.subcommand_matches(command).unwrap();
        let ids = settable(&sub(command)).iter().map(|a| a.get_id().to_string()).collect::<Vec<_>>();
        ids.into_iter()
            .map(|id| {
                let v = m.get_raw(&id).map(|v| v.map(OsString::from).collect());
                (id, v)
            })
            .collect()
    }

    /// The example `file` as it is is accepted; with its left-out settings put in, it stands
    /// for exactly `flags` and has a key for every flag of `command`.
    fn check_example(file: &str, command: &str, flags: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let p = path.to_str().unwrap();
        let as_is = apply(&crate::Cli::command(), os(&["understudy", command, "--config", p])).unwrap();
        raw(command, as_is);

        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join(file);
        std::fs::write(&full, uncommented(&text)).unwrap();
        let keys: BTreeSet<String> = load(&full, &sub(command)).unwrap().into_iter().map(|(k, _)| k).collect();
        let all: BTreeSet<String> =
            settable(&sub(command)).iter().filter_map(|a| a.get_long()).map(String::from).collect();
        assert_eq!(keys, all, "{file}: not every flag of `understudy {command}` has its key");
        let argv = os(&["understudy", command, "--config", full.to_str().unwrap()]);
        let from_file = apply(&crate::Cli::command(), argv).unwrap();
        // The flags, one per line (values here have no spaces but the command line's).
        let mut from_flags = os(&["understudy", command]);
        for line in flags.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (flag, value) = line.split_once(' ').unwrap_or((line, ""));
            from_flags.push(flag.into());
            if !value.is_empty() {
                from_flags.push(value.into());
            }
        }
        assert_eq!(raw(command, from_file), raw(command, from_flags), "{file}");
    }

    #[test]
    fn examples_stand_for_their_flags() {
        check_example(
            "primary.toml",
            "run",
            "--kernel /var/lib/understudy/guest.elf
            --cmdline workload=kv ip=10.0.0.2/24
            --memory 256M
            --vcpus 1
            --serial /var/log/understudy-web1.console
            --api /run/understudy-web1.sock
            --vm web1
            --tap tap0
            --mac 02:55:44:00:00:01
            --metrics 127.0.0.1:9400
            --arbiter-id 1
            --arbiter-listen 192.0.2.1:7501
            --arbiter-peer 2=backup@192.0.2.2:7502
            --arbiter-peer 3=witness@192.0.2.3:7503
            --arbiter-certs /etc/understudy/certs
            --arbiter-name primary
            --arbiter-data /var/lib/understudy/raft1
            --lease-ms 30
            --lease-renew-ms 10",
        );
        check_example(
            "backup.toml",
            "backup",
            "--listen 192.0.2.2:7400
            --certs /etc/understudy/certs
            --name backup
            --primary-name primary
            --vm web1
            --memory 256M
            --api /run/understudy-web1.sock
            --tap tap0
            --serial /var/log/understudy-web1.console
            --lan-copy
            --arbiter-id 2
            --arbiter-listen 192.0.2.2:7502
            --arbiter-peer 1=primary@192.0.2.1:7501
            --arbiter-peer 3=witness@192.0.2.3:7503
            --arbiter-data /var/lib/understudy/raft2
            --arbiter-certs /etc/understudy/certs
            --arbiter-name backup
            --lease-ms 30
            --lease-renew-ms 10
            --heartbeat-ms 20
            --detect-ms 1000
            --suspect-ms 500
            --metrics 127.0.0.1:9401
            --reprotect-to 1=primary@192.0.2.1:7400",
        );
        check_example(
            "destination.toml",
            "receive",
            "--listen 192.0.2.4:7600
            --certs /etc/understudy/certs
            --memory 256M
            --name dest
            --source-name src
            --vm web1
            --api /run/understudy-web1.sock
            --serial /var/log/understudy-web1.console
            --tap tap0",
        );
        check_example(
            "witness.toml",
            "witness",
            "--id 3
            --data /var/lib/understudy/raft3
            --listen 192.0.2.3:7503
            --peer 1=primary@192.0.2.1:7501
            --peer 2=backup@192.0.2.2:7502
            --certs /etc/understudy/certs
            --name witness",
        );
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        let text = "id = 3\ndata = \"/d\"\nlisten = \"127.0.0.1:7503\"\nname = \"w1\"\n\
                    peer = [\"1=a@127.0.0.1:1\", \"2=b@127.0.0.1:2\"]\n";
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let cli = "--config P --name=w2 --peer 1=c@127.0.0.1:3 --peer 2=d@127.0.0.1:4";
        let mut argv = os(&["understudy", "witness"]);
        argv.extend(cli.split(' ').map(|a| OsString::from(if a == "P" { p } else { a })));
        let got = raw("witness", apply(&crate::Cli::command(), argv).unwrap());
        let want =
            "witness --id 3 --data /d --listen 127.0.0.1:7503 --name w2 --peer 1=c@127.0.0.1:3 --peer 2=d@127.0.0.1:4";
        let mut want_argv = os(&["understudy"]);
        want_argv.extend(want.split(' ').map(OsString::from));
        assert_eq!(got, raw("witness", want_argv));
        // A switch set in the file, a size and required flags given only there.
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7600\"\ncerts = \"/c\"\nmemory = \"64M\"\nverify = true\n")
            .unwrap();
        let argv = os(&["understudy", "receive", "--memory", "128M", "--config", path.to_str().unwrap()]);
        let got = raw("receive", apply(&crate::Cli::command(), argv).unwrap());
        let want = "receive --listen 127.0.0.1:7600 --certs /c --memory 128M --verify";
        let mut want_argv = os(&["understudy"]);
        want_argv.extend(want.split(' ').map(OsString::from));
        assert_eq!(got, raw("receive", want_argv));
    }
}
