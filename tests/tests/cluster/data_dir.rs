//! A data directory belongs to one process: a second coordinator or node started on a
//! directory in use is refused with a clear error, and the running one is undisturbed.

use std::process::{Command, Stdio};
use std::time::Duration;

use ringkv_tests::{bin_dir, wait_child, wait_for, Cluster};

/// Run `cmd` to completion within a deadline (killed if it overruns), returning whether it
/// succeeded and what it printed on stderr.
fn run_briefly(cmd: &mut Command) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_child(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("still running on a directory in use: {e}"));
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
    }
    (status.success(), stderr)
}

#[test]
fn a_second_process_on_a_data_directory_in_use_is_refused() {
    let c = Cluster::start(3);
    c.json(&["put", "k", "v"]);

    let (ok, stderr) = run_briefly(
        Command::new(bin_dir().join("ringkv-coordinator"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(c.data_dir())
            .arg("--nodes")
            .arg("0"),
    );
    assert!(!ok, "a second coordinator must not start");
    assert!(
        stderr.contains("is in use by another process (pid"),
        "stderr: {stderr}"
    );

    let node_dir = c.data_dir().join("nodes").join("node-1");
    assert!(node_dir.is_dir(), "node 1's directory");
    let (ok, stderr) = run_briefly(
        Command::new(bin_dir().join("ringkv-node"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&node_dir),
    );
    assert!(!ok, "a second node must not start on node 1's directory");
    assert!(
        stderr.contains("is in use by another process (pid"),
        "stderr: {stderr}"
    );

    // The cluster carries on as before.
    assert_eq!(c.json(&["get", "k"])["value"], "v");
    // Acknowledged by two replicas, so the third may have come only now.
    wait_for("three replicas of the key", Duration::from_secs(30), || {
        (c.status()["under_replicated"] == 0).then_some(())
    })
    .unwrap();
}
