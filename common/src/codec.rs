//! The frame codec: the one place where bytes become messages and back.
//!
//! Frame layout (all integers big-endian):
//!
//! ```text
//! +------------+-----------+---------------------------+
//! | len: u32   | crc: u32  | body: MessagePack (len-4) |
//! +------------+-----------+---------------------------+
//! ```
//!
//! `len` counts the CRC and the body. It is checked against the configured maximum before
//! anything is buffered, and room is reserved for a frame only in step with the bytes that
//! have arrived (at most [`RESERVE_STEP`] or as much again as is buffered, whichever is
//! more), so a length that is never followed by its bytes costs no memory. `crc` is CRC-32 of
//! the body.
//!
//! Errors come in two kinds. A [`FrameError`] (bad CRC, undecodable body) leaves the framing
//! intact, so it is returned as an item for the connection to answer; the server then
//! carries on after an undecodable body but closes after a bad CRC, whose length it cannot
//! trust either (see `server`). A [`CodecError`] (oversized frame, EOF mid-frame, I/O) means
//! the stream can no longer be trusted and the connection must close.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::wire_fast::FastWire;

/// Bytes taken by the length prefix.
const LEN_PREFIX: usize = 4;
/// Bytes taken by the CRC inside the length-counted payload.
const CRC_LEN: usize = 4;
/// Room reserved at a time for the rest of a frame that has not arrived yet, unless less is
/// missing or more is already buffered.
const RESERVE_STEP: usize = 64 * 1024;

/// A frame that arrived whole but whose content is unusable; the stream itself is fine.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is too short to hold a checksum")]
    Short(usize),
    #[error("checksum mismatch: frame says {expected:#010x}, body hashes to {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    /// The body is not a message we understand; `id` is the request id if it could be read.
    #[error("undecodable message: {reason}")]
    Undecodable { id: Option<u64>, reason: String },
}

/// A failure that leaves the byte stream unusable.
#[derive(thiserror::Error, Debug)]
pub enum CodecError {
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length + CRC + MessagePack codec; encodes `Out` and decodes `In`.
pub struct FrameCodec<Out, In> {
    max_frame_len: usize,
    /// The payload length of the frame whose prefix was consumed and whose payload is awaited.
    awaiting: Option<usize>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<Out, In> FrameCodec<Out, In> {
    /// A codec that refuses frames longer than `max_frame_len` bytes (CRC + body).
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec {
            // What the u32 length prefix can express.
            max_frame_len: max_frame_len.min(u32::MAX as usize),
            awaiting: None,
            _types: PhantomData,
        }
    }
}

/// Encode a message body as CRC + MessagePack (no length prefix).
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body = rmp_serde::to_vec(msg).map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut payload = Vec::with_capacity(CRC_LEN + body.len());
    payload.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    payload.extend_from_slice(&body);
    Ok(payload)
}

/// Check and decode a payload (CRC + MessagePack, length prefix already removed).
pub fn decode_payload<T: DeserializeOwned + FastWire>(payload: &[u8]) -> Result<T, FrameError> {
    let (crc, body) = match payload.split_first_chunk::<CRC_LEN>() {
        Some((crc, body)) => (u32::from_be_bytes(*crc), body),
        None => return Err(FrameError::Short(payload.len())),
    };
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(FrameError::Checksum {
            expected: crc,
            actual,
        });
    }
    if let Some(msg) = T::decode_fast(body) {
        return Ok(msg);
    }
    from_msgpack(body).map_err(|e| FrameError::Undecodable {
        id: envelope_id(body),
        reason: e.to_string(),
    })
}

/// rmp-serde's depth limit for what peers and files send: arrays and maps nested this deep
/// are refused (31 levels decode). Every message of the protocol and every journal entry
/// nests at most about six deep; rmp-serde's default (1024) lets a frame of a kilobyte of
/// nested arrays recurse deep enough to overflow a thread's stack, which aborts the whole
/// process.
pub const MAX_MSGPACK_DEPTH: usize = 32;

/// Decode MessagePack from untrusted bytes (a peer's frame, a file), nested less than
/// [`MAX_MSGPACK_DEPTH`] deep.
///
/// # Errors
/// Bytes that are not a `T`, or that nest deeper.
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    T::deserialize(&mut de)
}

/// Best-effort read of the envelope id of a body whose message did not decode.
fn envelope_id(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
        #[allow(dead_code)]
        msg: serde::de::IgnoredAny,
    }
    from_msgpack::<IdOnly>(body).ok().map(|e| e.id)
}

