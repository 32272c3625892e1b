//! Hand-written MessagePack for the data path's messages, byte for byte what rmp-serde writes.
//!
//! rmp-serde defines the wire format and remains the codec for every message; this module
//! only takes over the handful that carry the load (`Get`, `Put`, `Delete`, `Fetch`,
//! `Store`, `Forget` and their batches; `Value`, `Written`, `Fetched`, `Stored` and their
//! batches), because serde's generic path spends most of its time naming enum variants by
//! string and visiting every field. Encoding writes exactly the bytes rmp-serde would; decoding
//! accepts only those canonical bytes and gives up (`None`) on anything else, leaving the body
//! to rmp-serde, which decodes it or reports why not. So the fast path can never accept a
//! message the reference decoder would refuse or read one differently; the tests below check
//! both directions, and every mutation of every sample.
//!
//! Keys and values are copied out of the frame, as rmp-serde does: a stored value must not
//! keep a whole receive buffer alive.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::WireError;
use crate::protocol::{Envelope, Request, Response, MAX_BATCH_REQUESTS};
use crate::types::Version;

/// A message with a fast path through the frame codec. Both methods may decline: `false` or
/// `None` sends the message through rmp-serde instead.
pub trait FastWire: Sized {
    /// Append this message's MessagePack encoding to `dst` and return `true`, or return
    /// `false` (whatever was appended is then discarded by the caller).
    fn encode_fast(&self, _dst: &mut BytesMut) -> bool {
        false
    }

    /// Decode `body` if it is the canonical encoding of a message of the fast path.
    fn decode_fast(_body: &[u8]) -> Option<Self> {
        None
    }
}

impl FastWire for () {}

impl<M: FastMessage> FastWire for Envelope<M> {
    fn encode_fast(&self, dst: &mut BytesMut) -> bool {
        write_envelope(self, dst)
    }

    fn decode_fast(body: &[u8]) -> Option<Self> {
        let mut r = Reader { buf: body };
        let envelope = read_envelope(&mut r, true)?;
        r.buf.is_empty().then_some(envelope)
    }
}

/// The message inside an [`Envelope`]; `batch` is whether a batch may appear here (a batch
/// item may not itself be a batch on the fast path, so decoding never recurses deeper).
pub trait FastMessage: Sized {
    /// Append this message's encoding, or return `false` to leave it to rmp-serde.
    fn write(&self, _dst: &mut BytesMut) -> bool {
        false
    }

    /// Read a message in canonical form, or `None` to leave the body to rmp-serde.
    fn read(_r: &mut Reader<'_>, _batch: bool) -> Option<Self> {
        None
    }
}

fn write_envelope<M: FastMessage>(e: &Envelope<M>, dst: &mut BytesMut) -> bool {
    write_array_len(dst, 2);
    write_uint(dst, e.id);
    e.msg.write(dst)
}

fn read_envelope<M: FastMessage>(r: &mut Reader<'_>, batch: bool) -> Option<Envelope<M>> {
    r.array(2)?;
    let id = r.uint()?;
    let msg = M::read(r, batch)?;
    Some(Envelope { id, msg })
}

/// Encode a struct variant's header: `{name: [` followed by `fields` values.
fn write_variant(dst: &mut BytesMut, name: &str, fields: usize) {
    dst.put_u8(0x81);
    write_str(dst, name);
    write_array_len(dst, fields);
}

fn write_batch<M: FastMessage>(dst: &mut BytesMut, items: &[Envelope<M>]) -> bool {
    dst.put_u8(0x81);
    write_str(dst, "Batch");
    write_array_len(dst, items.len());
    items.iter().all(|item| write_envelope(item, dst))
}

fn read_batch<M: FastMessage>(r: &mut Reader<'_>) -> Option<Vec<Envelope<M>>> {
    let n = r.array_len()?;
    // Every item takes at least four bytes: a larger count is not a batch.
    if n > r.buf.len() / 4 {
        return None;
    }
    // An item in memory is 20-30 times its smallest encoding, so room for more items than a
    // batch is formed with is not taken on the strength of the count (a longer one grows as
    // it is read): a frame of junk behind a large count would otherwise cost hundreds of
    // megabytes before its first item fails.
    let mut items = Vec::with_capacity(n.min(MAX_BATCH_REQUESTS));
    for _ in 0..n {
        items.push(read_envelope(r, false)?);
    }
    Some(items)
}

