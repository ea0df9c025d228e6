//! Running `replication-proto`'s [`Sender`] and [`Receiver`] over a [`Connection`].
//!
//! Both implement `replication_proto::Endpoint` (one ordered byte stream, datagrams and whole
//! bulk frames), which this module bridges to [`StreamEndpoint`]: each `Transmit` on the stream
//! channel becomes one control frame (without copying), each datagram transmit a QUIC datagram,
//! each bulk transmit (post-copy pushes) a frame on a bulk stream; received control frames are
//! fed back as stream bytes in order, so the peer's core reads exactly the byte stream ours
//! wrote, and bulk frames whole through `handle_frame`. [`sender_session`] and [`receiver_session`] start the driver; the
//! session ends with the core's `Disconnected` event (closing the connection with its reason)
//! or with the connection, and [`crate::session::Finished`] gives the core back to reconnect.
//!
//! ```no_run
//! # async fn demo(connection: transport::Connection, sender: replication_proto::Sender) {
//! use replication_proto::SenderEvent;
//! use transport::proto;
//!
//! let mut session = proto::sender_session(connection, sender);
//! let page = vec![0xab; 4096];
//! session
//!     .call(move |sender, now| {
//!         sender.submit_baseline(now, [(3u64, &page[..])], b"vcpu state").unwrap();
//!     })
//!     .await
//!     .unwrap();
//! while let Some(event) = session.next_event().await {
//!     if let SenderEvent::Acked { epoch, .. } = event {
//!         println!("epoch {epoch} committed on the backup: release its output");
//!     }
//! }
//! # }
//! ```

use std::time::Instant;

use bytes::Bytes;
use replication_proto::{Endpoint, PROTOCOL_VERSION, Receiver, ReceiverEvent, Sender, SenderEvent, version};

use crate::connection::Connection;
use crate::session::{Channel, Frame, Session, StreamCore, StreamEndpoint};
use crate::tls::ProtocolVersions;

/// The ALPN versions of this build's replication protocol: the current one and the previous
/// one it still accepts (`understudy/<n>`).
pub fn protocol_versions() -> ProtocolVersions {
    let mut versions = ProtocolVersions::new(u32::from(PROTOCOL_VERSION));
    for older in version::oldest_accepted(PROTOCOL_VERSION)..PROTOCOL_VERSION {
        versions = versions.also_accept(u32::from(older));
    }
    versions
}

impl<E> StreamEndpoint for E
where
    E: Endpoint + Send + 'static,
    E::Event: Send + 'static,
{
    type Event = E::Event;

    fn connect(&mut self, now: Instant) {
        Endpoint::connect(self, now);
    }

    fn disconnect(&mut self, now: Instant) {
        Endpoint::disconnect(self, now);
    }

    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        Endpoint::handle_input(self, now, data);
    }

    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        Endpoint::handle_datagram(self, now, datagram);
    }

    fn handle_timeout(&mut self, now: Instant) {
        Endpoint::handle_timeout(self, now);
    }

    fn handle_bulk(&mut self, now: Instant, frame: &[u8]) {
        Endpoint::handle_frame(self, now, frame);
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        Endpoint::poll_transmit(self, now).map(frame)
    }

    fn poll_urgent_transmit(&mut self, now: Instant) -> Option<Frame> {
        Endpoint::poll_urgent_transmit(self, now).map(frame)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Endpoint::poll_timeout(self)
    }

    fn poll_event(&mut self) -> Option<E::Event> {
        Endpoint::poll_event(self)
    }

    fn close(&mut self, now: Instant, detail: &str) {
        Endpoint::close(self, now, detail);
    }
}

/// A core's transmit as a driver frame (without copying).
fn frame(transmit: replication_proto::Transmit) -> Frame {
    let channel = match transmit.channel() {
        replication_proto::Channel::Stream => Channel::Control,
        replication_proto::Channel::Datagram => Channel::Datagram,
        replication_proto::Channel::Bulk => Channel::Bulk,
    };
    Frame { channel, payload: Bytes::from_owner(transmit) }
}

/// The primary's (or migration source's) side: drives `sender` over `connection`.
pub fn sender_session(connection: Connection, sender: Sender) -> Session<StreamCore<Sender>> {
    Session::spawn(connection, sender_core(sender))
}

/// [`sender_session`] with a [`crate::session::Tap`] on its events.
pub fn sender_session_tapped(
    connection: Connection,
    sender: Sender,
    tap: crate::session::Tap<Sender>,
) -> Session<StreamCore<Sender>> {
    Session::spawn(connection, sender_core(sender).with_tap(tap))
}

fn sender_core(sender: Sender) -> StreamCore<Sender> {
    StreamCore::new(sender, |event| match event {
        SenderEvent::Disconnected { error } => Some(error.to_string()),
        _ => None,
    })
}

/// The backup's (or migration destination's) side: drives `receiver` over `connection`.
pub fn receiver_session(connection: Connection, receiver: Receiver) -> Session<StreamCore<Receiver>> {
    Session::spawn(connection, receiver_core(receiver))
}

/// Sends a receiver's last word (`cmd`: a migration destination's `Resumed` or `Complete`, a
/// source's `Superseded` goodbye) and waits up to 2 s for the session to end on it (the peer
/// closing, or the goodbye gone out).
pub async fn last_word(session: &mut Session<StreamCore<Receiver>>, cmd: crate::session::StreamCommand<Receiver>) {
    if session.command(cmd).await.is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(ev) = session.next_event().await {
                if matches!(ev, replication_proto::ReceiverEvent::Disconnected { .. }) {
                    break;
                }
            }
        })
        .await;
    }
}

/// [`receiver_session`] with a [`crate::session::Tap`] on its events.
pub fn receiver_session_tapped(
    connection: Connection,
    receiver: Receiver,
    tap: crate::session::Tap<Receiver>,
) -> Session<StreamCore<Receiver>> {
    Session::spawn(connection, receiver_core(receiver).with_tap(tap))
}

fn receiver_core(receiver: Receiver) -> StreamCore<Receiver> {
    StreamCore::new(receiver, |event| match event {
        ReceiverEvent::Disconnected { error } => Some(error.to_string()),
        _ => None,
    })
}
