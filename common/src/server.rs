//! The server side of a connection, shared by storage nodes and the coordinator.
//!
//! [`serve`] accepts connections until shutdown; [`serve_connection`] runs one: it insists on
//! a [`Request::Hello`] first, then reads requests and runs each as its own future, so that a
//! slow request does not hold up the ones behind it (pipelining). One task per connection
//! drives them all: each round it reads every frame that has arrived, writes every answer
//! that is ready and flushes once, so a burst of requests costs one read and one write.
//! A handler may also ask ([`Handler::answer_hold`]) that answers ready early wait, for a
//! bounded time, for the peer's other requests in flight: a pipelining peer then gets a
//! burst of answers in one write, and wakes once for them instead of once per answer.
//!
//! Bad input never takes down more than its own connection: an undecodable message is
//! answered with `BadRequest` and the connection carries on; a checksum failure or an
//! oversized frame is answered once and the connection closes, because the stream can no
//! longer be trusted.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::protocol::{
    Envelope, Reply, Request, Response, Role, BATCH_ITEM_OVERHEAD, PROTOCOL_VERSION,
};

/// Requests one connection may have in flight before we stop reading from it.
/// Bounds the memory a single pipelining client can pin.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;

/// Key and value bytes the requests in flight on one connection may hold, in frames of the
/// largest size: a connection stops reading at this many (one request always fits), so a
/// peer that sends large writes and reads no answers pins at most about this much.
const MAX_FRAMES_OF_BYTES_IN_FLIGHT: usize = 2;

/// What a server does with each request.
pub trait Handler: Send + Sync + 'static {
    /// Answer `req`, sent by a peer that introduced itself as `role`.
    fn handle(self: Arc<Self>, req: Request, role: Role) -> impl Future<Output = Reply> + Send;

    /// How long a connection may hold answers that are ready while other requests of the
    /// same peer are still in flight, so that a pipelining peer gets its answers in one write
    /// and one wake-up instead of one per answer; `None` (the default) writes every answer
    /// as soon as it is ready.
    fn answer_hold(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether a peer that says it is `role`, with `token` in its hello, may go on: an
    /// error refuses it (the error is its answer, and the connection closes). Everyone by
    /// default.
    fn admit(&self, role: Role, token: Option<&str>) -> Result<(), WireError> {
        let _ = (role, token);
        Ok(())
    }
}

tokio::task_local! {
    /// A number shared by the requests of one connection that are read in one pass, and by
    /// nothing else (the connection's number from [`serve`] in the high half, the pass in
    /// the low). A handler can use it to send a burst of requests the same way: a
    /// pipelining peer's burst then travels on as few onward connections as it can, and
    /// its answers come back together.
    pub static BURST: std::cell::Cell<u64>;
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
    let mut accepted_so_far: u64 = 0;
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
                accepted_so_far += 1;
                let burst = std::cell::Cell::new(accepted_so_far << 32);
                tracker.spawn(BURST.scope(burst, async move {
                    match serve_connection(stream, handler, max_frame_len, shutdown).await {
                        Ok(()) => {}
                        // A peer without the cluster token: an operator should hear of it,
                        // but a peer that keeps knocking must not flood the log.
                        Err(e @ ConnectionError::Refused(_)) if refusal_may_warn() => {
                            warn!(%peer, error = %e, "refused a peer");
                        }
                        Err(e) => debug!(%peer, error = %e, "connection closed with error"),
                    }
                }));
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

/// Whether a refused peer may be logged at warn level now: once a second at most (the rest go
/// to debug).
fn refusal_may_warn() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.swap(now, Ordering::Relaxed) != now
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
    /// The handler refused the peer's role; the refusal was its answer.
    #[error("peer refused: {0}")]
    Refused(WireError),
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
    // A peer that never says hello must not keep a shutdown waiting.
    let greeted = tokio::select! {
        greeted = handshake(&mut framed, handler.as_ref()) => greeted,
        () = shutdown.cancelled() => Ok(None),
    };
    let result = match greeted {
        Ok(Some(role)) => {
            serve_requests(&mut framed, handler, role, max_frame_len, &shutdown).await
        }
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
        ConnectionError::Codec(_) | ConnectionError::Refused(_) => None,
    }
}

type ServerFramed = Framed<TcpStream, ServerCodec>;

