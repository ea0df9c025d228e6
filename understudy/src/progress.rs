//! Progress of a long operation on stderr (`migrate`, `protect --wait`): on a terminal one line
//! that updates in place, otherwise a line each time the caller's key changes.

use std::io::{IsTerminal, Write};

/// Where the progress of one operation goes.
pub struct Progress {
    tty: bool,
    last_key: String,
}

impl Progress {
    /// Progress on stderr.
    pub fn stderr() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last_key: String::new() }
    }

    /// Shows `line`: in place on a terminal, otherwise printed when `key` differs from the last.
    pub fn show(&mut self, key: &str, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if key != self.last_key {
            eprintln!("{line}");
            self.last_key = key.to_string();
        }
    }

    /// Ends the line a terminal was updating in place (before other output).
    pub fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }

    /// Erases the line a terminal was updating in place, for a final line in its stead.
    pub fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}
