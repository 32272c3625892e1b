//! Runs one parsed [`Command`] against the coordinator and returns a typed [`Outcome`].
//!
//! [`execute`] does no printing and no reading of stdin, so the one-shot binary, the
//! interactive shell and the script runner all share it: they differ only in where a `put KEY -`
//! value comes from and in what they do with the outcome. Each command is one request with its
//! own timeout; nothing here retries, because a retried write after an indeterminate error is
//! the caller's decision.
//!
//! The process exit status is decided here too ([`exit`], [`Outcome::exit_code`],
//! [`error_exit_code`]), so every front end maps results to codes the same way.

use std::time::Duration;

use bytes::Bytes;
use ringkv_common::client::{CallError, Client};
use ringkv_common::protocol::{
    CheckReport, ClusterStatus, Location, NodeSignal, Request, Response, Role,
    DEFAULT_MAX_FRAME_LEN, MAX_KEY_LEN, MAX_VALUE_LEN,
};
use ringkv_common::{NodeId, Version, WireError};

use crate::cli::{Command, NodeCommand, STDIN_VALUE};

/// Process exit codes; the top-level `--help` lists them.
pub mod exit {
    /// The command did what it was asked (`get` of a missing key included).
    pub const OK: u8 = 0;
    /// The coordinator refused the command, or `check` found unhealthy keys.
    pub const FAILED: u8 = 1;
    /// Bad arguments, or the value could not be read from stdin; nothing was sent.
    pub const USAGE: u8 = 2;
    /// No usable connection: cannot connect, connection lost, or no answer in time.
    pub const CONNECTION: u8 = 3;
}

/// The result of one successful command, before it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `put`: the write reached a write quorum at `version`.
    Put { key: String, version: Version },
    /// `del`: the tombstone reached a write quorum at `version`.
    Deleted { key: String, version: Version },
    /// `get`: `value` is `None` when the key does not exist or was deleted.
    Value {
        key: String,
        version: Version,
        value: Option<Bytes>,
    },
    /// `locate`: where the key lives and what each replica holds.
    Located { key: String, location: Location },
    /// `status`: the whole cluster.
    Status(ClusterStatus),
    /// `nodes`: the node list (the rest of the status feeds its one-line summary).
    Nodes(ClusterStatus),
    /// `node add`: the id of the new node.
    NodeAdded { node: NodeId },
    /// `node remove|kill|pause|resume` was carried out.
    NodeChanged { node: NodeId, action: NodeAction },
    /// `check`: the fsck report; unhealthy keys make the exit code non-zero.
    Checked(CheckReport),
}

/// What a `node ...` command did to an existing node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    Removed,
    Killed,
    Paused,
    Resumed,
}

impl NodeAction {
    /// Past-tense verb for human output, e.g. "killed".
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAction::Removed => "removed",
            NodeAction::Killed => "killed",
            NodeAction::Paused => "paused",
            NodeAction::Resumed => "resumed",
        }
    }
}

impl Outcome {
    /// The exit code this outcome stands for: [`exit::OK`] except for an unhealthy `check`.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Checked(report) if !report.is_healthy() => exit::FAILED,
            _ => exit::OK,
        }
    }
}

/// The exit code for a failed call: transport failures are [`exit::CONNECTION`], refusals
/// [`exit::FAILED`].
pub fn error_exit_code(err: &CallError) -> u8 {
    match err {
        CallError::Connect { .. } | CallError::ConnectionLost(_) | CallError::Timeout { .. } => {
            exit::CONNECTION
        }
        // Both ends are up but cannot talk: as unusable as no connection at all.
        CallError::Remote(WireError::ProtocolMismatch { .. }) => exit::CONNECTION,
        CallError::Remote(_) => exit::FAILED,
    }
}

