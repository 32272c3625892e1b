//! Bad input: oversized keys and values, garbage and oversized frames on every port.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use ringkv_common::client::{Batching, CallError, Client};
use ringkv_common::codec::FrameCodec;
use ringkv_common::protocol::{Envelope, Reply, Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
use ringkv_common::{Version, WireError};
use ringkv_tests::Cluster;

#[test]
fn too_large_key_and_value_are_refused_and_write_nothing() {
    let c = Cluster::start(3);
    let big_key = "k".repeat(64 * 1024 + 1);
    let out = c.ringkv(&["--json", "put", &big_key, "v"]);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["class"], "too_large", "{err}");

    let big_value = vec![b'x'; 16 * 1024 * 1024 + 1];
    let out = c.ringkv_stdin(&["--json", "put", "k", "-"], Some(&big_value));
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["class"], "too_large", "{err}");
    assert_eq!(c.json(&["get", "k"])["value"], serde_json::Value::Null);
    assert_eq!(c.status()["keys"], 0);

    // The CLI refuses both before sending anything, so ask the servers themselves: the
    // coordinator over the client protocol, and a node over the coordinator's.
    let node_addr = c.status()["nodes"][0]["addr"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = c.client().await;
        let node = ringkv_tests::node_client(&node_addr, Some(&c.cluster_token()))
            .await
            .unwrap();
        let oversized = [
            (
                Bytes::from(big_key.clone()),
                Bytes::from_static(b"v"),
                "key",
            ),
            (
                Bytes::from_static(b"k"),
                Bytes::from(big_value.clone()),
                "value",
            ),
        ];
        for (key, value, what) in oversized {
            let put = Request::Put {
                key: key.clone(),
                value: value.clone(),
            };
            let store = Request::Store {
                key,
                version: Version(1),
                value: Some(value),
            };
            for (server, answer) in [
                ("coordinator", client.call(put).await),
                ("node", node.call(store).await),
            ] {
                match answer {
                    Err(CallError::Remote(WireError::TooLarge { what: w, .. })) => {
                        assert_eq!(w, what, "{server}")
                    }
                    other => panic!("{server} answered a too-large {what} with {other:?}"),
                }
            }
        }
        match node
            .call(Request::Fetch {
                key: Bytes::from_static(b"k"),
            })
            .await
        {
            Ok(Response::Fetched { value: None, .. }) => {}
            other => panic!("the node stored a refused value: {other:?}"),
        }
    });
    assert_eq!(c.json(&["get", "k"])["value"], serde_json::Value::Null);
    assert_eq!(c.status()["keys"], 0);
}

/// Every answer in `bytes`, a server's replies before it closed the connection.
fn answers(bytes: &[u8]) -> Vec<Envelope<Reply>> {
    let mut codec = FrameCodec::<Envelope<Request>, Envelope<Reply>>::new(1 << 20);
    let mut buf = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(Ok(env))) = tokio_util_codec::Decoder::decode(&mut codec, &mut buf) {
        out.push(env);
    }
    out
}

/// The class of the one connection-level refusal (id 0) in `reply`, failing otherwise.
fn refusal_class(addr: &str, reply: &[u8], what: &str) -> &'static str {
    match answers(reply).as_slice() {
        [Envelope { id: 0, msg: Err(e) }] => e.class(),
        other => panic!("{addr} answered {what} with {other:?}, not one typed refusal"),
    }
}

/// Send `bytes` on a fresh connection (then, with `eof`, end our side) and read until the
/// server closes it; fails if the server keeps the connection open for 10 s.
fn poke(addr: &str, bytes: &[u8], eof: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close before it has read everything; what it did then is the point.
    let _ = s.write_all(bytes);
    if eof {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // Closed with our bytes unread: a reset, which is a close too.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{addr} kept the connection open after {bytes:02x?}: {e}"),
    }
    out
}

