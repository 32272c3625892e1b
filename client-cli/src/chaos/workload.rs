//! The clients of a chaos run: each on its own connection, doing gets, puts and deletes on
//! random keys until the deadline and recording every operation it invoked.
//!
//! Keys are used a few at a time, as Jepsen's independent-key generators do: the run's
//! duration is cut into windows, and in each window every client picks among the same
//! `hot_keys` keys, the next ones in the key space. Each key thus sees real contention (all
//! clients on a handful of keys) for one window, and then only the final read: its history
//! stays short enough to check, and an early write must survive every later fault.
//!
//! A put writes a value unique in the run, `c{client}-{seq}`, so a read names the write it
//! saw. Outcomes follow the protocol's classes ([`CallError::may_have_applied`]): an answer
//! is `Ok`; a refusal that definitely did not apply is `Failed`; a timeout, a lost connection
//! or an `Indeterminate` answer is `Unknown`. After a lost connection the client reconnects;
//! nothing is recorded for the time it cannot connect (no request was sent).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringkv_common::client::{CallError, Client};
use ringkv_common::protocol::{Request, Response};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::history::{Op, OpKind, Status};
use super::rng::Rng;
use crate::commands;

/// Pause before trying to reconnect, while the coordinator is down.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// Final reads in flight at once.
const FINAL_READ_TASKS: usize = 8;

/// The shares of gets, puts and deletes among the operations a client issues.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub get: f64,
    pub put: f64,
    pub del: f64,
}

impl Default for Mix {
    /// Half reads; writes are mostly puts, with enough deletes to exercise tombstones.
    fn default() -> Self {
        Mix {
            get: 50.0,
            put: 40.0,
            del: 10.0,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    /// Parses `GET:PUT:DEL` weights, such as `50:40:10`.
    fn from_str(s: &str) -> Result<Mix, String> {
        let usage = || format!("invalid mix {s:?}: expected GET:PUT:DEL weights, like 50:40:10");
        let parts: Vec<f64> = s
            .split(':')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| usage())?;
        let [get, put, del] = parts[..] else {
            return Err(usage());
        };
        if [get, put, del].iter().any(|w| !w.is_finite() || *w < 0.0) || get + put + del <= 0.0 {
            return Err(usage());
        }
        Ok(Mix { get, put, del })
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.get, self.put, self.del)
    }
}

impl Mix {
    /// The kind of operation a roll in `[0, 1)` stands for.
    fn pick(&self, roll: f64) -> OpKind {
        let total = self.get + self.put + self.del;
        let x = roll * total;
        if x < self.get {
            OpKind::Get
        } else if x < self.get + self.put {
            OpKind::Put
        } else {
            OpKind::Delete
        }
    }
}

/// What every client needs to know.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub addr: String,
    /// The keys' names.
    pub keys: Arc<Vec<Bytes>>,
    /// Keys in use at once; clients pick among them uniformly. At least the key count means
    /// every key all the time.
    pub hot_keys: usize,
    /// How long one set of hot keys is in use.
    pub window: Duration,
    /// The shares of gets, puts and deletes.
    pub mix: Mix,
    /// How long a client waits for one answer before calling the outcome unknown.
    pub op_timeout: Duration,
    /// Times in the history are measured from here.
    pub start: Instant,
}

impl WorkloadConfig {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The index of the key a client uses next, given its random stream.
    fn pick_key(&self, rng: &mut Rng) -> usize {
        let n = self.keys.len() as u64;
        let hot = self.hot_keys as u64;
        if hot == 0 || hot >= n || self.window.is_zero() {
            return rng.below(n) as usize;
        }
        let window = (self.start.elapsed().as_nanos() / self.window.as_nanos().max(1)) as u64;
        let base = window.wrapping_mul(hot) % n;
        ((base + rng.below(hot)) % n) as usize
    }
}

/// How long each set of `hot_keys` keys is in use so that a run of `duration` goes through
/// the `keys` keys once.
pub fn window_for(duration: Duration, keys: usize, hot_keys: usize) -> Duration {
    if hot_keys == 0 || keys == 0 || hot_keys >= keys {
        return duration;
    }
    duration.mul_f64(hot_keys as f64 / keys as f64)
}

/// Run `clients` clients until `deadline`; returns every operation they invoked.
pub async fn run(cfg: &WorkloadConfig, clients: u32, seed: u64, deadline: Instant) -> Vec<Op> {
    let mut tasks = JoinSet::new();
    for id in 0..clients {
        let cfg = cfg.clone();
        // Stream 0 is the nemesis; clients start at 1.
        let rng = Rng::derive(seed, u64::from(id) + 1);
        tasks.spawn(async move { client_loop(id, cfg, rng, deadline).await });
    }
    let mut ops = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(mut client_ops) = done {
            ops.append(&mut client_ops);
        }
    }
    ops
}

