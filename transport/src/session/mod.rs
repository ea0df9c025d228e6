//! The driver of a sans-IO protocol core over a [`Connection`].
//!
//! `replication-proto`'s sender and receiver do no I/O and read no clock: they take received
//! frames and the time, and hand back frames to send, events, and the next instant they want
//! to be woken at. [`Session::spawn`] runs such a core in a task: it moves frames between the
//! connection and the core, feeds it `tokio::time` (so tests with a paused clock drive it in
//! virtual time), passes the application's commands in and the core's events out.
//!
//! Backpressure reaches the core instead of piling up in memory: the driver takes the next
//! transmit from the core only when the previous one of its kind is in quinn's send window, and
//! keeps receiving (acks, requests) while a send waits. Control and bulk sends are independent:
//! at most one control send and one bulk send are in flight, and while the bulk send waits (a
//! bulk stream's flow control, a peer slow to read pushes) the driver keeps taking
//! [`Protocol::poll_urgent_transmit`] for control frames and datagrams, so acks, page requests
//! and page answers never wait behind bulk traffic. Events wait in a bounded channel.
//!
//! [`Protocol`] is the general shape (frames on the control, bulk and datagram channels);
//! [`StreamCore`] adapts a core that speaks one ordered byte stream plus datagrams, which is the
//! shape of `replication-proto`'s `Endpoint` (its `Sender` and `Receiver`).

mod stream;

pub use stream::{EndpointCall, StreamCommand, StreamCore, StreamEndpoint, Tap};

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::connection::{Connection, ConnectionError};

/// Which part of the connection a frame travels on; see [`crate::connection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The ordered control stream.
    Control,
    /// Any of the parallel bulk streams (unordered between them).
    Bulk,
    /// An unreliable datagram.
    Datagram,
}

/// A frame for the core, or from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Where it travels.
    pub channel: Channel,
    /// The bytes.
    pub payload: Bytes,
}

/// A sans-IO protocol core, as the driver sees it (quinn-proto's shape: inputs with the time,
/// then `poll_*` for outputs).
pub trait Protocol: Send + 'static {
    /// What the core reports to the application (e.g. `Committed(epoch)`).
    type Event: Send + 'static;
    /// What the application asks of the core (e.g. "ship this checkpoint").
    type Command: Send + 'static;
    /// The core's error; ends the session.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A frame arrived from the peer.
    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), Self::Error>;
    /// The application asked for something.
    fn handle_command(&mut self, now: Instant, command: Self::Command) -> Result<(), Self::Error>;
    /// The instant from [`Protocol::poll_timeout`] has passed.
    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error>;
    /// The next frame to send, if any; `now` is when it goes out.
    fn poll_transmit(&mut self, now: Instant) -> Option<Frame>;
    /// The next frame to send that is not [`Channel::Bulk`], leaving bulk frames queued; the
    /// driver asks for it while a bulk send is in flight. By default none (such a core's control
    /// frames then wait for its bulk sends).
    fn poll_urgent_transmit(&mut self, _now: Instant) -> Option<Frame> {
        None
    }
    /// The next event for the application, if any.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When to call [`Protocol::handle_timeout`] next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Whether the core has finished its work; the driver then sends what the core still has
    /// queued, closes the connection with this reason and ends.
    fn finished(&self) -> Option<String> {
        None
    }
    /// The connection is up; called once, before anything else (e.g. to send a hello).
    fn start(&mut self, _now: Instant) {}
    /// The connection ended without the core asking; the driver then passes on the core's
    /// last events and ends.
    fn connection_lost(&mut self, _now: Instant, _error: &ConnectionError) {}
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError<E: std::error::Error + 'static> {
    #[error("protocol failed")]
    Protocol(#[source] E),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("session driver task failed")]
    Driver(#[source] tokio::task::JoinError),
}

/// How a session ended: the core (with whatever state it reached) and why.
#[derive(Debug)]
pub struct Finished<P: Protocol> {
    /// The core, as the driver left it.
    pub core: P,
    /// `Ok` when the core said it finished.
    pub result: Result<(), SessionError<P::Error>>,
}

/// A running session: a task driving a core over a connection. Dropping it without
/// [`Session::finish`] stops the task and drops the connection (the peer sees it closed), so a
/// session whose owner went away never lingers, heartbeating, in the background.
pub struct Session<P: Protocol> {
    commands: mpsc::Sender<P::Command>,
    events: mpsc::Receiver<P::Event>,
    /// `None` only inside `finish`.
    task: Option<JoinHandle<Finished<P>>>,
}

impl<P: Protocol> std::fmt::Debug for Session<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let finished = self.task.as_ref().is_none_or(JoinHandle::is_finished);
        f.debug_struct("Session").field("finished", &finished).finish_non_exhaustive()
    }
}

