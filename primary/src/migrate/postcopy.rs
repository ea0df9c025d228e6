//! Post-copy at the source (`docs/migration.md`, "Post-copy and hybrid").
//!
//! After a post-copy switch-over the guest stays paused here for good and its memory is the
//! source of every page the destination does not hold. The destination's faults arrive as
//! page requests and are answered at once, on the control stream (which overtakes the bulk
//! streams); every other page is pushed in the background on the bulk streams, each at most
//! once, nearest the last fault first (the push cursor jumps behind each demanded page, so a
//! guest walking memory finds the next pages already there). `demand` pushes nothing until the
//! destination has asked for nothing for [`DEMAND_IDLE`]: pure demand paging, with a drain at
//! the end so the source can exit. Post-copy is over when the destination says every page is
//! there (`Complete`).

use std::time::{Duration, Instant};

use replication_proto::migration::PfnRange;
use replication_proto::{MemoryLayout, Sender, SenderEvent};
use transport::session::StreamCommand;
use vmm::memory::{PAGE_SIZE, copy_pages};

use super::{Link, MigrateError, Source, lock};

/// Pages per push batch (one frame). Small frames keep the work each one costs in the
/// sessions' tasks short, so an answer waits less behind them: on W2 here, 16-page frames gave a
/// fault p50 of ~350 µs against ~850 µs with 64, for ~10% more total time.
const PUSH_PAGES: usize = 16;

/// Push frames the sender may hold before the driver waits for `PushRoom` (the sender's
/// `push_low_water`): enough to keep the bulk streams busy, little enough that a push never
/// sits long in memory.
pub(super) const PUSH_LOW_WATER: usize = 4;

/// The push waits at most this long for the destination's `Resumed`.
const RESUME_WAIT: Duration = Duration::from_millis(100);

/// `demand`: the source starts pushing what is left once the destination asked for nothing
/// for this long (a source that waits for the guest to touch every page might wait forever).
pub const DEMAND_IDLE: Duration = Duration::from_secs(1);

/// The layout's pages numbered 0.. in address order.
#[derive(Debug, Clone)]
pub(super) struct Index {
    /// (first pfn, pages, index of the first).
    runs: Vec<(u64, u64, usize)>,
    total: usize,
}

impl Index {
    pub(super) fn new(layout: &MemoryLayout) -> Self {
        let ps = u64::from(layout.page_size);
        let mut runs = Vec::new();
        let mut total = 0usize;
        for r in &layout.ranges {
            let n = r.len / ps;
            runs.push((r.start / ps, n, total));
            total += n as usize;
        }
        Self { runs, total }
    }

    pub(super) fn len(&self) -> usize {
        self.total
    }

    pub(super) fn of(&self, pfn: u64) -> Option<usize> {
        self.runs
            .iter()
            .find(|&&(first, n, _)| pfn >= first && pfn < first + n)
            .map(|&(first, _, base)| base + (pfn - first) as usize)
    }

    pub(super) fn pfn(&self, i: usize) -> u64 {
        let &(first, _, base) =
            self.runs.iter().rev().find(|&&(_, _, base)| base <= i).expect("an index within the layout");
        first + (i - base) as u64
    }
}

/// The pages whose current content the destination holds: sent (or known zero, which its fresh
/// memory is) and not dirtied since. What is not held moves in post-copy.
#[derive(Debug, Clone)]
pub(super) struct Held {
    index: Index,
    bits: Vec<bool>,
}

impl Held {
    pub(super) fn new(layout: &MemoryLayout) -> Self {
        let index = Index::new(layout);
        let bits = vec![false; index.len()];
        Self { index, bits }
    }

    pub(super) fn set(&mut self, pfns: impl IntoIterator<Item = u64>, held: bool) {
        for pfn in pfns {
            if let Some(i) = self.index.of(pfn) {
                self.bits[i] = held;
            }
        }
    }

    /// Pages held.
    pub(super) fn count(&self) -> u64 {
        self.bits.iter().filter(|&&b| b).count() as u64
    }

    /// Pages not held.
    pub(super) fn missing(&self) -> u64 {
        self.bits.len() as u64 - self.count()
    }

