//! Crash safety: a coordinator or node killed at any moment (SIGKILL or an armed failpoint
//! that aborts the process) restarts without losing an acknowledged write.

use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use ringkv_common::client::Client;
use ringkv_common::protocol::{Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
use ringkv_common::Version;
use ringkv_tests::{
    assert_acked_readable, node_pid, runtime, signal, Cluster, NodeProcess, Options, Writer,
};

fn pids(c: &Cluster) -> Vec<u64> {
    let mut p: Vec<u64> = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["pid"].as_u64())
        .collect();
    p.sort();
    p
}

#[test]
fn coordinator_killed_five_times_under_writes() {
    let mut c = Cluster::start(5);
    let rt = runtime();
    let before = pids(&c);
    let writer = Writer::start(&rt, &c.addr, "kc", 150);
    for _ in 0..5 {
        writer.wait_progress(40, Duration::from_secs(60));
        c.kill_coordinator();
        assert_eq!(
            c.processes().len(),
            5,
            "the nodes outlive their coordinator"
        );
        c.restart();
    }
    writer.wait_progress(40, Duration::from_secs(60));
    let log = writer.finish(&rt);
    c.wait_settled(Duration::from_secs(60));
    assert_acked_readable(&rt, &c.addr, &log);
    assert_eq!(
        pids(&c),
        before,
        "running nodes were re-adopted, not respawned"
    );
    // A graceful stop also stops the adopted nodes.
    assert!(c.stop().success());
    ringkv_tests::wait_for("adopted nodes to stop", Duration::from_secs(10), || {
        c.processes().is_empty().then_some(())
    })
    .unwrap();
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, `Z`...), `None` once gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A spawned node that is paused when its coordinator is killed: its process group, orphaned
/// with a member stopped, gets SIGHUP and then SIGCONT from the kernel. The node ignores the
/// SIGHUP and runs on, and the next coordinator adopts it with its data. Whether the group is
/// orphaned depends on who adopts it (a subreaper in the test's session would not orphan it),
/// so the test sends the two signals itself as well.
#[test]
fn a_node_paused_when_its_coordinator_is_killed_runs_on() {
    let mut c = Cluster::start(3);
    let written = c.json(&["put", "held", "on every node"]);
    c.wait_healthy(Duration::from_secs(60));
    let before = pids(&c);
    let pid = before[0] as u32;
    signal(pid, Signal::SIGSTOP);
    ringkv_tests::wait_for("the node to stop", Duration::from_secs(10), || {
        (process_state(pid) == Some('T')).then_some(())
    })
    .unwrap();
    c.kill_coordinator();
    signal(pid, Signal::SIGHUP);
    signal(pid, Signal::SIGCONT);
    ringkv_tests::wait_for("SIGCONT to wake the node", Duration::from_secs(10), || {
        matches!(process_state(pid), Some('R' | 'S' | 'D')).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: state {:?}", process_state(pid)));
    c.restart();
    c.wait_healthy(Duration::from_secs(60));
    assert_eq!(pids(&c), before, "the node was adopted, not respawned");
    let got = c.json(&["get", "held"]);
    assert_eq!(got["value"], "on every node");
    assert_eq!(got["version"], written["version"]);
}

#[test]
fn crash_between_replica_acks_and_metadata_commit() {
    let mut c = Cluster::start_with(Options {
        nodes: 4,
        env: vec![(
            "FAILPOINTS".into(),
            "coordinator-before-meta-commit=60*off->return(abort)".into(),
        )],
        ..Options::default()
    });
    let rt = runtime();
    let writer = Writer::start(&rt, &c.addr, "fp", 40);
    let status = c.wait_coordinator_exit(Duration::from_secs(60));
    assert!(!status.success(), "the failpoint aborted the coordinator");
    c.opts.env.clear();
    c.restart();
    writer.wait_progress(30, Duration::from_secs(60));
    let log = writer.finish(&rt);
    assert!(log.acked.len() >= 30);
    c.wait_settled(Duration::from_secs(60));
    assert_acked_readable(&rt, &c.addr, &log);
}

#[test]
fn crash_between_migration_copy_and_metadata_switch() {
    let mut c = Cluster::start_with(Options {
        nodes: 4,
        env: vec![(
            "FAILPOINTS".into(),
            "migration-after-copy=5*off->return(abort)".into(),
        )],
        ..Options::default()
    });
    let rt = runtime();
    let writer = Writer::start(&rt, &c.addr, "mig", 300);
    writer.wait_progress(300, Duration::from_secs(60));
    // The join starts a migration; the coordinator dies in the middle of it.
    let _ = c.ringkv(&["node", "add"]);
    let status = c.wait_coordinator_exit(Duration::from_secs(60));
    assert!(!status.success());
    c.opts.env.clear();
    c.restart();
    writer.wait_progress(30, Duration::from_secs(60));
    let log = writer.finish(&rt);
    c.wait_settled(Duration::from_secs(90));
    assert_acked_readable(&rt, &c.addr, &log);
    let up = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "up")
        .count();
    assert_eq!(
        up, 5,
        "the added node is part of the cluster after the restart"
    );
}

/// Every key the node at `addr` holds, with its version and tombstone flag, from its scan.
async fn scan_node(
    addr: &str,
    token: Option<&str>,
) -> std::collections::BTreeMap<Bytes, (Version, bool)> {
    let client = ringkv_tests::node_client(addr, token)
        .await
        .expect("connect to node");
    let mut held = std::collections::BTreeMap::new();
    let mut after = None;
    loop {
        let scan = Request::Scan { after, limit: 1000 };
        match client.call_timeout(scan, Duration::from_secs(30)).await {
            Ok(Response::Scanned { entries, next }) => {
                held.extend(
                    entries
                        .into_iter()
                        .map(|e| (e.key, (e.version, e.tombstone))),
                );
                match next {
                    Some(n) => after = Some(n),
                    None => return held,
                }
            }
            other => panic!("scan of {addr}: {other:?}"),
        }
    }
}

#[test]
fn killed_node_restarts_from_its_log_and_catches_up() {
    let c = Cluster::start(4);
    let rt = runtime();
    for i in 0..150 {
        c.json(&["put", &format!("n{i}"), &format!("old{i}")]);
    }
    c.wait_settled(Duration::from_secs(30));
    let status = c.status();
    let pid = node_pid(&status, 2).unwrap();
    let addr = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 2)
        .and_then(|n| n["addr"].as_str())
        .unwrap()
        .to_string();
    let held = rt.block_on(scan_node(&addr, Some(&c.cluster_token())));
    assert!(held.len() >= 50, "node 2 holds {} of 150 keys", held.len());
    signal(pid, Signal::SIGKILL);
    c.wait_state(2, "down", Duration::from_secs(10));
    // Writes it misses: overwrites and deletes.
    for i in (0..150).step_by(2) {
        if i % 4 == 0 {
            c.json(&["del", &format!("n{i}")]);
        } else {
            c.json(&["put", &format!("n{i}"), &format!("new{i}")]);
        }
    }
    let node_dir = c.data_dir().join("nodes").join("node-2");
    // On its own first: what it holds now comes from its log alone (its keys are being
    // re-replicated elsewhere meanwhile, so nothing else would show a broken replay).
    let alone = NodeProcess::start(&node_dir, None, &[], &[]);
    assert_eq!(
        rt.block_on(scan_node(&alone.addr, None)),
        held,
        "the log replays to what the node held"
    );
    drop(alone);
    let _node = c.start_node(&node_dir, &[]);
    c.wait_state(2, "up", Duration::from_secs(10));
    c.wait_settled(Duration::from_secs(60));
    for i in 0..150 {
        let got = c.json(&["get", &format!("n{i}")]);
        let want = if i % 4 == 0 {
            serde_json::Value::Null
        } else if i % 2 == 0 {
            format!("new{i}").into()
        } else {
            format!("old{i}").into()
        };
        assert_eq!(got["value"], want, "n{i}");
    }
    // The restarted node holds only current versions of what it is listed for.
    let report = c.wait_healthy(Duration::from_secs(10));
    assert_eq!(report["stale"], 0);
    drop(rt);
}

