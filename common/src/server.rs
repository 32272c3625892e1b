//! The server side of a connection, shared by storage nodes and the coordinator.
//!
//! [`serve`] accepts connections until shutdown; [`serve_connection`] runs one: it insists on
//! a [`Request::Hello`] first, then reads requests and runs each as its own future, so that a
//! slow request does not hold up the ones behind it (pipelining). One task per connection
//! drives them all: each round it reads every frame that has arrived, writes every answer
//! that is ready and flushes once, so a burst of requests costs one read and one write.
//!
//! Bad input never takes down more than its own connection: an undecodable message is
//! answered with `BadRequest` and the connection carries on; a checksum failure or an
//! oversized frame is answered once and the connection closes, because the stream can no
//! longer be trusted.

use std::future::Future;
use std::sync::Arc;

use std::task::Poll;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
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
///
/// One task does everything: it reads every frame that is ready, starts a handler future for
/// each, writes every answer that is ready, and flushes once per round. Compared with a task
/// per request and a writer task, this coalesces the answers to a burst of requests into one
/// socket write and saves a spawn, a channel hop and usually a cross-thread wake-up per request.
///
/// Handler futures always run to completion, even when the peer goes away or shutdown begins,
/// so a write that reached replicas is always recorded: the connection stops reading and keeps
/// polling until nothing is in flight.
pub async fn serve_connection<H: Handler>(
    stream: TcpStream,
    handler: Arc<H>,
    max_frame_len: usize,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let _ = stream.set_nodelay(true);
    // The request loop polls its shutdown signal on every wake-up; a child token of its own
    // keeps those polls from contending with every other connection for the shared token's
    // locks.
    let shutdown = shutdown.child_token();
    let mut framed = Framed::new(stream, ServerCodec::new(max_frame_len));
    let result = match handshake(&mut framed).await {
        Ok(Some(role)) => serve_requests(&mut framed, handler, role, &shutdown).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        if let Some(err) = error_answer(e) {
            let _ = framed
                .send(Envelope {
                    id: 0,
                    msg: Err(err),
                })
                .await;
        }
    }
    let _ = framed.close().await;
    result
}

/// The answer that tells the peer why its connection is being closed, if it can be told.
fn error_answer(e: &ConnectionError) -> Option<WireError> {
    match e {
        ConnectionError::Codec(CodecError::TooLarge { size, max }) => Some(WireError::TooLarge {
            what: "frame".into(),
            size: *size as u64,
            max: *max as u64,
        }),
        ConnectionError::Frame(f) => Some(WireError::BadRequest(f.to_string())),
        ConnectionError::NoHello(_) => Some(WireError::BadRequest(e.to_string())),
        ConnectionError::ProtocolMismatch(client) => Some(WireError::ProtocolMismatch {
            server: PROTOCOL_VERSION,
            client: *client,
        }),
        ConnectionError::Codec(_) => None,
    }
}

type ServerFramed = Framed<TcpStream, ServerCodec>;

/// Insist on a `Hello` first and answer it; `None` when the peer closed without a word.
async fn handshake(framed: &mut ServerFramed) -> Result<Option<Role>, ConnectionError> {
    let Some(frame) = framed.next().await else {
        return Ok(None);
    };
    let env = frame??;
    match env.msg {
        Request::Hello { protocol, role } if protocol == PROTOCOL_VERSION => {
            let hello = Envelope {
                id: env.id,
                msg: Ok(Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    role,
                }),
            };
            // A peer that vanished right after its hello shows up as EOF on the next read.
            let _ = framed.send(hello).await;
            Ok(Some(role))
        }
        Request::Hello { protocol, .. } => Err(ConnectionError::ProtocolMismatch(protocol)),
        other => Err(ConnectionError::NoHello(other.name())),
    }
}

/// An answer waiting to be written: a handler's, or an immediate refusal of a bad message.
type Answer<F> = futures::future::Either<F, futures::future::Ready<Envelope<Reply>>>;

/// The request loop of one connection, as one hand-written poll so that each round reads all
/// that is ready, writes all that is done and flushes once.
async fn serve_requests<H: Handler>(
    framed: &mut ServerFramed,
    handler: Arc<H>,
    role: Role,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let start = |env: Envelope<Request>| {
        let handler = handler.clone();
        futures::future::Either::Left(async move {
            let msg = handler.handle(env.msg, role).await;
            Envelope { id: env.id, msg }
        })
    };
    let mut in_flight = FuturesUnordered::new();
    let mut stopping = std::pin::pin!(shutdown.cancelled());
    // Reading stops at EOF, on a broken stream or at shutdown; the result says which.
    let mut reading = true;
    let mut result: Result<(), ConnectionError> = Ok(());
    // False once a write failed: answers are then dropped, but handlers still finish.
    let mut writable = true;
    let mut unflushed = false;

    std::future::poll_fn(|cx| {
        if reading && stopping.as_mut().poll(cx).is_ready() {
            reading = false;
        }
        loop {
            let mut progress = false;
            while reading && in_flight.len() < MAX_IN_FLIGHT_PER_CONNECTION {
                let env = match framed.poll_next_unpin(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        reading = false;
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        reading = false;
                        result = Err(e.into());
                        break;
                    }
                    Poll::Ready(Some(Ok(Err(FrameError::Undecodable { id, reason })))) => {
                        // Framing is intact: answer and keep the connection.
                        let msg = Err(WireError::BadRequest(format!(
                            "unknown or malformed message: {reason}"
                        )));
                        let answer: Answer<_> =
                            futures::future::Either::Right(futures::future::ready(Envelope {
                                id: id.unwrap_or(0),
                                msg,
                            }));
                        in_flight.push(answer);
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Some(Ok(Err(e)))) => {
                        reading = false;
                        result = Err(e.into());
                        break;
                    }
                    Poll::Ready(Some(Ok(Ok(env)))) => env,
                };
                in_flight.push(start(env));
                progress = true;
            }
            loop {
                if writable {
                    match framed.poll_ready_unpin(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => writable = false,
                        // The socket is full; we are woken when it drains.
                        Poll::Pending => break,
                    }
                }
                match in_flight.poll_next_unpin(cx) {
                    Poll::Ready(Some(answer)) => {
                        progress = true;
                        if writable {
                            if framed.start_send_unpin(answer).is_err() {
                                writable = false;
                            } else {
                                unflushed = true;
                            }
                        }
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            if !progress {
                break;
            }
        }
        if unflushed && writable {
            match framed.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => unflushed = false,
                Poll::Ready(Err(_)) => writable = false,
                Poll::Pending => {}
            }
        }
        let flushed = !unflushed || !writable;
        if !reading && in_flight.is_empty() && flushed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    result
}
