use std::os::unix::fs::PermissionsExt;

use std::time::{SystemTime, UNIX_EPOCH};

use super::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn hosts(names: &[&str]) -> Vec<HostSpec> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

/// Writes `<name>.pem`/`<name>.key` issued by `ca` with `validity` into `dir`.
fn write_host(dir: &Path, ca: &Authority, name: &str, validity: Validity) {
    let issued = ca.issue(&HostSpec::new(name), validity).unwrap();
    write(&dir.join(cert_file_name(name)), &issued.cert_pem, 0o644);
    write(&dir.join(key_file_name(name)), &issued.key_pem, 0o600);
}

fn expect_err<T: fmt::Debug>(result: Result<T, CertsError>) -> CertsError {
    let error = result.unwrap_err();
    println!("{error}");
    error
}

#[test]
fn generate_writes_files_and_they_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let ca_dir = tmp.path().join("ca");
    let keep = CaKey::Keep(ca_dir.clone());
    let generated = generate(&dir, &hosts(&["primary", "backup=backup.lan,10.0.0.2"]), &keep).unwrap();
    assert!(generated.ca_created);
    assert_eq!(generated.ca_cert, dir.join("ca.pem"));
    assert_eq!(generated.ca_key, Some(ca_dir.join("ca.key")));
    assert_eq!(generated.hosts[1].cert, dir.join("backup.pem"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir.join("primary.key")), 0o600);
    assert_eq!(mode(&dir.join("primary.pem")), 0o644);
    // The host directory holds the CA certificate and the host pairs, never the CA key.
    assert!(!dir.join("ca.key").exists());
    assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), fs::read(ca_dir.join("ca.pem")).unwrap());

    let primary = Identity::load(&dir, "primary").unwrap();
    assert_eq!(primary.name(), Some("primary"));
    assert_eq!(primary.role(), Ok(Role::Host));
    assert_eq!(primary.cert_chain().len(), 1);
    let backup = Identity::load(&dir, "backup").unwrap();
    assert_eq!(backup.name(), Some("backup"));
    // The extra names are in the certificate too; the role URI is not a name.
    let check = |name: &str| backup.check_host(name, Path::new("backup.pem"));
    check("backup.lan").unwrap();
    check("10.0.0.2").unwrap();
    match check("primary") {
        Err(CertsError::WrongHost { presented, .. }) => assert_eq!(presented, ["backup", "backup.lan", "10.0.0.2"]),
        other => panic!("{other:?}"),
    }

    // Adding a host later reuses the kept CA and leaves its files alone.
    let ca_before = fs::read(dir.join("ca.pem")).unwrap();
    let more = generate(&dir, &[HostSpec::witness("witness")], &keep).unwrap();
    assert!(!more.ca_created);
    assert_eq!(more.hosts[0].role, Role::Witness);
    assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);
    let witness = Identity::load(&dir, "witness").unwrap();
    assert_eq!(witness.role(), Ok(Role::Witness));
    assert_eq!(witness.ca_certificates(), primary.ca_certificates());
}

#[test]
fn the_ca_key_is_discarded_unless_kept_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let generated = generate(&dir, &hosts(&["primary", "backup"]), &CaKey::Discard).unwrap();
    assert_eq!(generated.ca_key, None);
    let mut files: Vec<String> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["backup.key", "backup.pem", "ca.pem", "primary.key", "primary.pem"]);
    Identity::load(&dir, "primary").unwrap();
    // More hosts need the CA's key, which is gone.
    let error = expect_err(generate(&dir, &hosts(&["witness"]), &CaKey::Discard));
    assert!(matches!(error, CertsError::CaWithoutKey { .. }));
    let error = expect_err(generate(&dir, &hosts(&["witness"]), &CaKey::Keep(tmp.path().join("ca"))));
    assert!(matches!(error, CertsError::OtherCa { .. }), "a new CA cannot join the old one's hosts");
    // The CA directory may not be the host directory.
    let error = expect_err(generate(&dir, &hosts(&["witness"]), &CaKey::Keep(dir.clone())));
    assert!(matches!(error, CertsError::CaDirIsHostDir { .. }));
    // The layout of older versions (ca.key among the host files) is refused with a hint.
    write(&dir.join("ca.key"), "old", 0o600);
    let error = expect_err(generate(&dir, &hosts(&["witness"]), &CaKey::Keep(tmp.path().join("ca"))));
    assert!(matches!(error, CertsError::CaKeyBesideHosts { .. }));
    assert!(error.to_string().contains("--ca-dir"), "{error}");
}

