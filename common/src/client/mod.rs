//! A pipelining client over one TCP connection.
//!
//! Any number of tasks may [`Client::call`] at once. Each call gets a slot in the
//! connection's table of calls ([`calls`]), whose id is the request's id; a writer task
//! coalesces queued requests into few socket writes (it yields once before each flush, so
//! callers that are about to send join the batch) and a reader task routes each answer to
//! its slot by id, in whatever order answers come.
//! On a connection to a storage node ([`Batching::On`]), the writer also puts the node
//! requests it drained together into [`Request::Batch`] frames, reads and writes apart, and
//! the reader hands out each answer of a batch to its own call: callers still make one call
//! per key, while the node handles one message per round.
//! Timeouts are kept by a sweep over the table every [`TIMEOUT_TICK`], not by a timer
//! per call: a call then costs no timer registration and no clock read.
//! When the connection drops, every call still in flight fails with
//! [`CallError::ConnectionLost`], and so does every later call: a `Client` never reconnects
//! by itself, the owner makes a new one.

mod calls;

use crate::sync::MutexExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use self::calls::{Calls, Polled};
use crate::codec::FrameCodec;
use crate::error::WireError;
use crate::protocol::{
    BatchKind, Envelope, Reply, Request, Response, Role, BATCH_ITEM_OVERHEAD, MAX_BATCH_REQUESTS,
    PROTOCOL_VERSION,
};

/// Requests queued for the writer before callers wait.
const SEND_QUEUE: usize = 4096;

/// How often overdue calls are looked for: a call with a timeout fails between its timeout
/// and its timeout plus two ticks.
pub const TIMEOUT_TICK: Duration = Duration::from_millis(10);

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

/// The calls waiting for an answer, and whether the connection is gone.
struct InFlight {
    calls: Mutex<Calls>,
    /// Set as the table closes; read without the lock.
    closed: AtomicBool,
    /// Sweeps done so far: deadlines are counted in sweeps.
    sweeps: AtomicU64,
}

impl InFlight {
    /// The table. Every change to it is complete before the lock is released, so a panic
    /// elsewhere while it was held leaves it consistent.
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock_unpoisoned()
    }
}

/// Wake the calls whose outcome came in, once the table's lock is released.
fn wake_all(wake: &mut Vec<Waker>) {
    wake.drain(..).for_each(Waker::wake);
}

