//! The FGCP and FGSP heartbeats, kept flowing while the daemon's tick is late.
//!
//! The daemon's actor sends this member's heartbeats from its tick. A tick held up by long
//! work (a whole-store replica rebuilt, a thousand tunnels claimed back, a snapshot applied)
//! on a loaded machine used to hold the heartbeats too: past the loss time (`hb-interval` x
//! `hb-lost-threshold`, 600 ms in the lab) the partner declared this member lost, took every
//! tunnel, and the claims back made the next tick longer still (the 1 000-tunnel soak
//! flapped). The pump is a thread of its own: when no heartbeat went out for one and a half
//! intervals it sends the last one the election built (its uptime moved on), sealed on the same link
//! (the link's counter and the peers' replay windows are shared with every other message,
//! hence the mutex). It does so only while the tick ran within [`WATCHDOG_MS`]: a wedged
//! daemon stops heartbeating and is declared lost as before, just later. On FGSP the same
//! stall made the peer cluster declare this one dead and take every tunnel over (OwnerDead)
//! while the soak's 1 000 tunnels were torn down.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ha_core::link::LinkStats;
use ha_core::msg::{Heartbeat, Message};
use ha_core::{DropReason, HaLink, Received};

/// The pump sends for a tick at most this late; after that the member falls silent.
pub const WATCHDOG_MS: u64 = 5_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An HA link shared by the actor and the pump.
#[derive(Clone)]
pub struct SharedLink(Arc<Mutex<HaLink>>);

impl SharedLink {
    pub fn new(link: HaLink) -> SharedLink {
        SharedLink(Arc::new(Mutex::new(link)))
    }

    /// Puts `link` in place of the current one (a new epoch).
    pub fn replace(&self, link: HaLink) {
        *lock(&self.0) = link;
    }

    pub fn seal(&self, msg: &Message) -> ha_core::Result<Vec<u8>> {
        lock(&self.0).seal(msg)
    }

    pub fn seal_for_one(&self, msg: &Message) -> ha_core::Result<Vec<u8>> {
        lock(&self.0).seal_for_one(msg)
    }

    pub fn open(&self, datagram: &[u8]) -> Result<Received, DropReason> {
        lock(&self.0).open(datagram)
    }

    pub fn stats(&self) -> LinkStats {
        lock(&self.0).stats().clone()
    }

    pub fn epoch(&self) -> u64 {
        lock(&self.0).epoch()
    }

    /// The counter the next sealed message carries (a pump heartbeat may take it first:
    /// heartbeats hold no state, so a snapshot's `as_of` stays correct).
    pub fn next_counter(&self) -> u64 {
        lock(&self.0).next_counter()
    }
}

#[derive(Default)]
struct State {
    /// The last heartbeat the election built, and when (ms).
    last: Option<(Heartbeat, u64)>,
    /// When the tick last ran (ms).
    tick_ms: u64,
    /// When a heartbeat last went out, from either side (ms).
    sent_ms: u64,
    /// The heartbeat interval (ms), as the tick last said (a reload changes it in place).
    interval_ms: u64,
}

