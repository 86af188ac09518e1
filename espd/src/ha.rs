//! Outbound sequence leases synced through hasyncd (DESIGN.md §6, issue 6).
//!
//! In an HA cluster (the configuration has `config system ha` in `a-p` mode or
//! `config system standalone-cluster`), an SA sends no packet with a sequence number at or above the last mark
//! hasyncd granted ([`crate::datapath::table::Sa::ha_hw`]). espd asks for the mark it has
//! persisted locally (`SeqLeaseRequest`, at install and then every tick while a request is
//! open); hasyncd broadcasts it on the HA link and, once every live member stored it,
//! answers `SeqLeaseGranted`. A member that takes the SA over therefore starts at or above
//! every number this espd may have sent. The local persisted mark still protects a
//! `kill -9` of espd; the effective limit is the smaller of the two marks.
//!
//! If hasyncd does not answer (not running), a gated SA sends nothing, and a running one
//! stops once its granted mark is used up (counted as `seq_lease` drops): a cluster member
//! never sends an unsynced sequence number. An SA installed before a reload that turned
//! clustering on keeps its local marks alone.

use std::sync::atomic::Ordering;

use bus_schema::schema::SeqMark;
use bus_schema::Body;
use haven_config::Config;

use crate::datapath::Datapath;

/// Lease bookkeeping on the control side.
#[derive(Default)]
pub struct HaLeases {
    gating: bool,
    /// Unknown inbound SPIs reported to hasyncd: SPI -> when (ms).
    reported: std::collections::BTreeMap<u32, u64>,
    /// When the last full (200 ms) tick ran, ms.
    pub full_tick_ms: u64,
    /// Skips whose lease request above them has not gone out yet, with when (ms) to stop
    /// waiting for it: hasyncd holds the shared addresses' announcement until this espd
    /// asks for a lease above the skip (the counter moved), so that request goes out on
    /// the next 10 ms wake-up instead of the next full tick.
    skipped: Vec<(SeqMark, u64)>,
}

/// How long after a skip its lease request is looked for on every wake-up.
const PROMPT_MS: u64 = 500;

/// An unknown SPI is reported again after this long (hasyncd promotes once; a repeat covers
/// a lost or refused promotion).
const REPORT_AGAIN_MS: u64 = 250;
/// At most this many SPIs are remembered as reported.
const REPORTED_MAX: usize = 256;
/// How often a cluster member looks for unknown SPIs (`DaemonLogic::poll_timeout`): the
/// FGSP promotion latency when the upstream router moves a tunnel here.
pub const UNKNOWN_SPI_POLL_MS: u64 = 10;

impl HaLeases {
    /// Whether new SAs wait for hasyncd's lease.
    pub fn gating(&self) -> bool {
        self.gating
    }

    /// The configuration: gate when this member is in a cluster (`config system ha` in
    /// `a-p` mode, or `config system standalone-cluster`). Decided from the configuration,
    /// not from hasyncd's records, so that no SA can start sending before hasyncd is heard.
    pub fn on_config(&mut self, config: &Config, dp: Option<&mut Datapath>) {
        let gating = config
            .ha
            .as_ref()
            .is_some_and(|h| h.mode == haven_config::HaMode::ActivePassive)
            || config.standalone.is_some();
        if gating != self.gating {
            tracing::info!(
                "HA: outbound sequence leases {}",
                if gating {
                    "granted by hasyncd before use (cluster member)"
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

    /// In a cluster: ESP that arrived for SPIs with no SA since the last call goes to
    /// hasyncd (`UnknownSaTraffic`), each SPI at most every [`REPORT_AGAIN_MS`]. An FGSP
    /// member holding a standby copy of the tunnel promotes it (the upstream router moved the
    /// tunnel here).
    pub fn unknown_spis(&mut self, dp: Option<&Datapath>, now_ms: u64, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        let spis = dp.shared().unknown_spis.drain();
        if !self.gating {
            return;
        }
        self.reported
            .retain(|_, at| now_ms.saturating_sub(*at) < REPORT_AGAIN_MS);
        let fresh: Vec<u32> = spis
            .into_iter()
            .filter(|spi| !self.reported.contains_key(spi))
            .collect();
        if fresh.is_empty() {
            return;
        }
        for spi in &fresh {
            if self.reported.len() < REPORTED_MAX {
                self.reported.insert(*spi, now_ms);
            }
        }
        tracing::debug!("HA: ESP for unknown SPIs {fresh:08x?} reported to hasyncd");
        out.push(Body::UnknownSaTraffic(
            bus_schema::schema::UnknownSaTraffic {
                esp_spis: fresh,
                ike_spis: Vec::new(),
            },
        ));
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

    /// hasyncd claimed back a tunnel this espd kept while another member carried it (FGCP
    /// split brain): each outbound SA continues at or above its mark. The counter then
    /// stands above the local and HA lease marks, so the SA sends nothing until the
    /// housekeeping persists a new local mark and hasyncd grants the lease above it; the
    /// request for that lease goes out on the next wake-up ([`HaLeases::skip_requests`]).
    pub fn skip(&mut self, dp: Option<&Datapath>, marks: &[SeqMark], now_ms: u64) {
        let Some(dp) = dp else { return };
        for m in marks {
            let mut held = false;
            for sa in dp.sas_of(&m.tunnel, m.spi_out) {
                held = true;
                let before = sa.seq.next();
                let next = sa.seq.skip_to(m.seq_hw);
                if next > before {
                    tracing::info!(
                        "{}: HA: outbound {:08x} continues at sequence {next} (was {before}; another member sent on it meanwhile)",
                        sa.key,
                        sa.spi_out
                    );
                }
            }
            if held && self.skipped.len() < REPORTED_MAX {
                self.skipped
                    .push((m.clone(), now_ms.saturating_add(PROMPT_MS)));
            }
        }
    }

    /// Shortly after a skip: the lease request of each skipped SA whose new local mark
    /// (above the skip) is persisted, once.
    pub fn skip_requests(&mut self, dp: Option<&Datapath>, now_ms: u64, out: &mut Vec<Body>) {
        let Some(dp) = dp else { return };
        if self.skipped.is_empty() {
            return;
        }
        let mut sas = Vec::new();
        self.skipped.retain(|(m, until)| {
            let local = dp
                .sas_of(&m.tunnel, m.spi_out)
                .map(|sa| sa.lease.lock().unwrap_or_else(|p| p.into_inner()).granted())
                .max();
            match local {
                Some(local) if local > m.seq_hw => {
                    sas.push(SeqMark {
                        tunnel: m.tunnel.clone(),
                        spi_out: m.spi_out,
                        seq_hw: local,
                    });
                    false
                }
                Some(_) => now_ms < *until,
                None => false,
            }
        });
        if !sas.is_empty() {
            out.push(Body::SeqLeaseRequest { sas });
        }
    }

    /// hasyncd granted marks: raise the SAs' limits (never above the local mark).
    pub fn granted(&self, dp: Option<&Datapath>, marks: &[SeqMark]) {
        let Some(dp) = dp else { return };
        for m in marks {
            for sa in dp.sas_of(&m.tunnel, m.spi_out) {
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
