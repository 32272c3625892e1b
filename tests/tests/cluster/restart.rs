//! A coordinator stopped with SIGTERM and started again on its data directory serves every
//! acknowledged key.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use ringkv_common::protocol::{Request, Response};
use ringkv_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_keys_survive_a_graceful_restart() {
    let mut c = Cluster::start(5);
    let client = c.client().await;
    let puts = (0..1000).map(|i| {
        let client = client.clone();
        async move {
            let req = Request::Put {
                key: Bytes::from(format!("key-{i:04}")),
                value: Bytes::from(format!("value-{i}")),
            };
            client.call(req).await
        }
    });
    for r in futures::future::join_all(puts).await {
        assert!(matches!(r, Ok(Response::Written { .. })), "{r:?}");
    }
    // Late replicas catch up: every key on three distinct nodes.
    c.wait_healthy(Duration::from_secs(60));
    for i in 0..1000 {
        let key = Bytes::from(format!("key-{i:04}"));
        let Response::Located(loc) = client.call(Request::Locate { key }).await.unwrap() else {
            panic!("locate")
        };
        let nodes: HashSet<_> = loc.replicas.iter().map(|r| r.node).collect();
        assert_eq!(nodes.len(), 3, "key-{i:04}: {loc:?}");
    }
    drop(client);

    let status = c.stop();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    assert!(
        c.processes().is_empty(),
        "SIGTERM stops the nodes too: {:?}",
        c.processes()
    );

    c.restart();
    let client = c.client().await;
    for i in 0..1000 {
        let key = Bytes::from(format!("key-{i:04}"));
        match client.call(Request::Get { key }).await {
            Ok(Response::Value { value, .. }) => {
                assert_eq!(value, Some(Bytes::from(format!("value-{i}"))), "key-{i:04}")
            }
            other => panic!("key-{i:04}: {other:?}"),
        }
    }
    assert_eq!(
        c.status()["nodes"].as_array().unwrap().len(),
        5,
        "no extra nodes spawned"
    );
}
