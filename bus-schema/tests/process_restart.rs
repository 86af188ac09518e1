//! A publisher in another process is killed with SIGKILL (leaving stale socket files) and
//! restarted with a new boot id; the follower converges to each incarnation's state.
//!
//! The publisher process is this test binary re-executed to run `child_publisher`, which does
//! nothing unless `HAVEN_BUS_CHILD_RUN` is set.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bus_schema::*;
use common::{FakeDaemon, FollowDriver, RunDir, PATIENCE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const KIND: DaemonKind = DaemonKind::Espd;

fn bodies(boot: u128, n: u64) -> Vec<Body> {
    (0..n)
        .map(|i| {
            Body::EspTunnel(EspTunnelInfo {
                tunnel: format!("t{i}"),
                device: format!("tun{boot}"),
                sa_in: i as u32,
                sa_out: boot as u32,
                rx_pkts: i,
                tx_pkts: 0,
                rx_bytes: 0,
                tx_bytes: 0,
            })
        })
        .chain([Body::EspTunnelRemoved {
            tunnel: "t0".into(),
        }])
        .collect()
}

fn expected(boot: u128, n: u64) -> StateStore {
    let mut s = StateStore::new();
    for b in bodies(boot, n) {
        s.apply(&b);
    }
    s
}

#[test]
fn child_publisher() {
    let Ok(run) = std::env::var("HAVEN_BUS_CHILD_RUN") else {
        return;
    };
    let boot: u128 = std::env::var("HAVEN_BUS_CHILD_BOOT")
        .unwrap()
        .parse()
        .unwrap();
    let n: u64 = std::env::var("HAVEN_BUS_CHILD_N").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let d = FakeDaemon::start(run.as_ref(), KIND, boot, PublisherOptions::default()).await;
        for b in bodies(boot, n) {
            d.publish(b);
        }
        println!("child-ready");
        tokio::time::sleep(PATIENCE * 4).await;
    });
}

async fn spawn_child(run: &RunDir, boot: u128, n: u64) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_publisher",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HAVEN_BUS_CHILD_RUN", run.path())
        .env("HAVEN_BUS_CHILD_BOOT", boot.to_string())
        .env("HAVEN_BUS_CHILD_N", n.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("child-ready") {
                return;
            }
        }
        panic!("child exited before it was ready");
    })
    .await
    .unwrap();
    child
}

async fn sigkill(mut child: Child) {
    let pid = child.id().unwrap() as i32;
    // SAFETY: plain kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_converges_across_a_sigkilled_publisher_process() {
    let run = RunDir::new("kill9");
    let mut fd = FollowDriver::new(run.path(), KIND, SubscriberOptions::default()).await;

    let first = spawn_child(&run, 1, 40).await;
    let want = expected(1, 40);
    assert!(
        fd.run_until(|f| f.synced() && f.boot() == Some(1) && f.store() == &want)
            .await
    );
    sigkill(first).await;
    assert!(
        pub_path(run.path(), KIND).exists(),
        "SIGKILL leaves the socket file"
    );
    assert!(ctl_path(run.path(), KIND).exists());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = spawn_child(&run, 2, 70).await;
    let want = expected(2, 70);
    assert!(
        fd.run_until(|f| f.synced() && f.boot() == Some(2) && f.store() == &want)
            .await,
        "{:?} {:?}",
        fd.follower.stats(),
        fd.sub.stats()
    );
    assert_eq!(fd.follower.store().digest(), want.digest());
    assert!(fd.follower.stats().new_boots >= 1);
    sigkill(second).await;
}
