//! The session driver running byte-stream endpoints (the shape of replication-proto's
//! `Endpoint`) over a real connection: input split anywhere, datagram heartbeats on timers,
//! commands in, events out, close at both ends.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pki, pair, tuning};
use transport::session::{Frame, Session, StreamCommand, StreamCore, StreamEndpoint};
use transport::{ConnectionError, session::SessionError};

/// Lines over the byte stream; the echo side answers each line in upper case; both send a
/// heartbeat datagram every 50 ms.
#[derive(Debug, Default)]
struct Lines {
    echo: bool,
    connected: bool,
    buffer: Vec<u8>,
    outbox: Vec<Frame>,
    events: Vec<Event>,
    next_beat: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Line(String),
    Heartbeat,
    Disconnected,
    Closed,
}

const BEAT: Duration = Duration::from_millis(50);

impl Lines {
    fn say(&mut self, line: &str) {
        self.outbox.push(Frame::control(format!("{line}\n")));
    }
}

impl StreamEndpoint for Lines {
    type Event = Event;

    fn connect(&mut self, now: Instant) {
        self.connected = true;
        self.next_beat = Some(now + BEAT);
    }

    fn disconnect(&mut self, _now: Instant) {
        self.connected = false;
        self.next_beat = None;
        self.events.push(Event::Disconnected);
    }

    fn handle_input(&mut self, _now: Instant, data: &[u8]) {
        self.buffer.extend_from_slice(data);
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8(line[..end].to_vec()).unwrap();
            if self.echo {
                self.say(&line.to_uppercase());
            }
            self.events.push(Event::Line(line));
        }
    }

    fn handle_datagram(&mut self, _now: Instant, datagram: &[u8]) {
        assert_eq!(datagram, b"beat");
        self.events.push(Event::Heartbeat);
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.next_beat.is_some_and(|at| now >= at) {
            self.outbox.push(Frame::datagram(Bytes::from_static(b"beat")));
            self.next_beat = Some(now + BEAT);
        }
    }

    fn poll_transmit(&mut self, _now: Instant) -> Option<Frame> {
        (!self.outbox.is_empty()).then(|| self.outbox.remove(0))
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_beat
    }

    fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    fn close(&mut self, _now: Instant, detail: &str) {
        self.say(&format!("bye: {detail}"));
        self.next_beat = None;
        self.events.push(Event::Closed);
    }
}

fn ends(event: &Event) -> Option<String> {
    (*event == Event::Disconnected).then(|| "disconnected".to_owned())
}

#[tokio::test]
async fn stream_endpoints_talk_through_sessions() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    let mut client = Session::spawn(a, StreamCore::new(Lines::default(), ends));
    let mut server = Session::spawn(b, StreamCore::new(Lines { echo: true, ..Lines::default() }, ends));

    // Lines split across several sends must come out whole on the other side.
    client
        .command(StreamCommand::with(|lines: &mut Lines, _| {
            lines.outbox.push(Frame::control("hel"));
            lines.outbox.push(Frame::control("lo\nwor"));
            lines.outbox.push(Frame::control("ld\n"));
        }))
        .await
        .unwrap();
    let mut lines = Vec::new();
    let mut beats = 0;
    while lines.len() < 2 || beats < 3 {
        match tokio::time::timeout(Duration::from_secs(5), client.next_event()).await.unwrap().unwrap() {
            Event::Line(line) => lines.push(line),
            Event::Heartbeat => beats += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(lines, ["HELLO", "WORLD"]);

    client.command(StreamCommand::Close("done".to_owned())).await.unwrap();
    // The server reads the lines and the goodbye line, then loses the connection.
    let mut seen = Vec::new();
    loop {
        match server.next_event().await.unwrap() {
            Event::Heartbeat => {}
            Event::Disconnected => break,
            other => seen.push(other),
        }
    }
    assert_eq!(seen, [Event::Line("hello".into()), Event::Line("world".into()), Event::Line("bye: done".into())]);
    let client = client.finish().await.unwrap();
    assert!(client.result.is_ok(), "{:?}", client.result);
    let server = server.finish().await.unwrap();
    match &server.result {
        Err(SessionError::Connection(ConnectionError::PeerClosed { reason, .. })) => {
            assert_eq!(reason, "done");
        }
        other => panic!("{other:?}"),
    }
    assert!(!server.core.endpoint().connected);
    println!("server session ended: {}", server.result.unwrap_err());
}

/// Whether `server` sees its connection end within `ms` (heartbeats until then).
async fn ends_within(server: &mut Session<StreamCore<Lines>>, ms: u64) -> bool {
    let ended = async {
        loop {
            match server.next_event().await {
                Some(Event::Heartbeat) => {}
                Some(Event::Disconnected) | None => return,
                Some(other) => panic!("{other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(ms), ended).await.is_ok()
}

/// A session whose owner drops it (e.g. a task aborted by `unprotect`) ends its connection:
/// nothing keeps heartbeating in the background, and the peer sees the end well within the
/// idle timeout (1 s).
#[tokio::test]
async fn dropping_a_session_ends_its_connection() {
    let pki = Pki::new();
    let (a, b, _client_endpoint, _server_endpoint) = pair(&pki, tuning()).await;
    let client = Session::spawn(a, StreamCore::new(Lines::default(), ends));
    let mut server = Session::spawn(b, StreamCore::new(Lines::default(), ends));
    let mut beats = 0;
    while beats < 2 {
        match tokio::time::timeout(Duration::from_secs(5), server.next_event()).await.unwrap().unwrap() {
            Event::Heartbeat => beats += 1,
            other => panic!("{other:?}"),
        }
    }
    drop(client);
    assert!(ends_within(&mut server, 500).await, "the dropped session's connection is still alive");
    let server = server.finish().await.unwrap();
    println!("server session ended: {:?}", server.result);
    assert!(server.result.is_err());
}

/// The same when the owner is dropped while it waits in `finish` (a session nobody closed).
#[tokio::test]
async fn dropping_a_finishing_session_ends_its_connection() {
    let pki = Pki::new();
    let (a, b, _client_endpoint, _server_endpoint) = pair(&pki, tuning()).await;
    let client = Session::spawn(a, StreamCore::new(Lines::default(), ends));
    let mut server = Session::spawn(b, StreamCore::new(Lines::default(), ends));
    let owner = tokio::spawn(async move { client.finish().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!owner.is_finished(), "nobody closed the session: finish waits");
    owner.abort();
    assert!(ends_within(&mut server, 500).await, "the abandoned session's connection is still alive");
}