impl FastMessage for Request {
    fn write(&self, dst: &mut BytesMut) -> bool {
        match self {
            Request::Get { key } => {
                write_variant(dst, "Get", 1);
                write_bin(dst, key);
            }
            Request::Put { key, value } => {
                write_variant(dst, "Put", 2);
                write_bin(dst, key);
                write_bin(dst, value);
            }
            Request::Delete { key } => {
                write_variant(dst, "Delete", 1);
                write_bin(dst, key);
            }
            Request::Fetch { key } => {
                write_variant(dst, "Fetch", 1);
                write_bin(dst, key);
            }
            Request::Store {
                key,
                version,
                value,
            } => {
                write_variant(dst, "Store", 3);
                write_bin(dst, key);
                write_uint(dst, version.0);
                write_opt_bin(dst, value.as_ref());
            }
            Request::Forget { key, version } => {
                write_variant(dst, "Forget", 2);
                write_bin(dst, key);
                write_uint(dst, version.0);
            }
            Request::Batch(items) => return write_batch(dst, items),
            _ => return false,
        }
        true
    }

    fn read(r: &mut Reader<'_>, batch: bool) -> Option<Self> {
        r.byte(0x81)?;
        let request = match r.str()? {
            b"Get" => {
                r.array(1)?;
                Request::Get { key: r.bin()? }
            }
            b"Put" => {
                r.array(2)?;
                Request::Put {
                    key: r.bin()?,
                    value: r.bin()?,
                }
            }
            b"Delete" => {
                r.array(1)?;
                Request::Delete { key: r.bin()? }
            }
            b"Fetch" => {
                r.array(1)?;
                Request::Fetch { key: r.bin()? }
            }
            b"Store" => {
                r.array(3)?;
                Request::Store {
                    key: r.bin()?,
                    version: Version(r.uint()?),
                    value: r.opt_bin()?,
                }
            }
            b"Forget" => {
                r.array(2)?;
                Request::Forget {
                    key: r.bin()?,
                    version: Version(r.uint()?),
                }
            }
            b"Batch" if batch => Request::Batch(read_batch(r)?),
            _ => return None,
        };
        Some(request)
    }
}

impl FastMessage for Result<Response, WireError> {
    fn write(&self, dst: &mut BytesMut) -> bool {
        let Ok(response) = self else {
            return false;
        };
        dst.put_u8(0x81);
        write_str(dst, "Ok");
        match response {
            Response::Value { version, value } => {
                write_variant(dst, "Value", 2);
                write_uint(dst, version.0);
                write_opt_bin(dst, value.as_ref());
            }
            Response::Written { version } => {
                write_variant(dst, "Written", 1);
                write_uint(dst, version.0);
            }
            Response::Fetched { version, value } => {
                write_variant(dst, "Fetched", 2);
                write_uint(dst, version.0);
                write_opt_bin(dst, value.as_ref());
            }
            Response::Stored { applied, version } => {
                write_variant(dst, "Stored", 2);
                dst.put_u8(if *applied { 0xc3 } else { 0xc2 });
                write_uint(dst, version.0);
            }
            Response::Batch(items) => return write_batch(dst, items),
            _ => return false,
        }
        true
    }

    fn read(r: &mut Reader<'_>, batch: bool) -> Option<Self> {
        r.byte(0x81)?;
        if r.str()? != b"Ok" {
            return None;
        }
        r.byte(0x81)?;
        let response = match r.str()? {
            b"Value" => {
                r.array(2)?;
                Response::Value {
                    version: Version(r.uint()?),
                    value: r.opt_bin()?,
                }
            }
            b"Written" => {
                r.array(1)?;
                Response::Written {
                    version: Version(r.uint()?),
                }
            }
            b"Fetched" => {
                r.array(2)?;
                Response::Fetched {
                    version: Version(r.uint()?),
                    value: r.opt_bin()?,
                }
            }
            b"Stored" => {
                r.array(2)?;
                Response::Stored {
                    applied: r.bool()?,
                    version: Version(r.uint()?),
                }
            }
            b"Batch" if batch => Response::Batch(read_batch(r)?),
            _ => return None,
        };
        Some(Ok(response))
    }
}

