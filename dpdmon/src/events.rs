//! dpdmon's own subscription to bus *events* of espd and ikemgr.
//!
//! The daemon shell follows other daemons' published *state* and calls `on_replica`; bus
//! events (`esp.activity`, `ike.activity`, `ike.probe`) never reach the store, so the shell
//! drops them. Until the shell forwards events itself, dpdmon opens a second
//! [`BusSubscriber`] to espd and ikemgr in a task spawned when the logic is built, keeps
//! only the bodies it needs, and hands them over through a bounded channel that the logic
//! drains on every tick and replica change ([`EventFeed::drain`]).

use std::path::PathBuf;
use std::time::Duration;

use bus_schema::{Body, BusSubscriber, DaemonKind};
use tokio::sync::mpsc;

/// Events buffered between two drains; the subscriber task waits when it is full.
const QUEUE: usize = 4096;

/// The receiving end of the event task.
pub struct EventFeed {
    rx: mpsc::Receiver<Body>,
}

/// Whether dpdmon needs this body.
fn wanted(body: &Body) -> bool {
    matches!(
        body,
        Body::EspActivity { .. } | Body::IkeActivity { .. } | Body::ProbeResult { .. }
    )
}

impl EventFeed {
    /// Spawns the subscriber task on the current tokio runtime. `None` outside a runtime
    /// (unit tests build the logic without one).
    pub fn spawn(run_dir: PathBuf) -> Option<EventFeed> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        handle.spawn(async move {
            let mut sub = loop {
                match BusSubscriber::connect(&run_dir, &[DaemonKind::Espd, DaemonKind::Ikemgr])
                    .await
                {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!("event subscription failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            loop {
                match sub.recv().await {
                    Ok(env) if wanted(&env.body) => {
                        if tx.send(env.body).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(bus_schema::BusError::Closed) => {
                        tracing::warn!("event subscription closed");
                        return;
                    }
                    Err(e) => tracing::debug!("bus event dropped: {e}"),
                }
            }
        });
        Some(EventFeed { rx })
    }

    /// Everything received since the last call.
    pub fn drain(&mut self) -> Vec<Body> {
        let mut v = Vec::new();
        while let Ok(b) = self.rx.try_recv() {
            v.push(b);
        }
        v
    }
}
