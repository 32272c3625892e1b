//! `ringkv run SCRIPT`: echo, expectations, waits, substitutions and failures by line number.

use ringkv_tests::Cluster;
use serde_json::Value;

use crate::util::{run_script, show, write_script};

#[test]
fn a_script_stops_at_its_first_unmet_expectation_and_names_the_line() {
    let c = Cluster::start(3);

    // Checked before anything runs: a bad line 3 means line 1 is never sent.
    let bad = write_script(&c, "bad.ringkv", "put early 1\n\nwait state 2 asleep\n");
    let out = run_script(&c, &bad);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3: unknown node state"),
        "{}",
        show(&out)
    );
    assert_eq!(c.json(&["get", "early"])["value"], Value::Null);

    let script = "\
# set up
put a 1
let key = a
expect get $key 1
expect missing b   # never written

expect get a 2
put never reached
";
    let path = write_script(&c, "unmet.ringkv", script);
    let out = run_script(&c, &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr.contains("line 7: expected get a = \"2\", got \"1\""),
        "{}",
        show(&out)
    );
    // Each line is echoed with its number and its expansion, then its result.
    for echoed in [
        "[2] put a 1\nOK (version 1)\n",
        "[4] expect get $key 1  (expect get a 1)\nok: a = \"1\"\n",
        "[5] expect missing b   # never written  (expect missing b)\nok: b is missing\n",
        "[7] expect get a 2\n",
    ] {
        assert!(stdout.contains(echoed), "{echoed:?} in {}", show(&out));
    }
    assert!(
        !stdout.contains("[1]"),
        "comments are not echoed: {}",
        show(&out)
    );
    assert!(!stdout.contains("[8]"), "{}", show(&out));
    assert_eq!(c.json(&["get", "never"])["value"], Value::Null);
}

#[test]
fn waits_substitutions_and_failures() {
    let c = Cluster::start(3);
    let script = "\
put k v
let holder = $(replica k 1)
wait state $holder up 5s
wait healthy 5s
try node kill 99
echo the holder is $holder
repeat 3 put r$i v$i
bg repeat 5 put b$i v$i
wait bg 10s
repeat 5 expect get b$i v$i
wait healthy 5s
check
";
    let path = write_script(&c, "ok.ringkv", script);
    let out = run_script(&c, &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", show(&out));
    let holder = c.json(&["locate", "k"])["replicas"][0]["node"].clone();
    assert!(
        stdout.contains(&format!("the holder is {holder}\n")),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("[7] repeat 3 put r$i v$i\n3 rounds done"),
        "{}",
        show(&out)
    );
    assert!(stdout.contains("1 background line done"), "{}", show(&out));
    assert!(
        stdout.contains("healthy: 9/9 keys healthy"),
        "{}",
        show(&out)
    );
    assert!(
        stderr.contains("error: not_found: node 99 (carrying on: try)"),
        "{}",
        show(&out)
    );
    assert!(stdout.contains("passed in"), "{}", show(&out));
    assert_eq!(c.json(&["get", "r3"])["value"], "v3");

    // A wait that times out fails its line; a bad substitution fails its line too.
    let path = write_script(&c, "timeout.ringkv", "wait state 1 down 300ms\n");
    let out = run_script(&c, &path);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("line 1: expected node 1 to be down within 300ms, got up"),
        "{}",
        show(&out)
    );
    let path = write_script(
        &c,
        "subst.ringkv",
        "# one\nnode kill $(replica nowhere 1)\n",
    );
    let out = run_script(&c, &path);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("line 2: $(replica nowhere 1): key \"nowhere\" was never written"),
        "{}",
        show(&out)
    );
    // A script that cannot be read is a usage error.
    let out = c.ringkv(&["run", "/nonexistent/script.ringkv"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}
