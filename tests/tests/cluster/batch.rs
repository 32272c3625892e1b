//! Batches of node requests: a storage node answers every request of a `Batch` under its own
//! id, applies them in order, and what it acknowledged in a batch survives a SIGKILL.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use ringkv_common::client::{Batching, Client};
use ringkv_common::codec::FrameCodec;
use ringkv_common::protocol::{
    Envelope, Reply, Request, Response, Role, DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use ringkv_common::{Version, WireError};
use ringkv_tests::{runtime, NodeProcess};
use tokio_util::codec::Framed;

fn store(key: &str, version: u64, value: &str) -> Request {
    Request::Store {
        key: Bytes::from(key.to_string()),
        version: Version(version),
        value: Some(Bytes::from(value.to_string())),
    }
}

fn fetch(key: &str) -> Request {
    Request::Fetch {
        key: Bytes::from(key.to_string()),
    }
}

fn forget(key: &str, version: u64) -> Request {
    Request::Forget {
        key: Bytes::from(key.to_string()),
        version: Version(version),
    }
}

/// Send one raw `Batch` frame to the node at `addr` and return its answers.
async fn send_batch(addr: &str, requests: Vec<(u64, Request)>) -> Vec<Envelope<Reply>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut conn = Framed::new(
        stream,
        FrameCodec::<Envelope<Request>, Envelope<Reply>>::new(DEFAULT_MAX_FRAME_LEN),
    );
    let hello = Request::Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Coordinator,
        token: None,
    };
    conn.send(Envelope { id: 1, msg: hello }).await.unwrap();
    let batch = requests
        .into_iter()
        .map(|(id, msg)| Envelope { id, msg })
        .collect();
    conn.send(Envelope {
        id: 2,
        msg: Request::Batch(batch),
    })
    .await
    .unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), conn.next())
            .await
            .expect("an answer within 10 s")
            .expect("the connection stays open")
            .expect("a readable frame")
            .expect("a decodable answer");
        match next {
            Envelope { id: 1, .. } => continue, // the handshake
            Envelope {
                id: 2,
                msg: Ok(Response::Batch(answers)),
            } => return answers,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

/// A client that carries the requests queued together in batches, as the coordinator's does.
async fn batching_client(addr: &str) -> Client {
    Client::connect_with(addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN, Batching::On)
        .await
        .expect("connect to the node")
}

/// How long a test waits for any one answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

async fn fetch_from(client: &Client, key: &str) -> (Version, Option<Bytes>) {
    match client
        .call_timeout(fetch(key), ANSWER_WITHIN)
        .await
        .expect("fetch")
    {
        Response::Fetched { version, value } => (version, value),
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn a_node_answers_each_request_of_a_batch_in_order_and_keeps_its_writes_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path(), None, &[], &[]);
    let rt = runtime();
    let answers = rt.block_on(send_batch(
        &node.addr,
        vec![
            (10, store("k1", 5, "one")),
            (11, store("k1", 3, "older")),
            (12, fetch("k1")),
            (13, store("k2", 6, "two")),
            (14, forget("k2", 6)),
            (15, fetch("k2")),
            (16, store("k3", 0, "version zero is reserved")),
            (17, Request::Status),
            (18, store("k4", 7, "four")),
            (
                19,
                store(
                    "k5",
                    u64::MAX,
                    "beyond every version a coordinator hands out",
                ),
            ),
        ],
    ));
    let ids: Vec<u64> = answers.iter().map(|a| a.id).collect();
    assert_eq!(
        ids,
        (10..=19).collect::<Vec<_>>(),
        "one answer per request, in order"
    );
    let msgs: Vec<&Reply> = answers.iter().map(|a| &a.msg).collect();
    let stored = |applied, version| {
        Ok(Response::Stored {
            applied,
            version: Version(version),
        })
    };
    assert_eq!(msgs[0], &stored(true, 5));
    assert_eq!(
        msgs[1],
        &stored(false, 5),
        "an older version does not apply"
    );
    assert_eq!(
        msgs[2],
        &Ok(Response::Fetched {
            version: Version(5),
            value: Some(Bytes::from_static(b"one"))
        }),
        "a fetch sees the stores before it in the batch"
    );
    assert_eq!(msgs[3], &stored(true, 6));
    assert_eq!(msgs[4], &Ok(Response::Done));
    assert_eq!(
        msgs[5],
        &Ok(Response::Fetched {
            version: Version::ZERO,
            value: None
        })
    );
    assert!(
        matches!(msgs[6], Err(WireError::BadRequest(m)) if m.contains("version 0")),
        "{:?}",
        msgs[6]
    );
    assert!(
        matches!(msgs[7], Err(WireError::BadRequest(m)) if m.contains("status")),
        "{:?}",
        msgs[7]
    );
    assert_eq!(
        msgs[8],
        &stored(true, 7),
        "a refused request does not stop the rest"
    );
    assert!(
        matches!(msgs[9], Err(WireError::BadRequest(m)) if m.contains("above the highest")),
        "{:?}",
        msgs[9]
    );

    // SIGKILL: no chance to flush. What the batch acknowledged is in the log.
    node.child.kill().unwrap();
    node.wait_exit(Duration::from_secs(10));
    let node = NodeProcess::start(dir.path(), None, &[], &[]);
    rt.block_on(async {
        let client = Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
        assert_eq!(
            fetch_from(&client, "k1").await,
            (Version(5), Some(Bytes::from_static(b"one")))
        );
        assert_eq!(fetch_from(&client, "k2").await, (Version::ZERO, None));
        assert_eq!(fetch_from(&client, "k3").await, (Version::ZERO, None));
        assert_eq!(fetch_from(&client, "k5").await, (Version::ZERO, None));
        assert_eq!(
            fetch_from(&client, "k4").await,
            (Version(7), Some(Bytes::from_static(b"four")))
        );
    });
}

#[test]
fn stores_a_batching_client_had_acknowledged_survive_a_sigkill_of_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path(), None, &[], &[]);
    let rt = runtime();
    const KEYS: u64 = 2000;
    let acked: Vec<u64> = rt.block_on(async {
        let client = batching_client(&node.addr).await;
        // Many calls at once: the writer carries them in batches.
        let calls = (1..=KEYS).map(|i| {
            let client = client.clone();
            async move {
                let req = store(&format!("key-{i}"), i, &format!("value-{i}"));
                match client.call_timeout(req, ANSWER_WITHIN).await {
                    Ok(Response::Stored { applied: true, .. }) => Some(i),
                    other => panic!("key-{i}: {other:?}"),
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    });
    assert_eq!(acked.len() as u64, KEYS);
    node.child.kill().unwrap();
    node.wait_exit(Duration::from_secs(10));
    let node = NodeProcess::start(dir.path(), None, &[], &[]);
    rt.block_on(async {
        let client = batching_client(&node.addr).await;
        let reads = acked.iter().map(|&i| {
            let client = client.clone();
            async move { (i, fetch_from(&client, &format!("key-{i}")).await) }
        });
        for (i, (version, value)) in futures::future::join_all(reads).await {
            assert_eq!(version, Version(i), "key-{i}");
            assert_eq!(value, Some(Bytes::from(format!("value-{i}"))), "key-{i}");
        }
    });
}

#[test]
fn a_batch_of_reads_whose_values_exceed_a_frame_is_answered_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), None, &["--fsync", "never"], &[]);
    // One thread: the three fetches are queued before the writer runs, so they travel in one
    // batch, whose answer (3 x 12 MiB) is larger than a frame may be (32 MiB).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let value = |i: u8| Bytes::from(vec![b'a' + i; 12 << 20]);
    rt.block_on(async {
        let client = batching_client(&node.addr).await;
        for i in 0..3u8 {
            let req = Request::Store {
                key: Bytes::from(format!("big-{i}")),
                version: Version(u64::from(i) + 1),
                value: Some(value(i)),
            };
            let stored = client.call_timeout(req, ANSWER_WITHIN).await;
            assert!(
                matches!(stored, Ok(Response::Stored { applied: true, .. })),
                "{stored:?}"
            );
        }
        let reads = (0..3u8).map(|i| {
            let client = client.clone();
            async move { (i, fetch_from(&client, &format!("big-{i}")).await) }
        });
        for (i, (version, got)) in futures::future::join_all(reads).await {
            assert_eq!(version, Version(u64::from(i) + 1));
            assert!(got == Some(value(i)), "big-{i} came back whole");
        }
    });
}