/// Connect to the coordinator at `addr` as a client, giving up after `timeout` at most.
///
/// # Errors
/// [`CallError::Connect`] when there is no connection within the time, and the handshake's
/// refusal (such as a protocol mismatch) as [`CallError::Remote`].
pub async fn connect(addr: &str, timeout: Duration) -> Result<Client, CallError> {
    // `Client::connect` has its own, longer limit; a short `--timeout` should win.
    match tokio::time::timeout(
        timeout,
        Client::connect(addr, Role::Client, DEFAULT_MAX_FRAME_LEN),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(CallError::Connect {
            addr: addr.to_string(),
            reason: format!("timed out after {timeout:?}"),
        }),
    }
}

/// Run `cmd` against the coordinator behind `client`, waiting at most `timeout` for the answer.
///
/// `stdin_value` is the value for `put KEY -`, read by the caller; it is ignored by every
/// other command.
///
/// # Errors
/// The call's [`CallError`]. Problems found before sending are reported as the coordinator
/// would report them, and nothing is sent: a key or value over its limit is
/// [`WireError::TooLarge`], and `put KEY -` without `stdin_value` is [`WireError::BadRequest`].
/// An answer of the wrong kind is [`WireError::Internal`].
pub async fn execute(
    client: &Client,
    cmd: &Command,
    timeout: Duration,
    stdin_value: Option<Bytes>,
) -> Result<Outcome, CallError> {
    let request = to_request(cmd, stdin_value)?;
    let name = request.name();
    let response = client.call_timeout(request, timeout).await?;
    to_outcome(cmd, name, response)
}

/// Build the request for `cmd`, checking sizes first so an oversized value fails cleanly
/// instead of the connection being cut for an oversized frame.
fn to_request(cmd: &Command, stdin_value: Option<Bytes>) -> Result<Request, CallError> {
    let request = match cmd {
        Command::Put { key, value } => {
            let value = if value == STDIN_VALUE {
                stdin_value.ok_or_else(|| {
                    CallError::Remote(WireError::BadRequest(
                        "`put KEY -` reads the value from stdin, which is not available here"
                            .into(),
                    ))
                })?
            } else {
                Bytes::copy_from_slice(value.as_bytes())
            };
            check_len("value", value.len(), MAX_VALUE_LEN)?;
            Request::Put {
                key: key_bytes(key)?,
                value,
            }
        }
        Command::Get { key } => Request::Get {
            key: key_bytes(key)?,
        },
        Command::Del { key } => Request::Delete {
            key: key_bytes(key)?,
        },
        Command::Locate { key } => Request::Locate {
            key: key_bytes(key)?,
        },
        Command::Status | Command::Nodes => Request::Status,
        Command::Check => Request::Check,
        Command::Run { .. } => {
            return Err(CallError::Remote(WireError::BadRequest(
                "`run` runs a script locally; it is not a request to the coordinator".into(),
            )))
        }
        Command::Bench(_) => {
            return Err(CallError::Remote(WireError::BadRequest(
                "`bench` opens connections of its own; run it as `ringkv bench`".into(),
            )))
        }
        Command::Chaos(_) => {
            return Err(CallError::Remote(WireError::BadRequest(
                "`chaos` starts clusters and clients of its own; run it as `ringkv chaos`".into(),
            )))
        }
        Command::Node(NodeCommand::Add) => Request::NodeAdd,
        Command::Node(NodeCommand::Remove { id, accept_loss }) => Request::NodeRemove {
            node: *id,
            accept_loss: *accept_loss,
        },
        Command::Node(NodeCommand::Kill { id }) => Request::NodeSignal {
            node: *id,
            signal: NodeSignal::Kill,
        },
        Command::Node(NodeCommand::Pause { id }) => Request::NodeSignal {
            node: *id,
            signal: NodeSignal::Pause,
        },
        Command::Node(NodeCommand::Resume { id }) => Request::NodeSignal {
            node: *id,
            signal: NodeSignal::Resume,
        },
    };
    Ok(request)
}

fn key_bytes(key: &str) -> Result<Bytes, CallError> {
    check_len("key", key.len(), MAX_KEY_LEN)?;
    Ok(Bytes::copy_from_slice(key.as_bytes()))
}

