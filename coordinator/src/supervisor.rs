//! Spawning, signalling and stopping the storage-node processes the coordinator owns.
//!
//! Children run in their own process group with stdout and stderr going to `node.log` in
//! their data directory, so a coordinator that dies (even by SIGKILL, even from a terminal's
//! ctrl-c) takes no node with it: no broken pipe, no group signal. A watcher task per child
//! reports its exit at once, so an exited child is `down` without waiting for the detector.

use ringkv_common::sync::MutexExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringkv_common::NodeId;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long a node gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Flags passed through to every spawned node.
#[derive(Clone, Debug)]
pub struct NodeLaunch {
    /// The `ringkv-node` executable.
    pub binary: PathBuf,
    /// Extra arguments (`--fsync`, `--heartbeat-interval`, ...).
    pub args: Vec<String>,
}

impl NodeLaunch {
    /// The `ringkv-node` next to the running executable, else the one on `PATH`.
    pub fn default_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("ringkv-node")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("ringkv-node"))
    }
}

/// The spawner and keeper of child nodes.
pub struct Supervisor {
    launch: NodeLaunch,
    coordinator_addr: String,
    /// Passed to every node spawned ([`ringkv_common::cluster_token::ENV`]).
    cluster_token: String,
    /// Pids of children this process spawned and has not yet seen exit.
    children: Mutex<HashMap<NodeId, u32>>,
    exits: mpsc::UnboundedSender<NodeId>,
    stopping: AtomicBool,
    tracker: TaskTracker,
}

impl Supervisor {
    /// A supervisor whose children register with `coordinator_addr`; child exits are
    /// reported on `exits`.
    pub fn new(
        launch: NodeLaunch,
        coordinator_addr: String,
        exits: mpsc::UnboundedSender<NodeId>,
        cluster_token: String,
    ) -> Supervisor {
        Supervisor {
            launch,
            coordinator_addr,
            cluster_token,
            children: Mutex::new(HashMap::new()),
            exits,
            stopping: AtomicBool::new(false),
            tracker: TaskTracker::new(),
        }
    }

    /// Start node `id` on `data_dir`. Returns its pid.
    pub fn spawn(&self, id: NodeId, data_dir: &Path) -> std::io::Result<u32> {
        std::fs::create_dir_all(data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("node.log"))?;
        let mut cmd = Command::new(&self.launch.binary);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--coordinator")
            .arg(&self.coordinator_addr)
            .arg("--id")
            .arg(id.to_string())
            .args(&self.launch.args)
            // In the environment, not on the command line, which every user can read.
            .env(ringkv_common::cluster_token::ENV, &self.cluster_token)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(false)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", self.launch.binary.display()),
            )
        })?;
        let pid = child.id().unwrap_or(0);
        self.lock().insert(id, pid);
        info!(node = %id, pid, dir = %data_dir.display(), "spawned node");
        let exits = self.exits.clone();
        self.tracker.spawn(async move {
            let status = child.wait().await;
            info!(node = %id, ?status, "node process exited");
            let _ = exits.send(id);
        });
        Ok(pid)
    }

    /// Forget a child that exited (called by whoever receives from `exits`).
    pub fn reap(&self, id: NodeId) {
        self.lock().remove(&id);
    }

    /// Whether the coordinator is shutting down (child exits are then expected).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Send `signal` to process `pid`.
    pub fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// Whether `pid` is a live `ringkv-node` process (used to re-adopt nodes after a restart).
    pub fn is_node_process(pid: u32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let is_node = cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"ringkv-node"));
        // A zombie has an empty cmdline; a live node answers signal 0.
        is_node && Self::signal(pid, Signal::SIGCONT).is_ok()
    }

    /// Stop every child, and the `adopted` nodes (spawned by an earlier run of the
    /// coordinator, so not our children): SIGTERM, wait, then SIGKILL what is left.
    pub async fn stop_all(&self, adopted: &[(NodeId, u32)]) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut pids: Vec<(NodeId, u32)> = self.lock().iter().map(|(k, v)| (*k, *v)).collect();
        let children: Vec<u32> = pids.iter().map(|(_, p)| *p).collect();
        let adopted: Vec<(NodeId, u32)> = adopted
            .iter()
            .filter(|(_, pid)| !children.contains(pid) && Self::is_node_process(*pid))
            .copied()
            .collect();
        pids.extend(adopted.iter().copied());
        for (id, pid) in &pids {
            // A paused node cannot act on SIGTERM; wake it first.
            let _ = Self::signal(*pid, Signal::SIGCONT);
            if let Err(e) = Self::signal(*pid, Signal::SIGTERM) {
                warn!(node = %id, pid, error = %e, "SIGTERM failed");
            }
        }
        self.tracker.close();
        if tokio::time::timeout(STOP_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            for (id, pid) in self.lock().iter() {
                warn!(node = %id, pid, "node did not stop in time; killing it");
                let _ = Self::signal(*pid, Signal::SIGKILL);
            }
            self.tracker.wait().await;
        }
        // Adopted nodes cannot be waited for; poll until they are gone.
        let deadline = std::time::Instant::now() + STOP_GRACE;
        for (id, pid) in adopted {
            while Self::is_node_process(pid) {
                if std::time::Instant::now() > deadline {
                    warn!(node = %id, pid, "adopted node did not stop in time; killing it");
                    let _ = Self::signal(pid, Signal::SIGKILL);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, u32>> {
        self.children.lock_unpoisoned()
    }
}
