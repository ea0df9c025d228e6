#![cfg(feature = "net")]

//! A dead arbiter task is loud: it logs an error, and every call on its handle fails with the
//! reason, so its owner can act (the `understudy` process stops its guest and exits non-zero).
//! Before, the task died silently: calls failed with "driver stopped", nobody waited for it,
//! and a primary's output stayed held for good.

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Logs;
use failover::journal::{Backend, Journal, MemBackend, MemDisk};
use failover::net::{self, NetError, UdpLink};
use failover::{Arbiter, ArbiterConfig, VmId};

/// A disk that fails every write once `broken` is set.
struct Breakable {
    inner: MemBackend,
    broken: Arc<AtomicBool>,
}

impl Breakable {
    fn check(&self) -> io::Result<()> {
        if self.broken.load(Ordering::SeqCst) { Err(io::Error::other("disk unplugged")) } else { Ok(()) }
    }
}

impl Backend for Breakable {
    fn describe(&self) -> String {
        "breakable".into()
    }
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        self.inner.read_all()
    }
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.check()?;
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.truncate(len)
    }
    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.replace(bytes)
    }
}

/// A group of one (it leads at once) on a breakable disk, driven over a UDP link with no peer.
async fn lone_arbiter(broken: &Arc<AtomicBool>) -> (net::ArbiterHandle, tokio::task::JoinHandle<Result<(), NetError>>) {
    let disk = MemDisk::new();
    let (journal, recovered) =
        Journal::open(Box::new(Breakable { inner: disk.backend(), broken: broken.clone() })).unwrap();
    let arbiter = Arbiter::open(ArbiterConfig::new(1, &[1]), journal, recovered, Instant::now()).unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (link, inbox) = UdpLink::bind(1, listen, &[]).await.unwrap();
    let (handle, _events, task) = net::spawn_arbiter(arbiter, link, inbox);
    (handle, task)
}

#[tokio::test(flavor = "current_thread")]
async fn a_panic_in_the_arbiter_task_fails_every_call_with_the_reason() {
    let logs = Logs::global();
    let broken = Arc::new(AtomicBool::new(false));
    let (handle, task) = lone_arbiter(&broken).await;
    assert_eq!(handle.call(|a, _| a.id()).await.unwrap(), 1);
    assert_eq!(handle.failure(), None);
    let err = handle.call(|_, _| -> () { panic!("boom") }).await.unwrap_err();
    assert_eq!(err.to_string(), "arbiter task ended: panicked: boom");
    assert_eq!(handle.failure().as_deref(), Some("panicked: boom"));
    let err = handle.call(|a, _| a.id()).await.unwrap_err();
    assert!(matches!(err, NetError::Failed { ref reason } if reason == "panicked: boom"), "{err}");
    assert_eq!(handle.failed().await, "panicked: boom");
    assert!(matches!(task.await.unwrap(), Err(NetError::Failed { .. })));
    let logged = logs.text();
    assert!(logged.contains("ERROR") && logged.contains("ARBITER STOPPED: panicked: boom"), "{logged}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_journal_failure_ends_the_task_and_says_why() {
    let logs = Logs::global();
    let broken = Arc::new(AtomicBool::new(false));
    let (handle, task) = lone_arbiter(&broken).await;
    let vm = VmId(3);
    handle.call(move |a, now| a.request_activity(now, vm)).await.unwrap().unwrap();
    for _ in 0..100 {
        if handle.call(move |a, now| a.may_release_output(now, vm)).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(handle.call(move |a, now| a.may_release_output(now, vm)).await.unwrap(), "never granted");
    // The next renewal cannot be written.
    broken.store(true, Ordering::SeqCst);
    let reason = tokio::time::timeout(Duration::from_secs(5), handle.failed()).await.expect("the task went on");
    assert!(reason.contains("arbiter journal") && reason.contains("disk unplugged"), "{reason}");
    let err = handle.call(|a, _| a.id()).await.unwrap_err();
    assert!(err.to_string().contains("disk unplugged"), "{err}");
    assert!(task.await.unwrap().is_err());
    let logged = logs.text();
    assert!(
        logged.lines().any(|l| l.contains("ERROR") && l.contains("ARBITER STOPPED") && l.contains("disk unplugged")),
        "{logged}"
    );
}
