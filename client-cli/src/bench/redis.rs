//! A minimal, pipelining Redis client: just enough RESP to drive `SET` and `GET` with the same
//! load generator as RingKV, so both are measured by one client.
//!
//! Commands are RESP arrays of bulk strings. Replies are parsed by [`parse`], which accepts
//! simple strings, errors, integers, bulk strings (null included), arrays (RESP2) and the RESP3
//! null, and never panics or allocates on the strength of a length it has not yet received.
//!
//! Redis answers a connection's commands in order, so pipelining needs no ids: the writer
//! task queues each caller's reply slot on a FIFO *before* the command's bytes go out, and the
//! reader task pops one slot per parsed reply. Any number of tasks may [`RedisClient::call`] at
//! once; the writer coalesces what is queued into one socket write. When the connection fails,
//! every waiting call fails with [`RedisError::ConnectionLost`].

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest bulk string accepted; Redis's own default `proto-max-bulk-len`.
const MAX_BULK_LEN: usize = 512 * 1024 * 1024;

/// Largest array length accepted. Benchmark replies are never arrays; this bounds what a
/// confused server can make us walk.
const MAX_ARRAY_LEN: usize = 1 << 20;

/// Deepest nesting of arrays accepted, so hostile input cannot recurse without bound.
const MAX_DEPTH: usize = 8;

/// Longest line (a simple string, an error, a number) accepted without its CRLF: a reply
/// that never ends its line would otherwise be buffered, and searched again, without bound.
const MAX_LINE: usize = 64 * 1024;

/// Commands queued for the writer before callers wait.
const SEND_QUEUE: usize = 4096;

/// Most bytes the writer gathers into one write.
const MAX_WRITE_BATCH: usize = 256 * 1024;

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR message`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3 foo`; `None` for the null bulk string `$-1` (and RESP3's `_`).
    Bulk(Option<Bytes>),
    /// `*N ...`; `None` for the null array `*-1`.
    Array(Option<Vec<Resp>>),
}

/// Input that is not RESP; the connection cannot be trusted after it.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    #[error("unknown reply type byte {0:#04x}")]
    UnknownType(u8),
    #[error("malformed length or integer {0:?}")]
    BadNumber(String),
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("bulk string not terminated by CRLF")]
    BadTerminator,
    #[error("replies nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Parse one reply from the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// reply and how many bytes it took.
///
/// # Errors
/// [`RespError`] for input that is not RESP.
pub fn parse(buf: &[u8]) -> Result<Option<(Resp, usize)>, RespError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], start: usize, depth: usize) -> Result<Option<(Resp, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::TooDeep);
    }
    let Some(rest) = buf.get(start..) else {
        return Ok(None);
    };
    let Some((&kind, _)) = rest.split_first() else {
        return Ok(None);
    };
    let Some((line, after_line)) = line_at(buf, start + 1)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((
            Resp::Simple(Bytes::copy_from_slice(line)),
            after_line,
        ))),
        b'-' => Ok(Some((
            Resp::Error(String::from_utf8_lossy(line).into_owned()),
            after_line,
        ))),
        b':' => Ok(Some((Resp::Integer(number(line)?), after_line))),
        b'_' => Ok(Some((Resp::Bulk(None), after_line))),
        b'$' => {
            let Some(len) = length(line, "bulk string", MAX_BULK_LEN)? else {
                return Ok(Some((Resp::Bulk(None), after_line)));
            };
            let end = after_line + len;
            match buf.get(after_line..end + 2) {
                None => Ok(None),
                Some(body) => match body.strip_suffix(b"\r\n") {
                    Some(value) => Ok(Some((
                        Resp::Bulk(Some(Bytes::copy_from_slice(value))),
                        end + 2,
                    ))),
                    None => Err(RespError::BadTerminator),
                },
            }
        }
        b'*' => {
            let Some(count) = length(line, "array", MAX_ARRAY_LEN)? else {
                return Ok(Some((Resp::Array(None), after_line)));
            };
            let mut items = Vec::with_capacity(count.min(64));
            let mut at = after_line;
            for _ in 0..count {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, next)) => {
                        items.push(item);
                        at = next;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(Some(items)), at)))
        }
        other => Err(RespError::UnknownType(other)),
    }
}

