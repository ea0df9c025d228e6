//! The raft journal: hard state, log entries, snapshot and incarnation, persisted as checksummed
//! records in one append-only file (or an in-memory disk for simulations).
//!
//! Record: `len: u32 | crc32: u32 | kind: u8 | payload`, little endian, `len` and `crc32` covering
//! `kind | payload`. Kinds: an entry (raft protobuf `Entry`; an entry at index `i` replaces any
//! entries from `i` on, as raft's append does), the hard state (protobuf `HardState`), a snapshot
//! (protobuf `Snapshot`, which also carries the conf state) and the incarnation (`u64`).
//!
//! Appends are buffered until [`Journal::sync`], which writes them and calls `fdatasync` when
//! asked to; the arbiter syncs before it releases any message that depends on what it wrote.
//! Compaction rewrites the whole journal (snapshot, hard state, remaining entries, incarnation)
//! into a temporary file, syncs it, renames it over the journal and syncs the directory.
//!
//! On recovery a torn last record (a crash mid-write: it was never synced, so never acknowledged)
//! is cut off; a bad record followed by more data is corruption and fails the open, since
//! silently losing acknowledged raft state could let this node vote twice.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("journal {path}: record at byte {offset} corrupt: {reason}")]
    Corrupt { path: String, offset: u64, reason: String },
}

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_INCARNATION: u8 = 4;
const HEADER: usize = 8;
/// Larger records are taken as garbage (a state machine of 1,000 VMs is ~32 KiB).
const MAX_RECORD: usize = 64 << 20;
const FILE_NAME: &str = "raft.journal";

/// Where the journal's bytes live.
pub trait Backend: Send {
    /// A name for messages (the file path).
    fn describe(&self) -> String;
    /// The whole content.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Appends bytes (not yet durable).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes every append so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the content to `len` bytes, durably.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Atomically and durably replaces the whole content.
    fn replace(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// A journal file in a directory.
#[derive(Debug)]
pub struct DirBackend {
    dir: PathBuf,
    path: PathBuf,
    file: File,
}

impl DirBackend {
    /// Opens (creating if needed) the journal file in `dir`, creating `dir` too.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        Ok(Self { dir: dir.to_path_buf(), path, file })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        File::open(&self.path)?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        self.sync_dir()?;
        self.file = OpenOptions::new().read(true).append(true).open(&self.path)?;
        Ok(())
    }
}

/// An in-memory disk for simulations: it survives the arbiter that uses it, and
/// [`MemDisk::crash`] loses whatever was appended but not synced, like a power cut.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(Arc<Mutex<MemDiskInner>>);

#[derive(Debug, Default)]
struct MemDiskInner {
    bytes: Vec<u8>,
    synced: usize,
    syncs: u64,
}

impl MemDisk {
    /// A new empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the bytes that were not synced; `torn` of them survive, as if a crash cut a write.
    pub fn crash(&self, torn: usize) {
        let mut d = self.0.lock().expect("mem disk lock");
        let keep = (d.synced + torn).min(d.bytes.len());
        d.bytes.truncate(keep);
        d.synced = keep;
    }

    /// Flips one bit of the content at `offset` (to test corruption handling).
    pub fn corrupt(&self, offset: usize) {
        let mut d = self.0.lock().expect("mem disk lock");
        if let Some(b) = d.bytes.get_mut(offset) {
            *b ^= 0x10;
        }
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> usize {
        self.0.lock().expect("mem disk lock").bytes.len()
    }

    /// Whether nothing was ever written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many syncs were made.
    pub fn syncs(&self) -> u64 {
        self.0.lock().expect("mem disk lock").syncs
    }

    /// An independent copy of this disk as it is now (its unsynced bytes included).
    pub fn fork(&self) -> MemDisk {
        let d = self.0.lock().expect("mem disk lock");
        MemDisk(Arc::new(Mutex::new(MemDiskInner { bytes: d.bytes.clone(), synced: d.synced, syncs: d.syncs })))
    }

    /// A backend writing to this disk.
    pub fn backend(&self) -> MemBackend {
        MemBackend(self.clone())
    }
}

/// The [`Backend`] of a [`MemDisk`].
#[derive(Debug)]
pub struct MemBackend(MemDisk);

impl Backend for MemBackend {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        Ok(self.0.0.lock().expect("mem disk lock").bytes.clone())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.0.lock().expect("mem disk lock").bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut d = self.0.0.lock().expect("mem disk lock");
        d.synced = d.bytes.len();
        d.syncs += 1;
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut d = self.0.0.lock().expect("mem disk lock");
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(d.bytes.len());
        d.bytes.truncate(len);
        d.synced = len;
        Ok(())
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut d = self.0.0.lock().expect("mem disk lock");
        d.bytes = bytes.to_vec();
        d.synced = d.bytes.len();
        d.syncs += 1;
        Ok(())
    }
}

/// What a journal held when it was opened.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The latest snapshot; `None` for a journal never bootstrapped.
    pub snapshot: Option<Snapshot>,
    /// The entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// The incarnation of this open: one more than the previous open's.
    pub incarnation: u64,
}

