//! What the load generator asks for: the mix of reads and writes, which key, and what value.
//!
//! Everything here is deterministic given a seed, so two runs (against RingKV and against
//! Redis) ask for the same sequence of operations. Keys are `bench:` followed by a zero-padded
//! index below `--keys`, chosen uniformly; values are pseudo-random printable bytes, so neither
//! side gains anything from compressible data.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// The mix of operations a benchmark issues.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// Reads only, of keys loaded before the measurement starts.
    Get,
    /// Writes only.
    Put,
    /// Reads with probability `read_ratio`, writes otherwise; keys are loaded first.
    Mixed { read_ratio: f64 },
}

impl Workload {
    /// Whether the workload reads, and so needs its keys loaded before it starts.
    pub fn reads(&self) -> bool {
        match self {
            Workload::Get => true,
            Workload::Put => false,
            Workload::Mixed { read_ratio } => *read_ratio > 0.0,
        }
    }

    /// The fraction of operations that are reads.
    pub fn read_ratio(&self) -> f64 {
        match self {
            Workload::Get => 1.0,
            Workload::Put => 0.0,
            Workload::Mixed { read_ratio } => *read_ratio,
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    /// Parses `get`, `put`, or `mixed:R` with R between 0 and 1 (`mixed:0.9` is 90% reads).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "get" => Ok(Workload::Get),
            "put" => Ok(Workload::Put),
            _ => {
                let usage = || {
                    format!(
                        "unknown workload {s:?}: expected get, put or mixed:R with R the \
                         fraction of reads between 0 and 1 (e.g. mixed:0.9)"
                    )
                };
                let ratio = s.strip_prefix("mixed:").ok_or_else(usage)?;
                let read_ratio: f64 = ratio.trim().parse().map_err(|_| usage())?;
                if !(0.0..=1.0).contains(&read_ratio) {
                    return Err(usage());
                }
                Ok(Workload::Mixed { read_ratio })
            }
        }
    }
}

impl fmt::Display for Workload {
    /// The form [`FromStr`] accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Get => f.write_str("get"),
            Workload::Put => f.write_str("put"),
            Workload::Mixed { read_ratio } => write!(f, "mixed:{read_ratio}"),
        }
    }
}

/// One operation to issue: a key index and what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get(u64),
    Put(u64),
}

/// A small, fast, seedable generator (SplitMix64); statistical quality is ample for picking
/// keys, and it keeps the benchmark free of a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), by multiply-shift: no division, negligible bias.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The stream of operations one connection issues.
#[derive(Debug, Clone)]
pub struct Generator {
    workload: Workload,
    keys: u64,
    rng: Rng,
}

impl Generator {
    /// Operations of `workload` over keys `0..keys` (`keys` > 0), fixed by `seed`.
    pub fn new(workload: Workload, keys: u64, seed: u64) -> Generator {
        Generator {
            workload,
            keys: keys.max(1),
            rng: Rng::new(seed),
        }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let key = self.rng.below(self.keys);
        let read = match self.workload {
            Workload::Get => true,
            Workload::Put => false,
            Workload::Mixed { read_ratio } => self.rng.unit() < read_ratio,
        };
        if read {
            Op::Get(key)
        } else {
            Op::Put(key)
        }
    }
}

/// The key with index `i`: `bench:` and ten digits, so every key has the same length.
pub fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench:{i:010}"))
}

/// The key with index `i` in the space of `--no-preload` runs, which no preload writes:
/// `absent:` and nine digits, as long as [`key`]'s.
pub fn absent_key(i: u64) -> Bytes {
    Bytes::from(format!("absent:{i:09}"))
}

/// A value of `size` pseudo-random printable bytes, fixed by `seed`.
pub fn value(size: usize, seed: u64) -> Bytes {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = Rng::new(seed);
    (0..size)
        .map(|_| ALPHABET[(rng.next_u64() & 63) as usize])
        .collect::<Vec<u8>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_and_print_back() {
        for s in ["get", "put", "mixed:0.9", "mixed:0", "mixed:1"] {
            let w: Workload = s.parse().unwrap();
            assert_eq!(w.to_string().parse::<Workload>().unwrap(), w, "{s}");
        }
        assert_eq!(
            "mixed:0.25".parse::<Workload>().unwrap(),
            Workload::Mixed { read_ratio: 0.25 }
        );
        for bad in [
            "",
            "GET",
            "mixed",
            "mixed:",
            "mixed:1.5",
            "mixed:-0.1",
            "mixed:x",
        ] {
            assert!(bad.parse::<Workload>().is_err(), "{bad:?}");
        }
        assert!(Workload::Get.reads());
        assert!(!Workload::Put.reads());
        assert!(!Workload::Mixed { read_ratio: 0.0 }.reads());
    }

    #[test]
    fn generator_respects_keys_and_mix() {
        let mut g = Generator::new(Workload::Mixed { read_ratio: 0.8 }, 100, 7);
        let (mut reads, n) = (0u32, 20_000u32);
        let mut seen = [false; 100];
        for _ in 0..n {
            let (read, k) = match g.next_op() {
                Op::Get(k) => (true, k),
                Op::Put(k) => (false, k),
            };
            assert!(k < 100);
            seen[k as usize] = true;
            reads += u32::from(read);
        }
        let ratio = f64::from(reads) / f64::from(n);
        assert!((0.77..0.83).contains(&ratio), "read ratio {ratio}");
        assert!(seen.iter().all(|s| *s), "every key is eventually chosen");
        let mut puts = Generator::new(Workload::Put, 10, 1);
        assert!((0..100).all(|_| matches!(puts.next_op(), Op::Put(_))));
    }

    #[test]
    fn same_seed_same_sequence() {
        let mut a = Generator::new(Workload::Get, 1000, 42);
        let mut b = Generator::new(Workload::Get, 1000, 42);
        for _ in 0..100 {
            assert_eq!(a.next_op(), b.next_op());
        }
    }

    #[test]
    fn keys_and_values() {
        assert_eq!(key(7), Bytes::from_static(b"bench:0000000007"));
        assert_eq!(key(7).len(), key(9_999_999_999).len());
        assert_eq!(absent_key(7), Bytes::from_static(b"absent:000000007"));
        assert_eq!(absent_key(7).len(), key(7).len());
        let v = value(1024, 3);
        assert_eq!(v.len(), 1024);
        assert!(v.iter().all(u8::is_ascii_graphic));
        assert_eq!(v, value(1024, 3));
        assert!(value(0, 1).is_empty());
    }
}
