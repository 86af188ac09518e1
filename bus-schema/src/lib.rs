//! Haven bus: message types, topics, envelope, codec, ZeroMQ helpers and state recovery.
//!
//! Every Haven program links this crate. It defines what goes over the local bus (DESIGN §3),
//! how it is encoded, how it is carried over ZeroMQ (`zeromq` crate, `ipc://` endpoints), and
//! the Clone-pattern state recovery that lets a subscriber rebuild a publisher's state after a
//! gap or a restart. It does not run daemons, parse configuration, or decide what state a
//! daemon owns; the daemon shells do.
//!
//! # Layers
//! - [`schema`]: vocabulary ([`DaemonKind`], [`Envelope`], [`Body`], [`topic`], [`table`]);
//! - [`codec`]: MessagePack encode/decode with typed errors ([`DecodeError`]), no panics;
//! - [`store`]: the replicated key-value state ([`StateStore`]), its single writer ([`Owner`])
//!   and [`Snapshot`]s (sans-IO);
//! - [`follower`]: the subscriber-side recovery state machine ([`Follower`], sans-IO, driven by
//!   `now_ns`);
//! - [`ctl`]: the control protocol ([`CtlRequest`], [`CtlReply`]);
//! - [`transport`]: the only module with sockets and tokio ([`BusPublisher`],
//!   [`BusSubscriber`], [`CtlServer`], [`CtlClient`], [`ctl_call`]).
//!
//! # Endpoints
//! Each daemon binds PUB `ipc://<run>/bus/<daemon>.pub` and ROUTER
//! `ipc://<run>/ctl/<daemon>.sock`. Binding creates `bus/` and `ctl/` with mode 0700, removes a
//! stale socket file left by a killed process, and refuses ([`BusError::InUse`]) a socket file
//! another live process still listens on.
//!
//! # Envelope layout
//! A bus message has two frames: frame 1 is the topic (ASCII, e.g. `tunnel.state`), frame 2 is
//! the [`Envelope`] as a MessagePack map with named fields (`rmp_serde::to_vec_named`), in this
//! order: `schema` (uint), `src` (str, the daemon name), `boot` (bin, 16 bytes), `seq` (uint),
//! `ts_ns` (uint), `body`. Readers ignore map keys they do not know, so fields can be added
//! without a schema bump; a frame whose `schema` is greater than [`SCHEMA_VERSION`] is refused
//! with [`DecodeError::NewerSchema`] (and a smaller one with [`DecodeError::OlderSchema`]).
//!
//! # Tagging
//! [`Body`], [`CtlRequest`] and [`CtlReply`] are adjacently tagged: a map
//! `{"type": "<VariantName>", "data": <payload>}` where `data` is a map of the variant's named
//! fields (struct variants and struct newtypes) and is absent for unit variants. A Python reader
//! sees `msg["body"]["type"] == "Tunnel"`. Field-less enums inside payloads ([`DaemonKind`],
//! [`TunnelKind`], [`TunnelState`]) are plain strings in lowercase/snake_case. An unknown `type`
//! (or `src`) is [`DecodeError::UnknownVariant`].
//!
//! # u128 encoding
//! Boot ids are `u128`. In MessagePack they are `bin` of exactly 16 bytes, big-endian (Python:
//! `int.from_bytes(b, "big")`, or `b.hex()` for the display form). In JSON (human-readable
//! serializers, e.g. `--json` views) they are 32 lowercase hex digits. See [`boot`].
//!
//! # Topics
//! Constants in [`topic`], one per [`Body`] variant ([`Body::topic`]). They are dot-separated
//! so subscribers can filter by prefix; a table's removal topic extends its state topic where
//! the names allow (`esp.tunnel` / `esp.tunnel.removed`). Haven's own subscribers subscribe to
//! the empty prefix so that per-publisher `seq` gaps are real gaps. [`decode_frames`] checks that
//! the topic frame matches the body ([`DecodeError::TopicMismatch`]).
//!
//! # Recovery (the ZeroMQ Guide's Clone pattern, DESIGN §3.3)
//! The publishing daemon keeps its state in an [`Owner`]: [`Owner::stamp`] gives each body the
//! next `seq` (first is 1, heartbeats included) and applies it to the owner's store; the
//! control socket answers [`CtlRequest::Snapshot`] with [`Owner::snapshot`] (state as of
//! `seq`). Every publisher sends [`Body::Heartbeat`] once per second. A subscriber keeps one
//! [`Follower`] per publisher: it asks for a snapshot when it starts, when it sees a new `boot`
//! or a `seq` gap; meanwhile it buffers updates (bounded, oldest dropped and counted), applies
//! the snapshot, replays buffered updates newer than it, and asks again if the replay has a
//! hole or the request goes unanswered for a second. See [`follower`] for the exact rules.
//!
//! # High-water mark and slow subscribers
//! The `zeromq` crate 0.7 has no `ZMQ_SNDHWM`/`ZMQ_RCVHWM` option: its PUB socket queues up to
//! 100 000 messages per subscriber (and 100 000 in its fan-out queue) and silently drops beyond
//! that. To make the limit explicit and testable, [`BusPublisher`] puts its own bounded queue
//! ([`PublisherOptions::hwm`], default [`DEFAULT_HWM`]) in front of the socket: when it is full
//! (the publishing task produces faster than the socket task drains) the new message is
//! dropped and counted in [`PublisherStats::dropped_hwm`], as ZeroMQ does at the HWM. Drops
//! surface to subscribers as `seq` gaps and are repaired by snapshots. On the subscriber side
//! [`BusSubscriber`] queues up to [`SubscriberOptions::queue`] decoded messages and then stops
//! reading the socket (back-pressure to the publisher's queues, which drop).
//!
//! # Reconnects
//! The `zeromq` crate's SUB reconnects by itself after a disconnect (exponential backoff from
//! 100 ms up to 30 s) and its `connect` waits for a not-yet-bound ipc endpoint until the
//! connect timeout (30 s by default), blocking the caller. [`BusSubscriber`] does not rely on
//! either: it runs one task per publisher that connects with a bounded attempt
//! ([`SubscriberOptions::connect_timeout`]), retries with backoff capped at
//! [`SubscriberOptions::reconnect_max`], and throws the socket away and reconnects when the
//! peer disconnects or has sent nothing (not even a heartbeat) for
//! [`SubscriberOptions::silence_timeout`] (3 s).

