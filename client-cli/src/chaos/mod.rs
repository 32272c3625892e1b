//! `ringkv chaos`: RingKV's own Jepsen. Concurrent clients, injected faults, and checkers
//! that prove nothing acknowledged was lost and every key stayed linearizable.
//!
//! A run:
//! 1. starts a cluster of its own ([`cluster`]) or attaches to one (`--coordinator ADDR`);
//! 2. runs `--clients` clients ([`workload`]) for `--duration`, recording every operation
//!    in a [`history::History`], while the [`nemesis`] injects one fault at a time;
//! 3. heals everything and waits until `check` reports every key healthy;
//! 4. reads every key once more, then judges the history ([`checker`]): lost writes,
//!    per-key linearizability, and the replica audit;
//! 5. prints a [`report::ChaosReport`] (`--json` for machines) and exits non-zero on any
//!    violation.
//!
//! Every random choice comes from `--seed`. The schedule is repeatable; the interleaving of
//! real processes is not, so a seed reproduces the same faults, not the same history.

pub mod admin;
pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod rng;
pub mod workload;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use ringkv_common::client::CallError;
use tokio::time::Instant;

use crate::cli::{parse_duration, GlobalArgs};
use crate::commands::exit;
use crate::output::ErrorReport;
use cluster::{ClusterSpec, OwnedCluster};
use history::History;
use nemesis::{FaultKind, Nemesis, NemesisConfig, Target};
use report::{AuditReport, ChaosReport, Checks, ClusterInfo, FaultSummary, OpCounts};
use rng::Rng;

/// How often `check` is polled while waiting for the cluster to heal.
const HEAL_POLL: Duration = Duration::from_millis(500);

/// Timeout of one `check` request (it asks every replica of every key).
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest time the final reads get.
const MIN_FINAL_READ_TIME: Duration = Duration::from_secs(30);

/// How long `check` may take to be healthy again after the final reads (which may set off
/// read repairs) before the audit fails.
const AUDIT_SETTLE: Duration = Duration::from_secs(30);

const CHAOS_AFTER_HELP: &str = "\
Examples:
  ringkv chaos
  ringkv chaos --duration 10m --nemesis kill,pause,join,leave,coordinator-kill --seed 7
  ringkv chaos --duration 30s --clients 12 --hot-keys 2 --mix 40:30:30 --nemesis pause \\
      --coordinator-env FAILPOINTS=bug-read-any-version=return   # a failpoints build: must FAIL
  ringkv --coordinator 10.0.0.5:7400 chaos --nemesis kill,pause   # attach to a running cluster

Without --coordinator on the command line, chaos starts its own cluster (ringkv-coordinator
from the directory of this executable) on 127.0.0.1 with a fresh data directory, removed
after a passing run and kept (with coordinator.log, history.json and report.json) after a
failing one. With --coordinator, it attaches to that cluster: coordinator-kill is not
possible, and killed nodes are replaced with `node add`.

Checks, after the faults are healed and `check` is healthy again:
  lost writes       every acknowledged put or delete that should be visible is
  linearizability   each key's gets, puts and deletes have a linearization
  replica audit     `check` reports every key healthy

Exit codes:
  0  every check passed
  1  a check found a violation
  2  usage error
  3  the run could not be carried out (the cluster did not start or could not be reached)";

/// `ringkv chaos`: arguments.
#[derive(Args, Debug, Clone, PartialEq)]
#[command(after_help = CHAOS_AFTER_HELP)]
pub struct ChaosArgs {
    /// How long the clients run, with faults injected throughout (e.g. `60s`, `10m`).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,

    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,

    /// Keys the run goes through; more keys keep each key's history shorter.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub keys: u32,

    /// Keys in use at any moment: the clients share these few (contention), then move on to
    /// the next ones, going through all --keys once over the run. 0 = every key all the time.
    #[arg(long, default_value_t = 4)]
    pub hot_keys: u32,

    /// Weights of gets, puts and deletes, as GET:PUT:DEL.
    #[arg(long, default_value = "50:40:10", value_name = "GET:PUT:DEL")]
    pub mix: workload::Mix,

    /// Faults to inject, comma-separated: kill, pause, join, leave, coordinator-kill; `all`
    /// or `none`. Default: all (all but coordinator-kill when attached).
    #[arg(long, value_parser = parse_fault_set, value_name = "FAULTS")]
    pub nemesis: Option<FaultSet>,

