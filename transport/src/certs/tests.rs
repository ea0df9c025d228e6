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
    let generated = generate(&dir, &hosts(&["primary", "backup=backup.lan,10.0.0.2"])).unwrap();
    assert!(generated.ca_created);
    assert_eq!(generated.ca_cert, dir.join("ca.pem"));
    assert_eq!(generated.hosts[1].cert, dir.join("backup.pem"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir.join("primary.key")), 0o600);
    assert_eq!(mode(&dir.join("primary.pem")), 0o644);

    let primary = Identity::load(&dir, "primary").unwrap();
    assert_eq!(primary.name(), Some("primary"));
    assert_eq!(primary.cert_chain().len(), 1);
    let backup = Identity::load(&dir, "backup").unwrap();
    assert_eq!(backup.name(), Some("backup"));
    // The extra names are in the certificate too.
    let check = |name: &str| backup.check_host(name, Path::new("backup.pem"));
    check("backup.lan").unwrap();
    check("10.0.0.2").unwrap();
    assert!(matches!(check("primary"), Err(CertsError::WrongHost { .. })));

    // Adding a host later reuses the CA and leaves its files alone.
    let ca_before = fs::read(dir.join("ca.pem")).unwrap();
    let more = generate(&dir, &hosts(&["witness"])).unwrap();
    assert!(!more.ca_created);
    assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);
    let witness = Identity::load(&dir, "witness").unwrap();
    assert_eq!(witness.ca_certificates(), primary.ca_certificates());
}

#[test]
fn generate_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(matches!(expect_err(generate(dir, &[])), CertsError::NoHosts));
    assert!(matches!(expect_err(generate(dir, &hosts(&["a", "a"]))), CertsError::DuplicateHost { .. }));
    assert_eq!(
        expect_err("../etc".parse::<HostSpec>()).to_string(),
        "host name \"../etc\" is not a dns name (letters, digits, '-' and '.')"
    );
    assert!(matches!(expect_err("10.0.0.1".parse::<HostSpec>()), CertsError::BadHostName { .. }));
    assert!(matches!(expect_err("ok=not a name".parse::<HostSpec>()), CertsError::BadAltName { .. }));
    generate(dir, &hosts(&["primary"])).unwrap();
    let error = expect_err(generate(dir, &hosts(&["backup", "primary"])));
    assert_eq!(
        error.to_string(),
        format!("{}: already exists; remove it first to issue a new one", dir.join("primary.pem").display())
    );
    // Nothing was written for the request that failed.
    assert!(!dir.join("backup.pem").exists());
    fs::remove_file(dir.join("ca.key")).unwrap();
    assert!(matches!(expect_err(generate(dir, &hosts(&["backup"]))), CertsError::CaIncomplete { .. }));
}

#[test]
fn foreign_ca_cannot_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A CA whose subject is not ours (here: a host certificate posing as a CA).
    let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
    let issued = ca.issue(&HostSpec::new("other"), Validity::days_from_now(1)).unwrap();
    write(&dir.join(CA_CERT_FILE), &issued.cert_pem, 0o644);
    write(&dir.join(CA_KEY_FILE), &issued.key_pem, 0o600);
    assert!(matches!(expect_err(generate(dir, &hosts(&["backup"]))), CertsError::ForeignCa { .. }));
    // Our CA's certificate with another key.
    let other = Authority::generate(Validity::days_from_now(1)).unwrap();
    write(&dir.join(CA_CERT_FILE), ca.cert_pem(), 0o644);
    write(&dir.join(CA_KEY_FILE), &other.key_pem(), 0o600);
    assert!(matches!(expect_err(generate(dir, &hosts(&["backup"]))), CertsError::ForeignCa { .. }));
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