// --- MessagePack primitives, each in the shortest form, as rmp writes them ---

fn write_uint(dst: &mut BytesMut, v: u64) {
    if v < 128 {
        dst.put_u8(v as u8);
    } else if v < 1 << 8 {
        dst.put_u8(0xcc);
        dst.put_u8(v as u8);
    } else if v < 1 << 16 {
        dst.put_u8(0xcd);
        dst.put_u16(v as u16);
    } else if v < 1 << 32 {
        dst.put_u8(0xce);
        dst.put_u32(v as u32);
    } else {
        dst.put_u8(0xcf);
        dst.put_u64(v);
    }
}

fn write_array_len(dst: &mut BytesMut, n: usize) {
    if n < 16 {
        dst.put_u8(0x90 | n as u8);
    } else if n < 1 << 16 {
        dst.put_u8(0xdc);
        dst.put_u16(n as u16);
    } else {
        dst.put_u8(0xdd);
        dst.put_u32(n as u32);
    }
}

/// Only the short names of variants are written here.
fn write_str(dst: &mut BytesMut, s: &str) {
    debug_assert!(s.len() < 32);
    dst.put_u8(0xa0 | s.len() as u8);
    dst.put_slice(s.as_bytes());
}

fn write_bin(dst: &mut BytesMut, b: &[u8]) {
    let n = b.len();
    if n < 1 << 8 {
        dst.put_u8(0xc4);
        dst.put_u8(n as u8);
    } else if n < 1 << 16 {
        dst.put_u8(0xc5);
        dst.put_u16(n as u16);
    } else {
        dst.put_u8(0xc6);
        dst.put_u32(n as u32);
    }
    dst.put_slice(b);
}

fn write_opt_bin(dst: &mut BytesMut, b: Option<&Bytes>) {
    match b {
        Some(b) => write_bin(dst, b),
        None => dst.put_u8(0xc0),
    }
}