#[test]
fn when_the_log_fails_no_write_of_the_batch_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Every fsync fails: the append of the batch's writes cannot be made durable.
    let failing = [("FAILPOINTS", "log-before-fsync=return")];
    let mut node = NodeProcess::start(dir.path(), None, &[], &failing);
    let rt = runtime();
    let answers = rt.block_on(send_batch(
        &node.addr,
        vec![
            (10, store("k1", 5, "one")),
            // Finds version 5 already there (from the store above) and does not apply: its
            // answer must not claim that version 5 is stored either.
            (11, store("k1", 5, "one")),
            (12, fetch("k1")),
            (13, forget("k9", 1)),
        ],
    ));
    let failed = |id: u64| {
        answers
            .iter()
            .find(|a| a.id == id)
            .is_some_and(|a| matches!(a.msg, Err(WireError::Internal(_))))
    };
    assert!(failed(10), "{answers:?}");
    assert!(
        failed(11),
        "a store that found the unsynced version: {answers:?}"
    );
    assert!(failed(13), "{answers:?}");
    assert!(
        answers.iter().any(|a| a.id == 12 && a.msg.is_ok()),
        "reads of the batch are still answered: {answers:?}"
    );
    // The table may now hold what the file does not: the node stops, with an error, so
    // that a restart replays the log.
    let status = node.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{status:?}");
    let node = NodeProcess::start(dir.path(), None, &[], &[]);
    let (version, _) = rt.block_on(async {
        let client = batching_client(&node.addr).await;
        fetch_from(&client, "k1").await
    });
    // The write reached the file, only its fsync failed: the store may have applied.
    assert!(
        version == Version(5) || version == Version::ZERO,
        "{version:?}"
    );
}

