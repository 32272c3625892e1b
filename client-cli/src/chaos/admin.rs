//! One-off administrative requests to the coordinator (status, check, node commands).
//!
//! Each request opens its own connection, because the coordinator may have been killed and
//! restarted since the last one; nothing here retries.

use std::time::Duration;

use ringkv_common::client::CallError;
use ringkv_common::protocol::{CheckReport, ClusterStatus, NodeInfo, Request, Response};
use ringkv_common::{NodeId, NodeState, WireError};

use crate::commands;

/// Send `req` on a fresh connection and wait at most `timeout` for the answer.
pub async fn request(addr: &str, req: Request, timeout: Duration) -> Result<Response, CallError> {
    let client = commands::connect(addr, timeout).await?;
    client.call_timeout(req, timeout).await
}

/// `status`.
pub async fn status(addr: &str, timeout: Duration) -> Result<ClusterStatus, CallError> {
    match request(addr, Request::Status, timeout).await? {
        Response::Status(s) => Ok(*s),
        other => Err(unexpected("status", &other)),
    }
}

/// `check`.
pub async fn check(addr: &str, timeout: Duration) -> Result<CheckReport, CallError> {
    match request(addr, Request::Check, timeout).await? {
        Response::Checked(r) => Ok(r),
        other => Err(unexpected("check", &other)),
    }
}

/// The nodes of `status` in `state`, ordered by id so seeded choices are repeatable.
pub fn nodes_in(status: &ClusterStatus, state: NodeState) -> Vec<NodeInfo> {
    let mut nodes: Vec<NodeInfo> = status
        .nodes
        .iter()
        .filter(|n| n.state == state)
        .cloned()
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

/// Wait until node `id` is `up`, polling `status`, for at most `timeout`.
pub async fn wait_up(addr: &str, id: NodeId, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(s) = status(addr, Duration::from_secs(2)).await {
            if s.nodes
                .iter()
                .any(|n| n.id == id && n.state == NodeState::Up)
            {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unexpected(what: &str, resp: &Response) -> CallError {
    CallError::Remote(WireError::Internal(format!(
        "unexpected answer to {what}: {}",
        match resp {
            Response::Done => "Done",
            Response::Status(_) => "Status",
            Response::Checked(_) => "Checked",
            _ => "another response",
        }
    )))
}