    /// Mean quiet time between two faults (each wait is jittered by ±50%).
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    pub nemesis_interval: Duration,

    /// Seed of every random choice (default: from the clock); the report prints it.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Storage nodes of the cluster chaos starts.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub nodes: u32,

    /// Silence after which a node is down: passed to the coordinator chaos starts, and
    /// pauses last longer than this.
    #[arg(long, default_value = "1500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub down_timeout: Duration,

    /// Silence after which a node is suspect (no longer read from first, given no new
    /// replicas), for the cluster chaos starts. Default: half the down timeout, at most 750ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub suspect_timeout: Option<Duration>,

    /// Heartbeat interval of the nodes of the cluster chaos starts.
    #[arg(long, default_value = "250ms", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Duration,

    /// How long a client waits for an answer before recording the outcome as unknown.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub op_timeout: Duration,

    /// How long the cluster gets, after the run, to become healthy again.
    #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    pub heal_timeout: Duration,

    /// Directory for the cluster's data, the coordinator log, the history and the report
    /// (kept). Default: a temporary directory, removed after a passing run.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Keep the temporary directory even after a passing run.
    #[arg(long)]
    pub keep_data: bool,

    /// An extra flag for the coordinator chaos starts; repeat for more
    /// (e.g. `--coordinator-arg=--node-fsync=never`).
    #[arg(
        long = "coordinator-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    pub coordinator_args: Vec<String>,

    /// An environment variable for the coordinator chaos starts and its nodes; repeat for
    /// more (e.g. `FAILPOINTS=bug-read-any-version=return`, which arms a deliberately broken
    /// read path in binaries built with the `failpoints` feature).
    #[arg(long = "coordinator-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub coordinator_env: Vec<(String, String)>,

    /// The `ringkv-coordinator` executable (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub coordinator_bin: Option<PathBuf>,

    /// The `ringkv-node` executable, for restarting killed nodes (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub node_bin: Option<PathBuf>,
}

/// The faults `--nemesis` enables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSet(pub Vec<FaultKind>);

/// Parse `--nemesis`: `kill,pause`, `all` or `none`.
fn parse_fault_set(s: &str) -> Result<FaultSet, String> {
    let mut kinds = Vec::new();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "all" => kinds.extend(FaultKind::ALL),
            "none" => {}
            other => {
                let kind = FaultKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == other)
                    .ok_or_else(|| {
                        format!(
                            "unknown fault {other:?}: expected kill, pause, join, leave, coordinator-kill, all or none"
                        )
                    })?;
                kinds.push(kind);
            }
        }
    }
    kinds.sort();
    kinds.dedup();
    Ok(FaultSet(kinds))
}

/// Parse `KEY=VALUE`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid {s:?}: expected KEY=VALUE")),
    }
}

/// Why a chaos run could not be carried out (a violation is not an error: it is a report).
#[derive(thiserror::Error, Debug)]
pub enum ChaosError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("the coordinator did not become ready: {0}")]
    NotReady(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot reach the coordinator at {addr}: {source}")]
    Unreachable { addr: String, source: CallError },
    #[error("stopped by a signal; the cluster chaos started was killed")]
    Interrupted,
}

impl ChaosError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ChaosError::Usage(_) => exit::USAGE,
            _ => exit::CONNECTION,
        }
    }
}

/// Run `ringkv chaos` as a process: parse-time decisions, a runtime, the run, the report.
pub fn main(args: ChaosArgs, global: &GlobalArgs) -> ExitCode {
    let attach = coordinator_on_command_line().then(|| global.coordinator.clone());
    let json = global.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &ChaosError::Io {
                    what: "starting the async runtime".into(),
                    source: e,
                },
                json,
            )
        }
    };
    let result = runtime.block_on(async {
        let stop = interrupted();
        tokio::select! {
            r = run(args, attach, true) => r,
            _ = stop => Err(ChaosError::Interrupted),
        }
    });
    // Dropping the runtime drops the run (and so kills the cluster) if it was interrupted.
    drop(runtime);
    match result {
        Ok(report) => {
            let out = if json {
                let mut s = serde_json::to_string(&report).unwrap_or_else(|e| {
                    format!("{{\"error\":{{\"class\":\"internal\",\"message\":\"{e}\"}}}}")
                });
                s.push('\n');
                s
            } else {
                report.render_text()
            };
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
            if report.valid {
                ExitCode::from(exit::OK)
            } else {
                ExitCode::from(exit::FAILED)
            }
        }
        Err(e) => fail(&e, json),
    }
}

