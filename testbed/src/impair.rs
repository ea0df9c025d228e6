//! A user-space link impairment proxy for UDP (the fault harness's stand-in for `tc netem`,
//! which this machine's kernel lacks).
//!
//! The proxy listens on one UDP address and forwards every datagram to a fixed target; replies
//! from the target go back to the latest source seen on the listening side (one client: the
//! primary's QUIC endpoint). While its window is open it applies, per direction and independently:
//!
//! - **loss**: a datagram is dropped with probability `loss`;
//! - **duplication**: a second copy is sent with probability `dup` (each copy gets its own delay
//!   and corruption draw);
//! - **corruption**: 1-3 random bytes of a copy are flipped with probability `corrupt`;
//! - **delay**: each copy waits `delay ± jitter` (uniform), so datagrams may be reordered
//!   (unless `keep_order`: then a datagram also waits for the one before it, like a FIFO link).
//!
//! Every decision comes from a per-direction xorshift stream seeded from `seed`: the same seed
//! and the same sequence of datagrams give the same fates. Outside the window datagrams pass
//! straight through. With `tcp`, TCP connections to the listening address are relayed to the
//! target unimpaired (understudy's liveness line rides on TCP beside the QUIC session).
//!
//! It runs as `testbed impair ...` inside a namespace of the fault harness (`ip netns exec`), so
//! everything it sends stays in that run's namespaces.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::rng::XorShift64;

/// What to do to datagrams while the window is open. Probabilities are in `0.0..=1.0`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    pub loss: f64,
    pub delay: Duration,
    pub jitter: Duration,
    pub dup: f64,
    pub corrupt: f64,
    /// Delay without reordering: a datagram never leaves before one received earlier.
    pub keep_order: bool,
}

impl Impairment {
    /// `--loss 5 --delay-ms 10 ...`: the arguments of `testbed impair` for this impairment.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--loss".into(),
            format!("{}", self.loss * 100.0),
            "--delay-ms".into(),
            format!("{}", self.delay.as_millis()),
            "--jitter-ms".into(),
            format!("{}", self.jitter.as_millis()),
            "--dup".into(),
            format!("{}", self.dup * 100.0),
            "--corrupt".into(),
            format!("{}", self.corrupt * 100.0),
        ];
        if self.keep_order {
            a.push("--keep-order".into());
        }
        a
    }

    /// A short description for reports: `loss 5% delay 10±5 ms dup 0% corrupt 0%`.
    pub fn describe(&self) -> String {
        format!(
            "loss {}% delay {}±{} ms{} dup {}% corrupt {}%",
            self.loss * 100.0,
            self.delay.as_millis(),
            self.jitter.as_millis(),
            if self.keep_order { " (in order)" } else { "" },
            self.dup * 100.0,
            self.corrupt * 100.0
        )
    }
}

/// One proxy.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub impairment: Impairment,
    pub seed: u64,
    /// Open the window when this file appears (polled every 2 ms); None: open at start.
    pub start_file: Option<PathBuf>,
    /// How long the window stays open; None: for good.
    pub window: Option<Duration>,
    /// Relay TCP connections to the same addresses too (unimpaired).
    pub tcp: bool,
}

/// Per-direction counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received from this direction's source.
    pub seen: AtomicU64,
    /// Of those, received while the window was open.
    pub impaired: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
    pub delayed: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
}

impl Counters {
    fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "seen={} impaired={} dropped={} duplicated={} corrupted={} delayed={} sent={} send_errors={}",
            g(&self.seen),
            g(&self.impaired),
            g(&self.dropped),
            g(&self.duplicated),
            g(&self.corrupted),
            g(&self.delayed),
            g(&self.sent),
            g(&self.send_errors)
        )
    }
}

/// A running proxy: its threads run until the process ends.
pub struct Proxy {
    pub local: SocketAddr,
    active: Arc<AtomicBool>,
    /// Client -> target, target -> client.
    pub up: Arc<Counters>,
    pub down: Arc<Counters>,
}

impl Proxy {
    /// Whether the window is open now.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// `up: ...; down: ...` counters.
    pub fn summary(&self) -> String {
        format!("up {}; down {}", self.up.summary(), self.down.summary())
    }
}