/// Aborts a task when dropped (a no-op once it has ended).
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<P: Protocol> Drop for Session<P> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Events and commands waiting between the application and the driver.
const CHANNEL_DEPTH: usize = 64;

type SendFuture = Pin<Box<dyn Future<Output = Result<(), ConnectionError>> + Send>>;

impl<P: Protocol> Session<P> {
    /// Starts driving `core` over `connection` on the current tokio runtime.
    pub fn spawn(connection: Connection, core: P) -> Self {
        let (commands, command_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (event_tx, events) = mpsc::channel(CHANNEL_DEPTH);
        let task = tokio::spawn(drive(connection, core, command_rx, event_tx));
        Session { commands, events, task: Some(task) }
    }

    /// A handle to pass commands to the core from elsewhere: another task, or a plain thread
    /// with [`mpsc::Sender::blocking_send`] (e.g. a userfaultfd fault thread asking for a page)
    /// without going through the session's owner. The session ends when the `Session` is
    /// dropped or finished, whatever handles remain.
    pub fn command_sender(&self) -> mpsc::Sender<P::Command> {
        self.commands.clone()
    }

    /// Hands a command to the core; waits while the driver is behind. `Err` gives the command
    /// back when the session has ended.
    pub async fn command(&self, command: P::Command) -> Result<(), P::Command> {
        self.commands.send(command).await.map_err(|e| e.0)
    }

    /// The next event; `None` once the session has ended and every event was taken.
    pub async fn next_event(&mut self) -> Option<P::Event> {
        self.events.recv().await
    }

    /// Stops listening for events and waits for the session to end: when the core finishes
    /// (e.g. after a close command) or the connection ends. Ask the core to close first to end
    /// it from this side.
    ///
    /// Dropping this future stops the session as dropping the `Session` does.
    pub async fn finish(mut self) -> Result<Finished<P>, SessionError<P::Error>> {
        let mut task = AbortOnDrop(self.task.take().expect("a session is finished once"));
        drop(self);
        (&mut task.0).await.map_err(SessionError::Driver)
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn drive<P: Protocol>(
    connection: Connection,
    mut core: P,
    mut commands: mpsc::Receiver<P::Command>,
    events: mpsc::Sender<P::Event>,
) -> Finished<P> {
    core.start(now());
    let result = run(&connection, &mut core, &mut commands, &events).await;
    if let Err(SessionError::Connection(error)) = &result {
        core.connection_lost(now(), error);
        while let Some(event) = core.poll_event() {
            let _ = events.send(event).await;
        }
    }
    Finished { core, result }
}

/// The driver loop. The control channel's end is the connection's end: the bulk and datagram
/// channels and sending may fail earlier, but the frames already received are passed on first.
///
/// Sending: one control send and one bulk send may be in flight at a time. With neither in
/// flight the driver takes [`Protocol::poll_transmit`] (any channel); with only a bulk send in
/// flight, [`Protocol::poll_urgent_transmit`] (never a bulk frame); with a control send in
/// flight, nothing (control sends wait on the control stream's window, which has the higher
/// send priority and drains first). Datagrams go at once.
async fn run<P: Protocol>(
    connection: &Connection,
    core: &mut P,
    commands: &mut mpsc::Receiver<P::Command>,
    events: &mpsc::Sender<P::Event>,
) -> Result<(), SessionError<P::Error>> {
    let mut control: Option<SendFuture> = None;
    let mut bulk: Option<SendFuture> = None;
    let mut can_send = true;
    let mut commands_open = true;
    let mut bulk_open = true;
    let mut datagrams_open = true;
    loop {
        while let Some(event) = core.poll_event() {
            // Nobody listening is not an error: the application may only want the result.
            let _ = events.send(event).await;
        }
        while can_send && control.is_none() {
            let next = if bulk.is_none() { core.poll_transmit(now()) } else { core.poll_urgent_transmit(now()) };
            let Some(frame) = next else {
                break;
            };
            let connection = connection.clone();
            match frame.channel {
                Channel::Datagram => match connection.send_datagram(frame.payload) {
                    Ok(()) => {}
                    // Datagrams are unreliable by definition: one that cannot go is lost.
                    Err(
                        error @ (ConnectionError::DatagramTooLarge { .. }
                        | ConnectionError::DatagramsUnsupported { .. }),
                    ) => tracing::debug!("datagram dropped: {error}"),
                    Err(error) => {
                        tracing::debug!("sending stopped: {error}");
                        can_send = false;
                    }
                },
                Channel::Control => {
                    control = Some(Box::pin(async move { connection.send_frame(frame.payload).await }));
                }
                Channel::Bulk if bulk.is_none() => {
                    bulk = Some(Box::pin(async move { connection.send_bulk(frame.payload).await }));
                }
                Channel::Bulk => {
                    // Only a core that breaks the urgent poll's contract gets here: the frame
                    // waits for the bulk send in flight (and stops the loop, as a control send
                    // would).
                    tracing::warn!("urgent poll returned a bulk frame; it waits for the bulk send in flight");
                    let previous = bulk.take();
                    bulk = Some(Box::pin(async move {
                        if let Some(previous) = previous {
                            previous.await?;
                        }
                        connection.send_bulk(frame.payload).await
                    }));
                    break;
                }
            }
        }
        if control.is_none()
            && bulk.is_none()
            && let Some(reason) = core.finished()
        {
            connection.close(&reason).await;
            return Ok(());
        }
        let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            result = async { control.as_mut().expect("guarded by the branch condition").await },
                if control.is_some() =>
            {
                control = None;
                if let Err(error) = result {
                    tracing::debug!("sending stopped: {error}");
                    can_send = false;
                }
            }
            result = async { bulk.as_mut().expect("guarded by the branch condition").await },
                if bulk.is_some() =>
            {
                bulk = None;
                if let Err(error) = result {
                    tracing::debug!("sending stopped: {error}");
                    can_send = false;
                }
            }
            payload = connection.recv_frame() => {
                let frame = Frame { channel: Channel::Control, payload: payload? };
                tracing::trace!(len = frame.payload.len(), wall_ns = crate::wall_ns(), "control frame to the core");
                core.handle_frame(now(), frame).map_err(SessionError::Protocol)?;
            }
            payload = connection.recv_bulk(), if bulk_open => match payload {
                Ok(payload) => {
                    let frame = Frame { channel: Channel::Bulk, payload };
                    core.handle_frame(now(), frame).map_err(SessionError::Protocol)?;
                }
                Err(_) => bulk_open = false,
            },
            payload = connection.recv_datagram(), if datagrams_open => match payload {
                Ok(payload) => {
                    let frame = Frame { channel: Channel::Datagram, payload };
                    core.handle_frame(now(), frame).map_err(SessionError::Protocol)?;
                }
                Err(_) => datagrams_open = false,
            },
            command = commands.recv(), if commands_open => match command {
                Some(command) => {
                    tracing::trace!(wall_ns = crate::wall_ns(), "command to the core");
                    core.handle_command(now(), command).map_err(SessionError::Protocol)?;
                }
                None => commands_open = false,
            },
            () = sleep_until(deadline), if deadline.is_some() => {
                core.handle_timeout(now()).map_err(SessionError::Protocol)?;
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Frame {
    /// A control frame.
    pub fn control(payload: impl Into<Bytes>) -> Self {
        Frame { channel: Channel::Control, payload: payload.into() }
    }

    /// A bulk frame.
    pub fn bulk(payload: impl Into<Bytes>) -> Self {
        Frame { channel: Channel::Bulk, payload: payload.into() }
    }

    /// A datagram.
    pub fn datagram(payload: impl Into<Bytes>) -> Self {
        Frame { channel: Channel::Datagram, payload: payload.into() }
    }
}
