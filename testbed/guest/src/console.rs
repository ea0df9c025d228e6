//! COM1 output. Every byte is a VM exit (~40 us), so lines are short and rare.
//!
//! With the 16550 FIFO enabled a whole FIFO (16 bytes) goes out per LSR check; on a UART
//! without a FIFO it is one byte per check.

use crate::arch::{inb, outb};
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const IIR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;

static FIFO: AtomicBool = AtomicBool::new(false);

/// Sets the UART to 8N1, no interrupts, FIFO on.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x03);
    outb(FCR, 0x07);
    FIFO.store(inb(IIR) & 0xc0 == 0xc0, Ordering::Relaxed);
}

/// Writes raw bytes.
pub fn write_bytes(bytes: &[u8]) {
    let burst = if FIFO.load(Ordering::Relaxed) { 16 } else { 1 };
    for chunk in bytes.chunks(burst) {
        let mut spins = 0u32;
        while inb(LSR) & LSR_THRE == 0 && spins < 100_000 {
            spins += 1;
        }
        for &b in chunk {
            outb(THR, b);
        }
    }
}

/// A line assembled on the stack, written with one burst (`\n` becomes `\r\n`).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line { buf: [0; 256], len: 0 }
    }

    /// Writes the line and a newline.
    pub fn finish(mut self) {
        let _ = fmt::Write::write_str(&mut self, "\n");
        write_bytes(&self.buf[..self.len]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                if self.len + 2 > self.buf.len() {
                    write_bytes(&self.buf[..self.len]);
                    self.len = 0;
                }
                self.buf[self.len] = b'\r';
                self.buf[self.len + 1] = b'\n';
                self.len += 2;
            } else {
                if self.len + 1 > self.buf.len() - 2 {
                    write_bytes(&self.buf[..self.len]);
                    self.len = 0;
                }
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// Prints one line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::console::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.finish();
    }};
}