    /// The held pages as ascending runs (the switch-over's map).
    pub(super) fn runs(&self) -> Vec<PfnRange> {
        let mut out: Vec<PfnRange> = Vec::new();
        for (i, &b) in self.bits.iter().enumerate() {
            if !b {
                continue;
            }
            let pfn = self.index.pfn(i);
            match out.last_mut() {
                Some(r) if r.first + u64::from(r.count) == pfn && r.count < u32::MAX => r.count += 1,
                _ => out.push(PfnRange { first: pfn, count: 1 }),
            }
        }
        out
    }
}

/// The pages still to push, and where the push goes next.
struct Pusher {
    index: Index,
    todo: Vec<bool>,
    left: usize,
    cursor: usize,
}

impl Pusher {
    fn new(held: &Held) -> Self {
        let todo: Vec<bool> = held.bits.iter().map(|&b| !b).collect();
        let left = todo.iter().filter(|&&t| t).count();
        Self { index: held.index.clone(), todo, left, cursor: 0 }
    }

    /// Up to `max` pages still to push, ascending, from the cursor (wrapping once at the end).
    fn next_batch(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max);
        let n = self.todo.len();
        if self.left == 0 || n == 0 {
            return out;
        }
        let mut i = self.cursor.min(n);
        let mut wrapped = false;
        while out.len() < max && self.left > 0 {
            if i >= n {
                if wrapped || !out.is_empty() {
                    break;
                }
                wrapped = true;
                i = 0;
            }
            if self.todo[i] {
                self.todo[i] = false;
                self.left -= 1;
                out.push(self.index.pfn(i));
            }
            i += 1;
        }
        self.cursor = i;
        out
    }

    /// The destination holds these runs (its map after a reconnect): not pushed again.
    fn present(&mut self, runs: &[(u64, u32)]) {
        for &(first, count) in runs {
            for pfn in first..first + u64::from(count) {
                if let Some(i) = self.index.of(pfn)
                    && self.todo[i]
                {
                    self.todo[i] = false;
                    self.left -= 1;
                }
            }
        }
    }

    /// The destination asked for `pfns`: they go now, and the push follows behind the last.
    fn demanded(&mut self, pfns: &[u64]) {
        for &pfn in pfns {
            if let Some(i) = self.index.of(pfn)
                && self.todo[i]
            {
                self.todo[i] = false;
                self.left -= 1;
            }
        }
        if let Some(i) = pfns.last().and_then(|&p| self.index.of(p)) {
            self.cursor = i + 1;
        }
    }
}

/// What post-copy did, from the source's side.
#[derive(Debug, Clone, Default)]
pub(super) struct Served {
    /// Requests answered.
    pub requests: u64,
    /// Pages sent in answers.
    pub pages_served: u64,
    /// Pages pushed.
    pub pages_pushed: u64,
    /// When the destination said it resumed.
    pub resumed_at: Option<Instant>,
    /// The destination's numbers (`Complete`).
    pub complete: Option<replication_proto::migration::Complete>,
    /// Times the link broke and came back.
    pub reconnects: u32,
}

/// The source session's tap: once post-copy started (`serve_from` set), answers each page
/// request in the session's own task, from the paused guest's memory, and passes the event on
/// for the push's bookkeeping. Before, it passes everything on untouched.
pub(super) fn answer_tap(
    serve_from: &std::sync::Arc<std::sync::OnceLock<vmm::memory::GuestMemory>>,
) -> transport::session::Tap<Sender> {
    let serve_from = std::sync::Arc::clone(serve_from);
    let mut buf = Vec::new();
    Box::new(move |s: &mut Sender, ev: SenderEvent| {
        if let (SenderEvent::PagesRequested { id, pfns }, Some(mem)) = (&ev, serve_from.get()) {
            buf.clear();
            let r = copy_pages(mem, pfns.iter().copied(), &mut buf).map_err(|e| e.to_string()).and_then(|()| {
                s.send_pages(*id, pfns.iter().copied().zip(buf.chunks(PAGE_SIZE))).map_err(|e| e.to_string())
            });
            if let Err(e) = r {
                tracing::error!("post-copy: answer request {id}: {e}");
            }
        }
        Some(ev)
    })
}

