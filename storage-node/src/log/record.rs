//! The log's on-disk format, and the only code that encodes or decodes it.
//!
//! A log file is the 8-byte magic [`MAGIC`] followed by record frames, back to back (the frame
//! layout is on [`Record`]).
//!
//! Invariants: every length read from disk is checked against the protocol's key and value limits
//! before anything is allocated, and a frame becomes a [`Record`] only if its CRC matches and its
//! payload parses exactly. Decoding never panics, whatever the bytes.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{self, Read};

use bytes::Bytes;
use ringkv_common::protocol::{MAX_KEY_LEN, MAX_VALUE_LEN};
use ringkv_common::Version;

use super::LogError;

/// First bytes of every log file, so that a stray file is never taken for a log (and rewritten).
pub const MAGIC: &[u8; 8] = b"RKVLOG01";

/// Length of [`MAGIC`]: where the first record starts.
pub const HEADER_LEN: u64 = MAGIC.len() as u64;

/// `crc32: u32 | len: u32`.
const FRAME_HEADER_LEN: usize = 8;

/// `version: u64 | flags: u8 | key_len: u32`.
const PAYLOAD_HEADER_LEN: usize = 13;

/// The smallest frame (a tombstone with an empty key). It is also how much of any frame is read
/// to sanity-check its lengths before the rest is allocated and read.
pub(crate) const MIN_FRAME_LEN: usize = FRAME_HEADER_LEN + PAYLOAD_HEADER_LEN;

/// `flags` bit 0: the record is a tombstone. The other bits are reserved and must be zero, which
/// also makes a random byte sequence less likely to pass for a frame header.
const FLAG_TOMBSTONE: u8 = 1;

/// One log record: a versioned put, or a tombstone when `value` is `None`.
///
/// # On-disk frame
///
/// All integers are big-endian.
///
/// ```text
/// +-----------+-----------+--------------------------------------------------------+
/// | crc32 u32 | len u32   | payload: len bytes                                     |
/// +-----------+-----------+-------------+----------+--------------+-----+----------+
///                         | version u64 | flags u8 | key_len u32  | key | value    |
///                         +-------------+----------+--------------+-----+----------+
/// ```
///
/// - `crc32` (`crc32fast`) covers the `len` field and the payload, so a corrupted length is
///   caught like corrupted data.
/// - `flags` bit 0 marks a tombstone, whose value must be empty; other bits must be zero.
/// - `value` is the rest of the payload: `len - 13 - key_len` bytes (an empty value is a valid put).
/// - `key_len <= MAX_KEY_LEN` (64 KiB) and value length `<= MAX_VALUE_LEN` (16 MiB); anything
///   else is corruption, so a length read from disk never allocates more than one valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Bytes,
    pub version: Version,
    pub value: Option<Bytes>,
}

impl Record {
    /// A put of `value` under `key`.
    pub fn put(key: impl Into<Bytes>, version: Version, value: impl Into<Bytes>) -> Record {
        Record {
            key: key.into(),
            version,
            value: Some(value.into()),
        }
    }

    /// A deletion of `key`.
    pub fn tombstone(key: impl Into<Bytes>, version: Version) -> Record {
        Record {
            key: key.into(),
            version,
            value: None,
        }
    }

    /// Whether this record deletes its key.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Bytes this record takes in the log; summed over a live set, it is what
    /// [`Log::should_compact`](super::Log::should_compact) compares the file size with.
    pub fn encoded_len(&self) -> u64 {
        (MIN_FRAME_LEN + self.key.len() + self.value.as_ref().map_or(0, Bytes::len)) as u64
    }

    /// Appends this record's frame to `buf`.
    ///
    /// # Errors
    /// [`LogError::TooLarge`] if the key or value is over the protocol's limit; `buf` is then unchanged.
    pub(crate) fn encode_into(&self, buf: &mut Vec<u8>) -> Result<(), LogError> {
        encode_frame(&self.key, self.version, self.value.as_deref(), buf)
    }
}