fn check_len(what: &str, size: usize, max: usize) -> Result<(), CallError> {
    if size > max {
        return Err(CallError::Remote(WireError::TooLarge {
            what: what.into(),
            size: size as u64,
            max: max as u64,
        }));
    }
    Ok(())
}

/// Pair the answer with the command that asked for it.
fn to_outcome(cmd: &Command, request: &str, response: Response) -> Result<Outcome, CallError> {
    let outcome = match (cmd, response) {
        (Command::Put { key, .. }, Response::Written { version }) => Outcome::Put {
            key: key.clone(),
            version,
        },
        (Command::Del { key }, Response::Written { version }) => Outcome::Deleted {
            key: key.clone(),
            version,
        },
        (Command::Get { key }, Response::Value { version, value }) => Outcome::Value {
            key: key.clone(),
            version,
            value,
        },
        (Command::Locate { key }, Response::Located(location)) => Outcome::Located {
            key: key.clone(),
            location,
        },
        (Command::Status, Response::Status(status)) => Outcome::Status(*status),
        (Command::Nodes, Response::Status(status)) => Outcome::Nodes(*status),
        (Command::Check, Response::Checked(report)) => Outcome::Checked(report),
        (Command::Node(NodeCommand::Add), Response::NodeAdded { node }) => {
            Outcome::NodeAdded { node }
        }
        (Command::Node(node_cmd), Response::Done) => {
            let (node, action) = match *node_cmd {
                NodeCommand::Remove { id, .. } => (id, NodeAction::Removed),
                NodeCommand::Kill { id } => (id, NodeAction::Killed),
                NodeCommand::Pause { id } => (id, NodeAction::Paused),
                NodeCommand::Resume { id } => (id, NodeAction::Resumed),
                NodeCommand::Add => return Err(unexpected(request, "Done")),
            };
            Outcome::NodeChanged { node, action }
        }
        (_, other) => return Err(unexpected(request, response_kind(&other))),
    };
    Ok(outcome)
}

fn unexpected(request: &str, answer: &str) -> CallError {
    CallError::Remote(WireError::Internal(format!(
        "the coordinator answered `{request}` with an unexpected `{answer}`"
    )))
}

/// The variant name of `response`, without its payload (which may be a large value).
fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::Hello { .. } => "Hello",
        Response::Written { .. } => "Written",
        Response::Value { .. } => "Value",
        Response::Located(_) => "Located",
        Response::Status(_) => "Status",
        Response::Checked(_) => "Checked",
        Response::NodeAdded { .. } => "NodeAdded",
        Response::Done => "Done",
        Response::Registered { .. } => "Registered",
        Response::Stored { .. } => "Stored",
        Response::Fetched { .. } => "Fetched",
        Response::Scanned { .. } => "Scanned",
        Response::Batch(_) => "Batch",
    }
}

#[cfg(test)]
mod tests {
    use ringkv_common::protocol::Reply;

    use super::*;

    fn put(value: &str) -> Command {
        Command::Put {
            key: "k".into(),
            value: value.into(),
        }
    }

    #[test]
    fn exit_codes_for_outcomes() {
        let ok = Outcome::Value {
            key: "k".into(),
            version: Version::ZERO,
            value: None,
        };
        assert_eq!(ok.exit_code(), exit::OK);
        let healthy = CheckReport {
            keys: 2,
            healthy: 2,
            ..CheckReport::default()
        };
        assert_eq!(Outcome::Checked(healthy).exit_code(), exit::OK);
        assert_eq!(
            Outcome::Checked(CheckReport::default()).exit_code(),
            exit::OK
        );
        let lost = CheckReport {
            keys: 2,
            healthy: 1,
            lost: 1,
            ..CheckReport::default()
        };
        assert_eq!(Outcome::Checked(lost).exit_code(), exit::FAILED);
    }

