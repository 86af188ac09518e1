//! ZeroMQ transport over `ipc://<run-dir>/…` with the `zeromq` crate (DESIGN §3.1).
//!
//! This is the only module that touches sockets or tokio. See the crate documentation for the
//! high-water-mark and reconnect behaviour.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{
    DealerSocket, PubSocket, RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv,
    SocketSend, SubSocket, ZmqError, ZmqMessage,
};

use crate::codec::{
    decode_frames, decode_reply, decode_request, encode, encode_reply, encode_request, DecodeError,
};
use crate::ctl::{CtlReply, CtlRequest};
use crate::schema::{DaemonKind, Envelope};

/// Transport errors. `Decode` is a counted drop, not a failure of the socket.
#[derive(Debug, Error)]
pub enum BusError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("message from {got} on {expected}'s bus socket")]
    WrongSource {
        expected: DaemonKind,
        got: DaemonKind,
    },
    #[error("cannot prepare {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is in use by a running process", path.display())]
    InUse { path: PathBuf },
    #[error("{kind} is not running (nothing listening on {})", path.display())]
    NotRunning { kind: DaemonKind, path: PathBuf },
    #[error("zeromq error on {endpoint}: {source}")]
    Zmq { endpoint: String, source: ZmqError },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the socket task has stopped")]
    Closed,
    #[error("unexpected control reply: {0}")]
    UnexpectedReply(&'static str),
}

impl BusError {
    /// True for a dropped message (bad frame, wrong source): count it and keep going. False
    /// for a problem with the socket or the call itself.
    pub fn is_message_drop(&self) -> bool {
        matches!(self, BusError::Decode(_) | BusError::WrongSource { .. })
    }
}

fn zmq_err(endpoint: &str) -> impl FnOnce(ZmqError) -> BusError + '_ {
    move |source| BusError::Zmq {
        endpoint: endpoint.to_owned(),
        source,
    }
}

/// `<run>/bus/<kind>.pub`
pub fn pub_path(run_dir: &Path, kind: DaemonKind) -> PathBuf {
    run_dir.join("bus").join(format!("{}.pub", kind.name()))
}

/// `<run>/ctl/<kind>.sock`
pub fn ctl_path(run_dir: &Path, kind: DaemonKind) -> PathBuf {
    run_dir.join("ctl").join(format!("{}.sock", kind.name()))
}

/// `ipc://<run>/bus/<kind>.pub`
pub fn pub_endpoint(run_dir: &Path, kind: DaemonKind) -> String {
    format!("ipc://{}", pub_path(run_dir, kind).display())
}

/// `ipc://<run>/ctl/<kind>.sock`
pub fn ctl_endpoint(run_dir: &Path, kind: DaemonKind) -> String {
    format!("ipc://{}", ctl_path(run_dir, kind).display())
}

/// Create the socket's directory 0700 (and its parents), and clear a stale socket file left
/// by a killed process. A socket file someone still listens on is [`BusError::InUse`].
fn prepare_socket_path(path: &Path) -> Result<(), BusError> {
    let io_err = |source| BusError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(e)),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BusError::InUse {
                    path: path.to_owned(),
                });
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(e)),
                _ => Ok(()),
            }
        }
    }
}

/// Publisher tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherOptions {
    /// High-water mark: messages queued between [`BusPublisher::send`] and the socket. When
    /// full, new messages are dropped and counted ([`PublisherStats::dropped_hwm`]), as a
    /// ZeroMQ PUB socket does at its `ZMQ_SNDHWM`.
    pub hwm: usize,
}

/// Default publisher high-water mark.
pub const DEFAULT_HWM: usize = 10_000;

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions { hwm: DEFAULT_HWM }
    }
}

#[derive(Debug, Default)]
struct PubCounters {
    sent: AtomicU64,
    dropped_hwm: AtomicU64,
}

/// Publisher counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Messages handed to the socket.
    pub sent: u64,
    /// Messages dropped at the high-water mark.
    pub dropped_hwm: u64,
}

/// A daemon's PUB socket at [`pub_endpoint`]. Cheap to clone; the socket closes when the last
/// clone is dropped (or on [`BusPublisher::close`], which also waits for the socket file to be
/// removed).
#[derive(Clone)]
pub struct BusPublisher {
    tx: mpsc::Sender<ZmqMessage>,
    counters: Arc<PubCounters>,
    endpoint: Arc<str>,
    shutdown: Arc<std::sync::Mutex<Option<PubShutdown>>>,
}

