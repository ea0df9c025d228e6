//! replication-proto's Sender and Receiver over real QUIC connections through the session
//! driver: baseline, incremental epochs, acks, then an orderly goodbye.

mod common;

use std::time::Duration;

use common::{Pki, endpoint, tuning};
use replication_proto::{
    MemoryImage, MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig, SenderEvent,
    VmIdentity,
};
use transport::proto::{self, receiver_session, sender_session};

const PAGE: usize = 4096;
const PAGES: u64 = 1024; // a 4 MiB guest

fn page(pfn: u64, epoch: u64) -> Vec<u8> {
    let mut page = vec![(pfn as u8) ^ (epoch as u8); PAGE];
    page[..8].copy_from_slice(&(pfn * 1000 + epoch).to_le_bytes());
    page
}

async fn next<E: std::fmt::Debug>(session: &mut transport::Session<impl transport::Protocol<Event = E>>) -> E {
    tokio::time::timeout(Duration::from_secs(10), session.next_event())
        .await
        .expect("event within 10 s")
        .expect("session still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_and_receiver_replicate_over_quic() {
    let pki = Pki::new();
    let versions = proto::protocol_versions();
    let primary = endpoint(&pki.identity("primary"), versions.clone(), tuning());
    let backup = endpoint(&pki.identity("backup"), versions, tuning());
    let (a, b) = tokio::try_join!(primary.connect(backup.local_addr().unwrap(), "backup"), backup.accept()).unwrap();
    assert_eq!(a.version(), u32::from(replication_proto::PROTOCOL_VERSION));

    let vm = VmIdentity { uuid: [7; 16], name: "demo".into() };
    let layout = MemoryLayout::flat(PAGE as u32, PAGES * PAGE as u64);
    let sender = Sender::new(SenderConfig::new(Role::Primary, vm.clone(), layout.clone(), 1));
    let receiver = Receiver::new(ReceiverConfig::new(Role::Backup, vm, layout.clone(), 2));
    let mut primary_session = sender_session(a, sender);
    let mut backup_session = receiver_session(b, receiver);
    // Both report the established session (the sender also says it needs a baseline first).
    while !matches!(next(&mut primary_session).await, SenderEvent::Connected { .. }) {}
    while !matches!(next(&mut backup_session).await, ReceiverEvent::Connected { .. }) {}

    // The guest as the primary sees it, and the backup's replica.
    let mut guest: Vec<Vec<u8>> = (0..PAGES).map(|pfn| page(pfn, 0)).collect();
    let mut replica = MemoryImage::new(&layout);

    for epoch_index in 0..4u64 {
        // Epoch 0 is the baseline (every page); later ones dirty every third page.
        let dirty: Vec<u64> = if epoch_index == 0 {
            (0..PAGES).collect()
        } else {
            (0..PAGES).filter(|p| p % 3 == epoch_index % 3).collect()
        };
        for &pfn in &dirty {
            guest[pfn as usize] = page(pfn, epoch_index);
        }
        let pages: Vec<(u64, Vec<u8>)> = dirty.iter().map(|&pfn| (pfn, guest[pfn as usize].clone())).collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        primary_session
            .call(move |sender, now| {
                let pages = pages.iter().map(|(pfn, data)| (*pfn, &data[..]));
                let state = format!("state {epoch_index}");
                let epoch = if epoch_index == 0 {
                    sender.submit_baseline(now, pages, state.as_bytes())
                } else {
                    sender.submit(now, pages, state.as_bytes())
                };
                let _ = tx.send(epoch.unwrap());
            })
            .await
            .unwrap();
        let epoch = rx.await.unwrap();

        // The backup's owner: apply the whole checkpoint, then commit it.
        let checkpoint = loop {
            if let ReceiverEvent::Checkpoint(cp) = next(&mut backup_session).await {
                break cp;
            }
        };
        assert_eq!(checkpoint.epoch(), epoch);
        assert_eq!(checkpoint.state(), format!("state {epoch_index}").as_bytes());
        checkpoint.apply(&mut replica).unwrap();
        backup_session
            .call(move |receiver, now| {
                receiver.committed(now, epoch).unwrap();
            })
            .await
            .unwrap();

        // The primary hears the ack: output up to this epoch may go.
        loop {
            if let SenderEvent::Acked { epoch: acked, .. } = next(&mut primary_session).await {
                assert_eq!(acked, epoch);
                break;
            }
        }
        assert_eq!(replica.as_bytes(), guest.concat().as_slice());
        println!("epoch {epoch}: {} pages replicated and acked", dirty.len());
    }

    primary_session.close("primary done").await.unwrap();
    let event = loop {
        if let ReceiverEvent::Disconnected { error } = next(&mut backup_session).await {
            break error;
        }
    };
    println!("backup: {event}");
    assert!(event.to_string().contains("primary done"), "{event}");
    let primary_end = primary_session.finish().await.unwrap();
    assert!(primary_end.result.is_ok(), "{:?}", primary_end.result);
    let backup_end = backup_session.finish().await.unwrap();
    println!("backup session: {:?}", backup_end.result);
    assert_eq!(backup_end.core.endpoint().stats().commits, 4);
}