#[test]
fn garbage_closes_only_its_own_connection() {
    let c = Cluster::start(3);
    c.json(&["put", "before", "1"]);

    // A client holding an open connection throughout.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let steady = rt.block_on(c.client());

    let node_addrs: Vec<String> = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["addr"].as_str().unwrap().to_string())
        .collect();
    let mut targets = vec![c.addr.clone()];
    targets.extend(node_addrs);

    for addr in &targets {
        // Oversized length prefix: answered (or just closed), never buffered.
        let reply = poke(addr, &u32::MAX.to_be_bytes(), false);
        assert!(
            reply.len() < 1024,
            "{addr} answered an oversized frame briefly"
        );
        assert_eq!(
            refusal_class(addr, &reply, "an oversized frame"),
            "too_large"
        );
        // Random garbage (its first four bytes read as a length far over the limit).
        let reply = poke(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
        assert_eq!(refusal_class(addr, &reply, "garbage"), "too_large");
        // A well-framed payload with a wrong checksum, where the handshake should be.
        let mut frame = 8u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        let reply = poke(addr, &frame, false);
        assert_eq!(refusal_class(addr, &reply, "a bad checksum"), "bad_request");
        // Truncated frame then EOF: nothing left to answer, only the close.
        let reply = poke(addr, &[0, 0, 0, 50, 1, 2], true);
        assert!(answers(&reply).is_empty(), "{addr}: {reply:02x?}");
    }

    // Everyone else is still served, including the connection that was open all along.
    let v = rt.block_on(async {
        steady
            .call(ringkv_common::protocol::Request::Get {
                key: bytes::Bytes::from_static(b"before"),
            })
            .await
    });
    assert!(
        matches!(
            v,
            Ok(ringkv_common::protocol::Response::Value { value: Some(_), .. })
        ),
        "{v:?}"
    );
    c.json(&["put", "after", "2"]);
    assert_eq!(c.json(&["get", "after"])["value"], "2");
    assert_eq!(c.json(&["get", "before"])["value"], "1");
    for n in c.status()["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "up", "no node was taken down by garbage");
    }
}

#[test]
fn unknown_message_gets_bad_request_and_connection_survives() {
    use bytes::BytesMut;
    use ringkv_common::codec::FrameCodec;
    use ringkv_common::protocol::{Envelope, Request, Role, PROTOCOL_VERSION};
    use tokio_util_codec::*;

    let c = Cluster::start(3);
    let mut s = TcpStream::connect(&c.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    let mut codec =
        FrameCodec::<Envelope<Request>, Envelope<ringkv_common::protocol::Reply>>::new(1 << 20);
    codec
        .encode(
            Envelope {
                id: 1,
                msg: Request::Hello {
                    protocol: PROTOCOL_VERSION,
                    role: Role::Client,
                    token: None,
                },
            },
            &mut buf,
        )
        .unwrap();
    // A message the server has never heard of, with a valid frame and checksum.
    #[derive(serde::Serialize)]
    enum Alien {
        Teleport { to: String },
    }
    impl ringkv_common::wire_fast::FastMessage for Alien {}
    let mut alien = BytesMut::new();
    FrameCodec::<Envelope<Alien>, ()>::new(1 << 20)
        .encode(
            Envelope {
                id: 2,
                msg: Alien::Teleport { to: "mars".into() },
            },
            &mut alien,
        )
        .unwrap();
    buf.extend_from_slice(&alien);
    codec
        .encode(
            Envelope {
                id: 3,
                msg: Request::Get {
                    key: bytes::Bytes::from_static(b"x"),
                },
            },
            &mut buf,
        )
        .unwrap();
    s.write_all(&buf).unwrap();

    let mut answers = std::collections::HashMap::new();
    let mut inbuf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    while answers.len() < 3 {
        let n = s.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "connection closed early; answers so far: {answers:?}"
        );
        inbuf.extend_from_slice(&chunk[..n]);
        while let Some(item) = codec.decode(&mut inbuf).unwrap() {
            let env = item.unwrap();
            answers.insert(env.id, env.msg);
        }
    }
    match &answers[&2] {
        Err(ringkv_common::WireError::BadRequest(msg)) => assert!(msg.contains("unknown"), "{msg}"),
        other => panic!("alien message answered with {other:?}"),
    }
    assert!(answers[&3].is_ok(), "the request after it is still served");
}

#[test]
fn protocol_version_mismatch_is_refused_clearly() {
    use bytes::BytesMut;
    use ringkv_common::codec::FrameCodec;
    use ringkv_common::protocol::{Envelope, Request, Role};
    use tokio_util_codec::*;

    let c = Cluster::start(3);
    let mut codec =
        FrameCodec::<Envelope<Request>, Envelope<ringkv_common::protocol::Reply>>::new(1 << 20);
    let mut buf = BytesMut::new();
    codec
        .encode(
            Envelope {
                id: 1,
                msg: Request::Hello {
                    protocol: 999,
                    role: Role::Client,
                    token: None,
                },
            },
            &mut buf,
        )
        .unwrap();
    let reply = poke(&c.addr, &buf, false);
    let mut inbuf = BytesMut::from(&reply[..]);
    let env = codec
        .decode(&mut inbuf)
        .unwrap()
        .expect("an answer")
        .unwrap();
    assert!(
        matches!(
            env.msg,
            Err(ringkv_common::WireError::ProtocolMismatch { client: 999, .. })
        ),
        "{:?}",
        env.msg
    );
}

/// The codec traits, re-exported under a name that does not clash with std.
mod tokio_util_codec {
    pub use tokio_util::codec::{Decoder, Encoder};
}

