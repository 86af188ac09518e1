//! Control protocol: requests to a daemon's ROUTER socket and its replies.
//!
//! Both enums are adjacently tagged like [`crate::Body`]: `{"type": "Status"}` or
//! `{"type": "View", "data": {"name": ..., "args": [...]}}`.

use serde::{Deserialize, Serialize};

use crate::schema::DaemonKind;
use crate::store::Snapshot;

/// A request on `ipc://<run>/ctl/<daemon>.sock`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum CtlRequest {
    /// Reply [`CtlReply::Snapshot`] with the daemon's owned state.
    Snapshot,
    /// Reply [`CtlReply::Status`].
    Status,
    /// Reply [`CtlReply::Replicas`]: what this daemon follows and how far it is.
    Replicas,
    /// Daemon-specific view, answered with [`CtlReply::View`].
    View {
        name: String,
        args: Vec<String>,
    },
    /// Daemon-specific action.
    Command {
        name: String,
        args: Vec<String>,
    },
    SetLogLevel {
        level: String,
    },
    /// Start streaming [`CtlReply::DebugLine`]s at `level` to this peer.
    Attach {
        level: String,
    },
    /// Keep an attachment alive (sent by the attached client periodically).
    AttachKeepalive,
    Detach,
    ReloadConfig,
}

impl CtlRequest {
    /// Every variant name as written in the `type` field.
    pub const VARIANTS: &'static [&'static str] = &[
        "Snapshot",
        "Status",
        "Replicas",
        "View",
        "Command",
        "SetLogLevel",
        "Attach",
        "AttachKeepalive",
        "Detach",
        "ReloadConfig",
    ];

    /// The `type` tag of this request.
    pub fn variant(&self) -> &'static str {
        match self {
            CtlRequest::Snapshot => "Snapshot",
            CtlRequest::Status => "Status",
            CtlRequest::Replicas => "Replicas",
            CtlRequest::View { .. } => "View",
            CtlRequest::Command { .. } => "Command",
            CtlRequest::SetLogLevel { .. } => "SetLogLevel",
            CtlRequest::Attach { .. } => "Attach",
            CtlRequest::AttachKeepalive => "AttachKeepalive",
            CtlRequest::Detach => "Detach",
            CtlRequest::ReloadConfig => "ReloadConfig",
        }
    }
}

/// A daemon's answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum CtlReply {
    Ok,
    Error {
        message: String,
    },
    Snapshot(Snapshot),
    Status(DaemonStatus),
    Replicas(Vec<ReplicaInfo>),
    View(serde_json::Value),
    DebugLine {
        ts_ns: u64,
        level: String,
        line: String,
    },
    Reloaded {
        warnings: Vec<String>,
    },
}

impl CtlReply {
    /// Every variant name as written in the `type` field.
    pub const VARIANTS: &'static [&'static str] = &[
        "Ok",
        "Error",
        "Snapshot",
        "Status",
        "Replicas",
        "View",
        "DebugLine",
        "Reloaded",
    ];

    /// The `type` tag of this reply.
    pub fn variant(&self) -> &'static str {
        match self {
            CtlReply::Ok => "Ok",
            CtlReply::Error { .. } => "Error",
            CtlReply::Snapshot(_) => "Snapshot",
            CtlReply::Status(_) => "Status",
            CtlReply::Replicas(_) => "Replicas",
            CtlReply::View(_) => "View",
            CtlReply::DebugLine { .. } => "DebugLine",
            CtlReply::Reloaded { .. } => "Reloaded",
        }
    }
}

/// Answer to [`CtlRequest::Status`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DaemonStatus {
    pub kind: DaemonKind,
    pub pid: u32,
    #[serde(with = "crate::boot::serde_u128")]
    pub boot: u128,
    pub uptime_ms: u64,
    /// Last bus sequence number published.
    pub seq: u64,
    pub log_level: String,
    pub version: String,
    pub config_path: String,
}

/// One followed publisher, as reported by [`CtlRequest::Replicas`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub src: DaemonKind,
    #[serde(with = "crate::boot::serde_opt_u128")]
    pub boot: Option<u128>,
    pub seq: u64,
    pub synced: bool,
    pub items: u64,
    pub digest: u64,
    /// Sequence gaps seen.
    pub gaps: u64,
    /// Snapshots applied.
    pub snapshots: u64,
    /// Nothing heard for more than three heartbeat intervals.
    pub stale: bool,
}
