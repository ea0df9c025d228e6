//! The tasks that take frames off the peer's streams and queue them for the application.
//!
//! One task accepts the peer's streams; one task per stream reads its header, then its records.
//! Before reading a frame's body a reader takes the frame's size in permits from its queue's
//! byte budget; the application gives them back by taking the frame. So when the application
//! reads slowly the readers stop reading, quinn stops extending flow-control credit, and the
//! peer's writes wait: memory stays bounded by the budget plus the QUIC receive windows.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, ReadExactError, RecvStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::wire::{self, HEADER_LEN, Record, StreamKind};
use super::{CODE_GOODBYE, Counters, State};

/// Bytes of budget a queued frame costs beyond its payload.
const QUEUE_OVERHEAD: u32 = 64;

/// A received frame and the budget it holds until the application takes it.
#[derive(Debug)]
pub(super) struct Queued {
    pub bytes: Bytes,
    pub _permit: OwnedSemaphorePermit,
}

/// One receive queue: the channel to the application and its byte budget.
pub(super) struct Queue {
    pub tx: mpsc::UnboundedSender<Queued>,
    pub budget: Arc<Semaphore>,
    pub budget_max: u32,
}

/// What the reader tasks share. Dropping the last one closes the application's channels.
pub(super) struct Inbound {
    pub quinn: quinn::Connection,
    pub peer: SocketAddr,
    pub max_frame: u32,
    pub control: Queue,
    pub bulk: Queue,
    pub state: Arc<State>,
    pub counters: Arc<Counters>,
    /// Told the peer's bulk stream count when its control stream arrives.
    pub ready: Mutex<Option<oneshot::Sender<u8>>>,
}

impl Inbound {
    fn fail(&self, what: String) {
        self.state.fail_protocol(&self.quinn, self.peer, what);
    }
}

/// Accepts the peer's streams until the connection ends.
pub(super) async fn accept_streams(inbound: Arc<Inbound>) {
    while let Ok(recv) = inbound.quinn.accept_uni().await {
        tokio::spawn(read_stream(recv, inbound.clone()));
    }
}

async fn read_stream(mut recv: RecvStream, inbound: Arc<Inbound>) {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(n)) => {
            return inbound.fail(format!("stream ended {n} bytes into its header"));
        }
        Err(ReadExactError::ReadError(error)) => return read_error(&inbound, "a new", error),
    }
    let kind = match wire::parse_header(&header) {
        Ok(kind) => kind,
        Err(what) => return inbound.fail(what),
    };
    let queue = match kind {
        StreamKind::Control { bulk_streams } => {
            if !inbound.state.peer_control_opened(bulk_streams) {
                return inbound.fail("second control stream".to_owned());
            }
            let ready = inbound.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(ready) = ready {
                let _ = ready.send(bulk_streams);
            }
            &inbound.control
        }
        StreamKind::Bulk { .. } => &inbound.bulk,
    };
    read_records(recv, &inbound, queue, kind).await;
}

async fn read_records(mut recv: RecvStream, inbound: &Inbound, queue: &Queue, kind: StreamKind) {
    let name = kind.name();
    loop {
        let mut word = [0u8; 4];
        match recv.read_exact(&mut word).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => {
                // A clean end between records: part of a goodbye.
                if inbound.state.peer_stream_ended() {
                    inbound.quinn.close(CODE_GOODBYE.into(), b"goodbye received");
                }
                return;
            }
            Err(ReadExactError::FinishedEarly(n)) => {
                return inbound.fail(format!("{name} stream ended {n} bytes into a length word"));
            }
            Err(ReadExactError::ReadError(error)) => return read_error(inbound, name, error),
        }
        let len = match wire::parse_word(word, kind, inbound.max_frame) {
            Ok(Record::Goodbye(len)) => {
                let reason = match read_body(&mut recv, len).await {
                    Ok(reason) => String::from_utf8_lossy(&reason).into_owned(),
                    Err(Some(error)) => return read_error(inbound, name, error),
                    Err(None) => return inbound.fail("goodbye record cut short".to_owned()),
                };
                inbound.state.peer_said_goodbye(reason);
                continue;
            }
            Ok(Record::Frame(len)) => len,
            Err(what) => return inbound.fail(what),
        };
        // Each queued frame also costs its bookkeeping, so empty frames cannot pile up.
        let cost = u32::try_from(len).unwrap_or(u32::MAX).saturating_add(QUEUE_OVERHEAD).min(queue.budget_max);
        let Ok(permit) = queue.budget.clone().acquire_many_owned(cost).await else {
            return; // the connection was dropped
        };
        let bytes = match read_body(&mut recv, len).await {
            Ok(bytes) => bytes,
            Err(Some(error)) => return read_error(inbound, name, error),
            Err(None) => {
                return inbound.fail(format!("{name} stream ended inside a {len}-byte frame"));
            }
        };
        if matches!(kind, StreamKind::Control { .. }) {
            tracing::trace!(len, wall_ns = crate::wall_ns(), "control frame read");
        }
        inbound.counters.queued_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let queued = Queued { bytes, _permit: permit };
        if queue.tx.send(queued).is_err() {
            return; // the application dropped the connection
        }
    }
}

/// Reads exactly `len` bytes into one buffer. `Err(None)`: the stream ended first.
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Bytes, Option<ReadError>> {
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(None),
            Err(error) => return Err(Some(error)),
        }
    }
    Ok(body.freeze())
}

fn read_error(inbound: &Inbound, name: &str, error: ReadError) {
    match error {
        // The connection's close reason tells the application what happened.
        ReadError::ConnectionLost(_) => {}
        ReadError::Reset(code) => inbound.fail(format!("peer reset its {name} stream (code {code})")),
        other => inbound.fail(format!("reading the {name} stream: {other}")),
    }
}
