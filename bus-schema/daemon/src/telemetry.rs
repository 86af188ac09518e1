//! Prometheus metrics every daemon exports: process, bus and uptime.
//!
//! Only binaries install the recorder (STYLE.md convention 5); this module does it for the
//! daemon shell and describes the shared series at start. Daemon-specific series are
//! registered by each daemon with its own `<daemon>_` prefix.

use std::net::SocketAddr;
use std::time::Instant;

use metrics::{describe_counter, describe_gauge, Counter, Gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Starts the Prometheus exporter on `addr`. Must be called inside a tokio runtime.
/// Fails (with the listener error) when the address cannot be bound.
pub fn install_exporter(addr: SocketAddr) -> Result<(), String> {
    // Bind first ourselves so that "address in use" is reported synchronously with what
    // and where, then release it for the exporter.
    std::net::TcpListener::bind(addr).map_err(|e| format!("metrics listen {addr}: {e}"))?;
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .map_err(|e| format!("metrics listen {addr}: {e}"))?;
    metrics::set_global_recorder(recorder)
        .map_err(|e| format!("metrics recorder already installed: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!("metrics exporter stopped: {e:?}");
        }
    });
    Ok(())
}

/// Bus counters shared by every daemon, named `<daemon>_bus_…`.
#[derive(Clone)]
pub struct BusMetrics {
    pub published: Counter,
    pub received: Counter,
    pub gaps: Counter,
    pub snapshots_served: Counter,
    pub snapshots_applied: Counter,
    pub decode_errors: Counter,
    pub ctl_requests: Counter,
    pub ctl_errors: Counter,
    pub send_errors: Counter,
    /// Snapshot fetches abandoned because the owner stopped (silent on the bus) or the
    /// fetch exceeded its overall limit.
    pub snapshot_timeouts: Counter,
    /// Copies of a followed store handed to the logic (a copy it has not read yet is
    /// replaced by the next).
    pub handovers: Counter,
}

impl BusMetrics {
    pub fn new(daemon: &str) -> Self {
        let n = |s: &str| format!("{daemon}_{s}");
        describe_counter!(
            n("bus_messages_published_total"),
            Unit::Count,
            "Messages published on this daemon's bus socket."
        );
        describe_counter!(
            n("slow_calls_total"),
            Unit::Count,
            "Calls into the daemon's logic (call=tick, replica, event, config, command) that held it for 250 ms or more."
        );
        describe_counter!(
            n("bus_messages_received_total"),
            Unit::Count,
            "Bus messages received from followed daemons."
        );
        describe_counter!(
            n("bus_gaps_total"),
            Unit::Count,
            "Sequence gaps or publisher restarts detected on followed daemons."
        );
        describe_counter!(
            n("bus_snapshots_served_total"),
            Unit::Count,
            "State snapshots served over the control socket."
        );
        describe_counter!(
            n("bus_snapshots_applied_total"),
            Unit::Count,
            "State snapshots fetched and applied from followed daemons."
        );
        describe_counter!(
            n("bus_decode_errors_total"),
            Unit::Count,
            "Bus or control frames dropped because they could not be decoded."
        );
        describe_counter!(
            n("bus_replica_handovers_total"),
            Unit::Count,
            "Copies of a followed daemon's state handed to the logic (coalesced bus updates)."
        );
        describe_counter!(
            n("ctl_requests_total"),
            Unit::Count,
            "Control socket requests handled."
        );
        describe_counter!(
            n("ctl_errors_total"),
            Unit::Count,
            "Control socket requests answered with an error."
        );
        describe_counter!(
            n("bus_send_errors_total"),
            Unit::Count,
            "Bus or control messages that could not be sent."
        );
        describe_counter!(
            n("bus_snapshot_timeouts_total"),
            Unit::Count,
            "Snapshot fetches abandoned: the owner fell silent on the bus, or the fetch ran past its limit."
        );
        BusMetrics {
            published: metrics::counter!(n("bus_messages_published_total")),
            received: metrics::counter!(n("bus_messages_received_total")),
            gaps: metrics::counter!(n("bus_gaps_total")),
            snapshots_served: metrics::counter!(n("bus_snapshots_served_total")),
            snapshots_applied: metrics::counter!(n("bus_snapshots_applied_total")),
            decode_errors: metrics::counter!(n("bus_decode_errors_total")),
            ctl_requests: metrics::counter!(n("ctl_requests_total")),
            ctl_errors: metrics::counter!(n("ctl_errors_total")),
            send_errors: metrics::counter!(n("bus_send_errors_total")),
            snapshot_timeouts: metrics::counter!(n("bus_snapshot_timeouts_total")),
            handovers: metrics::counter!(n("bus_replica_handovers_total")),
        }
    }
}