#[test]
fn bit_flip_in_the_middle_of_a_node_log_is_detected_and_repaired() {
    let c = Cluster::start(4);
    for i in 0..200 {
        c.json(&["put", &format!("b{i:03}"), &format!("value-{i}")]);
    }
    c.wait_settled(Duration::from_secs(30));
    let pid = node_pid(&c.status(), 3).unwrap();
    signal(pid, Signal::SIGKILL);
    c.wait_state(3, "down", Duration::from_secs(10));
    let node_dir = c.data_dir().join("nodes").join("node-3");
    let log_path = node_dir.join("ringkv.log");
    let mut bytes = std::fs::read(&log_path).unwrap();
    // The middle of the records: under `--fsync always` the file runs on in zeros written
    // ahead, which end the log on replay.
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    assert!(end < bytes.len(), "the log was written ahead");
    let mid = end / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&log_path, &bytes).unwrap();

    let _node = c.start_node(&node_dir, &[]);
    c.wait_state(3, "up", Duration::from_secs(10));
    // Its heartbeats say how much of its log it set aside, and `status` names it.
    ringkv_tests::wait_for(
        "node 3 to report the log it set aside",
        Duration::from_secs(30),
        || {
            let status = c.status();
            let node = status["nodes"].as_array()?.iter().find(|n| n["id"] == 3)?;
            (node["log_set_aside_bytes"].as_u64()? > 0).then_some(())
        },
    )
    .unwrap();
    let text = String::from_utf8(c.ringkv(&["status"]).stdout).unwrap();
    assert!(text.contains("node 3 set aside"), "{text}");
    c.wait_settled(Duration::from_secs(60));
    for i in 0..200 {
        assert_eq!(
            c.json(&["get", &format!("b{i:03}")])["value"],
            format!("value-{i}")
        );
    }
    let kept: Vec<_> = std::fs::read_dir(&node_dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ringkv.log.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged log is kept for inspection");
    let node_log = std::fs::read_to_string(node_dir.join("node.log")).unwrap();
    assert!(
        node_log.contains("the rest of the log is set aside"),
        "the damage is reported"
    );
}

