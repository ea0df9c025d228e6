//! `workload=kv`: a memcached text-protocol server on TCP port 11211 (guest_kv::protocol over
//! smoltcp over virtio-net), driven from ring 3 by polling.
//!
//! `conns` TCP sockets listen at once (one connection each; a closed one listens again). The
//! loop polls the rings while there is work, spins a little when there is none, then enables
//! the receive interrupt and halts until it or the next tick arrives.

use crate::arch::{halt_until_changed, irq_count, pause, rdtsc, take_irq_pending};
use crate::net::VirtioNet;
use crate::println;
use crate::time::now_ms;
use alloc::vec;
use alloc::vec::Vec;
use guest_kv::cmdline::KvConfig;
use guest_kv::protocol::{OUT_HIGH_WATER, Output, Progress, Session};
use guest_kv::store::Store;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

/// The memcached port.
pub const PORT: u16 = 11211;
const SOCKET_RX: usize = 64 * 1024;
const SOCKET_TX: usize = 128 * 1024;
/// Idle loop iterations (each polls the rings and the sockets) before halting.
const IDLE_SPINS: u32 = 200;

struct Conn {
    handle: SocketHandle,
    session: Session,
    out: Output,
    active: bool,
    closing: bool,
}

impl Conn {
    fn new(handle: SocketHandle) -> Self {
        Conn { handle, session: Session::new(), out: Output::new(), active: false, closing: false }
    }
}

/// Runs forever. `devices` are the command line's virtio-mmio devices as (base, gsi).
pub fn run(cfg: KvConfig, devices: &[(u64, u32)], store_limit: u64) -> ! {
    let Some((mmio, gsi)) = VirtioNet::find(devices) else {
        panic!("kv: no virtio-net device among {} virtio_mmio.device entries", devices.len());
    };
    crate::apic::route_gsi(gsi);
    let [a, b, c, d] = cfg.ip.addr;
    let mut net = VirtioNet::new(mmio, [0x02, 0x00, a, b, c, d]);
    let mac = net.mac;

    let mut config = Config::new(EthernetAddress(mac).into());
    config.random_seed = rdtsc();
    let mut iface = Interface::new(config, &mut net, Instant::from_millis(now_ms() as i64));
    iface.update_ip_addrs(|addrs| {
        addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), cfg.ip.prefix)).expect("one address");
    });
    if let Some([w, x, y, z]) = cfg.gw {
        iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(w, x, y, z)).expect("default route");
    }
    let mut sockets = SocketSet::new(Vec::new());
    let mut conns = Vec::with_capacity(cfg.conns);
    for _ in 0..cfg.conns {
        let mut s =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; SOCKET_RX]), tcp::SocketBuffer::new(vec![0; SOCKET_TX]));
        s.set_nagle_enabled(false);
        s.listen(PORT).expect("listen");
        conns.push(Conn::new(sockets.add(s)));
    }
    let mut store = Store::new(store_limit as usize);
    println!(
        "kv: ip={a}.{b}.{c}.{d}/{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} port={PORT} conns={} mem={}MiB",
        cfg.ip.prefix,
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        cfg.conns,
        store_limit >> 20
    );
    println!("ready");

    let mut idle = 0u32;
    loop {
        if take_irq_pending() & (1 << gsi) != 0 {
            net.ack_interrupt();
        }
        let now = now_ms();
        let changed = iface.poll(Instant::from_millis(now as i64), &mut net, &mut sockets);
        let mut work = changed == smoltcp::iface::PollResult::SocketStateChanged;
        for conn in conns.iter_mut() {
            let sock = sockets.get_mut::<tcp::Socket>(conn.handle);
            work |= serve(sock, conn, &mut store, now / 1000);
        }
        if work {
            // Send what the connections queued without waiting for the next round.
            iface.poll(Instant::from_millis(now as i64), &mut net, &mut sockets);
        }
        net.flush();
        if work || net.rx_pending() {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < IDLE_SPINS {
            pause();
            continue;
        }
        // Sleep until the receive interrupt or the next tick (smoltcp's timers have tick
        // resolution anyway).
        let seen = irq_count();
        net.set_rx_interrupts(true);
        crate::arch::mb();
        if !net.rx_pending() {
            halt_until_changed(seen);
        }
        net.set_rx_interrupts(false);
        idle = 0;
    }
}

/// Moves one connection forward; returns whether anything happened.
fn serve(sock: &mut tcp::Socket<'_>, c: &mut Conn, store: &mut Store, now_s: u64) -> bool {
    let mut work = false;
    // A connection ends in Closed or TimeWait, or back in Listen when a half-open one was
    // reset: the next one on this socket starts with a fresh session either way.
    if c.active && matches!(sock.state(), tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait) {
        store.stats.curr_connections -= 1;
        let handle = c.handle;
        *c = Conn::new(handle);
        work = true;
    }
    if sock.is_active() && !c.active {
        c.active = true;
        store.stats.curr_connections += 1;
        store.stats.total_connections += 1;
    }
    if c.active {
        // Receive as much as the session takes.
        while sock.can_recv() {
            let room = c.session.input_room();
            if room == 0 {
                break;
            }
            let session = &mut c.session;
            let n = sock
                .recv(|buf| {
                    let n = buf.len().min(room);
                    session.feed(&buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            work = true;
        }
        // Run commands, send replies, repeat while replies drain and commands remain.
        loop {
            if !c.closing && c.session.buffered() > 0 && c.out.len() < OUT_HIGH_WATER {
                let before = (c.session.buffered(), c.out.len());
                if c.session.process(store, now_s, &mut c.out) == Progress::Close {
                    c.closing = true;
                }
                if before != (c.session.buffered(), c.out.len()) {
                    work = true;
                }
            }
            let mut sent = 0;
            while !c.out.is_empty() && sock.can_send() {
                let n = sock.send_slice(c.out.front()).unwrap_or(0);
                if n == 0 {
                    break;
                }
                c.out.consume(n);
                sent += n;
            }
            if sent == 0 {
                break;
            }
            work = true;
        }
        // Close once the replies are out, after `quit` or when the client has closed its half.
        if c.out.is_empty() && (c.closing || sock.state() == tcp::State::CloseWait) {
            sock.close();
        }
    }
    if !sock.is_open() {
        if c.active {
            store.stats.curr_connections -= 1;
            let handle = c.handle;
            *c = Conn::new(handle);
        }
        sock.listen(PORT).expect("listen");
        work = true;
    }
    work
}
