//! FGCP configuration sync: the primary's configuration reaches its secondaries
//! (seed 001: "The configuration is automatically synchronized"), except the per-member
//! keys of haven-config's `member::PER_MEMBER`.
//!
//! Every FGCP member announces the checksums of its running configuration and of its file
//! on disk (ha-core `ConfigStatus`, every second and at once after a reload). A secondary
//! whose running checksum differs from its primary's pulls the primary's text over the
//! encrypted HA link (ha-core `ConfigPull`), merges it with its own per-member keys,
//! checks the result, writes it atomically to its `--config` path (a temporary file in the
//! same directory, fsync, rename) and asks every local daemon to reload it over their
//! control sockets, as `vpnctl config reload` does. A text that does not load, a merge
//! that does not load, or a result whose checksum is not the primary's is refused,
//! counted and logged with the first error (file, line, column); the member keeps running
//! its configuration. Nothing goes from a secondary to its primary; nothing goes over the
//! FGSP link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use ha_core::config_sync::{
    serve, ConfigPull, ConfigStatus, ConfigSums, Digest16, PullEvent, STATUS_INTERVAL_MS,
};
use ha_core::msg::HaRole;
use ha_core::{MemberId, Message};
use haven_config::member::{merge_member_keys, synced_text, MergeError, HEADER_MARK};
use haven_config::Config;
use serde_json::{json, Value};

use crate::cluster::{role_name, Cluster};

/// How often the file on disk is looked at again (its checksum in `diagnose sys ha
/// checksum show`).
const FILE_CHECK_MS: u64 = 2_000;
/// Daemons reloaded after a sync, in this order (hasyncd last: its own reload re-reads the
/// file and announces the new checksum).
const RELOAD_ORDER: [DaemonKind; 4] = [
    DaemonKind::Ikemgr,
    DaemonKind::Dpdmon,
    DaemonKind::Espd,
    DaemonKind::Hasyncd,
];
/// Time allowed to each daemon's reload.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Registers the descriptions of the configuration sync series.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(
        "hasyncd_config_in_sync",
        "1 when this member's running configuration checksum equals its FGCP primary's (on the primary: every member heard agrees), 0 otherwise."
    );
    describe_counter!(
        "hasyncd_config_syncs_total",
        Unit::Count,
        "Configurations taken from the FGCP primary, merged, written and reloaded (secondary)."
    );
    describe_counter!(
        "hasyncd_config_sync_rejected_total",
        Unit::Count,
        "Configurations from the FGCP primary refused, by reason; the member kept its own."
    );
    describe_counter!(
        "hasyncd_config_chunks_served_total",
        Unit::Count,
        "Configuration chunks sent to secondaries that asked (primary)."
    );
    describe_counter!(
        "hasyncd_config_reload_failures_total",
        Unit::Count,
        "Daemons that did not confirm the reload after a sync, by daemon."
    );
    metrics::gauge!("hasyncd_config_in_sync").set(0.0);
    // Exported at 0 from the start, so that dashboards show 0 and alerts see the first
    // refusal as an increase.
    metrics::counter!("hasyncd_config_syncs_total").increment(0);
    metrics::counter!("hasyncd_config_chunks_served_total").increment(0);
    for reason in REFUSAL_REASONS {
        metrics::counter!("hasyncd_config_sync_rejected_total", "reason" => reason).increment(0);
    }
    for d in RELOAD_ORDER {
        metrics::counter!("hasyncd_config_reload_failures_total", "daemon" => d.name())
            .increment(0);
    }
}

/// Every `reason` label of `hasyncd_config_sync_rejected_total`: the text is not UTF-8,
/// the primary's text, this member's file or their merge does not load, the merge's
/// checksum is not the primary's, the file cannot be written, and the transfer's failures
/// (ha-core `PullFailure::label`).
const REFUSAL_REASONS: [&str; 9] = [
    "not_utf8",
    "primary_invalid",
    "own_invalid",
    "merged_invalid",
    "checksum",
    "write",
    "too_large",
    "corrupt",
    "timeout",
];

