//! Transport tuning: QUIC windows, congestion control, datagram buffers, timeouts, and the
//! frame layer's limits. The defaults suit a fast LAN between two hosts and a failure detector
//! that wants to hear of a dead peer within seconds.

use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, VarInt};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

/// QUIC's smallest datagram size; every path carries it.
const MIN_UDP_PAYLOAD: u16 = 1200;

/// Congestion controllers quinn offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438): the default, loss-based, fine on a LAN.
    #[default]
    Cubic,
    /// NewReno (RFC 9002): the most conservative.
    NewReno,
    /// BBR (quinn's is experimental): rate-based, ignores random loss.
    Bbr,
}

/// Errors in a [`Tuning`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("keep-alive interval {keep_alive:?} must be shorter than the idle timeout {idle:?}")]
    KeepAliveTooLong { keep_alive: Duration, idle: Duration },
    #[error("{what} must not be zero")]
    Zero { what: &'static str },
    #[error("{what} {value} is above the limit {max}")]
    TooLarge { what: &'static str, value: u64, max: u64 },
    #[error("max udp payload {value} is below quic's minimum of {MIN_UDP_PAYLOAD}")]
    UdpPayloadTooSmall { value: u16 },
}

/// How a connection is tuned. Both peers should use the same values; for the idle timeout the
/// shorter of the two applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Bytes one stream may have in flight towards us (QUIC stream flow-control window).
    pub stream_receive_window: u32,
    /// Bytes all streams together may have in flight towards us (connection window).
    pub receive_window: u32,
    /// Bytes we keep unacknowledged in flight or queued in quinn per connection; a writer
    /// waits when it is full. This is what bounds the sender's memory.
    pub send_window: u32,
    /// Congestion controller.
    pub congestion: Congestion,
    /// RTT assumed before the first measurement.
    pub initial_rtt: Duration,
    /// Largest UDP payload MTU discovery may try: 1452 fits an Ethernet path, 8952 a jumbo
    /// one; loopback takes up to 65527.
    pub max_udp_payload: u16,
    /// Bytes of received datagrams kept until read; older ones are dropped beyond it.
    pub datagram_receive_buffer: u32,
    /// Bytes of datagrams waiting to be sent; older ones are dropped beyond it.
    pub datagram_send_buffer: u32,
    /// Send something at least this often so the peer's idle timer never fires while we live.
    pub keep_alive: Duration,
    /// Declare the peer gone after hearing nothing for this long.
    pub idle_timeout: Duration,
    /// Give up on a handshake (TLS plus the opening of our streams) after this long.
    pub handshake_timeout: Duration,
    /// How long [`crate::Connection::close`] waits for the peer to read what we sent.
    pub close_linger: Duration,
    /// Parallel streams for bulk frames (page batches), in each direction.
    pub bulk_streams: u8,
    /// Largest frame accepted, in bytes (either direction).
    pub max_frame_size: u32,
    /// Bytes of received frames queued per channel (control, bulk) until the application reads
    /// them; when full the connection stops reading and QUIC flow control holds the sender.
    pub recv_queue_bytes: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            stream_receive_window: 8 * MIB,
            receive_window: 32 * MIB,
            send_window: 16 * MIB,
            congestion: Congestion::Cubic,
            initial_rtt: Duration::from_millis(10),
            max_udp_payload: 1452,
            datagram_receive_buffer: 64 * KIB,
            datagram_send_buffer: 64 * KIB,
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            close_linger: Duration::from_secs(2),
            bulk_streams: 4,
            max_frame_size: 16 * MIB,
            recv_queue_bytes: 8 * MIB,
        }
    }
}