/// The heartbeat thread of one link; stopped and joined on drop.
pub struct HeartbeatPump {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the pump sends with: the link and its name (`fgcp`, `fgsp`: the metrics' label), a
/// handle on the heartbeat socket, the destinations (the FGCP broadcast; every FGSP
/// cluster-peer), the clock (ms; the daemon's wall clock, shared with the tick) and what to
/// count a send with.
pub struct PumpIo {
    pub link: SharedLink,
    pub name: &'static str,
    pub sock: UdpSocket,
    pub dests: Vec<SocketAddr>,
    pub now_ms: fn() -> u64,
    pub sent: fn(&'static str, usize),
}

impl HeartbeatPump {
    /// Starts the thread (idle until the first [`HeartbeatPump::tick`] with a heartbeat).
    pub fn start(io: PumpIo) -> std::io::Result<HeartbeatPump> {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("hasyncd-heartbeat".into())
                .spawn(move || run(io, &state, &stop))?
        };
        Ok(HeartbeatPump {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// This member does not heartbeat on the link any more (an FGSP member that no longer
    /// speaks for its cluster): the pump stays quiet until the next heartbeat.
    pub fn silence(&self) {
        lock(&self.state).last = None;
    }

    /// The tick ran at `now_ms`, heartbeats go every `interval_ms`, and the election built
    /// `hb` (None: none due). Returns whether the tick sends it itself: it is due (none
    /// went out for an interval) or it says something new (role, primary, priority,
    /// monitored links).
    pub fn tick(&self, now_ms: u64, interval_ms: u64, hb: Option<&Heartbeat>) -> bool {
        let mut st = lock(&self.state);
        st.tick_ms = now_ms;
        st.interval_ms = interval_ms.max(1);
        let Some(hb) = hb else {
            return false;
        };
        let news = st.last.as_ref().is_none_or(|(old, _)| {
            (
                old.role,
                old.primary,
                old.priority,
                old.monitor_up,
                old.monitor_total,
            ) != (
                hb.role,
                hb.primary,
                hb.priority,
                hb.monitor_up,
                hb.monitor_total,
            )
        });
        st.last = Some((hb.clone(), now_ms));
        let due = now_ms.saturating_sub(st.sent_ms) >= st.interval_ms;
        if news || due {
            st.sent_ms = now_ms;
        }
        news || due
    }
}

impl Drop for HeartbeatPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(io: PumpIo, state: &Mutex<State>, stop: &AtomicBool) {
    let mut nap = Duration::from_millis(50);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(nap);
        let now = (io.now_ms)();
        let hb = {
            let mut st = lock(state);
            // Four checks per interval: a late tick costs at most a quarter interval more.
            nap = Duration::from_millis((st.interval_ms / 4).clamp(1, 250));
            // Late by half an interval: the tick's own heartbeat, due at the interval,
            // normally goes first (and the counter below means a late tick).
            let late = now.saturating_sub(st.sent_ms) >= st.interval_ms + st.interval_ms / 2;
            let alive = now.saturating_sub(st.tick_ms) <= WATCHDOG_MS;
            match (&st.last, late && alive) {
                (Some((hb, built_ms)), true) => {
                    let mut hb = hb.clone();
                    hb.uptime_ms = hb.uptime_ms.saturating_add(now.saturating_sub(*built_ms));
                    st.sent_ms = now;
                    Some(hb)
                }
                _ => None,
            }
        };
        let Some(hb) = hb else { continue };
        let d = match io.link.seal(&Message::Heartbeat(hb)) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{} heartbeat (late tick) seal: {e}", io.name);
                continue;
            }
        };
        for to in &io.dests {
            match io.sock.send_to(&d, to) {
                Ok(_) => {
                    (io.sent)(io.name, d.len());
                    metrics::counter!("hasyncd_heartbeats_late_tick_total", "link" => io.name)
                        .increment(1);
                }
                Err(e) => tracing::debug!("{} heartbeat (late tick) to {to}: {e}", io.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_core::link::{ClusterKind, LinkKey};
    use ha_core::msg::HaRole;
    use ha_core::wire::MemberId;
    use std::sync::atomic::AtomicU64;

    static CLOCK: AtomicU64 = AtomicU64::new(1_000_000);

    fn now() -> u64 {
        CLOCK.load(Ordering::Relaxed)
    }

    fn hb(role: HaRole) -> Heartbeat {
        Heartbeat {
            member: MemberId(7),
            serial: "HVN000000000007".into(),
            priority: 128,
            override_: false,
            uptime_ms: 5_000,
            monitor_up: 0,
            monitor_total: 0,
            role,
            primary: Some(MemberId(7)),
            fgsp_epoch: 0,
            fgsp_peers: Vec::new(),
        }
    }

    /// Heartbeats that reach `rx` within `wait`, opened with a peer's link.
    fn heard(rx: &UdpSocket, peer: &mut HaLink, wait: Duration) -> Vec<Heartbeat> {
        rx.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let end = std::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < end {
            if let Ok(n) = rx.recv(&mut buf) {
                if let Ok(Received {
                    message: Message::Heartbeat(h),
                    ..
                }) = peer.open(&buf[..n])
                {
                    out.push(h);
                }
            }
        }
        out
    }

    #[test]
    fn a_late_tick_is_covered_and_a_wedged_one_falls_silent() {
        let key = LinkKey::derive(ClusterKind::Fgcp, 1, Some(b"pump-test"), 1).unwrap();
        let link = SharedLink::new(HaLink::new(key.clone(), MemberId(7), 1).unwrap());
        let mut peer = HaLink::new(key, MemberId(8), 1).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let io = PumpIo {
            link,
            name: "fgcp",
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
            dests: vec![rx.local_addr().unwrap()],
            now_ms: now,
            sent: |_, _| {},
        };
        let pump = HeartbeatPump::start(io).unwrap();
        // The tick sends its first heartbeat itself (news), then falls behind.
        assert!(pump.tick(now(), 20, Some(&hb(HaRole::Primary))));
        assert!(
            !pump.tick(now() + 5, 20, Some(&hb(HaRole::Primary))),
            "not due yet"
        );
        // The daemon's clock moves on 30 ms at a time while its tick stays stuck: the
        // pump covers it, with the uptime moving on, up to the watchdog.
        let mut got = Vec::new();
        for _ in 0..10 {
            CLOCK.fetch_add(30, Ordering::Relaxed);
            got.extend(heard(&rx, &mut peer, Duration::from_millis(40)));
        }
        assert!(
            got.len() >= 5,
            "only {} heartbeats from the pump",
            got.len()
        );
        assert!(got.iter().all(|h| h.role == HaRole::Primary));
        assert!(
            got.windows(2).all(|w| w[1].uptime_ms > w[0].uptime_ms),
            "{got:?}"
        );
        assert!(got.iter().all(|h| h.uptime_ms > 5_000));
        // A role change goes out from the tick at once, even within the interval.
        assert!(pump.tick(now(), 20, Some(&hb(HaRole::Secondary))));
        // Silenced (no longer speaking on the link): nothing, tick or not.
        pump.silence();
        let _ = heard(&rx, &mut peer, Duration::from_millis(60));
        for _ in 0..4 {
            CLOCK.fetch_add(30, Ordering::Relaxed);
            pump.tick(now(), 20, None);
            assert!(heard(&rx, &mut peer, Duration::from_millis(40)).is_empty());
        }
        assert!(
            pump.tick(now(), 20, Some(&hb(HaRole::Secondary))),
            "speaks again"
        );
        // Past the watchdog without a tick: silence.
        CLOCK.fetch_add(WATCHDOG_MS + 1, Ordering::Relaxed);
        let _ = heard(&rx, &mut peer, Duration::from_millis(60));
        let after = heard(&rx, &mut peer, Duration::from_millis(200));
        assert!(
            after.is_empty(),
            "a wedged daemon still heartbeats: {after:?}"
        );
        drop(pump);
    }
}