/// Where a direction sends: the target (connected socket) or the latest client.
#[derive(Clone)]
enum Out {
    Target(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, Arc<Mutex<Option<SocketAddr>>>),
}

impl Out {
    fn send(&self, data: &[u8], c: &Counters) {
        let r = match self {
            Out::Target(s) => s.send(data),
            Out::Client(s, to) => match *to.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(a) => s.send_to(data, a),
                None => return,
            },
        };
        match r {
            Ok(_) => c.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.send_errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Datagrams waiting out their delay, earliest first (ties in arrival order).
type Queue = Arc<(Mutex<BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>>, Condvar)>;

fn spawn_sender(out: Out, q: Queue, c: Arc<Counters>) {
    std::thread::spawn(move || {
        let (m, cv) = &*q;
        let mut heap = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            match heap.peek() {
                Some(Reverse((due, _, _))) if *due <= now => {
                    let Some(Reverse((_, _, data))) = heap.pop() else { continue };
                    drop(heap);
                    out.send(&data, &c);
                    heap = m.lock().unwrap_or_else(|e| e.into_inner());
                }
                Some(Reverse((due, _, _))) => {
                    let wait = *due - now;
                    heap = cv.wait_timeout(heap, wait).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => heap = cv.wait(heap).unwrap_or_else(|e| e.into_inner()),
            }
        }
    });
}

/// One direction: receive, decide, forward.
struct Lane {
    rng: XorShift64,
    imp: Impairment,
    active: Arc<AtomicBool>,
    out: Out,
    queue: Queue,
    counters: Arc<Counters>,
    order: u64,
    /// When the latest delayed datagram is due (`keep_order`).
    last_due: Instant,
}

impl Lane {
    fn forward(&mut self, data: &[u8]) {
        let c = Arc::clone(&self.counters);
        c.seen.fetch_add(1, Ordering::Relaxed);
        if !self.active.load(Ordering::Relaxed) {
            self.out.send(data, &c);
            return;
        }
        c.impaired.fetch_add(1, Ordering::Relaxed);
        if self.rng.chance(self.imp.loss) {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if self.rng.chance(self.imp.dup) {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut d = data.to_vec();
            if !d.is_empty() && self.rng.chance(self.imp.corrupt) {
                c.corrupted.fetch_add(1, Ordering::Relaxed);
                let flips = 1 + self.rng.next_u64() % 3;
                for _ in 0..flips {
                    let i = (self.rng.next_u64() % d.len() as u64) as usize;
                    d[i] ^= (self.rng.next_u64() as u8) | 1;
                }
            }
            let delay = self.delay();
            if delay.is_zero() {
                self.out.send(&d, &c);
            } else {
                c.delayed.fetch_add(1, Ordering::Relaxed);
                self.order += 1;
                let mut due = Instant::now() + delay;
                if self.imp.keep_order {
                    due = due.max(self.last_due);
                    self.last_due = due;
                }
                let (m, cv) = &*self.queue;
                m.lock().unwrap_or_else(|e| e.into_inner()).push(Reverse((due, self.order, d)));
                cv.notify_one();
            }
        }
    }

    fn delay(&mut self) -> Duration {
        let base = self.imp.delay.as_secs_f64();
        let j = self.imp.jitter.as_secs_f64();
        let d = if j > 0.0 { base + (self.rng.unit() * 2.0 - 1.0) * j } else { base };
        Duration::from_secs_f64(d.max(0.0))
    }
}

/// Starts the proxy's threads (UDP both ways, the window's clock, TCP when asked).
pub fn start(cfg: &Config) -> Result<Proxy> {
    let front = Arc::new(UdpSocket::bind(cfg.listen).with_context(|| format!("bind udp {}", cfg.listen))?);
    let local = front.local_addr()?;
    let bind_back: SocketAddr = match cfg.to {
        SocketAddr::V4(a) if a.ip().is_loopback() || a.ip().is_unspecified() => "127.0.0.1:0".parse()?,
        SocketAddr::V4(_) => SocketAddr::new(local.ip(), 0),
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let back = Arc::new(UdpSocket::bind(bind_back).with_context(|| format!("bind udp {bind_back}"))?);
    back.connect(cfg.to).with_context(|| format!("connect udp {}", cfg.to))?;
    let client = Arc::new(Mutex::new(None::<SocketAddr>));
    let active = Arc::new(AtomicBool::new(cfg.start_file.is_none()));
    let up = Arc::new(Counters::default());
    let down = Arc::new(Counters::default());
    let lane = |dir: u64, out: Out, counters: &Arc<Counters>| {
        let queue: Queue = Arc::new((Mutex::new(BinaryHeap::new()), Condvar::new()));
        spawn_sender(out.clone(), Arc::clone(&queue), Arc::clone(counters));
        Lane {
            rng: XorShift64::seeded(cfg.seed ^ dir.wrapping_mul(0x5851_f42d_4c95_7f2d)),
            imp: cfg.impairment.clone(),
            active: Arc::clone(&active),
            out,
            queue,
            counters: Arc::clone(counters),
            order: 0,
            last_due: Instant::now(),
        }
    };
    let mut up_lane = lane(1, Out::Target(Arc::clone(&back)), &up);
    let mut down_lane = lane(2, Out::Client(Arc::clone(&front), Arc::clone(&client)), &down);
    {
        let front = Arc::clone(&front);
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf) else { continue };
                {
                    let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
                    if *c != Some(from) {
                        *c = Some(from);
                    }
                }
                up_lane.forward(&buf[..n]);
            }
        });
    }
    {
        let back = Arc::clone(&back);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                // A connected UDP socket reports ICMP errors (target not yet listening) here.
                let Ok(n) = back.recv(&mut buf) else { continue };
                down_lane.forward(&buf[..n]);
            }
        });
    }
    if let Some(file) = cfg.start_file.clone() {
        let active = Arc::clone(&active);
        let window = cfg.window;
        let (up, down) = (Arc::clone(&up), Arc::clone(&down));
        std::thread::spawn(move || {
            while !file.exists() {
                std::thread::sleep(Duration::from_millis(2));
            }
            active.store(true, Ordering::SeqCst);
            let t0 = Instant::now();
            eprintln!("impair: window open");
            if let Some(w) = window {
                std::thread::sleep(w);
                active.store(false, Ordering::SeqCst);
                eprintln!(
                    "impair: window closed after {} ms: up {}; down {}",
                    t0.elapsed().as_millis(),
                    up.summary(),
                    down.summary()
                );
            }
        });
    } else if let Some(w) = cfg.window {
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            std::thread::sleep(w);
            active.store(false, Ordering::SeqCst);
        });
    }
    if cfg.tcp {
        let l = TcpListener::bind(local).with_context(|| format!("bind tcp {local}"))?;
        let to = cfg.to;
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { continue };
                std::thread::spawn(move || relay_tcp(a, to));
            }
        });
    }
    Ok(Proxy { local, active, up, down })
}

