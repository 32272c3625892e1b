//! The server side of a connection, shared by storage nodes and the coordinator.
//!
//! [`serve`] accepts connections until shutdown; [`serve_connection`] runs one: it insists on
//! a [`Request::Hello`] first, then reads requests and runs each as its own task so that a
//! slow request does not hold up the ones behind it (pipelining). Answers are queued to a
//! writer task that coalesces them into as few socket writes as the queue allows.
//!
//! Bad input never takes down more than its own connection: an undecodable message is
//! answered with `BadRequest` and the connection carries on; a checksum failure or an
//! oversized frame is answered once and the connection closes, because the stream can no
//! longer be trusted.

use std::future::Future;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::{CodecError, FrameCodec, FrameError};
use crate::error::WireError;
use crate::protocol::{Envelope, Reply, Request, Response, Role, PROTOCOL_VERSION};

/// Requests one connection may have in flight before we stop reading from it.
/// Bounds the memory a single pipelining client can pin.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;

/// Answers queued for the writer task of one connection.
const REPLY_QUEUE: usize = 1024;

/// What a server does with each request.
pub trait Handler: Send + Sync + 'static {
    /// Answer `req`, sent by a peer that introduced itself as `role`.
    fn handle(self: Arc<Self>, req: Request, role: Role) -> impl Future<Output = Reply> + Send;
}

/// The codec of the server side of a connection.
pub type ServerCodec = FrameCodec<Envelope<Reply>, Envelope<Request>>;

/// Accept connections on `listener` until `shutdown` fires, then wait for open connections
/// to finish their in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    max_frame_len: usize,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                debug!(%peer, "accepted connection");
                let handler = handler.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    if let Err(e) = serve_connection(stream, handler, max_frame_len, shutdown).await
                    {
                        debug!(%peer, error = %e, "connection closed with error");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    info!("stopped serving");
}

/// Why a connection ended early.
#[derive(thiserror::Error, Debug)]
pub enum ConnectionError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("first message was {0}, not hello")]
    NoHello(&'static str),
    #[error("peer speaks protocol version {0}")]
    ProtocolMismatch(u32),
}

/// Run one connection to completion.
pub async fn serve_connection<H: Handler>(
    stream: TcpStream,
    handler: Arc<H>,
    max_frame_len: usize,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let _ = stream.set_nodelay(true);
    let framed = Framed::new(stream, ServerCodec::new(max_frame_len));
    let (mut sink, mut frames) = framed.split();
    let (tx, mut rx) = mpsc::channel::<Envelope<Reply>>(REPLY_QUEUE);

    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let result = read_requests(&mut frames, &tx, handler, shutdown).await;
    if let Err(e) = &result {
        let answer = match e {
            ConnectionError::Codec(CodecError::TooLarge { size, max }) => {
                Some(WireError::TooLarge {
                    what: "frame".into(),
                    size: *size as u64,
                    max: *max as u64,
                })
            }
            ConnectionError::Frame(f) => Some(WireError::BadRequest(f.to_string())),
            ConnectionError::NoHello(_) => Some(WireError::BadRequest(e.to_string())),
            ConnectionError::ProtocolMismatch(client) => Some(WireError::ProtocolMismatch {
                server: PROTOCOL_VERSION,
                client: *client,
            }),
            ConnectionError::Codec(_) => None,
        };
        if let Some(err) = answer {
            let _ = tx
                .send(Envelope {
                    id: 0,
                    msg: Err(err),
                })
                .await;
        }
    }
    // The writer ends once every in-flight request has sent its answer and dropped its sender.
    drop(tx);
    let _ = writer.await;
    result
}

async fn read_requests<H: Handler>(
    frames: &mut futures::stream::SplitStream<Framed<TcpStream, ServerCodec>>,
    tx: &mpsc::Sender<Envelope<Reply>>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    // Handshake.
    let role = match frames.next().await {
        None => return Ok(()),
        Some(frame) => {
            let env = frame??;
            match env.msg {
                Request::Hello { protocol, role } if protocol == PROTOCOL_VERSION => {
                    let _ = tx
                        .send(Envelope {
                            id: env.id,
                            msg: Ok(Response::Hello {
                                protocol: PROTOCOL_VERSION,
                                role,
                            }),
                        })
                        .await;
                    role
                }
                Request::Hello { protocol, .. } => {
                    return Err(ConnectionError::ProtocolMismatch(protocol))
                }
                other => return Err(ConnectionError::NoHello(other.name())),
            }
        }
    };

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            frame = frames.next() => frame,
        };
        let env = match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Err(FrameError::Undecodable { id, reason }))) => {
                // Framing is intact: answer and keep the connection.
                let msg = Err(WireError::BadRequest(format!(
                    "unknown or malformed message: {reason}"
                )));
                let _ = tx
                    .send(Envelope {
                        id: id.unwrap_or(0),
                        msg,
                    })
                    .await;
                continue;
            }
            Some(Ok(Err(e))) => return Err(e.into()),
            Some(Ok(Ok(env))) => env,
        };
        // The semaphore is never closed, so acquiring only fails if it were: treat as shutdown.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return Ok(());
        };
        let handler = handler.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let msg = handler.handle(env.msg, role).await;
            let _ = tx.send(Envelope { id: env.id, msg }).await;
            drop(permit);
        });
    }
}