/// The raft journal. See the module documentation.
pub struct Journal {
    backend: Box<dyn Backend>,
    buf: Vec<u8>,
    incarnation: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("backend", &self.backend.describe()).finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens the journal in directory `dir` (created if missing) and recovers its content.
    pub fn open_dir(dir: &Path) -> Result<(Self, Recovered), JournalError> {
        let backend = DirBackend::open(dir).map_err(|source| JournalError::Io {
            path: dir.join(FILE_NAME).display().to_string(),
            op: "open",
            source,
        })?;
        Self::open(Box::new(backend))
    }

    /// Opens a journal on an in-memory disk.
    pub fn open_mem(disk: &MemDisk) -> Result<(Self, Recovered), JournalError> {
        Self::open(Box::new(disk.backend()))
    }

    /// Opens a journal on any backend: replays it, cuts a torn tail, and persists a new
    /// incarnation number.
    pub fn open(mut backend: Box<dyn Backend>) -> Result<(Self, Recovered), JournalError> {
        let path = backend.describe();
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| JournalError::Io { path, op, source }
        };
        let bytes = backend.read_all().map_err(io("read"))?;
        let (mut recovered, valid) = replay(&bytes, &path)?;
        if valid < bytes.len() {
            tracing::warn!(journal = %path, at = valid, dropped = bytes.len() - valid, "cutting a torn journal tail");
            backend.truncate(valid as u64).map_err(io("truncate"))?;
        }
        recovered.incarnation += 1;
        let mut journal = Self { backend, buf: Vec::new(), incarnation: recovered.incarnation };
        journal.push(KIND_INCARNATION, &recovered.incarnation.to_le_bytes());
        journal.sync(true)?;
        tracing::info!(
            journal = %path,
            incarnation = recovered.incarnation,
            term = recovered.hard_state.term,
            vote = recovered.hard_state.vote,
            commit = recovered.hard_state.commit,
            snapshot = recovered.snapshot.as_ref().map_or(0, |s| s.get_metadata().index),
            entries = recovered.entries.len(),
            "journal recovered"
        );
        Ok((journal, recovered))
    }

    /// This open's incarnation number.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Buffers entries (they replace any entries from the first one's index on).
    pub fn append_entries(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        for e in entries {
            let payload = e.write_to_bytes().map_err(|e| self.encode_error(e))?;
            self.push(KIND_ENTRY, &payload);
        }
        Ok(())
    }

    /// Buffers the hard state.
    pub fn save_hard_state(&mut self, hs: &HardState) -> Result<(), JournalError> {
        let payload = hs.write_to_bytes().map_err(|e| self.encode_error(e))?;
        self.push(KIND_HARD_STATE, &payload);
        Ok(())
    }

    /// Writes what was buffered; with `durable`, also waits until it is on disk.
    pub fn sync(&mut self, durable: bool) -> Result<(), JournalError> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            self.backend.append(&buf).map_err(|source| self.io_error("append", source))?;
        }
        if durable {
            self.backend.sync().map_err(|source| self.io_error("sync", source))?;
        }
        Ok(())
    }

    /// Durably replaces the journal by `snapshot`, `hard_state` and the `entries` after it.
    pub fn rewrite(
        &mut self,
        snapshot: &Snapshot,
        hard_state: &HardState,
        entries: &[Entry],
    ) -> Result<(), JournalError> {
        self.buf.clear();
        self.push(KIND_INCARNATION, &self.incarnation.to_le_bytes());
        let snap = snapshot.write_to_bytes().map_err(|e| self.encode_error(e))?;
        self.push(KIND_SNAPSHOT, &snap);
        self.save_hard_state(hard_state)?;
        self.append_entries(entries)?;
        let buf = std::mem::take(&mut self.buf);
        self.backend.replace(&buf).map_err(|source| self.io_error("rewrite", source))
    }

    fn push(&mut self, kind: u8, payload: &[u8]) {
        let len = (payload.len() + 1) as u32;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(payload);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        self.buf.push(kind);
        self.buf.extend_from_slice(payload);
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> JournalError {
        JournalError::Io { path: self.backend.describe(), op, source }
    }

    fn encode_error(&self, e: protobuf::ProtobufError) -> JournalError {
        JournalError::Io { path: self.backend.describe(), op: "encode", source: io::Error::other(e.to_string()) }
    }
}

