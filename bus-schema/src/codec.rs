//! MessagePack codec for envelopes and control messages.
//!
//! Decoding runs in three steps so that every failure has a type and nothing can panic or
//! allocate from a length read off the wire:
//! 1. [`scan`]: a bounds-checked, iterative walk over the MessagePack structure that finds the
//!    end of the first value, rejects the reserved marker and nesting deeper than
//!    [`MAX_DEPTH`], and reports truncation with the offset where the data ran out;
//! 2. small probes read the schema version and the variant tags (`src`, `body.type`) so that a
//!    newer schema or an unknown variant is reported as such, not as a generic shape error;
//! 3. the derived serde decoding of the full type (via `rmp-serde`, borrowing from the frame).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ctl::{CtlReply, CtlRequest};
use crate::schema::{Body, DaemonKind, Envelope, SCHEMA_VERSION};

/// Deepest container nesting accepted. Our messages nest at most 5 deep (a reply with a JSON
/// view may nest more, within reason).
pub const MAX_DEPTH: usize = 64;

/// Why a frame could not be decoded. Grouped as the peer sending bad bytes (`Truncated`,
/// `Garbage`, `TrailingData`, `Malformed`, `FrameCount`, `TopicMismatch`), and an incompatible
/// peer (`NewerSchema`, `OlderSchema`, `UnknownVariant`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame truncated: data ends at byte {offset} inside a value")]
    Truncated { offset: usize },
    #[error("not MessagePack at byte {offset}: {reason}")]
    Garbage { offset: usize, reason: &'static str },
    #[error("{extra} trailing bytes after the message")]
    TrailingData { extra: usize },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("schema version {got} is newer than this build's {supported}")]
    NewerSchema { got: u16, supported: u16 },
    #[error("schema version {got} is older than this build's {supported}")]
    OlderSchema { got: u16, supported: u16 },
    #[error("unknown {what} variant `{name}`")]
    UnknownVariant { what: &'static str, name: String },
    #[error("expected {expected} frames, got {got}")]
    FrameCount { expected: usize, got: usize },
    #[error("topic frame `{got}` does not match the body's topic `{expected}`")]
    TopicMismatch { got: String, expected: &'static str },
}

impl DecodeError {
    /// True when the sender speaks a different version of the bus (not corrupted bytes).
    pub fn is_incompatible(&self) -> bool {
        matches!(
            self,
            DecodeError::NewerSchema { .. }
                | DecodeError::OlderSchema { .. }
                | DecodeError::UnknownVariant { .. }
        )
    }
}

// MessagePack markers (msgpack spec, "Formats" section).
const NIL: u8 = 0xc0;
const NEVER_USED: u8 = 0xc1;
const FALSE: u8 = 0xc2;
const TRUE: u8 = 0xc3;
const BIN8: u8 = 0xc4;
const BIN16: u8 = 0xc5;
const BIN32: u8 = 0xc6;
const EXT8: u8 = 0xc7;
const EXT16: u8 = 0xc8;
const EXT32: u8 = 0xc9;
const FLOAT32: u8 = 0xca;
const FLOAT64: u8 = 0xcb;
const UINT8: u8 = 0xcc;
const UINT16: u8 = 0xcd;
const UINT32: u8 = 0xce;
const UINT64: u8 = 0xcf;
const INT8: u8 = 0xd0;
const INT16: u8 = 0xd1;
const INT32: u8 = 0xd2;
const INT64: u8 = 0xd3;
const FIXEXT1: u8 = 0xd4;
const FIXEXT2: u8 = 0xd5;
const FIXEXT4: u8 = 0xd6;
const FIXEXT8: u8 = 0xd7;
const FIXEXT16: u8 = 0xd8;
const STR8: u8 = 0xd9;
const STR16: u8 = 0xda;
const STR32: u8 = 0xdb;
const ARRAY16: u8 = 0xdc;
const ARRAY32: u8 = 0xdd;
const MAP16: u8 = 0xde;
const MAP32: u8 = 0xdf;

/// Bounds-checked cursor over a frame.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                offset: self.buf.len(),
            })?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated {
            offset: self.buf.len(),
        })?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn skip(&mut self, n: u64) -> Result<(), DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated {
            offset: self.buf.len(),
        })?;
        self.take(n).map(|_| ())
    }
}

