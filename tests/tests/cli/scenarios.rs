//! Every scenario in `examples/scenarios/` passes against a fresh five-node cluster.

use std::path::PathBuf;

use ringkv_tests::Cluster;

use crate::util::{run_script, show};

/// The scenarios that have a test below; a new file must be added here to be run.
const SCENARIOS: &[&str] = &[
    "add-then-decommission",
    "kill-two-replicas",
    "kill-while-writing",
    "pause-past-timeout",
];

fn scenario_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/scenarios")
}

/// Run `examples/scenarios/NAME.ringkv` on a fresh cluster; returns its stdout and stderr.
fn run(name: &str) -> (String, String) {
    let c = Cluster::start(5);
    let path = scenario_dir().join(format!("{name}.ringkv"));
    let out = run_script(&c, &path);
    assert!(
        out.status.success(),
        "scenario {name} failed: {}",
        show(&out)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_scenario_file_is_tested() {
    let mut found: Vec<String> = std::fs::read_dir(scenario_dir())
        .expect("examples/scenarios exists")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "ringkv").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    found.sort();
    assert_eq!(
        found, SCENARIOS,
        "add new scenarios to SCENARIOS and give them a test"
    );
}

#[test]
fn scenario_kill_while_writing() {
    let (stdout, _) = run("kill-while-writing");
    assert!(stdout.contains("node 2 is down"), "{stdout}");
}

#[test]
fn scenario_pause_past_timeout() {
    let (stdout, _) = run("pause-past-timeout");
    assert!(stdout.contains("node 3 is up"), "{stdout}");
}

#[test]
fn scenario_add_then_decommission() {
    let (stdout, stderr) = run("add-then-decommission");
    assert!(stdout.contains("OK: added node 6"), "{stdout}");
    assert!(stdout.contains("OK: node 1 removed"), "{stdout}");
    // Not a terminal: the decommission's progress comes as plain lines on stderr.
    assert!(stderr.contains("node remove 1: "), "{stderr}");
}

#[test]
fn scenario_kill_two_replicas() {
    let (stdout, _) = run("kill-two-replicas");
    assert!(
        stdout.contains("ok: hot = \"written after the repair\""),
        "{stdout}"
    );
}
