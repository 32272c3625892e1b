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

#[test]
fn a_scan_of_the_largest_keys_comes_in_pages_that_fit_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&dir.path().join("node"), None, &["--fsync", "never"], &[]);
    runtime().block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        // 600 keys of 60 KiB: 36 MiB of keys, more than a frame holds in one page of 5,000
        // (what reconciliation asks for).
        let key = |i: u64| {
            let mut key = vec![b'x'; 60 * 1024];
            key[..8].copy_from_slice(&i.to_be_bytes());
            Bytes::from(key)
        };
        for i in 0..600u64 {
            let store = Request::Store {
                key: key(i),
                version: Version(i + 1),
                value: Some(Bytes::from("v")),
            };
            let answer = client.call_timeout(store, ANSWER_WITHIN).await.unwrap();
            assert!(matches!(answer, Response::Stored { .. }), "{answer:?}");
        }
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let scan = Request::Scan { after, limit: 5000 };
            match client.call_timeout(scan, ANSWER_WITHIN).await.unwrap() {
                Response::Scanned { entries, next } => {
                    pages += 1;
                    seen.extend(entries.into_iter().map(|e| e.key));
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                answer => panic!("{answer:?}"),
            }
        }
        assert!(pages > 1, "36 MiB of keys in one page");
        assert_eq!(seen, (0..600).map(key).collect::<Vec<_>>());
        // The connection is still there.
        let fetch = Request::Fetch { key: key(7) };
        match client.call_timeout(fetch, ANSWER_WITHIN).await.unwrap() {
            Response::Fetched { version, .. } => assert_eq!(version, Version(8)),
            answer => panic!("{answer:?}"),
        }
    });
}
