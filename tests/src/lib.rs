//! Test harness: runs the real RingKV binaries as processes in temporary directories.
//!
//! A [`Cluster`] owns a coordinator process (which spawns its storage nodes) and the
//! temporary directory under which all their data lives. Readiness comes from the
//! coordinator's `listening on ADDR` line; everything else waits on conditions with deadlines.
//! Dropping a `Cluster` kills the coordinator and every process whose command line mentions
//! its directory, so no test leaks nodes, whether it passes or panics.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringkv_common::client::Client;
use ringkv_common::protocol::{Role, DEFAULT_MAX_FRAME_LEN};
use serde_json::Value;

/// Where cargo put the binaries of this build (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Test executables live in target/<profile>/deps.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .to_path_buf();
        ensure_built(&dir);
        dir
    })
    .clone()
}

/// Build the three binaries, with failpoints compiled in (a no-op when up to date).
fn ensure_built(dir: &Path) {
    let names = ["ringkv-coordinator", "ringkv-node", "ringkv"];
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "--workspace"]);
    if profile_release {
        cmd.arg("--release");
    }
    // Failpoints are inert unless a test arms them through the FAILPOINTS environment
    // variable of the process it starts, so every test shares one build.
    cmd.args([
        "--features",
        "ringkv-coordinator/failpoints,ringkv-node/failpoints",
    ]);
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --bins failed");
    for n in names {
        assert!(dir.join(n).exists(), "{} missing after build", n);
    }
}

/// Wait until `cond` returns `Some`, polling every 50 ms, or fail after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Options for starting a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 5,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running coordinator and its nodes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    coordinator: Option<Child>,
    /// How the coordinator is started; change `env` or `extra_args` before a restart.
    pub opts: Options,
}

impl Cluster {
    /// Start a coordinator with `nodes` nodes and default settings.
    pub fn start(nodes: usize) -> Cluster {
        Cluster::start_with(Options {
            nodes,
            ..Options::default()
        })
    }

    /// Start a coordinator with `opts` on a fresh temporary directory.
    pub fn start_with(opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ringkv-test-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = Cluster {
            dir,
            addr: String::new(),
            coordinator: None,
            opts,
        };
        cluster
            .launch("127.0.0.1:0")
            .expect("coordinator should start");
        cluster
    }

