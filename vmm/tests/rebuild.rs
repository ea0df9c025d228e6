//! `Vm::rebuild`: a paused VM replaced in place by one built from saved state over the same
//! memory, keeping its console, TAP and transmit sink (how a migration's source takes its guest
//! back from a reverse checkpoint). These tests need /dev/kvm and the fixture guest (`make
//! guest`), the TAP one root: they fail, loudly, without them; they never pass without running.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testbed::lines::{CounterChecker, parse_counter, whole_lines};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::devices::virtio::net::{NetState, TapSink, TxSink};
use vmm::memory::GuestMemory;
use vmm::vcpu::StopReason;
use vmm::vm::{NetSpec, Vm, VmConfig, VmError};

mod common;
use common::{Capture, fail, kernel};

const WAIT: Duration = Duration::from_secs(10);

/// The VMM's log lines (the timings of each rebuild) in the test's output.
fn log() {
    let _ = tracing_subscriber::fmt().with_env_filter("vmm=info").with_ansi(false).with_test_writer().try_init();
}

impl Capture {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn from(&self, at: usize) -> Vec<u8> {
        self.0.lock().unwrap()[at..].to_vec()
    }

    fn range(&self, from: usize, to: usize) -> Vec<u8> {
        self.0.lock().unwrap()[from..to].to_vec()
    }

