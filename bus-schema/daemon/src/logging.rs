//! Logging with a runtime-adjustable level and live debug attach.
//!
//! Every daemon logs through `tracing`. [`LogHub`] is a `tracing_subscriber` layer that
//! formats each event once into a FortiOS-style debug line (`ike 0:vpn1_1: sent …`) and
//! hands it to two sinks: stderr when the event passes the daemon's own level, and every
//! attached debug session (`vpnctl debug attach`) whose level it passes. The effective
//! level is the most verbose of the two, so the daemon only formats debug lines while
//! someone is attached at that level. Attach sinks are bounded queues: a slow reader loses
//! lines (counted) rather than slowing the daemon.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Log verbosity, ordered from quietest to most verbose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum LogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl LogLevel {
    /// Parses a level name (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a FortiOS
    /// debug level number (`-1` is everything, `0` is off, 1..=255 scale from error to trace).
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let level = match lower.as_str() {
            "off" | "none" | "0" => LogLevel::Off,
            "error" | "err" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" | "all" | "-1" => LogLevel::Trace,
            other => match other.parse::<i32>() {
                Ok(n) if n < 0 => LogLevel::Trace,
                Ok(n) if n <= 1 => LogLevel::Error,
                Ok(n) if n <= 7 => LogLevel::Info,
                Ok(n) if n <= 63 => LogLevel::Debug,
                Ok(_) => LogLevel::Trace,
                Err(_) => {
                    return Err(format!(
                        "invalid log level {s:?}: expected off, error, warn, info, debug, trace or a FortiOS level number (-1 for all)"
                    ))
                }
            },
        };
        Ok(level)
    }

    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => LogLevel::Off,
            1 => LogLevel::Error,
            2 => LogLevel::Warn,
            3 => LogLevel::Info,
            4 => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }

    fn of(level: &Level) -> Self {
        match *level {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            Level::TRACE => LogLevel::Trace,
        }
    }
}

/// One formatted debug line as delivered to attached sessions.
#[derive(Clone, Debug)]
pub struct DebugLine {
    pub ts_ns: u64,
    pub level: LogLevel,
    pub line: String,
}

struct Attachment {
    id: u64,
    level: LogLevel,
    tx: mpsc::Sender<DebugLine>,
}

