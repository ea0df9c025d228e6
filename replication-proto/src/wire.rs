//! Little-endian primitives shared by every encoder and decoder.
//!
//! [`Reader`] is the only way decoders look at bytes: every read is bounds-checked and names the
//! field it was reading, so a truncated or overlong input becomes a [`WireError`], never a panic.

use thiserror::Error;

/// A malformed primitive in a payload.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The payload ended inside a field.
    #[error("{field}: needs {need} bytes, {have} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the payload.
        have: usize,
    },
    /// Bytes were left over after the last field.
    #[error("{count} trailing bytes after the last field")]
    Trailing {
        /// How many bytes were left.
        count: usize,
    },
    /// A LEB128 varint was longer than its type or not minimally encoded.
    #[error("{field}: bad varint")]
    Varint {
        /// The field being read.
        field: &'static str,
    },
    /// A length-prefixed field was longer than its limit.
    #[error("{field}: length {len} over the limit of {max}")]
    TooLong {
        /// The field being read.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The documented limit.
        max: usize,
    },
    /// A string was not UTF-8.
    #[error("{field}: not utf-8")]
    Utf8 {
        /// The field being read.
        field: &'static str,
    },
}

/// A bounds-checked cursor over a payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated { field, need: n, have: self.remaining() });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Takes the rest of the payload.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Reads a little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Reads 16 raw bytes.
    pub fn bytes16(&mut self, field: &'static str) -> Result<[u8; 16], WireError> {
        self.array(field)
    }

    /// Reads an unsigned LEB128 varint of at most 32 bits, minimally encoded.
    pub fn uleb32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let mut value: u32 = 0;
        for i in 0..5 {
            let byte = self.u8(field)?;
            let bits = u32::from(byte & 0x7f);
            if i == 4 && bits > 0x0f {
                return Err(WireError::Varint { field });
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                // Minimal: a continuation byte of zero followed by the end is not allowed.
                if i > 0 && byte == 0 {
                    return Err(WireError::Varint { field });
                }
                return Ok(value);
            }
        }
        Err(WireError::Varint { field })
    }

    /// Reads a u16-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize, field: &'static str) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        let b = self.bytes(len, field)?;
        core::str::from_utf8(b).map(str::to_owned).map_err(|_| WireError::Utf8 { field })
    }

    /// Fails if any byte is left.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(WireError::Trailing { count }),
        }
    }
}

/// Appends a little-endian u16.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian u32.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian u64.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends an unsigned LEB128 varint.
pub fn put_uleb32(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a u16-length-prefixed string; the caller has checked its length.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    put_u16(out, len);
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// Overwrites a little-endian u32 at `at` (used to patch lengths after writing a body).
pub fn patch_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uleb_round_trips_and_rejects_non_minimal() {
        for v in [0u32, 1, 127, 128, 300, 16383, 16384, u32::MAX] {
            let mut out = Vec::new();
            put_uleb32(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.uleb32("v").unwrap(), v);
            r.finish().unwrap();
        }
        assert!(Reader::new(&[0x80, 0x00]).uleb32("v").is_err());
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x1f]).uleb32("v").is_err());
        assert!(Reader::new(&[0xff]).uleb32("v").is_err());
    }

    #[test]
    fn truncated_reads_name_the_field() {
        let err = Reader::new(&[1, 2]).u32("epoch").unwrap_err();
        assert_eq!(err.to_string(), "epoch: needs 4 bytes, 2 left");
    }
}