struct Inner {
    addr: String,
    in_flight: Arc<InFlight>,
    requests: mpsc::Sender<Envelope<Request>>,
    /// The reader, writer and sweep tasks, stopped when the last `Client` clone is dropped.
    /// Aborting them costs their loops nothing, where a stop signal would be polled on
    /// every wake-up.
    tasks: [AbortHandle; 3],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A request waiting for room in a full queue (rare, so boxed).
type WaitForRoom =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CallError>> + Send>>;

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
        Self::connect_with(addr, role, max_frame_len, Batching::Off).await
    }

    /// As [`connect`](Client::connect), with `batching` saying whether the writer may carry
    /// queued node requests together in [`Request::Batch`] frames (the peer must be a node).
    pub async fn connect_with(
        addr: &str,
        role: Role,
        max_frame_len: usize,
        batching: Batching,
    ) -> Result<Client, CallError> {
        Self::connect_as(addr, role, None, max_frame_len, batching).await
    }

    /// As [`connect_with`](Client::connect_with), presenting the cluster `token` in the
    /// hello: a node or coordinator refuses the peer roles without it
    /// ([`crate::cluster_token`]).
    pub async fn connect_as(
        addr: &str,
        role: Role,
        token: Option<&str>,
        max_frame_len: usize,
        batching: Batching,
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
        // Owned halves: the reader and the writer each own theirs, with no lock between.
        let (read_half, write_half) = stream.into_split();
        let mut sink = FramedWrite::new(
            write_half,
            FrameCodec::<Envelope<Request>, Envelope<Reply>>::new(max_frame_len),
        );
        let mut frames = FramedRead::new(
            read_half,
            FrameCodec::<Envelope<Request>, Envelope<Reply>>::new(max_frame_len),
        );
        let (tx, mut rx) = mpsc::channel::<Envelope<Request>>(SEND_QUEUE);
        let in_flight = Arc::new(InFlight {
            calls: Mutex::new(Calls::new()),
            closed: AtomicBool::new(false),
            sweeps: AtomicU64::new(0),
        });

        // Sweep: fail the calls that are overdue.
        let sweep_in_flight = in_flight.clone();
        let sweep_addr = addr.to_string();
        let sweeper = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(TIMEOUT_TICK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                sweep(&sweep_in_flight, &sweep_addr);
            }
        })
        .abort_handle();

        // Reader: route answers by id. When the connection ends, everything in flight fails
        // and the other two tasks stop (the writer's handle is filled in once it is spawned).
        let reader_in_flight = in_flight.clone();
        let writer_slot = Arc::new(std::sync::OnceLock::<AbortHandle>::new());
        let reader_stops_writer = writer_slot.clone();
        let reader_stops_sweeper = sweeper.clone();
        let reader = tokio::spawn(async move {
            // EOF, a broken stream or a frame we cannot read: the connection is done.
            let mut wake: Vec<Waker> = Vec::new();
            while let Some(Ok(Ok(env))) = frames.next().await {
                let id = env.id;
                match env.msg {
                    // The first part of a batch's answers (a large one comes in several):
                    // one lock for the whole batch; the waiters are woken outside it.
                    Ok(Response::Batch(answers)) => {
                        let mut calls = reader_in_flight.calls();
                        calls.batch_answered(id);
                        for answer in answers {
                            calls.complete(answer.id, Ok(answer.msg), &mut wake);
                        }
                    }
                    Err(refusal) if id == 0 => {
                        // A connection-level error from the server (e.g. an oversized
                        // frame); it closes next, which fails everything in flight.
                        tracing::debug!(error = %refusal, "server reported a connection error");
                    }
                    // An error answered to a batch frame as a whole reaches each of its
                    // calls; one answered to a single request, that request's call.
                    Err(refusal) => {
                        let mut calls = reader_in_flight.calls();
                        let refused = || Ok(Err(refusal.clone()));
                        if !calls.refuse_batch(id, refused, &mut wake) {
                            calls.complete(id, Ok(Err(refusal)), &mut wake);
                        }
                    }
                    // No call waits for an answer whose caller gave up (timeout) first.
                    Ok(msg) => {
                        reader_in_flight
                            .calls()
                            .complete(id, Ok(Ok(msg)), &mut wake);
                    }
                }
                wake_all(&mut wake);
            }
            fail_all(&reader_in_flight);
            if let Some(writer) = reader_stops_writer.get() {
                writer.abort();
            }
            reader_stops_sweeper.abort();
        })
        .abort_handle();

        // Writer: coalesce whatever is queued into one flush. It ends when the `Client` is
        // dropped (the queue closes) or a write fails, which stops the other two as well.
        let writer_in_flight = in_flight.clone();
        let (writer_stops_reader, writer_stops_sweeper) = (reader.clone(), sweeper.clone());
        let mut batcher = Batcher::new(batching, max_frame_len);
        let writer = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                batcher.add(first);
                // Drain what is queued, let the tasks that are ready to run queue theirs
                // too, and drain again: one write then carries a whole round of callers'
                // requests instead of one, at the cost of one pass of the scheduler.
                for round in 0..2 {
                    if round == 1 {
                        tokio::task::yield_now().await;
                    }
                    while let Ok(env) = rx.try_recv() {
                        batcher.add(env);
                    }
                }
                batcher.close_batches();
                batcher.register_batches(&writer_in_flight);
                let mut ok = true;
                while let Some(frame) = batcher.ready.pop_front() {
                    ok = ok && sink.feed(frame).await.is_ok();
                }
                if !ok || sink.flush().await.is_err() {
                    fail_all(&writer_in_flight);
                    writer_stops_reader.abort();
                    writer_stops_sweeper.abort();
                    break;
                }
            }
            let _ = sink.close().await;
        })
        .abort_handle();
        let _ = writer_slot.set(writer.clone());
        if in_flight.closed.load(Ordering::Acquire) {
            // The reader ended before the writer's handle was there to stop.
            writer.abort();
        }

        let client = Client {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                in_flight,
                requests: tx,
                tasks: [reader, writer, sweeper],
            }),
        };
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            role,
            token: token.map(str::to_string),
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
        self.start(req, None)?.await
    }

    /// Send `req` and wait at most `after` (plus up to two [`TIMEOUT_TICK`]s) for its answer.
    pub async fn call_timeout(&self, req: Request, after: Duration) -> Result<Response, CallError> {
        self.start(req, Some(after))?.await
    }

    /// Queue `req` now, before this returns, and give back the call to await for its answer
    /// (within `after`, as [`call_timeout`](Client::call_timeout)). Several such calls can be
    /// started together and awaited in any order without a future of their own each. When
    /// the queue is full, the request is queued once the call is first polled instead.
    pub fn start_call(&self, req: Request, after: Duration) -> Result<PendingCall, CallError> {
        self.start(req, Some(after))
    }

    /// Register a call and queue its request, without waiting; the call waits for room in a
    /// full queue (within its timeout) once it is first polled.
    fn start(&self, req: Request, after: Option<Duration>) -> Result<PendingCall, CallError> {
        let in_flight = &self.inner.in_flight;
        let deadline = match after {
            // The sweep now under way may be about to end: count one more.
            Some(after) => in_flight
                .sweeps
                .load(Ordering::Relaxed)
                .saturating_add(sweeps_in(after))
                .saturating_add(1),
            None => u64::MAX,
        };
        let id = in_flight
            .calls()
            .insert(deadline, after.unwrap_or(Duration::MAX))
            .ok_or_else(|| self.lost())?;
        let room = match self.inner.requests.try_send(Envelope { id, msg: req }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(env)) => {
                let this = self.clone();
                let wait: WaitForRoom = Box::pin(async move {
                    let send = this.inner.requests.send(env);
                    let sent = match after {
                        Some(after) => tokio::time::timeout(after, send)
                            .await
                            .map_err(|_| this.timed_out(after))?,
                        None => send.await,
                    };
                    sent.map_err(|_| this.lost())
                });
                Some(wait)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.forget(id);
                return Err(self.lost());
            }
        };
        Ok(PendingCall {
            client: self.clone(),
            id,
            taken: false,
            room,
        })
    }

    /// Drop the slot of a call that will not wait for its answer.
    fn forget(&self, id: u64) {
        self.inner.in_flight.calls().forget(id);
    }

    fn timed_out(&self, after: Duration) -> CallError {
        CallError::Timeout {
            addr: self.inner.addr.clone(),
            after,
        }
    }

    fn lost(&self) -> CallError {
        CallError::ConnectionLost(self.inner.addr.clone())
    }
}