/// Length in bytes of the first MessagePack value in `buf`, checking its structure.
pub fn scan(buf: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    // Values still to read at each open nesting level; the bottom entry is the root value.
    let mut stack: Vec<u64> = vec![1];
    while let Some(top) = stack.last_mut() {
        if *top == 0 {
            stack.pop();
            continue;
        }
        *top -= 1;
        let at = r.pos;
        let m = r.u8()?;
        let children: u64 = match m {
            0x00..=0x7f | 0xe0..=0xff | NIL | FALSE | TRUE => 0,
            0x80..=0x8f => 2 * u64::from(m & 0x0f),
            0x90..=0x9f => u64::from(m & 0x0f),
            0xa0..=0xbf => {
                r.skip(u64::from(m & 0x1f))?;
                0
            }
            NEVER_USED => {
                return Err(DecodeError::Garbage {
                    offset: at,
                    reason: "reserved marker 0xc1",
                })
            }
            BIN8 | STR8 => {
                let n = r.be(1)?;
                r.skip(n)?;
                0
            }
            BIN16 | STR16 => {
                let n = r.be(2)?;
                r.skip(n)?;
                0
            }
            BIN32 | STR32 => {
                let n = r.be(4)?;
                r.skip(n)?;
                0
            }
            EXT8 => {
                let n = r.be(1)?;
                r.skip(n + 1)?;
                0
            }
            EXT16 => {
                let n = r.be(2)?;
                r.skip(n + 1)?;
                0
            }
            EXT32 => {
                let n = r.be(4)?;
                r.skip(n + 1)?;
                0
            }
            FLOAT32 => {
                r.skip(4)?;
                0
            }
            FLOAT64 => {
                r.skip(8)?;
                0
            }
            UINT8 | INT8 => {
                r.skip(1)?;
                0
            }
            UINT16 | INT16 => {
                r.skip(2)?;
                0
            }
            UINT32 | INT32 => {
                r.skip(4)?;
                0
            }
            UINT64 | INT64 => {
                r.skip(8)?;
                0
            }
            FIXEXT1 => {
                r.skip(2)?;
                0
            }
            FIXEXT2 => {
                r.skip(3)?;
                0
            }
            FIXEXT4 => {
                r.skip(5)?;
                0
            }
            FIXEXT8 => {
                r.skip(9)?;
                0
            }
            FIXEXT16 => {
                r.skip(17)?;
                0
            }
            ARRAY16 => r.be(2)?,
            ARRAY32 => r.be(4)?,
            MAP16 => 2 * r.be(2)?,
            MAP32 => 2 * r.be(4)?,
        };
        if children > 0 {
            if stack.len() > MAX_DEPTH {
                return Err(DecodeError::Garbage {
                    offset: at,
                    reason: "nesting too deep",
                });
            }
            stack.push(children);
        }
    }
    Ok(r.pos)
}

/// Scan `bytes` as exactly one MessagePack value.
fn whole_value(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let len = scan(bytes)?;
    if len < bytes.len() {
        return Err(DecodeError::TrailingData {
            extra: bytes.len() - len,
        });
    }
    Ok(bytes)
}

fn from_msgpack<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH + 8);
    T::deserialize(&mut de).map_err(|e| DecodeError::Malformed {
        what,
        detail: e.to_string(),
    })
}

#[derive(Deserialize)]
struct SchemaProbe {
    schema: u16,
}

#[derive(Deserialize)]
struct TagProbe {
    #[serde(rename = "type")]
    tag: String,
}

#[derive(Deserialize)]
struct EnvelopeProbe {
    src: String,
    body: TagProbe,
}

fn check_tag(tag: &str, what: &'static str, known: &[&str]) -> Result<(), DecodeError> {
    if known.contains(&tag) {
        Ok(())
    } else {
        Err(DecodeError::UnknownVariant {
            what,
            name: tag.to_owned(),
        })
    }
}

/// Encode with named fields (`rmp_serde::to_vec_named`).
fn to_msgpack<T: Serialize>(v: &T) -> Vec<u8> {
    // Invariant: our message types are plain owned data whose maps and sequences all report
    // their length, and the writer is a Vec, so rmp-serde cannot fail here.
    rmp_serde::to_vec_named(v).expect("msgpack encoding of plain data into a Vec is infallible")
}

/// Encode an envelope (frame 2 of a bus message).
pub fn encode(env: &Envelope) -> Vec<u8> {
    to_msgpack(env)
}

/// Decode an envelope. Never panics; see [`DecodeError`].
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let bytes = whole_value(bytes)?;
    let SchemaProbe { schema } = from_msgpack(bytes, "envelope")?;
    if schema > SCHEMA_VERSION {
        return Err(DecodeError::NewerSchema {
            got: schema,
            supported: SCHEMA_VERSION,
        });
    }
    if schema < SCHEMA_VERSION {
        return Err(DecodeError::OlderSchema {
            got: schema,
            supported: SCHEMA_VERSION,
        });
    }
    let probe: EnvelopeProbe = from_msgpack(bytes, "envelope")?;
    if DaemonKind::from_name(&probe.src).is_none() {
        return Err(DecodeError::UnknownVariant {
            what: "daemon",
            name: probe.src,
        });
    }
    check_tag(&probe.body.tag, "body", Body::VARIANTS)?;
    from_msgpack(bytes, "envelope")
}

/// Decode a two-frame bus message `[topic, envelope]` and check the topic frame.
pub fn decode_frames(topic: &[u8], payload: &[u8]) -> Result<Envelope, DecodeError> {
    let env = decode(payload)?;
    let expected = env.body.topic();
    if topic != expected.as_bytes() {
        return Err(DecodeError::TopicMismatch {
            got: String::from_utf8_lossy(topic).into_owned(),
            expected,
        });
    }
    Ok(env)
}

/// Encode a control request.
pub fn encode_request(req: &CtlRequest) -> Vec<u8> {
    to_msgpack(req)
}

/// Decode a control request. Never panics.
pub fn decode_request(bytes: &[u8]) -> Result<CtlRequest, DecodeError> {
    let bytes = whole_value(bytes)?;
    let probe: TagProbe = from_msgpack(bytes, "control request")?;
    check_tag(&probe.tag, "control request", CtlRequest::VARIANTS)?;
    from_msgpack(bytes, "control request")
}

/// Encode a control reply.
pub fn encode_reply(reply: &CtlReply) -> Vec<u8> {
    to_msgpack(reply)
}

/// Decode a control reply. Never panics.
pub fn decode_reply(bytes: &[u8]) -> Result<CtlReply, DecodeError> {
    let bytes = whole_value(bytes)?;
    let probe: TagProbe = from_msgpack(bytes, "control reply")?;
    check_tag(&probe.tag, "control reply", CtlReply::VARIANTS)?;
    from_msgpack(bytes, "control reply")
}

/// Encode any body on its own (used by the store digest and snapshots).
pub fn encode_body(body: &Body) -> Vec<u8> {
    to_msgpack(body)
}