struct PubShutdown {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl BusPublisher {
    pub async fn bind(run_dir: &Path, kind: DaemonKind) -> Result<Self, BusError> {
        Self::bind_with(run_dir, kind, PublisherOptions::default()).await
    }

    pub async fn bind_with(
        run_dir: &Path,
        kind: DaemonKind,
        opts: PublisherOptions,
    ) -> Result<Self, BusError> {
        prepare_socket_path(&pub_path(run_dir, kind))?;
        let endpoint = pub_endpoint(run_dir, kind);
        let mut sock = PubSocket::new();
        sock.bind(&endpoint).await.map_err(zmq_err(&endpoint))?;
        let (tx, mut rx) = mpsc::channel::<ZmqMessage>(opts.hwm.max(1));
        let counters = Arc::new(PubCounters::default());
        let task_counters = counters.clone();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    msg = rx.recv() => match msg {
                        Some(msg) => {
                            if sock.send(msg).await.is_ok() {
                                task_counters.sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => break,
                    },
                    _ = &mut stop_rx => {
                        while let Ok(msg) = rx.try_recv() {
                            if sock.send(msg).await.is_ok() {
                                task_counters.sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        break;
                    }
                }
            }
            // Unbind and wait, so the socket file is gone when the task ends.
            let _ = sock.close().await;
        });
        Ok(BusPublisher {
            tx,
            counters,
            endpoint: endpoint.into(),
            shutdown: Arc::new(std::sync::Mutex::new(Some(PubShutdown { stop, task }))),
        })
    }

