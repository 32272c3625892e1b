//! The coordinator's request router: each request goes to the module that owns it.

use std::sync::Arc;

use ringkv_common::cluster_token;
use ringkv_common::protocol::{Reply, Request, Response, Role};
use ringkv_common::server::Handler;
use ringkv_common::WireError;

use crate::state::Coordinator;

impl Handler for Coordinator {
    /// Only the coordinator's own nodes may say they are nodes: registering puts a node in
    /// the ring, where writes are stored on it.
    fn admit(&self, role: Role, token: Option<&str>) -> Result<(), WireError> {
        if role == Role::Node && !cluster_token::matches(self.members.cluster_token(), token) {
            return Err(WireError::BadRequest(format!(
                "a node must present this cluster's token (the coordinator's {} file, in {} \
                 for a node started by hand), and this one did not",
                cluster_token::FILE,
                cluster_token::ENV
            )));
        }
        Ok(())
    }

    fn answer_hold(&self) -> Option<std::time::Duration> {
        (!self.config.answer_hold.is_zero()).then_some(self.config.answer_hold)
    }

    async fn handle(self: Arc<Self>, req: Request, role: Role) -> Reply {
        // Until the nodes have registered after a start, client requests wait rather than
        // fail for want of replicas (nodes must be served: their registration is the wait).
        if role != Role::Node && !self.ready.is_open() {
            Box::pin(self.ready.wait(self.config.startup_timeout)).await;
            if !self.ready.is_open() {
                // Still starting (reconciling nodes after an unclean stop): answering now
                // could serve what the metadata has not yet learnt back.
                return Err(WireError::Unavailable(
                    "the coordinator is still starting; try again".into(),
                ));
            }
        }
        // Every request's future is as large as the largest arm, so the rare requests with
        // large futures are boxed and the data path's stay small.
        match (role, req) {
            (
                Role::Node,
                Request::Register {
                    node,
                    addr,
                    pid,
                    data_dir,
                },
            ) => Box::pin(self.register(node, addr, pid, data_dir)).await,
            (Role::Node, Request::Heartbeat { node, stats }) => self.heartbeat(node, stats),
            (_, Request::Put { key, value }) => self.write(key, Some(value)).await,
            (_, Request::Delete { key }) => self.write(key, None).await,
            (_, Request::Get { key }) => self.read(key).await,
            (_, Request::Locate { key }) => Box::pin(self.locate(key)).await,
            (_, Request::Status) => Box::pin(self.status_off_workers())
                .await
                .map(|status| Response::Status(Box::new(status))),
            (_, Request::Check) => Box::pin(self.check()).await.map(Response::Checked),
            (_, Request::NodeAdd) => Box::pin(self.add_node()).await,
            (_, Request::NodeRemove { node, accept_loss }) => {
                Box::pin(self.remove_node(node, accept_loss)).await
            }
            (_, Request::NodeSignal { node, signal }) => self.signal_node(node, signal),
            (_, other) => Err(WireError::BadRequest(format!(
                "the coordinator does not answer {} from a {role:?} peer",
                other.name()
            ))),
        }
    }
}