async fn client_loop(id: u32, cfg: WorkloadConfig, mut rng: Rng, deadline: Instant) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut client: Option<Client> = None;
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        let conn = match &client {
            Some(c) if !c.is_closed() => c.clone(),
            _ => match commands::connect(&cfg.addr, cfg.op_timeout).await {
                Ok(c) => {
                    client = Some(c.clone());
                    c
                }
                Err(_) => {
                    client = None;
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                    continue;
                }
            },
        };
        let key_index = cfg.pick_key(&mut rng) as u32;
        let Some(key) = cfg.keys.get(key_index as usize).cloned() else {
            break;
        };
        let (kind, value, req) = match cfg.mix.pick(rng.unit()) {
            OpKind::Get => (OpKind::Get, None, Request::Get { key }),
            OpKind::Put => {
                seq += 1;
                let value = format!("c{id}-{seq}");
                let req = Request::Put {
                    key,
                    value: Bytes::from(value.clone()),
                };
                (OpKind::Put, Some(value), req)
            }
            OpKind::Delete => (OpKind::Delete, None, Request::Delete { key }),
        };
        ops.push(invoke(&cfg, &conn, id, key_index, kind, value, req).await);
    }
    ops
}

/// Send one request and record it.
async fn invoke(
    cfg: &WorkloadConfig,
    conn: &Client,
    client: u32,
    key: u32,
    kind: OpKind,
    value: Option<String>,
    req: Request,
) -> Op {
    let start = cfg.micros();
    let result = conn.call_timeout(req, cfg.op_timeout).await;
    let end = cfg.micros();
    let mut op = Op {
        client,
        key,
        kind,
        value,
        start,
        end,
        status: Status::Ok,
        error: None,
    };
    match (kind, result) {
        (OpKind::Get, Ok(Response::Value { value, .. })) => {
            op.value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        }
        (OpKind::Put | OpKind::Delete, Ok(Response::Written { .. })) => {}
        (_, Ok(other)) => {
            // A well-formed but wrong answer: we cannot know what happened.
            op.status = Status::Unknown;
            op.error = Some(format!(
                "internal: unexpected answer {}",
                response_name(&other)
            ));
        }
        (_, Err(e)) => {
            op.status = if e.may_have_applied() {
                Status::Unknown
            } else {
                Status::Failed
            };
            op.error = Some(describe_error(&e));
        }
    }
    op
}

/// `class: message`, short enough for a report line.
fn describe_error(e: &CallError) -> String {
    let report = crate::output::ErrorReport::from(e);
    let mut s = format!("{}: {}", report.class, report.message);
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Written { .. } => "Written",
        Response::Value { .. } => "Value",
        Response::Done => "Done",
        _ => "of another kind",
    }
}

/// Read every key once, retrying failures until `deadline`; returns one `Ok` read per key
/// that could be read. The reads are recorded as client `client`.
pub async fn final_reads(cfg: &WorkloadConfig, client: u32, deadline: Instant) -> Vec<Op> {
    let mut tasks = JoinSet::new();
    for task in 0..FINAL_READ_TASKS {
        let cfg = cfg.clone();
        tasks.spawn(async move {
            let mut ops = Vec::new();
            let mut conn: Option<Client> = None;
            let mut index = task;
            while let Some(key) = cfg.keys.get(index).cloned() {
                if Instant::now() >= deadline {
                    break;
                }
                let c = match &conn {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => match commands::connect(&cfg.addr, cfg.op_timeout).await {
                        Ok(c) => {
                            conn = Some(c.clone());
                            c
                        }
                        Err(_) => {
                            tokio::time::sleep(RECONNECT_BACKOFF).await;
                            continue;
                        }
                    },
                };
                let req = Request::Get { key };
                let op = invoke(&cfg, &c, client, index as u32, OpKind::Get, None, req).await;
                if op.status == Status::Ok {
                    ops.push(op);
                    index += FINAL_READ_TASKS;
                } else {
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                }
            }
            ops
        });
    }
    let mut ops = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(mut task_ops) = done {
            ops.append(&mut task_ops);
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_keys_slide_through_the_key_space() {
        let window = window_for(Duration::from_secs(60), 200, 4);
        assert_eq!(window, Duration::from_millis(1200));
        assert_eq!(
            window_for(Duration::from_secs(60), 3, 4),
            Duration::from_secs(60)
        );
        let cfg = WorkloadConfig {
            addr: String::new(),
            keys: Arc::new((0..10).map(|i| Bytes::from(format!("k{i}"))).collect()),
            hot_keys: 2,
            window: Duration::from_secs(3600),
            mix: Mix::default(),
            op_timeout: Duration::from_secs(1),
            start: Instant::now(),
        };
        let mut rng = Rng::new(1);
        let picks: std::collections::HashSet<usize> =
            (0..100).map(|_| cfg.pick_key(&mut rng)).collect();
        assert_eq!(picks, [0, 1].into_iter().collect());
        let all = WorkloadConfig { hot_keys: 0, ..cfg };
        let picks: std::collections::HashSet<usize> =
            (0..1000).map(|_| all.pick_key(&mut rng)).collect();
        assert_eq!(picks.len(), 10);
    }

    #[test]
    fn mixes_parse_and_pick() {
        let mix: Mix = "1:2:1".parse().unwrap();
        assert_eq!(mix.pick(0.0), OpKind::Get);
        assert_eq!(mix.pick(0.3), OpKind::Put);
        assert_eq!(mix.pick(0.74), OpKind::Put);
        assert_eq!(mix.pick(0.99), OpKind::Delete);
        let reads: Mix = "100:0:0".parse().unwrap();
        assert_eq!(reads.pick(0.999), OpKind::Get);
        assert_eq!(Mix::default().to_string(), "50:40:10");
        for bad in ["", "1:2", "1:2:3:4", "a:b:c", "0:0:0", "-1:2:3", "inf:1:1"] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?} should not parse");
        }
    }
}