/// The line starting at `start` (without its CRLF) and the offset just past the CRLF;
/// `None` while the CRLF has not arrived.
fn line_at(buf: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let Some(rest) = buf.get(start..) else {
        return Ok(None);
    };
    let searched = rest.get(..MAX_LINE + 2).unwrap_or(rest);
    match searched.windows(2).position(|w| w == b"\r\n") {
        Some(cr) => Ok(rest.get(..cr).map(|line| (line, start + cr + 2))),
        None if rest.len() >= MAX_LINE + 2 => Err(RespError::TooLarge {
            what: "reply line",
            len: rest.len(),
            max: MAX_LINE,
        }),
        None => Ok(None),
    }
}

fn number(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RespError::BadNumber(String::from_utf8_lossy(line).into_owned()))
}

/// A length field: `None` for `-1` (null), else a length within `max`.
fn length(line: &[u8], what: &'static str, max: usize) -> Result<Option<usize>, RespError> {
    match number(line)? {
        -1 => Ok(None),
        n if n < 0 => Err(RespError::BadNumber(n.to_string())),
        n => {
            let len = usize::try_from(n).unwrap_or(usize::MAX);
            if len > max {
                return Err(RespError::TooLarge { what, len, max });
            }
            Ok(Some(len))
        }
    }
}

