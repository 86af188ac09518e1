//! Helpers shared by the ZeroMQ integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A unique run directory under /tmp, removed on drop (also when the test fails).
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/tmp/haven-bus-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            now_ns() % 1_000_000_007
        ));
        std::fs::create_dir_all(&p).expect("create run dir");
        RunDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Generous bound for a test step; tests never assert timings, this only stops a hung test.
pub const PATIENCE: Duration = Duration::from_secs(30);

use std::sync::{Arc, Mutex};

use bus_schema::*;
use tokio::task::JoinHandle;

/// An in-process stand-in for a daemon: an [`Owner`] behind a lock, its PUB socket, a control
/// socket answering `Snapshot`, and a heartbeat task.
pub struct FakeDaemon {
    pub kind: DaemonKind,
    pub owner: Arc<Mutex<Owner>>,
    pub publisher: BusPublisher,
    tasks: Vec<JoinHandle<()>>,
    ctl_stop: Option<tokio::sync::oneshot::Sender<()>>,
    ctl_task: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    pub async fn start(run: &Path, kind: DaemonKind, boot: u128, opts: PublisherOptions) -> Self {
        Self::start_with_heartbeat(run, kind, boot, opts, Duration::from_millis(100)).await
    }

    pub async fn start_with_heartbeat(
        run: &Path,
        kind: DaemonKind,
        boot: u128,
        opts: PublisherOptions,
        heartbeat: Duration,
    ) -> Self {
        let owner = Arc::new(Mutex::new(Owner::new(kind, boot)));
        let publisher = BusPublisher::bind_with(run, kind, opts)
            .await
            .expect("bind pub");
        let mut ctl = CtlServer::bind(run, kind).await.expect("bind ctl");
        let (ctl_stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ctl_owner = owner.clone();
        let ctl_task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = ctl.recv() => {
                        let Ok((peer, req)) = r else { break };
                        let reply = match req {
                            Ok(CtlRequest::Snapshot) => {
                                CtlReply::Snapshot(ctl_owner.lock().unwrap().snapshot())
                            }
                            Ok(_) => CtlReply::Error { message: "unsupported".into() },
                            Err(e) => CtlReply::Error { message: e.to_string() },
                        };
                        let _ = ctl.send(&peer, &reply).await;
                    }
                    _ = &mut stop_rx => break,
                }
            }
            ctl.close().await;
        });
        let hb_owner = owner.clone();
        let hb_pub = publisher.clone();
        let hb = tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tick.tick().await;
                let env = hb_owner
                    .lock()
                    .unwrap()
                    .stamp(Body::Heartbeat { uptime_ms: 0 }, now_ns());
                if hb_pub.publish(&env).is_err() {
                    break;
                }
            }
        });
        FakeDaemon {
            kind,
            owner,
            publisher,
            tasks: vec![hb],
            ctl_stop: Some(ctl_stop),
            ctl_task: Some(ctl_task),
        }
    }

    /// Stamp and publish under the owner's lock, so the queue order is the sequence order.
    pub fn publish(&self, body: Body) {
        let mut owner = self.owner.lock().unwrap();
        let env = owner.stamp(body, now_ns());
        self.publisher.publish(&env).expect("publish");
    }

    pub fn store(&self) -> StateStore {
        self.owner.lock().unwrap().store().clone()
    }

    /// Orderly stop: sockets closed and their files removed before this returns.
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = self.ctl_stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.ctl_task.take() {
            let _ = t.await;
        }
        self.publisher.clone().close().await;
    }
}

/// The subscriber side, driven like a daemon's follow loop: messages into the [`Follower`],
/// snapshot requests over the control socket in background tasks.
pub struct FollowDriver {
    pub sub: BusSubscriber,
    pub follower: Follower,
    run: PathBuf,
    snaps_tx: tokio::sync::mpsc::UnboundedSender<Snapshot>,
    snaps_rx: tokio::sync::mpsc::UnboundedReceiver<Snapshot>,
    pub decode_errors: u64,
}

impl FollowDriver {
    pub async fn new(run: &Path, src: DaemonKind, opts: SubscriberOptions) -> Self {
        let sub = BusSubscriber::connect_with(run, &[src], opts)
            .await
            .expect("subscribe");
        let (snaps_tx, snaps_rx) = tokio::sync::mpsc::unbounded_channel();
        FollowDriver {
            sub,
            follower: Follower::new(src),
            run: run.to_owned(),
            snaps_tx,
            snaps_rx,
            decode_errors: 0,
        }
    }

    /// Run until `done(follower)` holds, or [`PATIENCE`] passes (then false).
    pub async fn run_until(&mut self, mut done: impl FnMut(&Follower) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                m = self.sub.recv() => match m {
                    Ok(env) => { self.follower.handle_update(env, now_ns()); }
                    Err(BusError::Decode(_)) | Err(BusError::WrongSource { .. }) => self.decode_errors += 1,
                    Err(e) => panic!("subscriber failed: {e}"),
                },
                Some(snap) = self.snaps_rx.recv() => { self.follower.handle_snapshot(snap, now_ns()); }
                _ = tick.tick() => {
                    if self.follower.poll_snapshot_request(now_ns()) {
                        let tx = self.snaps_tx.clone();
                        let run = self.run.clone();
                        let src = self.follower.src();
                        tokio::spawn(async move {
                            if let Ok(s) = request_snapshot(&run, src, Duration::from_secs(1)).await {
                                let _ = tx.send(s);
                            }
                        });
                    }
                }
            }
            if done(&self.follower) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Run until synced with exactly `target`'s current store.
    pub async fn converge_to(&mut self, target: &FakeDaemon) -> bool {
        let owner = target.owner.clone();
        let boot = owner.lock().unwrap().boot();
        self.run_until(|f| {
            let o = owner.lock().unwrap();
            f.synced() && f.boot() == Some(boot) && f.store() == o.store()
        })
        .await
    }
}
