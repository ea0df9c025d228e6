//! Hostile or malformed raft messages from an authenticated peer: each class is refused before
//! raft-rs sees it, with a logged reason, and the group goes on working. Before these checks,
//! some made raft-rs panic (which killed the arbiter's task), others moved the group's state:
//! a membership change, a command in another node's name, a forged acknowledgement that let
//! an isolated holder renew its lease alone, a lease that blocked failover for centuries.

mod common;

use std::time::Duration;

use common::*;
use failover::state::{Claim, Command};
use failover::{ArbiterError, Event};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType};

/// Node 1 holds the VM and leads raft, node 2 is its recorded backup, node 3 the witness.
fn group() -> Group {
    let g = Group::protected();
    assert_eq!(g.nodes[2].as_ref().unwrap().leader(), Some(1), "leadership follows the holder");
    g
}

/// The refusal's text, after checking it is one.
fn refused(result: Result<(), ArbiterError>) -> String {
    match result {
        Ok(()) => panic!("a hostile message was accepted"),
        Err(e) => {
            assert!(e.is_refusal(), "not a refusal: {}", chain(&e));
            chain(&e)
        }
    }
}

/// The group still works: every node applies new entries, and the holder still may release
/// output.
fn still_works(g: &mut Group) {
    let before: Vec<u64> = (1..=3).map(|id| g.node(id).applied()).collect();
    g.run(200);
    for id in 1..=3 {
        assert!(g.node(id).applied() > before[id as usize - 1], "node {id} applies nothing any more");
    }
    assert!(g.at(1, |a, now| a.may_release_output(now, VM)), "the holder lost its lease");
}

