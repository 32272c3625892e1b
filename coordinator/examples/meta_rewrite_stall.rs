//! How long metadata commits wait while the journal is rewritten.
//!
//! Loads `--keys` keys (under `--meta-fsync never`), then runs `--writers` tasks that overwrite
//! random keys for `--seconds`, timing every commit. Once the journal has doubled (and is over
//! 32 MiB) it is rewritten as a snapshot; the slowest commits show whether they waited for
//! that. Prints the commit count, the latency percentiles and the slowest commit.
//!
//!     cargo run --release -p ringkv-coordinator --example meta_rewrite_stall -- --keys 1000000 --seconds 20

mod common;
use common::arg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_common::{NodeId, Version};
use ringkv_coordinator::metadata::{KeyMeta, KeyUpdate, MetaFsync, MetaOptions, Metadata};

fn update(key: u64, version: u64) -> Vec<(Bytes, KeyUpdate)> {
    let meta = KeyMeta {
        version: Version(version),
        replicas: smallvec::smallvec![NodeId(1), NodeId(2), NodeId(3)],
        tombstone: false,
    };
    vec![(Bytes::from(format!("key-{key:012}")), KeyUpdate::Set(meta))]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (keys, writers, seconds) = (
        arg("--keys", 1_000_000),
        arg("--writers", 32),
        arg("--seconds", 20),
    );
    let dir = tempfile::tempdir()?;
    let options = MetaOptions {
        fsync: MetaFsync::Never,
        ..MetaOptions::default()
    };
    let (meta, _) = Metadata::open_with(dir.path(), options)?;
    let meta = Arc::new(meta);
    let load = Instant::now();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk.iter().flat_map(|&k| update(k, k + 1)).collect();
        meta.update(batch).await?;
    }
    println!(
        "loaded {keys} keys in {:.1} s",
        load.elapsed().as_secs_f64()
    );
    let next = Arc::new(std::sync::atomic::AtomicU64::new(keys + 1));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (meta, next) = (meta.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let version = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let start = Instant::now();
                    if meta.update(update(x % keys, version)).await.is_err() {
                        break;
                    }
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_unstable();
    let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)));
    println!(
        "{} commits in {seconds} s; p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        all.len(),
        at(0.5).copied().unwrap_or_default(),
        at(0.99).copied().unwrap_or_default(),
        at(0.999).copied().unwrap_or_default(),
        all.last().copied().unwrap_or_default()
    );
    println!(
        "journal {} bytes at the end",
        std::fs::metadata(dir.path().join("meta.log"))?.len()
    );
    meta.close();
    Ok(())
}