/// Resolves on the first SIGTERM or ctrl-c.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn fail(err: &ChaosError, json: bool) -> ExitCode {
    let class = match err {
        ChaosError::Usage(_) => "usage",
        ChaosError::Interrupted => "interrupted",
        _ => "chaos",
    };
    let report = ErrorReport::new(class, err.to_string());
    if json {
        let _ = std::io::stdout().write_all(&report.json());
    }
    let _ = std::io::stderr().write_all(report.stderr_line().as_bytes());
    ExitCode::from(err.exit_code())
}

/// Whether `--coordinator` was given on the command line (not by default or environment):
/// only then does chaos attach to a running cluster instead of starting its own.
fn coordinator_on_command_line() -> bool {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let Ok(matches) = crate::cli::Cli::command().try_get_matches_from(std::env::args_os()) else {
        return false;
    };
    let given =
        |m: &clap::ArgMatches| m.value_source("coordinator") == Some(ValueSource::CommandLine);
    given(&matches) || matches.subcommand_matches("chaos").is_some_and(given)
}

/// Print a progress line on stderr.
fn progress(enabled: bool, start: Instant, msg: impl AsRef<str>) {
    if enabled {
        eprintln!(
            "chaos [{:6.1}s] {}",
            start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

/// The run's directory: the one given, or a fresh temporary one.
enum RunDir {
    Given(PathBuf),
    Temp(tempfile::TempDir),
}

impl RunDir {
    fn path(&self) -> &Path {
        match self {
            RunDir::Given(p) => p,
            RunDir::Temp(t) => t.path(),
        }
    }
}

/// Carry out a chaos run: against the cluster at `attach`, or one of its own.
///
/// # Errors
/// A [`ChaosError`] when the run could not be carried out; violations are in the report.
pub async fn run(
    args: ChaosArgs,
    attach: Option<String>,
    show_progress: bool,
) -> Result<ChaosReport, ChaosError> {
    let seed = args.seed.unwrap_or_else(clock_seed);
    let kinds = match (&args.nemesis, &attach) {
        (Some(FaultSet(kinds)), Some(_)) if kinds.contains(&FaultKind::CoordinatorKill) => {
            return Err(ChaosError::Usage(
                "coordinator-kill needs a cluster chaos starts itself (drop --coordinator)".into(),
            ));
        }
        (Some(FaultSet(kinds)), _) => kinds.clone(),
        (None, Some(_)) => FaultKind::ALL
            .into_iter()
            .filter(|k| *k != FaultKind::CoordinatorKill)
            .collect(),
        (None, None) => FaultKind::ALL.to_vec(),
    };
    let started = Instant::now();

    // The directory and the cluster.
    let run_dir = match (&args.data_dir, &attach) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir).map_err(|source| ChaosError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
            Some(RunDir::Given(dir.clone()))
        }
        (None, None) => Some(RunDir::Temp(
            tempfile::Builder::new()
                .prefix("ringkv-chaos-")
                .tempdir()
                .map_err(|source| ChaosError::Io {
                    what: "creating a temporary directory".into(),
                    source,
                })?,
        )),
        (None, Some(_)) => None,
    };
    let mut owned = None;
    let addr = match (&attach, &run_dir) {
        (Some(addr), _) => {
            admin::status(addr, CHECK_TIMEOUT)
                .await
                .map_err(|source| ChaosError::Unreachable {
                    addr: addr.clone(),
                    source,
                })?;
            addr.clone()
        }
        (None, Some(dir)) => {
            let spec = cluster_spec(&args, dir.path())?;
            progress(
                show_progress,
                started,
                format!(
                    "starting a {}-node cluster in {}",
                    args.nodes,
                    dir.path().display()
                ),
            );
            let c = OwnedCluster::start(spec).await?;
            let addr = c.addr().to_string();
            owned = Some(c);
            addr
        }
        (None, None) => return Err(ChaosError::Usage("no cluster to run against".into())),
    };
    progress(
        show_progress,
        started,
        format!(
            "coordinator at {addr}; seed {seed}; {} clients on {} keys ({} at a time) for {:?}; nemesis {}",
            args.clients,
            args.keys,
            args.hot_keys,
            args.duration,
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        ),
    );

    // The workload and the nemesis, side by side.
    let nonce = (clock_seed() ^ seed) as u32;
    let key_names: Vec<String> = (0..args.keys)
        .map(|i| format!("chaos-{nonce:08x}-{i:05}"))
        .collect();
    let start = Instant::now();
    let deadline = start + args.duration;
    let workload_cfg = workload::WorkloadConfig {
        addr: addr.clone(),
        keys: Arc::new(key_names.iter().map(|k| Bytes::from(k.clone())).collect()),
        hot_keys: args.hot_keys as usize,
        window: workload::window_for(args.duration, args.keys as usize, args.hot_keys as usize),
        mix: args.mix,
        op_timeout: args.op_timeout,
        start,
    };
    let log_path = owned.as_ref().map(|c| c.spec().log_path());
    let mut target = match owned.as_mut() {
        Some(c) => Target::Owned(c),
        None => Target::Attached(&addr),
    };
    let mut nemesis = Nemesis::new(
        NemesisConfig {
            kinds: kinds.clone(),
            interval: args.nemesis_interval,
            down_timeout: args.down_timeout,
            nodes: args.nodes as usize,
            progress: show_progress,
        },
        Rng::derive(seed, 0),
        start,
    );
    let (ops, ()) = tokio::join!(
        workload::run(&workload_cfg, args.clients, seed, deadline),
        nemesis.run(&mut target, deadline),
    );
    let run_secs = start.elapsed().as_secs_f64();
    progress(
        show_progress,
        started,
        format!("workload done: {} operations; healing", ops.len()),
    );

    let (final_reads, audit) = heal_and_audit(
        &mut target,
        &workload_cfg,
        &args,
        log_path.as_deref(),
        |msg| progress(show_progress, started, msg),
    )
    .await;

    // Judge.
    let history = History {
        keys: key_names,
        ops,
        final_reads,
    };
    progress(show_progress, started, "checking the history");
    let history = Arc::new(history);
    let judged = {
        let history = history.clone();
        // The linearizability search is CPU-bound: keep it off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            (
                checker::lost::check(&history),
                checker::check_linearizability(&history),
            )
        })
        .await
    };
    let (lost_writes, linearizability) = judged.map_err(|e| ChaosError::Io {
        what: "running the checkers".into(),
        source: std::io::Error::other(e.to_string()),
    })?;

    let mut report = ChaosReport {
        valid: false,
        seed,
        reproduce: reproduce_command(&args, &attach, seed, &kinds),
        cluster: ClusterInfo {
            mode: if attach.is_some() {
                "attached"
            } else {
                "started"
            }
            .into(),
            coordinator: addr.clone(),
            nodes: attach.is_none().then_some(args.nodes as usize),
            data_dir: None,
        },
        duration_s: run_secs,
        clients: args.clients,
        keys: args.keys as usize,
        hot_keys: args.hot_keys as usize,
        nemesis: kinds,
        ops: OpCounts::from_ops(&history.ops, run_secs),
        faults: FaultSummary::from_events(nemesis.into_log()),
        checks: Checks {
            lost_writes,
            linearizability,
            replica_audit: audit,
        },
        violations: Vec::new(),
    };
    report.finish();

    // Stop the cluster, then keep or drop the directory.
    drop(owned);
    if let Some(dir) = run_dir {
        let keep = !report.valid || args.keep_data || matches!(dir, RunDir::Given(_));
        if keep {
            let path = match dir {
                RunDir::Given(p) => p,
                RunDir::Temp(t) => t.keep(),
            };
            report.cluster.data_dir = Some(path.display().to_string());
            write_artifacts(&path, &report, &history);
        }
    }
    Ok(report)
}