#[test]
fn generate_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let dir = dir.as_path();
    let keep = CaKey::Keep(tmp.path().join("ca"));
    assert!(matches!(expect_err(generate(dir, &[], &keep)), CertsError::NoHosts));
    assert!(matches!(expect_err(generate(dir, &hosts(&["a", "a"]), &keep)), CertsError::DuplicateHost { .. }));
    assert_eq!(
        expect_err("../etc".parse::<HostSpec>()).to_string(),
        "host name \"../etc\" is not a dns name (letters, digits, '-' and '.')"
    );
    assert!(matches!(expect_err("10.0.0.1".parse::<HostSpec>()), CertsError::BadHostName { .. }));
    assert!(matches!(expect_err("ok=not a name".parse::<HostSpec>()), CertsError::BadAltName { .. }));
    generate(dir, &hosts(&["primary"]), &keep).unwrap();
    let error = expect_err(generate(dir, &hosts(&["backup", "primary"]), &keep));
    assert_eq!(
        error.to_string(),
        format!("{}: already exists; remove it first to issue a new one", dir.join("primary.pem").display())
    );
    // Nothing was written for the request that failed.
    assert!(!dir.join("backup.pem").exists());
    fs::remove_file(tmp.path().join("ca/ca.key")).unwrap();
    assert!(matches!(expect_err(generate(dir, &hosts(&["backup"]), &keep)), CertsError::CaIncomplete { .. }));
}

#[test]
fn foreign_ca_cannot_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    fs::create_dir(&ca_dir).unwrap();
    let keep = CaKey::Keep(ca_dir.clone());
    let dir = tmp.path().join("pki");
    // A CA whose subject is not ours (here: a host certificate posing as a CA).
    let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
    let issued = ca.issue(&HostSpec::new("other"), Validity::days_from_now(1)).unwrap();
    write(&ca_dir.join(CA_CERT_FILE), &issued.cert_pem, 0o644);
    write(&ca_dir.join(CA_KEY_FILE), &issued.key_pem, 0o600);
    assert!(matches!(expect_err(generate(&dir, &hosts(&["backup"]), &keep)), CertsError::ForeignCa { .. }));
    // Our CA's certificate with another key.
    let other = Authority::generate(Validity::days_from_now(1)).unwrap();
    write(&ca_dir.join(CA_CERT_FILE), ca.cert_pem(), 0o644);
    write(&ca_dir.join(CA_KEY_FILE), &other.key_pem(), 0o600);
    assert!(matches!(expect_err(generate(&dir, &hosts(&["backup"]), &keep)), CertsError::ForeignCa { .. }));
}

#[test]
fn certificates_without_a_role_are_refused_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Authority::generate(Validity::days_from_now(10)).unwrap();
    write(&dir.join(CA_CERT_FILE), ca.cert_pem(), 0o644);
    let issued = ca.issue_without_role(&HostSpec::new("old"), Validity::days_from_now(1)).unwrap();
    write(&dir.join("old.pem"), &issued.cert_pem, 0o644);
    write(&dir.join("old.key"), &issued.key_pem, 0o600);
    let error = expect_err(Identity::load(dir, "old"));
    assert!(matches!(error, CertsError::NoRole { .. }));
    assert!(error.to_string().contains("carries no understudy role"), "{error}");
    assert!(error.to_string().contains("understudy certs --host NAME"), "{error}");
    let unchecked = Identity::from_pem_unchecked(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
    assert_eq!(unchecked.role(), Err(RoleProblem::Missing));
}

