#![cfg(feature = "net")]

//! Three real nodes on loopback UDP with directory journals: the witness through `run_witness`,
//! the two agents through `spawn_arbiter`. Protection, then the primary's process dies and the
//! backup takes over; then the witness restarts from its journal with its vote intact.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use failover::net::{self, ArbiterHandle, UdpLink, WitnessConfig};
use failover::{Arbiter, ArbiterConfig, Event, VmId};
use tokio::sync::mpsc;

const VM: VmId = VmId(42);

fn free_addr() -> SocketAddr {
    // Bind and release: good enough for a test on loopback.
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn wait_for(
    events: &mut mpsc::UnboundedReceiver<Event>,
    what: &str,
    limit: Duration,
    f: impl Fn(&Event) -> bool,
) -> Event {
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, events.recv()).await {
            Ok(Some(e)) if f(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{what}: event stream closed"),
            Err(_) => panic!("{what}: not within {limit:?}"),
        }
    }
}

/// Real time on a shared 2-core machine: a lease may blink under load, so wait for it.
async fn eventually_releases(node: &ArbiterHandle) -> bool {
    for _ in 0..100 {
        if node.call(|a, now| a.may_release_output(now, VM)).await.unwrap() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn agent(
    id: u64,
    dir: &std::path::Path,
    addrs: &[(u64, SocketAddr)],
) -> (ArbiterHandle, mpsc::UnboundedReceiver<Event>, tokio::task::JoinHandle<Result<(), net::NetError>>) {
    let me = addrs.iter().find(|(n, _)| *n == id).unwrap().1;
    let peers: Vec<_> = addrs.iter().copied().filter(|(n, _)| *n != id).collect();
    let config = ArbiterConfig { preferred_leader: Some(3), ..ArbiterConfig::new(id, &[1, 2, 3]) };
    let arbiter = Arbiter::open_dir(config, dir, Instant::now()).unwrap();
    let (link, inbox) = UdpLink::bind(id, me, &peers).await.unwrap();
    net::spawn_arbiter(arbiter, link, inbox)
}

#[tokio::test(flavor = "current_thread")]
async fn protect_kill_primary_and_take_over_over_udp() {
    let tmp = tempfile::tempdir().unwrap();
    let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
    let witness_config = WitnessConfig::new(3, tmp.path().join("witness"), addrs[2].1, vec![addrs[0], addrs[1]]);
    let witness = tokio::spawn(net::run_witness(witness_config.clone()));
    let (primary, mut primary_events, primary_task) = agent(1, &tmp.path().join("primary"), &addrs).await;
    let (backup, mut backup_events, _backup_task) = agent(2, &tmp.path().join("backup"), &addrs).await;

    // Protection: the primary asks for the VM, then records its synchronised backup.
    primary.call(|a, now| a.request_activity(now, VM)).await.unwrap().unwrap();
    let granted =
        wait_for(&mut primary_events, "first grant", Duration::from_secs(5), |e| matches!(e, Event::Granted { .. }))
            .await;
    assert_eq!(granted, Event::Granted { vm: VM, generation: 1 });
    let permit = primary.call(|a, now| a.permit(now, VM)).await.unwrap().expect("the holder has a permit");
    assert_eq!(permit.generation, 1);
    primary.call(|a, now| a.set_backup(now, VM, 2)).await.unwrap().unwrap();
    wait_for(&mut backup_events, "backup recorded", Duration::from_secs(5), |e| matches!(e, Event::BackupOf { .. }))
        .await;
    // The lease keeps being renewed over real UDP.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(eventually_releases(&primary).await);
    assert!(!backup.call(|a, now| a.may_release_output(now, VM)).await.unwrap());
    // The backup may not take over while the primary lives: its request is refused.
    backup.call(|a, now| a.report_primary_dead(now, VM)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backup.call(|a, _| a.record(VM).map(|r| r.generation)).await.unwrap(), Some(1));
    assert!(eventually_releases(&primary).await);

    // The primary's process dies; the backup's detector (simulated here) keeps reporting it.
    primary_task.abort();
    let killed = Instant::now();
    let granted =
        wait_for(&mut backup_events, "takeover", Duration::from_secs(5), |e| matches!(e, Event::Granted { .. })).await;
    let took = killed.elapsed();
    assert_eq!(granted, Event::Granted { vm: VM, generation: 2 });
    println!("udp loopback: primary task aborted -> backup granted in {took:?}");
    assert!(eventually_releases(&backup).await);

    // The witness restarts from its journal; the promoted backup keeps (or regains) its lease.
    witness.abort();
    let _ = witness.await;
    tokio::time::sleep(Duration::from_millis(50)).await; // let the receive task release the port
    let witness = tokio::spawn(net::run_witness(witness_config));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(eventually_releases(&backup).await);
    let record = backup.call(|a, _| a.record(VM)).await.unwrap().unwrap();
    assert_eq!((record.holder, record.generation), (2, 2));
    witness.abort();
}