/// Process and uptime gauges, refreshed by [`ProcessMetrics::refresh`].
pub struct ProcessMetrics {
    started: Instant,
    uptime: Gauge,
    cpu: Counter,
    rss: Gauge,
    fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
    attached: Gauge,
    lines_dropped: Counter,
    lines_dropped_seen: u64,
    clk_tck: f64,
    page_size: f64,
}

impl ProcessMetrics {
    pub fn new(daemon: &str) -> Self {
        describe_gauge!(
            format!("{daemon}_uptime_seconds"),
            Unit::Seconds,
            "Seconds since this daemon started."
        );
        describe_counter!(
            "process_cpu_seconds_total",
            Unit::Seconds,
            "Total user and system CPU time spent in seconds."
        );
        describe_gauge!(
            "process_resident_memory_bytes",
            Unit::Bytes,
            "Resident memory size in bytes."
        );
        describe_gauge!(
            "process_open_fds",
            Unit::Count,
            "Number of open file descriptors."
        );
        describe_gauge!(
            "process_start_time_seconds",
            Unit::Seconds,
            "Start time of the process since unix epoch in seconds."
        );
        describe_gauge!(
            "process_threads",
            Unit::Count,
            "Number of OS threads in the process."
        );
        describe_gauge!(
            format!("{daemon}_debug_sessions"),
            Unit::Count,
            "Debug sessions attached right now."
        );
        describe_counter!(
            format!("{daemon}_debug_lines_dropped_total"),
            Unit::Count,
            "Debug lines dropped because an attached reader was slow."
        );
        // SAFETY: sysconf has no preconditions; it only reads system configuration.
        let clk_tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let start_time = metrics::gauge!("process_start_time_seconds");
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        ProcessMetrics {
            started: Instant::now(),
            uptime: metrics::gauge!(format!("{daemon}_uptime_seconds")),
            cpu: metrics::counter!("process_cpu_seconds_total"),
            rss: metrics::gauge!("process_resident_memory_bytes"),
            fds: metrics::gauge!("process_open_fds"),
            start_time,
            threads: metrics::gauge!("process_threads"),
            attached: metrics::gauge!(format!("{daemon}_debug_sessions")),
            lines_dropped: metrics::counter!(format!("{daemon}_debug_lines_dropped_total")),
            lines_dropped_seen: 0,
            clk_tck: if clk_tck > 0 { clk_tck as f64 } else { 100.0 },
            page_size: if page_size > 0 {
                page_size as f64
            } else {
                4096.0
            },
        }
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn refresh(&mut self, hub: &crate::logging::LogHub) {
        let _ = &self.start_time;
        self.uptime.set(self.started.elapsed().as_secs_f64());
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name; utime/stime are fields 14/15,
            // num_threads 20, rss 24 (1-based, see proc(5)).
            if let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
                if let (Some(ut), Some(st)) = (num(11), num(12)) {
                    // The `metrics` facade's counters are integers: whole CPU seconds.
                    self.cpu.absolute(((ut + st) / self.clk_tck) as u64);
                }
                if let Some(t) = num(17) {
                    self.threads.set(t);
                }
                if let Some(rss) = num(21) {
                    self.rss.set(rss * self.page_size);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(rd.count() as f64);
        }
        self.attached.set(hub.attached() as f64);
        let dropped = hub.dropped_lines();
        if dropped > self.lines_dropped_seen {
            self.lines_dropped
                .increment(dropped - self.lines_dropped_seen);
            self.lines_dropped_seen = dropped;
        }
    }
}
