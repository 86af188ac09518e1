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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The envelope of `samples::envelope`, up to the body:
    /// 86 (map, 6 entries)
    ///   a6 "schema" 01
    ///   a3 "src" a6 "ikemgr"
    ///   a4 "boot" c4 10 <16 bytes big-endian>
    ///   a3 "seq" 2a
    ///   a5 "ts_ns" cf <u64 big-endian>
    ///   a4 "body" ...
    const ENVELOPE_HEAD: &str = concat!(
        "86a6736368656d6101a3737263a6696b656d6772a4626f6f74c4100123456789abcdeffedcba9876543210a37365712a",
        "a574735f6e73cf17979cfe3d85cd15a4626f6479",
    );

    /// Body bytes after [`ENVELOPE_HEAD`], one per variant. A change here is a wire change.
    const BODY_GOLDEN: &[(&str, &str)] = &[
        (
            "Heartbeat",
            "82a474797065a9486561727462656174a46461746181a9757074696d655f6d73cd05dc",
        ),
        (
            "Tunnel",
            concat!(
                "82a474797065a654756e6e656ca46461746189a46e616d65a676706e315f31a6706861736531a476706e31a46b696e64",
                "af6469616c75705f696e7374616e6365a86c6f63616c5f6777a93139322e302e322e31a972656d6f74655f6777c0a969",
                "6e74657266616365a5706f727431a57374617465a27570a670686173653291a776706e312d7032a364706483a46d6f64",
                "65a76f6e2d69646c65ab72657472795f636f756e7403b172657472795f696e74657276616c5f6d73cd4e20",
            ),
        ),
        (
            "TunnelRemoved",
            "82a474797065ad54756e6e656c52656d6f766564a46461746181a46e616d65a676706e315f31",
        ),
        (
            "Dpd",
            concat!(
                "82a474797065a3447064a46461746188a674756e6e656ca476706e31a46d6f6465a96f6e2d64656d616e64a26f6ec3a7",
                "69646c655f6d73cd0fa0a5726574727902a5636f756e7403a57365716e6fce12345678a57374617465a770726f62696e",
                "67",
            ),
        ),
        (
            "DpdRemoved",
            "82a474797065aa44706452656d6f766564a46461746181a674756e6e656ca476706e31",
        ),
        (
            "EspTunnel",
            concat!(
                "82a474797065a945737054756e6e656ca46461746188a674756e6e656ca476706e31a6646576696365a474756e30a573",
                "615f696ecec0ffee01a673615f6f7574cedeadbeefa772785f706b74730aa774785f706b7473cd012ca872785f627974",
                "6573ce000f4240a874785f6279746573cfffffffffffffffff",
            ),
        ),
        (
            "EspTunnelRemoved",
            "82a474797065b045737054756e6e656c52656d6f766564a46461746181a674756e6e656ca476706e31",
        ),
        (
            "HaMember",
            concat!(
                "82a474797065a848614d656d626572a46461746185a96d656d6265725f696401a867726f75705f696407a46d6f6465a3",
                "612d70a4726f6c65a77072696d617279a5706565727392a831302e302e302e32a831302e302e302e33",
            ),
        ),
        (
            "HaMemberRemoved",
            "82a474797065af48614d656d62657252656d6f766564a46461746181a96d656d6265725f696402",
        ),
        (
            "TunnelRole",
            concat!(
                "82a474797065aa54756e6e656c526f6c65a46461746182a674756e6e656ca476706e31a4726f6c65ac73796e632d7072",
                "696d617279",
            ),
        ),
        (
            "TunnelRoleRemoved",
            "82a474797065b154756e6e656c526f6c6552656d6f766564a46461746181a674756e6e656ca476706e31",
        ),
        (
            "ChildSa",
            concat!(
                "82a474797065a74368696c645361a464617461de0012a674756e6e656ca676706e315f31a6706861736531a476706e31",
                "a6706861736532a476706e31a67370695f696ecea575b631a77370695f6f7574ce10aa45b0a97472616e73666f726dab",
                "6165733132382d73686131a365736ec2a76b6579735f696ec4245d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d",
                "5d5d5d5d5d5d5d5d5d5d5d5d5d5da86b6579735f6f7574c4246565656565656565656565656565656565656565656565",
                "65656565656565656565656565a56c6f63616cae3139322e3136382e3230322e3331a672656d6f7465ab3139322e3136",
                "382e312e32a5656e63617081a375647082aa6c6f63616c5f706f7274cd1194ab72656d6f74655f706f7274cd1194a86c",
                "6f63616c5f747391a9302e302e302e302f30a972656d6f74655f747391ac31302e31302e312e302f3234ad7265706c61",
                "795f77696e646f77cd0800a86c69666574696d6584a9736f66745f73656373cd28f0a9686172645f73656373cd2a30aa",
                "736f66745f627974657300aa686172645f627974657300ab696e697469616c5f73657101a86f7574626f756e64c3",
            ),
        ),
        (
            "ChildSaRemoved",
            concat!(
                "82a474797065ae4368696c64536152656d6f766564a46461746182a674756e6e656ca676706e315f31a67370695f696e",
                "cea575b631",
            ),
        ),
        (
            "EspActivity",
            concat!(
                "82a474797065ab4573704163746976697479a46461746181a774756e6e656c739187a674756e6e656ca676706e315f31",
                "aa6c6173745f72785f6e73cf17979cfe3d85cd15aa6c6173745f74785f6e73cf17979cfe3d85cd16a772785f706b7473",
                "03a774785f706b747304a872785f6279746573cd012ca874785f6279746573cd0190",
            ),
        ),
        (
            "EspSeq",
            concat!(
                "82a474797065a6457370536571a46461746181a37361739183a674756e6e656ca676706e315f31a77370695f6f7574ce",
                "10aa45b0a67365715f6877ce00989681",
            ),
        ),
        (
            "EspExpire",
            concat!(
                "82a474797065a9457370457870697265a46461746184a674756e6e656ca676706e315f31a67370695f696ecea575b631",
                "a468617264c2a6726561736f6ea474696d65",
            ),
        ),
        (
            "ProbeRequest",
            concat!(
                "82a474797065ac50726f626552657175657374a46461746183a674756e6e656ca676706e315f32a5726f756e6407a761",
                "7474656d707402",
            ),
        ),
        (
            "ProbeResult",
            concat!(
                "82a474797065ab50726f6265526573756c74a46461746184a674756e6e656ca676706e315f32a5726f756e6407a66d73",
                "675f696404a76f7574636f6d65a473656e74",
            ),
        ),
        (
            "IkeActivity",
            concat!(
                "82a474797065ab496b654163746976697479a46461746181a774756e6e656c739182a674756e6e656ca676706e315f32",
                "aa6c6173745f72785f6e73cf17979cfe3d85cd15",
            ),
        ),
        ("IkeSa", concat!(
                "82a474797065a5496b655361a46461746188a674756e6e656ca676706e315f31a6706861736531a476706e31a5737069",
                "5f69cf87458c81a3be17f9a57370695f72cfc8db7d3f2c70e638a96e6578745f73656e6404a96e6578745f7265637602",
                "a672656d6f7465af3139322e3136382e342e323a353030a46b657973c408abababababababab",
            )),
        (
            "IkeSaRemoved",
            "82a474797065ac496b65536152656d6f766564a46461746181a674756e6e656ca676706e315f31",
        ),
        ("SeqLeaseRequest", concat!(
                "82a474797065af5365714c6561736552657175657374a46461746181a37361739183a674756e6e656ca676706e315f31",
                "a77370695f6f7574ce10aa45b0a67365715f6877ce00100000",
            )),
        ("SeqLeaseGranted", concat!(
                "82a474797065af5365714c656173654772616e746564a46461746181a37361739183a674756e6e656ca676706e315f31",
                "a77370695f6f7574ce10aa45b0a67365715f6877ce00100000",
            )),
        ("Takeover", concat!(
                "82a474797065a854616b656f766572a46461746182a3696b6588a674756e6e656ca676706e315f31a6706861736531a4",
                "76706e31a57370695f69cf87458c81a3be17f9a57370695f72cfc8db7d3f2c70e638a96e6578745f73656e6404a96e65",
                "78745f7265637602a672656d6f7465af3139322e3136382e342e323a353030a46b657973c408ababababababababaa",
                "73746172745f736571739183a674756e6e656ca676706e315f31a77370695f6f7574ce10aa45b0a67365715f6877ce00",
                "100000",
            )),
        ("Acquire", concat!(
                "82a474797065a741637175697265a46461746185a6706861736531a476706e31a6706861736532a676706e312d62a373",
                "7263a931302e39392e322e32a3647374a931302e39392e312e32a764726f7070656403",
            )),
        ("UnknownSaTraffic", concat!(
                "82a474797065b0556e6b6e6f776e536154726166666963a46461746182a86573705f7370697391cea575b631a8696b65",
                "5f737069739182a57370695f69cf87458c81a3be17f9a57370695f72cfc8db7d3f2c70e638",
            )),
        (
            "TunnelMonitor",
            concat!(
                "82a474797065ad54756e6e656c4d6f6e69746f72a46461746189a674756e6e656ca476706e31a6706861736531a47670",
                "6e31ab64657374696e6174696f6ea831302e322e302e31a6736f75726365a831302e312e302e31ab696e74657276616c",
                "5f6d73cd0bb8a97468726573686f6c6405a66d697373657305a57374617465a4646f776ea6616374696f6ea96661696c",
                "2d6f766572",
            ),
        ),
        (
            "TunnelMonitorRemoved",
            "82a474797065b454756e6e656c4d6f6e69746f7252656d6f766564a46461746181a674756e6e656ca476706e31",
        ),
        ("SeqSkip", concat!(
                "82a474797065a7536571536b6970a46461746181a37361739183a674756e6e656ca676706e315f31a77370695f6f7574",
                "ce10aa45b0a67365715f6877ce00a89681",
            )),
        (
            "SeqHold",
            "82a474797065a7536571486f6c64a46461746181a774756e6e656c7391a676706e315f31",
        ),
    ];

    const REQUEST_GOLDEN: &[(&str, &str)] = &[
        (
            "Snapshot",
            "81a474797065a8536e617073686f74",
        ),
        (
            "Status",
            "81a474797065a6537461747573",
        ),
        (
            "Replicas",
            "81a474797065a85265706c69636173",
        ),
        (
            "View",
            concat!(
                "82a474797065a456696577a46461746182a46e616d65ab74756e6e656c2d6c697374a46172677392a46e616d65a47670",
                "6e31",
            ),
        ),
        (
            "Command",
            "82a474797065a7436f6d6d616e64a46461746182a46e616d65a5666c757368a46172677390",
        ),
        (
            "SetLogLevel",
            "82a474797065ab5365744c6f674c6576656ca46461746181a56c6576656ca56465627567",
        ),
        (
            "Attach",
            "82a474797065a6417474616368a46461746181a56c6576656ca22d31",
        ),
        (
            "AttachKeepalive",
            "81a474797065af4174746163684b656570616c697665",
        ),
        (
            "Detach",
            "81a474797065a6446574616368",
        ),
        (
            "ReloadConfig",
            "81a474797065ac52656c6f6164436f6e666967",
        ),
    ];

    const REPLY_GOLDEN: &[(&str, &str)] = &[
        (
            "Ok",
            "81a474797065a24f6b",
        ),
        (
            "Error",
            "82a474797065a54572726f72a46461746181a76d657373616765ac6e6f20737563682076696577",
        ),
        (
            "Snapshot",
            concat!(
                "82a474797065a8536e617073686f74a46461746184a3737263a66470646d6f6ea4626f6f74c4100123456789abcdeffe",
                "dcba9876543210a373657109a56974656d739182a474797065aa44706452656d6f766564a46461746181a674756e6e65",
                "6ca178",
            ),
        ),
        (
            "Status",
            concat!(
                "82a474797065a6537461747573a46461746188a46b696e64a7686173796e6364a3706964cd1092a4626f6f74c4100123",
                "456789abcdeffedcba9876543210a9757074696d655f6d73cdee48a37365714da96c6f675f6c6576656ca4696e666fa7",
                "76657273696f6ea5302e312e30ab636f6e6669675f70617468b52f6574632f686176656e2f686176656e2e636f6e66",
            ),
        ),
        (
            "Replicas",
            concat!(
                "82a474797065a85265706c69636173a4646174619189a3737263a6696b656d6772a4626f6f74c4100123456789abcdef",
                "fedcba9876543210a373657105a673796e636564c3a56974656d7302a6646967657374cf0102030405060708a4676170",
                "7301a9736e617073686f747302a57374616c65c2",
            ),
        ),
        (
            "View",
            "82a474797065a456696577a46461746181a774756e6e656c7395ffa476706e31c3c0cb4004000000000000",
        ),
        (
            "DebugLine",
            concat!(
                "82a474797065a944656275674c696e65a46461746183a574735f6e73cf17979cfe3d85cd15a56c6576656ca564656275",
                "67a46c696e65b8696b6520303a76706e313a2073656e7420494b45206d7367",
            ),
        ),
        (
            "Reloaded",
            concat!(
                "82a474797065a852656c6f61646564a46461746181a87761726e696e677391b36c696e6520333a20756e6b6e6f776e20",
                "6b6579",
            ),
        ),
    ];

    #[test]
    fn every_body_variant_has_a_golden_and_a_sample() {
        let samples = bodies();
        assert_eq!(samples.len(), Body::VARIANTS.len());
        assert_eq!(BODY_GOLDEN.len(), Body::VARIANTS.len());
        for ((b, v), (g, _)) in samples.iter().zip(Body::VARIANTS).zip(BODY_GOLDEN) {
            assert_eq!(b.variant(), *v);
            assert_eq!(g, v);
        }
        assert_eq!(requests().len(), CtlRequest::VARIANTS.len());
        assert_eq!(REQUEST_GOLDEN.len(), CtlRequest::VARIANTS.len());
        assert_eq!(replies().len(), CtlReply::VARIANTS.len());
        assert_eq!(REPLY_GOLDEN.len(), CtlReply::VARIANTS.len());
    }

    #[test]
    fn envelope_golden_bytes() {
        for (body, (name, golden)) in bodies().into_iter().zip(BODY_GOLDEN) {
            let bytes = encode(&envelope(body.clone()));
            assert_eq!(
                hex(&bytes),
                format!("{ENVELOPE_HEAD}{golden}"),
                "wire bytes of {name} changed"
            );
            assert_eq!(decode(&bytes).unwrap(), envelope(body));
        }
    }

    /// `ha.takeover`'s `held_only` (added later) is on the wire only when set: a takeover
    /// without it keeps the golden bytes above, and one with it comes back as sent.
    #[test]
    fn a_held_only_takeover_round_trips() {
        let Some(Body::Takeover(mut t)) = bodies()
            .into_iter()
            .find(|b| matches!(b, Body::Takeover(_)))
        else {
            panic!("no takeover sample");
        };
        assert!(!t.held_only);
        t.held_only = true;
        let bytes = encode(&envelope(Body::Takeover(t.clone())));
        assert_eq!(decode(&bytes).unwrap(), envelope(Body::Takeover(t)));
    }

    #[test]
    fn control_golden_bytes() {
        for (req, (name, golden)) in requests().into_iter().zip(REQUEST_GOLDEN) {
            assert_eq!(
                hex(&encode_request(&req)),
                *golden,
                "request {name} changed"
            );
            assert_eq!(decode_request(&unhex(golden)).unwrap(), req);
        }
        for (rep, (name, golden)) in replies().into_iter().zip(REPLY_GOLDEN) {
            assert_eq!(hex(&encode_reply(&rep)), *golden, "reply {name} changed");
            assert_eq!(decode_reply(&unhex(golden)).unwrap(), rep);
        }
    }

    /// `dead_after_ms` and `schedule` of `dpd.state` were added later: set, they
    /// round-trip; unset, the record encodes as before (the golden bytes above).
    #[test]
    fn dpd_budget_fields_round_trip_and_stay_optional() {
        let mut with = bodies()
            .into_iter()
            .find_map(|b| match b {
                Body::Dpd(d) => Some(d),
                _ => None,
            })
            .expect("a Dpd sample");
        with.dead_after_ms = 324_000;
        with.schedule = "exponential initial=1000ms max=64000ms".into();
        let env = envelope(Body::Dpd(with.clone()));
        let bytes = encode(&env);
        assert_eq!(decode(&bytes).unwrap(), env);
        assert!(hex(&bytes).contains(&hex(b"dead_after_ms")));
    }

    /// `packets` of `esp.expire` was added later: set, it round-trips; unset (0), the event
    /// encodes as before (the golden bytes above).
    #[test]
    fn expiry_packets_field_round_trips_and_stays_optional() {
        let mut with = bodies()
            .into_iter()
            .find_map(|b| match b {
                Body::EspExpire(x) => Some(x),
                _ => None,
            })
            .expect("an EspExpire sample");
        with.packets = 17;
        let env = envelope(Body::EspExpire(with.clone()));
        let bytes = encode(&env);
        assert_eq!(decode(&bytes).unwrap(), env);
        assert!(hex(&bytes).contains(&hex(b"packets")));
    }

    /// `usage` of `esp.seq` and `lifetimes` of `ha.takeover` were added later: set, they
    /// round-trip; empty, the events encode as before (the golden bytes above).
    #[test]
    fn usage_and_lifetimes_left_round_trip_and_stay_optional() {
        use crate::schema::{LifetimeLeft, SaLifetime, SaUsage};
        for body in bodies() {
            let with = match body {
                Body::EspSeq { sas, .. } => Body::EspSeq {
                    sas,
                    usage: vec![SaUsage {
                        tunnel: "vpn1_1".into(),
                        spi_in: 7,
                        age_ms: 61_000,
                        bytes: 4_000_000,
                    }],
                },
                Body::Takeover(mut t) => {
                    t.lifetimes = vec![LifetimeLeft {
                        spi_out: 0x10aa_45b0,
                        left: SaLifetime {
                            soft_secs: 10,
                            hard_secs: 70,
                            soft_bytes: 1,
                            hard_bytes: 655_360,
                        },
                    }];
                    Body::Takeover(t)
                }
                _ => continue,
            };
            let env = envelope(with);
            let bytes = encode(&env);
            assert_eq!(decode(&bytes).unwrap(), env);
            let field: &[u8] = if matches!(env.body, Body::EspSeq { .. }) {
                b"usage"
            } else {
                b"lifetimes"
            };
            assert!(hex(&bytes).contains(&hex(field)));
        }
    }

    #[test]
    fn round_trip_with_extreme_values() {
        for body in bodies() {
            for (boot, seq, ts) in [(0, 0, 0), (u128::MAX, u64::MAX, u64::MAX), (1, 1, 1)] {
                let mut env = envelope(body.clone());
                env.boot = boot;
                env.seq = seq;
                env.ts_ns = ts;
                for src in DaemonKind::DAEMONS {
                    env.src = src;
                    assert_eq!(decode(&encode(&env)).unwrap(), env);
                }
            }
        }
    }

    #[test]
    fn topic_frame_is_checked() {
        let env = envelope(Body::TunnelRemoved { name: "a".into() });
        let bytes = encode(&env);
        assert_eq!(decode_frames(b"tunnel.removed", &bytes).unwrap(), env);
        assert_eq!(
            decode_frames(b"tunnel.state", &bytes),
            Err(DecodeError::TopicMismatch {
                got: "tunnel.state".into(),
                expected: "tunnel.removed"
            })
        );
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        for body in bodies() {
            let bytes = encode(&envelope(body));
            for cut in 0..bytes.len() {
                match decode(&bytes[..cut]) {
                    Err(DecodeError::Truncated { .. }) => {}
                    other => panic!("cut at {cut}: {other:?}"),
                }
            }
        }
        for rep in replies() {
            let bytes = encode_reply(&rep);
            for cut in 0..bytes.len() {
                assert!(matches!(
                    decode_reply(&bytes[..cut]),
                    Err(DecodeError::Truncated { .. })
                ));
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&envelope(Body::Heartbeat { uptime_ms: 1 }));
        bytes.push(0xc0);
        assert_eq!(decode(&bytes), Err(DecodeError::TrailingData { extra: 1 }));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(matches!(
            decode(&[0xc1]),
            Err(DecodeError::Garbage { offset: 0, .. })
        ));
        // A string where the envelope map should be.
        assert!(matches!(
            decode(b"\xa3abc"),
            Err(DecodeError::Malformed { .. })
        ));
        // Nesting deeper than MAX_DEPTH.
        let deep = vec![0x91u8; MAX_DEPTH + 2];
        assert!(matches!(
            decode(&deep),
            Err(DecodeError::Garbage { .. }) | Err(DecodeError::Truncated { .. })
        ));
        let mut deep = vec![0x91u8; MAX_DEPTH + 2];
        deep.push(0xc0);
        assert!(matches!(
            decode(&deep),
            Err(DecodeError::Garbage {
                reason: "nesting too deep",
                ..
            })
        ));
        // A map announcing 4 billion entries in a few bytes.
        assert!(matches!(
            decode(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]),
            Err(DecodeError::Truncated { .. })
        ));
        // A bin announcing 4 GiB.
        assert!(matches!(
            decode(&[0xc6, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[]),
            Err(DecodeError::Truncated { offset: 0 })
        ));
        // Invalid UTF-8 in a string field.
        let mut bytes = encode(&envelope(Body::TunnelRemoved { name: "abc".into() }));
        let n = bytes.len();
        bytes[n - 1] = 0xff;
        assert!(matches!(decode(&bytes), Err(DecodeError::Malformed { .. })));
    }

    /// Re-encode a sample after editing it as a generic MessagePack value.
    fn edited(env: &Envelope, edit: impl FnOnce(&mut Vec<(rmpv::Value, rmpv::Value)>)) -> Vec<u8> {
        let mut v: rmpv::Value = rmpv::decode::read_value(&mut &encode(env)[..]).unwrap();
        if let rmpv::Value::Map(m) = &mut v {
            edit(m);
        }
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    fn set(m: &mut [(rmpv::Value, rmpv::Value)], key: &str, val: rmpv::Value) {
        for (k, v) in m.iter_mut() {
            if k.as_str() == Some(key) {
                *v = val;
                return;
            }
        }
        panic!("no key {key}");
    }

    #[test]
    fn newer_and_older_schema_are_refused() {
        let env = envelope(Body::Heartbeat { uptime_ms: 1 });
        let newer = edited(&env, |m| set(m, "schema", rmpv::Value::from(2)));
        assert_eq!(
            decode(&newer),
            Err(DecodeError::NewerSchema {
                got: 2,
                supported: 1
            })
        );
        // A newer schema is reported as such even if the rest changed shape.
        let newer = edited(&env, |m| {
            set(m, "schema", rmpv::Value::from(7));
            set(m, "body", rmpv::Value::from("something else"));
            set(m, "src", rmpv::Value::from(3));
        });
        assert!(matches!(
            decode(&newer),
            Err(DecodeError::NewerSchema { got: 7, .. })
        ));
        let older = edited(&env, |m| set(m, "schema", rmpv::Value::from(0)));
        assert!(matches!(
            decode(&older),
            Err(DecodeError::OlderSchema { got: 0, .. })
        ));
        assert!(decode(&older).unwrap_err().is_incompatible());
    }

    #[test]
    fn unknown_variants_are_named() {
        let env = envelope(Body::Heartbeat { uptime_ms: 1 });
        let unknown_body = edited(&env, |m| {
            let mut body = vec![
                (rmpv::Value::from("type"), rmpv::Value::from("SaChildAdd")),
                (rmpv::Value::from("data"), rmpv::Value::Map(vec![])),
            ];
            body.truncate(2);
            set(m, "body", rmpv::Value::Map(body));
        });
        assert_eq!(
            decode(&unknown_body),
            Err(DecodeError::UnknownVariant {
                what: "body",
                name: "SaChildAdd".into()
            })
        );
        let unknown_src = edited(&env, |m| set(m, "src", rmpv::Value::from("routed")));
        assert_eq!(
            decode(&unknown_src),
            Err(DecodeError::UnknownVariant {
                what: "daemon",
                name: "routed".into()
            })
        );
        let req = unhex("81a474797065a5526562757a");
        assert!(matches!(
            decode_request(&req),
            Err(DecodeError::UnknownVariant {
                what: "control request",
                ..
            })
        ));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let env = envelope(Body::Heartbeat { uptime_ms: 1 });
        let more = edited(&env, |m| {
            m.push((rmpv::Value::from("trace_id"), rmpv::Value::from(99)));
        });
        assert_eq!(decode(&more).unwrap(), env);
    }

    #[test]
    fn boot_must_be_sixteen_bytes() {
        let env = envelope(Body::Heartbeat { uptime_ms: 1 });
        let short = edited(&env, |m| set(m, "boot", rmpv::Value::Binary(vec![1; 15])));
        assert!(matches!(decode(&short), Err(DecodeError::Malformed { .. })));
    }
}