#[test]
fn load_names_each_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Authority::generate(Validity::days_from_now(10)).unwrap();
    write(&dir.join(CA_CERT_FILE), ca.cert_pem(), 0o644);
    write_host(dir, &ca, "primary", Validity::days_from_now(1));
    Identity::load(dir, "primary").unwrap();
    let load = |host: &str| Identity::load(dir, host);

    // Missing.
    let error = expect_err(load("backup"));
    assert_eq!(error.to_string(), format!("{}: file not found", dir.join("backup.pem").display()));

    // Not PEM, PEM without the right section.
    write_host(dir, &ca, "backup", Validity::days_from_now(1));
    write(&dir.join("backup.pem"), "hello\n", 0o644);
    assert!(matches!(expect_err(load("backup")), CertsError::NoPem { .. }));
    let key = fs::read_to_string(dir.join("backup.key")).unwrap();
    write(&dir.join("backup.pem"), &key, 0o644);
    assert!(matches!(expect_err(load("backup")), CertsError::NoCertificate { .. }));
    write(&dir.join("backup.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n", 0o644);
    assert!(matches!(expect_err(load("backup")), CertsError::NotPem { .. }));
    let cert = fs::read_to_string(dir.join("primary.pem")).unwrap();
    write(&dir.join("backup.pem"), &cert, 0o644);
    write(&dir.join("backup.key"), &cert, 0o600);
    assert!(matches!(expect_err(load("backup")), CertsError::NoKey { .. }));

    // A key readable by others.
    write_host(dir, &ca, "loose", Validity::days_from_now(1));
    fs::set_permissions(dir.join("loose.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let error = expect_err(load("loose"));
    assert!(matches!(error, CertsError::KeyTooOpen { mode: 0o644, .. }));
    assert!(error.to_string().ends_with("key file mode 644 lets other users read it; chmod 600 it"));

    // Another host's key.
    let other = fs::read_to_string(dir.join("loose.key")).unwrap();
    write(&dir.join("backup.pem"), &cert, 0o644);
    write(&dir.join("backup.key"), &other, 0o600);
    assert!(matches!(expect_err(load("backup")), CertsError::KeyMismatch { .. }));

    // The certificate of another host under this host's name.
    write(&dir.join("backup.key"), &fs::read_to_string(dir.join("primary.key")).unwrap(), 0o600);
    let error = expect_err(load("backup"));
    assert!(matches!(error, CertsError::WrongHost { .. }));
    assert!(error.to_string().ends_with("certificate is for [\"primary\"], not for host \"backup\""));

    // Signed by another CA.
    let stranger = Authority::generate(Validity::days_from_now(1)).unwrap();
    write_host(dir, &stranger, "stranger", Validity::days_from_now(1));
    let error = expect_err(load("stranger"));
    assert!(matches!(error, CertsError::NotSignedByCa { .. }));
    assert!(error.to_string().contains("certificate is not signed by the ca in"));
}

#[test]
fn load_checks_dates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let now = SystemTime::now();
    let ca = Authority::generate(Validity::days_from_now(10)).unwrap();
    write(&dir.join(CA_CERT_FILE), ca.cert_pem(), 0o644);
    write_host(dir, &ca, "old", Validity { not_before: now - DAY * 10, not_after: now - DAY });
    let error = expect_err(Identity::load(dir, "old"));
    assert!(matches!(error, CertsError::Expired { .. }));
    assert!(error.to_string().contains("certificate \"old\" expired at "));
    write_host(dir, &ca, "early", Validity { not_before: now + DAY, not_after: now + DAY * 2 });
    let error = expect_err(Identity::load(dir, "early"));
    assert!(matches!(error, CertsError::NotYetValid { .. }));
    assert!(error.to_string().contains("certificate \"early\" is not valid before "));

    // An expired CA.
    let old_ca = Authority::generate(Validity { not_before: now - DAY * 10, not_after: now - DAY }).unwrap();
    write(&dir.join(CA_CERT_FILE), old_ca.cert_pem(), 0o644);
    write_host(dir, &old_ca, "fine", Validity::days_from_now(1));
    let error = expect_err(Identity::load(dir, "fine"));
    assert!(matches!(error, CertsError::Expired { ref file, .. } if file.ends_with("ca.pem")));
    assert!(matches!(
        expect_err(Authority::generate(Validity { not_before: now, not_after: now })),
        CertsError::BadValidity
    ));
}

#[test]
fn summaries_read_what_rcgen_wrote() {
    let now = SystemTime::now();
    let validity = Validity { not_before: now - DAY, not_after: now + DAY * 400 };
    let ca = Authority::generate(validity).unwrap();
    let summary = der::summarize(ca.cert_der()).unwrap();
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(summary.not_before, secs(validity.not_before));
    assert_eq!(summary.not_after, secs(validity.not_after));
    assert!(summary.common_name.unwrap().starts_with("understudy ca "));
    assert!(summary.uris.is_empty());
    let issued = ca.issue(&HostSpec::witness("w").with_alt_name("w.lan"), validity).unwrap();
    let cert = identity::parse_certs(issued.cert_pem.as_bytes(), Path::new("w.pem")).unwrap();
    assert_eq!(der::summarize(&cert[0]).unwrap().uris, ["urn:understudy:role:witness"]);
    assert_eq!(certificate_role(&cert[0]), Ok(Role::Witness));
}

#[test]
fn host_specs_parse_and_print() {
    let spec: HostSpec = "backup=backup.lan, 10.0.0.2".parse().unwrap();
    assert_eq!(spec.name(), "backup");
    assert_eq!(spec.alt_names(), ["backup", "backup.lan", "10.0.0.2"]);
    assert_eq!(spec.to_string(), "backup=backup.lan,10.0.0.2");
    assert_eq!(HostSpec::new("a").with_alt_name("a").alt_names(), ["a"]);
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
    let issued = ca.issue(&HostSpec::new("primary"), Validity::days_from_now(1)).unwrap();
    let identity = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
    for text in [format!("{ca:?}"), format!("{issued:?}"), format!("{identity:?}")] {
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}

#[test]
fn load_named_names_the_host_and_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Identity::load_named(tmp.path(), "primary").unwrap_err();
    let text = err.to_string();
    assert_eq!(text, format!("load certificates for primary from {}", tmp.path().display()));
    assert_eq!(err.name, "primary");
    assert!(std::error::Error::source(&err).is_some(), "the cause is kept: {err:?}");
}
