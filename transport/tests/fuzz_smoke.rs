//! A short, deterministic fuzz run inside `cargo test`: random and mutated inputs into each fuzz
//! entry point of `transport::fuzzing` (the same functions the `cargo fuzz` targets in `fuzz/`
//! call), so every test run exercises stream framing and the handshake's diagnosis on hostile
//! input.
//!
//! `FUZZ_SMOKE_ITERS` sets the inputs per target (default 100,000 and 25,000 in release);
//! `FUZZ_SEED_DIR` also writes the seeds out as files (see `replication_proto::fuzzing::smoke`,
//! whose harness this uses).

use replication_proto::fuzzing::smoke;
use transport::certs::{Authority, HostSpec, Validity};
use transport::fuzzing;

#[test]
fn fuzz_smoke_framing() {
    let mut control = b"USTY\x00\x02\x00\x00".to_vec();
    for frame in [&b""[..], b"epoch 7 begins", &[0xab; 300]] {
        control.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        control.extend_from_slice(frame);
    }
    control.extend_from_slice(b"\x80\x00\x00\x03bye");
    let mut bulk = b"USTY\x01\x01\x00\x00".to_vec();
    bulk.extend_from_slice(&64u32.to_be_bytes());
    bulk.extend_from_slice(&[7; 64]);
    let seeds = vec![[vec![2], control.clone()].concat(), [vec![1], bulk].concat(), [vec![0], control].concat()];
    smoke::run("framing", &seeds, 1, smoke::iterations(100_000, 5_000), |_, _| {}, fuzzing::framing);
}

#[test]
fn fuzz_smoke_handshake() {
    let ca = Authority::generate(Validity::days_from_now(30)).unwrap();
    let issued = ca.issue(&HostSpec::new("primary"), Validity::days_from_now(30)).unwrap();
    let der = ca.cert_der().to_vec();
    let pem_body: String = issued.cert_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let leaf = decode_base64(&pem_body);
    let mut seeds = Vec::new();
    for (flags, verdict) in [(7u8, 0u8), (5, 1), (7, 2), (5, 3), (1, 0), (0, 0)] {
        for cert in [&der, &leaf] {
            let mut s = vec![flags, 1, 3, 12];
            s.extend_from_slice(b"understudy/1");
            s.extend_from_slice(&[2, b'h', b'3', 12]);
            s.extend_from_slice(b"understudy/9");
            s.extend_from_slice(&(cert.len() as u16).to_be_bytes());
            s.extend_from_slice(cert);
            s.extend_from_slice(&[verdict, 5, 0x80]);
            s.extend_from_slice(&(0x100u64 + 48).to_le_bytes());
            s.extend_from_slice(b"peer says no");
            seeds.push(s);
        }
    }
    smoke::run("handshake", &seeds, 2, smoke::iterations(25_000, 1_000), |_, _| {}, fuzzing::handshake);
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().enumerate().fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            n.to_be_bytes()[1..c.len()].to_vec()
        })
        .collect()
}
