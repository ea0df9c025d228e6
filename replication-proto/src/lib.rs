//! Understudy's wire protocol, sans-IO: frames, messages, page codecs, and the [`Sender`] and
//! [`Receiver`] state machines that primary and backup (or migration source and destination)
//! run. No sockets, no clock reads, no async runtime: the caller feeds received bytes and the
//! current time in, and takes bytes to send, timer deadlines and events out (the shape of
//! quinn-proto). `docs/protocol.md` is the specification.
//!
//! ```
//! use replication_proto::{
//!     Endpoint, MemoryImage, MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role,
//!     Sender, SenderConfig, SenderEvent, VmIdentity,
//! };
//! use std::time::Instant;
//!
//! let vm = VmIdentity { uuid: [7; 16], name: "demo".into() };
//! let layout = MemoryLayout::flat(4096, 16 * 4096);
//! let mut primary = Sender::new(SenderConfig::new(Role::Primary, vm.clone(), layout.clone(), 1));
//! let mut backup = Receiver::new(ReceiverConfig::new(Role::Backup, vm, layout.clone(), 2));
//! let mut replica = MemoryImage::new(&layout);
//! let now = Instant::now();
//!
//! // A transport moves bytes both ways; here, a loop over two in-memory "connections".
//! fn pump(s: &mut Sender, r: &mut Receiver, now: Instant) {
//!     loop {
//!         let mut moved = false;
//!         while let Some(t) = s.poll_transmit(now) { r.handle_input(now, &t); moved = true; }
//!         while let Some(t) = r.poll_transmit(now) { s.handle_input(now, &t); moved = true; }
//!         if !moved { break; }
//!     }
//! }
//! primary.connect(now);
//! backup.connect(now);
//! pump(&mut primary, &mut backup, now);
//!
//! // Epoch 1 is a baseline: every non-zero page and the device state.
//! let page = vec![0xab; 4096];
//! let epoch = primary.submit_baseline(now, [(3u64, &page[..])], b"vcpu state").unwrap();
//! pump(&mut primary, &mut backup, now);
//!
//! // The backup gets the whole checked checkpoint, applies it, commits, and the ack flows back.
//! while let Some(ev) = backup.poll_event() {
//!     if let ReceiverEvent::Checkpoint(cp) = ev {
//!         cp.apply(&mut replica).unwrap();
//!         assert_eq!(cp.state(), b"vcpu state");
//!         backup.committed(now, cp.epoch()).unwrap();
//!     }
//! }
//! pump(&mut primary, &mut backup, now);
//! assert!(std::iter::from_fn(|| primary.poll_event())
//!     .any(|e| matches!(e, SenderEvent::Acked { epoch: e, .. } if e == epoch)));
//! assert_eq!(&replica.as_bytes()[3 * 4096..4 * 4096], &page[..]);
//! ```
//!
//! # One epoch
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as Primary (Sender)
//!     participant B as Backup (Receiver)
//!     participant O as Backup owner (replica)
//!     Note over P,B: connect: both send Hello (version, role, VM, layout, committed/delivered, high water)
//!     P->>B: Hello
//!     B->>P: Hello
//!     Note over P: resume from the backup's delivered epoch, or require a baseline
//!     P->>B: EpochBegin{N, lineage, baseline?, page_count, state_len}
//!     loop page batches and state chunks (seq 0, 1, ...)
//!         P->>B: PageBatch{N, seq, range table, records}
//!         P->>B: StateChunk{N, seq, offset, bytes}
//!     end
//!     P->>B: EpochEnd{N, frames, page_count, state_len, checksum, digest}
//!     P-->>B: Output{N, harvest, frames} (the epoch's held output, to a backup with an output log)
//!     Note over B: counts and crc32 hold: N is whole
//!     B->>O: ReceiverEvent::Checkpoint(N)
//!     O->>O: verify digest against replica, apply
//!     O->>B: committed(N)
//!     B->>P: Ack(N)
//!     Note over P: SenderEvent::Acked(N): release output up to N
//!     P-->>B: InboundCommitted{harvest of N} (released: the backup's logs drop it)
//!     B-->>P: ResendRequest{from N} (gap, bad checksum, stall)
//!     B-->>P: ResyncRequest (owner rejected N): P needs a baseline
//! ```
//!
//! # The receiver
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitBaseline
//!     AwaitBaseline --> Staging: EpochBegin(baseline, N > high water)
//!     Idle --> Staging: EpochBegin(N = delivered+1, same lineage) or baseline
//!     Staging --> Staging: next PageBatch / StateChunk (seq = expected)
//!     Staging --> Delivered: EpochEnd, counts and checksum hold
//!     Staging --> Idle: mismatch or a second version of the epoch (abort, ResendRequest)
//!     Delivered --> Idle: Checkpoint event queued (delivered = N)
//!     Idle --> Idle: committed(N) / Ack(N)
//!     Idle --> AwaitBaseline: reject(N) / ResyncRequest
//! ```
//!
//! Duplicated and stale frames (epoch at or below the high water, sequence already staged) are
//! dropped; frames ahead of a gap are held until it fills; a corrupted payload drops one frame
//! (which is asked for again at once); a stalled epoch is asked for again after
//! `resend_timeout`; a corrupted header breaks the stream and the connection is reset, then
//! resumed from the receiver's last delivered epoch.
//!
//! # For a transport
//! Drive a [`Sender`] or a [`Receiver`] through [`Endpoint`]: [`Endpoint::connect`] on each new
//! connection, [`Endpoint::handle_input`] with stream bytes (any split),
//! [`Endpoint::handle_datagram`] with datagrams, [`Endpoint::handle_frame`] with whole frames
//! from bulk streams, [`Endpoint::handle_timeout`] at [`Endpoint::poll_timeout`], and after each
//! call drain [`Endpoint::poll_transmit`] (each [`Transmit`] is one whole frame;
//! [`Channel::Datagram`] ones may go as datagrams, [`Channel::Bulk`] ones (post-copy pushes) on a
//! bulk stream; while a bulk frame waits, [`Endpoint::poll_urgent_transmit`] gives the rest) and
//! [`Endpoint::poll_event`]. On a `Disconnected` event close the connection and reconnect unless
//! [`SessionError::is_permanent`]. Call [`Endpoint::disconnect`] when the connection breaks.
//!
//! # Modules
//! - [`frame`]: the 16-byte frame header, crc32s, the stream decoder;
//! - [`message`]: every message and its payload layout;
//! - [`pageset`]: range table plus encoded page records;
//! - [`codec`]: zero, unchanged, delta, lz4, raw and dedup page encodings;
//! - [`hash`]: XXH64, zero test and content digest;
//! - [`cache`]: the sender's bounded cache of last-sent pages (and its content index for dedup);
//! - [`checkpoint`]: what the owner gets and how it applies it;
//! - [`sender`], [`receiver`]: the state machines; [`session`]: what they share;
//! - [`migration`]: the messages a migration adds and where a reverse session's series starts
//!   ([`migration::reverse_start`]); [`precopy`]: when pre-copy stops;
//! - [`limits`], [`version`]: the numbers and the versioning rule.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod checkpoint;
pub mod codec;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod limits;
pub mod message;
pub mod migration;
pub mod pageset;
pub mod precopy;
pub mod receiver;
pub mod sender;
pub mod session;
pub mod version;
pub mod wire;

pub use checkpoint::{ApplyError, Checkpoint, MemoryImage, PageContent, PageRef, ReplicaMemory};
pub use codec::CodecConfig;
pub use message::{
    GoodbyeReason, GuestRange, Hello, InboundFrame, Lineage, MemoryLayout, Message, OutputFrames, Position,
    ResyncReason, Role, VmIdentity,
};
pub use migration::StartError;
pub use pageset::PageEncoding;
pub use receiver::{Receiver, ReceiverConfig, ReceiverError, ReceiverEvent, ReceiverStats};
pub use sender::{
    BaselineReason, InboundError, MigrationError, OutputError, Sender, SenderConfig, SenderEvent, SenderStats,
    SubmitError,
};
pub use session::{Channel, Endpoint, LinkState, PeerLiveness, SessionError, Timing, Transmit};
pub use version::{PROTOCOL_VERSION, VersionError};
