//! Outbound sequence leases synced through hasyncd (DESIGN.md §6, issue 6).
//!
//! In an HA cluster (hasyncd publishes a member whose mode is not `standalone`), an SA
//! installed from then on sends no packet with a sequence number at or above the last mark
//! hasyncd granted ([`crate::datapath::table::Sa::ha_hw`]). espd asks for the mark it has
//! persisted locally (`SeqLeaseRequest`, at install and then every tick while a request is
//! open); hasyncd broadcasts it on the HA link and, once every live member stored it,
//! answers `SeqLeaseGranted`. A member that takes the SA over therefore starts at or above
//! every number this espd may have sent. The local persisted mark still protects a
//! `kill -9` of espd; the effective limit is the smaller of the two marks.
//!
//! Not yet: an SA installed before hasyncd's member record was seen is not gated (it keeps
//! sending on its local marks alone); if hasyncd stops answering, gated SAs stop sending
//! once their granted mark is used up (counted as `seq_lease` drops).

use std::sync::atomic::Ordering;

use bus_schema::schema::SeqMark;
use bus_schema::{Body, StateStore};

use crate::datapath::Datapath;

/// Lease bookkeeping on the control side.
#[derive(Default)]
pub struct HaLeases {
    gating: bool,
}

impl HaLeases {
    /// Whether new SAs wait for hasyncd's lease.
    pub fn gating(&self) -> bool {
        self.gating
    }

    /// hasyncd's state changed: gate when this member is in a cluster.
    pub fn on_hasyncd(&mut self, store: &StateStore, dp: Option<&mut Datapath>) {
        let gating = store
            .items()
            .any(|b| matches!(b, Body::HaMember(m) if m.mode != "standalone"));
        if gating != self.gating {
            tracing::info!(
                "HA: outbound sequence leases {}",
                if gating {
                    "synced through hasyncd before use"
                } else {
                    "local only"
                }
            );
        }
        self.gating = gating;
        if let Some(dp) = dp {
            dp.set_ha_gating(gating);
        }
    }

    /// The open lease requests: gated SAs whose locally persisted mark is above the granted
    /// one.
    pub fn requests(&self, dp: Option<&Datapath>, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        let mut sas = Vec::new();
        for sa in dp.sas().values() {
            let granted = sa.ha_hw.load(Ordering::Acquire);
            if granted == u64::MAX {
                continue;
            }
            let local = sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted();
            if local > granted {
                sas.push(SeqMark {
                    tunnel: sa.tunnel.clone(),
                    spi_out: sa.spi_out,
                    seq_hw: local,
                });
            }
        }
        if !sas.is_empty() {
            out.push(Body::SeqLeaseRequest { sas });
        }
    }

    /// hasyncd granted marks: raise the SAs' limits (never above the local mark).
    pub fn granted(&self, dp: Option<&Datapath>, marks: &[SeqMark]) {
        let Some(dp) = dp else { return };
        for m in marks {
            for sa in dp
                .sas()
                .values()
                .filter(|s| s.tunnel == m.tunnel && s.spi_out == m.spi_out)
            {
                if sa.ha_hw.load(Ordering::Acquire) == u64::MAX {
                    continue;
                }
                let before = sa.ha_hw.fetch_max(m.seq_hw, Ordering::AcqRel);
                let local = sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted();
                sa.seq.grant(m.seq_hw.min(local));
                if before < m.seq_hw {
                    tracing::debug!(
                        "{}: HA lease granted, outbound {:08x} may send below {}",
                        sa.key,
                        sa.spi_out,
                        m.seq_hw.min(local)
                    );
                }
            }
        }
    }
}
