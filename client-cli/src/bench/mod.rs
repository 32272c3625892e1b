//! `ringkv bench`: a closed-loop load generator for RingKV, and for Redis with `--redis`.
//!
//! # Layout
//! - [`workload`]: the operation mix, key choice and values (deterministic per seed).
//! - [`redis`]: a minimal pipelining RESP client, so Redis is driven by the same generator.
//! - [`report`]: per-connection recorders (HDR histogram, error classes) and the final report.
//!
//! A run opens `--connections` connections. A read workload first writes every key once
//! (the preload). Then each connection keeps `--pipeline` requests in flight: whenever one
//! completes, the next is issued, until the warm-up and the measured window have passed.
//! Only operations that start after the warm-up and finish inside the window count, so the
//! figures are those of a steady state. Every operation has the `--timeout` deadline; a failed
//! one is counted by error class and the run goes on.

pub mod redis;
pub mod report;
pub mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use ringkv_common::client::{CallError, Client};
use ringkv_common::protocol::{Request, Response, MAX_VALUE_LEN};

use self::redis::{RedisClient, RedisError};
use self::report::{Preload, Recorder, Report, Settings, WriteStages};
use self::workload::{Generator, Op, Workload};
use crate::cli::parse_duration;

/// Most requests one connection may keep in flight; the server stops reading a connection
/// with more than this outstanding.
const MAX_PIPELINE: usize = 4096;

/// Most connections one run opens; far beyond what one client machine drives usefully.
const MAX_CONNECTIONS: usize = 10_000;

/// Requests in flight per connection while preloading, whatever `--pipeline` says: loading
/// is not measured, so it may as well be fast.
const PRELOAD_PIPELINE: usize = 32;

const AFTER_HELP: &str = "\
Examples:
  ringkv bench --workload get --value-size 100 --connections 50 --duration 10s
  ringkv bench --workload mixed:0.9 --pipeline 16 --json
  ringkv bench --redis 127.0.0.1:6379 --workload put --value-size 1024
  ringkv bench --workload get --no-preload --pipeline 16   # misses: the coordinator alone

The figures count only operations that start after the warm-up and finish inside the
measured window. Latencies are microseconds in --json. The exit code is 0 when every
operation succeeded and 1 when some failed (the report still prints); bench/compare.sh
runs the same workloads against RingKV and Redis side by side.";

/// The flags of `ringkv bench`.
#[derive(Args, Debug, Clone, PartialEq)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// The operation mix: `get`, `put`, or `mixed:R` with R the fraction of reads (e.g. `mixed:0.9`).
    /// Workloads that read write every key once before the warm-up.
    #[arg(long, default_value = "get", value_name = "WORKLOAD")]
    pub workload: Workload,

    /// Bytes per value written.
    #[arg(long, default_value_t = 100, value_name = "BYTES")]
    pub value_size: usize,

    /// Number of distinct keys; each operation picks one uniformly.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub keys: u64,

    /// Connections to open; each is driven independently.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub connections: usize,

    /// Requests kept in flight per connection (1 = no pipelining).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub pipeline: usize,

    /// Length of the measured window, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,

    /// Load before the measured window, excluded from the figures, e.g. `1s`; `0` for none.
    #[arg(long, default_value = "1s", value_parser = parse_warmup, value_name = "DURATION")]
    pub warmup: Duration,

    /// Drive the Redis server at ADDR (HOST:PORT) with SET and GET instead of RingKV.
    #[arg(long, value_name = "ADDR")]
    pub redis: Option<String>,

    /// Threads of the load generator; 1 keeps it to one core, leaving the rest to the servers.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,

    /// Seed of the key and operation sequence; the same seed asks for the same operations.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,

    /// Do not write the keys before a reading workload, and use keys of their own (`absent:`
    /// instead of `bench:`, which other runs write): every read of a `get` workload is then a
    /// miss, which RingKV's coordinator answers from its metadata without a node (its own cost
    /// per request).
    #[arg(long)]
    pub no_preload: bool,
}

