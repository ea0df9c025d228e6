//! Arbiter behaviour that needs no simulator: restarts from the journal, hostile input, API
//! refusals.

use std::time::Duration;

mod common;

use common::*;
use failover::{ArbiterConfig, ArbiterError, Event, VmId};

#[test]
fn a_restarted_node_keeps_its_term_vote_and_state() {
    let mut g = Group::new();
    g.at(1, |a, now| a.request_activity(now, VM)).unwrap();
    g.run(300);
    let (term, leader) = (g.node(2).term(), g.node(2).leader());
    assert!(term >= 2 && leader.is_some());
    let record = g.node(2).record(VM).expect("granted");
    assert_eq!((record.holder, record.generation), (1, 1));
    let applied = g.node(2).applied();
    let incarnation = g.node(2).incarnation();
    g.crash(2);
    g.restart(2);
    // Before any message: the journal gave back the term, the vote and the applied state.
    assert_eq!(g.node(2).term(), term);
    assert_eq!(g.node(2).record(VM), Some(record));
    assert_eq!(g.node(2).incarnation(), incarnation + 1);
    g.run(300);
    assert!(g.node(2).applied() > applied);
    // A replay after restart raises no events for what happened before.
    assert!(!g.events.iter().any(|(n, e)| *n == 2 && matches!(e, Event::BackupOf { .. })));
}

#[test]
fn a_restarted_holder_must_ask_again_before_releasing() {
    let mut g = Group::new();
    g.at(1, |a, now| a.request_activity(now, VM)).unwrap();
    g.run(300);
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)));
    g.crash(1);
    g.restart(1);
    assert!(!g.at(1, |a, now| a.may_release_output(now, VM)), "a new process has no lease");
    g.run(200);
    assert!(!g.at(1, |a, now| a.may_release_output(now, VM)), "nor does it renew by itself");
    // An agent restarted beside a guest that still runs asks again and renews.
    g.at(1, |a, now| a.request_activity(now, VM)).unwrap();
    g.run(100);
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)));
}

#[test]
fn hostile_input_is_refused_cleanly() {
    let mut g = Group::new();
    g.run(200);
    let now = g.now;
    let w = g.node(3);
    assert!(matches!(w.step(now, 1, b""), Err(ArbiterError::Wire(_))));
    assert!(matches!(w.step(now, 1, &[0x52, 1, 0, 0, 0, 0, 0xff]), Err(ArbiterError::Wire(_))));
    let mut x = testbed::harness::rng::XorShift64(7);
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len).map(|_| x.next_u64() as u8).collect();
        assert!(w.step(now, 1, &bytes).is_err());
    }
    // A real message, replayed by the wrong peer or to the wrong node.
    let (to, bytes) = loop {
        g.run(1);
        let now = g.now;
        let node = g.node(1);
        node.handle_timeout(now).unwrap();
        if let Some(t) = node.poll_transmit() {
            break t;
        }
    };
    let now = g.now;
    let err = g.node(to).step(now, 2, &bytes).unwrap_err();
    assert!(matches!(err, ArbiterError::Spoofed { from: 2, claimed: 1 }), "{err}");
    let other = if to == 2 { 3 } else { 2 };
    assert!(matches!(g.node(other).step(now, 1, &bytes), Err(ArbiterError::Misrouted { .. })));
    assert!(matches!(g.node(to).step(now, 9, &bytes), Err(ArbiterError::Spoofed { .. })));
    g.run(100);
}

#[test]
fn api_refusals_name_the_vm_and_the_node() {
    let mut g = Group::new();
    g.at(1, |a, now| a.request_activity(now, VM)).unwrap();
    g.run(300);
    let now = g.now;
    let err = g.node(2).report_primary_dead(now, VM).unwrap_err();
    assert_eq!(err.to_string(), "vm-5: node 2 is not its recorded backup");
    let err = g.node(2).request_activity(now, VM).unwrap_err();
    assert_eq!(err.to_string(), "vm-5: node 1 holds generation 1, node 2 may not ask for it");
    assert!(matches!(g.node(2).report_backup_dead(now, VM), Err(ArbiterError::NotHolder { .. })));
    assert!(matches!(g.node(1).set_backup(now, VM, 1), Err(ArbiterError::BadBackup { .. })));
    assert!(matches!(g.node(1).set_backup(now, VM, 9), Err(ArbiterError::BadBackup { .. })));
    g.node(1).set_backup(now, VM, 2).unwrap();
    g.run(100);
    let err = g.at(2, |a, now| a.request_activity(now, VM)).unwrap_err();
    assert!(matches!(err, ArbiterError::PrimaryNotDead { .. }), "{err}");
    assert!(g.events.contains(&(1, Event::Protected { vm: VM, generation: 1, backup: 2 })));
    assert!(g.events.contains(&(2, Event::BackupOf { vm: VM, generation: 1, holder: 1 })));
    // With everybody alive and renewing, a takeover request goes nowhere.
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    g.run(500);
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)));
    assert_eq!(g.node(3).record(VM).map(|r| r.generation), Some(1));
    // A second VM is independent.
    let now = g.now;
    g.node(2).request_activity(now, VmId(6)).unwrap();
    g.run(200);
    assert!(g.at(2, |a, now| a.may_release_output(now, VmId(6))));
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)));
}