impl<Out, In: DeserializeOwned + FastWire> Decoder for FrameCodec<Out, In> {
    type Item = Result<In, FrameError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        let size = match self.awaiting {
            Some(size) => size,
            None => {
                let Some(prefix) = src.first_chunk::<LEN_PREFIX>() else {
                    return Ok(None);
                };
                let size = u32::from_be_bytes(*prefix) as usize;
                if size > self.max_frame_len {
                    return Err(CodecError::TooLarge {
                        size,
                        max: self.max_frame_len,
                    });
                }
                src.advance(LEN_PREFIX);
                self.awaiting = Some(size);
                size
            }
        };
        if src.len() < size {
            // Room for what is likely to come next, not for what the prefix promised.
            let missing = size - src.len();
            src.reserve(missing.min(RESERVE_STEP.max(src.len())));
            return Ok(None);
        }
        self.awaiting = None;
        let payload = src.split_to(size);
        Ok(Some(decode_payload(&payload)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.awaiting.is_none() => Ok(None),
            None => {
                src.advance(src.len());
                Err(CodecError::Truncated)
            }
        }
    }
}

impl<Out: Serialize + FastWire, In> Encoder<Out> for FrameCodec<Out, In> {
    type Error = CodecError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        // Serialise straight into `dst` behind a placeholder header, then fill the header in:
        // no intermediate buffer, no copy of the body.
        let start = dst.len();
        dst.reserve(LEN_PREFIX + CRC_LEN + 64);
        dst.put_u32(0);
        dst.put_u32(0);
        let body_start = dst.len();
        if !msg.encode_fast(dst) {
            dst.truncate(body_start);
            let mut writer = dst.writer();
            let encoded = rmp_serde::encode::write(&mut writer, &msg);
            let dst = writer.into_inner();
            if let Err(e) = encoded {
                dst.truncate(start);
                return Err(CodecError::Encode(e.to_string()));
            }
        }
        let size = dst.len() - start - LEN_PREFIX;
        if size > self.max_frame_len {
            dst.truncate(start);
            return Err(CodecError::TooLarge {
                size,
                max: self.max_frame_len,
            });
        }
        let crc = crc32fast::hash(dst.get(body_start..).unwrap_or_default());
        // `size` fits in u32: it is at most `max_frame_len`, which `new` caps below 4 GiB.
        // Length then CRC, both big-endian u32: together one big-endian u64.
        let header = ((size as u64) << 32 | u64::from(crc)).to_be_bytes();
        if let Some(slot) = dst.get_mut(start..body_start) {
            slot.copy_from_slice(&header);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, Request};
    use bytes::Bytes;

    type Codec = FrameCodec<Envelope<Request>, Envelope<Request>>;