/// Replays records; returns what they hold and the length of the valid prefix.
fn replay(bytes: &[u8], path: &str) -> Result<(Recovered, usize), JournalError> {
    let mut rec = Recovered::default();
    let mut at = 0usize;
    let corrupt =
        |offset: usize, reason: String| JournalError::Corrupt { path: path.to_string(), offset: offset as u64, reason };
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER {
            return Ok((rec, at)); // torn header
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let end = HEADER + len;
        if len == 0 || len > MAX_RECORD {
            if rest.iter().all(|&b| b == 0) {
                return Ok((rec, at)); // a zero-filled tail left by a crash
            }
            return Err(corrupt(at, format!("length {len}")));
        }
        if end > rest.len() {
            return Ok((rec, at)); // torn body
        }
        let body = &rest[HEADER..end];
        if crc32fast::hash(body) != crc {
            if end == rest.len() {
                return Ok((rec, at)); // a torn last record
            }
            return Err(corrupt(at, "crc mismatch".into()));
        }
        let (kind, payload) = (body[0], &body[1..]);
        match kind {
            KIND_ENTRY => {
                let e = Entry::parse_from_bytes(payload).map_err(|e| corrupt(at, format!("entry: {e}")))?;
                push_entry(&mut rec, e).map_err(|reason| corrupt(at, reason))?;
            }
            KIND_HARD_STATE => {
                rec.hard_state =
                    HardState::parse_from_bytes(payload).map_err(|e| corrupt(at, format!("hard state: {e}")))?;
            }
            KIND_SNAPSHOT => {
                let s = Snapshot::parse_from_bytes(payload).map_err(|e| corrupt(at, format!("snapshot: {e}")))?;
                let index = s.get_metadata().index;
                rec.entries.retain(|e| e.index > index);
                if rec.entries.first().is_some_and(|e| e.index != index + 1) {
                    rec.entries.clear();
                }
                rec.snapshot = Some(s);
            }
            KIND_INCARNATION => {
                let word: [u8; 8] = payload.try_into().map_err(|_| corrupt(at, "incarnation length".into()))?;
                rec.incarnation = rec.incarnation.max(u64::from_le_bytes(word));
            }
            other => return Err(corrupt(at, format!("unknown kind {other}"))),
        }
        at += end;
    }
    Ok((rec, at))
}

