//! Helpers the scenario tests share.

use replication_proto::message::Message;
use replication_proto::{
    Channel, Endpoint, GoodbyeReason, Receiver, ReceiverEvent, Sender, SenderEvent, SessionError, Transmit,
};
use std::time::Instant;

/// Hands `t` to `to` as a transport would: a bulk frame whole, anything else as stream bytes.
pub fn deliver<E: Endpoint>(to: &mut E, t: &Transmit, now: Instant) {
    match t.channel() {
        Channel::Bulk => to.handle_frame(now, t),
        Channel::Stream | Channel::Datagram => to.handle_input(now, t),
    }
}

/// Moves every pending frame both ways between two endpoints until both are quiet.
pub fn pump<A: Endpoint, B: Endpoint>(a: &mut A, b: &mut B, now: Instant) {
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit(now) {
            deliver(b, &t, now);
            moved = true;
        }
        while let Some(t) = b.poll_transmit(now) {
            deliver(a, &t, now);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// Connects two endpoints and runs their handshake.
pub fn connect<A: Endpoint, B: Endpoint>(a: &mut A, b: &mut B, now: Instant) {
    a.connect(now);
    b.connect(now);
    pump(a, b, now);
}

/// The error of the first `Disconnected` among the sender's pending events (the others are
/// dropped).
#[allow(dead_code)]
pub fn sender_error(s: &mut Sender) -> Option<SessionError> {
    std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        SenderEvent::Disconnected { error } => Some(error),
        _ => None,
    })
}

/// The error of the first `Disconnected` among the receiver's pending events (the others are
/// dropped).
#[allow(dead_code)]
pub fn receiver_error(r: &mut Receiver) -> Option<SessionError> {
    std::iter::from_fn(|| r.poll_event()).find_map(|e| match e {
        ReceiverEvent::Disconnected { error } => Some(error),
        _ => None,
    })
}

/// The goodbye reason of frame `t`, if it is a goodbye.
#[allow(dead_code)]
pub fn goodbye_reason(t: &[u8]) -> Option<GoodbyeReason> {
    let f = replication_proto::frame::decode_datagram(t).ok()?;
    match Message::decode(f.kind, &f.payload).ok()? {
        Message::Goodbye(g) => Some(g.reason),
        _ => None,
    }
}

/// The `Hello` a fresh receiver sends first on a connection, decoded.
#[allow(dead_code)]
pub fn first_hello(r: &mut Receiver) -> replication_proto::Hello {
    r.connect(Instant::now());
    let t = r.poll_transmit(Instant::now()).expect("a hello");
    let mut d = replication_proto::frame::FrameDecoder::new();
    d.push(t.as_slice());
    let f = d.next_frame().unwrap().expect("a whole frame");
    let Message::Hello(h) = Message::decode(f.kind, &f.payload).unwrap() else { panic!("a hello") };
    h
}
