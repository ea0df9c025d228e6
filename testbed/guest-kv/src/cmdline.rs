//! The kernel command line: `key=value` words separated by spaces, Linux-style.
//!
//! Unknown words are ignored (QEMU microvm adds `acpi=off`, `earlyprintk=...` and the like).
//! When a key appears twice the last one wins, except `virtio_mmio.device`, which may repeat.
//!
//! ```
//! use guest_kv::cmdline::{parse, Workload};
//! let c = parse("acpi=off workload=dirty wss=8 rate=500 virtio_mmio.device=512@0xfeb00e00:12").unwrap();
//! assert_eq!(c.workload, Workload::Dirty { wss_mib: 8, rate: 500, report_ms: 0 });
//! assert_eq!(c.virtio_mmio[0].base, 0xfeb0_0e00);
//! assert_eq!(c.virtio_mmio[0].irq, 12);
//! ```

use alloc::vec::Vec;
use core::fmt;

/// Default LAPIC timer frequency.
pub const DEFAULT_HZ: u32 = 100;
/// Default `counter` line period.
pub const DEFAULT_PERIOD_MS: u32 = 50;
/// Default `dirty` working set.
pub const DEFAULT_WSS_MIB: u64 = 16;
/// Default `dirty` rate.
pub const DEFAULT_RATE: u64 = 1000;
/// Default `kv` address.
pub const DEFAULT_IP: Ipv4Cidr = Ipv4Cidr { addr: [10, 0, 0, 2], prefix: 24 };
/// Default number of `kv` TCP sockets (concurrent connections).
pub const DEFAULT_CONNS: usize = 64;
/// Most `virtio_mmio.device` words taken.
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// What the guest runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `workload=counter [period_ms=N]`.
    Counter {
        /// Milliseconds between lines.
        period_ms: u32,
    },
    /// `workload=dirty [wss=MiB] [rate=pages/s] [report_ms=N]`.
    Dirty {
        /// Working set in MiB.
        wss_mib: u64,
        /// Pages rewritten per second.
        rate: u64,
        /// Milliseconds between `dirty prog` lines (0: none, the default).
        report_ms: u32,
    },
    /// `workload=kv [ip=A.B.C.D/len] [gw=A.B.C.D] [mem=MiB] [conns=N]`.
    Kv(KvConfig),
}

/// Settings of the `kv` workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvConfig {
    /// Own address and prefix length.
    pub ip: Ipv4Cidr,
    /// Default gateway, if any.
    pub gw: Option<[u8; 4]>,
    /// Store bound in MiB (`None`: chosen from the free memory).
    pub mem_mib: Option<u64>,
    /// TCP sockets listening on port 11211.
    pub conns: usize,
}

/// An IPv4 address with prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// Address octets.
    pub addr: [u8; 4],
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// GSI (IOAPIC pin) of the device.
    pub irq: u32,
}

/// Everything the guest takes from its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The workload to run.
    pub workload: Workload,
    /// LAPIC timer ticks per second (`hz=`).
    pub hz: u32,
    /// virtio-mmio devices, in command-line order.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
}

/// Why a command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdlineError {
    /// The offending key.
    pub key: &'static str,
    /// What was wrong with it.
    pub what: &'static str,
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.what)
    }
}

/// The words of a command line.
pub fn words(cmdline: &str) -> impl Iterator<Item = &str> {
    cmdline.split(|c: char| c.is_ascii_whitespace() || c == '\0').filter(|w| !w.is_empty())
}

/// The value of the last `key=value` word for `key`.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    words(cmdline).filter_map(|w| w.strip_prefix(key)?.strip_prefix('=')).last()
}

/// Every value given for `key`, in order.
pub fn get_all<'a>(cmdline: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    words(cmdline).filter_map(move |w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A number: decimal, or hex with `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

/// A size like Linux `memparse`: a number with an optional K, M, G (or lowercase) suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = parse_u64(num)?;
    n.checked_mul(1u64 << shift)
}

/// `A.B.C.D`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for slot in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// `A.B.C.D/len` (a bare address means /24).
pub fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (a, p.parse::<u8>().ok()?)
        }
        None => (s, 24),
    };
    if prefix > 32 {
        return None;
    }
    Some(Ipv4Cidr { addr: parse_ipv4(addr)?, prefix })
}