/// A cursor over a body; every read returns `None` on anything but the canonical form.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    fn byte(&mut self, expected: u8) -> Option<()> {
        (self.u8()? == expected).then_some(())
    }

    fn uint(&mut self) -> Option<u64> {
        let v = match self.u8()? {
            b @ 0x00..=0x7f => u64::from(b),
            0xcc => u64::from(self.u8()?),
            0xcd => u64::from(u16::from_be_bytes(self.be()?)),
            0xce => u64::from(u32::from_be_bytes(self.be()?)),
            0xcf => u64::from_be_bytes(self.be()?),
            _ => return None,
        };
        Some(v)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<usize> {
        let n = match self.u8()? {
            b @ 0x90..=0x9f => usize::from(b & 0x0f),
            0xdc => usize::from(u16::from_be_bytes(self.be()?)),
            0xdd => u32::from_be_bytes(self.be()?) as usize,
            _ => return None,
        };
        Some(n)
    }

    fn array(&mut self, expected: usize) -> Option<()> {
        (self.array_len()? == expected).then_some(())
    }

    /// A variant name: a short string.
    fn str(&mut self) -> Option<&'a [u8]> {
        match self.u8()? {
            b @ 0xa0..=0xbf => self.take(usize::from(b & 0x1f)),
            _ => None,
        }
    }

    fn bin(&mut self) -> Option<Bytes> {
        let n = match self.u8()? {
            0xc4 => usize::from(self.u8()?),
            0xc5 => usize::from(u16::from_be_bytes(self.be()?)),
            0xc6 => u32::from_be_bytes(self.be()?) as usize,
            _ => return None,
        };
        self.take(n).map(Bytes::copy_from_slice)
    }

    fn opt_bin(&mut self) -> Option<Option<Bytes>> {
        if self.buf.first() == Some(&0xc0) {
            self.buf = self.buf.get(1..)?;
            return Some(None);
        }
        self.bin().map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::protocol::{Reply, Role};
    use crate::types::NodeId;
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    fn bytes(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| i as u8).collect::<Vec<u8>>())
    }

    /// Sizes and numbers on both sides of every boundary of MessagePack's short forms.
    const SIZES: [usize; 8] = [0, 1, 31, 32, 255, 256, 65535, 65536];
    const NUMBERS: [u64; 10] = [
        0,
        127,
        128,
        255,
        256,
        65535,
        65536,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX,
    ];

    fn requests() -> Vec<Request> {
        let mut out = Vec::new();
        for &n in &SIZES {
            out.push(Request::Get { key: bytes(n) });
            out.push(Request::Put {
                key: bytes(3),
                value: bytes(n),
            });
            out.push(Request::Delete { key: bytes(n) });
            out.push(Request::Fetch { key: bytes(n) });
            out.push(Request::Store {
                key: bytes(n),
                version: Version(7),
                value: Some(bytes(n)),
            });
        }
        for &v in &NUMBERS {
            out.push(Request::Store {
                key: bytes(2),
                version: Version(v),
                value: None,
            });
            out.push(Request::Forget {
                key: bytes(2),
                version: Version(v),
            });
        }
        let items = (0..20u64)
            .map(|i| Envelope {
                id: i * 1000,
                msg: Request::Fetch {
                    key: bytes(i as usize),
                },
            })
            .collect();
        out.push(Request::Batch(items));
        out.push(Request::Batch(Vec::new()));
        out
    }

    fn replies() -> Vec<Reply> {
        let mut out = Vec::new();
        for &v in &NUMBERS {
            out.push(Ok(Response::Written {
                version: Version(v),
            }));
            out.push(Ok(Response::Stored {
                applied: v % 2 == 0,
                version: Version(v),
            }));
            out.push(Ok(Response::Value {
                version: Version(v),
                value: None,
            }));
        }
        for &n in &SIZES {
            out.push(Ok(Response::Value {
                version: Version(3),
                value: Some(bytes(n)),
            }));
            out.push(Ok(Response::Fetched {
                version: Version(3),
                value: Some(bytes(n)),
            }));
        }
        let items = (0..17u64)
            .map(|i| Envelope {
                id: i << 30,
                msg: Ok(Response::Fetched {
                    version: Version(i),
                    value: (i % 3 != 0).then(|| bytes(i as usize * 10)),
                }),
            })
            .collect();
        out.push(Ok(Response::Batch(items)));
        out
    }

    fn envelopes<M: Clone>(msgs: Vec<M>) -> Vec<Envelope<M>> {
        msgs.into_iter()
            .flat_map(|msg| {
                NUMBERS.iter().map(move |&id| Envelope {
                    id,
                    msg: msg.clone(),
                })
            })
            .collect()
    }

    fn encode_fast<T: FastWire>(msg: &T) -> Option<Vec<u8>> {
        let mut dst = BytesMut::new();
        msg.encode_fast(&mut dst).then(|| dst.to_vec())
    }

    fn check_same<T>(msgs: Vec<T>)
    where
        T: FastWire + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        for msg in msgs {
            let reference = rmp_serde::to_vec(&msg).unwrap();
            assert_eq!(encode_fast(&msg), Some(reference.clone()), "{msg:?}");
            assert_eq!(T::decode_fast(&reference), Some(msg));
        }
    }

    #[test]
    fn hot_messages_encode_and_decode_exactly_as_rmp_serde() {
        check_same(envelopes(requests()));
        check_same(envelopes(replies()));
    }

    #[test]
    fn other_messages_are_left_to_rmp_serde() {
        let requests = [
            Request::Hello {
                protocol: 1,
                role: Role::Client,
                token: None,
            },
            Request::Status,
            Request::NodeRemove {
                node: NodeId(2),
                accept_loss: false,
            },
        ];
        for msg in requests {
            let e = Envelope { id: 9, msg };
            assert_eq!(encode_fast(&e), None, "{e:?}");
            let reference = rmp_serde::to_vec(&e).unwrap();
            assert_eq!(Envelope::<Request>::decode_fast(&reference), None);
        }
        let replies: [Reply; 4] = [
            Err(WireError::Unavailable("no".into())),
            Ok(Response::Done),
            Ok(Response::Registered { node: NodeId(4) }),
            Ok(Response::Batch(vec![Envelope {
                id: 1,
                msg: Err(WireError::Unavailable("down".into())),
            }])),
        ];
        for msg in replies {
            let e = Envelope { id: 9, msg };
            assert_eq!(encode_fast(&e), None, "{e:?}");
            let reference = rmp_serde::to_vec(&e).unwrap();
            assert_eq!(Envelope::<Reply>::decode_fast(&reference), None);
        }
        // A batch inside a batch is written as rmp-serde would, but never read here, so that
        // decoding cannot recurse without bound.
        let nested = Envelope {
            id: 1,
            msg: Request::Batch(vec![Envelope {
                id: 2,
                msg: Request::Batch(Vec::new()),
            }]),
        };
        let reference = rmp_serde::to_vec(&nested).unwrap();
        assert_eq!(encode_fast(&nested), Some(reference.clone()));
        assert_eq!(Envelope::<Request>::decode_fast(&reference), None);
    }

    /// Whatever the fast path accepts, rmp-serde reads the same way.
    fn check_mutations<T>(msgs: Vec<T>)
    where
        T: FastWire + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        for msg in msgs {
            let good = rmp_serde::to_vec(&msg).unwrap();
            if good.len() > 400 {
                continue;
            }
            let mut variants = Vec::new();
            for i in 0..good.len() {
                for flip in [0x01u8, 0x10, 0x80, 0xff] {
                    let mut b = good.clone();
                    b[i] ^= flip;
                    variants.push(b);
                }
                variants.push(good[..i].to_vec());
            }
            let mut longer = good.clone();
            longer.push(0);
            variants.push(longer);
            for body in variants {
                if let Some(fast) = T::decode_fast(&body) {
                    let reference: T = rmp_serde::from_slice(&body).unwrap();
                    assert_eq!(fast, reference, "{body:?}");
                }
            }
        }
    }

    #[test]
    fn mutated_bodies_never_decode_differently_from_rmp_serde() {
        let small = |n: &usize| *n < 300;
        let requests: Vec<Request> = requests()
            .into_iter()
            .filter(|r| small(&r.payload_len()))
            .collect();
        check_mutations(envelopes(requests));
        let replies: Vec<Reply> = replies()
            .into_iter()
            .filter(|r| r.as_ref().map_or(true, |r| small(&r.payload_len())))
            .collect();
        check_mutations(envelopes(replies));
    }

    /// The largest single allocation made on each thread, so that a test can see what
    /// decoding a message asked for.
    struct LargestAllocation;

    thread_local! {
        static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the thread-local
    // is a plain `Cell` with no destructor, which allocates nothing.
    unsafe impl std::alloc::GlobalAlloc for LargestAllocation {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: `ptr` came from `alloc` above, that is from the system allocator.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: LargestAllocation = LargestAllocation;

    /// The largest allocation `f` made on this thread.
    fn largest_allocation(f: impl FnOnce()) -> usize {
        LARGEST.with(|l| l.set(0));
        f();
        LARGEST.with(std::cell::Cell::get)
    }

    #[test]
    fn a_large_batch_count_over_junk_allocates_little() {
        // A batch of (len / 4) items, then junk: the count passes the first check and the
        // first item fails. Room is made for MAX_BATCH_REQUESTS items, not for the count.
        let junk = 4 << 20;
        let batch = |prefix: &[u8]| {
            let mut body = vec![0x92, 0x01];
            body.extend_from_slice(prefix);
            body.extend_from_slice(b"\x81\xa5Batch\xdd");
            body.extend_from_slice(&((junk / 4) as u32).to_be_bytes());
            body.resize(body.len() + junk, 0xc1);
            body
        };
        let requests = batch(b"");
        let replies = batch(b"\x81\xa2Ok");
        let most = 64 << 10;
        let used = largest_allocation(|| {
            assert_eq!(Envelope::<Request>::decode_fast(&requests), None);
        });
        assert!(used <= most, "decoding allocated {used} bytes at once");
        let used = largest_allocation(|| {
            assert_eq!(Envelope::<Reply>::decode_fast(&replies), None);
        });
        assert!(used <= most, "decoding allocated {used} bytes at once");
    }

    #[test]
    fn a_hostile_batch_count_is_declined_without_allocating() {
        // {"Batch": array32 of 4 billion items} and nothing after it.
        let mut body = vec![0x92, 0x01, 0x81, 0xa5];
        body.extend_from_slice(b"Batch");
        body.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(Envelope::<Request>::decode_fast(&body), None);
    }
}