/// One store: key, version, value.
type Stored = (Bytes, Version, Bytes);

/// Overwrite a few keys many times on a standalone node so its log fills with garbage, until
/// `rounds` rounds are done or the node stops answering. Returns the last acknowledged store
/// of each key, and the store in flight when the node stopped answering, if any: it may have
/// reached the log.
async fn churn(addr: &str, rounds: u64) -> (Vec<Stored>, Option<Stored>) {
    let client = Client::connect(addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
        .await
        .expect("connect to node");
    let mut last = std::collections::BTreeMap::new();
    let mut in_flight = None;
    'rounds: for round in 1..=rounds {
        for k in 0..8u64 {
            let key = Bytes::from(format!("c{k}"));
            let version = Version(round * 100 + k);
            let value = Bytes::from(vec![b'a' + (round % 26) as u8; 512]);
            match client
                .call(Request::Store {
                    key: key.clone(),
                    version,
                    value: Some(value.clone()),
                })
                .await
            {
                Ok(Response::Stored { .. }) => {
                    last.insert(key, (version, value));
                }
                // The node aborted in a compaction: everything acknowledged so far counts.
                Err(_) => {
                    in_flight = Some((key, version, value));
                    break 'rounds;
                }
                Ok(other) => panic!("{other:?}"),
            }
        }
    }
    let acked = last.into_iter().map(|(k, (v, val))| (k, v, val)).collect();
    (acked, in_flight)
}

/// Every one of `stores` is what the node at `addr` holds for its key, or `or_else` for its
/// key (a store whose outcome is unknown).
async fn assert_holds(addr: &str, stores: &[Stored], or_else: Option<&Stored>) {
    let client = Client::connect(addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
        .await
        .unwrap();
    for (key, version, value) in stores {
        match client
            .call(Request::Fetch { key: key.clone() })
            .await
            .unwrap()
        {
            Response::Fetched {
                version: v,
                value: Some(got),
            } => {
                let held = (key.clone(), v, got);
                assert!(
                    held == (key.clone(), *version, value.clone()) || Some(&held) == or_else,
                    "{key:?}: held version {v:?}, acknowledged {version:?}, in flight {:?}",
                    or_else.map(|s| s.1)
                );
            }
            other => panic!("{key:?}: {other:?}"),
        }
    }
}

fn compaction_crash(failpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--compact-min-bytes",
        "16384",
        "--compact-garbage-ratio",
        "0.5",
    ];
    let mut node = NodeProcess::start(
        dir.path(),
        None,
        &args,
        &[("FAILPOINTS", &format!("{failpoint}=return(abort)"))],
    );
    let rt = runtime();
    let addr = node.addr.clone();
    // Enough garbage to trigger a compaction, which aborts the process.
    let (acked, in_flight) = rt.block_on(churn(&addr, 60));
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the node died inside compaction");
    assert_eq!(acked.len(), 8, "every key was stored before the crash");

    // Restarted without the failpoint: every store acknowledged before the crash is there,
    // and a fresh batch of writes, all of which must survive.
    let node = NodeProcess::start(dir.path(), None, &args, &[]);
    rt.block_on(assert_holds(&node.addr, &acked, in_flight.as_ref()));
    let written = rt.block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        let mut written = Vec::new();
        for k in 0..8u64 {
            let key = Bytes::from(format!("c{k}"));
            let version = Version(1_000_000 + k);
            let value = Bytes::from(format!("final-{k}"));
            client
                .call(Request::Store {
                    key: key.clone(),
                    version,
                    value: Some(value.clone()),
                })
                .await
                .unwrap();
            written.push((key, version, value));
        }
        written
    });
    drop(node);
    let node = NodeProcess::start(dir.path(), None, &args, &[]);
    rt.block_on(assert_holds(&node.addr, &written, None));
}

