//! A coordinator whose reads accept any replica's version (the `bug-read-any-version`
//! failpoint, armed through its environment) serves values it must not: chaos must say so.
//!
//! Listed replicas never hold a version older than the metadata's, so what the broken path
//! exposes is a write still in flight: one read returns the new value, a later one the old
//! (deleted) state. That is a race, so the run is set up to make it common (many clients on
//! two keys at a time, a third of the writes deletes, pauses that keep a frozen node `up`
//! for 3 s so reads stall and retry elsewhere), and repeated with fresh seeds until caught.

use std::time::Duration;

use crate::util::{one_run_at_a_time, ChaosRun};

/// Runs tried before concluding the checker misses the bug. One 30 s run catches it more
/// often than not; six make a miss about as likely as 1 in 250.
const ATTEMPTS: u64 = 6;

#[test]
fn reads_of_any_version_are_caught() {
    let _turn = one_run_at_a_time();
    let mut misses = Vec::new();
    for attempt in 0..ATTEMPTS {
        let seed = (21 + attempt).to_string();
        let mut run = ChaosRun::run(
            &[
                "--duration",
                "30s",
                "--nemesis",
                "pause",
                "--nemesis-interval",
                "1s",
                "--down-timeout",
                "5s",
                "--suspect-timeout",
                "3s",
                "--clients",
                "12",
                "--keys",
                "60",
                "--hot-keys",
                "2",
                "--mix",
                "40:30:30",
                "--seed",
                &seed,
                "--coordinator-env",
                "FAILPOINTS=bug-read-any-version=return",
            ],
            Duration::from_secs(600),
        );
        let r = run.report.clone();
        if run.code == Some(0) {
            run.check(
                r["valid"] == true,
                "exit code 0 but the report is not valid",
            );
            misses.push(seed);
            continue;
        }
        run.check(
            run.code == Some(1),
            "a violation must exit with code 1 (not a setup error)",
        );
        run.check(r["valid"] == false, "non-zero exit but a valid report");
        let lin = &r["checks"]["linearizability"];
        run.check(
            lin["valid"] == false && lin["violations"].as_u64().unwrap_or(0) > 0,
            "the violation is not a linearizability one",
        );
        run.check(
            lin["examples"][0]["context"]
                .as_array()
                .is_some_and(|c| !c.is_empty()),
            "the violation comes without the operations around it",
        );
        let listed = r["violations"].as_array().is_some_and(|v| {
            v.iter()
                .any(|l| l.as_str().is_some_and(|s| s.starts_with("linearizability")))
        });
        run.check(
            listed,
            "the report's violations do not name linearizability",
        );
        return;
    }
    panic!("{ATTEMPTS} runs with bug-read-any-version passed (seeds {misses:?})");
}
