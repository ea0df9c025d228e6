//! Input replay at promotion, end to end: an ordinary client (no `rto_min`, no thin-stream
//! option) whose request reached the primary just before it died gets the reply from the
//! promoted replica without retransmitting it (docs/failover.md, "Input replay").

mod common;

use std::time::Duration;

use common::*;

/// The clients' common start (python): connect to `argv[1]`'s kv port, `retrans()` (the
/// socket's `tcpi_total_retrans`, TCP_INFO offset 100), and `set counter 0`.
macro_rules! connect_and_set_counter {
    () => {
        r#"
import json, socket, struct, sys, time
host = sys.argv[1]
s = socket.create_connection((host, 11211), timeout=10)
f = s.makefile("rb")
def retrans():
    return struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]
s.sendall(b"set counter 0 0 1\r\n0\r\n")
assert f.readline().strip() == b"STORED"
"#
    };
}

/// One TCP connection with Linux's defaults; `incr counter 1` one at a time for `secs`. For the
/// request that waited longest (the one the failover caught) it reports the wait and how many
/// times the kernel retransmitted meanwhile (`tcpi_total_retrans` of TCP_INFO, offset 100);
/// every reply must be the previous one plus one.
const CLIENT: &str = concat!(
    connect_and_set_counter!(),
    r#"
secs = float(sys.argv[2])
last, n, skips, worst = 0, 0, 0, (0.0, 0)
end = time.monotonic() + secs
while time.monotonic() < end:
    r0, t = retrans(), time.monotonic()
    s.sendall(b"incr counter 1\r\n")
    v = int(f.readline())
    d = time.monotonic() - t
    if v != last + 1:
        skips += 1
    last, n = v, n + 1
    if d > worst[0]:
        worst = (d, retrans() - r0)
print(json.dumps({"replies": n, "counter_skips": skips, "worst_wait_ms": worst[0] * 1e3,
                  "worst_retrans": worst[1], "total_retrans": retrans()}), flush=True)
"#
);

#[test]
fn an_untuned_clients_request_to_a_dead_primary_is_answered_by_replay_without_a_retransmission() {
    untuned_client_answered_by_replay(
        "an_untuned_clients_request_to_a_dead_primary_is_answered_by_replay_without_a_retransmission",
        "primary.paused@400",
        "rpl",
        91,
    );
}

/// The same with the session's copies of inbound frames turned off (`primary.inbound-stream-off`):
/// the frames reach the backup's log by their side copies alone (authenticated datagrams sent
/// by the primary's net worker, drained at promotion), and the request is still replayed, once.
#[test]
fn an_untuned_clients_request_is_replayed_from_its_side_copy_alone() {
    untuned_client_answered_by_replay(
        "an_untuned_clients_request_is_replayed_from_its_side_copy_alone",
        "primary.paused@400,primary.inbound-stream-off",
        "rps",
        92,
    );
}

fn untuned_client_answered_by_replay(test: &str, failpoints: &str, net: &str, subnet: u8) {
    let _g = serial_guard();
    if !kvm_available(test) {
        return;
    }
    // tap0 for the primary's guest, tap1 for the promoted one, the client on the bridge.
    let Some(ns) = NetNs::bridged(test, net, subnet) else { return };
    // The primary dies (SIGKILL) at the pause of its 400th checkpoint, a few hundred requests
    // into the client's load: with output-driven epochs that pause ends the epoch in which the
    // guest received a request and answered it, answer held; the replica is the epoch before.
    let mut pair = Pair::kv_failover(&ns, failpoints);
    let out = python_in(&ns, CLIENT, &[&ns.guest_ip, "8"], Duration::from_secs(60));
    let v = json(out.lines().last().unwrap_or_default());
    let _ = pair.primary.child.wait();
    let st = Pair::status(&pair.b_sock);
    eprintln!("client: {v}\nbackup origin: {}", st["origin"]);
    assert_eq!(st["origin"]["kind"], "promoted", "the backup was not promoted: {}", pair.backup.stderr());
    let replayed = st["origin"]["replayed_frames"].as_u64().unwrap_or(0);
    assert!(replayed >= 1, "no inbound frame replayed at promotion: {}", pair.backup.stderr());
    assert_eq!(v["counter_skips"], 0, "a reply skipped or repeated an increment: {v}");
    assert!(v["replies"].as_u64().unwrap_or(0) > 400, "the client's load did not span the failover: {v}");
    // The request the failover caught was answered before the client's kernel retransmitted it
    // (its first retransmission comes 200 ms after sending at the earliest): the promoted guest
    // had it from the replay, not from the client.
    assert_eq!(v["worst_retrans"], 0, "the client had to retransmit the request the dead primary received: {v}");
    assert!(v["worst_wait_ms"].as_f64().unwrap_or(f64::MAX) < 200.0, "{v}");
}

