//! Output at promotion, end to end: the primary dies after the backup committed the epoch that
//! holds a reply and before it released that reply (`primary.acked`); the promoted replica
//! writes the reply itself, right after its MAC announce and before its guest runs, so the
//! client gets it at once instead of when the promoted guest's TCP retransmits it
//! (docs/failover.md, "Output at promotion").

mod common;

use std::time::Duration;

use common::*;

const GUEST_MAC: &str = "02:55:44:00:00:01";

/// Captures what reaches the host from `tap1` (the promoted VM's TAP: frames its device or the
/// backup wrote; not what the host sends the VM) for `secs`, then writes to file `out` one JSON
/// line per frame from the guest's MAC: when (the kernel's receive timestamp, CLOCK_REALTIME ns:
/// a capture process that runs late does not shift it), its ethertype and, for TCP, ports,
/// sequence number and payload length.
const CAPTURE: &str = r#"
import json, socket, struct, sys, time
secs = float(sys.argv[1]); mac = bytes.fromhex(sys.argv[2].replace(":", "")); path = sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
s.bind(("tap1", 0)); s.settimeout(0.05)
end = time.monotonic() + secs; out = []
print("capturing", flush=True)
while time.monotonic() < end:
    try:
        f, anc, _, addr = s.recvmsg(65536, 1024)
    except socket.timeout:
        continue
    t = [sec * 10**9 + ns for (lvl, typ, d) in anc if lvl == socket.SOL_SOCKET
         for (sec, ns) in [struct.unpack("qq", d[:16])]]
    t = t[0] if t else time.time_ns()
    if addr[2] == socket.PACKET_OUTGOING or f[6:12] != mac:
        continue
    o = {"t": t, "type": struct.unpack_from("!H", f, 12)[0]}
    if o["type"] == 0x0800 and f[23] == 6:
        ihl = (f[14] & 15) * 4
        total = struct.unpack_from("!H", f, 16)[0]
        tcp = 14 + ihl
        o["sport"], o["dport"], o["seq"] = struct.unpack_from("!HHI", f, tcp)
        o["data"] = total - ihl - (f[tcp + 12] >> 4) * 4
    out.append(o)
with open(path, "w") as w:
    for o in out:
        w.write(json.dumps(o) + "\n")
"#;

/// One TCP connection with Linux's defaults; `incr counter 1` one at a time for `secs`. Reports
/// every request that waited over 1 ms as `[sent, answered, retransmissions]` (CLOCK_REALTIME
/// ns, comparable with the capture; the kernel's `tcpi_total_retrans` meanwhile); every reply
/// must be the previous one plus one.
const CLIENT: &str = r#"
import json, socket, struct, sys, time
host, secs = sys.argv[1], float(sys.argv[2])
s = socket.create_connection((host, 11211), timeout=10)
f = s.makefile("rb")
def retrans():
    return struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]
s.sendall(b"set counter 0 0 1\r\n0\r\n")
assert f.readline().strip() == b"STORED"
last, n, skips, slow = 0, 0, 0, []
end = time.monotonic() + secs
while time.monotonic() < end:
    r0, t = retrans(), time.time_ns()
    s.sendall(b"incr counter 1\r\n")
    v = int(f.readline())
    t1 = time.time_ns()
    if v != last + 1:
        skips += 1
    last, n = v, n + 1
    if t1 - t > 1000000:
        slow.append([t, t1, retrans() - r0])
print(json.dumps({"replies": n, "counter_skips": skips, "slow": slow}), flush=True)
"#;