    fn sample() -> Envelope<Request> {
        Envelope {
            id: 7,
            msg: Request::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"hello"),
            },
        }
    }

    fn encoded() -> BytesMut {
        let mut buf = BytesMut::new();
        Codec::new(1024).encode(sample(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip_and_pipelined_frames() {
        let mut buf = encoded();
        buf.extend_from_slice(&encoded());
        let mut codec = Codec::new(1024);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), sample());
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), sample());
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn every_truncation_waits_for_more_then_fails_at_eof() {
        let full = encoded();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            let mut codec = Codec::new(1024);
            assert!(codec.decode(&mut part).unwrap().is_none(), "cut at {cut}");
            let at_eof = codec.decode_eof(&mut part);
            if cut == 0 {
                assert!(at_eof.unwrap().is_none());
            } else {
                assert!(
                    matches!(at_eof, Err(CodecError::Truncated)),
                    "cut at {cut}: {at_eof:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.extend_from_slice(b"abc");
        let err = Codec::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, CodecError::TooLarge { size, max: 1024 } if size == u32::MAX as usize)
        );
    }

    #[test]
    fn a_promised_length_reserves_room_only_as_bytes_arrive() {
        const MAX: usize = 32 << 20;
        let frame = {
            let mut buf = BytesMut::new();
            let mut codec = Codec::new(MAX);
            let env = Envelope {
                id: 9,
                msg: Request::Put {
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from(vec![7u8; 3 << 20]),
                },
            };
            codec.encode(env, &mut buf).unwrap();
            buf
        };
        // A prefix of 32 MiB and nothing after it: no room taken for what never came.
        let mut codec = Codec::new(MAX);
        let mut idle = BytesMut::new();
        idle.put_u32(MAX as u32);
        assert!(codec.decode(&mut idle).unwrap().is_none());
        assert!(idle.capacity() <= 2 * RESERVE_STEP, "{}", idle.capacity());
        // A real 3 MiB frame fed in small pieces: room grows with what is buffered, and the
        // frame decodes whole.
        let mut codec = Codec::new(MAX);
        let mut src = BytesMut::new();
        let mut decoded = None;
        for piece in frame.chunks(4096) {
            src.extend_from_slice(piece);
            // In proportion to what is buffered (`BytesMut` at most doubles when it grows),
            // never the 3 MiB the prefix promised while little of it has come.
            let (cap, len) = (src.capacity(), src.len());
            assert!(
                cap <= 4 * (len + RESERVE_STEP),
                "room for {cap} with {len} buffered"
            );
            if let Some(item) = codec.decode(&mut src).unwrap() {
                decoded = Some(item.unwrap());
            }
        }
        let env = decoded.expect("the frame decodes");
        assert_eq!(env.id, 9);
        assert!(matches!(env.msg, Request::Put { ref value, .. } if value.len() == 3 << 20));
        assert!(src.is_empty());
    }

    #[test]
    fn oversized_message_is_refused_by_encoder() {
        let mut buf = BytesMut::new();
        let err = Codec::new(8).encode(sample(), &mut buf).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }));
        assert!(buf.is_empty());
    }

    #[test]
    fn bit_flip_anywhere_in_payload_is_a_checksum_error() {
        let full = encoded();
        for i in LEN_PREFIX..full.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = full.clone();
                bad[i] ^= bit;
                let item = Codec::new(1024).decode(&mut bad).unwrap().unwrap();
                assert!(
                    matches!(item, Err(FrameError::Checksum { .. })),
                    "byte {i} bit {bit:#x}: {item:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_with_valid_crc_is_undecodable_not_a_panic() {
        for garbage in [
            &b""[..],
            b"\xc1",
            b"\x92\x01\xa3foo",
            b"\xff\xff\xff\xff\xff",
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32((CRC_LEN + garbage.len()) as u32);
            buf.put_u32(crc32fast::hash(garbage));
            buf.extend_from_slice(garbage);
            let item = Codec::new(1024).decode(&mut buf).unwrap().unwrap();
            assert!(
                matches!(item, Err(FrameError::Undecodable { .. })),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn unknown_message_keeps_its_id() {
        #[derive(Serialize)]
        enum Future {
            Teleport,
        }
        impl crate::wire_fast::FastMessage for Future {}
        let mut buf = BytesMut::new();
        FrameCodec::<Envelope<Future>, ()>::new(1024)
            .encode(
                Envelope {
                    id: 42,
                    msg: Future::Teleport,
                },
                &mut buf,
            )
            .unwrap();
        let item = Codec::new(1024).decode(&mut buf).unwrap().unwrap();
        assert!(
            matches!(item, Err(FrameError::Undecodable { id: Some(42), .. })),
            "{item:?}"
        );
    }

    #[test]
    fn short_frame_is_reported() {
        let mut buf = BytesMut::new();
        buf.put_u32(2);
        buf.extend_from_slice(b"ab");
        let item = Codec::new(1024).decode(&mut buf).unwrap().unwrap();
        assert_eq!(item, Err(FrameError::Short(2)));
    }

    /// A frame of nothing but nested arrays (a kilobyte is enough) once recursed deep enough
    /// to overflow the decoding thread's stack and abort the process; it is undecodable,
    /// with its id, like any other bad message.
    #[test]
    fn deeply_nested_frames_are_undecodable_not_a_crash() {
        for depth in [MAX_MSGPACK_DEPTH + 1, 1_000, 100_000] {
            // [1, [[[...nil...]]]]: an envelope whose message nests `depth` arrays deep.
            let mut body = vec![0x92, 0x01];
            body.extend(std::iter::repeat_n(0x91, depth));
            body.push(0xc0);
            let mut payload = crc32fast::hash(&body).to_be_bytes().to_vec();
            payload.extend_from_slice(&body);
            for result in [
                decode_payload::<Envelope<Request>>(&payload).map(|_| ()),
                decode_payload::<Envelope<crate::protocol::Reply>>(&payload).map(|_| ()),
            ] {
                assert!(
                    matches!(
                        result,
                        Err(FrameError::Undecodable {
                            id: None | Some(1),
                            ..
                        })
                    ),
                    "{depth}: {result:?}"
                );
            }
        }
    }
}
