//! Runs a core that speaks one ordered byte stream plus datagrams and whole bulk frames, the
//! shape of `replication-proto`'s `Endpoint` trait: its outgoing stream frames go on the control
//! stream (each transmit is one of our frames, so the peer's core receives the same byte
//! stream), its datagrams as QUIC datagrams, its bulk frames on the bulk streams (each handed to
//! the peer's core whole).
//!
//! [`crate::proto`] implements [`StreamEndpoint`] for every replication-proto `Endpoint`
//! (`Sender`, `Receiver`).

use std::convert::Infallible;
use std::time::Instant;

use super::{Channel, Frame, Protocol, Session};
use crate::connection::ConnectionError;

/// A sans-IO endpoint over an ordered byte stream and datagrams (replication-proto's
/// `Endpoint`): `connect` on a new connection, bytes in with `handle_input`, frames out with
/// `poll_transmit`, `disconnect` when the connection is gone.
pub trait StreamEndpoint: Send + 'static {
    /// What the endpoint reports to its owner.
    type Event: Send + 'static;
    /// A new connection is up.
    fn connect(&mut self, now: Instant);
    /// The connection is gone.
    fn disconnect(&mut self, now: Instant);
    /// Stream bytes, in order, in pieces of any size.
    fn handle_input(&mut self, now: Instant, data: &[u8]);
    /// One datagram.
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]);
    /// One whole frame from a bulk stream. By default dropped with a warning (an endpoint that
    /// never sends bulk frames has a peer that never does either).
    fn handle_bulk(&mut self, _now: Instant, frame: &[u8]) {
        tracing::warn!(len = frame.len(), "bulk frame for a stream endpoint dropped");
    }
    /// The time from [`StreamEndpoint::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant);
    /// The next frame to send: [`Channel::Control`] for stream bytes (written in order),
    /// [`Channel::Datagram`] for a datagram, [`Channel::Bulk`] for a bulk stream; `now` is when
    /// it goes out.
    fn poll_transmit(&mut self, now: Instant) -> Option<Frame>;
    /// The next frame to send that is not [`Channel::Bulk`] (see
    /// [`Protocol::poll_urgent_transmit`]). By default none.
    fn poll_urgent_transmit(&mut self, _now: Instant) -> Option<Frame> {
        None
    }
    /// When to call [`StreamEndpoint::handle_timeout`] next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next event for the owner.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// Ends the session with a goodbye.
    fn close(&mut self, now: Instant, detail: &str);
}

/// Work for the endpoint, run by the driver with the current time.
pub type EndpointCall<E> = Box<dyn FnOnce(&mut E, Instant) + Send>;

/// What the application asks of a [`StreamCore`].
pub enum StreamCommand<E> {
    /// Run this with the endpoint and the current time (e.g. hand it a checkpoint).
    With(EndpointCall<E>),
    /// Close the session: the endpoint's `close`, then the connection, with this reason.
    Close(String),
}

impl<E> StreamCommand<E> {
    /// A [`StreamCommand::With`].
    pub fn with(f: impl FnOnce(&mut E, Instant) + Send + 'static) -> Self {
        StreamCommand::With(Box::new(f))
    }
}

impl<E> std::fmt::Debug for StreamCommand<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamCommand::With(_) => f.write_str("With(..)"),
            StreamCommand::Close(reason) => f.debug_tuple("Close").field(reason).finish(),
        }
    }
}

type EndsSession<Event> = Box<dyn Fn(&Event) -> Option<String> + Send>;

/// Handles events inside the session's task, before they reach the owner (post-copy answers a
/// page request, or places an answered page, without two hops through the owner's task): gets
/// the endpoint and each event; returns the event to pass on, or `None` when it consumed it.
pub type Tap<E> = Box<dyn FnMut(&mut E, <E as StreamEndpoint>::Event) -> Option<<E as StreamEndpoint>::Event> + Send>;

/// A [`StreamEndpoint`] as a [`Protocol`] for [`super::Session`].
pub struct StreamCore<E: StreamEndpoint> {
    endpoint: E,
    ends: EndsSession<E::Event>,
    finished: Option<String>,
    tap: Option<Tap<E>>,
}

impl<E: StreamEndpoint> std::fmt::Debug for StreamCore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCore").field("finished", &self.finished).finish_non_exhaustive()
    }
}

impl<E: StreamEndpoint> StreamCore<E> {
    /// Wraps `endpoint`. `ends` looks at each event and returns a reason when the event means
    /// the session is over (e.g. replication-proto's `Disconnected`); the driver then closes the
    /// connection with that reason.
    pub fn new(endpoint: E, ends: impl Fn(&E::Event) -> Option<String> + Send + 'static) -> Self {
        StreamCore { endpoint, ends: Box::new(ends), finished: None, tap: None }
    }

    /// Lets `tap` see (and consume) each event first, in the session's task (see [`Tap`]).
    pub fn with_tap(mut self, tap: Tap<E>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &E {
        &self.endpoint
    }

    /// The endpoint, to take it back after the session.
    pub fn into_endpoint(self) -> E {
        self.endpoint
    }
}

impl<E: StreamEndpoint> Protocol for StreamCore<E> {
    type Event = E::Event;
    type Command = StreamCommand<E>;
    type Error = Infallible;

    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), Infallible> {
        match frame.channel {
            Channel::Control => self.endpoint.handle_input(now, &frame.payload),
            Channel::Datagram => self.endpoint.handle_datagram(now, &frame.payload),
            Channel::Bulk => self.endpoint.handle_bulk(now, &frame.payload),
        }
        Ok(())
    }

    fn handle_command(&mut self, now: Instant, command: StreamCommand<E>) -> Result<(), Infallible> {
        match command {
            StreamCommand::With(f) => f(&mut self.endpoint, now),
            StreamCommand::Close(reason) => {
                self.endpoint.close(now, &reason);
                self.finished.get_or_insert(reason);
            }
        }
        Ok(())
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Infallible> {
        self.endpoint.handle_timeout(now);
        Ok(())
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        self.endpoint.poll_transmit(now)
    }

    fn poll_urgent_transmit(&mut self, now: Instant) -> Option<Frame> {
        self.endpoint.poll_urgent_transmit(now)
    }

    fn poll_event(&mut self) -> Option<E::Event> {
        loop {
            let event = self.endpoint.poll_event()?;
            if let Some(reason) = (self.ends)(&event) {
                self.finished.get_or_insert(reason);
            }
            match &mut self.tap {
                Some(tap) => match tap(&mut self.endpoint, event) {
                    Some(event) => return Some(event),
                    None => continue,
                },
                None => return Some(event),
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    fn finished(&self) -> Option<String> {
        self.finished.clone()
    }

    fn start(&mut self, now: Instant) {
        self.endpoint.connect(now);
    }

    fn connection_lost(&mut self, now: Instant, _error: &ConnectionError) {
        self.endpoint.disconnect(now);
    }
}

impl<E: StreamEndpoint> Session<StreamCore<E>> {
    /// Runs `f` with the endpoint and the current time in the driver task (e.g. submit a
    /// checkpoint, commit an epoch). `Err` when the session has ended.
    pub async fn call(&self, f: impl FnOnce(&mut E, Instant) + Send + 'static) -> Result<(), StreamCommand<E>> {
        self.command(StreamCommand::with(f)).await
    }

    /// Closes the session: the endpoint's goodbye, then the connection, with `reason`.
    pub async fn close(&self, reason: impl Into<String>) -> Result<(), StreamCommand<E>> {
        self.command(StreamCommand::Close(reason.into())).await
    }
}