    /// Waits until the output from `at` on holds `n` complete counter lines.
    fn wait_lines(&self, at: usize, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&self.from(at)).into_owned();
            if count_lines(&text) >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest printed {} of {n} counter lines: {text:?}",
                count_lines(&text)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a line holding `what`.
    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !String::from_utf8_lossy(&self.from(0)).contains(what) {
            assert!(
                Instant::now() < deadline,
                "the guest never printed {what:?}: {:?}",
                String::from_utf8_lossy(&self.from(0))
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn count_lines(text: &str) -> usize {
    whole_lines(text).lines().filter(|l| parse_counter(l.trim()).is_some()).count()
}

/// Checks that the counter lines of `history` run 1, 2, 3, ... with matching checksums;
/// returns the last number.
fn check_counter(history: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(history).into_owned();
    let mut checker = CounterChecker::new();
    let mut last = 0;
    for line in whole_lines(&text).lines().map(str::trim).filter(|l| l.starts_with("seq=")) {
        last = checker.check(line).unwrap_or_else(|e| panic!("counter broken: {e}\n{text}")).0;
    }
    last
}

fn boot(kernel: PathBuf, cmdline: &str, memory_bytes: u64, out: &Capture, net: Option<NetSpec>) -> Vm {
    Vm::boot(VmConfig { kernel, cmdline: cmdline.into(), memory_bytes, vcpus: 1, serial: Box::new(out.clone()), net })
        .expect("boot")
}

/// A copy of all guest memory, region by region.
fn snapshot(mem: &GuestMemory) -> Vec<(u64, Vec<u8>)> {
    vmm::memory::layout_of(mem)
        .into_iter()
        .map(|(start, len)| {
            let mut bytes = vec![0u8; len as usize];
            mem.read_slice(&mut bytes, GuestAddress(start)).unwrap();
            (start, bytes)
        })
        .collect()
}

fn write_back(mem: &GuestMemory, snap: &[(u64, Vec<u8>)]) {
    for (start, bytes) in snap {
        mem.write_slice(bytes, GuestAddress(*start)).unwrap();
    }
}

/// Where each region of `mem` is mapped in this process.
fn host_addrs(mem: &GuestMemory) -> Vec<usize> {
    mem.iter().map(|r| r.as_ptr() as usize).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The test: a counter guest saved at S1 (state and a full copy of memory), run on,
/// then put back to S1 in its own memory and rebuilt from S1 continues exactly from S1: the
/// lines printed after S1 are printed again, byte for byte, and nothing is skipped, on the same
/// console. Alternately with a VM prepared while the guest runs and without; prints the times.
#[test]
fn a_rebuilt_vm_continues_from_the_saved_state_over_its_own_memory() {
    const TEST: &str = "a_rebuilt_vm_continues_from_the_saved_state_over_its_own_memory";
    let kernel = kernel(TEST);
    let _g = testbed::harness::serial_guard();
    log();
    let out = Capture::default();
    let mut vm = boot(kernel, "workload=counter period_ms=5", 64 << 20, &out, None);
    let memory_host = host_addrs(vm.memory());
    // The guest's history: `hist` and then the console's output from `mark` on.
    let (mut hist, mut mark) = (Vec::new(), 0usize);
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut drops = Vec::new();
    for round in 0..8 {
        let prepared = round % 2 == 0;
        out.wait_lines(mark, 5);
        // Prepared while the guest runs, as the source would ahead of time.
        let p = prepared.then(|| vm.prepare_rebuild().expect("prepare_rebuild"));
        vm.pause().unwrap();
        let s1 = vm.save_state().unwrap();
        let m1 = snapshot(vm.memory());
        let at_s1 = out.len();
        let mut hist_s1 = hist.clone();
        hist_s1.extend(out.range(mark, at_s1));
        let last_s1 = check_counter(&hist_s1);

        vm.resume();
        out.wait_lines(at_s1, 5);
        vm.pause().unwrap();
        let at_rebuild = out.len();
        let run2 = out.range(at_s1, at_rebuild);
        let mut hist_run2 = hist_s1.clone();
        hist_run2.extend(&run2);
        let last_run2 = check_counter(&hist_run2);
        assert!(last_run2 >= last_s1 + 5, "the guest ran on after S1: {last_s1} -> {last_run2}");

        write_back(vm.memory(), &m1);
        let t = Instant::now();
        let old = vm.rebuild(p, &s1).expect("rebuild");
        let took = t.elapsed();
        times[usize::from(prepared)].push(ms(took));
        assert!(vm.is_paused(), "a rebuilt vm comes back paused");
        assert_eq!(old.stopped(), Some(StopReason::Requested), "the old vm's vcpus are ended");
        assert_eq!(host_addrs(vm.memory()), memory_host, "the same mapping, not a copy");
        let t = Instant::now();
        drop(old);
        drops.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(out.len(), at_rebuild, "nothing runs before the caller resumes");

        vm.resume();
        out.wait_lines(at_rebuild, count_lines(&String::from_utf8_lossy(&run2)) + 3);
        let run3 = out.from(at_rebuild);
        assert_eq!(
            String::from_utf8_lossy(&run3[..run2.len()]),
            String::from_utf8_lossy(&run2),
            "round {round}: after the rebuild the guest repeats what it printed after S1, byte for byte"
        );
        (hist, mark) = (hist_s1, at_rebuild);
        let mut all = hist.clone();
        all.extend(out.from(mark));
        let last = check_counter(&all);
        assert!(last > last_run2, "round {round}: the counter went on past {last_run2}: {last}");
        eprintln!(
            "round {round}: rebuild {} took {:.2} ms; S1 at seq={last_s1}, ran on to seq={last_run2}, now seq={last}",
            if prepared { "with a prepared vm" } else { "without a prepared vm" },
            ms(took)
        );
    }
    for (name, v) in [("without a prepared vm", &times[0]), ("with a prepared vm", &times[1])] {
        eprintln!("rebuild {name}: {:.2?} ms", v);
    }
    eprintln!("dropping the old vm: {drops:.1?} ms");
    vm.shutdown();
}

/// A rebuild of a running VM is refused and the VM runs on untouched, its console included;
/// one whose state does not fit (a net device this VM lacks; a receive FIFO the UART cannot
/// hold, found only while the devices are built, after the vCPUs took their state) fails and
/// leaves the VM as it was: paused, resumable, its counter going on where it stopped on the
/// same console.
#[test]
fn a_refused_or_failed_rebuild_leaves_the_vm_as_it_was() {
    const TEST: &str = "a_refused_or_failed_rebuild_leaves_the_vm_as_it_was";
    let kernel = kernel(TEST);
    let _g = testbed::harness::serial_guard();
    log();
    let out = Capture::default();
    let mut vm = boot(kernel, "workload=counter period_ms=5", 64 << 20, &out, None);
    out.wait_lines(0, 3);
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    vm.resume();

    let p = vm.prepare_rebuild().expect("prepare_rebuild while running");
    match vm.rebuild(Some(p), &state) {
        Err(VmError::NotPaused(_)) => {}
        Err(e) => panic!("a rebuild of a running vm failed with {e}, expected NotPaused"),
        Ok(_) => panic!("a running vm was rebuilt"),
    }
    assert!(!vm.is_paused(), "a refused rebuild leaves the vm running");
    let at = out.len();
    out.wait_lines(at, 3);
    assert_eq!(vm.stopped(), None);

    vm.pause().unwrap();
    let mut bad = vm.save_state().unwrap();
    let at_failure = out.len();
    let mut with_net = bad.clone();
    with_net.net = Some(NetState::default());
    match vm.rebuild(None, &with_net) {
        Err(VmError::State(_)) => {}
        Err(e) => panic!("a rebuild from a state with a net device the vm lacks failed with {e}, expected State"),
        Ok(_) => panic!("a vm without a net device was rebuilt from a state with one"),
    }
    bad.serial.in_buffer = vec![b'x'; 4096];
    match vm.rebuild(None, &bad) {
        Err(VmError::Serial(_)) => {}
        Err(e) => panic!("a rebuild with a bad serial state failed with {e}, expected a serial error"),
        Ok(_) => panic!("a rebuild with a bad serial state succeeded"),
    }
    assert!(vm.is_paused(), "a failed rebuild leaves the vm paused");
    assert_eq!(vm.stopped(), None, "a failed rebuild leaves the vcpus alone");
    vm.resume();
    out.wait_lines(at_failure, 3);
    check_counter(&out.from(0));
    vm.shutdown();
}

/// Counts the frames that reach it and passes them to the TAP.
struct CountingSink(TapSink, Arc<AtomicU64>);

impl TxSink for CountingSink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.send(frame)
    }
}

const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
const GUEST_MAC: [u8; 6] = [0x02, 0x55, 0x44, 0x00, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x99, 0x00, 0x00, 0x00, 0x01];

/// A packet socket on the TAP's host side: what the TAP's descriptor writes arrives here, and
/// what is sent here is read from the TAP's descriptor.
struct Wire(OwnedFd);

impl Wire {
    fn open(ifname: &str) -> Wire {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() has no memory effects; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(raw >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero bytes are a valid `sockaddr_ll`.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid `sockaddr_ll` of the given length for the whole call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind packet socket: {}", std::io::Error::last_os_error());
        Wire(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length during the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send on the tap: {}", std::io::Error::last_os_error());
    }

    /// Waits for a frame `want` accepts.
    fn expect(&self, what: &str, want: impl Fn(&[u8]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            if want(&buf[..n as usize]) {
                return;
            }
        }
        panic!("no {what} on the tap within 5 s");
    }

    /// Asks who has the guest's address and waits for the guest's answer.
    fn arp(&self) {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&[10, 99, 0, 1]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&GUEST_IP);
        f.resize(60, 0);
        self.send(&f);
        self.expect("arp reply from the guest", |r| {
            r.len() >= 42
                && r[12..14] == [0x08, 0x06]
                && r[20..22] == [0, 2]
                && r[22..28] == GUEST_MAC
                && r[28..32] == GUEST_IP
        });
    }
}

/// A rebuilt VM's net device works on the very TAP descriptor the old one had (the interface
/// exists only while that descriptor is open) and sends through the sink the caller had put in
/// the old device: the kv guest answers ARP through it, with the old shell still alive and
/// after it is dropped, and the device's announcement goes out of the same TAP.
#[test]
fn a_rebuilt_vm_keeps_its_tap_and_sink() {
    const TEST: &str = "a_rebuilt_vm_keeps_its_tap_and_sink";
    let kernel = kernel(TEST);
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        fail(TEST, "this test needs root (a TAP device, a network namespace, a packet socket)".into());
    }
    let _g = testbed::harness::serial_guard();
    log();
    // Its own network namespace, on a thread of its own (the namespace is per thread): the TAP,
    // its packet socket and all they carry stay out of the host's network.
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            fail(TEST, format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let out = Capture::default();
        let net = NetSpec { tap: "usrb%d".into(), mac: Some(GUEST_MAC) };
        let mut vm = boot(kernel, "workload=kv ip=10.99.0.2/24", 128 << 20, &out, Some(net));
        out.wait_for("ready");
        let tap = Arc::clone(vm.net().expect("net device").lock().unwrap().device().tap());
        let wire = Wire::open(tap.name());
        wire.arp();

        let sent = Arc::new(AtomicU64::new(0));
        vm.pause().unwrap();
        let sink = Box::new(CountingSink(TapSink::new(Arc::clone(&tap)), Arc::clone(&sent)));
        drop(vm.net().unwrap().lock().unwrap().device().set_tx_sink(sink));
        let state = vm.save_state().unwrap();
        let p = vm.prepare_rebuild().unwrap();
        let old = vm.rebuild(Some(p), &state).expect("rebuild");
        let old_net = Arc::clone(old.net().expect("the old shell keeps its device"));
        assert!(!old_net.lock().unwrap().device().has_worker(), "the old net worker is stopped");
        let new_net = Arc::clone(vm.net().expect("the rebuilt vm has a net device"));
        assert!(!Arc::ptr_eq(&old_net, &new_net), "a new device");
        assert!(Arc::ptr_eq(new_net.lock().unwrap().device().tap(), &tap), "the same open tap");

        vm.resume();
        let before = sent.load(Ordering::SeqCst);
        wire.arp();
        assert!(sent.load(Ordering::SeqCst) > before, "the guest's answer went through the caller's sink");
        assert!(!old_net.lock().unwrap().device().has_worker(), "the old worker stays stopped after a resume");
        new_net.lock().unwrap().device().announce().unwrap();
        wire.expect("announcement", |f| f.len() >= 14 && f[12..14] == [0x80, 0x35] && f[6..12] == GUEST_MAC);

        let old_notifies = old_net.lock().unwrap().bus_notifies();
        drop(old_net);
        drop(old);
        wire.arp();
        let frames = new_net.lock().unwrap().device().stats().tx_frames.load(Ordering::SeqCst);
        assert!(frames >= 2, "the new device sent the answers: {frames}");
        // The guest's doorbells (queue notifies) reached both devices' workers through KVM
        // ioeventfds, never as exits to the VMM: booted and restored devices alike.
        for (name, n) in [("booted", old_notifies), ("rebuilt", new_net.lock().unwrap().bus_notifies())] {
            assert_eq!(n, 0, "{name} device: {n} queue notifies came through the MMIO bus (vCPU exits)");
        }
        vm.shutdown();
    })
    .join()
    .unwrap();
}
