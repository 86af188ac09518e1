//! Clone-pattern recovery over real ZeroMQ ipc sockets: a late subscriber, a restarting
//! publisher, a publisher that starts after its subscriber, and 10 000 updates through a tiny
//! high-water mark all end with the follower's store equal to the owner's.

mod common;

use std::time::Duration;

use bus_schema::*;
use common::{FakeDaemon, FollowDriver, RunDir};

const KIND: DaemonKind = DaemonKind::Ikemgr;

fn tunnel(i: u64, rev: u64) -> Body {
    Body::Tunnel(TunnelInfo {
        name: format!("vpn{i}"),
        phase1: format!("p1-{i}"),
        kind: TunnelKind::Static,
        local_gw: Some("192.0.2.1".into()),
        remote_gw: Some(format!("198.51.100.{}", i % 250)),
        interface: None,
        state: if rev % 2 == 0 {
            TunnelState::Up
        } else {
            TunnelState::Down
        },
        phase2: vec![format!("p2-{i}")],
        dpd: DpdSettings {
            mode: "on-idle".into(),
            retry_count: 3,
            retry_interval_ms: rev,
        },
    })
}

fn assert_same(f: &Follower, d: &FakeDaemon) {
    let owner = d.store();
    assert_eq!(f.store(), &owner);
    assert_eq!(f.store().digest(), owner.digest());
    assert_eq!(
        f.store().items().collect::<Vec<_>>(),
        owner.items().collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_started_after_the_publisher_converges() {
    let run = RunDir::new("late");
    let d = FakeDaemon::start(run.path(), KIND, 11, PublisherOptions::default()).await;
    // Published before anyone listens: lost on the bus, recovered from the snapshot.
    for i in 0..300 {
        d.publish(tunnel(i, 0));
    }
    for i in 0..50 {
        d.publish(Body::TunnelRemoved {
            name: format!("vpn{i}"),
        });
    }
    let mut fd = FollowDriver::new(run.path(), KIND, SubscriberOptions::default()).await;
    assert!(fd.converge_to(&d).await, "late joiner converges");
    assert_eq!(fd.follower.store().len(), 250);
    assert_same(&fd.follower, &d);
    // And keeps following live updates.
    for i in 0..100 {
        d.publish(tunnel(i, 1));
    }
    d.publish(Body::TunnelRemoved {
        name: "vpn299".into(),
    });
    assert!(fd.converge_to(&d).await);
    assert_same(&fd.follower, &d);
    assert_eq!(fd.decode_errors, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_whose_publisher_restarts_converges_to_the_new_state() {
    let run = RunDir::new("restart");
    let a = FakeDaemon::start(run.path(), KIND, 21, PublisherOptions::default()).await;
    for i in 0..100 {
        a.publish(tunnel(i, 0));
    }
    let mut fd = FollowDriver::new(run.path(), KIND, SubscriberOptions::default()).await;
    assert!(fd.converge_to(&a).await);
    assert_same(&fd.follower, &a);
    a.stop().await;

    // The restarted daemon has a new boot id and different state.
    let b = FakeDaemon::start(run.path(), KIND, 22, PublisherOptions::default()).await;
    for i in 50..120 {
        b.publish(tunnel(i, 7));
    }
    assert!(
        fd.converge_to(&b).await,
        "follower converges to the new boot"
    );
    assert_same(&fd.follower, &b);
    assert_eq!(fd.follower.boot(), Some(22));
    assert!(fd.follower.stats().new_boots >= 1);
    assert!(fd.sub.stats().connects >= 2, "{:?}", fd.sub.stats());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_started_after_the_subscriber_is_found() {
    let run = RunDir::new("pubLate");
    let mut fd = FollowDriver::new(run.path(), KIND, SubscriberOptions::default()).await;
    // Nothing to connect to yet: the driver keeps asking for snapshots and retrying.
    let start = std::time::Instant::now();
    assert!(
        fd.run_until(move |_| start.elapsed() > Duration::from_millis(1500))
            .await
    );
    assert!(fd.follower.stats().snapshot_retries >= 1);
    let d = FakeDaemon::start(run.path(), KIND, 31, PublisherOptions::default()).await;
    for i in 0..20 {
        d.publish(tunnel(i, 0));
    }
    assert!(fd.converge_to(&d).await);
    assert_same(&fd.follower, &d);
    d.stop().await;
}

/// `zeromq` 0.7 has no HWM option (its PUB queues 100 000 per subscriber), so the tiny HWM is
/// BusPublisher's own bounded queue: 8 messages, drop-and-count beyond that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_updates_through_a_tiny_hwm_converge() {
    let run = RunDir::new("hwm");
    let d = FakeDaemon::start(run.path(), KIND, 41, PublisherOptions { hwm: 8 }).await;
    let mut fd = FollowDriver::new(run.path(), KIND, SubscriberOptions::default()).await;
    // Wait until the subscription is live so the run exercises gaps, not only the snapshot.
    d.publish(tunnel(0, 0));
    assert!(fd.converge_to(&d).await);
    let driver = tokio::spawn(async move {
        let mut fd = fd;
        let mut n = 0u64;
        // Keep the follower running while the burst goes out.
        fd.run_until(move |_| {
            n += 1;
            n > 2000
        })
        .await;
        fd
    });
    let mut x = 1u64;
    for i in 0..10_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key = (x >> 33) % 200;
        if i % 7 == 3 {
            d.publish(Body::TunnelRemoved {
                name: format!("vpn{key}"),
            });
        } else {
            d.publish(tunnel(key, i));
        }
        if i % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    let stats = d.publisher.stats();
    let mut fd = driver.await.unwrap();
    assert!(fd.converge_to(&d).await, "converges after the burst");
    assert_same(&fd.follower, &d);
    assert!(stats.dropped_hwm > 0, "the HWM really dropped: {stats:?}");
    assert!(fd.follower.stats().gaps > 0, "{:?}", fd.follower.stats());
    eprintln!(
        "hwm=8: published 10001, dropped at HWM {}, follower {:?}",
        stats.dropped_hwm,
        fd.follower.stats()
    );
    d.stop().await;
}
