//! Publisher -> subscriber and control round trip over real ZeroMQ ipc sockets.

mod common;

use bus_schema::*;
use common::{RunDir, PATIENCE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_and_control_round_trip() {
    let run = RunDir::new("smoke");
    let publisher = BusPublisher::bind(run.path(), DaemonKind::Espd)
        .await
        .unwrap();
    let mut sub = BusSubscriber::connect(run.path(), &[DaemonKind::Espd])
        .await
        .unwrap();
    let mut owner = Owner::new(DaemonKind::Espd, 7);
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            publisher
                .publish(&owner.stamp(Body::Heartbeat { uptime_ms: 1 }, 1))
                .unwrap();
            if let Ok(Ok(env)) =
                tokio::time::timeout(std::time::Duration::from_millis(100), sub.recv()).await
            {
                return env;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.src, DaemonKind::Espd);
    assert_eq!(got.boot, 7);

    let mut server = CtlServer::bind(run.path(), DaemonKind::Espd).await.unwrap();
    let snap = owner.snapshot();
    let serve = tokio::spawn(async move {
        let (peer, req) = server.recv().await.unwrap();
        assert_eq!(req.unwrap(), CtlRequest::Snapshot);
        server.send(&peer, &CtlReply::Snapshot(snap)).await.unwrap();
        server.close().await;
    });
    let reply = ctl_call(
        run.path(),
        DaemonKind::Espd,
        &CtlRequest::Snapshot,
        PATIENCE,
    )
    .await
    .unwrap();
    assert_eq!(reply, CtlReply::Snapshot(owner.snapshot()));
    serve.await.unwrap();
    publisher.close().await;
}
