//! Every length a peer can choose is capped here; `docs/protocol.md` lists the same numbers.
//!
//! Decoders check these before they allocate, so no input, however hostile, makes this crate
//! allocate more than a frame's worth of memory at a time, or stage more than one checkpoint's
//! worth of guest memory.

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload of any frame (page batches, page responses).
pub const MAX_PAYLOAD_LEN: usize = 4 << 20;
/// Largest `Hello` payload.
pub const MAX_HELLO_LEN: usize = 64 << 10;
/// Largest payload of the small control messages (acks, heartbeats, requests).
pub const MAX_CONTROL_LEN: usize = 64;
/// Largest `Goodbye` payload.
pub const MAX_GOODBYE_LEN: usize = 1 << 10;
/// Longest VM name, in bytes of UTF-8.
pub const MAX_VM_NAME_LEN: usize = 255;
/// Longest `Goodbye` detail text, in bytes of UTF-8.
pub const MAX_DETAIL_LEN: usize = 512;
/// Most guest-physical ranges in a memory layout.
pub const MAX_GUEST_RANGES: usize = 1024;
/// Smallest page size a layout may declare.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest page size a layout may declare.
pub const MAX_PAGE_SIZE: u32 = 64 << 10;
/// Most pages in a memory layout (16 TiB of 4 KiB pages).
pub const MAX_GUEST_PAGES: u64 = 1 << 32;
/// Most pages in one page batch or page response.
pub const MAX_BATCH_PAGES: usize = 16 << 10;
/// Largest payload of one state chunk.
pub const MAX_STATE_CHUNK: usize = 1 << 20;
/// Largest device/vCPU state blob of one checkpoint.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Most frames (batches plus state chunks) in one epoch.
pub const MAX_EPOCH_FRAMES: u32 = 1 << 24;
/// Most pages one page request may ask for.
pub const MAX_REQUEST_PAGES: usize = 4 << 10;
/// Most `PageMap` frames one switch-over may announce: enough for the worst map of the largest
/// layout (every other page of 2^32, 2^31 runs, 349,524 runs a frame).
pub const MAX_MAP_FRAMES: u32 = 8192;
/// Most epochs a sender may have in flight (submitted, not acknowledged).
pub const MAX_WINDOW: u16 = 256;
/// Largest epoch number a `Hello` may announce (its `committed` and `delivered` positions and its
/// `high_water`): 2^62. A peer that claims more is refused, so a sender, which numbers its next
/// epochs above the receiver's high water, always keeps 2^62 numbers to count on (146 million
/// years at one epoch a millisecond) and its epoch arithmetic never overflows.
pub const MAX_ANNOUNCED_EPOCH: u64 = 1 << 62;
/// Largest epoch number an epoch may carry (`EpochBegin`): 2^63. A sender refuses to number an
/// epoch above it; a receiver refuses an epoch numbered above it.
pub const MAX_EPOCH: u64 = 1 << 63;

/// Largest Ethernet frame an `Inbound` message carries (what a TAP hands over at most).
pub const MAX_INBOUND_FRAME: usize = 64 << 10;

/// Largest guest frame an `Output` message carries (what a TAP takes at most).
pub const MAX_OUTPUT_FRAME: usize = 64 << 10;
/// Most frames one `Output` message carries (an epoch with more goes in several messages).
pub const MAX_OUTPUT_FRAMES: usize = 1024;
/// Largest `Output` payload: its header (epoch, harvest, count) and every frame with its length.
pub const MAX_OUTPUT_LEN: usize = 1 << 20;