pub mod boot;
mod chunked;
pub mod codec;
pub mod ctl;
pub mod follower;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod samples;
pub mod schema;
pub mod store;
pub mod test_rng;
pub mod transport;

pub use boot::{boot_hex, new_boot_id};
pub use codec::{
    decode, decode_frames, decode_reply, decode_request, encode, encode_body, encode_reply,
    encode_request, DecodeError,
};
pub use ctl::{CtlReply, CtlRequest, DaemonStatus, ReplicaInfo};
pub use follower::{
    FollowOutcome, Follower, FollowerConfig, FollowerStats, SnapshotOutcome, HEARTBEAT_INTERVAL_NS,
};
pub use schema::{
    table, topic, AcquireInfo, Body, DaemonKind, DpdSettings, DpdTunnelState, Envelope,
    EspTunnelInfo, HaMemberInfo, StateOp, TunnelInfo, TunnelKind, TunnelMonitorState, TunnelState,
    UnknownDaemon, SCHEMA_VERSION,
};
pub use store::{Owner, Snapshot, StateStore};
pub use transport::{
    ctl_call, ctl_endpoint, ctl_path, pub_endpoint, pub_path, request_snapshot, BusError,
    BusPublisher, BusSubscriber, CtlClient, CtlServer, PeerId, PublisherOptions, PublisherStats,
    SubscriberOptions, SubscriberStats, CTL_CONNECT_TIMEOUT, CTL_SEND_TIMEOUT, DEFAULT_HWM,
};