#[test]
fn crash_inside_compaction_before_rename() {
    compaction_crash("compaction-before-rename");
}

#[test]
fn crash_inside_compaction_after_rename() {
    compaction_crash("compaction-after-rename");
}

#[test]
fn coordinator_killed_under_writes_without_any_fsync_loses_nothing() {
    // `never` still writes the metadata journal and the node logs before acknowledging, so a
    // process crash cannot take back an acknowledged write.
    let mut c = Cluster::start_with(Options {
        nodes: 4,
        extra_args: ["--meta-fsync", "never", "--node-fsync", "never"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    });
    let rt = runtime();
    let writer = Writer::start(&rt, &c.addr, "nf", 150);
    for _ in 0..3 {
        writer.wait_progress(40, Duration::from_secs(60));
        c.kill_coordinator();
        c.restart();
    }
    writer.wait_progress(40, Duration::from_secs(60));
    let log = writer.finish(&rt);
    c.wait_settled(Duration::from_secs(60));
    assert_acked_readable(&rt, &c.addr, &log);
}

/// How many torn or damaged journal tails the coordinator has moved aside.
fn discarded_journal_tails(c: &Cluster) -> usize {
    std::fs::read_dir(c.data_dir())
        .expect("data directory")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("meta.log.discarded-")
        })
        .count()
}

/// Run `reqs` against the coordinator at `addr`, 64 at a time, and return the answers in order.
async fn client_calls(addr: &str, reqs: Vec<Request>) -> Vec<Response> {
    use futures::StreamExt;
    let client = Client::connect(addr, Role::Client, DEFAULT_MAX_FRAME_LEN)
        .await
        .expect("connect to coordinator");
    futures::stream::iter(reqs)
        .map(|req| {
            let client = client.clone();
            async move { client.call(req).await.expect("request succeeds") }
        })
        .buffered(64)
        .collect()
        .await
}

#[test]
fn damaged_metadata_journal_is_cut_and_rebuilt_from_the_nodes() {
    const KEYS: usize = 2000;
    let key = |i: usize| Bytes::from(format!("j{i}"));
    let mut c = Cluster::start(4);
    let rt = runtime();
    let puts = (0..KEYS)
        .map(|i| Request::Put {
            key: key(i),
            value: Bytes::from(format!("v{i}")),
        })
        .collect();
    rt.block_on(client_calls(&c.addr, puts));
    let dels = (0..KEYS)
        .step_by(3)
        .map(|i| Request::Delete { key: key(i) })
        .collect();
    rt.block_on(client_calls(&c.addr, dels));
    c.kill_coordinator();
    // Flip one bit a third of the way in: everything after it is no longer trusted.
    let journal = c.data_dir().join("meta.log");
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x04;
    std::fs::write(&journal, &bytes).unwrap();
    c.restart();
    let aside = discarded_journal_tails(&c);
    assert_eq!(aside, 1, "the damaged tail is kept aside");
    // Clients are served only once the nodes were reconciled: from the first read on, every
    // key and every deletion is back.
    let gets = (0..KEYS).map(|i| Request::Get { key: key(i) }).collect();
    let answers = rt.block_on(client_calls(&c.addr, gets));
    for (i, answer) in answers.into_iter().enumerate() {
        let want = (i % 3 != 0).then(|| Bytes::from(format!("v{i}")));
        match answer {
            Response::Value { value, .. } => assert_eq!(value, want, "j{i}"),
            other => panic!("j{i}: {other:?}"),
        }
    }
    // New writes get versions above everything the nodes hold, so they take effect.
    for i in (0..KEYS).step_by(50) {
        c.json(&["put", &format!("j{i}"), &format!("w{i}")]);
        assert_eq!(c.json(&["get", &format!("j{i}")])["value"], format!("w{i}"));
    }
    c.wait_settled(Duration::from_secs(60));
}