impl Tuning {
    /// Checks the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("stream receive window", u64::from(self.stream_receive_window)),
            ("receive window", u64::from(self.receive_window)),
            ("send window", u64::from(self.send_window)),
            ("bulk streams", u64::from(self.bulk_streams)),
            ("max frame size", u64::from(self.max_frame_size)),
            ("receive queue bytes", u64::from(self.recv_queue_bytes)),
            ("idle timeout", self.idle_timeout.as_millis() as u64),
            ("keep-alive interval", self.keep_alive.as_millis() as u64),
            ("handshake timeout", self.handshake_timeout.as_millis() as u64),
        ];
        for (what, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero { what });
            }
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(ConfigError::KeepAliveTooLong { keep_alive: self.keep_alive, idle: self.idle_timeout });
        }
        if self.max_udp_payload < MIN_UDP_PAYLOAD {
            return Err(ConfigError::UdpPayloadTooSmall { value: self.max_udp_payload });
        }
        // The length prefix's top bit marks transport records (see connection::wire).
        let max_frame = u64::from(crate::connection::MAX_FRAME_LIMIT);
        if u64::from(self.max_frame_size) > max_frame {
            return Err(ConfigError::TooLarge {
                what: "max frame size",
                value: u64::from(self.max_frame_size),
                max: max_frame,
            });
        }
        let idle_ms = self.idle_timeout.as_millis();
        if idle_ms > u128::from(u32::MAX) {
            return Err(ConfigError::TooLarge {
                what: "idle timeout in ms",
                value: u64::try_from(idle_ms).unwrap_or(u64::MAX),
                max: u64::from(u32::MAX),
            });
        }
        Ok(())
    }

    /// quinn's transport configuration for these values (with [`REORDER_PACKETS`] and
    /// [`REORDER_RTTS`] as loss-detection thresholds).
    pub fn to_quinn(&self) -> Result<quinn::TransportConfig, ConfigError> {
        self.validate()?;
        let mut config = quinn::TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| ConfigError::TooLarge {
            what: "idle timeout in ms",
            value: u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            max: u64::from(u32::MAX),
        })?;
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        config
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(u64::from(self.send_window))
            .initial_rtt(self.initial_rtt)
            .mtu_discovery_config(Some(mtu))
            .datagram_receive_buffer_size(Some(self.datagram_receive_buffer as usize))
            .datagram_send_buffer_size(self.datagram_send_buffer as usize)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            // A peer opens one control and its `bulk_streams` bulk streams, once; allow any
            // bulk count it may be tuned for.
            .max_concurrent_uni_streams(VarInt::from_u32(u32::from(u8::MAX) + 1))
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            // Reordering is not loss. With RFC 9002's thresholds (3 packets, 9/8 RTT) a link
            // that reorders by a few ms (10 +- 5 ms jitter in `testbed faults`' link.delay)
            // declared ~100 packets lost per second that never were, and the congestion window
            // collapsed: replies waited seconds for their epoch. A loss is still declared once a
            // later packet is acked and 2 RTTs passed, which on a LAN is well under a ms.
            .packet_threshold(REORDER_PACKETS)
            .time_threshold(REORDER_RTTS)
            // The peer acknowledges our packets when it sends anything anyway, or after
            // `ACK_THRESHOLD` of them, or `MAX_ACK_DELAY` after the first: not at once for
            // every second one. A checkpoint (about ten packets) then draws no ACK of its own
            // from the backup: quinn sends an immediate ACK before it hands the received data
            // to the reader, and on loopback that send (which wakes the primary) delayed the
            // checkpoint's delivery by ~50-90 µs here; the ACK now rides on the
            // acknowledgement of the epoch instead.
            .ack_frequency_config(Some(ack_frequency()));
        match self.congestion {
            Congestion::Cubic => config.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::NewReno => config.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
            Congestion::Bbr => config.congestion_controller_factory(Arc::new(BbrConfig::default())),
        };
        Ok(config)
    }
}

/// Ack-eliciting packets the peer may receive before it must send an ACK at once (QUIC's
/// default: 1, an ACK for every second one). Bulk transfers still draw an ACK every ~45 KiB.
pub const ACK_THRESHOLD: u32 = 32;
/// Longest the peer may hold an ACK back (quinn clamps it to at least its timer granularity,
/// 1 ms).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(1);

fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(ACK_THRESHOLD))
        .max_ack_delay(Some(MAX_ACK_DELAY))
        // As the ACK frequency draft recommends: one below the loss detector's threshold.
        .reordering_threshold(VarInt::from_u32(REORDER_PACKETS - 1));
    ack
}

/// Packets acknowledged after an unacknowledged one before it counts as lost (RFC 9002: 3).
pub const REORDER_PACKETS: u32 = 64;
/// RTTs after a later packet was acknowledged before an unacknowledged one counts as lost
/// (RFC 9002: 9/8).
pub const REORDER_RTTS: f32 = 2.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Tuning::default().validate().unwrap();
        Tuning::default().to_quinn().unwrap();
    }

    #[test]
    fn rejects_nonsense() {
        let tuning = Tuning { keep_alive: Duration::from_secs(5), ..Tuning::default() };
        assert_eq!(
            tuning.validate().unwrap_err().to_string(),
            "keep-alive interval 5s must be shorter than the idle timeout 3s"
        );
        let tuning = Tuning { bulk_streams: 0, ..Tuning::default() };
        assert_eq!(tuning.validate().unwrap_err().to_string(), "bulk streams must not be zero");
        let tuning = Tuning { max_udp_payload: 1000, ..Tuning::default() };
        assert!(tuning.validate().is_err());
        let tuning = Tuning { max_frame_size: u32::MAX, ..Tuning::default() };
        assert!(tuning.validate().unwrap_err().to_string().starts_with("max frame size"));
    }
}