fn push_entry(rec: &mut Recovered, e: Entry) -> Result<(), String> {
    let first = rec.snapshot.as_ref().map_or(1, |s| s.get_metadata().index + 1);
    if e.index < first {
        return Ok(()); // compacted
    }
    if let Some(front) = rec.entries.first().map(|f| f.index) {
        if e.index <= front {
            rec.entries.clear();
        } else {
            rec.entries.truncate((e.index - front) as usize);
        }
    }
    let expected = rec.entries.last().map_or(first, |l| l.index + 1);
    if rec.entries.is_empty() && e.index != first {
        return Err(format!("entry {} after snapshot {}", e.index, first - 1));
    }
    if e.index != expected {
        return Err(format!("entry {} where {expected} was expected", e.index));
    }
    rec.entries.push(e);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 5].into(), ..Default::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    fn snapshot(index: u64, term: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.data = vec![9, 9].into();
        s
    }

    #[test]
    fn entries_hard_state_and_incarnation_survive_reopen() {
        let disk = MemDisk::new();
        let (mut j, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.incarnation, 1);
        assert!(rec.snapshot.is_none());
        j.rewrite(&snapshot(1, 1), &hs(1, 0, 1), &[]).unwrap();
        j.append_entries(&[entry(2, 1), entry(3, 1), entry(4, 1)]).unwrap();
        j.save_hard_state(&hs(2, 3, 3)).unwrap();
        j.sync(true).unwrap();
        // A conflicting append replaces the suffix.
        j.append_entries(&[entry(3, 2)]).unwrap();
        j.sync(true).unwrap();
        drop(j);
        let (j, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.incarnation, 2);
        assert_eq!(j.incarnation(), 2);
        assert_eq!(rec.hard_state, hs(2, 3, 3));
        assert_eq!(rec.snapshot.unwrap().get_metadata().index, 1);
        let got: Vec<(u64, u64)> = rec.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(2, 1), (3, 2)]);
        let (_, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.incarnation, 3);
    }

    #[test]
    fn unsynced_writes_are_lost_and_a_torn_tail_is_cut() {
        let disk = MemDisk::new();
        let (mut j, _) = Journal::open_mem(&disk).unwrap();
        j.rewrite(&snapshot(1, 1), &hs(1, 0, 1), &[entry(2, 1)]).unwrap();
        j.append_entries(&[entry(3, 1)]).unwrap();
        j.sync(false).unwrap(); // written, not synced
        disk.crash(5); // five bytes of the record made it
        let (_, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.entries.len(), 1);
        // The torn tail was cut, so later appends land after valid records.
        let (mut j, _) = Journal::open_mem(&disk).unwrap();
        j.append_entries(&[entry(3, 4)]).unwrap();
        j.sync(true).unwrap();
        let (_, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.entries.last().map(|e| e.term), Some(4));
    }

    #[test]
    fn corruption_in_the_middle_fails_the_open() {
        let disk = MemDisk::new();
        let (mut j, _) = Journal::open_mem(&disk).unwrap();
        j.rewrite(&snapshot(1, 1), &hs(1, 0, 1), &[entry(2, 1), entry(3, 1)]).unwrap();
        disk.corrupt(HEADER + 3);
        let err = Journal::open_mem(&disk).unwrap_err();
        assert!(err.to_string().contains("record at byte 0 corrupt: crc mismatch"), "{err}");
    }

    #[test]
    fn rewrite_compacts_and_keeps_the_incarnation() {
        let disk = MemDisk::new();
        let (mut j, _) = Journal::open_mem(&disk).unwrap();
        j.rewrite(&snapshot(1, 1), &hs(1, 0, 1), &[]).unwrap();
        j.append_entries(&(2..100).map(|i| entry(i, 1)).collect::<Vec<_>>()).unwrap();
        j.sync(true).unwrap();
        let before = disk.len();
        j.rewrite(&snapshot(90, 1), &hs(1, 0, 95), &(91..100).map(|i| entry(i, 1)).collect::<Vec<_>>()).unwrap();
        assert!(disk.len() < before);
        let (_, rec) = Journal::open_mem(&disk).unwrap();
        assert_eq!(rec.incarnation, 2);
        assert_eq!(rec.snapshot.unwrap().get_metadata().index, 90);
        assert_eq!(rec.entries.first().map(|e| e.index), Some(91));
        assert_eq!(rec.entries.len(), 9);
    }

    #[test]
    fn directory_journal_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, rec) = Journal::open_dir(&dir.path().join("w")).unwrap();
        assert_eq!(rec.incarnation, 1);
        j.rewrite(&snapshot(1, 1), &hs(1, 0, 1), &[entry(2, 1)]).unwrap();
        j.save_hard_state(&hs(3, 2, 2)).unwrap();
        j.sync(true).unwrap();
        drop(j);
        let (_, rec) = Journal::open_dir(&dir.path().join("w")).unwrap();
        assert_eq!(rec.incarnation, 2);
        assert_eq!(rec.hard_state, hs(3, 2, 2));
        assert_eq!(rec.entries.len(), 1);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..200 {
            let len = round * 3;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = replay(&bytes, "test");
        }
    }
}