/// Shared logging state: the daemon's own level and the attached debug sessions.
pub struct LogHub {
    app: &'static str,
    base: AtomicU8,
    effective: AtomicU8,
    attachments: Mutex<Vec<Attachment>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl LogHub {
    pub fn new(app: &'static str, base: LogLevel) -> Arc<Self> {
        Arc::new(LogHub {
            app,
            base: AtomicU8::new(base as u8),
            effective: AtomicU8::new(base as u8),
            attachments: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn base_level(&self) -> LogLevel {
        LogLevel::from_u8(self.base.load(Ordering::Relaxed))
    }

    pub fn set_base_level(&self, level: LogLevel) {
        self.base.store(level as u8, Ordering::Relaxed);
        self.recompute();
    }

    /// Lines lost because an attached reader was too slow.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Number of debug sessions attached right now.
    pub fn attached(&self) -> usize {
        self.lock().len()
    }

    /// Registers a debug session; the daemon's effective level rises to `level` until
    /// [`LogHub::detach`] is called with the returned id.
    pub fn attach(&self, level: LogLevel, queue: usize) -> (u64, mpsc::Receiver<DebugLine>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Attachment { id, level, tx });
        self.recompute();
        (id, rx)
    }

    pub fn detach(&self, id: u64) {
        self.lock().retain(|a| a.id != id);
        self.recompute();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Attachment>> {
        // A poisoned lock only means another thread panicked while logging; the
        // attachment list itself is still consistent (push/retain are atomic from our view).
        self.attachments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn recompute(&self) {
        let base = self.base.load(Ordering::Relaxed);
        let max_attached = self.lock().iter().map(|a| a.level as u8).max().unwrap_or(0);
        self.effective
            .store(base.max(max_attached), Ordering::Relaxed);
    }

    fn would_log(&self, level: LogLevel) -> bool {
        level as u8 <= self.effective.load(Ordering::Relaxed)
    }

    fn deliver(&self, level: LogLevel, line: String) {
        let ts_ns = crate::now_ns();
        if level as u8 <= self.base.load(Ordering::Relaxed) {
            // Not eprintln!: it panics when stderr is gone (a supervisor or a test harness
            // that died), and a daemon must outlive its log reader.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "{} {} {}",
                utc_stamp(ts_ns),
                level.name(),
                line
            );
        }
        let mut list = self.lock();
        list.retain(|a| !a.tx.is_closed());
        for a in list.iter() {
            if level <= a.level {
                let msg = DebugLine {
                    ts_ns,
                    level,
                    line: line.clone(),
                };
                if a.tx.try_send(msg).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `ts_ns` (nanoseconds since the Unix epoch) as an RFC 3339 UTC time with milliseconds,
/// `2026-11-24T00:13:30.123Z`: the prefix of every line a daemon writes to stderr, so that
/// the logs of several daemons and members can be put in one order.
pub fn utc_stamp(ts_ns: u64) -> String {
    let ms = (ts_ns / 1_000_000) % 1000;
    let secs = ts_ns / 1_000_000_000;
    let (days, sod) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_date(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01, counted in
/// 400-year eras of 146 097 days that start on March 1st (so the leap day ends a year).
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719 468 after 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The `tracing` layer side of a [`LogHub`].
pub struct HubLayer(pub Arc<LogHub>);

#[derive(Default)]
struct LineVisitor {
    message: String,
    tunnel: Option<String>,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "tunnel" => self.tunnel = Some(value.to_string()),
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "tunnel" => self.tunnel = Some(format!("{value:?}").trim_matches('"').to_string()),
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for HubLayer {
    fn register_callsite(
        &self,
        _metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // The level changes at run time (attach/detach): never let a callsite cache a
        // verdict; `enabled` is one atomic load.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        self.0.would_log(LogLevel::of(metadata.level()))
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = LogLevel::of(event.metadata().level());
        if !self.0.would_log(level) {
            return;
        }
        let mut v = LineVisitor::default();
        event.record(&mut v);
        // FortiOS debug style: "<app> <vdom>:<tunnel>: <message>". A message that already
        // starts with "<app> " was written whole in that style by the daemon.
        let app = self.0.app;
        let whole = v
            .message
            .strip_prefix(app)
            .is_some_and(|rest| rest.starts_with(' '));
        let line = match v.tunnel {
            _ if whole => format!("{}{}", v.message, v.fields),
            Some(t) => format!("{app} 0:{t}: {}{}", v.message, v.fields),
            None => format!("{app} 0: {}{}", v.message, v.fields),
        };
        self.0.deliver(level, line);
    }
}

/// Installs the hub as the global `tracing` subscriber. Returns false if one was already set.
pub fn install(hub: Arc<LogHub>) -> bool {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(HubLayer(hub));
    tracing::subscriber::set_global_default(subscriber).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_fortios_numbers() {
        assert_eq!(LogLevel::parse("-1").unwrap(), LogLevel::Trace);
        assert_eq!(LogLevel::parse("debug").unwrap(), LogLevel::Debug);
        assert_eq!(LogLevel::parse("0").unwrap(), LogLevel::Off);
        assert_eq!(LogLevel::parse("255").unwrap(), LogLevel::Trace);
        assert!(LogLevel::parse("loud").is_err());
    }

    #[test]
    fn stderr_lines_are_stamped_in_utc() {
        assert_eq!(utc_stamp(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century year divisible by 400), 23:59:59.999.
        assert_eq!(
            utc_stamp(951_868_799_999_000_000),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            utc_stamp(951_868_800_000_000_000),
            "2000-03-01T00:00:00.000Z"
        );
        // 2100 is not a leap year.
        assert_eq!(
            utc_stamp(4_107_542_400_000_000_000),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            utc_stamp(1_795_479_210_123_456_789),
            "2026-11-24T00:13:30.123Z"
        );
    }

    #[test]
    fn attach_raises_and_detach_restores_level() {
        let hub = LogHub::new("ike", LogLevel::Info);
        assert!(!hub.would_log(LogLevel::Debug));
        let (id, mut rx) = hub.attach(LogLevel::Trace, 4);
        assert!(hub.would_log(LogLevel::Trace));
        hub.deliver(LogLevel::Debug, "ike 0: hello".into());
        assert_eq!(rx.try_recv().unwrap().line, "ike 0: hello");
        hub.detach(id);
        assert!(!hub.would_log(LogLevel::Debug));
        assert_eq!(hub.attached(), 0);
    }

    #[test]
    fn lines_get_the_seed_prefix_once() {
        use tracing_subscriber::layer::SubscriberExt;
        let hub = LogHub::new("ike", LogLevel::Off);
        let (_id, mut rx) = hub.attach(LogLevel::Debug, 8);
        let sub = tracing_subscriber::registry().with(HubLayer(hub.clone()));
        tracing::subscriber::with_default(sub, || {
            tracing::info!("comes 192.0.2.1:500->192.0.2.2:500");
            tracing::info!(tunnel = "vpn1_1", "sent IKE msg");
            tracing::info!("ike 0:vpn1_2:171: send IKEv2 DPD probe, seqno 114");
        });
        let lines: Vec<String> =
            std::iter::from_fn(|| rx.try_recv().ok().map(|l| l.line)).collect();
        assert_eq!(
            lines,
            [
                "ike 0: comes 192.0.2.1:500->192.0.2.2:500",
                "ike 0:vpn1_1: sent IKE msg",
                "ike 0:vpn1_2:171: send IKEv2 DPD probe, seqno 114",
            ]
        );
    }

    #[test]
    fn slow_reader_loses_lines_not_the_daemon() {
        let hub = LogHub::new("esp", LogLevel::Off);
        let (_id, _rx) = hub.attach(LogLevel::Trace, 2);
        for i in 0..10 {
            hub.deliver(LogLevel::Debug, format!("line {i}"));
        }
        assert_eq!(hub.dropped_lines(), 8);
    }
}