/// Relays one TCP connection to `to`, both ways; an end of stream is passed on as a shutdown
/// (so a peer process's death still reads as end-of-file on the other side).
fn relay_tcp(a: TcpStream, to: SocketAddr) {
    let Ok(b) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        let _ = a.shutdown(Shutdown::Both);
        return;
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let pipe = |mut from: TcpStream, mut into: TcpStream| {
        move || {
            let mut buf = [0u8; 16384];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => {
                        let _ = into.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if into.write_all(&buf[..n]).is_err() {
                            let _ = from.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    Err(_) => {
                        // A reset: pass it on as a close.
                        let _ = into.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
        }
    };
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let t = std::thread::spawn(pipe(a, b2));
    pipe(b, a2)();
    let _ = t.join();
}

/// `testbed impair`: starts the proxy and serves until killed.
pub fn run(cfg: &Config) -> Result<()> {
    let p = start(cfg)?;
    eprintln!(
        "impair: listening on {} (udp{}) -> {}; {} seed {} window {}",
        p.local,
        if cfg.tcp { "+tcp" } else { "" },
        cfg.to,
        cfg.impairment.describe(),
        cfg.seed,
        cfg.window.map(|w| format!("{} ms", w.as_millis())).unwrap_or_else(|| "unbounded".into()),
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UdpSocket, UdpSocket) {
        let target = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&target, &client] {
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        }
        (target, client)
    }

    fn proxy(to: SocketAddr, imp: Impairment, window: Option<Duration>) -> Proxy {
        let cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            to,
            impairment: imp,
            seed: 7,
            start_file: None,
            window,
            tcp: false,
        };
        start(&cfg).unwrap()
    }

    /// Sends `n` numbered datagrams client -> target; returns what arrived.
    fn send_n(client: &UdpSocket, target: &UdpSocket, to: SocketAddr, n: u32) -> Vec<Vec<u8>> {
        // Read while sending: a socket buffer holds only a few hundred small datagrams.
        let t = target.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok(k) = t.recv(&mut buf) {
                got.push(buf[..k].to_vec());
            }
            got
        });
        for i in 0..n {
            let mut d = i.to_be_bytes().to_vec();
            d.extend_from_slice(&[0xAA; 60]);
            client.send_to(&d, to).unwrap();
            if i % 32 == 31 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        reader.join().unwrap()
    }

    #[test]
    fn passes_through_both_ways() {
        let (target, client) = pair();
        let p = proxy(target.local_addr().unwrap(), Impairment::default(), None);
        client.send_to(b"hello", p.local).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = target.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        target.send_to(b"world", from).unwrap();
        let (n, back) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], back), (&b"world"[..], p.local));
    }

    #[test]
    fn loss_dup_corrupt_at_about_their_rates() {
        let (target, client) = pair();
        let imp = Impairment { loss: 0.1, dup: 0.1, corrupt: 0.1, ..Default::default() };
        let p = proxy(target.local_addr().unwrap(), imp, None);
        let got = send_n(&client, &target, p.local, 2000);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(c(&p.up.seen), 2000);
        let (dropped, dup, bad) = (c(&p.up.dropped), c(&p.up.duplicated), c(&p.up.corrupted));
        for (what, k) in [("dropped", dropped), ("duplicated", dup)] {
            assert!((120..=280).contains(&k), "{what} {k} of 2000 at 10%");
        }
        assert_eq!(got.len() as u64, 2000 - dropped + dup);
        let mangled =
            got.iter().filter(|d| d[4..] != [0xAA; 60][..] || u32::from_be_bytes([d[0], d[1], d[2], d[3]]) >= 2000);
        assert!(mangled.count() as u64 <= bad && bad > 100, "corrupted {bad}");
    }

    #[test]
    fn delay_with_jitter_reorders_and_window_ends() {
        let (target, client) = pair();
        let imp =
            Impairment { delay: Duration::from_millis(20), jitter: Duration::from_millis(10), ..Default::default() };
        let p = proxy(target.local_addr().unwrap(), imp, Some(Duration::from_millis(400)));
        let t0 = Instant::now();
        let got = send_n(&client, &target, p.local, 200);
        assert_eq!(got.len(), 200);
        assert!(t0.elapsed() >= Duration::from_millis(10));
        let order: Vec<u32> = got.iter().map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]])).collect();
        assert!(order.windows(2).any(|w| w[0] > w[1]), "jitter should reorder some datagrams");
        assert_eq!(p.up.delayed.load(Ordering::Relaxed), 200);
        std::thread::sleep(Duration::from_millis(500));
        assert!(!p.active());
        client.send_to(b"late", p.local).unwrap();
        let mut buf = [0u8; 64];
        let n = target.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"late");
        assert_eq!(p.up.delayed.load(Ordering::Relaxed), 200, "outside the window nothing is delayed");
    }

    #[test]
    fn keep_order_delays_without_reordering() {
        let (target, client) = pair();
        let imp = Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            keep_order: true,
            ..Default::default()
        };
        let p = proxy(target.local_addr().unwrap(), imp, None);
        let got = send_n(&client, &target, p.local, 200);
        let order: Vec<u32> = got.iter().map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]])).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn same_seed_same_fates() {
        let fates = |seed: u64| {
            let mut r = XorShift64::seeded(seed);
            (0..100).map(|_| r.chance(0.3)).collect::<Vec<_>>()
        };
        assert_eq!(fates(5), fates(5));
        assert_ne!(fates(5), fates(6));
    }
}
