//! Replicated put/get/delete through the `ringkv` binary, with the `--json` shapes scripts use.

use std::collections::HashSet;
use std::time::Duration;

use ringkv_tests::Cluster;
use serde_json::json;

#[test]
fn put_get_del_locate_status_over_the_cli() {
    let c = Cluster::start(5);

    let put = c.json(&["put", "greeting", "hello world"]);
    assert_eq!(put["key"], "greeting");
    let v1 = put["version"].as_u64().expect("version");

    let got = c.json(&["get", "greeting"]);
    assert_eq!(got["key"], "greeting");
    assert_eq!(got["value"], "hello world");
    assert_eq!(got["version"], v1);

    // The write was acknowledged by two replicas; the third may still be on its way.
    c.wait_healthy(Duration::from_secs(30));
    let loc = c.json(&["locate", "greeting"]);
    assert_eq!(loc["version"], v1);
    let replicas = loc["replicas"].as_array().expect("replicas");
    let nodes: HashSet<u64> = replicas
        .iter()
        .map(|r| r["node"].as_u64().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3, "three distinct replicas: {loc}");
    for r in replicas {
        assert_eq!(r["state"], "up");
        assert_eq!(
            r["version"], v1,
            "every replica holds the acknowledged version"
        );
        assert!(r["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }

    let put2 = c.json(&["put", "greeting", "bonjour"]);
    let v2 = put2["version"].as_u64().unwrap();
    assert!(v2 > v1, "versions increase");
    assert_eq!(c.json(&["get", "greeting"])["value"], "bonjour");

    let del = c.json(&["del", "greeting"]);
    assert_eq!(del["key"], "greeting");
    assert!(del["version"].as_u64().unwrap() > v2);
    let gone = c.json(&["get", "greeting"]);
    assert_eq!(gone["value"], json!(null));

    let missing = c.json(&["get", "never-written"]);
    assert_eq!(missing["value"], json!(null));
    assert_eq!(missing["key"], "never-written");

    let status = c.status();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 5);
    let mut pids = HashSet::new();
    for n in nodes {
        assert_eq!(n["state"], "up");
        let pid = n["pid"].as_u64().expect("spawned nodes have a pid");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is a live process"
        );
        pids.insert(pid);
        assert!(n["keys"].is_u64() && n["bytes"].is_u64());
    }
    assert_eq!(pids.len(), 5, "five separate processes");
    assert_eq!(status["keys"], 0, "the only key was deleted");
    assert_eq!(status["under_replicated"], 0);

    // Human output.
    let out = c.ringkv(&["get", "never-written"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "(nil)");
}

#[test]
fn value_from_stdin_is_binary_safe() {
    let c = Cluster::start(3);
    let value: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let out = c.ringkv_stdin(&["--json", "put", "blob", "-"], Some(&value));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.ringkv(&["get", "blob"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, value, "raw bytes come back unchanged");
}

#[test]
fn unknown_node_id_is_a_clear_error() {
    let c = Cluster::start(3);
    for verb in ["kill", "pause", "resume", "remove"] {
        let out = c.ringkv(&["node", verb, "999"]);
        assert!(!out.status.success(), "node {verb} 999 must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("999") && err.contains("not_found"),
            "{verb}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_client_writes_land_on_three_nodes() {
    use bytes::Bytes;
    use ringkv_common::protocol::{Request, Response};

    let c = Cluster::start(5);
    let client = c.client().await;
    // 1,000 puts in flight on one connection.
    let puts = (0..1000).map(|i| {
        let client = client.clone();
        async move {
            let req = Request::Put {
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from(format!("v{i}")),
            };
            client.call(req).await
        }
    });
    for r in futures::future::join_all(puts).await {
        assert!(matches!(r, Ok(Response::Written { .. })), "{r:?}");
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    for i in (0..1000).step_by(7) {
        let key = Bytes::from(format!("k{i}"));
        // The quorum answered; the third replica's store may still be on its way.
        loop {
            match client
                .call(Request::Locate { key: key.clone() })
                .await
                .unwrap()
            {
                Response::Located(loc) => {
                    // Distinct nodes that hold the acknowledged version itself.
                    let nodes: HashSet<_> = loc
                        .replicas
                        .iter()
                        .filter(|r| r.version == Some(loc.version))
                        .map(|r| r.node)
                        .collect();
                    assert!(nodes.len() >= 2, "quorum at least: {loc:?}");
                    if nodes.len() == 3 {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "never on three nodes: {loc:?}"
                    );
                }
                other => panic!("{other:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        match client.call(Request::Get { key }).await.unwrap() {
            Response::Value { value, .. } => assert_eq!(value, Some(Bytes::from(format!("v{i}")))),
            other => panic!("{other:?}"),
        }
    }
}

/// `--worker-threads` sizes the coordinator's runtime and `--node-worker-threads` is handed
/// to every spawned node; a zero is refused before anything starts.
#[test]
fn explicit_worker_counts_are_passed_on() {
    let c = ringkv_tests::Cluster::start_with(ringkv_tests::Options {
        nodes: 3,
        extra_args: vec![
            "--worker-threads".into(),
            "3".into(),
            "--node-worker-threads".into(),
            "2".into(),
        ],
        ..ringkv_tests::Options::default()
    });
    c.json(&["put", "k", "v"]);
    assert_eq!(c.json(&["get", "k"])["value"], "v");
    let status = c.status();
    for id in 1..=3 {
        let pid = ringkv_tests::node_pid(&status, id).expect("node pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("node cmdline");
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        assert!(
            args.windows(2)
                .any(|w| w[0] == b"--worker-threads" && w[1] == b"2"),
            "node {id}: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut refused =
        std::process::Command::new(ringkv_tests::bin_dir().join("ringkv-coordinator"))
            .args([
                "--worker-threads",
                "0",
                // Were the zero ever accepted, no node would be left running.
                "--nodes",
                "0",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let status = ringkv_tests::wait_child(&mut refused, std::time::Duration::from_secs(30))
        .expect("refused at once");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("--worker-threads"), "{stderr}");
}

/// `status` says where acknowledged writes spent their time: with every node fsync slowed by
/// 200 ms (a failpoint in the nodes; far longer than a journal fsync takes), the wait for the write quorum carries it, and the
/// metadata commit (one fsync of the coordinator's journal) does not.
#[test]
fn status_shows_where_writes_spend_their_time() {
    let c = ringkv_tests::Cluster::start_with(ringkv_tests::Options {
        nodes: 3,
        // Spawned nodes inherit the coordinator's environment.
        env: vec![("FAILPOINTS".into(), "log-before-fsync=sleep(200)".into())],
        ..ringkv_tests::Options::default()
    });
    assert_eq!(c.status()["writes"]["count"], 0, "no write yet");
    for i in 0..8 {
        c.json(&["put", &format!("slow{i}"), "v"]);
    }
    let status = c.status();
    let writes = &status["writes"];
    assert_eq!(writes["count"], 8, "{writes}");
    let avg = |field: &str| writes[field].as_u64().expect(field) / 8;
    assert!(avg("quorum_wait_us") >= 200_000, "{writes}");
    assert!(
        avg("commit_wait_us") < avg("quorum_wait_us"),
        "the slowed fsyncs are the nodes': {writes}"
    );
    let text = String::from_utf8(c.ringkv(&["status"]).stdout).expect("utf-8");
    assert!(text.contains("writes: 8 acknowledged"), "{text}");
}
