//! `ringkv bench` against a real cluster: it runs, and its `--json` report is well-formed.
//! Only the shape and the invariants are checked, never how fast anything was.

use ringkv_tests::Cluster;
use serde_json::Value;

#[test]
fn bench_reports_well_formed_figures() {
    let c = Cluster::start(3);
    // The run without preloading goes last, after the others wrote their keys: it reads keys
    // of its own, so every read is still a miss.
    for (workload, pipeline, preload) in
        [("get", "1", true), ("put", "8", true), ("get", "8", false)]
    {
        let mut args = vec![
            "--json",
            "bench",
            "--workload",
            workload,
            "--pipeline",
            pipeline,
            "--connections",
            "4",
            "--keys",
            "200",
            "--value-size",
            "64",
            "--duration",
            "2s",
            "--warmup",
            "200ms",
        ];
        if !preload {
            args.push("--no-preload");
        }
        let out = c.ringkv(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bench {workload} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("bench printed invalid JSON ({e}): {stdout}"));
        assert_eq!(report["target"], "ringkv", "{report}");
        assert_eq!(report["workload"], workload, "{report}");
        assert_eq!(report["error_total"], 0, "{report}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        let stages = &report["write_stages_us"];
        if !preload {
            // Its keys were never written, whatever the runs before wrote.
            assert_eq!(report["preload"], Value::Null, "{report}");
            assert_eq!(report["misses"], report["reads"], "{report}");
            assert!(report["reads"].as_u64().unwrap() > 0, "{report}");
        } else if workload == "get" {
            assert_eq!(report["misses"], 0, "every key was preloaded: {report}");
            assert_eq!(report["preload"]["keys"], 200, "{report}");
            assert_eq!(*stages, Value::Null, "no write during the run: {report}");
        } else {
            assert_eq!(report["preload"], Value::Null, "{report}");
            // The coordinator counted every write of the window, and those of the warm-up.
            let counted = stages["writes"].as_u64().expect("write_stages_us.writes");
            assert!(counted >= report["writes"].as_u64().unwrap(), "{report}");
            assert!(stages["quorum"].as_f64().expect("quorum") > 0.0, "{report}");
        }
        let ops = report["ops"].as_u64().expect("ops");
        assert!(ops > 0, "{report}");
        assert_eq!(
            ops,
            report["reads"].as_u64().unwrap() + report["writes"].as_u64().unwrap()
        );
        assert!(report["throughput"].as_f64().expect("throughput") > 0.0);
        let latency = |p: &str| report["latency_us"][p].as_f64().expect(p);
        let (p50, p99, p999, max) = (
            latency("p50"),
            latency("p99"),
            latency("p99_9"),
            latency("max"),
        );
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
            "{report}"
        );
    }
}