    #[test]
    fn exit_codes_for_errors() {
        let addr = "127.0.0.1:1".to_string();
        let cases = [
            (
                CallError::Connect {
                    addr: addr.clone(),
                    reason: "refused".into(),
                },
                exit::CONNECTION,
            ),
            (CallError::ConnectionLost(addr.clone()), exit::CONNECTION),
            (
                CallError::Timeout {
                    addr,
                    after: Duration::from_secs(1),
                },
                exit::CONNECTION,
            ),
            (
                CallError::Remote(WireError::ProtocolMismatch {
                    server: 2,
                    client: 1,
                }),
                exit::CONNECTION,
            ),
            (
                CallError::Remote(WireError::Unavailable("x".into())),
                exit::FAILED,
            ),
            (
                CallError::Remote(WireError::Indeterminate("x".into())),
                exit::FAILED,
            ),
            (
                CallError::Remote(WireError::NotFound("node 9".into())),
                exit::FAILED,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(error_exit_code(&err), code, "{err:?}");
        }
    }

    #[test]
    fn requests_for_commands() {
        assert_eq!(
            to_request(&put("v"), None).unwrap(),
            Request::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
            }
        );
        let binary = Bytes::from_static(b"\x00\xff\n");
        assert_eq!(
            to_request(&put("-"), Some(binary.clone())).unwrap(),
            Request::Put {
                key: Bytes::from_static(b"k"),
                value: binary,
            }
        );
        assert_eq!(to_request(&Command::Nodes, None).unwrap(), Request::Status);
        assert_eq!(
            to_request(&Command::Node(NodeCommand::Pause { id: NodeId(4) }), None).unwrap(),
            Request::NodeSignal {
                node: NodeId(4),
                signal: NodeSignal::Pause
            }
        );
    }

    #[test]
    fn stdin_value_is_required_for_dash() {
        let err = to_request(&put("-"), None).unwrap_err();
        assert_eq!(err.class(), "bad_request");
    }

    #[test]
    fn oversized_input_is_refused_before_sending() {
        let big_key = "k".repeat(MAX_KEY_LEN + 1);
        let err = to_request(&Command::Get { key: big_key }, None).unwrap_err();
        assert_eq!(err.class(), "too_large");
        let big_value = Bytes::from(vec![0u8; MAX_VALUE_LEN + 1]);
        let err = to_request(&put("-"), Some(big_value)).unwrap_err();
        assert!(matches!(
            err,
            CallError::Remote(WireError::TooLarge { ref what, .. }) if what == "value"
        ));
        // Exactly at the limit is fine.
        let max_value = Bytes::from(vec![0u8; MAX_VALUE_LEN]);
        assert!(to_request(&put("-"), Some(max_value)).is_ok());
    }

    /// A fake coordinator with canned answers, served over real TCP by the shared server loop.
    struct FakeCoordinator;