/// A record encoded for the log from borrowed parts, so the key and value can be moved into the
/// store before the frame is appended (see [`Log::append_encoded`](super::Log::append_encoded)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedRecord(pub(crate) Vec<u8>);

impl EncodedRecord {
    /// The frame of a put of `value` (or a tombstone when `None`) under `key` at `version`.
    ///
    /// # Errors
    /// [`LogError::TooLarge`] if the key or value is over the protocol's limit.
    pub fn new(
        key: &[u8],
        version: Version,
        value: Option<&[u8]>,
    ) -> Result<EncodedRecord, LogError> {
        let mut buf = Vec::new();
        encode_frame(key, version, value, &mut buf)?;
        Ok(EncodedRecord(buf))
    }

    /// No frames yet: the start of several records appended with one write.
    pub fn empty() -> EncodedRecord {
        EncodedRecord(Vec::new())
    }

    /// Adds the frame of another record, as [`new`](EncodedRecord::new) encodes it.
    ///
    /// # Errors
    /// [`LogError::TooLarge`] as for `new`; nothing is added then.
    pub fn push(
        &mut self,
        key: &[u8],
        version: Version,
        value: Option<&[u8]>,
    ) -> Result<(), LogError> {
        encode_frame(key, version, value, &mut self.0)
    }

    /// Bytes encoded so far: a mark to [`truncate`](EncodedRecord::truncate) back to.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no frame is encoded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Drops the frames pushed after the mark `len`.
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }
}