#[test]
fn a_timed_fsync_that_fails_stops_the_node_though_no_write_follows() {
    let dir = tempfile::tempdir().unwrap();
    // Under `interval` a store is answered once written; the fsync after it fails.
    let failing = [("FAILPOINTS", "log-before-fsync=return")];
    let mut node = NodeProcess::start(dir.path(), None, &["--fsync", "interval:50ms"], &failing);
    let answers = runtime().block_on(send_batch(&node.addr, vec![(1, store("k", 1, "v"))]));
    assert!(
        matches!(
            answers.as_slice(),
            [Envelope {
                id: 1,
                msg: Ok(Response::Stored { applied: true, .. })
            }]
        ),
        "{answers:?}"
    );
    // Nothing else is sent: the node notices the failed log by itself and stops.
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status:?}");
}

#[test]
fn a_store_that_finds_its_version_waits_for_the_fsync_of_the_store_that_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    // Every fsync takes 2 s: the first store's answer waits that long.
    let slow = [("FAILPOINTS", "log-before-fsync=sleep(2000)")];
    let node = NodeProcess::start(dir.path(), None, &[], &slow);
    runtime().block_on(async {
        let connect = || Client::connect(&node.addr, Role::Coordinator, DEFAULT_MAX_FRAME_LEN);
        let (first, second) = (connect().await.unwrap(), connect().await.unwrap());
        let reader = batching_client(&node.addr).await;
        let wait = Duration::from_secs(30);
        // The first store's fsync starts after this, so it ends 2 s after it at the earliest.
        let sent = tokio::time::Instant::now();
        let writing = tokio::spawn({
            let first = first.clone();
            async move { first.call_timeout(store("k", 5, "v"), wait).await }
        });
        // Once the table has it, the same store again (a repair's copy, say) finds version 5.
        let deadline = tokio::time::Instant::now() + wait;
        while fetch_from(&reader, "k").await.0 != Version(5) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the store never applied"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let again = second.call_timeout(store("k", 5, "v"), wait).await;
        let answered = sent.elapsed();
        assert!(
            matches!(
                again,
                Ok(Response::Stored {
                    applied: false,
                    version: Version(5)
                })
            ),
            "{again:?}"
        );
        // Its answer says version 5 is stored, so it must not come before that fsync.
        assert!(
            answered >= Duration::from_millis(1900),
            "answered {answered:?} after the first store was sent, before its fsync was done"
        );
        let written = writing.await.unwrap();
        assert!(
            matches!(written, Ok(Response::Stored { applied: true, .. })),
            "{written:?}"
        );
    });
}

