//! The nemesis: faults injected on a seeded schedule, one at a time, each healed before the next.
//!
//! Between faults the cluster gets a quiet spell (`--nemesis-interval`, jittered ±50%). Then
//! one fault, chosen among those enabled and possible right now:
//!
//! | fault | injected by | held for | healed by |
//! | --- | --- | --- | --- |
//! | `kill` | `node kill ID` (SIGKILL) | 1–3 s | restarting the node by hand on its data directory (attached: `node add`) |
//! | `pause` | `node pause ID` (SIGSTOP) | down timeout + 0.5–2 s | `node resume ID` (SIGCONT; sent directly if that fails) |
//! | `join` | `node add` | – | – |
//! | `leave` | `node remove ID`, only while 5 or more nodes are up | – | – |
//! | `coordinator-kill` | SIGKILL to the coordinator | 0.3–1.8 s | starting it again on the same address and data directory |
//!
//! Kills and pauses also need 4 nodes up, so a key's replicas can always be placed. Joins
//! stop at two nodes over the starting size, so joins and leaves keep the cluster near its size.
//! A fault still active at the deadline is healed at once.

use std::time::Duration;

use ringkv_common::protocol::{NodeSignal, Request, Response};
use ringkv_common::{NodeId, NodeState};
use serde::Serialize;
use tokio::time::Instant;

use super::admin;
use super::cluster::{self, OwnedCluster};
use super::rng::Rng;

/// Timeout of `status` and signal requests.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Timeout of `node add`: spawning and registering a node.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeout of `node remove`: its keys are copied away before it answers.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a healed node gets to be `up` again.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Fewest nodes up for a kill or a pause (one goes away) and after a leave.
pub const MIN_UP: usize = 4;

/// A kind of fault.
#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a storage node, then restart it.
    Kill,
    /// SIGSTOP a storage node past the down timeout, then SIGCONT it.
    Pause,
    /// Add a storage node.
    Join,
    /// Decommission a storage node.
    Leave,
    /// SIGKILL the coordinator, then start it again on the same address and data directory.
    CoordinatorKill,
}

impl FaultKind {
    /// Every kind, in order.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Join,
        FaultKind::Leave,
        FaultKind::CoordinatorKill,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Join => "join",
            FaultKind::Leave => "leave",
            FaultKind::CoordinatorKill => "coordinator-kill",
        }
    }
}

/// One fault, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// The node it hit, if any.
    pub node: Option<u64>,
    /// Seconds since the run started.
    pub at_s: f64,
    /// When it was healed (for faults that need healing).
    pub healed_at_s: Option<f64>,
    /// Whether it was injected (and healed) as planned.
    pub ok: bool,
    /// What happened, in a few words.
    pub detail: String,
}

/// The cluster under test.
pub enum Target<'a> {
    /// Started by this run: the coordinator can be killed, nodes restarted by hand.
    Owned(&'a mut OwnedCluster),
    /// A running cluster at this address.
    Attached(&'a str),
}

impl Target<'_> {
    fn addr(&self) -> &str {
        match self {
            Target::Owned(c) => c.addr(),
            Target::Attached(a) => a,
        }
    }
}

/// Schedule settings.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub kinds: Vec<FaultKind>,
    /// Mean quiet time between faults.
    pub interval: Duration,
    /// The cluster's down timeout; pauses last longer than this.
    pub down_timeout: Duration,
    /// Nodes at the start; joins stop two above it.
    pub nodes: usize,
    /// Print each fault on stderr as it is healed.
    pub progress: bool,
}

/// A fault in force, waiting to be healed.
#[derive(Debug, Clone, Copy)]
enum Active {
    Killed(NodeId),
    Paused(NodeId, Option<u32>),
    CoordinatorDown,
}

/// The fault injector.
pub struct Nemesis {
    cfg: NemesisConfig,
    rng: Rng,
    start: Instant,
    log: Vec<FaultRecord>,
}

impl Nemesis {
    /// A nemesis whose times are relative to `start`.
    pub fn new(cfg: NemesisConfig, rng: Rng, start: Instant) -> Nemesis {
        Nemesis {
            cfg,
            rng,
            start,
            log: Vec::new(),
        }
    }

    /// The faults injected so far.
    pub fn into_log(self) -> Vec<FaultRecord> {
        self.log
    }