fn message(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

fn entry(index: u64, term: u64, cmd: &Command) -> Entry {
    Entry { index, term, data: cmd.encode().into(), ..Default::default() }
}

/// A snapshot from the leader (node 1) to the witness, far ahead of the log.
fn snapshot(g: &mut Group, voters: Vec<u64>, state: Vec<u8>) -> Message {
    let mut snap = g.capture(1, 3, |m| m.get_msg_type() == MessageType::MsgHeartbeat);
    snap.set_msg_type(MessageType::MsgSnapshot);
    snap.commit = 0;
    let term = snap.term;
    let s = snap.mut_snapshot();
    s.mut_metadata().index = 10_000;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters;
    s.data = state.into();
    snap
}

fn claim(node: u64, lease: Duration) -> Claim {
    Claim { node, incarnation: 1, seq: 1, lease }
}

#[test]
fn a_heartbeat_committing_beyond_the_log_is_refused_with_a_logged_reason() {
    let logs = Logs::global();
    let mut g = group();
    // raft-rs panics on this ("to_commit is out of range"): it killed the arbiter's task.
    let mut hb = g.capture(1, 3, |m| m.get_msg_type() == MessageType::MsgHeartbeat);
    hb.commit = 1_000_000;
    let why = refused(g.inject(1, 3, &hb));
    assert!(why.contains("heartbeat commits index 1000000, beyond this node's last index"), "{why}");
    let logged = logs.text();
    assert!(logged.contains("raft message refused") && logged.contains("heartbeat commits index 1000000"), "{logged}");
    assert_eq!(g.node(3).refused(), 1);
    still_works(&mut g);
}

#[test]
fn empty_proposals_and_read_index_requests_are_refused() {
    let mut g = group();
    let term = g.node(1).term();
    // raft-rs panics on both at a leader ("stepped empty MsgProp", an index out of bounds).
    let why = refused(g.inject(2, 1, &message(MessageType::MsgPropose, 2, 1, 0)));
    assert!(why.contains("MsgPropose from node 2 refused: a proposal without entries"), "{why}");
    let why = refused(g.inject(2, 1, &message(MessageType::MsgReadIndex, 2, 1, term)));
    assert!(why.contains("the group never sends this message type"), "{why}");
    still_works(&mut g);
}

#[test]
fn a_forged_acknowledgement_lets_no_isolated_holder_renew_alone() {
    let mut g = group();
    let template = g.capture(2, 1, |m| m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject);
    // The holder (and raft leader) is cut off; node 2's agent "acknowledges" entries the
    // leader never sent it. Counted as replicated, they would commit the holder's renewals on
    // its own, and its lease would run on while the others grant the VM to the backup.
    g.cuts = vec![(1, 2), (1, 3)];
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    let mut both = 0;
    for _ in 0..400 {
        let mut forged = template.clone();
        forged.term = g.node(1).term();
        forged.index = g.node(1).applied() + 50;
        forged.commit = 0;
        if g.node(1).is_leader() {
            refused(g.inject(2, 1, &forged));
        }
        g.run(1);
        let primary = g.at(1, |a, now| a.may_release_output(now, VM));
        let backup = g.at(2, |a, now| a.may_release_output(now, VM));
        both += usize::from(primary && backup);
    }
    assert_eq!(both, 0, "two copies released output at the same instant for {both} ms");
    assert!(g.events.contains(&(2, Event::Granted { vm: VM, generation: 2 })));
    assert!(!g.at(1, |a, now| a.may_release_output(now, VM)), "the isolated holder renewed alone");
}

#[test]
fn a_proposal_in_another_nodes_name_is_refused() {
    let mut g = group();
    let generation = g.node(1).record(VM).unwrap().generation;
    // Node 2 asks, in the holder's name, to make the witness the backup.
    let mut m = message(MessageType::MsgPropose, 2, 1, 0);
    let cmd = Command::SetBackup { vm: VM, generation, holder: 1, backup: 3 };
    m.set_entries(vec![entry(0, 0, &cmd)].into());
    let why = refused(g.inject(2, 1, &m));
    assert!(why.contains("node 2 proposes in node 1's name"), "{why}");
    still_works(&mut g);
    assert_eq!(g.node(3).record(VM).unwrap().backup, Some(2));
}

#[test]
fn membership_changes_are_refused() {
    let mut g = group();
    let cc = ConfChange { change_type: ConfChangeType::RemoveNode, node_id: 3, ..Default::default() };
    let e = Entry {
        entry_type: EntryType::EntryConfChange,
        data: cc.write_to_bytes().unwrap().into(),
        ..Default::default()
    };
    let mut m = message(MessageType::MsgPropose, 2, 1, 0);
    m.set_entries(vec![e].into());
    let why = refused(g.inject(2, 1, &m));
    assert!(why.contains("a EntryConfChange: membership never changes"), "{why}");
    // A snapshot that adds a voter.
    let state = g.node(1).state().encode();
    let snap = snapshot(&mut g, vec![1, 2, 3, 9], state);
    let why = refused(g.inject(1, 3, &snap));
    assert!(why.contains("snapshot membership [1, 2, 3, 9]"), "{why}");
    still_works(&mut g);
    for id in 1..=3 {
        assert_eq!(g.node(id).voters(), vec![1, 2, 3]);
    }
}

#[test]
fn a_snapshot_with_a_state_that_does_not_decode_is_refused() {
    let mut g = group();
    let snap = snapshot(&mut g, vec![1, 2, 3], vec![1, 0xff, 0xff, 0xff, 0xff]);
    let why = refused(g.inject(1, 3, &snap));
    assert!(why.contains("snapshot state: state snapshot: truncated"), "{why}");
    still_works(&mut g);
}

#[test]
fn only_the_leader_may_hand_leadership_over() {
    let mut g = group();
    let term = g.node(3).term();
    // Node 2 tells the witness to campaign at once (a forced campaign ignores leases).
    let why = refused(g.inject(2, 3, &message(MessageType::MsgTimeoutNow, 2, 3, term)));
    assert!(why.contains("only the leader of this node's term"), "{why}");
    g.run(100);
    assert_eq!((g.node(3).term(), g.node(3).leader()), (term, Some(1)), "the witness campaigned");
    still_works(&mut g);
}

#[test]
fn an_absurd_lease_is_refused_and_failover_still_works() {
    let mut g = group();
    // Renewals reach the witness claiming a lease of 584,542 years: honoured, it would refuse
    // to help grant the backup for as long.
    let mut tampered = 0;
    g.run_with(100, |from, to, m| {
        if (from, to) == (1, 3) && m.get_msg_type() == MessageType::MsgAppend {
            for e in m.mut_entries().iter_mut() {
                if let Ok(Command::Renew { vm, generation, claim: c }) = Command::decode(&e.data) {
                    let cmd = Command::Renew { vm, generation, claim: claim(c.node, Duration::from_micros(u64::MAX)) };
                    e.data = cmd.encode().into();
                    tampered += 1;
                }
            }
        }
        true
    });
    assert!(tampered > 0);
    assert!(g.refusals.iter().all(|r| r.contains("lease 18446744073709551615 us is out of range")), "{:?}", g.refusals);
    assert!(!g.refusals.is_empty());
    g.run(100);
    g.crash(1);
    let now = g.now;
    g.node(2).report_primary_dead(now, VM).unwrap();
    let ms = g.ms_to_backup_grant();
    assert!(ms < 200, "granted after {ms} ms");
}

#[test]
fn malformed_fields_terms_and_indices_are_refused() {
    let mut g = group();
    let hb = g.capture(1, 3, |m| m.get_msg_type() == MessageType::MsgHeartbeat);
    let term = hb.term;
    let generation = g.node(1).record(VM).unwrap().generation;
    let vote = message(MessageType::MsgRequestVote, 2, 3, term + 1);
    let cases: Vec<(Message, &str)> = vec![
        (
            {
                let mut m = hb.clone();
                m.term = u64::MAX;
                m
            },
            "term 18446744073709551615 is out of range",
        ),
        (
            {
                let mut m = hb.clone();
                m.context = b"junk".to_vec().into();
                m
            },
            "context 4 bytes",
        ),
        (
            {
                let mut m = vote.clone();
                m.priority = 100;
                m
            },
            "priority is set",
        ),
        (
            {
                let mut m = vote.clone();
                m.log_term = term + 5;
                m
            },
            "log_term",
        ),
        (message(MessageType::MsgTransferLeader, 2, 3, term), "the group never sends this message type"),
        (message(MessageType::MsgHup, 2, 3, term), "the group never sends this message type"),
        (
            {
                let mut m = message(MessageType::MsgAppendResponse, 2, 3, term);
                m.request_snapshot = 5;
                m
            },
            "request_snapshot",
        ),
        (
            {
                let mut m = hb.clone();
                m.set_entries(vec![Entry::default()].into());
                m
            },
            "entries is set",
        ),
        (
            {
                // Entries that skip an index.
                let mut m = hb.clone();
                m.set_msg_type(MessageType::MsgAppend);
                m.index = g.node(3).applied();
                m.log_term = term;
                let cmd = Command::Renew { vm: VM, generation, claim: claim(1, Duration::from_millis(30)) };
                m.set_entries(vec![entry(m.index + 1, term, &cmd), entry(m.index + 3, term, &cmd)].into());
                m
            },
            "entry 1: index",
        ),
        (
            {
                // A grant to a node outside the group.
                let mut m = hb.clone();
                m.set_msg_type(MessageType::MsgAppend);
                m.index = g.node(3).applied() + 100;
                m.log_term = term;
                m.commit = 0;
                let cmd =
                    Command::Grant { vm: VM, generation: generation + 1, claim: claim(9, Duration::from_millis(30)) };
                m.set_entries(vec![entry(m.index + 1, term, &cmd)].into());
                m
            },
            "names node 9, not a voter",
        ),
        (
            {
                let mut m = hb.clone();
                m.from = 3;
                m.to = 3;
                m
            },
            "a message from this node itself",
        ),
    ];
    for (m, expected) in cases {
        let from = m.from;
        let why = refused(g.inject(from, 3, &m));
        assert!(why.contains(expected), "{:?}: {why} (expected {expected:?})", m.get_msg_type());
    }
    assert!(g.node(3).term() < 1000, "term {}", g.node(3).term());
    still_works(&mut g);
}

#[test]
fn an_append_anchored_at_term_zero_is_refused() {
    // Found by the `arbiter_step` fuzz target: raft-rs reads the term of an index beyond its
    // log as 0, so an append "matching" term 0 there (or carrying entries of term 0) passes its
    // consistency check, and raft-rs then commits beyond its log and panics.
    let mut g = group();
    let hb = g.capture(1, 3, |m| m.get_msg_type() == MessageType::MsgHeartbeat);
    let mut m = hb.clone();
    m.set_msg_type(MessageType::MsgAppend);
    m.index = g.node(3).applied() + 5;
    m.log_term = 0;
    m.commit = m.index;
    let why = refused(g.inject(1, 3, &m));
    assert!(why.contains("log_term 0"), "{why}");
    let mut m = hb;
    m.set_msg_type(MessageType::MsgAppend);
    m.index = g.node(3).applied() + 5;
    m.log_term = 0;
    m.commit = m.index + 1;
    m.set_entries(vec![Entry { index: m.index + 1, term: 0, ..Default::default() }].into());
    let why = refused(g.inject(1, 3, &m));
    assert!(why.contains("log_term 0"), "{why}");
    still_works(&mut g);
}
