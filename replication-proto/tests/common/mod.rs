//! Helpers the scenario tests share.

use replication_proto::Endpoint;
use std::time::Instant;

/// Moves every pending frame both ways between two endpoints until both are quiet.
pub fn pump<A: Endpoint, B: Endpoint>(a: &mut A, b: &mut B, now: Instant) {
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit(now) {
            b.handle_input(now, &t);
            moved = true;
        }
        while let Some(t) = b.poll_transmit(now) {
            a.handle_input(now, &t);
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
