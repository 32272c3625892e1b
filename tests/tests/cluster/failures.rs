//! Failure handling with real processes and real signals: kills, pauses, and shrinking below
//! three nodes. Every test proves that acknowledged writes survive.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use ringkv_tests::{assert_acked_readable, node_pid, runtime, signal, wait_for, Cluster, Writer};
use serde_json::Value;

#[test]
fn kill_a_node_while_writing_then_heal() {
    let c = Cluster::start(5);
    let rt = runtime();
    let writer = Writer::start(&rt, &c.addr, "w", 300);
    wait_for("some writes", Duration::from_secs(30), || {
        (c.status()["keys"].as_u64()? >= 100).then_some(())
    })
    .unwrap();

    let pid = node_pid(&c.status(), 2).expect("node 2 pid");
    signal(pid, Signal::SIGKILL);
    c.wait_state(2, "down", Duration::from_secs(10));
    // Writes go on, and are acknowledged, with the node gone.
    writer.wait_progress(100, Duration::from_secs(30));
    let log = writer.finish(&rt);
    assert!(
        log.acked.len() >= 100,
        "writer made progress: {}",
        log.acked.len()
    );

    let report = c.wait_settled(Duration::from_secs(60));
    assert_eq!(report["lost"], 0);
    assert_eq!(
        report["keys"].as_u64().unwrap(),
        c.status()["keys"].as_u64().unwrap()
    );
    assert_acked_readable(&rt, &c.addr, &log);
    // Nothing lives on the dead node any more.
    for key in log.acked.keys().take(50) {
        assert!(!c.replicas(key).contains(&2), "{key} still lists node 2");
    }
}

#[test]
fn kill_two_of_a_keys_three_replicas_at_once() {
    let c = Cluster::start(5);
    let rt = runtime();
    for i in 0..50 {
        c.json(&["put", &format!("k{i}"), &format!("v{i}")]);
    }
    c.json(&["put", "precious", "do not lose me"]);
    c.wait_healthy(Duration::from_secs(30));
    let holders = c.replicas("precious");
    assert_eq!(holders.len(), 3);
    let status = c.status();
    let victims: Vec<u32> = holders[..2]
        .iter()
        .map(|id| node_pid(&status, *id).unwrap())
        .collect();
    for pid in &victims {
        signal(*pid, Signal::SIGKILL);
    }
    // Served by the one survivor even before the failure detector has caught up.
    let got = c.json(&["get", "precious"]);
    assert_eq!(got["value"], "do not lose me");
    for id in &holders[..2] {
        c.wait_state(*id, "down", Duration::from_secs(10));
    }
    // Three nodes remain: enough for three replicas of everything.
    c.wait_healthy(Duration::from_secs(60));
    assert_eq!(c.json(&["get", "precious"])["value"], "do not lose me");
    for i in 0..50 {
        assert_eq!(c.json(&["get", &format!("k{i}")])["value"], format!("v{i}"));
    }
    let now = c.replicas("precious");
    assert!(now.iter().all(|n| !holders[..2].contains(n)), "{now:?}");
    drop(rt);
}

#[test]
fn paused_node_never_serves_stale_or_deleted_values() {
    let c = Cluster::start(4);
    let rt = runtime();
    let mut expected: BTreeMap<String, Option<String>> = BTreeMap::new();
    for i in 0..120 {
        let (k, v) = (format!("p{i}"), format!("old-{i}"));
        c.json(&["put", &k, &v]);
        expected.insert(k, Some(v));
    }
    c.wait_healthy(Duration::from_secs(30));

    let victim = 3u64;
    let pid = node_pid(&c.status(), victim).unwrap();
    let on_victim: Vec<String> = expected
        .keys()
        .filter(|k| c.replicas(k).contains(&victim))
        .cloned()
        .collect();
    assert!(on_victim.len() > 20, "victim holds a share of keys");

    signal(pid, Signal::SIGSTOP);
    c.wait_state(victim, "down", Duration::from_secs(10));
    for (i, k) in on_victim.iter().enumerate() {
        if i % 3 == 0 {
            c.json(&["del", k]);
            expected.insert(k.clone(), None);
        } else {
            let v = format!("new-{i}");
            c.json(&["put", k, &v]);
            expected.insert(k.clone(), Some(v));
        }
    }
    signal(pid, Signal::SIGCONT);
    // Read everything repeatedly while the node comes back and is reconciled.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    loop {
        for (k, v) in &expected {
            let got = c.json(&["get", k]);
            let want = v.clone().map_or(Value::Null, Value::String);
            assert_eq!(got["value"], want, "key {k} after resume (round {rounds})");
        }
        rounds += 1;
        let healthy = c.ringkv(&["check"]).status.success();
        if c.node_state(victim).as_deref() == Some("up") && healthy && rounds >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not heal\n{}",
            c.log_tail()
        );
    }
    drop(rt);
}

