//! What the `zeromq` crate itself does on ipc when a publisher starts late or restarts.
//! BusSubscriber does not depend on this (it reconnects on its own); these tests record the
//! behaviour the crate documentation describes, so an upgrade that changes it is noticed.

mod common;

use std::time::Duration;

use common::{RunDir, PATIENCE};
use zeromq::{PubSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

async fn pump_until_received(publ: &mut PubSocket, sub: &mut SubSocket, tag: &str) -> bool {
    tokio::time::timeout(PATIENCE, async {
        loop {
            publ.send(ZmqMessage::from(tag.to_owned())).await.unwrap();
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                let s: String = m.try_into().unwrap();
                if s == tag {
                    return;
                }
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_connect_waits_for_a_late_ipc_publisher() {
    let run = RunDir::new("zlate");
    let ep = format!("ipc://{}/late.pub", run.path().display());
    let ep2 = ep.clone();
    let sub_task = tokio::spawn(async move {
        let mut sub = SubSocket::new();
        sub.subscribe("").await.unwrap();
        // Blocks (retrying ENOENT/ECONNREFUSED) until the publisher binds or 30 s pass.
        sub.connect(&ep2).await.map(|_| sub)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publ = PubSocket::new();
    publ.bind(&ep).await.unwrap();
    let mut sub = sub_task
        .await
        .unwrap()
        .expect("connect completes once bound");
    assert!(pump_until_received(&mut publ, &mut sub, "late").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_reconnects_by_itself_after_an_ipc_publisher_restart() {
    let run = RunDir::new("zrestart");
    let ep = format!("ipc://{}/restart.pub", run.path().display());
    let mut publ = PubSocket::new();
    publ.bind(&ep).await.unwrap();
    let mut sub = SubSocket::new();
    sub.subscribe("").await.unwrap();
    sub.connect(&ep).await.unwrap();
    assert!(pump_until_received(&mut publ, &mut sub, "first").await);
    // close() unbinds and removes the socket file before returning.
    let errs = publ.close().await;
    assert!(errs.is_empty(), "{errs:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publ = PubSocket::new();
    publ.bind(&ep).await.unwrap();
    assert!(pump_until_received(&mut publ, &mut sub, "second").await);
}