/// A warm-up duration: as `--duration`, or `0` for none.
fn parse_warmup(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

impl BenchArgs {
    /// Check the flags against each other and the limits.
    ///
    /// # Errors
    /// A message for the first flag out of range.
    pub fn check(&self) -> Result<(), String> {
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!(
                "--connections must be between 1 and {MAX_CONNECTIONS}"
            ));
        }
        if !(1..=MAX_PIPELINE).contains(&self.pipeline) {
            return Err(format!("--pipeline must be between 1 and {MAX_PIPELINE}"));
        }
        if self.value_size > MAX_VALUE_LEN {
            return Err(format!("--value-size must be at most {MAX_VALUE_LEN}"));
        }
        if !(1..=256).contains(&self.threads) {
            return Err("--threads must be between 1 and 256".into());
        }
        Ok(())
    }

    /// `redis` or `ringkv`.
    fn target_name(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "ringkv"
        }
    }
}

/// Why a benchmark could not run (failed operations during the run are not errors: they are
/// counted in the report).
#[derive(thiserror::Error, Debug)]
pub enum BenchError {
    /// Flags out of range; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// A connection could not be opened.
    #[error("{0}")]
    Connect(String),
    /// Some keys could not be loaded before a read workload.
    #[error("preload failed for {failed} of {keys} keys; first error: {first}")]
    Preload {
        failed: u64,
        keys: u64,
        first: String,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl BenchError {
    /// The class for `--json` errors and stderr, as for the other commands.
    pub fn class(&self) -> &'static str {
        match self {
            BenchError::Usage(_) => "usage",
            BenchError::Connect(_) => "connect",
            BenchError::Preload { .. } => "preload",
            BenchError::Runtime(_) => "internal",
        }
    }
}

/// Run the benchmark on a runtime of its own: RingKV at `coordinator` (or Redis per
/// `--redis`), each operation waiting at most `timeout`. Blocking.
///
/// # Errors
/// [`BenchError`] when the run could not start or the preload failed.
pub fn run_blocking(
    args: &BenchArgs,
    coordinator: &str,
    timeout: Duration,
) -> Result<Report, BenchError> {
    args.check().map_err(BenchError::Usage)?;
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(BenchError::Runtime)?;
    runtime.block_on(run(args, coordinator, timeout))
}

/// Run the benchmark on the current runtime; see [`run_blocking`].
///
/// # Errors
/// As [`run_blocking`].
pub async fn run(
    args: &BenchArgs,
    coordinator: &str,
    timeout: Duration,
) -> Result<Report, BenchError> {
    args.check().map_err(BenchError::Usage)?;
    let addr = args
        .redis
        .clone()
        .unwrap_or_else(|| coordinator.to_string());
    let conns = connect_all(args, &addr, timeout).await?;
    let value = workload::value(args.value_size, args.seed);

    let preload = if args.workload.reads() && !args.no_preload {
        Some(preload(&conns, args.keys, &value, timeout).await?)
    } else {
        None
    };

    let writes_before = write_sums(&conns, timeout).await;
    let start = Instant::now();
    let window = Window {
        start: start + args.warmup,
        end: start + args.warmup + args.duration,
    };
    let drivers: FuturesUnordered<_> = conns
        .iter()
        .enumerate()
        .map(|(i, conn)| {
            let generator = Generator::new(
                args.workload,
                args.keys,
                args.seed.wrapping_add(i as u64 + 1),
            );
            let job = Job {
                conn: conn.clone(),
                generator,
                value: value.clone(),
                key: if args.no_preload {
                    workload::absent_key
                } else {
                    workload::key
                },
                pipeline: args.pipeline,
                window,
                timeout,
            };
            tokio::spawn(drive(job))
        })
        .collect();
    let results: Vec<_> = drivers.collect().await;
    let mut total = Recorder::new();
    for result in results {
        match result {
            Ok(recorder) => total.merge(&recorder),
            // A driver that panicked is a bug; count its connection as lost, keep the rest.
            Err(_) => total.error("internal"),
        }
    }
    let write_stages = match (writes_before, write_sums(&conns, timeout).await) {
        (Some(before), Some(after)) => WriteStages::between(&before, &after),
        _ => None,
    };
    let settings = Settings {
        target: args.target_name().into(),
        addr,
        workload: args.workload.to_string(),
        value_size: args.value_size,
        keys: args.keys,
        connections: args.connections,
        pipeline: args.pipeline,
        warmup_secs: args.warmup.as_secs_f64(),
    };
    let mut report = Report::new(settings, &total, args.duration, preload);
    report.write_stages_us = write_stages;
    Ok(report)
}

/// RingKV's write-stage sums from `status`; `None` for Redis, or when `status` fails (the
/// benchmark goes on without them).
async fn write_sums(
    conns: &[Conn],
    timeout: Duration,
) -> Option<ringkv_common::protocol::WriteTimings> {
    let Some(Conn::Ringkv(client)) = conns.first() else {
        return None;
    };
    match client.call_timeout(Request::Status, timeout).await {
        Ok(Response::Status(status)) => Some(status.writes),
        _ => None,
    }
}

/// The measured window: operations count if they start at or after `start` and finish by `end`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

/// One connection to the system under test.
#[derive(Clone)]
enum Conn {
    Ringkv(Client),
    Redis(RedisClient),
}

/// How one operation ended: a read's hit or miss, a write, or an error class.
enum Outcome {
    Read { hit: bool },
    Write,
    Failed(&'static str),
}

impl Conn {
    async fn get(&self, key: Bytes, timeout: Duration) -> Outcome {
        match self {
            Conn::Ringkv(client) => {
                match client.call_timeout(Request::Get { key }, timeout).await {
                    Ok(Response::Value { value, .. }) => Outcome::Read {
                        hit: value.is_some(),
                    },
                    Ok(_) => Outcome::Failed("unexpected_answer"),
                    Err(e) => Outcome::Failed(e.class()),
                }
            }
            Conn::Redis(client) => match client.get(&key, timeout).await {
                Ok(value) => Outcome::Read {
                    hit: value.is_some(),
                },
                Err(e) => Outcome::Failed(e.class()),
            },
        }
    }

