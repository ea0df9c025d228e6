//! The dirty harvest on a live guest, with and without the hot-page rule
//! (`vmm::dirty::HotPagesConfig`): every harvest, applied to a copy of guest memory, makes the
//! copy equal to the guest's memory, and pages kept writable really stay in the log. These
//! tests need /dev/kvm and the fixture guest (`make guest`): they fail, loudly, without them.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::HotPagesConfig;
use vmm::vm::{Vm, VmConfig};

mod common;
use common::{fail, kernel};

/// Guest memory as one buffer per region, read while the VM is paused.
fn read_all(vm: &Vm) -> Vec<(u64, Vec<u8>)> {
    vmm::memory::layout_of(vm.memory())
        .into_iter()
        .map(|(gpa, size)| {
            let mut b = vec![0u8; size as usize];
            vm.memory().read_slice(&mut b, GuestAddress(gpa)).expect("read guest memory");
            (gpa, b)
        })
        .collect()
}

fn apply(copy: &mut [(u64, Vec<u8>)], vm: &Vm, pages: impl Iterator<Item = u64>) {
    for p in pages {
        let gpa = p * 4096;
        let (base, buf) =
            copy.iter_mut().find(|(b, v)| gpa >= *b && gpa < *b + v.len() as u64).expect("page in memory");
        let at = (gpa - *base) as usize;
        vm.memory().read_slice(&mut buf[at..at + 4096], GuestAddress(gpa)).expect("read page");
    }
}

/// Boots the dirty guest rewriting a 1 MiB working set ~4 times per 5 ms epoch, then runs
/// `rounds` epochs of pause / harvest / copy the harvested pages / compare / resume.
/// Returns the hot pages at the end. With `precopy`, each epoch also harvests halfway while
/// the guest runs (`harvest_dirty_leaving_kept`, the engine's in-epoch pre-copy) and copies
/// those pages then; the pause's harvest must complete that copy.
fn run(test: &str, hot: Option<HotPagesConfig>, rounds: usize, precopy: bool) -> (Vm, u64) {
    let mut vm = Vm::boot(VmConfig {
        kernel: kernel(test),
        cmdline: "workload=dirty wss=1 rate=200000".into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        serial: Box::new(std::io::sink()),
        net: None,
    })
    .expect("boot");
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().expect("pause");
    vm.enable_dirty_log().expect("dirty log");
    if let Some(h) = hot {
        assert!(vm.set_hot_pages(h).expect("hot pages"), "{test}: this KVM has no manual dirty-log protection");
    }
    let mut copy = read_all(&vm);
    vm.resume();
    let mut harvested = 0;
    for round in 0..rounds {
        if precopy {
            std::thread::sleep(Duration::from_millis(3));
            let early = vm.harvest_dirty_leaving_kept().expect("harvest while running");
            harvested += early.page_count();
            apply(&mut copy, &vm, early.pages());
            std::thread::sleep(Duration::from_millis(2));
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.pause().expect("pause");
        let dirty = vm.harvest_dirty().expect("harvest");
        harvested += dirty.page_count();
        apply(&mut copy, &vm, dirty.pages());
        let now = read_all(&vm);
        for ((gpa, a), (_, b)) in copy.iter().zip(&now) {
            if a != b {
                let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
                fail(test, format!("round {round}: the copy differs from guest memory at {:#x}", gpa + at as u64));
            }
        }
        vm.resume();
    }
    assert!(harvested > rounds as u64 * 100, "{test}: the guest dirtied only {harvested} pages");
    let hot = vm.hot_pages();
    (vm, hot)
}

#[test]
fn harvests_applied_in_turn_reproduce_guest_memory_with_hot_pages_kept_writable() {
    let test = "hot pages";
    let (mut vm, hot) = run(test, Some(HotPagesConfig::default()), 120, false);
    assert!(hot >= 200, "{test}: only {hot} of the 256 rewritten pages are kept writable");
    // Two harvests with the guest stopped in between: the second one returns exactly the pages
    // kept writable (still in the log), which the classic log would have protected and dropped.
    vm.pause().expect("pause");
    vm.harvest_dirty().expect("harvest");
    let kept = vm.hot_pages();
    let again = vm.harvest_dirty().expect("harvest");
    assert_eq!(again.page_count(), kept, "{test}: a paused guest's second harvest holds the kept pages");
    assert!(kept > 0);
    vm.shutdown();
}

#[test]
fn harvests_applied_in_turn_reproduce_guest_memory_without_hot_pages() {
    let test = "classic log";
    let (mut vm, hot) = run(test, None, 60, false);
    assert_eq!(hot, 0);
    vm.pause().expect("pause");
    vm.harvest_dirty().expect("harvest");
    let again = vm.harvest_dirty().expect("harvest");
    assert_eq!(again.page_count(), 0, "{test}: nothing is written while paused");
    vm.shutdown();
}

#[test]
fn a_copy_taken_while_the_guest_runs_without_the_kept_pages_is_completed_by_the_pause() {
    let test = "pre-copy";
    let window = HotPagesConfig { window: 8, ..HotPagesConfig::default() };
    let (mut vm, hot) = run(test, Some(window), 120, true);
    assert!(hot > 0, "{test}: no page is kept writable");
    vm.shutdown();
    let (mut vm, _) = run("pre-copy, classic log", None, 40, true);
    vm.shutdown();
}