/// A peer that registers as a node under an id no coordinator hands out is refused, and the
/// next node still gets the next id: the highest id known plus one cannot overflow.
#[test]
fn a_node_id_beyond_the_range_is_refused_and_ids_go_on() {
    let c = Cluster::start(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A peer that says it is a node, registering under `id` (nothing listens at its address).
    let addr = c.addr.clone();
    let token = c.cluster_token();
    let register = |id: u64| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let peer = Client::connect_as(
                &addr,
                Role::Node,
                Some(&token),
                DEFAULT_MAX_FRAME_LEN,
                Batching::Off,
            )
            .await
            .unwrap();
            let register = Request::Register {
                node: Some(ringkv_common::NodeId(id)),
                addr: "127.0.0.1:1".into(),
                pid: 1,
                data_dir: "/nonexistent".into(),
            };
            peer.call_timeout(register, Duration::from_secs(20)).await
        }
    };
    rt.block_on(async {
        for id in [u64::MAX, ringkv_common::NodeId::MAX.0 + 1, 0] {
            match register(id).await {
                Err(CallError::Remote(WireError::BadRequest(m))) => {
                    assert!(m.contains("outside"), "{id}: {m}")
                }
                other => panic!("node id {id} was not refused: {other:?}"),
            }
        }
    });
    let added = c.json(&["node", "add"]);
    assert_eq!(added["node"], 4, "{added}");
    let ids: Vec<u64> = c.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert!(ids.iter().all(|id| (1..=4).contains(id)), "{ids:?}");

    // The highest id is a node's to take; after it, no id is left to hand out, and adding a
    // node says so instead of handing out one that registration would refuse.
    let answer = rt.block_on(register(ringkv_common::NodeId::MAX.0));
    assert!(
        matches!(answer, Ok(Response::Registered { .. })),
        "{answer:?}"
    );
    let out = c.ringkv(&["--json", "node", "add"]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "{answer}");
    assert_eq!(answer["error"]["class"], "unavailable", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no node ids left")),
        "{answer}"
    );
}

/// Only the coordinator and its nodes may take the peer roles: a peer that says it is a node
/// to the coordinator, or the coordinator to a node, without the cluster token (or with
/// another) is refused at its hello, and a node started without it does not join. The
/// cluster carries on, and with the token the same peers are served.
#[test]
fn peer_roles_need_the_cluster_token() {
    let c = Cluster::start(3);
    let token = c.cluster_token();
    let node_addr = c.status()["nodes"][0]["addr"].as_str().unwrap().to_string();
    let rt = ringkv_tests::runtime();
    let refused = |result: Result<Client, CallError>, who: &str| match result {
        Err(CallError::Remote(WireError::BadRequest(m))) => {
            assert!(m.contains("token"), "{who}: {m}")
        }
        Err(other) => panic!("{who}: refused for another reason: {other}"),
        Ok(_) => panic!("{who}: admitted without the cluster token"),
    };
    rt.block_on(async {
        for given in [None, Some("not-the-token"), Some("")] {
            let as_node = Client::connect_as(
                &c.addr,
                Role::Node,
                given,
                DEFAULT_MAX_FRAME_LEN,
                Batching::Off,
            )
            .await;
            refused(as_node, &format!("a node with {given:?}"));
            let as_coordinator = ringkv_tests::node_client(&node_addr, given).await;
            refused(as_coordinator, &format!("a coordinator with {given:?}"));
        }
        // Clients need no token.
        let client = c.client().await;
        client
            .call(Request::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
            })
            .await
            .expect("a client's put");
        // With the token, the node answers its coordinator's requests.
        let node = ringkv_tests::node_client(&node_addr, Some(&token))
            .await
            .expect("the node admits its coordinator");
        let fetched = node
            .call(Request::Fetch {
                key: Bytes::from_static(b"absent"),
            })
            .await;
        assert!(
            matches!(fetched, Ok(Response::Fetched { .. })),
            "{fetched:?}"
        );
    });

    // A node started by hand without the token is told why, and never joins.
    let dir = c.dir.path().join("tokenless");
    let _tokenless = ringkv_tests::NodeProcess::start(&dir, Some(&c.addr), &[], &[]);
    ringkv_tests::wait_for(
        "the tokenless node to report its refusal",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(dir.join("node.log")).ok()?;
            (log.contains("the coordinator refused this node")
                && log.contains("must present this cluster's token"))
            .then_some(())
        },
    )
    .unwrap();
    let status = c.status();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(c.json(&["get", "k"])["value"], "v");

    // An empty token (`$(cat WRONG-PATH)`) is an error, not "no token".
    let child = std::process::Command::new(ringkv_tests::bin_dir().join("ringkv-node"))
        .arg("--data-dir")
        .arg(c.dir.path().join("empty-token"))
        .args(["--coordinator", &c.addr])
        .env(ringkv_common::cluster_token::ENV, " \n")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = ringkv_tests::output_within(child, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the cluster token is empty"), "{stderr}");
}
