//! What a benchmark measured: a [`Recorder`] per connection while it runs, merged into one
//! [`Report`] at the end, printed as text or as one JSON document.
//!
//! Latencies go into an HDR histogram in microseconds (3 significant digits), so percentiles
//! are exact to 0.1% whatever the spread. Only operations that started after the warm-up and
//! finished before the end of the measured window count, so neither ramp-up nor the drain at
//! the end colours the figures. Errors are counted by class (`timeout`, `unavailable`, ...).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use ringkv_common::protocol::WriteTimings;
use serde::Serialize;

/// Largest latency the histogram tells apart, in microseconds (one hour); larger ones are
/// recorded as this, which no realistic `--timeout` reaches.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant decimal digits the histogram keeps: 0.1% resolution in about 150 KiB.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Counts of one connection (or, merged, of all of them).
#[derive(Debug, Clone)]
pub struct Recorder {
    latency_us: Histogram<u64>,
    reads: u64,
    writes: u64,
    misses: u64,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        // The bounds are constants that satisfy hdrhistogram's rules (low >= 1, high >= 2 * low,
        // 0..=5 digits), so creation cannot fail.
        #[allow(clippy::expect_used)]
        let latency_us = Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Recorder {
            latency_us,
            reads: 0,
            writes: 0,
            misses: 0,
            errors: BTreeMap::new(),
        }
    }

    /// A successful read that took `latency`; `hit` is false when the key had no value.
    pub fn read(&mut self, latency: Duration, hit: bool) {
        self.reads += 1;
        self.misses += u64::from(!hit);
        self.latency(latency);
    }

    /// A successful write that took `latency`.
    pub fn write(&mut self, latency: Duration) {
        self.writes += 1;
        self.latency(latency);
    }

    /// A failed operation of error class `class`.
    pub fn error(&mut self, class: &str) {
        match self.errors.get_mut(class) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(class.to_string(), 1);
            }
        }
    }

    fn latency(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// Fold `other` into this recorder.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms have the same constant bounds, so adding cannot go out of range;
        // should it ever, saturating the sample is better than losing the whole run.
        if self.latency_us.add(&other.latency_us).is_err() {
            for v in other.latency_us.iter_recorded() {
                self.latency_us
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.reads += other.reads;
        self.writes += other.writes;
        self.misses += other.misses;
        for (class, n) in &other.errors {
            *self.errors.entry(class.clone()).or_insert(0) += n;
        }
    }

    /// Successful operations recorded.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    /// Failed operations recorded.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency percentiles of the successful operations.
    pub fn latency_summary(&self) -> Latency {
        let h = &self.latency_us;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p99_9: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Latency percentiles in microseconds; all zero when nothing succeeded.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

/// The key loading that ran before a read workload.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Preload {
    pub keys: u64,
    pub secs: f64,
}

/// Where RingKV's coordinator said its acknowledged writes waited during a run, on average
/// per write, in microseconds: the difference of the `writes` sums of `status` read before
/// the first operation and after the last (so the warm-up counts, and so would another
/// client's writes).
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct WriteStages {
    /// Writes the coordinator acknowledged between the two readings.
    pub writes: u64,
    /// Waiting for the key's lock.
    pub lock: f64,
    /// Waiting for the write quorum of replicas.
    pub quorum: f64,
    /// The metadata commit.
    pub commit: f64,
}

impl WriteStages {
    /// The averages between two readings; `None` when no write was acknowledged between.
    pub fn between(before: &WriteTimings, after: &WriteTimings) -> Option<WriteStages> {
        let writes = after.count.checked_sub(before.count).filter(|&n| n > 0)?;
        let avg = |after: u64, before: u64| {
            (after.saturating_sub(before) as f64 / writes as f64 * 10.0).round() / 10.0
        };
        Some(WriteStages {
            writes,
            lock: avg(after.lock_wait_us, before.lock_wait_us),
            quorum: avg(after.quorum_wait_us, before.quorum_wait_us),
            commit: avg(after.commit_wait_us, before.commit_wait_us),
        })
    }
}

/// How a benchmark was run; echoed in the report so a JSON document stands on its own.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Settings {
    /// `ringkv` or `redis`.
    pub target: String,
    pub addr: String,
    pub workload: String,
    pub value_size: usize,
    pub keys: u64,
    pub connections: usize,
    pub pipeline: usize,
    pub warmup_secs: f64,
}

/// The outcome of one benchmark run.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Report {
    #[serde(flatten)]
    pub settings: Settings,
    /// Length of the measured window (warm-up excluded).
    pub duration_secs: f64,
    /// Successful operations in the window.
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    /// Reads that found no value (expected to be 0 after the preload).
    pub misses: u64,
    /// Successful operations per second.
    pub throughput: f64,
    pub latency_us: Latency,
    /// Failed operations by error class.
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub preload: Option<Preload>,
    /// RingKV only, when it acknowledged writes: where they waited.
    pub write_stages_us: Option<WriteStages>,
}

impl Report {
    /// The report of `recorder` over a measured window of `window`.
    pub fn new(
        settings: Settings,
        recorder: &Recorder,
        window: Duration,
        preload: Option<Preload>,
    ) -> Report {
        let secs = window.as_secs_f64();
        let ops = recorder.ops();
        let throughput = if secs > 0.0 {
            (ops as f64 / secs * 10.0).round() / 10.0
        } else {
            0.0
        };
        Report {
            settings,
            duration_secs: secs,
            ops,
            reads: recorder.reads,
            writes: recorder.writes,
            misses: recorder.misses,
            throughput,
            latency_us: recorder.latency_summary(),
            errors: recorder.errors.clone(),
            error_total: recorder.error_total(),
            preload,
            write_stages_us: None,
        }
    }