#[test]
fn a_batch_over_the_limit_is_refused_for_every_request_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), None, &[], &[]);
    let limit = ringkv_common::protocol::MAX_BATCH_REQUESTS as u64;
    let requests = (0..=limit)
        .map(|i| (100 + i, store(&format!("k{i}"), i + 1, "v")))
        .collect();
    let answers = runtime().block_on(send_batch(&node.addr, requests));
    assert_eq!(answers.len() as u64, limit + 1, "every request is answered");
    assert!(
        answers
            .iter()
            .all(|a| matches!(&a.msg, Err(WireError::BadRequest(m)) if m.contains("limit"))),
        "{:?}",
        answers.first()
    );
    // Nothing of the refused batch was stored.
    runtime().block_on(async {
        let client = batching_client(&node.addr).await;
        assert_eq!(fetch_from(&client, "k0").await, (Version::ZERO, None));
    });
}

/// The sum over all nodes of what `nodes --json` reports: requests, messages, log fsyncs.
fn node_totals(c: &ringkv_tests::Cluster) -> (u64, u64, u64) {
    let nodes = c.json(&["nodes"]);
    let sum = |field: &str| {
        nodes["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n[field].as_u64().expect(field))
            .sum::<u64>()
    };
    (sum("ops"), sum("messages"), sum("syncs"))
}

/// The coordinator's own traffic forms batches: 2,000 puts in flight on one client connection
/// reach the nodes in far fewer messages than requests, and each message costs at most one
/// fsync. With `--no-node-batching` every request is a message of its own.
#[test]
fn pipelined_puts_reach_the_nodes_in_batches_unless_batching_is_off() {
    const PUTS: u64 = 2000;
    for batching in [true, false] {
        let extra_args = if batching {
            Vec::new()
        } else {
            vec!["--no-node-batching".to_string()]
        };
        let c = ringkv_tests::Cluster::start_with(ringkv_tests::Options {
            nodes: 3,
            extra_args,
            ..ringkv_tests::Options::default()
        });
        let before = node_totals(&c);
        runtime().block_on(async {
            let client = c.client().await;
            let puts = (0..PUTS).map(|i| {
                let client = client.clone();
                async move {
                    let req = Request::Put {
                        key: Bytes::from(format!("k{i}")),
                        value: Bytes::from(format!("v{i}")),
                    };
                    client.call_timeout(req, ANSWER_WITHIN).await
                }
            });
            for r in futures::future::join_all(puts).await {
                assert!(matches!(r, Ok(Response::Written { .. })), "{r:?}");
            }
        });
        // The counters arrive with heartbeats; every put stored on all three nodes.
        let (ops, messages, syncs) = ringkv_tests::wait_for(
            "the nodes to report the stores",
            Duration::from_secs(20),
            || {
                let now = node_totals(&c);
                let ops = now.0 - before.0;
                (ops >= 3 * PUTS).then_some((ops, now.1 - before.1, now.2 - before.2))
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", node_totals(&c), c.log_tail()));
        if batching {
            assert!(
                messages * 4 <= ops,
                "{ops} requests in {messages} messages: too few per batch"
            );
            assert!(
                syncs <= messages,
                "{syncs} fsyncs for {messages} messages: a batch costs at most one"
            );
        } else {
            assert_eq!(messages, ops, "without batching every request is a message");
        }
        // Every store is synced (`--node-fsync always`), so the count cannot be zero.
        assert!(syncs > 0, "no fsyncs counted for {ops} stores");
    }
}
