//! Fixed sample messages shared by the unit tests (golden bytes, round trips, fuzz seeds).

use crate::ctl::{CtlReply, CtlRequest, DaemonStatus, ReplicaInfo};
use crate::schema::*;
use crate::store::Snapshot;

pub const BOOT: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
pub const TS: u64 = 1_700_000_000_123_456_789;

pub fn tunnel() -> TunnelInfo {
    TunnelInfo {
        name: "vpn1_1".into(),
        phase1: "vpn1".into(),
        kind: TunnelKind::DialupInstance,
        local_gw: Some("192.0.2.1".into()),
        remote_gw: None,
        interface: Some("port1".into()),
        state: TunnelState::Up,
        phase2: vec!["vpn1-p2".into()],
        dpd: DpdSettings {
            mode: "on-idle".into(),
            retry_count: 3,
            retry_interval_ms: 20_000,
        },
    }
}

/// One body per variant, in [`Body::VARIANTS`] order.
pub fn bodies() -> Vec<Body> {
    vec![
        Body::Heartbeat { uptime_ms: 1500 },
        Body::Tunnel(tunnel()),
        Body::TunnelRemoved {
            name: "vpn1_1".into(),
        },
        Body::Dpd(DpdTunnelState {
            tunnel: "vpn1".into(),
            mode: "on-demand".into(),
            on: true,
            idle_ms: 4000,
            retry: 2,
            count: 3,
            seqno: 0x1234_5678,
            state: "probing".into(),
            // Zero and empty are not encoded: the golden bytes predate these fields.
            dead_after_ms: 0,
            schedule: String::new(),
        }),
        Body::DpdRemoved {
            tunnel: "vpn1".into(),
        },
        Body::EspTunnel(EspTunnelInfo {
            tunnel: "vpn1".into(),
            device: "tun0".into(),
            sa_in: 0xc0ff_ee01,
            sa_out: 0xdead_beef,
            rx_pkts: 10,
            tx_pkts: 300,
            rx_bytes: 1_000_000,
            tx_bytes: u64::MAX,
        }),
        Body::EspTunnelRemoved {
            tunnel: "vpn1".into(),
        },
        Body::HaMember(HaMemberInfo {
            member_id: 1,
            group_id: 7,
            mode: "a-p".into(),
            role: "primary".into(),
            peers: vec!["10.0.0.2".into(), "10.0.0.3".into()],
        }),
        Body::HaMemberRemoved { member_id: 2 },
        Body::TunnelRole {
            tunnel: "vpn1".into(),
            role: "sync-primary".into(),
        },
        Body::TunnelRoleRemoved {
            tunnel: "vpn1".into(),
        },
        Body::ChildSa(child_sa()),
        Body::ChildSaRemoved {
            tunnel: "vpn1_1".into(),
            spi_in: 0xa575_b631,
        },
        Body::EspActivity {
            tunnels: vec![TunnelActivity {
                tunnel: "vpn1_1".into(),
                last_rx_ns: TS,
                last_tx_ns: TS + 1,
                rx_pkts: 3,
                tx_pkts: 4,
                rx_bytes: 300,
                tx_bytes: 400,
            }],
        },
        Body::EspSeq {
            sas: vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa_45b0,
                seq_hw: 10_000_001,
            }],
            usage: Vec::new(),
        },
        Body::EspExpire(SaExpiry {
            tunnel: "vpn1_1".into(),
            spi_in: 0xa575_b631,
            hard: false,
            reason: "time".into(),
            packets: 0,
        }),
        Body::ProbeRequest {
            tunnel: "vpn1_2".into(),
            round: 7,
            attempt: 2,
        },
        Body::ProbeResult {
            tunnel: "vpn1_2".into(),
            round: 7,
            msg_id: 4,
            outcome: "sent".into(),
        },
        Body::IkeActivity {
            tunnels: vec![IkeActivityMark {
                tunnel: "vpn1_2".into(),
                last_rx_ns: TS,
            }],
        },
        Body::IkeSa(ike_sa()),
        Body::IkeSaRemoved {
            tunnel: "vpn1_1".into(),
        },
        Body::SeqLeaseRequest {
            sas: vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa_45b0,
                seq_hw: 1 << 20,
            }],
        },
        Body::SeqLeaseGranted {
            sas: vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa_45b0,
                seq_hw: 1 << 20,
            }],
        },
        Body::Takeover(TakeoverInfo {
            ike: ike_sa(),
            start_seqs: vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa_45b0,
                seq_hw: 1 << 20,
            }],
            lifetimes: Vec::new(),
            held_only: false,
        }),
        Body::Acquire(AcquireInfo {
            phase1: "vpn1".into(),
            phase2: "vpn1-b".into(),
            src: "10.99.2.2".into(),
            dst: "10.99.1.2".into(),
            dropped: 3,
        }),
        Body::UnknownSaTraffic(UnknownSaTraffic {
            esp_spis: vec![0xa575_b631],
            ike_spis: vec![IkeSpis {
                spi_i: 0x8745_8c81_a3be_17f9,
                spi_r: 0xc8db_7d3f_2c70_e638,
            }],
        }),
        Body::TunnelMonitor(TunnelMonitorState {
            tunnel: "vpn1".into(),
            phase1: "vpn1".into(),
            destination: "10.2.0.1".into(),
            source: "10.1.0.1".into(),
            interval_ms: 3000,
            threshold: 5,
            misses: 5,
            state: "down".into(),
            action: "fail-over".into(),
        }),
        Body::TunnelMonitorRemoved {
            tunnel: "vpn1".into(),
        },
        Body::SeqSkip {
            sas: vec![SeqMark {
                tunnel: "vpn1_1".into(),
                spi_out: 0x10aa_45b0,
                seq_hw: 11_048_577,
            }],
        },
        Body::SeqHold {
            tunnels: vec!["vpn1_1".into()],
        },
    ]
}