/// Append the RESP encoding of the command `parts` (`["SET", key, value]`) to `out`.
pub fn encode_command(parts: &[&[u8]], out: &mut BytesMut) {
    put_header(out, b'*', parts.len());
    for part in parts {
        put_header(out, b'$', part.len());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// Append `kind`, `n` in decimal and CRLF, with no formatting machinery and no allocation: the
/// load generator encodes every command it sends to Redis, and its cost per command should be
/// no higher than that of RingKV's own client.
fn put_header(out: &mut BytesMut, kind: u8, n: usize) {
    out.put_u8(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Why a Redis call failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RedisError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to redis lost")]
    ConnectionLost,
    #[error("no answer from redis within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error reply.
    #[error("redis error: {0}")]
    Remote(String),
    /// Redis answered with a reply of the wrong kind.
    #[error("unexpected reply {0:?}")]
    Unexpected(String),
}

impl RedisError {
    /// Stable lower-case class name, in the same style as RingKV's error classes.
    pub fn class(&self) -> &'static str {
        match self {
            RedisError::Connect { .. } => "connect",
            RedisError::ConnectionLost => "connection_lost",
            RedisError::Timeout(_) => "timeout",
            RedisError::Remote(_) => "redis_error",
            RedisError::Unexpected(_) => "unexpected_answer",
        }
    }
}

type Slot = oneshot::Sender<Resp>;

/// A cheap-to-clone handle to one pipelined Redis connection.
#[derive(Clone)]
pub struct RedisClient {
    requests: mpsc::Sender<(Bytes, Slot)>,
    _stop: std::sync::Arc<DropGuard>,
}

impl RedisClient {
    /// Connect to the Redis server at `addr`, giving up after `timeout`.
    ///
    /// # Errors
    /// [`RedisError::Connect`].
    pub async fn connect(addr: &str, timeout: Duration) -> Result<RedisClient, RedisError> {
        let connect_err = |reason: String| RedisError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(format!("timed out after {timeout:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut read, mut write) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<(Bytes, Slot)>(SEND_QUEUE);
        // Unbounded, but never longer than what the bounded request queue let through.
        let (slots_tx, mut slots_rx) = mpsc::unbounded_channel::<Slot>();
        let stop = CancellationToken::new();

        let writer_stop = stop.clone();
        tokio::spawn(async move {
            let mut batch = BytesMut::new();
            loop {
                let first = tokio::select! {
                    _ = writer_stop.cancelled() => break,
                    first = rx.recv() => match first { Some(f) => f, None => break },
                };
                let mut next = Some(first);
                while let Some((bytes, slot)) = next.take() {
                    // The slot goes first: the reply cannot arrive before its command is sent.
                    if slots_tx.send(slot).is_err() {
                        writer_stop.cancel();
                        return;
                    }
                    batch.extend_from_slice(&bytes);
                    if batch.len() < MAX_WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if write.write_all(&batch).await.is_err() {
                    writer_stop.cancel();
                    return;
                }
                batch.clear();
            }
        });

        let reader_stop = stop.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            'conn: loop {
                loop {
                    match parse(&buf) {
                        Ok(Some((reply, used))) => {
                            buf.advance(used);
                            match slots_rx.recv().await {
                                // A caller that timed out dropped its receiver; not our error.
                                Some(slot) => {
                                    let _ = slot.send(reply);
                                }
                                // A reply nobody asked for: the stream is out of step.
                                None => break 'conn,
                            }
                        }
                        Ok(None) => break,
                        // Not RESP: the stream is out of step. Ending the connection fails the
                        // calls in flight as `connection_lost`, which the report shows.
                        Err(_) => break 'conn,
                    }
                }
                let n = tokio::select! {
                    _ = reader_stop.cancelled() => break,
                    n = read.read_buf(&mut buf) => n,
                };
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // Dropping the queued slots fails every waiting call.
            reader_stop.cancel();
        });

        Ok(RedisClient {
            requests: tx,
            _stop: std::sync::Arc::new(stop.drop_guard()),
        })
    }

    /// Send one encoded command and wait at most `timeout` for its reply.
    ///
    /// # Errors
    /// [`RedisError::ConnectionLost`] or [`RedisError::Timeout`]; an error *reply* is returned
    /// as `Ok(Resp::Error(..))`.
    pub async fn call(&self, command: Bytes, timeout: Duration) -> Result<Resp, RedisError> {
        let (slot, reply) = oneshot::channel();
        let exchange = async {
            self.requests
                .send((command, slot))
                .await
                .map_err(|_| RedisError::ConnectionLost)?;
            reply.await.map_err(|_| RedisError::ConnectionLost)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RedisError::Timeout(timeout))?
    }

    /// `GET key`: the value, or `None` when the key does not exist.
    ///
    /// # Errors
    /// As [`call`](Self::call), plus [`RedisError::Remote`] and [`RedisError::Unexpected`].
    pub async fn get(&self, key: &[u8], timeout: Duration) -> Result<Option<Bytes>, RedisError> {
        let mut cmd = BytesMut::with_capacity(32 + key.len());
        encode_command(&[b"GET", key], &mut cmd);
        match self.call(cmd.freeze(), timeout).await? {
            Resp::Bulk(value) => Ok(value),
            Resp::Error(e) => Err(RedisError::Remote(e)),
            other => Err(RedisError::Unexpected(format!("{other:?}"))),
        }
    }

    /// `SET key value`.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn set(&self, key: &[u8], value: &[u8], timeout: Duration) -> Result<(), RedisError> {
        let mut cmd = BytesMut::with_capacity(48 + key.len() + value.len());
        encode_command(&[b"SET", key, value], &mut cmd);
        match self.call(cmd.freeze(), timeout).await? {
            Resp::Simple(s) if s.as_ref() == b"OK" => Ok(()),
            Resp::Error(e) => Err(RedisError::Remote(e)),
            other => Err(RedisError::Unexpected(format!("{other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> Resp {
        let (reply, used) = parse(input).unwrap().unwrap();
        assert_eq!(used, input.len(), "{input:?}");
        reply
    }

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(whole(b"+OK\r\n"), Resp::Simple(Bytes::from_static(b"OK")));
        assert_eq!(
            whole(b"-ERR unknown command\r\n"),
            Resp::Error("ERR unknown command".into())
        );
        assert_eq!(whole(b":-42\r\n"), Resp::Integer(-42));
        assert_eq!(
            whole(b"$5\r\nhello\r\n"),
            Resp::Bulk(Some(Bytes::from_static(b"hello")))
        );
        assert_eq!(whole(b"$0\r\n\r\n"), Resp::Bulk(Some(Bytes::new())));
        assert_eq!(whole(b"$-1\r\n"), Resp::Bulk(None));
        assert_eq!(whole(b"_\r\n"), Resp::Bulk(None));
        assert_eq!(whole(b"*-1\r\n"), Resp::Array(None));
        assert_eq!(
            whole(b"*2\r\n$1\r\na\r\n:1\r\n"),
            Resp::Array(Some(vec![
                Resp::Bulk(Some(Bytes::from_static(b"a"))),
                Resp::Integer(1)
            ]))
        );
        // Binary-safe: CRLF inside a bulk string is data.
        assert_eq!(
            whole(b"$4\r\n\r\n\r\n\r\n"),
            Resp::Bulk(Some(Bytes::from_static(b"\r\n\r\n")))
        );
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let input = b"*3\r\n+OK\r\n$5\r\nhello\r\n*1\r\n:7\r\n";
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(input).unwrap().is_some());
    }

    #[test]
    fn pipelined_replies_parse_one_after_another() {
        let input = b"+OK\r\n$3\r\nabc\r\n$-1\r\n";
        let mut at = 0;
        let mut replies = Vec::new();
        while let Some((reply, used)) = parse(&input[at..]).unwrap() {
            replies.push(reply);
            at += used;
        }
        assert_eq!(at, input.len());
        assert_eq!(replies.len(), 3);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"?what\r\n"[..],
            b":12x\r\n",
            b"$-2\r\n",
            b"$abc\r\n",
            b"$3\r\nabcXY",
            b"*-5\r\n",
            b"$99999999999999999999\r\n",
            b"$1000000000\r\n",
            b"*2000000\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 2);
        assert_eq!(parse(&deep), Err(RespError::TooDeep));
    }

    /// A line that never ends is refused once it is longer than any reply line, instead of
    /// being buffered for ever; up to that length it may still be arriving.
    #[test]
    fn a_line_without_its_end_is_bounded() {
        let mut line = vec![b'+'];
        line.resize(1 + MAX_LINE + 1, b'x');
        assert_eq!(parse(&line), Ok(None), "still within the limit");
        line.push(b'x');
        assert!(
            matches!(
                parse(&line),
                Err(RespError::TooLarge {
                    what: "reply line",
                    ..
                })
            ),
            "{:?}",
            parse(&line)
        );
        let mut whole = vec![b'+'];
        whole.resize(1 + MAX_LINE, b'x');
        whole.extend_from_slice(b"\r\n");
        let (reply, used) = parse(&whole).unwrap().unwrap();
        assert_eq!(used, whole.len());
        assert!(matches!(reply, Resp::Simple(s) if s.len() == MAX_LINE));
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        let mut out = BytesMut::new();
        encode_command(&[b"SET", b"k", b"v\r\n"], &mut out);
        assert_eq!(&out[..], b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
        assert_eq!(whole(&out), {
            let parts = [&b"SET"[..], b"k", b"v\r\n"];
            Resp::Array(Some(
                parts
                    .iter()
                    .map(|p| Resp::Bulk(Some(Bytes::copy_from_slice(p))))
                    .collect(),
            ))
        });
        // A value's length in a whole command.
        let value = vec![b'x'; 1024];
        let mut out = BytesMut::new();
        encode_command(&[b"SET", b"key", &value], &mut out);
        let mut expected = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$1024\r\n".to_vec();
        expected.extend_from_slice(&value);
        expected.extend_from_slice(b"\r\n");
        assert!(out[..] == expected[..]);
    }

    #[test]
    fn headers_write_numbers_of_every_length_as_the_formatter_does() {
        let mut numbers = vec![0, usize::MAX];
        let mut power: usize = 1;
        while let Some(next) = power.checked_mul(10) {
            numbers.extend([next - 1, next, next + 1]);
            power = next;
        }
        for n in numbers {
            let mut out = BytesMut::new();
            put_header(&mut out, b'$', n);
            assert_eq!(&out[..], format!("${n}\r\n").as_bytes(), "{n}");
        }
    }

    /// A fake server that answers two pipelined commands in order, split across writes.
    #[tokio::test]
    async fn client_pipelines_and_matches_replies_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let mut commands = 0;
            while commands < 2 {
                sock.read_buf(&mut buf).await.unwrap();
                commands = buf
                    .windows(3)
                    .filter(|w| *w == b"*2\r" || *w == b"*3\r")
                    .count();
            }
            sock.write_all(b"+OK\r\n$2\r").await.unwrap();
            sock.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            sock.write_all(b"\nhi\r\n").await.unwrap();
            // Then close: a third call must fail, not hang.
        });
        let client = RedisClient::connect(&addr, Duration::from_secs(2))
            .await
            .unwrap();
        let t = Duration::from_secs(2);
        let (set, get) = tokio::join!(client.set(b"k", b"hi", t), client.get(b"k", t));
        assert_eq!(set, Ok(()));
        assert_eq!(get, Ok(Some(Bytes::from_static(b"hi"))));
        server.await.unwrap();
        let third = client.get(b"k", t).await;
        assert_eq!(third, Err(RedisError::ConnectionLost));
    }
}
