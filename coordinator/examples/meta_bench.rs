//! Metadata journal throughput with and without group commit.
//!
//! Runs `--writers` concurrent tasks, each committing single-key updates back to back for
//! `--seconds`, first with group commit off (one journal write and one fsync per update) and then
//! on (the writer thread folds whatever is queued into one write and one fsync). Prints updates per
//! second and the mean batch size.
//!
//!     cargo run --release -p ringkv-coordinator --example meta_bench -- --writers 64 --seconds 5

mod common;
use common::arg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_common::NodeId;
use ringkv_coordinator::metadata::{KeyMeta, KeyUpdate, MetaOptions, Metadata};

async fn run(max_group: usize, writers: u64, seconds: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let (meta, _) = Metadata::open_with(
        dir.path(),
        MetaOptions {
            max_group,
            ..Default::default()
        },
    )?;
    let meta = Arc::new(meta);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let meta = meta.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let key = Bytes::from(format!("w{w}-k{}", i % 1000));
                let ticket = meta.next_version().await?;
                let update = KeyUpdate::Set(KeyMeta {
                    version: ticket.version(),
                    replicas: smallvec::smallvec![NodeId(1), NodeId(2), NodeId(3)],
                    tombstone: false,
                });
                meta.update(vec![(key, update)]).await?;
                drop(ticket);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / seconds as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let writers = arg("--writers", 64);
    let seconds = arg("--seconds", 5);
    let single = run(1, writers, seconds).await?;
    let grouped = run(4096, writers, seconds).await?;
    println!(
        "metadata commits, {writers} concurrent writers, {seconds} s each, fsync on every commit"
    );
    println!("{:<28} {:>12}", "mode", "updates/s");
    println!("{:<28} {:>12.0}", "one write per update", single);
    println!("{:<28} {:>12.0}", "group commit", grouped);
    println!("speed-up: {:.1}x", grouped / single.max(1.0));
    Ok(())
}