#[test]
fn fewer_than_three_nodes_degrades_then_recovers() {
    let c = Cluster::start(3);
    c.json(&["put", "a", "1"]);
    let status = c.status();
    assert_eq!(status["degraded"], false);

    // Two of three up: writes still meet the quorum of two.
    signal(node_pid(&status, 1).unwrap(), Signal::SIGKILL);
    c.wait_state(1, "down", Duration::from_secs(10));
    assert_eq!(c.status()["degraded"], true);
    c.json(&["put", "b", "2"]);
    assert_eq!(c.json(&["get", "a"])["value"], "1");

    // One up: writes are refused as unavailable (definitely not applied).
    signal(node_pid(&status, 2).unwrap(), Signal::SIGKILL);
    c.wait_state(2, "down", Duration::from_secs(10));
    let out = c.ringkv(&["--json", "put", "c", "3"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["class"], "unavailable", "{err}");
    assert_eq!(c.json(&["get", "c"])["value"], Value::Null);
    assert_eq!(c.json(&["get", "b"])["value"], "2");

    // Adding nodes brings the cluster back to three replicas by itself.
    c.json(&["node", "add"]);
    c.json(&["node", "add"]);
    let report = c.wait_healthy(Duration::from_secs(60));
    assert_eq!(report["keys"], 2);
    assert_eq!(c.status()["degraded"], false);
    c.json(&["put", "c", "3"]);
    assert_eq!(c.json(&["get", "c"])["value"], "3");
}

#[test]
fn join_and_decommission_while_writing() {
    let c = Cluster::start(5);
    let rt = runtime();
    let keys = 1500usize;
    rt.block_on(async {
        use bytes::Bytes;
        use ringkv_common::protocol::Request;
        let client = c.client().await;
        let puts = (0..keys).map(|i| {
            let client = client.clone();
            async move {
                client
                    .call(Request::Put {
                        key: Bytes::from(format!("m{i}")),
                        value: Bytes::from(format!("v{i}")),
                    })
                    .await
                    .expect("put");
            }
        });
        futures::future::join_all(puts).await;
    });
    c.wait_healthy(Duration::from_secs(60));

    let writer = Writer::start(&rt, &c.addr, "live", 200);
    let added = c.json(&["node", "add"]);
    let new_id = added["node"].as_u64().expect("new node id");
    c.wait_settled(Duration::from_secs(90));
    // Moved replicas: those now on the new node. Ideal share: 3/(N+1) of all replicas.
    // A node's key count in `status` comes with its heartbeats, so it may lag a little.
    let on_new = || {
        c.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == new_id)
            .and_then(|n| n["keys"].as_u64())
            .unwrap()
    };
    let total_keys = c.status()["keys"].as_u64().unwrap() as f64;
    let ideal = total_keys * 3.0 / 6.0;
    let moved = wait_for(
        "the new node to report its share",
        Duration::from_secs(10),
        || {
            let n = on_new();
            ((n as f64) >= ideal * 0.5).then_some(n)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: join moved too little: {}", on_new()));
    assert!(
        (moved as f64) <= ideal * 1.15,
        "join moved {moved} replicas, ideal {ideal:.0}"
    );

    // Decommission node 1 while the writer keeps going.
    let pid1 = node_pid(&c.status(), 1).unwrap();
    c.json(&["node", "remove", "1"]);
    assert_eq!(c.node_state(1).as_deref(), Some("removed"));
    wait_exited(pid1, "node 1");
    let log = writer.finish(&rt);
    assert!(!log.acked.is_empty());
    let report = c.wait_settled(Duration::from_secs(90));
    assert_eq!(report["lost"], 0);
    assert_acked_readable(&rt, &c.addr, &log);
    assert_read_back_off_node(&c, "m", (0..keys).step_by(37), 1);
}

/// A node that stopped answering can still be decommissioned: here it is paused and removed
/// at once, so it goes from up to leaving and is never judged down (a leaving node keeps its
/// state whatever its heartbeats say). Its copies are unlisted rather than forgotten on it (a
/// forget it cannot answer would keep them listed, and the removal would never end), every
/// key is copied to three live nodes, and the node is stopped.
#[test]
fn a_node_that_stopped_answering_is_decommissioned() {
    let c = Cluster::start(4);
    let keys = 60;
    for i in 0..keys {
        c.json(&["put", &format!("p{i}"), &format!("v{i}")]);
    }
    let pid1 = node_pid(&c.status(), 1).unwrap();
    c.json(&["node", "pause", "1"]);
    c.json_within(&["node", "remove", "1"], Duration::from_secs(60));
    assert_eq!(c.node_state(1).as_deref(), Some("removed"));
    wait_exited(pid1, "node 1");
    let report = c.wait_settled(Duration::from_secs(60));
    assert_eq!(report["lost"], 0, "{report}");
    assert_read_back_off_node(&c, "p", 0..keys, 1);
}

/// Removing a node that is not answering, while some of its keys have no other replica up,
/// cannot copy them anywhere: it is refused, naming how many keys and one of them, instead
/// of waiting for the client to time out, and the node stays leaving. With --accept-loss the
/// keys are given up (unlisted from it) and the removal ends.
#[test]
fn removing_a_dead_node_whose_keys_have_no_other_live_replica_says_so() {
    let c = Cluster::start(6);
    c.json(&["put", "only-here", "v"]);
    let holders = c.replicas("only-here");
    assert_eq!(holders.len(), 3, "{holders:?}");
    // All three at once, so that no copy is made from one while another is already gone.
    c.signal_nodes_at_once(&holders, Signal::SIGKILL);
    c.wait_nodes_in_state(&holders, "down", Duration::from_secs(10));
    let first = holders[0].to_string();
    let out = c.ringkv_within(
        &["--json", "node", "remove", &first],
        Duration::from_secs(60),
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "{answer}");
    assert_eq!(answer["error"]["class"], "unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no other replica that is up") && message.contains("only-here"),
        "{answer}"
    );
    assert_eq!(c.node_state(holders[0]).as_deref(), Some("leaving"));

    c.json_within(
        &["node", "remove", &first, "--accept-loss"],
        Duration::from_secs(60),
    );
    assert_eq!(c.node_state(holders[0]).as_deref(), Some("removed"));
    assert!(
        !c.replicas("only-here").contains(&holders[0]),
        "{}",
        c.json(&["locate", "only-here"])
    );
}

/// A node on another machine listens on every interface and tells the coordinator the
/// address it is reached at: here `localhost:PORT` for a node listening on 127.0.0.1:PORT.
#[test]
fn a_hand_started_node_registers_the_address_it_advertises() {
    let c = Cluster::start(3);
    // A free port, for an address known before the node starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let advertised = format!("localhost:{port}");
    let _node = ringkv_tests::NodeProcess::start(
        &c.dir.path().join("advertising"),
        Some(&c.addr),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--advertise",
            &advertised,
        ],
        &[(ringkv_common::cluster_token::ENV, &c.cluster_token())],
    );
    let id = wait_for("the node registered", Duration::from_secs(30), || {
        c.status()["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["addr"] == advertised.as_str())?["id"]
            .as_u64()
    })
    .unwrap();
    // Reached at that address: it comes up and takes replicas.
    c.wait_state(id, "up", Duration::from_secs(10));
    c.json(&["put", "k", "v"]);
    assert_eq!(c.json(&["get", "k"])["value"], "v");
}

#[test]
fn node_started_by_hand_joins_and_receives_its_share() {
    let c = Cluster::start(3);
    for i in 0..300 {
        c.json(&["put", &format!("h{i}"), &format!("v{i}")]);
    }
    c.wait_settled(Duration::from_secs(30));
    let dir = c.dir.path().join("hand-started");
    let node = c.start_node(&dir, &[]);
    // It registers without an id, is given one, and remembers it.
    let id: u64 = wait_for("the node id file", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("node-id"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .unwrap();
    assert_eq!(id, 4, "the next free id");
    c.wait_state(id, "up", Duration::from_secs(10));
    c.wait_settled(Duration::from_secs(60));
    // Heartbeats carry the node's key count; wait for one after the migration.
    let held = wait_for("the new node's share", Duration::from_secs(10), || {
        let held = c.status()["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == id)?["keys"]
            .as_u64()?;
        (held >= 150).then_some(held)
    })
    .unwrap();
    // Four nodes, three replicas each: the newcomer holds about three quarters of the keys.
    assert!(
        (150..=300).contains(&held),
        "new node holds {held} of 300 keys"
    );
    for i in (0..300).step_by(13) {
        assert_eq!(c.json(&["get", &format!("h{i}")])["value"], format!("v{i}"));
    }
    assert_eq!(
        node_pid(&c.status(), id),
        Some(node.child.id()),
        "status shows the hand-started process"
    );
}

/// Three nodes that the failure detector does not suspect for a long time: the two replicas
/// paused by [`put_with_two_replicas_paused`] are still up when its put arrives, however slow
/// the machine, so the put must wait for them rather than be refused as unavailable.
fn paused_replicas_stay_up(env: Vec<(String, String)>) -> ringkv_tests::Options {
    ringkv_tests::Options {
        nodes: 3,
        extra_args: ["--suspect-timeout", "30s", "--down-timeout", "60s"]
            .map(String::from)
            .to_vec(),
        env,
    }
}

/// Pause two of `key`'s three replicas, put a new value, resume them, and return the put's
/// `--json` answer. Only one replica can store the value while the put is in flight.
fn put_with_two_replicas_paused(c: &Cluster, key: &str) -> Value {
    c.json(&["put", key, "before"]);
    c.wait_healthy(Duration::from_secs(30));
    let status = c.status();
    let paused: Vec<u32> = c
        .replicas(key)
        .iter()
        .skip(1)
        .map(|&id| node_pid(&status, id).expect("replica pid"))
        .collect();
    assert_eq!(paused.len(), 2);
    for &pid in &paused {
        signal(pid, Signal::SIGSTOP);
    }
    let out = c.ringkv(&["--json", "put", key, "after"]);
    for &pid in &paused {
        signal(pid, Signal::SIGCONT);
    }
    serde_json::from_slice(&out.stdout).expect("put prints JSON")
}

/// A write is acknowledged only once a quorum of two replicas stored it: with two of three
/// paused it is not, and it reports that it may have been applied.
#[test]
fn write_is_not_acknowledged_by_one_replica() {
    let c = Cluster::start_with(paused_replicas_stay_up(Vec::new()));
    let answer = put_with_two_replicas_paused(&c, "quorum");
    assert!(
        answer.get("version").is_none(),
        "acknowledged with one replica: {answer}"
    );
    assert_eq!(answer["error"]["class"], "indeterminate", "{answer}");
    // Either outcome is allowed for an indeterminate write, and the replicas agree again.
    c.wait_healthy(Duration::from_secs(60));
    let value = c.json(&["get", "quorum"])["value"].clone();
    assert!(value == "before" || value == "after", "{value}");
}

/// The check above has teeth: a coordinator armed to acknowledge after one replica (the
/// `bug-ack-after-one-replica` failpoint) fails it.
#[test]
fn acknowledging_after_one_replica_is_caught() {
    let c = Cluster::start_with(paused_replicas_stay_up(vec![(
        "FAILPOINTS".into(),
        "bug-ack-after-one-replica=return".into(),
    )]));
    let answer = put_with_two_replicas_paused(&c, "quorum");
    assert!(
        answer.get("version").is_some(),
        "the broken build should acknowledge: {answer}"
    );
}

/// A decommission waits for the writes in flight when it began: a put that chose the leaving
/// node and has its stores on the replicas, but not yet its metadata change, is committed
/// before the node is stopped, and is then moved off it. The key was deleted before, so the
/// metadata lists no live key on the node while the put is in flight.
#[test]
fn a_decommission_waits_for_a_write_in_flight_to_the_leaving_node() {
    let c = Cluster::start_with(ringkv_tests::Options {
        nodes: 5,
        // The failpoint's sleep blocks its worker thread; the others keep serving.
        extra_args: ["--worker-threads", "4"].map(String::from).to_vec(),
        // Every write waits 3 s between its quorum and its metadata change.
        env: vec![(
            "FAILPOINTS".into(),
            "coordinator-before-meta-commit=sleep(3000)".into(),
        )],
    });
    c.json(&["put", "probe", "old"]);
    let deleted = c.json(&["del", "probe"])["version"].as_u64().unwrap();
    let replicas = c.replicas("probe");
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let leaving = replicas[0];
    let leaving_addr = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == leaving)
        .and_then(|n| n["addr"].as_str())
        .unwrap()
        .to_string();

    let (addr, bin) = (c.addr.clone(), ringkv_tests::bin_dir().join("ringkv"));
    let put = std::thread::spawn(move || {
        let mut child = std::process::Command::new(bin)
            .args(["--coordinator", &addr, "--json", "put", "probe", "acked"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = ringkv_tests::wait_child(&mut child, Duration::from_secs(60)).unwrap();
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
        (out, stdout)
    });
    // The put's store has reached the leaving node: it is between its stores and its commit.
    let rt = runtime();
    let token = c.cluster_token();
    wait_for(
        "the put's store on the leaving node",
        Duration::from_secs(30),
        || {
            let held = rt.block_on(async {
                let node = ringkv_tests::node_client(&leaving_addr, Some(&token))
                    .await
                    .ok()?;
                let fetch = ringkv_common::protocol::Request::Fetch {
                    key: bytes::Bytes::from_static(b"probe"),
                };
                match node.call(fetch).await.ok()? {
                    ringkv_common::protocol::Response::Fetched { version, .. } => Some(version.0),
                    _ => None,
                }
            })?;
            (held > deleted).then_some(())
        },
    )
    .unwrap();
    assert!(
        !put.is_finished(),
        "the put is still waiting for its commit"
    );
    c.json(&["node", "remove", &leaving.to_string()]);
    // The put's metadata change is done once the decommission is: the key reads as put.
    assert_eq!(
        c.json(&["get", "probe"])["value"],
        "acked",
        "the decommission ended before the write in flight to its node was committed"
    );
    let (status, stdout) = put.join().unwrap();
    assert!(status.success(), "{stdout}");
    assert_eq!(c.node_state(leaving).as_deref(), Some("removed"));
    // The acknowledged value is on three live replicas, none of them the removed node.
    c.wait_settled(Duration::from_secs(60));
    assert_eq!(c.json(&["get", "probe"])["value"], "acked");
    let after = c.json(&["locate", "probe"]);
    let live: Vec<&Value> = after["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "up" && r["version"] == after["version"])
        .collect();
    assert_eq!(live.len(), 3, "{after}");
    assert!(!c.replicas("probe").contains(&leaving), "{after}");
}

/// Each key `{prefix}{i}` reads back as `v{i}` and is no longer listed on `removed`.
fn assert_read_back_off_node(
    c: &Cluster,
    prefix: &str,
    keys: impl Iterator<Item = usize>,
    removed: u64,
) {
    for i in keys {
        let k = format!("{prefix}{i}");
        assert_eq!(c.json(&["get", &k])["value"], format!("v{i}"));
        assert!(
            !c.replicas(&k).contains(&removed),
            "{k} still on the removed node"
        );
    }
}

/// Wait until process `pid` has exited (gone, or a zombie with an empty command line).
fn wait_exited(pid: u32, what: &str) {
    wait_for(
        &format!("{what}'s process to exit"),
        Duration::from_secs(10),
        || {
            let cmdline = format!("/proc/{pid}/cmdline");
            (!std::path::Path::new(&cmdline).exists()
                || std::fs::read(&cmdline).is_ok_and(|c| c.is_empty()))
            .then_some(())
        },
    )
    .unwrap();
}