/// Heal everything, wait for `check` to be healthy, read every key once more, and audit the
/// replicas again. Returns the final reads and the audit's verdict.
async fn heal_and_audit(
    target: &mut Target<'_>,
    workload_cfg: &workload::WorkloadConfig,
    args: &ChaosArgs,
    log_path: Option<&Path>,
    progress: impl Fn(String),
) -> (Vec<history::Op>, AuditReport) {
    let addr = workload_cfg.addr.clone();
    let mut problems = nemesis::heal_everything(target).await;
    let (healthy_after, mut last_check) =
        wait_healthy(&addr, args.heal_timeout, "after the run", &mut problems).await;
    progress(match healthy_after {
        Some(t) => format!("healthy after {t:.1}s; final reads"),
        None => "NOT healthy; final reads anyway".into(),
    });

    // Final reads, then the audit once more: reads may set off repairs, which must settle.
    let read_deadline = Instant::now() + MIN_FINAL_READ_TIME.max(args.heal_timeout);
    let final_reads = workload::final_reads(workload_cfg, args.clients, read_deadline).await;
    if healthy_after.is_some() {
        let (_, check) =
            wait_healthy(&addr, AUDIT_SETTLE, "after the final reads", &mut problems).await;
        last_check = check.or(last_check);
    }
    let valid = last_check.is_some_and(|r| r.is_healthy());
    if !valid {
        if let Some(path) = log_path {
            problems.push(format!(
                "coordinator log ends with:\n{}",
                cluster::log_tail(path, 20)
            ));
        }
    }
    let audit = AuditReport {
        valid,
        healthy_after_s: healthy_after,
        check: last_check,
        problems,
    };
    (final_reads, audit)
}

