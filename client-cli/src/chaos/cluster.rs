//! The cluster a chaos run works on: one it started itself, or one it attached to.
//!
//! A started cluster is a `ringkv-coordinator` child (which spawns the storage nodes) on
//! `127.0.0.1:0` and a data directory of the run's own. The run may kill the coordinator with
//! SIGKILL and start it again on the same address and directory, and restart a killed node by
//! hand on its own data directory (`<coordinator data>/nodes/node-ID`). The coordinator's
//! stderr goes to `coordinator.log` in the run's directory.
//!
//! Invariant: when an [`OwnedCluster`] is dropped, every process it started is gone: the
//! coordinator, the nodes it started by hand, and every `ringkv-node` or `ringkv-coordinator`
//! whose command line mentions the run's directory (the coordinator's children, including
//! those a killed coordinator left behind).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringkv_common::NodeId;

use super::ChaosError;

/// How long a starting coordinator gets to print `listening on ADDR`: it waits for its nodes
/// to register first, which takes a few seconds on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts at restarting the coordinator on its old address (the port may be briefly busy).
const RESTART_ATTEMPTS: u32 = 5;

/// Lines of the coordinator log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `ringkv-coordinator` executable.
    pub coordinator_bin: PathBuf,
    /// The `ringkv-node` executable, for restarting killed nodes by hand.
    pub node_bin: PathBuf,
    /// The run's directory: `cluster/` (the coordinator's data) and `coordinator.log` go here.
    pub dir: PathBuf,
    /// Storage nodes the coordinator spawns.
    pub nodes: usize,
    /// Heartbeat interval for nodes started by hand (the coordinator's is passed in `args`).
    pub heartbeat_interval: Duration,
    /// Extra coordinator flags.
    pub args: Vec<String>,
    /// Extra environment variables of the coordinator (and so of its nodes).
    pub env: Vec<(String, String)>,
}

impl ClusterSpec {
    /// The coordinator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// The coordinator's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("coordinator.log")
    }

    /// The data directory of node `id`, as the coordinator lays it out.
    pub fn node_dir(&self, id: NodeId) -> PathBuf {
        self.data_dir().join("nodes").join(format!("node-{id}"))
    }
}

/// A cluster this run started and owns.
pub struct OwnedCluster {
    spec: ClusterSpec,
    addr: String,
    coordinator: Option<Child>,
    /// Nodes restarted by hand, which are this process's children.
    hand_nodes: Vec<Child>,
}

impl OwnedCluster {
    /// Start a coordinator on `127.0.0.1:0` and wait until it is ready.
    pub async fn start(spec: ClusterSpec) -> Result<OwnedCluster, ChaosError> {
        std::fs::create_dir_all(spec.data_dir()).map_err(|source| ChaosError::Io {
            what: format!("creating {}", spec.data_dir().display()),
            source,
        })?;
        let mut cluster = OwnedCluster {
            spec,
            addr: String::new(),
            coordinator: None,
            hand_nodes: Vec::new(),
        };
        cluster.addr = cluster.launch("127.0.0.1:0").await?;
        Ok(cluster)
    }