fn sums_json(s: &ConfigSums) -> Value {
    json!({ "global": s.global.hex(), "root": s.root.hex(), "all": s.all.hex() })
}

/// The checksums of a text, or the parse errors.
fn sums_of(text: &str) -> Result<ConfigSums, String> {
    synced_text(text)
        .map(|s| ConfigSums::compute(&s.global, &s.root))
        .map_err(|e| first_error(&e))
}

fn first_error(e: &haven_config::ConfigErrors) -> String {
    let more = e.errors.len().saturating_sub(1);
    let first = e
        .first()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "invalid configuration".into());
    if more > 0 {
        format!("{first} (and {more} more)")
    } else {
        first
    }
}

/// What another member last announced.
struct Peer {
    status: ConfigStatus,
    heard_ms: u64,
}

/// The outcome of the reload after a sync: per daemon, `Ok(warnings)` or the error.
type ReloadResult = Vec<(DaemonKind, Result<usize, String>)>;

/// The configuration sync state of this member.
pub struct ConfigSync {
    path: Option<PathBuf>,
    run_dir: PathBuf,
    /// The text this daemon last loaded, its id and checksums.
    running_text: Option<String>,
    running: Option<ConfigSums>,
    text_id: Digest16,
    /// The file on disk: digest of its bytes when last looked at, and its checksums.
    file_digest: Option<Digest16>,
    file: Option<ConfigSums>,
    next_file_check_ms: u64,
    /// This member's own `sync-config`.
    sync_config: bool,
    peers: BTreeMap<MemberId, Peer>,
    pull: ConfigPull,
    next_status_ms: u64,
    /// The primary the last statuses were judged against (a change cancels a transfer).
    primary: Option<MemberId>,
    reloading: Option<Receiver<ReloadResult>>,
    /// The checksums the last applied sync should bring at the next reload: a reload that
    /// is not this one (an operator's, after a local edit) lets refused texts be asked for
    /// again.
    expect_reload: Option<ConfigSums>,
    syncs: u64,
    rejected: u64,
    served: u64,
    last_result: String,
    last_from: Option<MemberId>,
}

impl ConfigSync {
    /// Nothing known yet; `run_dir` holds the daemons' control sockets.
    pub fn new(run_dir: &Path) -> Self {
        ConfigSync {
            path: None,
            run_dir: run_dir.to_path_buf(),
            running_text: None,
            running: None,
            text_id: Digest16::default(),
            file_digest: None,
            file: None,
            next_file_check_ms: 0,
            sync_config: true,
            peers: BTreeMap::new(),
            pull: ConfigPull::new(),
            next_status_ms: 0,
            primary: None,
            reloading: None,
            expect_reload: None,
            syncs: 0,
            rejected: 0,
            served: 0,
            last_result: String::new(),
            last_from: None,
        }
    }

    /// The `--config` path.
    pub fn set_path(&mut self, path: &Path) {
        self.path = Some(path.to_path_buf());
    }

    /// A (re)load of the configuration: the file's text is what this member now runs.
    pub fn on_config(&mut self, config: &Config) {
        self.sync_config = config.ha.as_ref().is_none_or(|h| h.sync_config);
        let Some(path) = self.path.as_ref() else {
            return;
        };
        match std::fs::read_to_string(path) {
            Ok(text) => match sums_of(&text) {
                Ok(sums) => {
                    match self.expect_reload.take() {
                        // The reload that follows a sync: the applied text stays refused,
                        // so a result that does not match the primary does not loop.
                        Some(_) => {}
                        // Any other reload (an operator's): the primary's text may be
                        // taken again if this member now differs.
                        None => self.pull.forget_refusals(),
                    }
                    self.text_id = Digest16::of(text.as_bytes());
                    self.running = Some(sums);
                    self.file = Some(sums);
                    self.file_digest = Some(self.text_id);
                    self.running_text = Some(text);
                    tracing::info!(
                        "config sync: running configuration checksum {}",
                        sums.all.hex()
                    );
                }
                Err(e) => tracing::warn!(
                    "config sync: {} changed under the reload and does not load ({e}); checksum unchanged",
                    path.display()
                ),
            },
            Err(e) => tracing::warn!("config sync: cannot read {}: {e}", path.display()),
        }
        // Announce at once.
        self.next_status_ms = 0;
    }