#[test]
fn unsynced_metadata_lost_in_a_machine_crash_is_rebuilt_from_synced_nodes() {
    // Nodes sync every write; the metadata journal is written but not synced. A machine crash
    // can take the journal's unsynced end: simulated by cutting the file back to an earlier
    // size after the coordinator is killed.
    const KEYS: usize = 600;
    let key = |i: usize| Bytes::from(format!("m{i}"));
    let mut c = Cluster::start_with(Options {
        nodes: 4,
        extra_args: ["--meta-fsync", "never"].map(String::from).to_vec(),
        ..Options::default()
    });
    let rt = runtime();
    let puts = |from: usize, tag: &str| -> Vec<Request> {
        (from..KEYS)
            .map(|i| Request::Put {
                key: key(i),
                value: Bytes::from(format!("{tag}{i}")),
            })
            .collect()
    };
    rt.block_on(client_calls(&c.addr, puts(0, "a")));
    let journal = c.data_dir().join("meta.log");
    let synced_len = std::fs::metadata(&journal).unwrap().len();
    // After the cut: overwrites of the first half, new keys, deletions.
    rt.block_on(client_calls(&c.addr, puts(KEYS / 2, "b")));
    let more: Vec<Request> = (KEYS..KEYS + 200)
        .map(|i| Request::Put {
            key: key(i),
            value: Bytes::from(format!("c{i}")),
        })
        .collect();
    rt.block_on(client_calls(&c.addr, more));
    let dels = (0..KEYS / 2)
        .step_by(5)
        .map(|i| Request::Delete { key: key(i) })
        .collect();
    rt.block_on(client_calls(&c.addr, dels));
    c.kill_coordinator();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    file.set_len(synced_len).unwrap();
    drop(file);
    c.restart();
    let gets = (0..KEYS + 200)
        .map(|i| Request::Get { key: key(i) })
        .collect();
    let answers = rt.block_on(client_calls(&c.addr, gets));
    for (i, answer) in answers.into_iter().enumerate() {
        let want = if i >= KEYS {
            Some(format!("c{i}"))
        } else if i >= KEYS / 2 {
            Some(format!("b{i}"))
        } else if i % 5 == 0 {
            None
        } else {
            Some(format!("a{i}"))
        };
        match answer {
            Response::Value { value, .. } => {
                assert_eq!(value, want.map(Bytes::from), "m{i}")
            }
            other => panic!("m{i}: {other:?}"),
        }
    }
    c.wait_settled(Duration::from_secs(60));
}

/// A metadata journal write that fails part-way through a group (as on a full disk) stops the
/// coordinator from accepting changes, with a typed error, while reads go on; after a restart
/// the torn group is cut off and every acknowledged write is still there.
#[test]
fn failed_metadata_journal_write_refuses_changes_and_loses_nothing_acknowledged() {
    failed_metadata_journal_write(&[]);
}

/// The same under `--meta-fsync never`, where a write's change is committed by the write's own
/// task into the journal's buffer and the writer thread's periodic flush is what fails: later
/// writes committed that way must be refused too, and the flushed-or-not changes acknowledged
/// before the failure come back from the nodes after the restart.
#[test]
fn failed_metadata_journal_flush_refuses_inline_commits_and_loses_nothing_acknowledged() {
    failed_metadata_journal_write(&["--meta-fsync", "never"]);
}

