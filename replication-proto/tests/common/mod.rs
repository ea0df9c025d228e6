//! Helpers the scenario tests share.

use replication_proto::{Channel, Endpoint, Transmit};
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