/// A request the primary never received: the client stops the primary (SIGSTOP), sends its
/// request, and kills it (SIGKILL) 20 ms later. The frame is queued on the dead primary's TAP
/// and nowhere else but the backup's own TAP, which the LAN hands it too (the bridge does not
/// learn the guest's address). The backup keeps LAN copies (`--lan-copy`): promotion replays
/// the frames behind the newest ones the primary delivered, so the promoted guest answers the
/// request without the client retransmitting it, and exactly once (the counter goes up by one).
/// Without LAN copies the request is lost with the primary and the client's kernel resends it
/// after 200 ms at the earliest.
#[test]
fn a_request_the_dead_primary_never_received_is_replayed_from_the_lan_copy() {
    let test = "a_request_the_dead_primary_never_received_is_replayed_from_the_lan_copy";
    let _g = serial_guard();
    if !kvm_available(test) {
        return;
    }
    let Some(ns) = NetNs::bridged(test, "rlc", 93) else { return };
    for port in ["tap0", "tap1"] {
        ns.net
            .ip(&["link", "set", "dev", port, "type", "bridge_slave", "learning", "off"])
            .unwrap_or_else(|e| panic!("bridge port {port}: learning off: {e:#}"));
    }
    let mut pair = Pair::kv_failover_with(&ns, "", &["--lan-copy"]);
    let pid = pair.primary.child.id().to_string();
    let out = python_in(&ns, STOP_SEND_KILL, &[&ns.guest_ip, &pid], Duration::from_secs(60));
    let v = json(out.lines().last().unwrap_or_default());
    let _ = pair.primary.child.wait();
    let st = Pair::status(&pair.b_sock);
    let log = pair.backup.stderr();
    let lan: Vec<&str> = log.lines().filter(|l| l.contains("lan copies:") || l.contains("inbound log:")).collect();
    eprintln!("client: {v}\nbackup origin: {}\n{}", st["origin"], lan.join("\n"));
    assert_eq!(st["origin"]["kind"], "promoted", "the backup was not promoted: {log}");
    assert_eq!(v["value"], v["before"].as_u64().unwrap() + 1, "the request was not applied exactly once: {v}");
    assert_eq!(v["retrans"], 0, "the client had to retransmit the request the primary never received: {v}");
    assert!(v["wait_ms"].as_f64().unwrap_or(f64::MAX) < 200.0, "{v}");
    assert!(log.contains("lan copies: frames the primary never delivered replayed"), "no lan copy replayed: {log}");
}

/// `host pid`: a few `incr`s, then SIGSTOP `pid`, one more `incr` sent, SIGKILL `pid` 20 ms
/// later; reports the counter before and after, the last request's wait and its retransmissions.
const STOP_SEND_KILL: &str = concat!(
    connect_and_set_counter!(),
    r#"
import os, signal
pid = int(sys.argv[2])
v = 0
for _ in range(50):
    s.sendall(b"incr counter 1\r\n")
    v = int(f.readline())
time.sleep(0.1)
os.kill(pid, signal.SIGSTOP)
r0, t = retrans(), time.monotonic()
s.sendall(b"incr counter 1\r\n")
time.sleep(0.02)
os.kill(pid, signal.SIGKILL)
os.kill(pid, signal.SIGCONT)
w = int(f.readline())
print(json.dumps({"before": v, "value": w, "wait_ms": (time.monotonic() - t) * 1e3,
                  "retrans": retrans() - r0}), flush=True)
"#
);