/// `<size>@<base>:<irq>[:<id>]`, as Linux's `virtio_mmio.device=`.
pub fn parse_virtio_mmio(s: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split(':').next()?;
    let size = parse_size(size)?;
    let base = parse_size(base)?;
    let irq = u32::try_from(parse_u64(irq)?).ok()?;
    if size == 0 {
        return None;
    }
    Some(VirtioMmioDevice { base, size, irq })
}

fn num<T: TryFrom<u64>>(
    cmdline: &str,
    key: &'static str,
    default: T,
    ok: impl Fn(u64) -> bool,
) -> Result<T, CmdlineError> {
    match get(cmdline, key) {
        None => Ok(default),
        Some(v) => {
            let n = parse_u64(v).ok_or(CmdlineError { key, what: "not a number" })?;
            if !ok(n) {
                return Err(CmdlineError { key, what: "out of range" });
            }
            T::try_from(n).map_err(|_| CmdlineError { key, what: "out of range" })
        }
    }
}

/// Parses the whole command line.
pub fn parse(cmdline: &str) -> Result<Config, CmdlineError> {
    let hz = num(cmdline, "hz", DEFAULT_HZ, |n| (1..=5000).contains(&n))?;
    let workload = match get(cmdline, "workload").unwrap_or("counter") {
        "counter" => Workload::Counter {
            period_ms: num(cmdline, "period_ms", DEFAULT_PERIOD_MS, |n| (1..=3_600_000).contains(&n))?,
        },
        "dirty" => Workload::Dirty {
            wss_mib: num(cmdline, "wss", DEFAULT_WSS_MIB, |n| n <= 1 << 20)?,
            rate: num(cmdline, "rate", DEFAULT_RATE, |n| n <= 100_000_000)?,
            report_ms: num(cmdline, "report_ms", 0, |n| n <= 3_600_000)?,
        },
        "kv" => {
            let ip = match get(cmdline, "ip") {
                None => DEFAULT_IP,
                Some(v) => parse_cidr(v).ok_or(CmdlineError { key: "ip", what: "not A.B.C.D/len" })?,
            };
            let gw = match get(cmdline, "gw") {
                None => None,
                Some(v) => Some(parse_ipv4(v).ok_or(CmdlineError { key: "gw", what: "not A.B.C.D" })?),
            };
            let mem_mib = match get(cmdline, "mem") {
                None => None,
                Some(_) => Some(num(cmdline, "mem", 0u64, |n| (1..=1 << 20).contains(&n))?),
            };
            let conns = num(cmdline, "conns", DEFAULT_CONNS, |n| (1..=1024).contains(&n))?;
            Workload::Kv(KvConfig { ip, gw, mem_mib, conns })
        }
        _ => return Err(CmdlineError { key: "workload", what: "unknown (counter, dirty, kv)" }),
    };
    let mut virtio_mmio = Vec::new();
    for v in get_all(cmdline, "virtio_mmio.device") {
        let dev =
            parse_virtio_mmio(v).ok_or(CmdlineError { key: "virtio_mmio.device", what: "not <size>@<base>:<irq>" })?;
        if virtio_mmio.len() == MAX_VIRTIO_DEVICES {
            return Err(CmdlineError { key: "virtio_mmio.device", what: "too many" });
        }
        virtio_mmio.push(dev);
    }
    Ok(Config { workload, hz, virtio_mmio })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("123"), Some(123));
        assert_eq!(parse_u64("0x1f"), Some(31));
        assert_eq!(parse_u64("0X1F"), Some(31));
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("+1"), None);
        assert_eq!(parse_u64("12a"), None);
        assert_eq!(parse_u64("99999999999999999999999"), None);
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("0xffffffffffffffffK"), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_ipv4("10.0.2.15"), Some([10, 0, 2, 15]));
        assert_eq!(parse_ipv4("10.0.2"), None);
        assert_eq!(parse_ipv4("10.0.2.15.1"), None);
        assert_eq!(parse_ipv4("256.0.0.1"), None);
        assert_eq!(parse_ipv4("1..2.3"), None);
        assert_eq!(parse_cidr("10.0.2.15/24"), Some(Ipv4Cidr { addr: [10, 0, 2, 15], prefix: 24 }));
        assert_eq!(parse_cidr("10.0.2.15"), Some(Ipv4Cidr { addr: [10, 0, 2, 15], prefix: 24 }));
        assert_eq!(parse_cidr("10.0.2.15/33"), None);
        assert_eq!(parse_cidr("10.0.2.15/"), None);
    }

    #[test]
    fn virtio_mmio_words() {
        assert_eq!(
            parse_virtio_mmio("512@0xfeb00e00:12"),
            Some(VirtioMmioDevice { base: 0xfeb0_0e00, size: 512, irq: 12 })
        );
        assert_eq!(
            parse_virtio_mmio("4K@0xd0000000:5:3"),
            Some(VirtioMmioDevice { base: 0xd000_0000, size: 4096, irq: 5 })
        );
        assert_eq!(
            parse_virtio_mmio("0x1000@3489660928:6"),
            Some(VirtioMmioDevice { base: 0xd000_0000, size: 4096, irq: 6 })
        );
        assert_eq!(parse_virtio_mmio("512@0xfeb00e00"), None);
        assert_eq!(parse_virtio_mmio("0@0xfeb00e00:1"), None);
        assert_eq!(parse_virtio_mmio("x@0xfeb00e00:1"), None);
        assert_eq!(parse_virtio_mmio("512@0xfeb00e00:x"), None);
    }

    #[test]
    fn lookups() {
        let c = "a=1  b=2\tworkload=kv a=3 ab=4 a virtio_mmio.device=1 virtio_mmio.device=2\0junk";
        assert_eq!(get(c, "a"), Some("3"));
        assert_eq!(get(c, "ab"), Some("4"));
        assert_eq!(get(c, "b"), Some("2"));
        assert_eq!(get(c, "c"), None);
        assert_eq!(get_all(c, "virtio_mmio.device").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(words(c).last(), Some("junk"));
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.workload, Workload::Counter { period_ms: DEFAULT_PERIOD_MS });
        assert_eq!(c.hz, DEFAULT_HZ);
        assert!(c.virtio_mmio.is_empty());
        let c = parse("workload=dirty").unwrap();
        assert_eq!(c.workload, Workload::Dirty { wss_mib: DEFAULT_WSS_MIB, rate: DEFAULT_RATE, report_ms: 0 });
        let c = parse("workload=dirty wss=64 rate=20000 report_ms=10").unwrap();
        assert_eq!(c.workload, Workload::Dirty { wss_mib: 64, rate: 20000, report_ms: 10 });
        assert_eq!(parse("workload=dirty report_ms=3600001").unwrap_err().key, "report_ms");
        assert_eq!(parse("workload=dirty report_ms=x").unwrap_err().key, "report_ms");
        let c = parse("workload=kv").unwrap();
        assert_eq!(
            c.workload,
            Workload::Kv(KvConfig { ip: DEFAULT_IP, gw: None, mem_mib: None, conns: DEFAULT_CONNS })
        );
    }

    #[test]
    fn qemu_microvm_line() {
        let line = "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 acpi=off \
                    virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11 \
                    workload=kv ip=10.0.2.15/24 gw=10.0.2.2 mem=32 conns=20 hz=250";
        let c = parse(line).unwrap();
        assert_eq!(c.hz, 250);
        assert_eq!(c.virtio_mmio.len(), 2);
        assert_eq!(c.virtio_mmio[1].irq, 11);
        assert_eq!(
            c.workload,
            Workload::Kv(KvConfig {
                ip: Ipv4Cidr { addr: [10, 0, 2, 15], prefix: 24 },
                gw: Some([10, 0, 2, 2]),
                mem_mib: Some(32),
                conns: 20,
            })
        );
    }

    #[test]
    fn counter_and_errors() {
        assert_eq!(parse("workload=counter period_ms=0x10").unwrap().workload, Workload::Counter { period_ms: 16 });
        assert_eq!(parse("workload=nope").unwrap_err().key, "workload");
        assert_eq!(parse("hz=0").unwrap_err(), CmdlineError { key: "hz", what: "out of range" });
        assert_eq!(parse("hz=10000").unwrap_err().key, "hz");
        assert_eq!(parse("period_ms=abc").unwrap_err(), CmdlineError { key: "period_ms", what: "not a number" });
        assert_eq!(parse("workload=kv ip=1.2.3").unwrap_err().key, "ip");
        assert_eq!(parse("workload=kv gw=x").unwrap_err().key, "gw");
        assert_eq!(parse("workload=kv mem=0").unwrap_err().key, "mem");
        assert_eq!(parse("virtio_mmio.device=bad").unwrap_err().key, "virtio_mmio.device");
        // Parameters of other workloads are ignored.
        assert!(parse("workload=counter wss=abc").is_ok());
        assert!(format!("{}", parse("hz=0").unwrap_err()).contains("hz"));
    }
}