/// Poll `check` until every key is healthy or `timeout` passes. Returns how long it took
/// (`None`: not healthy in time) and the last report.
async fn wait_healthy(
    addr: &str,
    timeout: Duration,
    when: &str,
    problems: &mut Vec<String>,
) -> (Option<f64>, Option<ringkv_common::protocol::CheckReport>) {
    let began = Instant::now();
    let deadline = began + timeout;
    let mut last = None;
    let mut last_error = None;
    loop {
        match admin::check(addr, CHECK_TIMEOUT).await {
            Ok(r) => {
                let healthy = r.is_healthy();
                last = Some(r);
                if healthy {
                    return (Some(began.elapsed().as_secs_f64()), last);
                }
            }
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            if let Some(e) = last_error {
                problems.push(format!("check: {e}"));
            }
            problems.push(format!(
                "not every key was healthy within {timeout:?} {when}"
            ));
            return (None, last);
        }
        tokio::time::sleep(HEAL_POLL).await;
    }
}

/// Save the history and the report next to the coordinator log, for a post-mortem.
fn write_artifacts(dir: &Path, report: &ChaosReport, history: &History) {
    if let Ok(s) = serde_json::to_vec(history) {
        let _ = std::fs::write(dir.join("history.json"), s);
    }
    if let Ok(s) = serde_json::to_vec_pretty(report) {
        let _ = std::fs::write(dir.join("report.json"), s);
    }
}

/// How to start the cluster, from the arguments.
fn cluster_spec(args: &ChaosArgs, dir: &Path) -> Result<ClusterSpec, ChaosError> {
    let beside_me = |name: &str| -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(name)))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(name))
    };
    // The coordinator insists the suspect timeout be shorter than the down timeout.
    let suspect = match args.suspect_timeout {
        Some(s) if s >= args.down_timeout => {
            return Err(ChaosError::Usage(
                "--suspect-timeout must be shorter than --down-timeout".into(),
            ))
        }
        Some(s) => s,
        None => (args.down_timeout / 2).min(Duration::from_millis(750)),
    };
    let mut coordinator_args = vec![
        format!("--down-timeout={}ms", args.down_timeout.as_millis().max(2)),
        format!("--suspect-timeout={}ms", suspect.as_millis().max(1)),
        format!(
            "--heartbeat-interval={}ms",
            args.heartbeat_interval.as_millis().max(1)
        ),
    ];
    coordinator_args.extend(args.coordinator_args.iter().cloned());
    let node_bin = args
        .node_bin
        .clone()
        .unwrap_or_else(|| beside_me("ringkv-node"));
    if args.node_bin.is_some() {
        coordinator_args.push(format!("--node-binary={}", node_bin.display()));
    }
    let dir = dir.canonicalize().map_err(|source| ChaosError::Io {
        what: format!("resolving {}", dir.display()),
        source,
    })?;
    Ok(ClusterSpec {
        coordinator_bin: args
            .coordinator_bin
            .clone()
            .unwrap_or_else(|| beside_me("ringkv-coordinator")),
        node_bin,
        dir,
        nodes: args.nodes as usize,
        heartbeat_interval: args.heartbeat_interval,
        args: coordinator_args,
        env: args.coordinator_env.clone(),
    })
}

/// A seed from the clock, for runs without `--seed`.
fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
}

