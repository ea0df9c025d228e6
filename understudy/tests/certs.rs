//! `understudy certs`: host directories get only `ca.pem` and the host pairs; the CA key is
//! kept only where `--ca-dir` says, and roles are issued as asked.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::run;

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_ca_key_never_lands_beside_host_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts = tmp.path().join("hosts");
    let out = hosts.to_str().unwrap();

    // Default: the CA key is discarded.
    let (ok, stdout, err) =
        run(&["certs", "--out", out, "--host", "primary", "--host", "backup", "--witness", "witness"]);
    assert!(ok, "{err}");
    println!("{stdout}");
    assert_eq!(
        files(&hosts),
        ["backup.key", "backup.pem", "ca.pem", "primary.key", "primary.pem", "witness.key", "witness.pem"]
    );
    assert!(stdout.contains("witness (role witness)"), "{stdout}");
    assert!(stdout.contains("primary (role host)"), "{stdout}");
    assert!(stdout.contains("ca key discarded"), "{stdout}");
    // More hosts need the key: refused, saying so.
    let (ok, _, err) = run(&["certs", "--out", out, "--host", "extra"]);
    assert!(!ok);
    assert!(err.contains("no ca key was given; pass --ca-dir"), "{err}");

    // Kept apart with --ca-dir, and reused from there.
    let kept = tmp.path().join("kept");
    let ca_dir = tmp.path().join("ca");
    let (ok, _, err) =
        run(&["certs", "--out", kept.to_str().unwrap(), "--host", "primary", "--ca-dir", ca_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(files(&kept), ["ca.pem", "primary.key", "primary.pem"]);
    assert_eq!(files(&ca_dir), ["ca.key", "ca.pem"]);
    assert_eq!((mode(&ca_dir), mode(&ca_dir.join("ca.key"))), (0o700, 0o600));
    let (ok, _, err) =
        run(&["certs", "--out", kept.to_str().unwrap(), "--witness", "witness", "--ca-dir", ca_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(files(&kept), ["ca.pem", "primary.key", "primary.pem", "witness.key", "witness.pem"]);

    // A directory in the old layout (ca.key among the host files) is refused with a hint.
    std::fs::write(kept.join("ca.key"), "old").unwrap();
    let (ok, _, err) =
        run(&["certs", "--out", kept.to_str().unwrap(), "--host", "b", "--ca-dir", ca_dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("the ca key lies beside the host keys"), "{err}");
}
