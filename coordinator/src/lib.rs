//! `ringkv-coordinator`: owns the ring and the metadata, supervises the storage nodes, and
//! serves clients.
//!
//! # Layout
//! - [`config`]: flags turned into a [`CoordinatorConfig`].
//! - [`metadata`]: the metadata (keys, registry, version lease): in memory, persisted in an append-only journal.
//! - [`ring_state`]: membership (node states, stats, connections) and the ring.
//! - [`failure_detector`]: heartbeats to `up` / `suspect` / `down`, as pure logic.
//! - [`supervisor`]: spawning, signalling and stopping node processes.
//! - [`replication`]: the data path (quorum writes, version-checked reads, key copies).
//! - [`repair`]: background convergence (re-replication, migration, reconciliation).
//! - [`throttle`]: the token bucket for background transfers.
//! - [`tombstones`]: collecting deleted keys under the version floor.
//! - [`membership_ops`]: registration, transitions, node add/remove/signal, start-up.
//! - [`audit`]: `status` and `check`.
//! - [`server`]: routing requests to the above.
//! - [`state`]: the shared [`Coordinator`] value.

pub mod audit;
pub mod config;
pub mod failure_detector;
pub mod key_locks;
pub mod membership_ops;
pub mod metadata;
pub mod repair;
pub mod replication;
pub mod ring_state;
pub mod server;
pub mod state;
pub mod supervisor;
pub mod throttle;
pub mod tombstones;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::CoordinatorConfig;
pub use state::{Coordinator, ReadyGate, RecoveryGate};

use crate::key_locks::KeyLocks;
use crate::metadata::Metadata;
use crate::repair::RepairQueue;
use crate::replication::WriteClock;
use crate::ring_state::Membership;
use crate::supervisor::Supervisor;

