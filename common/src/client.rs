//! A pipelining client over one TCP connection.
//!
//! Any number of tasks may [`Client::call`] at once. Each call gets a fresh request id and a
//! slot in the in-flight map; a writer task coalesces queued requests into few socket writes
//! (it yields once before each flush, so callers that are about to send join the batch) and a
//! reader task routes each answer to its slot by id, in whatever order answers come.
//! When the connection drops, every call still in flight fails with
//! [`CallError::ConnectionLost`], and so does every later call: a `Client` never reconnects
//! by itself, the owner makes a new one.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::codec::FrameCodec;
use crate::error::WireError;
use crate::protocol::{Envelope, Reply, Request, Response, Role, PROTOCOL_VERSION};

/// Requests queued for the writer before callers wait.
const SEND_QUEUE: usize = 4096;

/// How long [`Client::connect`] waits for the TCP connection and the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call failed: the transport, or the remote side's refusal.
#[derive(thiserror::Error, Debug, Clone)]
pub enum CallError {
    /// No connection was made, so nothing was sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The connection dropped with the request in flight: it may have been applied.
    #[error("connection to {0} lost")]
    ConnectionLost(String),
    /// No answer in time: the request may have been applied.
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
    /// The server answered with an error.
    #[error("{0}")]
    Remote(WireError),
}

impl CallError {
    /// Whether the request may have taken effect despite the error.
    pub fn may_have_applied(&self) -> bool {
        match self {
            CallError::Connect { .. } => false,
            CallError::ConnectionLost(_) | CallError::Timeout { .. } => true,
            CallError::Remote(e) => e.may_have_applied(),
        }
    }

    /// Stable lower-case class name for `--json` output.
    pub fn class(&self) -> &'static str {
        match self {
            CallError::Connect { .. } => "connect",
            CallError::ConnectionLost(_) => "connection_lost",
            CallError::Timeout { .. } => "timeout",
            CallError::Remote(e) => e.class(),
        }
    }
}

type Slot = oneshot::Sender<Reply>;

/// Hashes request ids, which are distinct sequential integers: one multiplication spreads
/// them well enough, where the default SipHash costs more than the rest of the lookup.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SlotMap = HashMap<u64, Slot, BuildHasherDefault<IdHasher>>;

/// The calls waiting for an answer, and whether the connection is gone.
struct InFlight {
    /// `None` once the connection is gone, so late callers fail instead of waiting forever.
    slots: Mutex<Option<SlotMap>>,
    /// Set together with `slots` becoming `None`; read without the lock.
    closed: AtomicBool,
}

struct Inner {
    addr: String,
    next_id: AtomicU64,
    in_flight: Arc<InFlight>,
    requests: mpsc::Sender<Envelope<Request>>,
    /// Cancels the reader and writer when the last `Client` clone is dropped.
    _stop: DropGuard,
}

