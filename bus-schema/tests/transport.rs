//! Socket-level behaviour: directories and stale files, bad frames on the bus, silence
//! reconnects, and the control socket with malformed and REQ-style clients.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bus_schema::*;
use bytes::Bytes;
use common::{now_ns, RunDir, PATIENCE};
use zeromq::{PubSocket, ReqSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_makes_private_dirs_clears_stale_files_and_refuses_live_ones() {
    let run = RunDir::new("bind");
    let kind = DaemonKind::Dpdmon;
    // A socket file left by a killed process: bound once, never unlinked.
    std::fs::create_dir_all(run.path().join("bus")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(pub_path(run.path(), kind)).unwrap());
    assert!(pub_path(run.path(), kind).exists());
    let p = BusPublisher::bind(run.path(), kind)
        .await
        .expect("stale file is replaced");
    let c = CtlServer::bind(run.path(), kind).await.unwrap();
    for dir in ["bus", "ctl"] {
        let mode = std::fs::metadata(run.path().join(dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{dir}");
    }
    // A second live instance is refused, and the first keeps its socket.
    assert!(matches!(
        BusPublisher::bind(run.path(), kind).await,
        Err(BusError::InUse { .. })
    ));
    assert!(matches!(
        CtlServer::bind(run.path(), kind).await,
        Err(BusError::InUse { .. })
    ));
    p.close().await;
    c.close().await;
    assert!(
        !pub_path(run.path(), kind).exists(),
        "close removes the socket file"
    );
    assert!(!ctl_path(run.path(), kind).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_typed_drops_and_good_ones_still_arrive() {
    let run = RunDir::new("garbage");
    let kind = DaemonKind::Hasyncd;
    std::fs::create_dir_all(run.path().join("bus")).unwrap();
    let mut raw = PubSocket::new();
    raw.bind(&pub_endpoint(run.path(), kind)).await.unwrap();
    let mut sub = BusSubscriber::connect(run.path(), &[kind]).await.unwrap();
    let mut owner = Owner::new(kind, 5);
    let good = owner.stamp(Body::HaMemberRemoved { member_id: 3 }, now_ns());
    let good_bytes = encode(&good);
    let mut newer = good_bytes.clone();
    // `schema` is the first field: 86 a6 "schema" 01 -> 02.
    assert_eq!(newer[8], 0x01);
    newer[8] = 0x02;
    let mut foreign = good.clone();
    foreign.src = DaemonKind::Espd;
    let frames: Vec<Vec<Bytes>> = vec![
        vec![
            Bytes::from_static(b"ha.member.removed"),
            Bytes::from_static(b"\xc1garbage"),
        ],
        vec![
            Bytes::from_static(b"ha.member.removed"),
            Bytes::from(good_bytes[..20].to_vec()),
        ],
        vec![Bytes::from_static(b"ha.member.removed"), Bytes::from(newer)],
        vec![
            Bytes::from_static(b"no.such.topic"),
            Bytes::from(good_bytes.clone()),
        ],
        vec![Bytes::from(good_bytes.clone())],
        vec![
            Bytes::from_static(b"ha.member.removed"),
            Bytes::from(encode(&foreign)),
        ],
        vec![
            Bytes::from_static(b"ha.member.removed"),
            Bytes::from(good_bytes.clone()),
        ],
    ];
    // Wait for the subscription, then send the sequence once.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut m = ZmqMessage::from(Bytes::from_static(b"ha.member.removed"));
            m.push_back(Bytes::from(good_bytes.clone()));
            raw.send(m).await.unwrap();
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                return;
            }
        }
    })
    .await
    .unwrap();
    for f in frames {
        raw.send(ZmqMessage::try_from(f).unwrap()).await.unwrap();
    }
    let mut errs = Vec::new();
    let last = tokio::time::timeout(PATIENCE, async {
        loop {
            match sub.recv().await {
                Ok(env) => return env,
                Err(e) => errs.push(e),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(last, good);
    let kinds: Vec<String> = errs.iter().map(|e| format!("{e:?}")).collect();
    assert_eq!(errs.len(), 6, "{kinds:#?}");
    assert!(matches!(
        errs[0],
        BusError::Decode(DecodeError::Garbage { .. })
    ));
    assert!(matches!(
        errs[1],
        BusError::Decode(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        errs[2],
        BusError::Decode(DecodeError::NewerSchema { got: 2, .. })
    ));
    assert!(matches!(
        errs[3],
        BusError::Decode(DecodeError::TopicMismatch { .. })
    ));
    assert!(matches!(
        errs[4],
        BusError::Decode(DecodeError::FrameCount { got: 1, .. })
    ));
    assert!(matches!(errs[5], BusError::WrongSource { .. }));
    assert!(errs.iter().all(|e| e.is_message_drop()));
    assert!(!BusError::Closed.is_message_drop());
    assert_eq!(sub.stats().decode_errors, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_publisher_is_reconnected_and_messages_still_flow() {
    let run = RunDir::new("silence");
    let kind = DaemonKind::Espd;
    let p = BusPublisher::bind(run.path(), kind).await.unwrap();
    let opts = SubscriberOptions {
        silence_timeout: Some(Duration::from_millis(200)),
        ..SubscriberOptions::default()
    };
    let mut sub = BusSubscriber::connect_with(run.path(), &[kind], opts)
        .await
        .unwrap();
    let mut owner = Owner::new(kind, 1);
    let pump = |owner: &mut Owner| {
        p.publish(&owner.stamp(Body::Heartbeat { uptime_ms: 0 }, 0))
            .unwrap();
    };
    tokio::time::timeout(PATIENCE, async {
        loop {
            pump(&mut owner);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                return;
            }
        }
    })
    .await
    .unwrap();
    // Stay silent well past the silence timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(sub.stats().silence_reconnects >= 1, "{:?}", sub.stats());
    tokio::time::timeout(PATIENCE, async {
        loop {
            pump(&mut owner);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                return;
            }
        }
    })
    .await
    .unwrap();
    assert!(sub.stats().connects >= 2);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_answers_dealer_and_req_clients_and_flags_bad_requests() {
    let run = RunDir::new("ctl");
    let kind = DaemonKind::Ikemgr;
    // Nobody listening: fails at once, not after a timeout.
    assert!(matches!(
        ctl_call(run.path(), kind, &CtlRequest::Status, PATIENCE).await,
        Err(BusError::NotRunning { .. })
    ));
    let mut server = CtlServer::bind(run.path(), kind).await.unwrap();
    let serve = tokio::spawn(async move {
        let mut bad = 0;
        for _ in 0..4 {
            let (peer, req) = server.recv().await.unwrap();
            let reply = match req {
                Ok(CtlRequest::View { name, args }) => {
                    CtlReply::View(serde_json::json!({ "view": name, "args": args }))
                }
                Ok(other) => CtlReply::Error {
                    message: format!("unsupported {}", other.variant()),
                },
                Err(e) => {
                    bad += 1;
                    CtlReply::Error {
                        message: e.to_string(),
                    }
                }
            };
            server.send(&peer, &reply).await.unwrap();
        }
        server.close().await;
        bad
    });
    let view = CtlRequest::View {
        name: "tunnels".into(),
        args: vec!["a".into()],
    };
    let r = ctl_call(run.path(), kind, &view, PATIENCE).await.unwrap();
    assert_eq!(
        r,
        CtlReply::View(serde_json::json!({"view": "tunnels", "args": ["a"]}))
    );
    // A REQ client (as pyzmq users write) sends an empty delimiter frame.
    let mut req = ReqSocket::new();
    req.connect(&ctl_endpoint(run.path(), kind)).await.unwrap();
    req.send(ZmqMessage::from(Bytes::from(encode_request(&view))))
        .await
        .unwrap();
    let rep = req.recv().await.unwrap();
    let payload = rep.into_vec().pop().unwrap();
    assert!(matches!(decode_reply(&payload).unwrap(), CtlReply::View(_)));
    // Malformed requests are answered with an error, not dropped.
    let mut client = CtlClient::connect(run.path(), kind).await.unwrap();
    let mut raw = zeromq::DealerSocket::new();
    raw.connect(&ctl_endpoint(run.path(), kind)).await.unwrap();
    raw.send(ZmqMessage::from(Bytes::from_static(
        b"\x81\xa4type\xa5Bogus",
    )))
    .await
    .unwrap();
    let rep = raw.recv().await.unwrap().into_vec().pop().unwrap();
    match decode_reply(&rep).unwrap() {
        CtlReply::Error { message } => assert!(message.contains("Bogus"), "{message}"),
        other => panic!("{other:?}"),
    }
    client.send(&CtlRequest::Status).await.unwrap();
    assert!(matches!(
        client.recv(PATIENCE).await.unwrap(),
        CtlReply::Error { .. }
    ));
    assert_eq!(serve.await.unwrap(), 1);
}