/// Appends the frame of a record with these fields to `buf`; the one encoder of the format.
///
/// # Errors
/// [`LogError::TooLarge`] if the key or value is over the protocol's limit; `buf` is then unchanged.
fn encode_frame(
    key: &[u8],
    version: Version,
    value: Option<&[u8]>,
    buf: &mut Vec<u8>,
) -> Result<(), LogError> {
    let tombstone = value.is_none();
    let value = value.unwrap_or_default();
    if key.len() > MAX_KEY_LEN {
        return Err(LogError::TooLarge {
            what: "key",
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(LogError::TooLarge {
            what: "value",
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    // Both fit in u32: the limits above keep the payload far below 4 GiB.
    let len = (PAYLOAD_HEADER_LEN + key.len() + value.len()) as u32;
    let flags = if tombstone { FLAG_TOMBSTONE } else { 0 };
    let parts: [&[u8]; 6] = [
        &len.to_be_bytes(),
        &version.0.to_be_bytes(),
        &[flags],
        &(key.len() as u32).to_be_bytes(),
        key,
        value,
    ];
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    buf.reserve(MIN_FRAME_LEN + key.len() + value.len());
    buf.extend_from_slice(&crc.finalize().to_be_bytes());
    for part in parts {
        buf.extend_from_slice(part);
    }
    Ok(())
}

/// What [`read_frame`] found.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A valid record and the length of its frame.
    Record(Record, u64),
    /// No valid record starts here: why not. Incomplete and corrupt frames look alike on purpose;
    /// recovery tells a torn tail from damage with records after it by what follows, not by the
    /// frame itself.
    Bad(&'static str),
}

/// Reads the frame at the reader's position, of which at most `avail` bytes exist.
///
/// Consumes an unspecified number of bytes when the frame is bad, so the caller must seek before
/// reading again.
///
/// # Errors
/// Only for I/O failures (including the file shrinking below `avail`); bad data is [`Frame::Bad`].
pub(crate) fn read_frame<R: Read>(r: &mut R, avail: u64) -> io::Result<Frame> {
    if avail < MIN_FRAME_LEN as u64 {
        return Ok(Frame::Bad("incomplete record header"));
    }
    let mut raw = [0u8; MIN_FRAME_LEN];
    r.read_exact(&mut raw)?;
    let head = match FrameHead::parse(raw) {
        Ok(head) => head,
        Err(why) => return Ok(Frame::Bad(why)),
    };
    if head.frame_len() > avail {
        return Ok(Frame::Bad("record extends past the end of the file"));
    }
    // `parse` bounded body_len by the key and value limits, so this allocation is bounded too.
    let mut body = Vec::with_capacity(head.body_len);
    r.take(head.body_len as u64).read_to_end(&mut body)?;
    if body.len() != head.body_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "log file shrank while being read",
        ));
    }
    Ok(match head.decode(&body) {
        Ok(record) => Frame::Record(record, head.frame_len()),
        Err(why) => Frame::Bad(why),
    })
}

/// The fixed-size start of a frame: parsed and bounds-checked, but not yet CRC-verified.
pub(crate) struct FrameHead {
    raw: [u8; MIN_FRAME_LEN],
    crc: u32,
    version: u64,
    tombstone: bool,
    key_len: usize,
    /// Key plus value: the payload after its 13-byte header.
    body_len: usize,
}

impl FrameHead {
    /// Parses the first [`MIN_FRAME_LEN`] bytes of a frame and checks every length in them.
    pub(crate) fn parse(raw: [u8; MIN_FRAME_LEN]) -> Result<FrameHead, &'static str> {
        // Destructuring the array mirrors the layout on `Record` and cannot go out of bounds.
        let [c0, c1, c2, c3, l0, l1, l2, l3, v0, v1, v2, v3, v4, v5, v6, v7, flags, k0, k1, k2, k3] =
            raw;
        let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        let key_len = u32::from_be_bytes([k0, k1, k2, k3]) as usize;
        let body_len = len
            .checked_sub(PAYLOAD_HEADER_LEN)
            .ok_or("record length below the payload header")?;
        if flags & !FLAG_TOMBSTONE != 0 {
            return Err("unknown record flags");
        }
        if key_len > MAX_KEY_LEN {
            return Err("key length over the limit");
        }
        let value_len = body_len
            .checked_sub(key_len)
            .ok_or("key extends past the record")?;
        if value_len > MAX_VALUE_LEN {
            return Err("value length over the limit");
        }
        let tombstone = flags & FLAG_TOMBSTONE != 0;
        if tombstone && value_len != 0 {
            return Err("tombstone with a value");
        }
        Ok(FrameHead {
            raw,
            crc: u32::from_be_bytes([c0, c1, c2, c3]),
            version: u64::from_be_bytes([v0, v1, v2, v3, v4, v5, v6, v7]),
            tombstone,
            key_len,
            body_len,
        })
    }

    /// Length of the whole frame, headers included.
    pub(crate) fn frame_len(&self) -> u64 {
        (MIN_FRAME_LEN + self.body_len) as u64
    }

    /// Verifies the CRC over the header and `body` (key and value) and builds the record.
    fn decode(&self, body: &[u8]) -> Result<Record, &'static str> {
        let mut crc = crc32fast::Hasher::new();
        // Everything after the crc field itself; `raw` is longer than 4 bytes, so never empty.
        crc.update(self.raw.get(4..).unwrap_or_default());
        crc.update(body);
        if crc.finalize() != self.crc {
            return Err("checksum mismatch");
        }
        let (key, value) = body
            .split_at_checked(self.key_len)
            .ok_or("key extends past the record")?;
        Ok(Record {
            key: Bytes::copy_from_slice(key),
            version: Version(self.version),
            // Copied rather than sliced out of `body`, so a long-lived value does not pin its key.
            value: (!self.tombstone).then(|| Bytes::copy_from_slice(value)),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::log::test_support::{del, mixed, put};

    fn encode(rec: &Record) -> Vec<u8> {
        let mut buf = Vec::new();
        rec.encode_into(&mut buf).unwrap();
        buf
    }

    fn decode(buf: &[u8]) -> Frame {
        read_frame(&mut &buf[..], buf.len() as u64).unwrap()
    }

    #[test]
    fn round_trip() {
        for rec in mixed(20)
            .into_iter()
            .chain([put(b"", 0, b""), del(b"", u64::MAX)])
        {
            let buf = encode(&rec);
            assert_eq!(buf.len() as u64, rec.encoded_len());
            let encoded = EncodedRecord::new(&rec.key, rec.version, rec.value.as_deref()).unwrap();
            assert_eq!(encoded.0, buf);
            match decode(&buf) {
                Frame::Record(got, n) => {
                    assert_eq!(got, rec);
                    assert_eq!(n, buf.len() as u64);
                }
                Frame::Bad(why) => panic!("{rec:?} did not decode: {why}"),
            }
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let buf = encode(&put(b"ab", 0x0102, b"xyz"));
        let len = 13 + 2 + 3;
        assert_eq!(&buf[4..8], &(len as u32).to_be_bytes());
        assert_eq!(&buf[8..16], &0x0102u64.to_be_bytes());
        assert_eq!(buf[16], 0, "flags of a put");
        assert_eq!(&buf[17..21], &2u32.to_be_bytes());
        assert_eq!(&buf[21..], b"abxyz");
        assert_eq!(&buf[..4], &crc32fast::hash(&buf[4..]).to_be_bytes());
        assert_eq!(encode(&del(b"ab", 1))[16], FLAG_TOMBSTONE);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let rec = put(b"key\x00\xff", 42, b"some value");
        let clean = encode(&rec);
        for bit in 0..clean.len() * 8 {
            let mut buf = clean.clone();
            buf[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(decode(&buf), Frame::Bad(_)),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn every_truncation_is_bad() {
        let clean = encode(&put(b"key", 1, b"value"));
        for cut in 0..clean.len() {
            assert!(
                matches!(decode(&clean[..cut]), Frame::Bad(_)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_fields_are_refused_on_write() {
        let mut buf = Vec::new();
        let key = put(&vec![0; MAX_KEY_LEN + 1], 1, b"");
        assert!(matches!(
            key.encode_into(&mut buf),
            Err(LogError::TooLarge { what: "key", .. })
        ));
        let value = put(b"k", 1, &vec![0; MAX_VALUE_LEN + 1]);
        assert!(matches!(
            value.encode_into(&mut buf),
            Err(LogError::TooLarge { what: "value", .. })
        ));
        assert!(buf.is_empty());
        // The limits themselves are fine.
        put(&vec![0; MAX_KEY_LEN], 1, &vec![0; MAX_VALUE_LEN])
            .encode_into(&mut buf)
            .unwrap();
    }

    /// A frame header with a valid CRC but lying lengths: rejected before any allocation.
    fn forged(len: u32, flags: u8, key_len: u32, body: &[u8]) -> Vec<u8> {
        let mut tail = Vec::new();
        tail.extend_from_slice(&len.to_be_bytes());
        tail.extend_from_slice(&7u64.to_be_bytes());
        tail.push(flags);
        tail.extend_from_slice(&key_len.to_be_bytes());
        tail.extend_from_slice(body);
        let mut buf = crc32fast::hash(&tail).to_be_bytes().to_vec();
        buf.extend_from_slice(&tail);
        buf
    }

    #[test]
    fn lying_headers_are_bad() {
        let cases = [
            ("len below header", forged(12, 0, 0, b"")),
            ("huge len", forged(u32::MAX, 0, 0, b"")),
            ("unknown flag", forged(13, 2, 0, b"")),
            ("key past record", forged(14, 0, 2, b"k")),
            (
                "key over limit",
                forged(13 + MAX_KEY_LEN as u32 + 1, 0, MAX_KEY_LEN as u32 + 1, b""),
            ),
            ("tombstone with value", forged(14, FLAG_TOMBSTONE, 0, b"v")),
        ];
        for (name, buf) in cases {
            // Claim the frame is all there is, however long `len` says it is.
            let got = read_frame(&mut &buf[..], u64::MAX).unwrap();
            assert!(matches!(got, Frame::Bad(_)), "{name}: {got:?}");
        }
        // The forger itself produces valid frames when it does not lie.
        assert!(matches!(decode(&forged(14, 0, 1, b"k")), Frame::Record(..)));
    }
}