    /// The coordinator's address (the same across restarts).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How this cluster was started.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Whether the coordinator process is running (as far as this process knows).
    pub fn coordinator_running(&mut self) -> bool {
        match self.coordinator.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kill the coordinator with SIGKILL and reap it; its nodes keep running.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the coordinator again on the same address and data directory.
    pub async fn restart_coordinator(&mut self) -> Result<(), ChaosError> {
        self.kill_coordinator();
        let addr = self.addr.clone();
        let mut last = None;
        for attempt in 0..RESTART_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match self.launch(&addr).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ChaosError::NotReady("no attempt made".into())))
    }

    /// Start node `id` again by hand on its own data directory; returns its pid.
    ///
    /// If a process already runs on that directory (the coordinator may have respawned it),
    /// that one is left alone and its pid returned: two nodes on one log would corrupt it.
    pub fn restart_node(&mut self, id: NodeId) -> Result<u32, ChaosError> {
        self.reap();
        let dir = self.spec.node_dir(id);
        // The argument ends at a NUL in /proc/PID/cmdline, so `node-1` does not match `node-10`.
        let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
        needle.push(0);
        if let Some(pid) = ringkv_processes_with(&needle).first().copied() {
            return Ok(pid);
        }
        if !dir.is_dir() {
            return Err(ChaosError::Io {
                what: format!("node {id} has no data directory at {}", dir.display()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let log = open_append(&dir.join("node.log"))?;
        let log_err = log.try_clone().map_err(|source| ChaosError::Io {
            what: "duplicating the node log handle".into(),
            source,
        })?;
        // The coordinator refuses a node without its token.
        let token =
            ringkv_common::cluster_token::read(&self.spec.data_dir()).map_err(|source| {
                ChaosError::Io {
                    what: format!(
                        "reading the cluster token in {}",
                        self.spec.data_dir().display()
                    ),
                    source,
                }
            })?;
        let mut cmd = Command::new(&self.spec.node_bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--coordinator")
            .arg(&self.addr)
            .arg("--id")
            .arg(id.to_string())
            .arg("--heartbeat-interval")
            .arg(ringkv_common::duration_arg(self.spec.heartbeat_interval))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .env("NO_COLOR", "1");
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        cmd.env(ringkv_common::cluster_token::ENV, token);
        detach_from_terminal(&mut cmd);
        let child = cmd.spawn().map_err(|source| ChaosError::Spawn {
            what: self.spec.node_bin.display().to_string(),
            source,
        })?;
        let pid = child.id();
        self.hand_nodes.push(child);
        Ok(pid)
    }

    /// Reap hand-started nodes that exited (killed ones), so they leave no zombies.
    pub fn reap(&mut self) {
        self.hand_nodes
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }

    /// The last lines of the coordinator log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.spec.log_path(), LOG_TAIL_LINES)
    }

    /// Kill everything this cluster started (see the module invariant).
    pub fn shutdown(&mut self) {
        self.kill_coordinator();
        for child in &mut self.hand_nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.hand_nodes.clear();
        // Nodes the coordinator spawned are not our children, and a killed coordinator's
        // nodes outlive it: find them by the directory on their command line.
        for pid in ringkv_processes_mentioning(&self.spec.dir) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Spawn the coordinator listening on `listen` and wait for its `listening on ADDR` line.
    async fn launch(&mut self, listen: &str) -> Result<String, ChaosError> {
        let log = open_append(&self.spec.log_path())?;
        let mut cmd = Command::new(&self.spec.coordinator_bin);
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.spec.data_dir())
            .arg("--nodes")
            .arg(self.spec.nodes.to_string())
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // A log file, not a terminal: no colour codes.
            .env("NO_COLOR", "1");
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        detach_from_terminal(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| ChaosError::Spawn {
            what: self.spec.coordinator_bin.display().to_string(),
            source,
        })?;
        let stdout = child.stdout.take();
        self.coordinator = Some(child);
        let Some(stdout) = stdout else {
            return Err(ChaosError::NotReady("no stdout pipe".into()));
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the coordinator never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => {
                self.kill_coordinator();
                return Err(ChaosError::NotReady(format!(
                    "the coordinator exited before it was ready; its log ends with:\n{}",
                    self.log_tail()
                )));
            }
            Err(_) => {
                self.kill_coordinator();
                return Err(ChaosError::NotReady(format!(
                    "no `listening on` line within {READY_TIMEOUT:?}; the log ends with:\n{}",
                    self.log_tail()
                )));
            }
        };
        match line.strip_prefix("listening on ") {
            Some(addr) => Ok(addr.trim().to_string()),
            None => {
                self.kill_coordinator();
                Err(ChaosError::NotReady(format!(
                    "unexpected first line from the coordinator: {line:?}"
                )))
            }
        }
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Put a child in its own process group, so a ctrl-c meant for `ringkv chaos` reaches only
/// it, and it cleans up in order.
fn detach_from_terminal(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, ChaosError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ChaosError::Io {
            what: format!("opening {}", path.display()),
            source,
        })
}

/// The last `n` lines of the file at `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Pids of live `ringkv-node` and `ringkv-coordinator` processes, other than this one, whose
/// command line contains `path`.
pub fn ringkv_processes_mentioning(path: &Path) -> Vec<u32> {
    ringkv_processes_with(path.as_os_str().as_encoded_bytes())
}

/// Pids of live `ringkv-node` and `ringkv-coordinator` processes, other than this one, whose
/// NUL-separated command line contains `needle`.
fn ringkv_processes_with(needle: &[u8]) -> Vec<u32> {
    ringkv_common::process::pids_where(|cmdline| {
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let ours = argv0.ends_with(b"ringkv-node") || argv0.ends_with(b"ringkv-coordinator");
        ours && ringkv_common::process::contains(cmdline, needle)
    })
}

/// Send SIGCONT to `pid` (a paused node that the coordinator could not resume).
pub fn resume_process(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
    }
}

/// Whether `pid` is a live (not zombie) `ringkv-node` process on this machine.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"ringkv-node"))
    })
}