    impl ringkv_common::server::Handler for FakeCoordinator {
        async fn handle(self: std::sync::Arc<Self>, req: Request, _role: Role) -> Reply {
            match req {
                // The version echoes the value's length, so the test sees what arrived.
                Request::Put { value, .. } => Ok(Response::Written {
                    version: Version(value.len() as u64),
                }),
                Request::Get { key } if key.as_ref() == b"slow" => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Err(WireError::Internal("too late".into()))
                }
                Request::Get { key } if key.as_ref() == b"missing" => Ok(Response::Value {
                    version: Version(4),
                    value: None,
                }),
                Request::Get { key } => Ok(Response::Value {
                    version: Version(1),
                    value: Some(key),
                }),
                Request::Delete { .. } => Err(WireError::Unavailable("1 of 3 replicas up".into())),
                Request::Status => Ok(Response::Status(Box::new(ClusterStatus {
                    nodes: Vec::new(),
                    keys: 5,
                    under_replicated: 0,
                    misplaced: 0,
                    tombstones: 0,
                    collection: Default::default(),
                    rf: 3,
                    write_quorum: 2,
                    degraded: false,
                    jobs: Vec::new(),
                    writes: Default::default(),
                }))),
                Request::NodeSignal { node, .. } if node == NodeId(9) => {
                    Err(WireError::NotFound(format!("node {node}")))
                }
                Request::NodeSignal { .. } => Ok(Response::Done),
                _ => Ok(Response::Done),
            }
        }
    }

    #[tokio::test]
    async fn execute_against_a_fake_coordinator() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(ringkv_common::server::serve(
            listener,
            std::sync::Arc::new(FakeCoordinator),
            DEFAULT_MAX_FRAME_LEN,
            shutdown.clone(),
        ));
        let client = connect(&addr, Duration::from_secs(5)).await.unwrap();
        let t = Duration::from_secs(5);

        let binary = Bytes::from_static(b"\x00\x01\xff");
        assert_eq!(
            execute(&client, &put("-"), t, Some(binary)).await.unwrap(),
            Outcome::Put {
                key: "k".into(),
                version: Version(3)
            }
        );
        assert_eq!(
            execute(&client, &Command::Get { key: "hi".into() }, t, None)
                .await
                .unwrap(),
            Outcome::Value {
                key: "hi".into(),
                version: Version(1),
                value: Some(Bytes::from_static(b"hi"))
            }
        );
        let missing = execute(
            &client,
            &Command::Get {
                key: "missing".into(),
            },
            t,
            None,
        )
        .await
        .unwrap();
        assert_eq!(missing.exit_code(), exit::OK);
        let nodes = execute(&client, &Command::Nodes, t, None).await.unwrap();
        assert!(matches!(nodes, Outcome::Nodes(ref status) if status.nodes.is_empty()));

        let err = execute(&client, &Command::Del { key: "k".into() }, t, None)
            .await
            .unwrap_err();
        assert_eq!(
            (err.class(), error_exit_code(&err)),
            ("unavailable", exit::FAILED)
        );
        let kill = |id| Command::Node(NodeCommand::Kill { id: NodeId(id) });
        let err = execute(&client, &kill(9), t, None).await.unwrap_err();
        assert_eq!(err.class(), "not_found");
        assert_eq!(
            execute(&client, &kill(1), t, None).await.unwrap(),
            Outcome::NodeChanged {
                node: NodeId(1),
                action: NodeAction::Killed
            }
        );

        let slow = Command::Get { key: "slow".into() };
        let err = execute(&client, &slow, Duration::from_millis(50), None)
            .await
            .unwrap_err();
        assert_eq!(
            (err.class(), error_exit_code(&err)),
            ("timeout", exit::CONNECTION)
        );
        // The connection is still usable after a call timed out.
        assert!(execute(&client, &Command::Status, t, None).await.is_ok());

        // The slow request is still in flight on the server, which waits for it; don't.
        drop(client);
        shutdown.cancel();
        server.abort();
    }

    #[tokio::test]
    async fn connect_failure_is_a_connection_error() {
        // Bind then drop, so the port is (almost certainly) closed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = match connect(&addr, Duration::from_secs(5)).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(err) => err,
        };
        assert_eq!(
            (err.class(), error_exit_code(&err)),
            ("connect", exit::CONNECTION)
        );
    }

    #[test]
    fn answers_pair_with_commands() {
        let del = Command::Del { key: "k".into() };
        assert_eq!(
            to_outcome(
                &del,
                "del",
                Response::Written {
                    version: Version(9)
                }
            )
            .unwrap(),
            Outcome::Deleted {
                key: "k".into(),
                version: Version(9)
            }
        );
        let kill = Command::Node(NodeCommand::Kill { id: NodeId(2) });
        assert_eq!(
            to_outcome(&kill, "node signal", Response::Done).unwrap(),
            Outcome::NodeChanged {
                node: NodeId(2),
                action: NodeAction::Killed
            }
        );
        let err = to_outcome(&Command::Get { key: "k".into() }, "get", Response::Done).unwrap_err();
        assert_eq!(err.class(), "internal");
        let add = Command::Node(NodeCommand::Add);
        assert!(to_outcome(&add, "node add", Response::Done).is_err());
    }
}