#[test]
fn relinquish_lets_the_lease_lapse_and_the_backup_take_over() {
    let mut g = Group::protected();
    g.node(1).relinquish(VM);
    assert!(!g.at(1, |a, now| a.may_release_output(now, VM)));
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    g.run(300);
    assert!(g.at(2, |a, now| a.may_release_output(now, VM)));
    assert!(g.events.contains(&(1, Event::Fenced { vm: VM, generation: 2 })));
    assert!(g.events.contains(&(2, Event::Granted { vm: VM, generation: 2 })));
}

/// Milliseconds from a crash of the holder (which leads raft) to the backup's grant, when the
/// backup reports the holder `dead` (heartbeat silence) or `gone` (its process is known dead).
fn crash_to_grant(gone: bool) -> u64 {
    let mut g = Group::protected();
    assert_eq!(g.node(2).leader(), Some(1), "leadership follows the holder");
    g.crash(1);
    let now = g.now;
    if gone {
        g.node(2).report_primary_gone(now, VM).unwrap();
    } else {
        g.node(2).report_primary_dead(now, VM).unwrap();
    }
    g.ms_to_backup_grant()
}

#[test]
fn a_dead_or_gone_holder_that_led_raft_costs_no_election() {
    let wait = ArbiterConfig::new(1, &[1, 2, 3]).lease;
    let floor = wait.voter_wait(wait.lease_timeout).as_millis() as u64;
    let dead = crash_to_grant(false);
    let gone = crash_to_grant(true);
    eprintln!("crash to grant: dead {dead} ms, gone {gone} ms, lease floor {floor} ms");
    // The grant never comes before the old lease certainly ended (safety) ...
    assert!(gone + 15 >= floor, "gone {gone} ms is below the lease floor {floor} ms (renewals 15 ms apart)");
    // ... and with the evidence it comes within a few ms of it, not after an election.
    assert!(gone <= floor + 10, "gone {gone} ms, floor {floor} ms");
    // Without the evidence the backup campaigns once its own faith in the silent leader
    // lapsed (4 ticks), which the crate's 56 ms floor outlasts: no election on the path either.
    assert!(dead + 15 >= floor && dead <= floor + 15, "dead {dead} ms, floor {floor} ms");
}

#[test]
fn a_host_wide_stall_changes_no_leader_and_grants_nothing() {
    let mut g = Group::protected();
    assert_eq!(g.node(1).leader(), Some(1));
    let before = g.events.len();
    // Every process of the host stops for 120 ms (none is called), then all run again.
    g.now += Duration::from_millis(120);
    g.run(300);
    let after: Vec<_> = g.events[before..].to_vec();
    assert!(
        !after.iter().any(|(_, e)| matches!(e, Event::LeaderChanged { .. } | Event::Fenced { .. })),
        "a stall of everybody moved leadership or fenced the holder: {after:?}"
    );
    assert_eq!(g.node(1).leader(), Some(1));
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)), "the holder renewed its lease after the stall");
}

/// The holder (node 1, raft leader) cut off from everybody, the backup (2) reporting it dead at
/// the cut: milliseconds to the backup's grant.
fn isolated_to_grant() -> u64 {
    let mut g = Group::protected();
    assert_eq!(g.node(2).leader(), Some(1), "leadership follows the holder");
    g.cuts = vec![(1, 2), (1, 3)];
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    g.ms_to_backup_grant()
}

#[test]
fn a_backup_taking_over_from_an_isolated_leader_campaigns_once_its_faith_lapses() {
    let cfg = ArbiterConfig::new(1, &[1, 2, 3]);
    let floor = cfg.lease.voter_wait(cfg.lease.lease_timeout).as_millis() as u64;
    let faith = (cfg.tick * cfg.election_ticks as u32).as_millis() as u64;
    let ms = isolated_to_grant();
    eprintln!("isolated holder to grant: {ms} ms (lease floor {floor} ms, faith {faith} ms)");
    assert!(ms + 15 >= floor, "granted {ms} ms after the cut, below the lease floor {floor} ms");
    // No waiting out the campaign delay or a split vote with the witness: the grant comes
    // within a few ms of whichever of the lease floor and the faith ends last.
    assert!(ms <= floor.max(faith) + 15, "granted {ms} ms after the cut (floor {floor}, faith {faith})");
}

#[test]
fn a_backup_cut_off_from_the_holder_alone_unseats_nobody() {
    let mut g = Group::protected();
    assert_eq!(g.node(2).leader(), Some(1));
    // Only primary and backup are cut: the witness still hears the holder, which keeps leading
    // and renewing through it; the backup's takeover request and campaigns get nowhere.
    g.cuts = vec![(1, 2)];
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    let before = g.events.len();
    g.run(1000);
    let after: Vec<_> = g.events[before..].to_vec();
    assert!(
        !after.iter().any(|(_, e)| matches!(e, Event::Granted { .. } | Event::Fenced { .. })),
        "a backup cut off from the holder alone took over: {after:?}"
    );
    assert_eq!(g.node(1).leader(), Some(1), "the holder lost raft leadership");
    assert_eq!(g.node(3).leader(), Some(1));
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)), "the holder lost its lease");
}