/// A cheap-to-clone handle to one pipelined connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connect to `addr`, introduce ourselves as `role`, and wait for the handshake.
    pub async fn connect(
        addr: &str,
        role: Role,
        max_frame_len: usize,
    ) -> Result<Client, CallError> {
        let connect_err = |reason: String| CallError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let framed = Framed::new(
            stream,
            FrameCodec::<Envelope<Request>, Envelope<Reply>>::new(max_frame_len),
        );
        let (mut sink, mut frames) = framed.split();
        let (tx, mut rx) = mpsc::channel::<Envelope<Request>>(SEND_QUEUE);
        let in_flight = Arc::new(InFlight {
            slots: Mutex::new(Some(SlotMap::default())),
            closed: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();

        // Writer: coalesce whatever is queued into one flush.
        let writer_stop = stop.clone();
        let writer_in_flight = in_flight.clone();
        tokio::spawn(async move {
            let mut stopped = std::pin::pin!(writer_stop.cancelled());
            loop {
                // Queued requests first: the stop signal is only polled (and its locks taken)
                // when there is nothing to send.
                let first = tokio::select! {
                    biased;
                    first = rx.recv() => match first { Some(f) => f, None => break },
                    _ = &mut stopped => break,
                };
                let mut ok = sink.feed(first).await.is_ok();
                // Drain what is queued, let the tasks that are ready to run queue theirs
                // too, and drain again: one write then carries a whole round of callers'
                // requests instead of one, at the cost of one pass of the scheduler.
                for round in 0..2 {
                    if round == 1 && ok {
                        tokio::task::yield_now().await;
                    }
                    while ok {
                        match rx.try_recv() {
                            Ok(more) => ok = sink.feed(more).await.is_ok(),
                            Err(_) => break,
                        }
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    fail_all(&writer_in_flight);
                    writer_stop.cancel();
                    break;
                }
            }
            let _ = sink.close().await;
        });

        // Reader: route answers by id.
        let reader_stop = stop.clone();
        let reader_in_flight = in_flight.clone();
        tokio::spawn(async move {
            let mut stopped = std::pin::pin!(reader_stop.cancelled());
            loop {
                let frame = tokio::select! {
                    biased;
                    frame = frames.next() => frame,
                    _ = &mut stopped => break,
                };
                let Some(Ok(Ok(env))) = frame else {
                    // EOF, a broken stream or a frame we cannot read: the connection is done.
                    break;
                };
                let slot = match reader_in_flight.slots.lock() {
                    Ok(mut guard) => guard.as_mut().and_then(|m| m.remove(&env.id)),
                    Err(_) => None,
                };
                match slot {
                    Some(slot) => {
                        let _ = slot.send(env.msg);
                    }
                    None if env.id == 0 => {
                        // A connection-level error from the server (e.g. oversized frame);
                        // it closes next, which fails everything in flight.
                        if let Err(e) = env.msg {
                            tracing::debug!(error = %e, "server reported a connection error");
                        }
                    }
                    None => {} // The caller gave up (timeout) before the answer came.
                }
            }
            fail_all(&reader_in_flight);
            reader_stop.cancel();
        });

        let client = Client {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                next_id: AtomicU64::new(1),
                in_flight,
                requests: tx,
                _stop: stop.drop_guard(),
            }),
        };
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            role,
        };
        match client.call_timeout(hello, CONNECT_TIMEOUT).await {
            Ok(Response::Hello { .. }) => Ok(client),
            Ok(other) => Err(connect_err(format!(
                "unexpected handshake answer {other:?}"
            ))),
            Err(CallError::Remote(e)) => Err(CallError::Remote(e)),
            Err(e) => Err(connect_err(e.to_string())),
        }
    }

    /// The address this client is connected to.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Whether the connection is gone (every call would fail).
    pub fn is_closed(&self) -> bool {
        self.inner.in_flight.closed.load(Ordering::Acquire)
    }

    /// Send `req` and wait for its answer, however long it takes.
    pub async fn call(&self, req: Request) -> Result<Response, CallError> {
        let (id, rx) = self.register()?;
        self.send(id, req, rx).await
    }

    /// Send `req` and wait at most `after` for its answer.
    pub async fn call_timeout(&self, req: Request, after: Duration) -> Result<Response, CallError> {
        let (id, rx) = self.register()?;
        match tokio::time::timeout(after, self.send(id, req, rx)).await {
            Ok(result) => result,
            Err(_) => {
                if let Ok(mut guard) = self.inner.in_flight.slots.lock() {
                    if let Some(map) = guard.as_mut() {
                        map.remove(&id);
                    }
                }
                Err(CallError::Timeout {
                    addr: self.inner.addr.clone(),
                    after,
                })
            }
        }
    }

    fn register(&self) -> Result<(u64, oneshot::Receiver<Reply>), CallError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut guard = self.inner.in_flight.slots.lock().map_err(|_| self.lost())?;
        match guard.as_mut() {
            Some(map) => {
                map.insert(id, tx);
                Ok((id, rx))
            }
            None => Err(self.lost()),
        }
    }

    async fn send(
        &self,
        id: u64,
        req: Request,
        rx: oneshot::Receiver<Reply>,
    ) -> Result<Response, CallError> {
        // The queue is rarely full: try the plain push first; waiting for room is boxed so
        // that every call's future stays small.
        match self.inner.requests.try_send(Envelope { id, msg: req }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(env)) => {
                if Box::pin(self.inner.requests.send(env)).await.is_err() {
                    return Err(self.lost());
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.lost()),
        }
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(CallError::Remote(e)),
            Err(_) => Err(self.lost()),
        }
    }

    fn lost(&self) -> CallError {
        CallError::ConnectionLost(self.inner.addr.clone())
    }
}

/// Fail every call in flight and refuse new ones.
fn fail_all(in_flight: &InFlight) {
    in_flight.closed.store(true, Ordering::Release);
    let taken = match in_flight.slots.lock() {
        Ok(mut guard) => guard.take(),
        Err(p) => p.into_inner().take(),
    };
    // Dropping the senders (outside the lock) wakes every waiter with `ConnectionLost`.
    drop(taken);
}
