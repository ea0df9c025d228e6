//! The metrics endpoint from the command line: a non-loopback `--metrics` address is refused
//! before anything starts, unless `--metrics-public` says so.

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
