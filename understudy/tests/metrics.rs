//! The metrics endpoint from the command line: a non-loopback `--metrics` address is refused
//! before anything starts, unless `--metrics-public` says so; a protected VM and its backup
//! serve the role and their numbers by the Prometheus conventions.

mod common;
use common::run;

#[test]
fn a_non_loopback_metrics_address_is_refused_without_the_opt_in() {
    let cases: [&[&str]; 2] = [
        &["run", "--kernel", "/nonexistent/kernel", "--metrics", "0.0.0.0:9400"],
        &["backup", "--listen", "127.0.0.1:0", "--certs", "/nonexistent/certs", "--metrics", "[::]:9401"],
    ];
    for args in cases {
        let (ok, _, err) = run(args);
        assert!(!ok, "{args:?} started");
        assert!(err.contains("is not a loopback address") && err.contains("--metrics-public"), "{args:?}: {err}");
    }
    // With the opt-in, the address passes and the command goes on to fail for its own reason.
    let (ok, _, err) =
        run(&["run", "--kernel", "/nonexistent/kernel", "--metrics", "0.0.0.0:9400", "--metrics-public"]);
    assert!(!ok && err.contains("kernel /nonexistent/kernel does not exist"), "{err}");
    // The opt-in means nothing without an address.
    let (ok, _, err) = run(&["run", "--kernel", "/nonexistent/kernel", "--metrics-public"]);
    assert!(!ok && err.contains("--metrics"), "{err}");
}

/// The body of `GET /metrics` at `addr`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to metrics at {addr}: {e}"));
    c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn free_tcp_addr() -> String {
    format!("127.0.0.1:{}", testbed::env::free_local_port().expect("a free tcp port"))
}

/// Asserts `text` follows the conventions ([`node::metrics::read::families`]) and has each
/// family of `want` with its type.
fn assert_families(text: &str, want: &[(&str, &str)]) {
    let fams = node::metrics::read::families(text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    for (name, kind) in want {
        assert!(fams.iter().any(|(n, k)| n == name && k == kind), "no {kind} {name} in\n{text}");
    }
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    node::metrics::read::sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// A scrape's body, after the HTTP head.
fn body(scrape: &str) -> &str {
    scrape.split_once("\r\n\r\n").map_or(scrape, |(_, b)| b)
}

/// The lines of a scrape about the node's role and its transitions.
fn role_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("understudy_node_role")).collect()
}

#[test]
fn the_role_and_each_transition_are_in_the_metrics() {
    let _g = common::serial_guard();
    if !common::kvm_available("the_role_and_each_transition_are_in_the_metrics") {
        return;
    }
    let (pm, bm) = (free_tcp_addr(), free_tcp_addr());
    let mut pair = common::Pair::start_with(
        None,
        "workload=counter",
        "64M",
        &["--metrics", bm.as_str()],
        &["--metrics", pm.as_str()],
    );
    assert_eq!(role_lines(&scrape(&pm)), [r#"understudy_node_role{value="booted"} 1"#]);
    assert_eq!(role_lines(&scrape(&bm)), [r#"understudy_node_role{value="backup"} 1"#]);
    pair.protect(&[]);
    pair.wait_protection("protected", std::time::Duration::from_secs(20));
    let text = scrape(&pm);
    assert!(text.contains("# TYPE understudy_node_role_transitions_total counter"), "{text}");
    assert_eq!(
        role_lines(&text),
        [
            r#"understudy_node_role{value="protected"} 1"#,
            r#"understudy_node_role_transitions_total{from="booted",to="protected"} 1"#
        ]
    );
    // The status numbers are there beside the role, by the conventions.
    assert!(text.contains("understudy_protection_state{state=\"protected\"} 1\n"), "{text}");
    assert!(text.contains("understudy_protection_state{state=\"degraded\"} 0\n"), "{text}");
    assert_families(
        body(&text),
        &[
            ("understudy_epochs_total", "counter"),
            ("understudy_checkpoint_pause_seconds", "histogram"),
            ("understudy_ack_latency_seconds", "histogram"),
            ("understudy_replica_lag_epochs", "gauge"),
            ("understudy_output_held_bytes", "gauge"),
            ("understudy_bytes_sent_total", "counter"),
            ("understudy_uptime_seconds", "gauge"),
        ],
    );
    // The engine's pauses feed the histogram: it has samples, its +Inf bucket is its count.
    let count = sample(&text, "understudy_checkpoint_pause_seconds_count");
    assert!(count >= 1.0, "{text}");
    assert_eq!(sample(&text, "understudy_checkpoint_pause_seconds_bucket{le=\"+Inf\"}"), count, "{text}");
    assert!(sample(&text, "understudy_epochs_total") >= 1.0, "{text}");
    assert!(sample(&text, "understudy_bytes_sent_total") > 0.0, "{text}");
    // The backup: its committed epoch and the time since its last commit.
    let btext = scrape(&bm);
    assert_families(
        body(&btext),
        &[
            ("understudy_backup_committed_epoch", "gauge"),
            ("understudy_backup_last_commit_age_seconds", "gauge"),
            ("understudy_backup_commits_total", "counter"),
            ("understudy_backup_state", "gauge"),
        ],
    );
    assert!(sample(&btext, "understudy_backup_committed_epoch") >= 1.0, "{btext}");
    assert_eq!(sample(&btext, "understudy_backup_state{state=\"consistent\"}"), 1.0, "{btext}");
    let (ok, out, err) = run(&["promote", "--api", pair.b_sock.to_str().unwrap()]);
    assert!(ok, "promote: {err}{out}");
    assert_eq!(
        role_lines(&scrape(&bm)),
        [
            r#"understudy_node_role{value="promoted"} 1"#,
            r#"understudy_node_role_transitions_total{from="backup",to="promoted"} 1"#
        ]
    );
    assert!(pair.backup.stderr().contains("role: backup -> promoted"), "the transition is not logged");
    let (ok, out, err) = run(&["unprotect", "--api", pair.p_sock.to_str().unwrap()]);
    assert!(ok, "unprotect: {err}{out}");
    assert_eq!(
        role_lines(&scrape(&pm)),
        [
            r#"understudy_node_role{value="booted"} 1"#,
            r#"understudy_node_role_transitions_total{from="booted",to="protected"} 1"#,
            r#"understudy_node_role_transitions_total{from="protected",to="booted"} 1"#
        ]
    );
    assert!(pair.primary.stderr().contains("role: protected -> booted (unprotect requested)"));
}
