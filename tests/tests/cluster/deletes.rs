//! Deleted keys: their tombstones are collected from the metadata and the nodes, and a
//! replica that kept an old copy through the delete never brings the key back.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use ringkv_common::protocol::{Request, Response};
use ringkv_common::Version;
use ringkv_tests::{node_pid, runtime, signal, wait_for, Cluster, NodeProcess, Options};
use serde_json::Value;

/// What each node holds of `keys`: `(version, has a value)` per key, per node address.
async fn held_by(addr: &str, token: &str, keys: &[String]) -> Option<Vec<(Version, bool)>> {
    let client = ringkv_tests::node_client(addr, Some(token)).await.ok()?;
    let mut held = Vec::new();
    for key in keys {
        let req = Request::Fetch {
            key: Bytes::from(key.clone()),
        };
        match client.call(req).await.ok()? {
            Response::Fetched { version, value } => held.push((version, value.is_some())),
            _ => return None,
        }
    }
    Some(held)
}

fn node_addrs(status: &Value) -> Vec<(u64, String)> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "up")
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["addr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A node paused through a delete keeps the old values. The tombstones are collected while it
/// is away, so the metadata no longer knows the keys at all; when the node comes back, its
/// reconciliation must forget those copies (they are below the version floor) rather than
/// learn them back as writes it missed.
#[test]
fn collected_deletions_stay_deleted_when_a_stale_replica_returns() {
    let c = Cluster::start_with(Options {
        nodes: 4,
        extra_args: vec!["--collect-tombstones-every".into(), "200ms".into()],
        ..Options::default()
    });
    let rt = runtime();
    let token = c.cluster_token();
    let mut expected: BTreeMap<String, Option<String>> = BTreeMap::new();
    for i in 0..120 {
        let (k, v) = (format!("d{i}"), format!("old-{i}"));
        c.json(&["put", &k, &v]);
        expected.insert(k, Some(v));
    }
    c.wait_healthy(Duration::from_secs(30));

    let victim = 3u64;
    let status = c.status();
    let pid = node_pid(&status, victim).unwrap();
    let victim_addr = node_addrs(&status)
        .into_iter()
        .find(|(id, _)| *id == victim)
        .unwrap()
        .1;
    let deleted: Vec<String> = expected
        .keys()
        .filter(|k| c.replicas(k).contains(&victim))
        .cloned()
        .collect();
    assert!(deleted.len() > 20, "the victim holds a share of the keys");

    signal(pid, Signal::SIGSTOP);
    c.wait_state(victim, "down", Duration::from_secs(10));
    for k in &deleted {
        c.json(&["del", k]);
        expected.insert(k.clone(), None);
    }
    let live = (expected.len() - deleted.len()) as u64;
    wait_for(
        "the tombstones to be collected",
        Duration::from_secs(30),
        || {
            let s = c.status();
            (s["tombstones"] == 0 && s["keys"] == live).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));

    signal(pid, Signal::SIGCONT);
    c.wait_state(victim, "up", Duration::from_secs(20));
    // Its reconciliation forgets the old copies: below the floor, and unknown to the metadata.
    wait_for(
        "the returning node to forget the deleted keys",
        Duration::from_secs(30),
        || {
            let held = rt.block_on(held_by(&victim_addr, &token, &deleted))?;
            held.iter().all(|(_, value)| !value).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
    c.wait_settled(Duration::from_secs(60));

    for (k, v) in &expected {
        let got = c.json(&["get", k]);
        let want = v.clone().map_or(Value::Null, Value::String);
        assert_eq!(got["value"], want, "key {k}");
    }
    let s = c.status();
    assert_eq!(s["keys"], live, "no deleted key came back: {s}");
    assert_eq!(s["tombstones"], 0, "{s}");
    // No node keeps anything of the deleted keys, not even a tombstone.
    for (id, addr) in node_addrs(&s) {
        let mut kept = Vec::new();
        wait_for("a node to answer", Duration::from_secs(10), || {
            let held = rt.block_on(held_by(&addr, &token, &deleted))?;
            kept = deleted
                .iter()
                .zip(held)
                .filter(|(_, (version, _))| *version != Version::ZERO)
                .collect();
            Some(())
        })
        .unwrap();
        assert!(kept.is_empty(), "node {id} still holds {kept:?}");
    }
    drop(rt);
}

/// Nodes holding `key` at `version`, asked directly.
fn holders(rt: &tokio::runtime::Runtime, c: &Cluster, key: &str, version: u64) -> Vec<u64> {
    let token = c.cluster_token();
    node_addrs(&c.status())
        .into_iter()
        .filter(|(_, addr)| {
            let held = rt
                .block_on(held_by(addr, &token, &[key.to_string()]))
                .unwrap_or_else(|| panic!("node at {addr} did not answer a fetch of {key}"));
            held.first().is_some_and(|(v, _)| v.0 == version)
        })
        .map(|(id, _)| id)
        .collect()
}

/// An acknowledged write the journal lost, and the nodes holding it, paused.
struct LostWrite {
    c: Cluster,
    _nodes: Vec<NodeProcess>,
    version: u64,
    /// The ids of the nodes holding it, all paused; their pids in `pids`.
    paused: Vec<u64>,
    pids: Vec<u32>,
}

/// Lose an acknowledged write from the journal (under `--meta-fsync never`, a crash before
/// the buffer reached the file: failpoint `meta-journal-hold`) while every replica of it is
/// paused, and start the coordinator again with `env`. The metadata does not know the key,
/// and every version below the old lease ceiling looks settled; a floor raised to one would
/// make the replicas' reconciliation forget the write. A deleted key leaves one tombstone
/// for the collector.
///
/// The nodes are started by hand, so that they stay paused: the coordinator wakes the nodes
/// it spawned when it starts (its liveness probe is a SIGCONT), and so does the kernel when
/// it dies (each is its own process group, which the kernel sends SIGHUP and SIGCONT once
/// orphaned with a member stopped).
fn lose_a_write_with_its_replicas_paused(env: Vec<(String, String)>) -> LostWrite {
    let mut c = Cluster::start_with(Options {
        nodes: 0,
        extra_args: [
            "--meta-fsync",
            "never",
            "--collect-tombstones-every",
            "200ms",
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("FAILPOINTS".into(), "meta-journal-hold=return".into())],
    });
    let nodes: Vec<NodeProcess> = (0..4)
        .map(|i| c.start_node(&c.dir.path().join(format!("hand-{i}")), &[]))
        .collect();
    wait_for("four nodes up", Duration::from_secs(30), || {
        (node_addrs(&c.status()).len() == 4).then_some(())
    })
    .unwrap();
    let rt = runtime();
    for i in 0..20 {
        c.json(&["put", &format!("k{i}"), "v"]);
    }
    // A tombstone for the collector to find; a deletion is synced, and with it what came before.
    c.json(&["del", "k0"]);
    let written = c.json(&["put", "kept", "acknowledged"]);
    let version = written["version"].as_u64().unwrap();
    // Every replica, the third too (its store may still be in flight after the quorum's
    // answer): one left running would give the write back after the restart.
    let mut paused = wait_for(
        "the write on all three replicas",
        Duration::from_secs(30),
        || {
            let held = holders(&rt, &c, "kept", version);
            (held.len() == 3).then_some(held)
        },
    )
    .unwrap();
    paused.sort_unstable();
    let status = c.status();
    let pids: Vec<u32> = paused
        .iter()
        .map(|id| node_pid(&status, *id).unwrap())
        .collect();
    for pid in &pids {
        signal(*pid, Signal::SIGSTOP);
    }
    c.kill_coordinator();
    c.opts.env = env;
    c.restart();
    let located = c.json(&["locate", "kept"]);
    assert_eq!(
        located["version"], 0,
        "the journal lost the write: only the paused nodes hold it"
    );
    // And locate says its view may lack it, as check does.
    assert_eq!(located["reads_wait"], true, "{located}");
    let checked = c.ringkv(&["--json", "check"]);
    let checked: Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(checked["reads_wait"], true, "{checked}");
    // Three of the four nodes owe a reconciliation, at least the write quorum (2): a read
    // could find the key missing, the write acknowledged, and must wait instead.
    assert_read_waits(&c, "kept");
    assert_read_waits(&c, "k1");
    LostWrite {
        c,
        _nodes: nodes,
        version,
        paused,
        pids,
    }
}

impl LostWrite {
    fn resume_paused_nodes(&self) {
        for pid in &self.pids {
            signal(*pid, Signal::SIGCONT);
        }
    }

    /// The lost write is learnt back from its replicas, the tombstone is collected after
    /// that (every node reconciled), and the write stays.
    fn assert_learnt_back_then_collected(&self) {
        let c = &self.c;
        let got = wait_for(
            "the write to be learnt back",
            Duration::from_secs(30),
            || {
                let got = try_get(c, "kept")?;
                (got["value"] == "acknowledged").then_some(got)
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", c.json(&["get", "kept"]), c.log_tail()));
        assert_eq!(got["version"], self.version);
        wait_for(
            "the tombstone to be collected",
            Duration::from_secs(30),
            || (c.status()["tombstones"] == 0).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
        let status = c.status();
        assert!(
            self.paused
                .iter()
                .all(|id| reconciliations_of(&status, *id, "complete") >= 1),
            "each paused node reconciled to the end: {status}"
        );
        assert_eq!(status["collection"]["reads_wait"], false, "{status}");
        assert_eq!(c.json(&["get", "kept"])["value"], "acknowledged");
        assert_eq!(c.json(&["locate", "kept"])["reads_wait"], false);
        assert_eq!(c.json(&["get", "k0"])["value"], Value::Null);
    }
}

/// After an unclean start, the floor waits until every node has been reconciled, across a
/// clean restart before the nodes holding a lost write are back.
#[test]
fn after_an_unclean_start_the_floor_waits_for_every_node() {
    let mut lost = lose_a_write_with_its_replicas_paused(Vec::new());
    assert_floor_waits_for(&lost.c, &lost.paused);
    // A clean restart before the paused nodes are back: what they owe is in the registry,
    // and the reads still wait for them.
    lost.c.stop();
    lost.c.restart();
    assert_floor_waits_for(&lost.c, &lost.paused);
    assert_read_waits(&lost.c, "kept");
    lost.resume_paused_nodes();
    lost.assert_learnt_back_then_collected();
}

/// While reads wait for nodes that may hold writes the journal lost, such a node cannot be
/// removed (removing it would let reads go on without them), even with enough nodes up for a
/// decommission; once it is back and reconciled, the write is read back.
#[test]
fn a_node_the_reads_wait_for_cannot_be_removed() {
    let lost = lose_a_write_with_its_replicas_paused(Vec::new());
    let c = &lost.c;
    // Enough nodes up that the decommission itself would be allowed.
    c.json(&["node", "add"]);
    c.json(&["node", "add"]);
    wait_for("three nodes up", Duration::from_secs(30), || {
        (node_addrs(&c.status()).len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
    let paused = lost.paused[0].to_string();
    let out = c.ringkv(&["--json", "node", "remove", &paused]);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "node {paused} was removed: {answer}");
    assert_eq!(answer["error"]["class"], "unavailable", "{answer}");
    assert_read_waits(c, "kept");
    lost.resume_paused_nodes();
    let got = wait_for(
        "the write to be learnt back",
        Duration::from_secs(30),
        || try_get(c, "kept").filter(|got| got["value"] == "acknowledged"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
    assert_eq!(got["version"], lost.version);
}

/// When the nodes the reads wait for are gone for good (here two of the three holding a write
/// the journal lost, killed while paused), reads would wait forever: a plain removal is
/// refused and says how to accept the loss, `node remove --accept-loss` removes one anyway,
/// and then fewer than the write quorum owe a reconciliation and reads are served again.
/// The write is read back, learnt from its third holder, which came back.
#[test]
fn a_node_gone_for_good_that_the_reads_wait_for_is_removed_with_accept_loss() {
    let lost = lose_a_write_with_its_replicas_paused(Vec::new());
    let c = &lost.c;
    let (gone, back) = (&lost.paused[..2], lost.paused[2]);
    for pid in &lost.pids[..2] {
        signal(*pid, Signal::SIGKILL);
    }
    signal(lost.pids[2], Signal::SIGCONT);
    wait_for(
        "the returning holder to be reconciled",
        Duration::from_secs(30),
        || (reconciliations_of(&c.status(), back, "complete") >= 1).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", c.status(), c.log_tail()));
    // Two nodes still owe a reconciliation, the write quorum: reads wait for them.
    assert_read_waits(c, "kept");
    c.json(&["node", "add"]);
    c.json(&["node", "add"]);
    wait_for("four nodes up", Duration::from_secs(30), || {
        (node_addrs(&c.status()).len() >= 4).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));

    let first = gone[0].to_string();
    let out = c.ringkv(&["--json", "node", "remove", &first]);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "node {first} was removed: {answer}");
    assert_eq!(answer["error"]["class"], "unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--accept-loss"), "{answer}");
    assert_read_waits(c, "kept");

    let answer = c.json_within(
        &["node", "remove", &first, "--accept-loss"],
        Duration::from_secs(60),
    );
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(c.node_state(gone[0]).as_deref(), Some("removed"));
    let status = c.status();
    // One node owes a reconciliation now, fewer than the write quorum.
    assert_eq!(status["collection"]["reads_wait"], false, "{status}");
    assert_eq!(
        status["collection"]["waiting_for"],
        serde_json::json!([gone[1]])
    );
    let got = c.json(&["get", "kept"]);
    assert_eq!(got["value"], "acknowledged", "{got}");
    assert_eq!(got["version"], lost.version, "{got}");
}

/// A decommission refused while the coordinator runs (the node is silent and a key's other
/// replicas are down) leaves the node leaving; after an unclean restart under `--meta-fsync
/// never` the coordinator resumes it, is refused again while reads wait for the silent nodes,
/// and asks again until they are back and reconciled: the node is then removed with no
/// further command, and the key is read back.
#[test]
fn a_resumed_decommission_waits_for_the_reconciliation_then_finishes() {
    let mut c = Cluster::start_with(Options {
        nodes: 0,
        extra_args: ["--meta-fsync", "never"].map(String::from).to_vec(),
        env: Vec::new(),
    });
    // Started by hand, so that they stay paused across the coordinator's restart.
    let _nodes: Vec<NodeProcess> = (0..6)
        .map(|i| c.start_node(&c.dir.path().join(format!("hand-{i}")), &[]))
        .collect();
    wait_for("six nodes up", Duration::from_secs(30), || {
        (node_addrs(&c.status()).len() == 6).then_some(())
    })
    .unwrap();
    c.json(&["put", "k", "v"]);
    let holders = c.replicas("k");
    assert_eq!(holders.len(), 3, "{holders:?}");
    let pids = c.signal_nodes_at_once(&holders, Signal::SIGSTOP);
    c.wait_nodes_in_state(&holders, "down", Duration::from_secs(30));
    let leaving = holders[0].to_string();
    let out = c.ringkv_within(
        &["--json", "node", "remove", &leaving],
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(c.node_state(holders[0]).as_deref(), Some("leaving"));

    c.kill_coordinator();
    c.restart();
    // Three nodes owe a reconciliation they cannot give while paused: reads wait, and so
    // does the resumed decommission.
    assert_read_waits(&c, "k");
    wait_for(
        "the resumed decommission to wait",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(c.dir.path().join("coordinator.log"))
                .ok()?
                .contains("the decommission waits for the node's reconciliation")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
    assert_eq!(c.node_state(holders[0]).as_deref(), Some("leaving"));

    for pid in &pids {
        signal(*pid, Signal::SIGCONT);
    }
    wait_for(
        "the decommission to finish",
        Duration::from_secs(60),
        || (c.node_state(holders[0]).as_deref() == Some("removed")).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", c.status(), c.log_tail()));
    let got = wait_for("k to be read", Duration::from_secs(30), || try_get(&c, "k"))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail()));
    assert_eq!(got["value"], "v", "{got}");
    assert!(!c.replicas("k").contains(&holders[0]));
}

/// A node whose reconciliation could not ask it about a key it reported (failpoint
/// `reconcile-fetch-fails`: the Fetch under the key lock fails) is not reconciled: the floor
/// keeps waiting for it, and the next coordinator, whose Fetches succeed, learns the write
/// back before anything is collected.
#[test]
fn a_node_that_did_not_answer_for_every_key_still_holds_the_floor_back() {
    let mut lost = lose_a_write_with_its_replicas_paused(vec![(
        "FAILPOINTS".into(),
        "reconcile-fetch-fails=return".into(),
    )]);
    lost.resume_paused_nodes();
    let status = wait_for(
        "each paused node's reconciliation to end early",
        Duration::from_secs(30),
        || {
            let status = lost.c.status();
            lost.paused
                .iter()
                .all(|id| reconciliations_of(&status, *id, "incomplete") >= 1)
                .then_some(status)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", lost.c.status(), lost.c.log_tail()));
    for id in &lost.paused {
        assert_eq!(
            reconciliations_of(&status, *id, "complete"),
            0,
            "never reconciled to the end: {status}"
        );
    }
    // The reconciliations skipped the key: the nodes still owe one, and reads wait.
    assert_read_waits(&lost.c, "kept");
    assert_floor_waits_for(&lost.c, &lost.paused);
    lost.c.stop();
    lost.c.opts.env.clear();
    lost.c.restart();
    lost.assert_learnt_back_then_collected();
}

/// `get KEY` is refused as unavailable (never applied, so safe to retry): reads wait until
/// the nodes that may hold writes the journal lost have been reconciled.
fn assert_read_waits(c: &Cluster, key: &str) {
    let out = c.ringkv(&["--json", "get", key]);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "get {key} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(!out.status.success(), "get {key} was answered: {answer}");
    assert_eq!(answer["error"]["class"], "unavailable", "{answer}");
    assert_eq!(answer["error"]["may_have_applied"], false, "{answer}");
    let status = c.status();
    assert_eq!(status["collection"]["reads_wait"], true, "{status}");
}

/// `get KEY`'s answer, or `None` if it was refused.
fn try_get(c: &Cluster, key: &str) -> Option<Value> {
    let out = c.ringkv(&["--json", "get", key]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Node `id`'s count of reconciliations `which` ("complete" or "incomplete") in `status`, 0
/// before its first.
fn reconciliations_of(status: &Value, id: u64, which: &str) -> u64 {
    status["collection"]["reconciliations"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["node"] == id))
        .and_then(|r| r[which].as_u64())
        .unwrap_or(0)
}

/// The collection waits for every one of `nodes`, and enough passes for a settled floor to
/// come of age (the grace is the 2 s node timeout) go by without collecting the tombstone:
/// a floor free to rise would have been raised by then.
fn assert_floor_waits_for(c: &Cluster, nodes: &[u64]) {
    let status = c.status();
    let waiting = status["collection"]["waiting_for"].as_array().unwrap();
    assert!(
        nodes.iter().all(|id| waiting.contains(&Value::from(*id))),
        "collection waits for the paused nodes: {status}"
    );
    let passes = status["collection"]["passes"].as_u64().unwrap();
    wait_for("collection passes", Duration::from_secs(30), || {
        (c.status()["collection"]["passes"].as_u64()? >= passes + 15).then_some(())
    })
    .unwrap();
    let status = c.status();
    assert_eq!(status["tombstones"], 1, "nothing collected yet: {status}");
}