/// Copies `pfns` out of the paused guest.
fn read_pages(src: &Source, pfns: &[u64], buf: &mut Vec<u8>) -> Result<(), MigrateError> {
    buf.clear();
    let vm = lock(&src.vm);
    copy_pages(vm.memory(), pfns.iter().copied(), buf)?;
    Ok(())
}

/// Serves the destination until it holds every page. The guest is paused here and never resumes.
pub(super) async fn serve(
    src: &Source,
    link: &mut Link,
    held: &Held,
    demand_only: bool,
    recover: Duration,
    reverse: Option<&super::reverse::Reverse>,
) -> Result<Served, MigrateError> {
    let mut push = Pusher::new(held);
    // After a reconnect: no push until the destination's map of what it holds is in.
    let mut map_until: Option<Instant> = None;
    let mut served = Served::default();
    let mut last_request = Instant::now();
    let mut pushing = !demand_only;
    // Push frames the sender holds, as far as this loop knows (it only grows here; the sender
    // says the real count when it falls to the low water).
    let mut queued = 0usize;
    let mut buf = Vec::new();
    // No push before the destination runs the guest: its restore and resume (the downtime)
    // get the CPU and the link; a guest that faults meanwhile is answered anyway.
    let switched_at = Instant::now();
    let total = push.left as u64;
    src.control.update(|s| s.postcopy_pages_left = Some(total));
    tracing::info!(pages = total, held = held.count(), demand_only, "post-copy: serving the destination");
    loop {
        let mapped = map_until.is_none_or(|t| Instant::now() >= t);
        let resumed = served.resumed_at.is_some() || switched_at.elapsed() >= RESUME_WAIT;
        let can_push = pushing && resumed && queued <= PUSH_LOW_WATER && mapped && push.left > 0;
        let mut broken: Option<String> = None;
        let idle_at = last_request + DEMAND_IDLE;
        tokio::select! {
            biased;
            ev = link.session.next_event() => match ev {
                None => broken = Some("the session task ended".into()),
                Some(SenderEvent::PageMap(m)) => {
                    let runs: Vec<(u64, u32)> = m.held.iter().map(|r| (r.first, r.count)).collect();
                    push.present(&runs);
                    if m.ends_held_map() {
                        map_until = None;
                    }
                }
                // Answered already, in the session's task (`answer_tap`): the push follows behind.
                Some(SenderEvent::PagesRequested { pfns, .. }) => {
                    last_request = Instant::now();
                    push.demanded(&pfns);
                    served.requests += 1;
                    served.pages_served += pfns.len() as u64;
                }
                Some(SenderEvent::PushRoom { queued: q }) => queued = q,
                Some(SenderEvent::Resumed(r)) => {
                    served.resumed_at.get_or_insert_with(Instant::now);
                    link.resumed = Some(r);
                    tracing::info!(epoch = r.epoch, "post-copy: the guest runs at the destination");
                }
                Some(SenderEvent::Complete(c)) => {
                    tracing::info!(pages = c.pages, faults = c.faults, "post-copy: every page is at the destination");
                    served.complete = Some(c);
                    return Ok(served);
                }
                Some(SenderEvent::Acked { epoch, .. }) => link.acked = link.acked.max(epoch),
                Some(SenderEvent::Disconnected { error }) => broken = Some(link.explain(&error)),
                Some(_) => {}
            },
            end = &mut link.line, if link.line_open => {
                link.line_open = false;
                if let transport::liveness::End::Died(why) = end {
                    return Err(MigrateError::DestinationDied(why.to_string()));
                }
            }
            () = std::future::ready(()), if can_push => {
                let batch = push.next_batch(PUSH_PAGES);
                read_pages(src, &batch, &mut buf)?;
                let data = std::mem::take(&mut buf);
                let n = batch.len() as u64;
                let cmd = StreamCommand::with(move |s: &mut Sender, _| {
                    if let Err(e) = s.push_pages(batch.iter().copied().zip(data.chunks(PAGE_SIZE))) {
                        tracing::error!("post-copy: push: {e}");
                    }
                });
                if link.session.command(cmd).await.is_err() {
                    broken = Some("the session task ended".into());
                }
                queued += 1;
                served.pages_pushed += n;
                let left = push.left as u64;
                src.control.update(|s| {
                    s.postcopy_pages_left = Some(left);
                    s.pages_sent += n;
                });
            }
            () = tokio::time::sleep_until(idle_at.into()), if demand_only && !pushing => {
                tracing::info!(left = push.left, "demand: no request for {DEMAND_IDLE:?}; pushing what is left");
                pushing = true;
            }
            () = tokio::time::sleep(Duration::from_millis(if map_until.is_some() { 10 } else { 100 })) => {}
        }
        if let Some(r) = reverse {
            let (commits, up) = (r.counts().commits, r.up());
            src.control.update(|s| {
                s.reverse_commits = Some(commits);
                s.reverse_up = Some(up);
            });
        }
        if let Some(why) = broken {
            // Both processes may well live: the destination's vCPUs wait on their faults while
            // the link comes back. Its map then says what it holds; what it asked for and did
            // not get it asks again.
            if let Some(r) = reverse
                && !r.up()
            {
                // Neither session hears the destination: it is gone (or cut off, and then it
                // learns it was superseded when it reaches this host again).
                return Err(MigrateError::Session(format!(
                    "{why}; and no reverse session has been up for {} ms",
                    r.down_for().as_millis()
                )));
            }
            tracing::warn!("post-copy: the link to the destination broke ({why}); reconnecting");
            src.control.update(|s| s.postcopy_reconnects += 1);
            match reverse {
                None => link.reconnect(Instant::now() + recover).await?,
                Some(r) => tokio::select! {
                    res = link.reconnect(Instant::now() + recover) => res?,
                    () = r.down() => {
                        return Err(MigrateError::Session(format!("{why}; then the reverse session went down too")));
                    }
                },
            }
            served.reconnects += 1;
            push = Pusher::new(held);
            queued = 0;
            map_until = Some(Instant::now() + Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::MemoryLayout;

    fn layout() -> MemoryLayout {
        use replication_proto::GuestRange;
        MemoryLayout {
            page_size: 4096,
            ranges: vec![GuestRange { start: 0, len: 8 * 4096 }, GuestRange { start: 1 << 32, len: 4 * 4096 }],
        }
    }

    #[test]
    fn index_maps_both_ways_across_ranges() {
        let ix = Index::new(&layout());
        assert_eq!(ix.len(), 12);
        assert_eq!(ix.of(0), Some(0));
        assert_eq!(ix.of(7), Some(7));
        assert_eq!(ix.of(8), None);
        assert_eq!(ix.of((1 << 32) / 4096 + 3), Some(11));
        for i in 0..12 {
            assert_eq!(ix.of(ix.pfn(i)), Some(i));
        }
    }

    #[test]
    fn held_runs_and_counts() {
        let mut h = Held::new(&layout());
        h.set([1, 2, 3, 6], true);
        h.set([(1 << 32) / 4096, (1 << 32) / 4096 + 1], true);
        h.set([2], false);
        let hi = (1u64 << 32) / 4096;
        assert_eq!(
            h.runs(),
            vec![
                PfnRange { first: 1, count: 1 },
                PfnRange { first: 3, count: 1 },
                PfnRange { first: 6, count: 1 },
                PfnRange { first: hi, count: 2 }
            ]
        );
        assert_eq!((h.count(), h.missing()), (5, 7));
    }

    /// Every page not held is pushed exactly once; a demand moves the push behind it and takes
    /// the demanded pages off the list.
    #[test]
    fn the_push_follows_faults_and_sends_each_page_once() {
        let mut h = Held::new(&layout());
        h.set([0, 1], true);
        let mut p = Pusher::new(&h);
        assert_eq!(p.next_batch(2), vec![2, 3]);
        p.demanded(&[6]);
        assert_eq!(p.next_batch(3), vec![7, (1 << 32) / 4096, (1 << 32) / 4096 + 1]);
        // The end reached, the batch stops; the next one wraps to what was skipped.
        let rest = [p.next_batch(10), p.next_batch(10)].concat();
        let hi = (1u64 << 32) / 4096;
        assert_eq!(rest, vec![hi + 2, hi + 3, 4, 5]);
        assert_eq!(p.left, 0);
        assert!(p.next_batch(10).is_empty());
    }
}