/// The IKE SA of seed 000's DPD log (vpn1_2).
pub fn ike_sa() -> IkeSaRecord {
    IkeSaRecord {
        tunnel: "vpn1_1".into(),
        phase1: "vpn1".into(),
        spi_i: 0x8745_8c81_a3be_17f9,
        spi_r: 0xc8db_7d3f_2c70_e638,
        next_send: 4,
        next_recv: 2,
        remote: "192.168.4.2:500".into(),
        keys: vec![0xab; 8],
    }
}

/// The CHILD SA of seed 000's `diagnose vpn tunnel list` (vpn1_1).
pub fn child_sa() -> ChildSaInfo {
    ChildSaInfo {
        tunnel: "vpn1_1".into(),
        phase1: "vpn1".into(),
        phase2: "vpn1".into(),
        spi_in: 0xa575_b631,
        spi_out: 0x10aa_45b0,
        transform: "aes128-sha1".into(),
        esn: false,
        keys_in: vec![0x5d; 36],
        keys_out: vec![0x65; 36],
        local: "192.168.202.31".into(),
        remote: "192.168.1.2".into(),
        encap: EspEncap::Udp {
            local_port: 4500,
            remote_port: 4500,
        },
        local_ts: vec!["0.0.0.0/0".into()],
        remote_ts: vec!["10.10.1.0/24".into()],
        replay_window: 2048,
        lifetime: SaLifetime {
            soft_secs: 10_480,
            hard_secs: 10_800,
            soft_bytes: 0,
            hard_bytes: 0,
        },
        initial_seq: 1,
        outbound: true,
    }
}

pub fn envelope(body: Body) -> Envelope {
    Envelope {
        schema: SCHEMA_VERSION,
        src: DaemonKind::Ikemgr,
        boot: BOOT,
        seq: 42,
        ts_ns: TS,
        body,
    }
}

/// One request per variant, in [`CtlRequest::VARIANTS`] order.
pub fn requests() -> Vec<CtlRequest> {
    vec![
        CtlRequest::Snapshot,
        CtlRequest::Status,
        CtlRequest::Replicas,
        CtlRequest::View {
            name: "tunnel-list".into(),
            args: vec!["name".into(), "vpn1".into()],
        },
        CtlRequest::Command {
            name: "flush".into(),
            args: vec![],
        },
        CtlRequest::SetLogLevel {
            level: "debug".into(),
        },
        CtlRequest::Attach { level: "-1".into() },
        CtlRequest::AttachKeepalive,
        CtlRequest::Detach,
        CtlRequest::ReloadConfig,
    ]
}

/// One reply per variant, in [`CtlReply::VARIANTS`] order.
pub fn replies() -> Vec<CtlReply> {
    vec![
        CtlReply::Ok,
        CtlReply::Error {
            message: "no such view".into(),
        },
        CtlReply::Snapshot(Snapshot {
            src: DaemonKind::Dpdmon,
            boot: BOOT,
            seq: 9,
            items: vec![Body::DpdRemoved { tunnel: "x".into() }],
        }),
        CtlReply::Status(DaemonStatus {
            kind: DaemonKind::Hasyncd,
            pid: 4242,
            boot: BOOT,
            uptime_ms: 61_000,
            seq: 77,
            log_level: "info".into(),
            version: "0.1.0".into(),
            config_path: "/etc/haven/haven.conf".into(),
        }),
        CtlReply::Replicas(vec![ReplicaInfo {
            src: DaemonKind::Ikemgr,
            boot: Some(BOOT),
            seq: 5,
            synced: true,
            items: 2,
            digest: 0x0102_0304_0506_0708,
            gaps: 1,
            snapshots: 2,
            stale: false,
        }]),
        // One key per object: serde_json's map order depends on its `preserve_order` feature.
        CtlReply::View(serde_json::json!({"tunnels": [-1, "vpn1", true, null, 2.5]})),
        CtlReply::DebugLine {
            ts_ns: TS,
            level: "debug".into(),
            line: "ike 0:vpn1: sent IKE msg".into(),
        },
        CtlReply::Reloaded {
            warnings: vec!["line 3: unknown key".into()],
        },
    ]
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