/// How often a decommission resumed at start asks again while reads wait for the node.
const RESUMED_DECOMMISSION_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Run a coordinator on `listener` until `shutdown`. `on_ready` is called once clients are
/// being served and the spawned nodes have registered (or the start-up timeout passed).
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    anyhow::ensure!(config.rf >= 1, "--rf must be at least 1");
    anyhow::ensure!(
        (1..=config.rf).contains(&config.write_quorum),
        "--write-quorum must be between 1 and --rf"
    );
    let addr = listener.local_addr()?;
    // Held until this function returns: a second coordinator on the same directory would
    // interleave its journal writes with ours.
    let _lock = ringkv_common::dir_lock::lock_dir(&config.data_dir)?;
    let cluster_token = ringkv_common::cluster_token::load_or_create(&config.data_dir)
        .with_context(|| format!("the cluster token in {}", config.data_dir.display()))?;
    let dir = config.data_dir.clone();
    let meta_fsync = config.meta_fsync;
    let write_quorum = u8::try_from(config.write_quorum).unwrap_or(u8::MAX);
    let (meta, records) = tokio::task::spawn_blocking(move || {
        Metadata::open_with(
            &dir,
            metadata::MetaOptions {
                fsync: meta_fsync,
                write_quorum,
                ..Default::default()
            },
        )
    })
    .await?
    .with_context(|| format!("opening metadata in {}", config.data_dir.display()))?;
    let members = Membership::new(
        records,
        config.vnodes,
        config.node_batching,
        config.max_frame_len,
        cluster_token.clone(),
    );
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(
        config.launch.clone(),
        addr.to_string(),
        exit_tx,
        cluster_token,
    );
    let reads = RecoveryGate::new(meta.read_gate());
    let coord = Arc::new(Coordinator {
        reads,
        config,
        meta,
        members,
        supervisor,
        locks: KeyLocks::default(),
        repairs: RepairQueue::default(),
        shutdown: shutdown.clone(),
        ready: ReadyGate::default(),
        tasks: TaskTracker::new(),
        write_clock: WriteClock::default(),
        collection: tombstones::Collection::default(),
    });
    if coord.meta.may_lack_changes() {
        // Deleted keys wait until every node has given back what the journal may have lost.
        coord
            .owe_reconciliations()
            .await
            .context("recording the reconciliations owed")?;
    }
    coord.refresh_read_gate();

    let loops = TaskTracker::new();
    let serve_stop = CancellationToken::new();
    loops.spawn(ringkv_common::server::serve(
        listener,
        coord.clone(),
        coord.config.max_frame_len,
        serve_stop.clone(),
    ));
    {
        let coord = coord.clone();
        loops.spawn(async move {
            while let Some(id) = exit_rx.recv().await {
                coord.on_child_exit(id);
            }
        });
    }
    loops.spawn(membership_ops::run_detector(coord.clone()));
    loops.spawn(repair::run_worker(coord.clone()));
    loops.spawn(repair::run_sweeper(coord.clone()));
    loops.spawn(tombstones::run_collector(
        coord.clone(),
        coord.config.collect_tombstones_every,
        coord.config.node_timeout,
    ));

    let expected = coord.start_nodes().await?;
    let deadline = Instant::now() + coord.config.startup_timeout;
    while !expected.iter().all(|id| coord.members.is_registered(*id)) {
        if Instant::now() > deadline {
            warn!("not every node registered in time; serving anyway");
            break;
        }
        if shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if coord.meta.may_lack_changes() {
        // Changes may be missing from the journal: learn them from the nodes before a client
        // can read a key whose newest version the metadata no longer knows about.
        // Every registered node counts, spawned or joined by hand; a scan that fails is
        // retried a few times. Client requests meanwhile wait, then get `unavailable`.
        warn!("metadata may lack recent changes; reconciling every node before serving clients");
        use ringkv_common::NodeState;
        let mut nodes: Vec<_> = [NodeState::Up, NodeState::Suspect, NodeState::Leaving]
            .into_iter()
            .flat_map(|s| coord.members.in_state(s))
            .filter(|id| coord.members.is_registered(*id))
            .collect();
        for attempt in 1..=5 {
            let scans = nodes.iter().map(|id| {
                let coord = coord.clone();
                let id = *id;
                async move { (id, coord.reconcile_node(id).await) }
            });
            nodes = futures::future::join_all(scans)
                .await
                .into_iter()
                .filter_map(|(id, done)| (!done).then_some(id))
                .collect();
            if nodes.is_empty() || shutdown.is_cancelled() {
                break;
            }
            warn!(
                ?nodes,
                attempt, "could not reconcile some nodes; trying again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        if !nodes.is_empty() {
            warn!(?nodes, "serving without having reconciled these nodes");
        }
        if coord.reads.is_closed() {
            warn!(
                "reads wait until the nodes that may hold acknowledged writes the journal lost \
                 are reconciled (a stop under --meta-fsync never)"
            );
        }
    }
    info!(%addr, nodes = expected.len(), "coordinator ready");
    coord.ready.open();
    on_ready(addr);

    // Resume decommissions a previous run did not finish. Never accepting a loss: one the
    // reads now wait for (this start was unclean) waits for its reconciliation, or for the
    // operator to ask again with --accept-loss.
    for id in coord.members.in_state(ringkv_common::NodeState::Leaving) {
        let this = coord.clone();
        coord.background(async move {
            info!(node = %id, "resuming decommission");
            let mut told = false;
            loop {
                match this.remove_node(id, false).await {
                    Ok(_) => break,
                    Err(_) if this.reads_wait_for(id) => {
                        if !std::mem::replace(&mut told, true) {
                            info!(node = %id, "the decommission waits for the node's reconciliation");
                        }
                        tokio::select! {
                            () = this.shutdown.cancelled() => break,
                            () = tokio::time::sleep(RESUMED_DECOMMISSION_RETRY) => {}
                        }
                    }
                    Err(e) => {
                        warn!(node = %id, error = %e, "decommission did not finish");
                        break;
                    }
                }
            }
        });
    }

    shutdown.cancelled().await;
    info!("shutting down: stopping nodes");
    serve_stop.cancel();
    let spawned: Vec<_> = coord
        .members
        .records()
        .into_iter()
        .filter(|r| r.spawned && !r.removed)
        .filter_map(|r| r.pid.map(|pid| (r.id, pid)))
        .collect();
    coord.supervisor.stop_all(&spawned).await;
    coord.tasks.close();
    coord.tasks.wait().await;
    loops.close();
    // The exit watcher ends when the supervisor (its sender) is dropped, which happens with
    // the coordinator; do not wait for it here.
    let meta_coord = coord.clone();
    tokio::task::spawn_blocking(move || meta_coord.meta.close()).await?;
    info!("coordinator stopped");
    Ok(())
}