    /// Publish `[topic, msgpack]` without waiting. Dropped and counted at the high-water mark.
    pub fn publish(&self, env: &Envelope) -> Result<(), BusError> {
        let mut msg = ZmqMessage::from(Bytes::from_static(env.body.topic().as_bytes()));
        msg.push_back(Bytes::from(encode(env)));
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.dropped_hwm.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BusError::Closed),
        }
    }

    /// Same as [`BusPublisher::publish`]; async for symmetry with the other sockets.
    pub async fn send(&mut self, env: &Envelope) -> Result<(), BusError> {
        self.publish(env)
    }

    pub fn stats(&self) -> PublisherStats {
        PublisherStats {
            sent: self.counters.sent.load(Ordering::Relaxed),
            dropped_hwm: self.counters.dropped_hwm.load(Ordering::Relaxed),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Flush queued messages to the socket, close it and remove its file. Other clones
    /// become [`BusError::Closed`] when they publish.
    pub async fn close(self) {
        let shutdown = self.shutdown.lock().ok().and_then(|mut s| s.take());
        if let Some(PubShutdown { stop, task }) = shutdown {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

/// Subscriber tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// Decoded messages queued for [`BusSubscriber::recv`]. When full, the socket is not read
    /// (back-pressure to the publisher, whose own queue then drops).
    pub queue: usize,
    /// Reconnect when a publisher has sent nothing for this long. Publishers send a heartbeat
    /// every second, so the default of 3 s means three missed heartbeats.
    pub silence_timeout: Option<Duration>,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// First pause between connection attempts; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            queue: 10_000,
            silence_timeout: Some(Duration::from_secs(3)),
            connect_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Default)]
struct SubCounters {
    received: AtomicU64,
    decode_errors: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    silence_reconnects: AtomicU64,
}

/// Subscriber counters (all publishers together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    pub received: u64,
    pub decode_errors: u64,
    /// Successful connections (the first one included).
    pub connects: u64,
    /// Connections lost (peer closed).
    pub disconnects: u64,
    /// Connections dropped and remade after `silence_timeout`.
    pub silence_reconnects: u64,
}

/// SUB sockets to one or more publishers, each with its own connection task that survives the
/// publisher not existing yet and the publisher restarting.
pub struct BusSubscriber {
    rx: mpsc::Receiver<Result<Envelope, BusError>>,
    counters: Arc<SubCounters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for BusSubscriber {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl BusSubscriber {
    /// Start following `srcs`. Returns at once; connections are made in the background.
    pub async fn connect(run_dir: &Path, srcs: &[DaemonKind]) -> Result<Self, BusError> {
        Self::connect_with(run_dir, srcs, SubscriberOptions::default()).await
    }

    pub async fn connect_with(
        run_dir: &Path,
        srcs: &[DaemonKind],
        opts: SubscriberOptions,
    ) -> Result<Self, BusError> {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let counters = Arc::new(SubCounters::default());
        let tasks = srcs
            .iter()
            .map(|&src| {
                tokio::spawn(follow_publisher(
                    pub_endpoint(run_dir, src),
                    src,
                    opts,
                    tx.clone(),
                    counters.clone(),
                ))
            })
            .collect();
        Ok(BusSubscriber {
            rx,
            counters,
            tasks,
        })
    }

    /// Next message from any followed publisher. `Err(BusError::Decode)` and
    /// `Err(BusError::WrongSource)` are dropped messages (count and continue); other errors
    /// mean the subscriber is unusable. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Envelope, BusError> {
        self.rx.recv().await.unwrap_or(Err(BusError::Closed))
    }

    pub fn stats(&self) -> SubscriberStats {
        let c = &self.counters;
        SubscriberStats {
            received: c.received.load(Ordering::Relaxed),
            decode_errors: c.decode_errors.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            disconnects: c.disconnects.load(Ordering::Relaxed),
            silence_reconnects: c.silence_reconnects.load(Ordering::Relaxed),
        }
    }
}

fn decode_message(msg: ZmqMessage, src: DaemonKind) -> Result<Envelope, BusError> {
    let frames = msg.into_vec();
    let (Some(topic), Some(payload), 2) = (frames.first(), frames.get(1), frames.len()) else {
        return Err(DecodeError::FrameCount {
            expected: 2,
            got: frames.len(),
        }
        .into());
    };
    let env = decode_frames(topic, payload)?;
    if env.src != src {
        return Err(BusError::WrongSource {
            expected: src,
            got: env.src,
        });
    }
    Ok(env)
}

/// One publisher's connection loop: connect (retrying with bounded backoff), read until the
/// peer disconnects or falls silent, then start over with a fresh socket.
async fn follow_publisher(
    endpoint: String,
    src: DaemonKind,
    opts: SubscriberOptions,
    tx: mpsc::Sender<Result<Envelope, BusError>>,
    counters: Arc<SubCounters>,
) {
    let mut backoff = opts.reconnect_min;
    loop {
        let mut sock = SubSocket::new();
        let mut events = sock.monitor();
        let connected = async {
            sock.subscribe("").await?;
            sock.connect(&endpoint).await
        };
        match tokio::time::timeout(opts.connect_timeout, connected).await {
            Ok(Ok(())) => {
                counters.connects.fetch_add(1, Ordering::Relaxed);
                backoff = opts.reconnect_min;
            }
            Ok(Err(_)) | Err(_) => {
                drop(sock);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.reconnect_max);
                continue;
            }
        }
        loop {
            let silence = async {
                match opts.silence_timeout {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = sock.recv() => match msg {
                    Ok(msg) => {
                        counters.received.fetch_add(1, Ordering::Relaxed);
                        let item = decode_message(msg, src);
                        if item.is_err() {
                            counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                ev = futures::StreamExt::next(&mut events) => {
                    if let Some(SocketEvent::Disconnected(_)) | None = ev {
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                _ = silence => {
                    counters.silence_reconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(sock);
        tokio::time::sleep(opts.reconnect_min).await;
    }
}

/// Identity of a control client, as seen by [`CtlServer`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerId {
    id: Bytes,
    /// The client sent an empty delimiter frame (REQ-style); replies carry one too.
    delimited: bool,
}

impl PeerId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.id
    }
}

/// Bound on sending one control message.
pub const CTL_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on connecting a control client.
pub const CTL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A daemon's ROUTER control socket at [`ctl_endpoint`].
pub struct CtlServer {
    sock: RouterSocket,
    endpoint: String,
}

impl CtlServer {
    pub async fn bind(run_dir: &Path, kind: DaemonKind) -> Result<Self, BusError> {
        prepare_socket_path(&ctl_path(run_dir, kind))?;
        let endpoint = ctl_endpoint(run_dir, kind);
        let mut sock = RouterSocket::new();
        sock.bind(&endpoint).await.map_err(zmq_err(&endpoint))?;
        Ok(CtlServer { sock, endpoint })
    }

    /// Next request. An undecodable request is `Ok((peer, Err(_)))`: answer it with
    /// [`CtlReply::Error`] and count it. Errors of one client's connection are skipped.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<(PeerId, Result<CtlRequest, DecodeError>), BusError> {
        loop {
            let msg = match self.sock.recv().await {
                Ok(m) => m,
                Err(ZmqError::NoMessage) => return Err(BusError::Closed),
                Err(_) => continue,
            };
            let mut frames = msg.into_vec().into_iter();
            let Some(id) = frames.next() else { continue };
            let rest: Vec<Bytes> = frames.collect();
            let (delimited, payload) = match rest.as_slice() {
                [payload] => (false, payload),
                [empty, payload] if empty.is_empty() => (true, payload),
                _ => {
                    let got = rest.len();
                    return Ok((
                        PeerId {
                            id,
                            delimited: false,
                        },
                        Err(DecodeError::FrameCount { expected: 1, got }),
                    ));
                }
            };
            let req = decode_request(payload);
            return Ok((PeerId { id, delimited }, req));
        }
    }

    pub async fn send(&mut self, peer: &PeerId, reply: &CtlReply) -> Result<(), BusError> {
        let mut msg = ZmqMessage::from(peer.id.clone());
        if peer.delimited {
            msg.push_back(Bytes::new());
        }
        msg.push_back(Bytes::from(encode_reply(reply)));
        match tokio::time::timeout(CTL_SEND_TIMEOUT, self.sock.send(msg)).await {
            Ok(r) => r.map_err(zmq_err(&self.endpoint)),
            Err(_) => Err(BusError::Timeout(CTL_SEND_TIMEOUT)),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Close the socket and wait until its file is removed.
    pub async fn close(self) {
        let _ = self.sock.close().await;
    }
}

/// A DEALER connected to one daemon's control socket.
pub struct CtlClient {
    sock: DealerSocket,
    endpoint: String,
}

impl CtlClient {
    /// Connect; fails at once with [`BusError::NotRunning`] when nothing listens there.
    pub async fn connect(run_dir: &Path, kind: DaemonKind) -> Result<Self, BusError> {
        let path = ctl_path(run_dir, kind);
        if std::os::unix::net::UnixStream::connect(&path).is_err() {
            return Err(BusError::NotRunning { kind, path });
        }
        let endpoint = ctl_endpoint(run_dir, kind);
        let mut options = SocketOptions::default();
        options.connect_timeout(CTL_CONNECT_TIMEOUT);
        let mut sock = DealerSocket::with_options(options);
        sock.connect(&endpoint).await.map_err(zmq_err(&endpoint))?;
        Ok(CtlClient { sock, endpoint })
    }

    pub async fn send(&mut self, req: &CtlRequest) -> Result<(), BusError> {
        let msg = ZmqMessage::from(Bytes::from(encode_request(req)));
        match tokio::time::timeout(CTL_SEND_TIMEOUT, self.sock.send(msg)).await {
            Ok(r) => r.map_err(zmq_err(&self.endpoint)),
            Err(_) => Err(BusError::Timeout(CTL_SEND_TIMEOUT)),
        }
    }

    /// Next reply, waiting at most `timeout`. Cancel-safe.
    pub async fn recv(&mut self, timeout: Duration) -> Result<CtlReply, BusError> {
        let msg = match tokio::time::timeout(timeout, self.sock.recv()).await {
            Ok(r) => r.map_err(zmq_err(&self.endpoint))?,
            Err(_) => return Err(BusError::Timeout(timeout)),
        };
        let frames = msg.into_vec();
        let payload = match frames.as_slice() {
            [payload] => payload,
            [empty, payload] if empty.is_empty() => payload,
            _ => {
                return Err(DecodeError::FrameCount {
                    expected: 1,
                    got: frames.len(),
                }
                .into())
            }
        };
        Ok(decode_reply(payload)?)
    }
}

/// Connect, send one request and wait for one reply, all within `timeout`.
pub async fn ctl_call(
    run_dir: &Path,
    kind: DaemonKind,
    req: &CtlRequest,
    timeout: Duration,
) -> Result<CtlReply, BusError> {
    let call = async {
        let mut client = CtlClient::connect(run_dir, kind).await?;
        client.send(req).await?;
        client.recv(timeout).await
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(BusError::Timeout(timeout)),
    }
}

/// Ask `kind` for its snapshot.
pub async fn request_snapshot(
    run_dir: &Path,
    kind: DaemonKind,
    timeout: Duration,
) -> Result<crate::store::Snapshot, BusError> {
    match ctl_call(run_dir, kind, &CtlRequest::Snapshot, timeout).await? {
        CtlReply::Snapshot(s) => Ok(s),
        CtlReply::Error { .. } => Err(BusError::UnexpectedReply("Error")),
        other => Err(BusError::UnexpectedReply(other.variant())),
    }
}