#[test]
fn a_reply_committed_but_not_released_is_written_by_the_promoted_backup_without_a_retransmission() {
    let test = "a_reply_committed_but_not_released_is_written_by_the_promoted_backup_without_a_retransmission";
    let _g = serial_guard();
    if !kvm_available(test) {
        return;
    }
    // tap0 for the primary's guest, tap1 for the promoted one, the client on the bridge.
    let Some(ns) = NetNs::bridged(test, "ows", 94) else { return };
    // The primary dies (SIGKILL) when the ack of its 400th checkpoint arrives, before it
    // releases that checkpoint's output: with output-driven epochs and one request at a time,
    // that epoch holds the reply to the request in flight. The replica holds the epoch, so the
    // promoted guest has sent the reply already as far as it knows; only the backup can put it
    // on the wire now.
    let mut pair = Pair::kv_failover(&ns, "primary.acked@400");
    let mut cap = ns.command("/usr/bin/python3");
    let cap_file = pair.dir.path().join("tap1.jsonl");
    cap.args(["-c", CAPTURE, "14", GUEST_MAC, cap_file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let cap = cap.spawn().expect("capture");
    std::thread::sleep(Duration::from_millis(300));
    let out = python_in(&ns, CLIENT, &[&ns.guest_ip, "8"], Duration::from_secs(60));
    let v = json(out.lines().last().unwrap_or_default());
    let _ = pair.primary.child.wait();
    let captured = wait_with_timeout(cap, Duration::from_secs(30));
    assert!(captured.status.success(), "capture: {}", String::from_utf8_lossy(&captured.stderr));
    let frames: Vec<serde_json::Value> = read_text(&cap_file).lines().map(json).collect();
    let st = Pair::status(&pair.b_sock);
    eprintln!(
        "client: {} replies, {} slow\nbackup origin: {}",
        v["replies"],
        v["slow"].as_array().map_or(0, Vec::len),
        st["origin"]
    );
    assert_eq!(st["origin"]["kind"], "promoted", "the backup was not promoted: {}", pair.backup.stderr());
    assert_eq!(v["counter_skips"], 0, "a reply skipped or repeated an increment: {v}");
    // On tap1: the announce, then the frames the backup wrote (before the guest ran), then the
    // promoted guest's own.
    let announce = frames.iter().position(|f| f["type"] == 0x8035).expect("the MAC announce on tap1");
    let t_announce = frames[announce]["t"].as_u64().unwrap();
    let is_reply = |f: &&serde_json::Value| f["sport"] == 11211 && f["data"].as_u64().unwrap_or(0) > 0;
    if let Some(f) = frames[announce..].iter().find(is_reply) {
        eprintln!(
            "first reply segment on tap1: {} µs after the announce",
            (f["t"].as_u64().unwrap() - t_announce) / 1000
        );
    }
    let written = st["origin"]["output_written_frames"].as_u64().unwrap_or(0) as usize;
    assert!(written >= 1, "the promoted backup wrote no output frame: {}", pair.backup.stderr());
    let by_backup = &frames[announce + 1..(announce + 1 + written).min(frames.len())];
    let replies: Vec<&serde_json::Value> = by_backup.iter().filter(is_reply).collect();
    assert!(!replies.is_empty(), "no reply segment among the {written} frames the backup wrote: {by_backup:?}");
    for r in &replies {
        eprintln!(
            "reply segment seq {} ({} bytes) on tap1 {} µs after the announce",
            r["seq"],
            r["data"],
            (r["t"].as_u64().unwrap() - t_announce) / 1000
        );
    }
    // The promoted guest never retransmitted it: the client's ack reached the guest first.
    let later = &frames[announce + 1 + written..];
    for r in &replies {
        let again = later.iter().filter(is_reply).find(|f| f["seq"] == r["seq"]);
        assert!(again.is_none(), "the promoted guest retransmitted the reply the backup wrote: {again:?}");
    }
    // The client's request in flight at the failover (sent before the announce, answered after
    // it) got the reply the backup wrote, and its kernel retransmitted nothing meanwhile.
    let slow = v["slow"].as_array().expect("slow requests");
    let caught = slow
        .iter()
        .find(|r| r[0].as_u64().unwrap() < t_announce && r[1].as_u64().unwrap() > t_announce)
        .unwrap_or_else(|| panic!("no request of the client spans the failover: {slow:?}"));
    let (sent, answered) = (caught[0].as_u64().unwrap(), caught[1].as_u64().unwrap());
    let written_at = replies[0]["t"].as_u64().unwrap();
    eprintln!(
        "the request the failover caught waited {:.1} ms; answered {} µs after the backup wrote the reply",
        (answered - sent) as f64 / 1e6,
        answered.saturating_sub(written_at) / 1000
    );
    assert!(answered >= written_at, "answered before the backup wrote the reply: {caught:?}");
    assert_eq!(caught[2], 0, "the client had to retransmit the request: {caught:?}");
}
