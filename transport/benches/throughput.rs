//! End-to-end throughput over loopback, A/B in one run:
//! - `raw quinn`: one stream, 1 MiB writes, receiver drops the chunks (quinn's ceiling);
//! - `transport`: checkpoint-shaped traffic through our API: 64 KiB page-batch frames spread
//!   over the bulk streams, one control frame per 4 MiB "epoch", the receiver taking every
//!   frame as a whole `Bytes`.
//!
//! Both use the same TLS setup (mutual TLS, ring, TLS 1.3) and the same transport tuning.
//! Runs alternate (raw, ours, raw, ours, ...) so drift hits both; the table shows each run,
//! the median, and the ratio of medians. Sender and receiver share this process and the
//! machine's cores.
//!
//! `cargo bench -p transport` (env: `BENCH_MIB` bytes per run in MiB, default 512; `BENCH_RUNS`,
//! default 5; `BENCH_UDP_PAYLOAD`, largest UDP payload, default the tuning's 1452;
//! `BENCH_BULK_STREAMS`, default the tuning's 4; `BENCH_ONLY=raw|transport` runs one side, for
//! profiling). With `BENCH_JSON=FILE` the runs and medians are also written there as JSON
//! (`make bench`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use testbed::harness::proc::loadavg;
use testbed::harness::results::write_bench_json;
use testbed::harness::stats::percentile;
use transport::certs::{Authority, HostSpec, Identity, Validity};
use transport::{Endpoint, ProtocolVersions, Tuning, tls};

const MIB: usize = 1024 * 1024;
const FRAME: usize = 64 * 1024;
const FRAMES_PER_EPOCH: usize = 64;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn identity(ca: &Authority, host: &str) -> Identity {
    let issued = ca.issue(&HostSpec::new(host), Validity::days_from_now(1)).unwrap();
    Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

fn pattern(len: usize) -> Bytes {
    // Page-like content; QUIC does not compress, so any bytes will do.
    Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>())
}

/// Raw quinn: one uni stream, 1 MiB zero-copy writes, receiver reads chunks and drops them.
async fn raw_quinn(primary: &Identity, backup: &Identity, tuning: &Tuning, total: usize) -> f64 {
    let versions = ProtocolVersions::new(1);
    let transport = Arc::new(tuning.to_quinn().unwrap());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(backup, versions.clone()).unwrap()));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(tls::client_crypto(primary, versions).unwrap()));
    client.transport_config(transport);
    let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let (a, b) =
        tokio::join!(async { client_ep.connect_with(client, addr, "backup").unwrap().await.unwrap() }, async {
            server.accept().await.unwrap().await.unwrap()
        });
    let chunk = pattern(MIB);
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut stream = b.accept_uni().await.unwrap();
        let mut got = 0;
        while let Some(chunk) = stream.read_chunk(usize::MAX, true).await.unwrap() {
            got += chunk.bytes.len();
        }
        (got, b)
    });
    let mut stream = a.open_uni().await.unwrap();
    for _ in 0..total / MIB {
        stream.write_chunk(chunk.clone()).await.unwrap();
    }
    stream.finish().unwrap();
    let (got, _b) = receiver.await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(got, total);
    a.close(0u32.into(), b"done");
    client_ep.wait_idle().await;
    total as f64 / elapsed.as_secs_f64() / 1e6
}