    /// One line of JSON and a newline.
    pub fn json(&self) -> String {
        // A struct of numbers, strings and string-keyed maps always serialises.
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({ "error": { "class": "internal", "message": e.to_string() } })
                .to_string()
        });
        s.push('\n');
        s
    }

    /// A few lines for people.
    pub fn human(&self) -> String {
        let s = &self.settings;
        let l = &self.latency_us;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} at {}: workload {}, values of {} B, {} keys, {} connection(s) x {} in flight",
            s.target, s.addr, s.workload, s.value_size, s.keys, s.connections, s.pipeline
        );
        if let Some(p) = self.preload {
            let _ = writeln!(out, "preload     {} keys in {:.2} s", p.keys, p.secs);
        }
        let _ = writeln!(
            out,
            "window      {:.1} s after {:.1} s of warm-up",
            self.duration_secs, s.warmup_secs
        );
        let _ = writeln!(
            out,
            "throughput  {:.0} ops/s ({} ops: {} reads, {} writes, {} misses)",
            self.throughput, self.ops, self.reads, self.writes, self.misses
        );
        let _ = writeln!(
            out,
            "latency     p50 {}  p99 {}  p99.9 {}  max {}  (mean {})",
            ms(l.p50),
            ms(l.p99),
            ms(l.p99_9),
            ms(l.max),
            ms(l.mean)
        );
        if let Some(w) = self.write_stages_us {
            let _ = writeln!(
                out,
                "writes      waited on average {:.0} µs for the key lock, {:.0} µs for the write \
                 quorum, {:.0} µs for the metadata commit ({} writes, warm-up included)",
                w.lock, w.quorum, w.commit, w.writes
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors      none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(class, n)| format!("{class} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "errors      {} ({})",
                self.error_total,
                list.join(", ")
            );
        }
        out
    }
}

/// Microseconds as milliseconds with three decimals, e.g. `0.412 ms`.
fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            target: "ringkv".into(),
            addr: "127.0.0.1:7400".into(),
            workload: "get".into(),
            value_size: 100,
            keys: 10,
            connections: 2,
            pipeline: 4,
            warmup_secs: 0.5,
        }
    }

    #[test]
    fn percentiles_are_ordered_and_merged() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        for i in 1..=1000u64 {
            a.read(Duration::from_micros(i), true);
            b.write(Duration::from_micros(i * 10));
        }
        a.read(Duration::from_micros(5), false);
        b.error("timeout");
        b.error("timeout");
        a.error("unavailable");
        a.merge(&b);
        assert_eq!(a.ops(), 2001);
        assert_eq!(a.error_total(), 3);
        let l = a.latency_summary();
        assert!(l.p50 > 0.0);
        assert!(
            l.p50 <= l.p99 && l.p99 <= l.p99_9 && l.p99_9 <= l.max,
            "{l:?}"
        );
        // 10 ms is the largest sample; HDR reports it within 0.1%.
        assert!((l.max - 10_000.0).abs() <= 10.0, "{l:?}");
        // Half the samples are at most 1 ms.
        assert!((900.0..=1100.0).contains(&l.p50), "{l:?}");
    }

    #[test]
    fn empty_recorder_reports_zeros() {
        let r = Report::new(settings(), &Recorder::new(), Duration::from_secs(1), None);
        assert_eq!(r.ops, 0);
        assert_eq!(r.throughput, 0.0);
        assert_eq!(r.latency_us, Latency::default());
        assert!(r.human().contains("errors      none"));
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut rec = Recorder::new();
        for _ in 0..50 {
            rec.read(Duration::from_micros(200), true);
        }
        rec.error("timeout");
        let preload = Some(Preload {
            keys: 10,
            secs: 0.1,
        });
        let r = Report::new(settings(), &rec, Duration::from_secs(2), preload);
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["target"], "ringkv");
        assert_eq!(v["workload"], "get");
        assert_eq!(v["connections"], 2);
        assert_eq!(v["pipeline"], 4);
        assert_eq!(v["ops"], 50);
        assert_eq!(v["reads"], 50);
        assert_eq!(v["throughput"], 25.0);
        assert_eq!(v["errors"]["timeout"], 1);
        assert_eq!(v["error_total"], 1);
        assert_eq!(v["preload"]["keys"], 10);
        for p in ["p50", "p99", "p99_9", "max", "mean"] {
            let x = v["latency_us"][p].as_f64().unwrap();
            assert!((199.0..=201.0).contains(&x), "{p} = {x}");
        }
        assert!(r.human().contains("timeout 1"));
        assert!(v["write_stages_us"].is_null());
        assert!(!r.human().contains("waited"));
    }

    #[test]
    fn write_stages_are_averages_between_two_readings() {
        let before = WriteTimings {
            count: 10,
            lock_wait_us: 100,
            quorum_wait_us: 5_000,
            commit_wait_us: 1_000,
        };
        let after = WriteTimings {
            count: 14,
            lock_wait_us: 110,
            quorum_wait_us: 7_001,
            commit_wait_us: 1_400,
        };
        let w = WriteStages::between(&before, &after).unwrap();
        assert_eq!(w.writes, 4);
        assert_eq!((w.lock, w.quorum, w.commit), (2.5, 500.3, 100.0));
        assert_eq!(
            WriteStages::between(&after, &after),
            None,
            "no write between"
        );
        let mut r = Report::new(settings(), &Recorder::new(), Duration::from_secs(1), None);
        r.write_stages_us = Some(w);
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["write_stages_us"]["quorum"], 500.3);
        assert!(
            r.human().contains("500 µs for the write quorum"),
            "{}",
            r.human()
        );
    }
}
