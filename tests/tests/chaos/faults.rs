//! The CI chaos run: 60 s of clients under node kills, pauses and coordinator kills, which
//! must find nothing wrong.

use std::time::Duration;

use crate::util::{one_run_at_a_time, ChaosRun};

/// The seed, unless `RINGKV_CHAOS_SEED` picks another (to repeat a failure, or explore).
fn seed() -> String {
    std::env::var("RINGKV_CHAOS_SEED").unwrap_or_else(|_| "20240601".into())
}

#[test]
fn sixty_seconds_of_kill_pause_and_coordinator_kill_pass() {
    let _turn = one_run_at_a_time();
    let seed = seed();
    let mut run = ChaosRun::run(
        &[
            "--duration",
            "60s",
            "--nemesis",
            "kill,pause,coordinator-kill",
            "--seed",
            &seed,
        ],
        Duration::from_secs(600),
    );
    let r = run.report.clone();
    run.check(
        run.code == Some(0),
        "chaos reported a violation (exit code not 0)",
    );
    run.check(r["valid"] == true, "report not valid");
    for check in ["lost_writes", "linearizability", "replica_audit"] {
        run.check(
            r["checks"][check]["valid"] == true,
            &format!("{check} failed"),
        );
    }
    // The run did real work, and the nemesis did its job.
    run.check(
        r["ops"]["ok"].as_u64().unwrap_or(0) > 1000,
        "too few successful operations",
    );
    for kind in ["put", "get", "del"] {
        run.check(
            r["ops"]["by_kind"][kind]["ok"].as_u64().unwrap_or(0) > 0,
            &format!("no successful {kind}"),
        );
    }
    for fault in ["kill", "pause", "coordinator-kill"] {
        run.check(
            r["faults"]["by_kind"][fault].as_u64().unwrap_or(0) > 0,
            &format!("no {fault} fault injected"),
        );
    }
    run.check(
        r["faults"]["not_ok"] == 0,
        "a fault could not be injected or healed as planned",
    );
    run.check(
        r["checks"]["lost_writes"]["acknowledged_writes"]
            .as_u64()
            .unwrap_or(0)
            > 500,
        "too few acknowledged writes to judge",
    );
}