    async fn put(&self, key: Bytes, value: Bytes, timeout: Duration) -> Outcome {
        match self {
            Conn::Ringkv(client) => {
                match client
                    .call_timeout(Request::Put { key, value }, timeout)
                    .await
                {
                    Ok(Response::Written { .. }) => Outcome::Write,
                    Ok(_) => Outcome::Failed("unexpected_answer"),
                    Err(e) => Outcome::Failed(e.class()),
                }
            }
            Conn::Redis(client) => match client.set(&key, &value, timeout).await {
                Ok(()) => Outcome::Write,
                Err(e) => Outcome::Failed(e.class()),
            },
        }
    }
}

/// Open every connection at once.
async fn connect_all(
    args: &BenchArgs,
    addr: &str,
    timeout: Duration,
) -> Result<Vec<Conn>, BenchError> {
    let attempts = (0..args.connections).map(|_| async move {
        if args.redis.is_some() {
            RedisClient::connect(addr, timeout)
                .await
                .map(Conn::Redis)
                .map_err(|e: RedisError| e.to_string())
        } else {
            crate::commands::connect(addr, timeout)
                .await
                .map(Conn::Ringkv)
                .map_err(|e: CallError| e.to_string())
        }
    });
    futures::future::join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(BenchError::Connect)
}

/// Write every key once, spread over all connections.
async fn preload(
    conns: &[Conn],
    keys: u64,
    value: &Bytes,
    timeout: Duration,
) -> Result<Preload, BenchError> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let loaders = conns.iter().map(|conn| {
        let next = next.clone();
        async move {
            let mut failed = 0u64;
            let mut first: Option<&'static str> = None;
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < PRELOAD_PIPELINE {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        break;
                    }
                    in_flight.push(conn.put(workload::key(i), value.clone(), timeout));
                }
                match in_flight.next().await {
                    Some(Outcome::Failed(class)) => {
                        failed += 1;
                        first.get_or_insert(class);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            (failed, first)
        }
    });
    let results = futures::future::join_all(loaders).await;
    let failed: u64 = results.iter().map(|(n, _)| n).sum();
    if failed > 0 {
        let first = results
            .iter()
            .find_map(|(_, f)| *f)
            .unwrap_or("unknown")
            .to_string();
        return Err(BenchError::Preload {
            failed,
            keys,
            first,
        });
    }
    Ok(Preload {
        keys,
        secs: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    })
}

/// What one connection's driver needs.
struct Job {
    conn: Conn,
    generator: Generator,
    /// The key of each index: [`workload::key`], or [`workload::absent_key`] for `--no-preload`.
    key: fn(u64) -> Bytes,
    value: Bytes,
    pipeline: usize,
    window: Window,
    timeout: Duration,
}

/// Keep `pipeline` operations in flight on one connection until the window ends.
async fn drive(mut job: Job) -> Recorder {
    let mut recorder = Recorder::new();
    let conn = &job.conn;
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < job.pipeline && Instant::now() < job.window.end {
            let op = job.generator.next_op();
            let value = job.value.clone();
            let (key, timeout) = (job.key, job.timeout);
            in_flight.push(async move {
                let started = Instant::now();
                let outcome = match op {
                    Op::Get(i) => conn.get(key(i), timeout).await,
                    Op::Put(i) => conn.put(key(i), value, timeout).await,
                };
                (started, Instant::now(), outcome)
            });
        }
        let Some((started, finished, outcome)) = in_flight.next().await else {
            break;
        };
        if started < job.window.start || finished > job.window.end {
            continue;
        }
        let latency = finished.saturating_duration_since(started);
        match outcome {
            Outcome::Read { hit } => recorder.read(latency, hit),
            Outcome::Write => recorder.write(latency),
            Outcome::Failed(class) => recorder.error(class),
        }
    }
    recorder
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(words: &[&str]) -> Result<BenchArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("bench").chain(words.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn flags_parse_with_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.workload, Workload::Get);
        assert_eq!((a.connections, a.pipeline, a.value_size), (50, 1, 100));
        assert_eq!(a.warmup, Duration::from_secs(1));
        assert!(!a.no_preload);
        assert!(a.check().is_ok());
        assert!(parse(&["--no-preload"]).unwrap().no_preload);
        let a = parse(&[
            "--workload",
            "mixed:0.9",
            "--pipeline",
            "16",
            "--warmup",
            "0",
            "--duration",
            "2s",
            "--redis",
            "127.0.0.1:6379",
        ])
        .unwrap();
        assert_eq!(a.workload, Workload::Mixed { read_ratio: 0.9 });
        assert_eq!(a.warmup, Duration::ZERO);
        assert_eq!(a.target_name(), "redis");
        assert!(parse(&["--workload", "scan"]).is_err());
        assert!(parse(&["--duration", "0s"]).is_err());
    }

    #[test]
    fn out_of_range_flags_are_refused() {
        for bad in [
            &["--keys", "0"][..],
            &["--pipeline", "0"],
            &["--pipeline", "5000"],
            &["--connections", "0"],
            &["--value-size", "20000000"],
            &["--threads", "0"],
        ] {
            let a = parse(bad).unwrap();
            assert!(a.check().is_err(), "{bad:?}");
        }
    }

    /// Against a port nobody listens on, the run fails to connect instead of reporting zeros.
    #[tokio::test]
    async fn unreachable_target_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let mut args = parse(&["--connections", "2", "--duration", "1s"]).unwrap();
        args.redis = Some(addr.clone());
        let err = run(&args, &addr, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.class(), "connect");
        args.redis = None;
        let err = run(&args, &addr, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.class(), "connect");
    }
}