/// The command line that repeats this run's schedule.
fn reproduce_command(
    args: &ChaosArgs,
    attach: &Option<String>,
    seed: u64,
    kinds: &[FaultKind],
) -> String {
    let mut parts = vec!["ringkv".to_string()];
    if let Some(addr) = attach {
        parts.push(format!("--coordinator {addr}"));
    }
    parts.push("chaos".into());
    parts.push(format!("--seed {seed}"));
    parts.push(format!("--duration {}s", args.duration.as_secs_f64()));
    parts.push(format!("--clients {}", args.clients));
    parts.push(format!("--keys {}", args.keys));
    parts.push(format!("--hot-keys {}", args.hot_keys));
    parts.push(format!("--mix {}", args.mix));
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    parts.push(format!(
        "--nemesis {}",
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(",")
        }
    ));
    parts.push(format!(
        "--nemesis-interval {}s",
        args.nemesis_interval.as_secs_f64()
    ));
    if attach.is_none() {
        parts.push(format!("--nodes {}", args.nodes));
        parts.push(format!(
            "--down-timeout {}ms",
            args.down_timeout.as_millis()
        ));
        if let Some(t) = args.suspect_timeout {
            parts.push(format!("--suspect-timeout {}ms", t.as_millis()));
        }
    }
    for a in &args.coordinator_args {
        parts.push(format!("--coordinator-arg={a}"));
    }
    for (k, v) in &args.coordinator_env {
        parts.push(format!("--coordinator-env {k}={v}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn chaos(args: &[&str]) -> ChaosArgs {
        let mut argv = vec!["ringkv", "chaos"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Some(Command::Chaos(a)) => a,
            other => panic!("not chaos: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_flags_parse() {
        let a = chaos(&[]);
        assert_eq!(a.duration, Duration::from_secs(60));
        assert_eq!(a.clients, 8);
        assert_eq!(a.hot_keys, 4);
        assert_eq!(a.nemesis, None);
        let a = chaos(&[
            "--duration",
            "10s",
            "--nemesis",
            "pause,kill,pause",
            "--seed",
            "42",
            "--coordinator-env",
            "FAILPOINTS=bug-read-any-version=return",
            "--coordinator-arg=--node-fsync=never",
            "--coordinator-arg",
            "--vnodes=8",
        ]);
        assert_eq!(a.duration, Duration::from_secs(10));
        assert_eq!(
            a.nemesis,
            Some(FaultSet(vec![FaultKind::Kill, FaultKind::Pause]))
        );
        assert_eq!(a.seed, Some(42));
        assert_eq!(
            a.coordinator_env,
            [(
                "FAILPOINTS".to_string(),
                "bug-read-any-version=return".to_string()
            )]
        );
        assert_eq!(a.coordinator_args, ["--node-fsync=never", "--vnodes=8"]);
        assert_eq!(
            chaos(&["--nemesis", "none"]).nemesis,
            Some(FaultSet(vec![]))
        );
        assert_eq!(
            chaos(&["--nemesis", "all"]).nemesis,
            Some(FaultSet(FaultKind::ALL.to_vec()))
        );
        let argv = ["ringkv", "chaos", "--nemesis", "flood"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = ["ringkv", "chaos", "--coordinator-env", "NOEQUALS"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = ["ringkv", "chaos", "--clients", "0"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[tokio::test]
    async fn coordinator_kill_needs_an_owned_cluster() {
        let a = chaos(&["--nemesis", "coordinator-kill"]);
        let err = run(a, Some("127.0.0.1:1".into()), false).await.unwrap_err();
        assert!(matches!(err, ChaosError::Usage(_)), "{err}");
        assert_eq!(err.exit_code(), exit::USAGE);
    }

    #[tokio::test]
    async fn unreachable_coordinator_is_an_error() {
        let a = chaos(&["--nemesis", "none", "--duration", "1s"]);
        // Bind then drop, so the port is (almost certainly) closed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = run(a, Some(closed), false).await.unwrap_err();
        assert!(matches!(err, ChaosError::Unreachable { .. }), "{err}");
        assert_eq!(err.exit_code(), exit::CONNECTION);
    }

    #[test]
    fn reproduce_names_the_seed() {
        let a = chaos(&["--coordinator-env", "A=b"]);
        let cmd = reproduce_command(&a, &None, 99, &[FaultKind::Kill]);
        assert!(cmd.contains("--seed 99"), "{cmd}");
        assert!(cmd.contains("--nemesis kill"), "{cmd}");
        assert!(cmd.contains("--coordinator-env A=b"), "{cmd}");
    }
}