    /// The coordinator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn launch(&mut self, listen: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))?;
        let mut cmd = Command::new(bin_dir().join("ringkv-coordinator"));
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--nodes")
            .arg(self.opts.nodes.to_string())
            .args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawn coordinator")?;
        let stdout = child.stdout.take().context("coordinator stdout")?;
        self.coordinator = Some(child);
        let line = first_line(stdout, Duration::from_secs(60))
            .ok_or_else(|| anyhow::anyhow!("no readiness line; log:\n{}", self.log_tail()))?;
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?;
        self.addr = addr.trim().to_string();
        Ok(())
    }

    /// The last lines of the coordinator's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("coordinator.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The coordinator's pid.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(|c| c.id())
    }

    /// Stop the coordinator with SIGTERM and wait for it (it stops its nodes first).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.coordinator.take().expect("coordinator running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        wait_child(&mut child, Duration::from_secs(30)).expect("coordinator stops on SIGTERM")
    }

    /// Kill the coordinator with SIGKILL (its nodes keep running).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait for the coordinator to exit by itself (e.g. an armed crash failpoint).
    pub fn wait_coordinator_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.coordinator.take().expect("coordinator running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.coordinator = Some(child);
                panic!(
                    "coordinator still running after {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start a `ringkv-node` by hand on `data_dir`, joined to this coordinator (with its
    /// cluster token).
    pub fn start_node(&self, data_dir: &Path, env: &[(&str, &str)]) -> NodeProcess {
        let token = self.cluster_token();
        let mut env = env.to_vec();
        env.push((ringkv_common::cluster_token::ENV, &token));
        NodeProcess::start(data_dir, Some(&self.addr), &[], &env)
    }

    /// The coordinator's cluster token, which its nodes present.
    pub fn cluster_token(&self) -> String {
        ringkv_common::cluster_token::read(&self.data_dir()).expect("the cluster token")
    }

    /// Start the coordinator again on the same directory and address.
    pub fn restart(&mut self) {
        assert!(
            self.coordinator.is_none(),
            "stop or kill the coordinator first"
        );
        let addr = self.addr.clone();
        self.launch(&addr).expect("coordinator restarts");
    }

    /// Run `ringkv --coordinator ADDR ARGS...`.
    pub fn ringkv(&self, args: &[&str]) -> Output {
        self.ringkv_stdin(args, None)
    }

    /// Run `ringkv --coordinator ADDR ARGS...`; fail the test if it runs longer than
    /// `timeout` (for a command that would otherwise hang until its own, long, timeout).
    pub fn ringkv_within(&self, args: &[&str], timeout: Duration) -> Output {
        self.ringkv_stdin_within(args, None, timeout)
    }

    /// Run `ringkv` with `stdin` as its standard input.
    pub fn ringkv_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.ringkv_stdin_within(args, stdin, RINGKV_DEADLINE)
    }

    fn ringkv_stdin_within(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Output {
        let mut child = Command::new(bin_dir().join("ringkv"))
            .arg("--coordinator")
            .arg(&self.addr)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringkv");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write stdin");
        }
        output_within(child, timeout)
    }

    /// Run `ringkv --json ARGS...`, require success, parse the JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        self.json_within(args, RINGKV_DEADLINE)
    }

    /// As [`json`](Self::json), failing the test if it runs longer than `timeout`.
    pub fn json_within(&self, args: &[&str], timeout: Duration) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ringkv_within(&full, timeout);
        assert!(
            out.status.success(),
            "ringkv {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ringkv {args:?} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// Send `sig` to each of the nodes `ids` (their pids per `status`), every one stopped
    /// with SIGSTOP first so that none serves a copy after another is gone; their pids.
    pub fn signal_nodes_at_once(&self, ids: &[u64], sig: Signal) -> Vec<u32> {
        let status = self.status();
        let pids: Vec<u32> = ids
            .iter()
            .map(|id| node_pid(&status, *id).unwrap_or_else(|| panic!("no pid for node {id}")))
            .collect();
        for pid in &pids {
            signal(*pid, Signal::SIGSTOP);
        }
        if sig != Signal::SIGSTOP {
            for pid in &pids {
                signal(*pid, sig);
            }
        }
        pids
    }

    /// Wait until each of the nodes `ids` is in `state` per `status`.
    pub fn wait_nodes_in_state(&self, ids: &[u64], state: &str, timeout: Duration) {
        wait_for(&format!("nodes {ids:?} {state}"), timeout, || {
            ids.iter()
                .all(|id| self.node_state(*id).as_deref() == Some(state))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.status(), self.log_tail()));
    }

    /// The state of node `id` per `status`.
    pub fn node_state(&self, id: u64) -> Option<String> {
        self.status()["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["state"].as_str().map(str::to_string))
    }

    /// Wait until node `id` is in `state`.
    pub fn wait_state(&self, id: u64, state: &str, timeout: Duration) {
        wait_for(&format!("node {id} to be {state}"), timeout, || {
            (self.node_state(id).as_deref() == Some(state)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
    }

    /// Wait until `check` reports every key healthy; returns the report.
    pub fn wait_healthy(&self, timeout: Duration) -> Value {
        wait_for("check to be healthy", timeout, || {
            let out = self.ringkv(&["--json", "check"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            out.status.success().then_some(v)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// Replica node ids of `key` per `locate`.
    pub fn replicas(&self, key: &str) -> Vec<u64> {
        self.json(&["locate", key])["replicas"]
            .as_array()
            .expect("locate lists replicas")
            .iter()
            .filter_map(|r| r["node"].as_u64())
            .collect()
    }

    /// Wait until every key is healthy and on its preference list, with no job running.
    pub fn wait_settled(&self, timeout: Duration) -> Value {
        let mut last = (Value::Null, Value::Null);
        wait_for("the cluster to settle", timeout, || {
            let out = self.ringkv(&["--json", "check"]);
            let report: Value = serde_json::from_slice(&out.stdout).ok()?;
            last.0 = report.clone();
            if !out.status.success() {
                return None;
            }
            let status = self.status();
            last.1 = status.clone();
            let idle = status["jobs"].as_array().is_some_and(|j| j.is_empty());
            (status["misplaced"] == 0 && idle).then_some(report)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nlast check: {}\nlast status: {}\n{}",
                last.0,
                last.1,
                self.log_tail()
            )
        })
    }

    /// A client-library connection to the coordinator.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr, Role::Client, DEFAULT_MAX_FRAME_LEN)
            .await
            .expect("connect to coordinator")
    }

    /// Pids of live processes whose command line mentions this cluster's directory.
    pub fn processes(&self) -> Vec<u32> {
        processes_mentioning(self.dir.path())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("--- coordinator log tail ---\n{}", self.log_tail());
        }
    }
}

/// The first line a child prints, if it prints one within `timeout`. The rest of its output
/// is drained, so the child never blocks on a full pipe.
fn first_line(stdout: ChildStdout, timeout: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    rx.recv_timeout(timeout).ok()
}

/// How long one `ringkv` command of a test may run before it is killed and the test fails.
const RINGKV_DEADLINE: Duration = Duration::from_secs(300);

/// The output of `child` (its stdout and stderr piped), once it exits; killed, and the test
/// failed, if it runs longer than `timeout`.
pub fn output_within(mut child: Child, timeout: Duration) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    }
    // Read both pipes while waiting, so that a full pipe cannot stall the child.
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let status = match wait_child(&mut child, timeout) {
        Ok(status) => status,
        Err(e) => {
            let _ = child.wait();
            panic!("{e}");
        }
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Wait for `child` to exit, polling against a deadline; kill it if it overruns.
pub fn wait_child(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of live processes (other than this one) whose command line contains `path`.
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.as_os_str().as_encoded_bytes();
    ringkv_common::process::pids_where(|cmdline| ringkv_common::process::contains(cmdline, needle))
}

/// The pid of node `id` per `status`.
pub fn node_pid(status: &Value, id: u64) -> Option<u32> {
    status["nodes"].as_array()?.iter().find(|n| n["id"] == id)?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// A background writer: puts `prefix-N` keys with unique values on its own connection and
/// records which writes were acknowledged, until stopped.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<tokio::task::JoinHandle<WriterLog>>,
}

/// What a [`Writer`] did.
#[derive(Default, Debug)]
pub struct WriterLog {
    /// Key -> last acknowledged value.
    pub acked: std::collections::BTreeMap<String, String>,
    /// Writes that failed without possibly applying.
    pub failed: u64,
    /// Writes whose outcome is unknown (may have applied): their key may hold either value.
    pub unknown: std::collections::BTreeMap<String, Vec<String>>,
}

impl Writer {
    /// Start writing to `keys` distinct keys round-robin on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, addr: &str, prefix: &str, keys: usize) -> Writer {
        use ringkv_common::protocol::{Request, Response};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acked_count = acked.clone();
        let addr = addr.to_string();
        let prefix = prefix.to_string();
        let handle = rt.spawn(async move {
            let mut log = WriterLog::default();
            let mut client: Option<Client> = None;
            let mut seq = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let c = match &client {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => match Client::connect(&addr, Role::Client, DEFAULT_MAX_FRAME_LEN).await {
                        Ok(c) => {
                            client = Some(c.clone());
                            c
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let key = format!("{prefix}-{}", seq % keys as u64);
                let value = format!("{prefix}-value-{seq}");
                seq += 1;
                let req = Request::Put {
                    key: bytes::Bytes::from(key.clone()),
                    value: bytes::Bytes::from(value.clone()),
                };
                match c.call_timeout(req, Duration::from_secs(10)).await {
                    Ok(Response::Written { .. }) => {
                        acked_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log.acked.insert(key.clone(), value);
                        log.unknown.remove(&key);
                    }
                    Ok(_) => log.failed += 1,
                    Err(e) if e.may_have_applied() => {
                        log.unknown.entry(key).or_default().push(value);
                    }
                    Err(_) => log.failed += 1,
                }
            }
            log
        });
        Writer {
            stop,
            acked,
            handle: Some(handle),
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until `n` more writes than now are acknowledged.
    pub fn wait_progress(&self, n: u64, timeout: Duration) {
        let target = self.acked() + n;
        wait_for(&format!("{n} more acknowledged writes"), timeout, || {
            (self.acked() >= target).then_some(())
        })
        .unwrap();
    }

    /// Stop and return the log.
    pub fn finish(mut self, rt: &tokio::runtime::Runtime) -> WriterLog {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let handle = self.handle.take().expect("writer running");
        rt.block_on(handle).expect("writer task")
    }
}

/// Read every key of `log` and assert it holds its last acknowledged value (or, if a later
/// write's outcome is unknown, one of those values).
pub fn assert_acked_readable(rt: &tokio::runtime::Runtime, addr: &str, log: &WriterLog) {
    use ringkv_common::protocol::{Request, Response};
    rt.block_on(async {
        let client = Client::connect(addr, Role::Client, DEFAULT_MAX_FRAME_LEN)
            .await
            .expect("connect");
        for (key, value) in &log.acked {
            let got = client
                .call(Request::Get {
                    key: bytes::Bytes::from(key.clone()),
                })
                .await;
            let got = match got {
                Ok(Response::Value { value: Some(v), .. }) => {
                    String::from_utf8_lossy(&v).to_string()
                }
                other => panic!("acknowledged key {key} unreadable: {other:?}"),
            };
            let allowed = log.unknown.get(key);
            assert!(
                got == *value || allowed.is_some_and(|a| a.contains(&got)),
                "key {key}: acknowledged {value:?}, read {got:?}"
            );
        }
    });
}

/// A multi-threaded runtime for tests that mix blocking CLI calls with async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Send `signal` to `pid`.
pub fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("signal {sig} to {pid}: {e}"));
}

/// A connection to the node at `addr` as its coordinator, presenting `token` (a cluster's
/// nodes require [`Cluster::cluster_token`]; a node started on its own requires none).
pub async fn node_client(
    addr: &str,
    token: Option<&str>,
) -> Result<Client, ringkv_common::client::CallError> {
    Client::connect_as(
        addr,
        Role::Coordinator,
        token,
        DEFAULT_MAX_FRAME_LEN,
        ringkv_common::client::Batching::Off,
    )
    .await
}

/// A storage node started by hand (not by the coordinator); killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub addr: String,
}

impl NodeProcess {
    /// Start `ringkv-node` on `data_dir`, optionally registered with `coordinator`, and wait
    /// for its `listening on` line.
    pub fn start(
        data_dir: &Path,
        coordinator: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProcess {
        NodeProcess::start_with(data_dir, coordinator, args, env, |_| {})
    }

    /// [`NodeProcess::start`], with `configure` applied to the command last (limits of the
    /// process, say).
    pub fn start_with(
        data_dir: &Path,
        coordinator: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> NodeProcess {
        std::fs::create_dir_all(data_dir).expect("node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("node.log"))
            .expect("node log");
        let mut cmd = Command::new(bin_dir().join("ringkv-node"));
        // A node without `coordinator` stays on its own, whatever the environment names.
        cmd.env_remove("RINGKV_COORDINATOR");
        cmd.env_remove(ringkv_common::cluster_token::ENV);
        cmd.arg("--data-dir").arg(data_dir).args(args);
        if let Some(addr) = coordinator {
            cmd.arg("--coordinator").arg(addr);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ringkv-node");
        let stdout = child.stdout.take().expect("stdout");
        // Killed by `drop` if it never becomes ready.
        let mut node = NodeProcess {
            child,
            addr: String::new(),
        };
        let line = first_line(stdout, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no readiness line from the node on {}", data_dir.display()));
        node.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        node
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, timeout).expect("node exits")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
