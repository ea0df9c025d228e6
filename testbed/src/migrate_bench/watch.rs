//! The `dirty` workload's check, on the guest's serial output during a migration, that the guest
//! went on at the destination with its memory intact (the output is read with
//! [`crate::harness::wait::FileLines`]).

use crate::lines::parse_dirty_progress;

/// What the destination's output says so far.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough output yet.
    Pending,
    /// The guest went on: how we know.
    Continued(String),
    /// The guest did not go on correctly: what is wrong.
    Broken(String),
}

/// Checks a `dirty` guest across a migration: the destination's progress lines must go on from
/// where the source's stopped (the written-page count never goes back) and, over one whole
/// generation of the working set written at the destination (so every page was checked
/// against what the source wrote), report no error.
#[derive(Debug)]
pub struct DirtyWatch {
    npages: u64,
    last_source: Option<(u64, u64)>,
    first_dest: Option<u64>,
    dest_lines: usize,
}

impl DirtyWatch {
    /// For a working set of `wss_mib` MiB.
    pub fn new(wss_mib: u64) -> Self {
        DirtyWatch { npages: wss_mib * 256, last_source: None, first_dest: None, dest_lines: 0 }
    }

    /// A line the source printed; returns an error on a guest failure or a dirty error.
    pub fn source_line(&mut self, line: &str) -> Result<(), String> {
        fatal(line)?;
        if let Some((_, pages, errors)) = parse_dirty_progress(line) {
            if errors > 0 {
                return Err(format!("the source guest reports {errors} errors: {line}"));
            }
            self.last_source = Some((pages, errors));
        }
        Ok(())
    }

    /// The source printed at least one progress line (its working set is being rewritten).
    pub fn source_running(&self) -> bool {
        self.last_source.is_some()
    }

    /// A line the destination printed.
    pub fn dest_line(&mut self, line: &str) -> Verdict {
        if let Err(e) = fatal(line) {
            return Verdict::Broken(format!("at the destination: {e}"));
        }
        let Some((_, pages, errors)) = parse_dirty_progress(line) else { return Verdict::Pending };
        self.dest_lines += 1;
        if errors > 0 {
            return Verdict::Broken(format!("the destination guest reports {errors} errors: {line}"));
        }
        if let Some((src, _)) = self.last_source
            && pages < src
        {
            return Verdict::Broken(format!("the destination's page count {pages} is behind the source's {src}"));
        }
        let first = *self.first_dest.get_or_insert(pages);
        if pages >= first + self.npages {
            return Verdict::Continued(format!(
                "{} progress lines at the destination, {} pages rewritten and checked there, 0 errors",
                self.dest_lines,
                pages - first
            ));
        }
        Verdict::Pending
    }
}

fn fatal(line: &str) -> Result<(), String> {
    if line.starts_with("guest panic") || line.starts_with("guest exception") || line.starts_with("dirty error") {
        Err(line.to_string())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_guest_must_go_on_for_a_whole_generation_without_errors() {
        let mut w = DirtyWatch::new(64);
        assert!(!w.source_running());
        w.source_line("ready").unwrap();
        w.source_line("dirty gen=1 pages=20000 errors=0").unwrap();
        w.source_line("dirty gen=2 pages=40000 errors=0").unwrap();
        assert!(w.source_running());
        assert_eq!(w.dest_line("something else"), Verdict::Pending);
        assert_eq!(w.dest_line("dirty gen=3 pages=60000 errors=0"), Verdict::Pending);
        // 64 MiB = 16384 pages: 60000 + 16384 are needed.
        assert_eq!(w.dest_line("dirty gen=4 pages=76000 errors=0"), Verdict::Pending);
        let Verdict::Continued(how) = w.dest_line("dirty gen=5 pages=80000 errors=0") else { panic!("continued") };
        assert!(how.contains("3 progress lines") && how.contains("20000 pages"), "{how}");

        let mut w = DirtyWatch::new(64);
        w.source_line("dirty gen=2 pages=40000 errors=0").unwrap();
        assert!(matches!(w.dest_line("dirty gen=1 pages=20000 errors=0"), Verdict::Broken(e) if e.contains("behind")));
        let mut w = DirtyWatch::new(64);
        assert!(matches!(w.dest_line("dirty error page=5"), Verdict::Broken(e) if e.contains("page=5")));
        assert!(
            matches!(w.dest_line("dirty gen=3 pages=60000 errors=2"), Verdict::Broken(e) if e.contains("2 errors"))
        );
        assert!(w.source_line("guest panic: x at y:1").is_err());
        assert!(w.source_line("dirty gen=3 pages=60000 errors=1").is_err());
    }
}
