//! A storage node's scan: the sort of every key that starts one runs off the node's table
//! lock and async worker, so the node answers other requests meanwhile.

use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use ringkv_common::client::Client;
use ringkv_common::protocol::{Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
use ringkv_common::Version;
use ringkv_tests::{runtime, NodeProcess};

const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn a_node_answers_requests_while_a_scan_sorts_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    // The sort that starts a scan waits until this file exists, which the test makes only
    // after the fetch behind the scan has been answered.
    let gate = dir.path().join("sort-may-finish");
    let gated_sort = [(
        "FAILPOINTS",
        format!("node-scan-sort=return({})", gate.display()),
    )];
    let gated_sort: Vec<(&str, &str)> = gated_sort.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = NodeProcess::start(&dir.path().join("node"), None, &[], &gated_sort);
    runtime().block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        for i in (0..50u64).rev() {
            let store = Request::Store {
                key: Bytes::from(format!("k{i:02}")),
                version: Version(i + 1),
                value: Some(Bytes::from("v")),
            };
            let answer = client.call_timeout(store, ANSWER_WITHIN).await.unwrap();
            assert!(matches!(answer, Response::Stored { .. }), "{answer:?}");
        }
        let scan = Request::Scan {
            after: None,
            limit: 100,
        };
        // The first poll queues the scan; the fetch goes out behind it on the same connection,
        // so the node has started the scan when it reads the fetch.
        let mut scanning = Box::pin(client.call_timeout(scan, ANSWER_WITHIN));
        assert!((&mut scanning).now_or_never().is_none());
        let fetch = Request::Fetch {
            key: Bytes::from("k07"),
        };
        match client.call_timeout(fetch, ANSWER_WITHIN).await.unwrap() {
            Response::Fetched { version, .. } => assert_eq!(version, Version(8)),
            answer => panic!("{answer:?}"),
        }
        assert!(
            (&mut scanning).now_or_never().is_none(),
            "the scan was answered before its sort could finish"
        );
        std::fs::write(&gate, b"").unwrap();
        match scanning.await.unwrap() {
            Response::Scanned { entries, next } => {
                let keys: Vec<String> = entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.key).into_owned())
                    .collect();
                let expected: Vec<String> = (0..50).map(|i| format!("k{i:02}")).collect();
                assert_eq!(keys, expected, "every key, in order");
                assert!(next.is_none());
            }
            answer => panic!("{answer:?}"),
        }
    });
}