    fn role(cluster: &Cluster) -> Option<HaRole> {
        cluster.fgcp_role()
    }

    /// Runs the sync for one tick: messages received, transfer, statuses, file check.
    pub fn tick(&mut self, cluster: &mut Cluster, now_ms: u64) {
        self.finish_reload();
        let role = Self::role(cluster);
        if role.is_none() {
            // No FGCP link: nothing to sync with.
            self.peers.clear();
            self.pull.cancel();
            metrics::gauge!("hasyncd_config_in_sync").set(0.0);
            return;
        }
        let primary = if role == Some(HaRole::Secondary) {
            cluster.fgcp_primary()
        } else {
            None
        };
        if primary != self.primary {
            self.pull.cancel();
            self.primary = primary;
        }
        let mine = self.running.unwrap_or_default();
        for (from, msg) in cluster.take_config_messages() {
            match msg {
                Message::ConfigStatus(st) => {
                    self.pull
                        .handle_status(from, &st, primary, &mine, self.sync_config, now_ms);
                    self.peers.insert(
                        from,
                        Peer {
                            status: st,
                            heard_ms: now_ms,
                        },
                    );
                }
                Message::ConfigRequest(req) => {
                    if role != Some(HaRole::Primary) || !self.sync_config {
                        continue;
                    }
                    let Some(text) = self.running_text.as_ref() else {
                        continue;
                    };
                    if let Some(chunk) = serve(text.as_bytes(), &req) {
                        if req.offset == 0 {
                            tracing::info!(
                                "config sync: member {} asked for the configuration ({} bytes)",
                                from.0,
                                text.len()
                            );
                        }
                        cluster.send_fgcp_to(from, &Message::ConfigChunk(chunk));
                        self.served += 1;
                        metrics::counter!("hasyncd_config_chunks_served_total").increment(1);
                    }
                }
                Message::ConfigChunk(c) => self.pull.handle_chunk(from, c, now_ms),
                _ => {}
            }
        }
        if self.reloading.is_none() {
            if let Some((to, req)) = self.pull.poll_transmit(now_ms) {
                cluster.send_fgcp_to(to, &Message::ConfigRequest(req));
            }
        }
        while let Some(ev) = self.pull.poll_event() {
            match ev {
                PullEvent::Complete {
                    from,
                    text_id,
                    text,
                } => {
                    let current = self.peers.get(&from).map(|p| &p.status);
                    if current.is_some_and(|st| st.text_id != text_id) {
                        // The primary announced a newer text meanwhile (its transfer is
                        // under way): this one is outdated, not wrong.
                        tracing::debug!(
                            "config sync: text {} from member {} is outdated; not applied",
                            text_id.hex(),
                            from.0
                        );
                        continue;
                    }
                    let expected = current.map(|st| st.running);
                    self.apply(from, text_id, text.expose(), expected, now_ms);
                }
                PullEvent::Failed {
                    from,
                    text_id,
                    reason,
                } => self.reject(
                    from,
                    text_id,
                    reason.label(),
                    format!("transfer failed ({})", reason.label()),
                    now_ms,
                ),
            }
        }
        if now_ms >= self.next_file_check_ms {
            self.next_file_check_ms = now_ms.saturating_add(FILE_CHECK_MS);
            self.check_file();
        }
        if now_ms >= self.next_status_ms {
            self.next_status_ms = now_ms.saturating_add(STATUS_INTERVAL_MS);
            if let Some(running) = self.running {
                let st = ConfigStatus {
                    sync_config: self.sync_config,
                    running,
                    file: self.file,
                    text_id: self.text_id,
                    text_len: self.running_text.as_ref().map_or(0, |t| t.len() as u64),
                };
                cluster.broadcast_fgcp(&Message::ConfigStatus(st));
            }
        }
        // Members not heard for a while are left out of the comparison.
        self.peers
            .retain(|_, p| now_ms.saturating_sub(p.heard_ms) < 10 * STATUS_INTERVAL_MS);
        metrics::gauge!("hasyncd_config_in_sync").set(if self.in_sync(role) == Some(true) {
            1.0
        } else {
            0.0
        });
    }