/// A call whose request is queued; awaiting it gives the answer. It is `Unpin`, so a caller
/// can keep a few in a plain array and poll them in place. Dropping it gives up on the
/// answer (the call's slot is freed at once; an answer that comes later is dropped).
pub struct PendingCall {
    client: Client,
    id: u64,
    /// The outcome was taken, and with it the slot.
    taken: bool,
    room: Option<WaitForRoom>,
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.taken {
            self.client.forget(self.id);
        }
    }
}

impl std::future::Future for PendingCall {
    type Output = Result<Response, CallError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(room) = this.room.as_mut() {
            match room.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => this.room = None,
                Poll::Ready(Err(e)) => {
                    this.room = None;
                    this.client.forget(this.id);
                    this.taken = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        if this.taken {
            return Poll::Ready(Err(this.client.lost()));
        }
        let polled = this.client.inner.in_flight.calls().poll(this.id, cx);
        let outcome = match polled {
            Polled::Pending => return Poll::Pending,
            Polled::Ready(outcome) => outcome,
            Polled::Lost => Err(this.client.lost()),
        };
        this.taken = true;
        Poll::Ready(match outcome {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(CallError::Remote(e)),
            Err(e) => Err(e),
        })
    }
}

/// Whether a client's writer may put queued node requests together in [`Request::Batch`] frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Every request is a frame of its own (any peer).
    Off,
    /// `Store`, `Forget` and `Fetch` requests queued together travel in batches (peers that
    /// answer `Batch`: storage nodes).
    On,
}