/// Insist on a `Hello` first, let `handler` admit the peer, and answer it; `None` when the
/// peer closed without a word.
async fn handshake(
    framed: &mut ServerFramed,
    handler: &impl Handler,
) -> Result<Option<Role>, ConnectionError> {
    let Some(frame) = framed.next().await else {
        return Ok(None);
    };
    let env = frame??;
    match env.msg {
        Request::Hello {
            protocol,
            role,
            token,
        } if protocol == PROTOCOL_VERSION => {
            if let Err(refusal) = handler.admit(role, token.as_deref()) {
                // Answered under the hello's own id, so the peer's connect call gets it.
                let answer = Envelope {
                    id: env.id,
                    msg: Err(refusal.clone()),
                };
                let _ = framed.send(answer).await;
                return Err(ConnectionError::Refused(refusal));
            }
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

/// Key and value bytes an answer carries.
fn answer_len(answer: &Envelope<Reply>) -> usize {
    answer.msg.as_ref().map_or(0, Response::payload_len)
}

/// Split a batch answer into batch answers of at most about `limit` bytes each, under the
/// same id: the peer routes every answer of a batch by its own id, whatever frame it came in.
fn split_batch(answer: Envelope<Reply>, limit: usize, out: &mut VecDeque<Envelope<Reply>>) {
    let id = answer.id;
    let Ok(Response::Batch(answers)) = answer.msg else {
        out.push_back(answer);
        return;
    };
    let mut part = Vec::new();
    let mut bytes = 0;
    for a in answers {
        let len = BATCH_ITEM_OVERHEAD + answer_len(&a);
        if !part.is_empty() && bytes + len > limit {
            let msg = Ok(Response::Batch(std::mem::take(&mut part)));
            out.push_back(Envelope { id, msg });
            bytes = 0;
        }
        bytes += len;
        part.push(a);
    }
    if !part.is_empty() {
        out.push_back(Envelope {
            id,
            msg: Ok(Response::Batch(part)),
        });
    }
}

/// An answer waiting to be written: a handler's, or an immediate refusal of a bad message;
/// with the bytes its request held (see [`Request::held_len`]).
type Answer<F> = futures::future::Either<F, futures::future::Ready<(Envelope<Reply>, usize)>>;

/// The request loop of one connection, as one hand-written poll so that each round reads all
/// that is ready, writes all that is done and flushes once.
async fn serve_requests<H: Handler>(
    framed: &mut ServerFramed,
    handler: Arc<H>,
    role: Role,
    max_frame_len: usize,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let start = |env: Envelope<Request>, held: usize| {
        let handler = handler.clone();
        futures::future::Either::Left(async move {
            let msg = handler.handle(env.msg, role).await;
            (Envelope { id: env.id, msg }, held)
        })
    };
    // Bytes held by the requests in flight, and the most they may hold before reading stops.
    let mut held_bytes: usize = 0;
    let max_held_bytes = max_frame_len.saturating_mul(MAX_FRAMES_OF_BYTES_IN_FLIGHT);
    let mut in_flight = FuturesUnordered::new();
    // A batch answer whose values would not fit in one frame goes out as several.
    let split_above = max_frame_len / 2;
    let mut split: VecDeque<Envelope<Reply>> = VecDeque::new();
    let hold = handler.answer_hold();
    // Set while answers are held back; the timer wakes the connection when the hold is over.
    let mut held_until: Option<tokio::time::Instant> = None;
    let mut hold_timer = std::pin::pin!(tokio::time::sleep(std::time::Duration::ZERO));
    let mut stopping = std::pin::pin!(shutdown.cancelled());
    // Reading stops at EOF, on a broken stream or at shutdown; the result says which.
    let mut reading = true;
    let mut result: Result<(), ConnectionError> = Ok(());
    // False once a write failed: answers are then dropped, but handlers still finish.
    let mut writable = true;
    let mut unflushed = false;

    std::future::poll_fn(|cx| {
        // Outside `serve` (tests) there is no burst number to keep.
        let _ = BURST.try_with(|burst| burst.set(burst.get().wrapping_add(1)));
        if reading && stopping.as_mut().poll(cx).is_ready() {
            reading = false;
        }
        loop {
            let mut progress = false;
            while reading
                && in_flight.len() < MAX_IN_FLIGHT_PER_CONNECTION
                && held_bytes < max_held_bytes
            {
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
                            futures::future::Either::Right(futures::future::ready((
                                Envelope {
                                    id: id.unwrap_or(0),
                                    msg,
                                },
                                0,
                            )));
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
                let held = env.msg.held_len();
                held_bytes += held;
                in_flight.push(start(env, held));
                progress = true;
            }
            loop {
                if writable {
                    match framed.poll_ready_unpin(cx) {
                        Poll::Ready(Ok(())) => {}
                        // The peer can no longer be answered: stop taking requests, so the
                        // connection ends once the running ones are done.
                        Poll::Ready(Err(_)) => (writable, reading) = (false, false),
                        // The socket is full; we are woken when it drains.
                        Poll::Pending => break,
                    }
                }
                let answer = match split.pop_front() {
                    Some(part) => part,
                    None => match in_flight.poll_next_unpin(cx) {
                        Poll::Ready(Some((answer, held))) => {
                            progress = true;
                            held_bytes -= held;
                            if answer_len(&answer) > split_above {
                                split_batch(answer, split_above, &mut split);
                                continue;
                            }
                            answer
                        }
                        Poll::Ready(None) | Poll::Pending => break,
                    },
                };
                if writable {
                    if framed.start_send_unpin(answer).is_err() {
                        (writable, reading) = (false, false);
                    } else {
                        unflushed = true;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        // Hold the answers written so far while more of this peer's requests are in flight,
        // up to `hold` after the first of them was ready.
        let holding = match hold {
            Some(hold) if unflushed && reading && !in_flight.is_empty() => {
                let until = *held_until.get_or_insert_with(|| {
                    let until = tokio::time::Instant::now() + hold;
                    hold_timer.as_mut().reset(until);
                    until
                });
                tokio::time::Instant::now() < until && hold_timer.as_mut().poll(cx).is_pending()
            }
            _ => false,
        };
        if unflushed && writable && !holding {
            match framed.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    unflushed = false;
                    held_until = None;
                }
                Poll::Ready(Err(_)) => writable = false,
                Poll::Pending => {}
            }
        }
        let flushed = (!unflushed && split.is_empty()) || !writable;
        if !reading && in_flight.is_empty() && flushed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures::FutureExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::Version;

    /// Answers `Get { key }` with the key as the value: at once, after 1 s for `late`, after
    /// 10 s for `slow`. Holds answers for `hold`.
    struct Echo {
        hold: Option<Duration>,
    }

    impl Handler for Echo {
        async fn handle(self: Arc<Self>, req: Request, _role: Role) -> Reply {
            let Request::Get { key } = req else {
                return Err(WireError::BadRequest("get only".into()));
            };
            match key.as_ref() {
                b"late" => tokio::time::sleep(Duration::from_secs(1)).await,
                b"slow" => tokio::time::sleep(Duration::from_secs(10)).await,
                _ => {}
            }
            Ok(Response::Value {
                version: Version(1),
                value: Some(key),
            })
        }

        fn answer_hold(&self) -> Option<Duration> {
            self.hold
        }
    }

    type Peer =
        tokio_util::codec::Framed<TcpStream, FrameCodec<Envelope<Request>, Envelope<Reply>>>;

    /// A server with `hold` on a fresh port, and a peer that has sent `keys` (ids 1, 2, ...).
    async fn server_and_requests(hold: Option<Duration>, keys: &[&str]) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let handler = Arc::new(Echo { hold });
            let _ = serve_connection(stream, handler, 1 << 20, CancellationToken::new()).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut peer = tokio_util::codec::Framed::new(stream, FrameCodec::new(1 << 20));
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client,
            token: None,
        };
        peer.send(Envelope { id: 0, msg: hello }).await.unwrap();
        peer.next().await.unwrap().unwrap().unwrap();
        for (i, key) in keys.iter().enumerate() {
            let msg = Request::Get {
                key: Bytes::from(key.to_string()),
            };
            peer.feed(Envelope {
                id: i as u64 + 1,
                msg,
            })
            .await
            .unwrap();
        }
        peer.flush().await.unwrap();
        peer
    }

    /// The next answer's id, waiting at most five seconds.
    async fn next_id(peer: &mut Peer) -> u64 {
        let next = tokio::time::timeout(Duration::from_secs(5), peer.next()).await;
        next.expect("an answer within 5 s")
            .unwrap()
            .unwrap()
            .unwrap()
            .id
    }

    #[tokio::test]
    async fn held_answers_go_out_together_and_unheld_ones_at_once() {
        // Held: the immediate answer waits for the late one, and both arrive in one write.
        let mut peer = server_and_requests(Some(Duration::from_secs(2)), &["now", "late"]).await;
        assert_eq!(next_id(&mut peer).await, 1);
        let second = peer.next().now_or_never();
        assert!(
            matches!(second, Some(Some(Ok(Ok(Envelope { id: 2, .. }))))),
            "the late answer came in the same write: {second:?}"
        );
        // Not held: the immediate answer is written before the late one is ready.
        let mut peer = server_and_requests(None, &["now", "late"]).await;
        assert_eq!(next_id(&mut peer).await, 1);
        assert!(
            peer.next().now_or_never().is_none(),
            "the late answer cannot be there yet"
        );
        assert_eq!(next_id(&mut peer).await, 2);
    }

    /// Counts the requests it has started, and answers none until the gate lets it.
    struct Gated {
        started: std::sync::atomic::AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    impl Handler for Gated {
        async fn handle(self: Arc<Self>, _req: Request, _role: Role) -> Reply {
            self.started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
            Ok(Response::Value {
                version: Version(1),
                value: None,
            })
        }
    }

    #[tokio::test]
    async fn a_connection_stops_reading_once_its_requests_in_flight_hold_two_frames_of_bytes() {
        use std::sync::atomic::Ordering::SeqCst;
        const MAX_FRAME: usize = 1 << 20;
        const KEY: usize = 256 * 1024;
        const REQUESTS: u64 = 40;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(Gated {
            started: 0.into(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let server = handler.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = serve_connection(stream, server, MAX_FRAME, CancellationToken::new()).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let peer: Peer = tokio_util::codec::Framed::new(stream, FrameCodec::new(MAX_FRAME));
        let (mut sink, mut answers) = peer.split();
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client,
            token: None,
        };
        sink.send(Envelope { id: 0, msg: hello }).await.unwrap();
        answers.next().await.unwrap().unwrap().unwrap();
        // 10 MiB of requests, none of which is answered until the gate opens.
        let sending = tokio::spawn(async move {
            for id in 1..=REQUESTS {
                let key = Bytes::from(vec![b'k'; KEY]);
                sink.send(Envelope {
                    id,
                    msg: Request::Get { key },
                })
                .await
                .unwrap();
            }
        });
        let budget = MAX_FRAMES_OF_BYTES_IN_FLIGHT * MAX_FRAME / KEY;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while handler.started.load(SeqCst) < budget {
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // However long we look, no request beyond the budget is read.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(handler.started.load(SeqCst), budget);
        // Once answers go out, the rest are read and answered, every one.
        handler.gate.add_permits(REQUESTS as usize);
        let mut ids = Vec::new();
        for _ in 0..REQUESTS {
            let next = tokio::time::timeout(Duration::from_secs(10), answers.next()).await;
            ids.push(next.unwrap().unwrap().unwrap().unwrap().id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=REQUESTS).collect::<Vec<_>>());
        sending.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_peer_that_never_says_hello() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(serve(
            listener,
            Arc::new(Echo { hold: None }),
            1 << 20,
            shutdown.clone(),
        ));
        // Connected, silent, and kept open throughout.
        let _silent = TcpStream::connect(addr).await.unwrap();
        // A peer connected after it is greeted: the silent one was accepted before.
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut peer: Peer = tokio_util::codec::Framed::new(stream, FrameCodec::new(1 << 20));
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client,
            token: None,
        };
        peer.send(Envelope { id: 0, msg: hello }).await.unwrap();
        peer.next().await.unwrap().unwrap().unwrap();
        drop(peer);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("serve returned although a peer never said hello")
            .unwrap();
    }

    #[tokio::test]
    async fn an_answer_is_held_no_longer_than_the_hold() {
        // The slow request takes 10 s; the fast answer must not wait for it.
        let mut peer = server_and_requests(Some(Duration::from_millis(50)), &["slow", "now"]).await;
        assert_eq!(next_id(&mut peer).await, 2);
    }
}