/// Our API: 64 KiB bulk frames over the bulk streams, one control frame per epoch.
async fn transport(primary: &Identity, backup: &Identity, tuning: &Tuning, total: usize) -> f64 {
    let versions = ProtocolVersions::new(1);
    let any = "127.0.0.1:0".parse().unwrap();
    let server = Endpoint::bind(any, backup, versions.clone(), tuning.clone()).unwrap();
    let client = Endpoint::bind(any, primary, versions, tuning.clone()).unwrap();
    let (a, b) = tokio::try_join!(client.connect(server.local_addr().unwrap(), "backup"), server.accept()).unwrap();
    let frames = total / FRAME;
    let epochs = frames / FRAMES_PER_EPOCH;
    let batch = pattern(FRAME);
    let start = Instant::now();
    let receiver = tokio::spawn({
        let b = b.clone();
        async move {
            let control = tokio::spawn({
                let b = b.clone();
                async move {
                    for _ in 0..epochs {
                        b.recv_frame().await.unwrap();
                    }
                }
            });
            let mut got = 0;
            for _ in 0..frames {
                got += b.recv_bulk().await.unwrap().len();
            }
            control.await.unwrap();
            got
        }
    });
    for epoch in 0..epochs {
        for _ in 0..FRAMES_PER_EPOCH {
            a.send_bulk(batch.clone()).await.unwrap();
        }
        a.send_frame(Bytes::from((epoch as u64).to_be_bytes().to_vec())).await.unwrap();
    }
    let got = receiver.await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(got, frames * FRAME);
    a.close("done").await;
    (frames * FRAME) as f64 / elapsed.as_secs_f64() / 1e6
}

/// The upper median.
fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5).expect("some runs")
}

fn main() {
    let load_before = loadavg();
    let total = env("BENCH_MIB", 512) * MIB;
    let runs = env("BENCH_RUNS", 5);
    let mut tuning = Tuning::default();
    if let Ok(payload) = std::env::var("BENCH_UDP_PAYLOAD") {
        tuning.max_udp_payload = payload.parse().unwrap();
    }
    if let Ok(streams) = std::env::var("BENCH_BULK_STREAMS") {
        tuning.bulk_streams = streams.parse().unwrap();
    }
    // Both sides unless BENCH_ONLY names one (an unknown name is an error, not both).
    let only = match std::env::var("BENCH_ONLY") {
        Ok(v) if !v.trim().is_empty() => {
            testbed::harness::results::bench_sections(&v, &["raw", "transport"]).unwrap_or_else(|e| panic!("{e}"))
        }
        _ => vec!["raw".to_string(), "transport".to_string()],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
    let (primary, backup) = (identity(&ca, "primary"), identity(&ca, "backup"));
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        // Warm-up: page in code and buffers.
        raw_quinn(&primary, &backup, &tuning, 64 * MIB).await;
        transport(&primary, &backup, &tuning, 64 * MIB).await;
        for _ in 0..runs {
            if only.iter().any(|s| s == "raw") {
                raw.push(raw_quinn(&primary, &backup, &tuning, total).await);
            }
            if only.iter().any(|s| s == "transport") {
                ours.push(transport(&primary, &backup, &tuning, total).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    let med = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    let results = json!({
        "mib_per_run": total / MIB,
        "runs": runs,
        "max_udp_payload": tuning.max_udp_payload,
        "bulk_streams": tuning.bulk_streams,
        "raw_mb_per_s": raw,
        "transport_mb_per_s": ours,
        "raw_median_mb_per_s": med(&raw),
        "transport_median_mb_per_s": med(&ours),
        "ratio": med(&raw).zip(med(&ours)).map(|(r, o)| o / r),
    });
    write_bench_json("transport", &load_before, results).expect("write BENCH_JSON");
    if raw.is_empty() || ours.is_empty() {
        println!("raw quinn: {} MB/s; transport: {} MB/s", show(&raw), show(&ours));
        return;
    }
    let (raw_median, ours_median) = (median(&raw), median(&ours));
    println!();
    println!(
        "transport throughput over loopback: {} MiB per run, {runs} runs, max udp payload {}, {} bulk streams",
        total / MIB,
        tuning.max_udp_payload,
        tuning.bulk_streams
    );
    println!(
        "machine: {} cores, load average before {load_before}, after {} (other processes share the cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    println!("| variant | runs (MB/s) | median MB/s | ratio |");
    println!("|---|---|---|---|");
    println!("| raw quinn, 1 stream, 1 MiB writes | {} | {raw_median:.0} | 1.00 |", show(&raw));
    println!(
        "| transport, 64 KiB frames over {} bulk streams + control | {} | {ours_median:.0} | {:.2} |",
        tuning.bulk_streams,
        show(&ours),
        ours_median / raw_median
    );
}