fn failed_metadata_journal_write(extra_args: &[&str]) {
    let mut c = Cluster::start_with(Options {
        nodes: 3,
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        env: vec![(
            "FAILPOINTS".into(),
            "meta-journal-write=100*off->1*return->off".into(),
        )],
    });
    let rt = runtime();
    let value = |i: usize| Bytes::from(format!("v{i}"));
    // One write at a time, so each is its own group, until the injected failure surfaces.
    let (acked, failure) = rt.block_on(async {
        let client = c.client().await;
        let mut acked = Vec::new();
        for i in 0..2000 {
            let req = Request::Put {
                key: Bytes::from(format!("jw{i}")),
                value: value(i),
            };
            match client.call(req).await {
                Ok(Response::Written { .. }) => acked.push(i),
                Ok(other) => panic!("jw{i}: unexpected answer {other:?}"),
                Err(e) => return (acked, Some(e)),
            }
        }
        (acked, None)
    });
    let failure = failure.expect("the injected journal failure reaches a writer");
    assert!(
        matches!(failure.class(), "indeterminate" | "unavailable"),
        "a typed error, not {failure:?}"
    );
    assert!(
        acked.len() >= 20,
        "only {} writes before the failure",
        acked.len()
    );

    // No further change is accepted, and none is acknowledged; reads are still served.
    let out = c.ringkv(&["--json", "put", "after", "x"]);
    assert!(
        !out.status.success(),
        "a write after the failure was acknowledged"
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error");
    let refused_class = err["error"]["class"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        matches!(refused_class.as_str(), "indeterminate" | "unavailable"),
        "{err}"
    );
    assert_eq!(c.json(&["get", "jw0"])["value"], "v0");

    // Restart without the failpoint: the half-written group is moved aside, and the nodes
    // fill in whatever the journal lacks before clients are served.
    c.kill_coordinator();
    c.opts.env.clear();
    c.restart();
    let aside = discarded_journal_tails(&c);
    assert_eq!(aside, 1, "the torn group is kept aside");
    for &i in &acked {
        assert_eq!(
            c.json(&["get", &format!("jw{i}")])["value"],
            format!("v{i}"),
            "acknowledged write jw{i} lost"
        );
    }
    if refused_class == "unavailable" {
        // Definitely not applied: it must not appear after the restart either.
        assert!(c.json(&["get", "after"])["value"].is_null());
    }
    // The journal takes changes again.
    c.json(&["put", "after", "y"]);
    assert_eq!(c.json(&["get", "after"])["value"], "y");
    c.wait_settled(Duration::from_secs(60));
}

/// A node's file-size limit stands in for a full disk: writes past it fail (EFBIG) as they
/// would with no space left.
const FILE_SIZE_LIMIT: u64 = 2 << 20;

#[test]
fn a_node_whose_zeros_do_not_fit_writes_until_full_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Under `--fsync always` the log is written 4 MiB ahead in zeros, which do not fit: they
    // stop at the limit, and the records go into them until they are full. `info`, so that
    // the node's own log stays far below the limit.
    let env = [("RUST_LOG", "info")];
    let mut node = NodeProcess::start_with(dir.path(), None, &["--fsync", "always"], &env, |cmd| {
        use nix::sys::resource::{setrlimit, Resource};
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only setrlimit runs, one system call, and turning its
        // error into an io::Error allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                setrlimit(Resource::RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT)
                    .map_err(std::io::Error::from)
            });
        }
    });
    let rt = runtime();
    let value = |i: u64| Bytes::from(vec![b'a' + (i % 26) as u8; 1000]);
    let key = |i: u64| Bytes::from(format!("full-{i}"));
    let (acked, in_flight) = rt.block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        let mut acked = Vec::new();
        // Twice what the limit holds: the log must run out of room on the way.
        for i in 0..(2 * FILE_SIZE_LIMIT / 1000) {
            let store = (key(i), Version(i + 1), value(i));
            let answer = client
                .call(Request::Store {
                    key: store.0.clone(),
                    version: store.1,
                    value: Some(store.2.clone()),
                })
                .await;
            match answer {
                Ok(Response::Stored { applied: true, .. }) => acked.push(store),
                // Refused (the log failed) or the node stopped: the store's fate is unknown.
                _ => return (acked, Some(store)),
            }
        }
        (acked, None)
    });
    in_flight.expect("a store past the file-size limit must fail");
    // A failed write of the zeros did not fail the stores: about the limit's worth of them
    // were acknowledged, and the log is as long as the limit lets it be.
    assert!(
        acked.len() as u64 > FILE_SIZE_LIMIT / 2 / 1000,
        "only {} stores acknowledged",
        acked.len()
    );
    // A failed log write stops the node with an error, not a signal: a restart replays the log.
    let status = node.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(
        log.contains("cannot write the file ahead in zeros") && log.contains("File too large"),
        "the fallback and the failed write are logged: {log}"
    );
    let log_len = std::fs::metadata(dir.path().join("ringkv.log"))
        .unwrap()
        .len();
    assert_eq!(log_len, FILE_SIZE_LIMIT);

    // With room again, every acknowledged store is there, and writes go on.
    let node = NodeProcess::start(dir.path(), None, &["--fsync", "always"], &[]);
    rt.block_on(assert_holds(&node.addr, &acked, None));
    rt.block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        let answer = client
            .call(Request::Store {
                key: Bytes::from_static(b"after"),
                version: Version(1 << 40),
                value: Some(Bytes::from_static(b"v")),
            })
            .await
            .unwrap();
        assert!(
            matches!(answer, Response::Stored { applied: true, .. }),
            "{answer:?}"
        );
    });
}