/// Most bytes in one batch, counting each request's key, value and
/// [`BATCH_ITEM_OVERHEAD`] (less when the frame limit is small): a batch is closed before a
/// request would take it over, so a batch frame is at most this plus one request that would
/// have been a frame of its own. (Answers can be larger, a fetch's value; the server splits
/// a batch answer that would not fit in one frame.)
const MAX_BATCH_BYTES: usize = 1 << 20;

/// The writer's batches: requests of each [`BatchKind`] are held until the writer has
/// drained its queue (or a batch is full), then sent as one frame. A batch of one is sent
/// as its plain request.
struct Batcher {
    enabled: bool,
    max_bytes: usize,
    reads: OpenBatch,
    writes: OpenBatch,
    /// Frames to send, in order.
    ready: VecDeque<Envelope<Request>>,
}

/// The requests of one kind held so far, and their bytes as [`Batcher::add`] counts them.
#[derive(Default)]
struct OpenBatch {
    items: Vec<Envelope<Request>>,
    bytes: usize,
}

impl OpenBatch {
    /// Move what is held to `ready`: one request as it is, several as one batch.
    fn close_into(&mut self, ready: &mut VecDeque<Envelope<Request>>) {
        self.bytes = 0;
        if self.items.len() == 1 {
            ready.extend(self.items.pop());
        } else if let Some(first) = self.items.first() {
            // The batch travels under its first request's id. A node answers each request
            // under its own id; an error it answers to the frame as a whole (one it cannot
            // read) reaches every call of the batch through the batches its table keeps.
            let id = first.id;
            ready.push_back(Envelope {
                id,
                msg: Request::Batch(std::mem::take(&mut self.items)),
            });
        }
    }
}

impl Batcher {
    fn new(batching: Batching, max_frame_len: usize) -> Batcher {
        Batcher {
            enabled: batching == Batching::On,
            max_bytes: MAX_BATCH_BYTES.min(max_frame_len / 4),
            reads: OpenBatch::default(),
            writes: OpenBatch::default(),
            ready: VecDeque::new(),
        }
    }

    /// Take one queued request: into its open batch, or straight to `ready`.
    fn add(&mut self, env: Envelope<Request>) {
        let batch = match env.msg.batch_kind() {
            Some(BatchKind::Read) if self.enabled => &mut self.reads,
            Some(BatchKind::Write) if self.enabled => &mut self.writes,
            _ => {
                self.ready.push_back(env);
                return;
            }
        };
        let len = env.msg.payload_len() + BATCH_ITEM_OVERHEAD;
        if !batch.items.is_empty() && batch.bytes + len > self.max_bytes {
            batch.close_into(&mut self.ready);
        }
        batch.items.push(env);
        batch.bytes += len;
        if batch.items.len() >= MAX_BATCH_REQUESTS {
            batch.close_into(&mut self.ready);
        }
    }

    /// Close every open batch: the queue is drained for now.
    fn close_batches(&mut self) {
        self.reads.close_into(&mut self.ready);
        self.writes.close_into(&mut self.ready);
    }