    /// This member's running checksum equals its primary's (on the primary: every member
    /// heard agrees). `None` when there is nothing to compare.
    fn in_sync(&self, role: Option<HaRole>) -> Option<bool> {
        let mine = self.running?;
        match role? {
            HaRole::Primary => Some(
                self.peers
                    .values()
                    .all(|p| p.status.running.all == mine.all),
            ),
            HaRole::Secondary => {
                let p = self.peers.get(&self.primary?)?;
                Some(p.status.running.all == mine.all)
            }
            HaRole::Hello => None,
        }
    }

    fn check_file(&mut self) {
        let Some(path) = self.path.as_ref() else {
            return;
        };
        let Ok(bytes) = std::fs::read(path) else {
            self.file = None;
            self.file_digest = None;
            return;
        };
        let d = Digest16::of(&bytes);
        if self.file_digest == Some(d) {
            return;
        }
        self.file_digest = Some(d);
        self.file = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| sums_of(t).ok());
        self.next_status_ms = 0;
    }

    fn reject(
        &mut self,
        from: MemberId,
        text_id: Digest16,
        reason: &'static str,
        what: String,
        now_ms: u64,
    ) {
        self.pull.refuse(text_id, now_ms);
        self.rejected += 1;
        metrics::counter!("hasyncd_config_sync_rejected_total", "reason" => reason).increment(1);
        self.last_result = format!("refused configuration from member {}: {what}", from.0);
        self.last_from = Some(from);
        tracing::error!(
            "config sync: configuration from primary member {} refused, running configuration kept: {what}",
            from.0
        );
    }

    /// A whole text from the primary: merge, check, write, reload.
    fn apply(
        &mut self,
        from: MemberId,
        text_id: Digest16,
        bytes: &[u8],
        expected: Option<ConfigSums>,
        now_ms: u64,
    ) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let Ok(primary) = std::str::from_utf8(bytes) else {
            return self.reject(
                from,
                text_id,
                "not_utf8",
                "the text is not UTF-8".into(),
                now_ms,
            );
        };
        // This member's per-member keys: from its file as it is now, or from what it runs
        // when the file cannot be read.
        let own = std::fs::read_to_string(&path)
            .ok()
            .filter(|t| haven_config::parse(t).is_ok())
            .or_else(|| self.running_text.clone())
            .unwrap_or_default();
        let header = vec![
            format!("{HEADER_MARK} written by hasyncd from FGCP primary member {} (its configuration, with this member's per-member keys).", from.0),
            format!("{HEADER_MARK} Change it on the primary: changes made here are replaced at the next sync, but for the per-member keys (hasyncd/README.md)."),
        ];
        let merged = match merge_member_keys(primary, &own, &header) {
            Ok(m) => m,
            Err(e) => {
                let (reason, what) = match &e {
                    MergeError::Primary(c) => (
                        "primary_invalid",
                        format!(
                            "the primary's configuration does not load: {}",
                            first_error(c)
                        ),
                    ),
                    MergeError::Own(c) => (
                        "own_invalid",
                        format!("this member's file does not load: {}", first_error(c)),
                    ),
                    MergeError::Merged(c) => (
                        "merged_invalid",
                        format!("the merged configuration does not load: {}", first_error(c)),
                    ),
                    MergeError::Structure(_) => ("merged_invalid", e.to_string()),
                };
                return self.reject(from, text_id, reason, what, now_ms);
            }
        };
        let sums = match sums_of(&merged) {
            Ok(s) => s,
            Err(e) => return self.reject(from, text_id, "merged_invalid", e, now_ms),
        };
        if let Some(exp) = expected.filter(|x| x.all != sums.all) {
            return self.reject(
                from,
                text_id,
                "checksum",
                format!(
                    "the merged configuration's checksum {} is not the primary's {}",
                    sums.all.hex(),
                    exp.all.hex()
                ),
                now_ms,
            );
        }
        if let Err(e) = write_atomically(&path, merged.as_bytes()) {
            return self.reject(
                from,
                text_id,
                "write",
                format!("cannot write {}: {e}", path.display()),
                now_ms,
            );
        }
        // Not asked for again: if the reload does not bring the checksums together, a
        // retry would not either (the next one after the back-off).
        self.pull.refuse(text_id, now_ms);
        self.expect_reload = Some(sums);
        self.syncs += 1;
        metrics::counter!("hasyncd_config_syncs_total").increment(1);
        self.last_result = format!(
            "configuration from member {} written to {} (checksum {}); reloading",
            from.0,
            path.display(),
            sums.all.hex()
        );
        self.last_from = Some(from);
        tracing::info!(
            "config sync: configuration from primary member {} ({} bytes, checksum {}) written to {}; reloading the daemons",
            from.0,
            bytes.len(),
            sums.all.hex(),
            path.display()
        );
        self.reloading = Some(spawn_reload(self.run_dir.clone()));
    }

    /// Logs the reload's outcome when it is in.
    fn finish_reload(&mut self) {
        let Some(rx) = self.reloading.as_ref() else {
            return;
        };
        let Ok(results) = rx.try_recv() else {
            if matches!(
                rx.try_recv(),
                Err(std::sync::mpsc::TryRecvError::Disconnected)
            ) {
                self.reloading = None;
            }
            return;
        };
        self.reloading = None;
        let mut failed = Vec::new();
        for (kind, r) in results {
            match r {
                Ok(w) => tracing::info!("config sync: {} reloaded ({w} warnings)", kind.name()),
                Err(e) => {
                    metrics::counter!("hasyncd_config_reload_failures_total", "daemon" => kind.name()).increment(1);
                    tracing::warn!("config sync: {} not reloaded: {e}", kind.name());
                    failed.push(kind.name());
                    if kind == DaemonKind::Hasyncd {
                        // Its own reload did not happen: the next one is not the sync's.
                        self.expect_reload = None;
                    }
                }
            }
        }
        self.last_result = if failed.is_empty() {
            self.last_result.replace("; reloading", "; reloaded")
        } else {
            format!("{}; not reloaded: {}", self.last_result, failed.join(", "))
        };
    }

    /// `execute ha synchronize start`: on a secondary, take the primary's configuration at
    /// its next status even when the checksums agree or the text was refused.
    pub fn force(&mut self, cluster: Option<&Cluster>) -> Result<Value, String> {
        let role = cluster.and_then(Self::role);
        if role != Some(HaRole::Secondary) {
            return Err(format!(
                "this member is not an FGCP secondary (role {}): nothing to synchronize from",
                role.map_or("standalone", role_name)
            ));
        }
        if !self.sync_config {
            return Err("sync-config is disabled on this member".into());
        }
        let primary = cluster.and_then(Cluster::fgcp_primary);
        self.pull.force();
        tracing::info!(
            "config sync: synchronization from primary member {} requested by the operator",
            primary.map_or(0, |m| m.0)
        );
        Ok(json!({ "requested": true, "primary": primary.map(|m| m.0) }))
    }

    /// `checksum` view: this member's checksums and every FGCP member's, for `vpnctl
    /// diagnose sys ha checksum show|cluster`.
    pub fn view(&self, cluster: Option<&Cluster>, now_ms: u64) -> Value {
        let role = cluster.and_then(Self::role);
        let me = cluster.and_then(Cluster::fgcp_me);
        let primary = cluster.and_then(Cluster::fgcp_primary);
        let status = cluster.map(|c| c.ha_status(now_ms));
        let name_of = |id: MemberId| -> (String, String) {
            status
                .as_ref()
                .and_then(|s| s["members"].as_array())
                .and_then(|ms| ms.iter().find(|m| m["member_id"] == id.0))
                .map(|m| {
                    (
                        m["serial"].as_str().unwrap_or("").to_string(),
                        m["hostname"].as_str().unwrap_or("").to_string(),
                    )
                })
                .unwrap_or_default()
        };
        let mut members = Vec::new();
        if let Some((id, serial)) = me.as_ref() {
            members.push(json!({
                "member_id": id.0,
                "serial": serial,
                "hostname": name_of(*id).1,
                "me": true,
                "is_primary": primary == Some(*id),
                "sync_config": self.sync_config,
                "running": self.running.as_ref().map(sums_json),
                "file": self.file.as_ref().map(sums_json),
            }));
        }
        for (id, p) in &self.peers {
            let (serial, hostname) = name_of(*id);
            members.push(json!({
                "member_id": id.0,
                "serial": serial,
                "hostname": hostname,
                "me": false,
                "is_primary": primary == Some(*id),
                "sync_config": p.status.sync_config,
                "running": sums_json(&p.status.running),
                "file": p.status.file.as_ref().map(sums_json),
                "heard_ms_ago": now_ms.saturating_sub(p.heard_ms),
            }));
        }
        json!({
            "mode": if role.is_some() { "a-p" } else { "standalone" },
            "role": role.map(role_name),
            "config_path": self.path.as_ref().map(|p| p.display().to_string()),
            "sync_config": self.sync_config,
            "is_manage_primary": role == Some(HaRole::Primary),
            "in_sync": self.in_sync(role),
            "running": self.running.as_ref().map(sums_json),
            "file": self.file.as_ref().map(sums_json),
            "members": members,
            "sync": {
                "syncs": self.syncs,
                "rejected": self.rejected,
                "chunks_served": self.served,
                "last": self.last_result,
                "last_from": self.last_from.map(|m| m.0),
                "transfer": self.pull.under_way().map(|(f, id, got, total)| json!({
                    "from": f.0, "text_id": id.hex(), "bytes": got, "total": total,
                })),
                "reloading": self.reloading.is_some(),
            },
        })
    }
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a
/// part: a temporary file in the same directory (mode of the old file, 0600 without one),
/// fsync, rename over the path, fsync of the directory. A symbolic link is followed (its
/// target is replaced).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "haven.conf".into());
    let mode = std::fs::metadata(&target)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(".{name}.hasyncd-sync.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Asks every local daemon to reload its configuration (`CtlRequest::ReloadConfig`, the
/// request `vpnctl config reload` sends), on a thread of its own; the result comes back on
/// the channel.
fn spawn_reload(run_dir: PathBuf) -> Receiver<ReloadResult> {
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new()
        .name("cfgsync-reload".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(
                        RELOAD_ORDER
                            .iter()
                            .map(|k| (*k, Err(format!("no runtime: {e}"))))
                            .collect(),
                    );
                    return;
                }
            };
            let mut out = Vec::new();
            for kind in RELOAD_ORDER {
                let r = rt.block_on(ctl_call(
                    &run_dir,
                    kind,
                    &CtlRequest::ReloadConfig,
                    RELOAD_TIMEOUT,
                ));
                out.push((
                    kind,
                    match r {
                        Ok(CtlReply::Reloaded { warnings }) => Ok(warnings.len()),
                        Ok(CtlReply::Error { message }) => Err(message),
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                ));
            }
            let _ = tx.send(out);
        });
    if let Err(e) = spawned {
        tracing::error!("config sync: cannot start the reload thread: {e}");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_file_replaces_the_old_one_whole_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hasyncd-cfgsync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("haven.conf");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.join("link.conf");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        write_atomically(&link, b"new text").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new text");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("hasyncd-sync"))
            .collect();
        assert!(left.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const OWN: &str = "config system ha\n    set group-id 5\n    set mode a-p\n    set password pw\n    set hbdev ha0 50\n    set priority 100\nend\n";

    fn member_with_file(tag: &str) -> (ConfigSync, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("hasyncd-cfgsync-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("haven.conf");
        std::fs::write(&path, OWN).unwrap();
        // No daemon listens here: a reload, if one were started, fails and is logged.
        let mut s = ConfigSync::new(&dir.join("run"));
        s.set_path(&path);
        s.on_config(&haven_config::parse(OWN).unwrap().config);
        (s, path)
    }

    #[test]
    fn a_bad_configuration_from_the_primary_is_refused_and_the_file_kept() {
        let (mut s, path) = member_with_file("bad");
        let running = s.running;
        assert!(running.is_some());
        let bad: &[&[u8]] = &[
            b"config system ha\n    set mode a-p\n    set hbdev p4 50\n    set priority 300\nend\n",
            b"config vpn ipsec phase1-interface\n    edit vpn1\n        set bogus-key 1\n    next\nend\n",
            b"config system ha\n",
            &[0xff, 0xfe, 0x00],
        ];
        for (i, text) in bad.iter().enumerate() {
            s.apply(MemberId(1), Digest16::of(text), text, None, 10);
            assert_eq!(s.rejected, i as u64 + 1);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), OWN);
            assert!(s.reloading.is_none());
            assert_eq!(s.running, running);
            assert!(s.last_result.starts_with("refused"), "{}", s.last_result);
        }
        assert!(s.last_result.contains("not UTF-8"));
        // The first: where and what.
        let text = bad[0];
        s.apply(MemberId(1), Digest16::of(text), text, None, 10);
        assert!(
            s.last_result.contains("line 4") && s.last_result.contains("priority"),
            "{}",
            s.last_result
        );
        // A text that loads but does not give the checksum the primary announced.
        let good = "config system ha\n    set group-id 5\n    set mode a-p\n    set password pw\n    set hbdev port4 50\nend\n";
        let wrong = sums_of(&good.replace("group-id 5", "group-id 6")).unwrap();
        s.apply(
            MemberId(1),
            Digest16::of(good.as_bytes()),
            good.as_bytes(),
            Some(wrong),
            10,
        );
        assert!(s.last_result.contains("checksum"), "{}", s.last_result);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), OWN);
        assert_eq!(s.syncs, 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_good_configuration_is_merged_written_and_reloaded() {
        let (mut s, path) = member_with_file("good");
        let primary = "config system ha\n    set group-id 5\n    set mode a-p\n    set password pw\n    set hbdev port4 50\n    set priority 250\n    set hb-interval 3\nend\n";
        let expected = sums_of(primary).unwrap();
        s.apply(
            MemberId(1),
            Digest16::of(primary.as_bytes()),
            primary.as_bytes(),
            Some(expected),
            10,
        );
        assert_eq!((s.syncs, s.rejected), (1, 0), "{}", s.last_result);
        assert!(s.reloading.is_some());
        let written = std::fs::read_to_string(&path).unwrap();
        let c = haven_config::parse(&written).unwrap().config.ha.unwrap();
        assert_eq!(
            (c.priority, c.hb_interval, c.hbdev[0].interface.as_str()),
            (100, 3, "ha0")
        );
        assert_eq!(sums_of(&written).unwrap(), expected);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_merged_file_has_the_primarys_checksum_and_this_members_keys() {
        let primary = "config system ha\n    set group-id 5\n    set mode a-p\n    set password pw\n    set hbdev port4 50\n    set priority 200\nend\nconfig vpn ipsec phase1-interface\n    edit vpn1\n        set interface port2\n        set remote-gw 192.0.2.1\n        set psksecret s3cr3tkey\n    next\nend\n";
        let own = "config system ha\n    set group-id 5\n    set mode a-p\n    set password pw\n    set hbdev ha0 50\n    set priority 100\nend\n";
        let merged = merge_member_keys(primary, own, &[]).unwrap();
        assert_eq!(sums_of(&merged).unwrap(), sums_of(primary).unwrap());
        assert_ne!(sums_of(own).unwrap().all, sums_of(primary).unwrap().all);
        // Per-member keys alone do not change the checksum.
        let other_prio = own.replace("priority 100", "priority 1");
        assert_eq!(sums_of(&other_prio).unwrap(), sums_of(own).unwrap());
        assert!(sums_of("config system ha\n    set priority x\nend\n").is_err());
    }
}