    /// Inject faults until `deadline`, healing each before the next and the last at once.
    pub async fn run(&mut self, target: &mut Target<'_>, deadline: Instant) {
        if self.cfg.kinds.is_empty() {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        loop {
            let quiet = self.cfg.interval.mul_f64(0.5 + self.rng.unit());
            if !sleep_before(Instant::now() + quiet, deadline).await {
                return;
            }
            let Some(kind) = self.choose(target).await else {
                continue;
            };
            let (mut record, active) = self.inject(kind, target).await;
            if let Some(active) = active {
                let hold = match active {
                    Active::Killed(_) => Duration::from_secs(1) + secs_f(2.0 * self.rng.unit()),
                    Active::Paused(..) => {
                        self.cfg.down_timeout
                            + Duration::from_millis(500)
                            + secs_f(1.5 * self.rng.unit())
                    }
                    Active::CoordinatorDown => {
                        Duration::from_millis(300) + secs_f(1.5 * self.rng.unit())
                    }
                };
                sleep_before(Instant::now() + hold, deadline).await;
                self.heal(active, target, &mut record).await;
            }
            if self.cfg.progress {
                eprintln!(
                    "chaos [{:6.1}s] fault {}: {}{}",
                    record.at_s,
                    record.kind.as_str(),
                    record.detail,
                    if record.ok { "" } else { " (NOT AS PLANNED)" }
                );
            }
            self.log.push(record);
        }
    }

    /// A fault that is enabled and possible in the cluster's current shape.
    async fn choose(&mut self, target: &mut Target<'_>) -> Option<FaultKind> {
        let up = match admin::status(target.addr(), ADMIN_TIMEOUT).await {
            Ok(s) => admin::nodes_in(&s, NodeState::Up).len(),
            Err(_) => 0,
        };
        let owned = matches!(target, Target::Owned(_));
        let possible: Vec<FaultKind> = self
            .cfg
            .kinds
            .iter()
            .copied()
            .filter(|k| match k {
                FaultKind::Kill | FaultKind::Pause => up >= MIN_UP,
                FaultKind::Leave => up > MIN_UP,
                FaultKind::Join => up > 0 && up < self.cfg.nodes + 2,
                FaultKind::CoordinatorKill => owned,
            })
            .collect();
        self.rng.pick(&possible).copied()
    }

    fn now_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn record(&self, kind: FaultKind, node: Option<NodeId>) -> FaultRecord {
        FaultRecord {
            kind,
            node: node.map(|n| n.0),
            at_s: self.now_s(),
            healed_at_s: None,
            ok: true,
            detail: String::new(),
        }
    }

    /// Inject `kind`; returns its record and what must be healed.
    async fn inject(
        &mut self,
        kind: FaultKind,
        target: &mut Target<'_>,
    ) -> (FaultRecord, Option<Active>) {
        let addr = target.addr().to_string();
        let victim = match kind {
            FaultKind::Kill | FaultKind::Pause | FaultKind::Leave => {
                match admin::status(&addr, ADMIN_TIMEOUT).await {
                    Ok(s) => self
                        .rng
                        .pick(&admin::nodes_in(&s, NodeState::Up))
                        .map(|n| (n.id, n.pid)),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let mut rec = self.record(kind, victim.map(|v| v.0));
        let fail = |rec: &mut FaultRecord, detail: String| {
            rec.ok = false;
            rec.detail = detail;
        };
        match (kind, victim) {
            (FaultKind::Kill | FaultKind::Pause | FaultKind::Leave, None) => {
                fail(&mut rec, "no node to pick: status failed".into());
                (rec, None)
            }
            (FaultKind::Kill, Some((id, _))) => {
                let req = Request::NodeSignal {
                    node: id,
                    signal: NodeSignal::Kill,
                };
                match admin::request(&addr, req, ADMIN_TIMEOUT).await {
                    Ok(_) => {
                        if let Target::Owned(c) = target {
                            c.reap();
                        }
                        rec.detail = format!("node {id} killed");
                        (rec, Some(Active::Killed(id)))
                    }
                    Err(e) => {
                        fail(&mut rec, format!("node kill {id}: {e}"));
                        (rec, None)
                    }
                }
            }
            (FaultKind::Pause, Some((id, pid))) => {
                let req = Request::NodeSignal {
                    node: id,
                    signal: NodeSignal::Pause,
                };
                match admin::request(&addr, req, ADMIN_TIMEOUT).await {
                    Ok(_) => {
                        rec.detail = format!("node {id} paused");
                        (rec, Some(Active::Paused(id, pid)))
                    }
                    Err(e) => {
                        // It may have been paused anyway: resume it to be sure.
                        if let Some(pid) = pid {
                            cluster::resume_process(pid);
                        }
                        fail(&mut rec, format!("node pause {id}: {e}"));
                        (rec, None)
                    }
                }
            }
            (FaultKind::Leave, Some((id, _))) => {
                let req = Request::NodeRemove {
                    node: id,
                    accept_loss: false,
                };
                match admin::request(&addr, req, LEAVE_TIMEOUT).await {
                    Ok(_) => rec.detail = format!("node {id} decommissioned"),
                    Err(e) => fail(&mut rec, format!("node remove {id}: {e}")),
                }
                rec.healed_at_s = Some(self.now_s());
                (rec, None)
            }
            (FaultKind::Join, _) => {
                match admin::request(&addr, Request::NodeAdd, JOIN_TIMEOUT).await {
                    Ok(Response::NodeAdded { node }) => {
                        rec.node = Some(node.0);
                        rec.detail = format!("node {node} added");
                    }
                    Ok(_) => fail(&mut rec, "node add: unexpected answer".into()),
                    Err(e) => fail(&mut rec, format!("node add: {e}")),
                }
                rec.healed_at_s = Some(self.now_s());
                (rec, None)
            }
            (FaultKind::CoordinatorKill, _) => match target {
                Target::Owned(c) => {
                    c.kill_coordinator();
                    rec.detail = "coordinator killed".into();
                    (rec, Some(Active::CoordinatorDown))
                }
                Target::Attached(_) => {
                    fail(&mut rec, "not possible on an attached cluster".into());
                    (rec, None)
                }
            },
        }
    }

    /// Undo `active`, noting the outcome in `rec`.
    async fn heal(&mut self, active: Active, target: &mut Target<'_>, rec: &mut FaultRecord) {
        let addr = target.addr().to_string();
        let problem = match active {
            Active::Killed(id) => match target {
                Target::Owned(c) => match c.restart_node(id) {
                    Ok(pid) => {
                        if admin::wait_up(&addr, id, RECOVER_TIMEOUT).await {
                            rec.detail.push_str(&format!(", restarted (pid {pid})"));
                            None
                        } else {
                            Some(format!(
                                "node {id} restarted (pid {pid}) but not up in time"
                            ))
                        }
                    }
                    Err(e) => Some(format!("restarting node {id}: {e}")),
                },
                Target::Attached(_) => {
                    match admin::request(&addr, Request::NodeAdd, JOIN_TIMEOUT).await {
                        Ok(Response::NodeAdded { node }) => {
                            rec.detail.push_str(&format!(", replaced by node {node}"));
                            None
                        }
                        Ok(_) => Some("node add: unexpected answer".into()),
                        Err(e) => Some(format!("node add: {e}")),
                    }
                }
            },
            Active::Paused(id, pid) => {
                let req = Request::NodeSignal {
                    node: id,
                    signal: NodeSignal::Resume,
                };
                let resumed = admin::request(&addr, req, ADMIN_TIMEOUT).await;
                if resumed.is_err() {
                    if let Some(pid) = pid {
                        cluster::resume_process(pid);
                    }
                }
                if admin::wait_up(&addr, id, RECOVER_TIMEOUT).await {
                    rec.detail.push_str(", resumed");
                    None
                } else {
                    Some(format!("node {id} resumed but not up in time"))
                }
            }
            Active::CoordinatorDown => match target {
                Target::Owned(c) => match c.restart_coordinator().await {
                    Ok(()) => {
                        rec.detail.push_str(", restarted");
                        None
                    }
                    Err(e) => Some(format!("restarting the coordinator: {e}")),
                },
                Target::Attached(_) => None,
            },
        };
        rec.healed_at_s = Some(self.now_s());
        if let Some(p) = problem {
            rec.ok = false;
            if !rec.detail.is_empty() {
                rec.detail.push_str("; ");
            }
            rec.detail.push_str(&p);
        }
    }
}

/// Bring everything back after the run: the coordinator running, no node paused, killed
/// nodes restarted. Returns what could not be done.
pub async fn heal_everything(target: &mut Target<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Target::Owned(c) = target {
        if !c.coordinator_running() {
            if let Err(e) = c.restart_coordinator().await {
                problems.push(format!("restarting the coordinator: {e}"));
                return problems;
            }
        }
    }
    let addr = target.addr().to_string();
    let status = match admin::status(&addr, ADMIN_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("status: {e}"));
            return problems;
        }
    };
    for node in &status.nodes {
        if !matches!(node.state, NodeState::Down | NodeState::Suspect) {
            continue;
        }
        let alive = node.pid.is_some_and(cluster::process_alive);
        if let (true, Some(pid)) = (alive, node.pid) {
            cluster::resume_process(pid);
        } else if let Target::Owned(c) = target {
            if let Err(e) = c.restart_node(node.id) {
                problems.push(format!("restarting node {}: {e}", node.id));
            }
        }
    }
    problems
}

/// Sleep until `until`, or until `deadline` if that is sooner; false if the deadline came first.
async fn sleep_before(until: Instant, deadline: Instant) -> bool {
    if until >= deadline {
        tokio::time::sleep_until(deadline).await;
        false
    } else {
        tokio::time::sleep_until(until).await;
        true
    }
}

fn secs_f(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