    /// Record the calls of every batch about to be sent, before it is sent (its answer
    /// cannot come first). A closed table keeps none: nothing will be answered.
    fn register_batches(&self, in_flight: &InFlight) {
        let mut frames = self.ready.iter().filter_map(|frame| match &frame.msg {
            Request::Batch(items) => Some((frame.id, items.iter().map(|e| e.id).collect())),
            _ => None,
        });
        let Some(first) = frames.next() else {
            return;
        };
        in_flight
            .calls()
            .add_batches(std::iter::once(first).chain(frames));
    }
}

/// Fail every call in flight and refuse new ones.
fn fail_all(in_flight: &InFlight) {
    in_flight.closed.store(true, Ordering::Release);
    let mut wake = Vec::new();
    in_flight.calls().close(&mut wake);
    wake_all(&mut wake);
}

/// Sweeps that make up `after`, rounded up.
fn sweeps_in(after: Duration) -> u64 {
    let tick = TIMEOUT_TICK.as_nanos();
    u64::try_from(after.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX)
}

/// Count one sweep and fail every call whose deadline it reaches.
fn sweep(in_flight: &InFlight, addr: &str) {
    let now = in_flight.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
    let timed_out = |after| CallError::Timeout {
        addr: addr.to_string(),
        after,
    };
    let mut wake = Vec::new();
    in_flight.calls().sweep(now, timed_out, &mut wake);
    wake_all(&mut wake);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ServerCodec;
    use bytes::Bytes;
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;

    type Peer = Framed<TcpStream, ServerCodec>;

    /// A peer that answers the handshake and then does only what the test tells it.
    async fn connected(max_frame_len: usize) -> (Client, Peer) {
        connected_with(max_frame_len, Batching::Off).await
    }

    async fn connected_with(max_frame_len: usize, batching: Batching) -> (Client, Peer) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut peer = Framed::new(stream, ServerCodec::new(1 << 20));
            let hello = peer.next().await.unwrap().unwrap().unwrap();
            let answer = Response::Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Client,
            };
            peer.send(Envelope {
                id: hello.id,
                msg: Ok(answer),
            })
            .await
            .unwrap();
            peer
        });
        let client = Client::connect_with(&addr, Role::Client, max_frame_len, batching)
            .await
            .unwrap();
        (client, peer.await.unwrap())
    }

    /// Tasks alive on this runtime.
    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    /// Wait (with a deadline) until only `base` tasks are alive on this runtime.
    async fn tasks_end(base: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive_tasks() > base {
            assert!(
                std::time::Instant::now() < deadline,
                "{} client tasks still alive",
                alive_tasks() - base
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_connection_fails_calls_in_flight_and_later_and_stops_the_tasks() {
        let base = alive_tasks();
        let (client, mut peer) = connected(1 << 20).await;
        let caller = client.clone();
        let in_flight = tokio::spawn(async move { caller.call(Request::Status).await });
        assert!(peer.next().await.is_some(), "the request arrives");
        drop(peer);
        let outcome = in_flight.await.unwrap();
        assert!(
            matches!(outcome, Err(CallError::ConnectionLost(_))),
            "{outcome:?}"
        );
        let later = client.call(Request::Status).await;
        assert!(
            matches!(later, Err(CallError::ConnectionLost(_))),
            "{later:?}"
        );
        assert!(client.is_closed());
        tasks_end(base).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_stops_every_task_of_the_connection() {
        let base = alive_tasks();
        let (client, _peer) = connected(1024).await;
        // Too large for the client's own frame limit: the encoder refuses it, the writer fails.
        let put = Request::Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::from(vec![0u8; 4096]),
        };
        assert!(client.call(put).await.is_err());
        assert!(client.is_closed());
        // The peer keeps its end open: the client's tasks must stop by themselves.
        tasks_end(base).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_client_closes_the_socket_and_stops_the_tasks() {
        let base = alive_tasks();
        let (client, mut peer) = connected(1 << 20).await;
        drop(client);
        let next = tokio::time::timeout(Duration::from_secs(5), peer.next()).await;
        assert!(matches!(next, Ok(None)), "the peer sees EOF");
        tasks_end(base).await;
    }

    fn store(key: &str, value_len: usize) -> Request {
        Request::Store {
            key: Bytes::from(key.to_string()),
            version: crate::Version(1),
            value: Some(Bytes::from(vec![b'v'; value_len])),
        }
    }

    fn fetch(key: &str) -> Request {
        Request::Fetch {
            key: Bytes::from(key.to_string()),
        }
    }

    /// The frames a batcher sends for `requests` (ids 1, 2, ...), as (id, request ids inside).
    fn frames(
        batching: Batching,
        max_frame_len: usize,
        requests: Vec<Request>,
    ) -> Vec<(u64, Vec<u64>)> {
        let mut batcher = Batcher::new(batching, max_frame_len);
        for (i, msg) in requests.into_iter().enumerate() {
            batcher.add(Envelope {
                id: i as u64 + 1,
                msg,
            });
        }
        batcher.close_batches();
        batcher
            .ready
            .into_iter()
            .map(|env| match env.msg {
                Request::Batch(items) => (env.id, items.iter().map(|e| e.id).collect()),
                _ => (env.id, vec![env.id]),
            })
            .collect()
    }

    #[test]
    fn the_batcher_keeps_reads_and_writes_apart_and_passes_other_requests_through() {
        let requests = vec![
            store("a", 10),
            fetch("b"),
            Request::Status,
            store("c", 10),
            fetch("d"),
            Request::Forget {
                key: Bytes::from_static(b"e"),
                version: crate::Version(3),
            },
        ];
        let sent = frames(Batching::On, 1 << 20, requests.clone());
        assert_eq!(
            sent,
            vec![(3, vec![3]), (2, vec![2, 5]), (1, vec![1, 4, 6])]
        );
        // Off: every request is its own frame, in order.
        let plain = frames(Batching::Off, 1 << 20, requests);
        let ids: Vec<u64> = plain.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        assert!(plain.iter().all(|(id, inside)| inside == &vec![*id]));
    }

    #[test]
    fn a_batch_of_one_is_sent_as_its_plain_request() {
        let mut batcher = Batcher::new(Batching::On, 1 << 20);
        batcher.add(Envelope {
            id: 9,
            msg: fetch("k"),
        });
        batcher.close_batches();
        let sent: Vec<_> = batcher.ready.into_iter().collect();
        assert_eq!(
            sent,
            vec![Envelope {
                id: 9,
                msg: fetch("k")
            }]
        );
    }

    #[test]
    fn batches_are_closed_at_the_request_and_byte_limits() {
        // By count.
        let many = (0..MAX_BATCH_REQUESTS + 3)
            .map(|i| fetch(&format!("k{i}")))
            .collect();
        let sent = frames(Batching::On, 1 << 30, many);
        let sizes: Vec<usize> = sent.iter().map(|(_, inside)| inside.len()).collect();
        assert_eq!(sizes, vec![MAX_BATCH_REQUESTS, 3]);
        // By bytes: with a 4 KiB frame limit a batch holds at most 1 KiB of keys and values,
        // and a request over that travels alone.
        let sent = frames(
            Batching::On,
            4096,
            vec![
                store("a", 400),
                store("b", 400),
                store("c", 400),
                store("d", 5000),
                store("e", 10),
            ],
        );
        assert_eq!(
            sent,
            vec![(1, vec![1, 2]), (3, vec![3]), (4, vec![4]), (5, vec![5])]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_of_a_batch_reach_their_own_calls() {
        let (client, mut peer) = connected_with(1 << 20, Batching::On).await;
        let keys: Vec<String> = (0..10).map(|i| format!("key-{i}")).collect();
        // On one thread, every call queues its request before the writer runs: one batch.
        let calls = futures::future::join_all(keys.iter().map(|k| {
            let client = client.clone();
            let req = fetch(k);
            async move { client.call_timeout(req, Duration::from_millis(300)).await }
        }));
        let answer = async {
            let env = peer.next().await.unwrap().unwrap().unwrap();
            let Request::Batch(items) = env.msg else {
                panic!("expected one batch, got {:?}", env.msg);
            };
            assert_eq!(items.len(), 10);
            // Answer in reverse order, each with its own key as the value, and leave out
            // the first request: its call must time out, the others must not wait for it.
            let answers = items
                .into_iter()
                .rev()
                .filter(|e| e.id != env.id)
                .map(|e| {
                    let Request::Fetch { key } = e.msg else {
                        panic!("{:?}", e.msg)
                    };
                    Envelope {
                        id: e.id,
                        msg: Ok(Response::Fetched {
                            version: crate::Version(e.id),
                            value: Some(key),
                        }),
                    }
                })
                .collect();
            send_batch(&mut peer, env.id, answers).await;
            peer
        };
        let (results, _peer) = tokio::join!(calls, answer);
        assert!(
            matches!(results[0], Err(CallError::Timeout { .. })),
            "{:?}",
            results[0]
        );
        // Answered (all but the call that timed out): nothing is kept for the batch.
        assert_eq!(kept_batches(&client), 0);
        for (key, result) in keys.iter().zip(&results).skip(1) {
            match result {
                Ok(Response::Fetched { value: Some(v), .. }) => {
                    assert_eq!(v.as_ref(), key.as_bytes())
                }
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_error_answered_to_a_whole_batch_reaches_every_call_of_it() {
        let (client, mut peer) = connected_with(1 << 20, Batching::On).await;
        let calls = futures::future::join_all((0..5).map(|i| {
            let client = client.clone();
            let req = store(&format!("key-{i}"), 10);
            // A call the refusal missed ends in a timeout, which the checks below reject.
            async move { client.call_timeout(req, Duration::from_secs(3)).await }
        }));
        let refuse = async {
            let env = peer.next().await.unwrap().unwrap().unwrap();
            let Request::Batch(items) = &env.msg else {
                panic!("expected one batch, got {:?}", env.msg);
            };
            assert_eq!(items.len(), 5);
            let refusal = WireError::BadRequest("cannot read this frame".into());
            peer.send(Envelope {
                id: env.id,
                msg: Err(refusal),
            })
            .await
            .unwrap();
            peer
        };
        let (results, mut peer) = tokio::join!(calls, refuse);
        for result in &results {
            assert!(
                matches!(result, Err(CallError::Remote(WireError::BadRequest(m))) if m.contains("cannot read")),
                "{result:?}"
            );
        }
        assert_eq!(kept_batches(&client), 0);
        // The connection still serves calls after the refusal.
        let (again, ()) = tokio::join!(
            client.call_timeout(fetch("after"), Duration::from_secs(3)),
            async {
                let env = peer.next().await.unwrap().unwrap().unwrap();
                peer.send(Envelope {
                    id: env.id,
                    msg: Ok(Response::Fetched {
                        version: crate::Version::ZERO,
                        value: None,
                    }),
                })
                .await
                .unwrap();
            }
        );
        assert!(matches!(again, Ok(Response::Fetched { .. })), "{again:?}");
    }

    /// Answer the batch frame `id` with `answers`, each under its own call's id.
    async fn send_batch(peer: &mut Peer, id: u64, answers: Vec<Envelope<Reply>>) {
        let msg = Ok(Response::Batch(answers));
        peer.send(Envelope { id, msg }).await.unwrap();
    }

    /// Batch ids this client still keeps for frames in flight.
    fn kept_batches(client: &Client) -> usize {
        client.inner.in_flight.calls().batches_kept()
    }

    /// Start `n` fetches (timing out after `after`) that travel as one batch, and receive it.
    async fn one_batch(
        client: &Client,
        peer: &mut Peer,
        n: usize,
        after: Duration,
    ) -> (Vec<PendingCall>, Envelope<Request>) {
        let calls = (0..n)
            .map(|i| client.start_call(fetch(&format!("k{i}")), after).unwrap())
            .collect();
        let env = peer.next().await.unwrap().unwrap().unwrap();
        assert!(
            matches!(&env.msg, Request::Batch(items) if items.len() == n),
            "{env:?}"
        );
        (calls, env)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_leaves_nothing_kept_once_answered_timed_out_or_disconnected() {
        // Answered: the entry goes with the answer, long before any call could time out.
        let (client, mut peer) = connected_with(1 << 20, Batching::On).await;
        let (calls, env) = one_batch(&client, &mut peer, 3, Duration::from_secs(60)).await;
        assert_eq!(kept_batches(&client), 1);
        let Request::Batch(items) = env.msg else {
            unreachable!()
        };
        let answers = items
            .iter()
            .map(|e| Envelope {
                id: e.id,
                msg: Ok(Response::Fetched {
                    version: crate::Version::ZERO,
                    value: None,
                }),
            })
            .collect();
        send_batch(&mut peer, env.id, answers).await;
        for call in calls {
            assert!(matches!(call.await, Ok(Response::Fetched { .. })));
        }
        assert_eq!(kept_batches(&client), 0, "an answered batch is forgotten");

        // Never answered: the sweep forgets the batch once all its calls have timed out.
        let (calls, _) = one_batch(&client, &mut peer, 3, Duration::from_millis(30)).await;
        for call in calls {
            assert!(matches!(call.await, Err(CallError::Timeout { .. })));
        }
        assert_eq!(kept_batches(&client), 0, "a timed-out batch is forgotten");

        // Disconnected: everything kept goes with the connection.
        let (calls, _) = one_batch(&client, &mut peer, 3, Duration::from_secs(60)).await;
        assert_eq!(kept_batches(&client), 1);
        drop(peer);
        for call in calls {
            assert!(matches!(call.await, Err(CallError::ConnectionLost(_))));
        }
        assert_eq!(kept_batches(&client), 0, "a lost connection keeps no batch");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_started_call_is_sent_before_it_is_awaited_and_calls_finish_in_any_order() {
        let (client, mut peer) = connected(1 << 20).await;
        let first = client
            .start_call(fetch("first"), Duration::from_secs(5))
            .unwrap();
        let second = client
            .start_call(fetch("second"), Duration::from_secs(5))
            .unwrap();
        let lonely = client
            .start_call(fetch("never answered"), Duration::from_millis(50))
            .unwrap();
        // Neither call has been polled: their requests must reach the peer anyway.
        let mut ids = Vec::new();
        for _ in 0..3 {
            let next = tokio::time::timeout(Duration::from_secs(5), peer.next()).await;
            let env = next
                .expect("sent before being awaited")
                .unwrap()
                .unwrap()
                .unwrap();
            ids.push(env.id);
        }
        let answer = |id: u64, v: u64| Envelope {
            id,
            msg: Ok(Response::Fetched {
                version: crate::Version(v),
                value: None,
            }),
        };
        // The second is answered first; the third never.
        peer.send(answer(ids[1], 2)).await.unwrap();
        let got = second.await.unwrap();
        assert_eq!(
            got,
            Response::Fetched {
                version: crate::Version(2),
                value: None
            }
        );
        peer.send(answer(ids[0], 1)).await.unwrap();
        assert_eq!(
            first.await.unwrap(),
            Response::Fetched {
                version: crate::Version(1),
                value: None
            }
        );
        assert!(matches!(lonely.await, Err(CallError::Timeout { .. })));
    }
}
