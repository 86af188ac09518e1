//! `kill -9` of espd on one gateway under a continuous ping: restarted directly (as
//! supervisord would), it takes its SA back from ikemgr's snapshot, re-attaches to its
//! persistent TUN device, and the ping resumes. Its outbound sequence numbers resume above
//! the persisted high-water mark, so the peer's replay window drops nothing.
//!
//! The outage is measured and printed, not asserted (timings are not test material here).

mod espd_common;

use std::process::Stdio;
use std::time::Duration;

use espd_common::Pair;
use haven_tests::daemons::wait_for;
use haven_tests::netns::SiteToSite;

/// Received `icmp_seq` numbers in ping's output.
fn received_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            let i = l.find("icmp_seq=")? + "icmp_seq=".len();
            l[i..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn kill_9_espd_under_ping_resumes_without_replay_drops() {
    let mut pair = Pair::new("espd-restart", false);
    pair.wait_ping();
    let before = pair.a.sa().expect("gwa SA");
    let seq_before = before["seqno"].as_u64().unwrap();

    // 100 pings, one every 50 ms (5 s), the kill about 1.5 s in.
    let mut cmd = pair.topo.client.command("ping");
    cmd.args([
        "-n",
        "-c",
        "100",
        "-i",
        "0.05",
        "-W",
        "1",
        SiteToSite::SERVER,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let ping = pair.topo.client.spawn_command(cmd).expect("ping");
    std::thread::sleep(Duration::from_millis(1500));
    pair.a
        .espd
        .as_mut()
        .unwrap()
        .kill_now()
        .expect("kill -9 espd");
    std::thread::sleep(Duration::from_millis(200));
    pair.a.start_espd();
    wait_for(
        "SA back in the restarted espd",
        Duration::from_secs(20),
        || pair.a.sa().map(|_| ()).ok_or_else(|| pair.a.log("espd")),
    );
    let after_restart = pair.a.sa().unwrap();

    let mut ping = ping;
    wait_for("ping to finish", Duration::from_secs(30), || {
        match ping.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err("still running".to_string()),
        }
    });
    let mut out = String::new();
    use std::io::Read;
    ping.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut seqs = received_seqs(&out);
    let answers = seqs.len();
    // Replies queued in the TUN device while espd was down can come back after newer
    // ones; the gap is measured over the set of answered sequence numbers.
    seqs.sort_unstable();
    seqs.dedup();
    let max_gap = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!(
        "espd restart: {} of 100 pings answered ({answers} replies); longest gap {} pings = {} ms (at 50 ms per ping)",
        seqs.len(),
        max_gap,
        max_gap * 50
    );
    // The ping resumed after the restart (answers near the end of the run).
    assert!(
        seqs.iter().any(|s| *s >= 90),
        "ping did not resume after the restart:\n{out}\n{}",
        pair.a.log("espd")
    );
    // Sequence numbers did not repeat: the restarted SA started above the old one's
    // numbers, and the peer saw no replay.
    let seq_restart = after_restart["seqno"].as_u64().unwrap();
    assert!(
        seq_restart > seq_before,
        "restarted SA starts at {seq_restart}, before the kill it was at {seq_before}"
    );
    assert_eq!(pair.b.sa_drop("replay"), 0, "{}", pair.b.tunnel_list());
    assert_eq!(pair.b.sa_drop("icv"), 0);
    let (sent, got) = pair.ping(5);
    assert!(sent == 5 && got >= 4, "{got}/{sent} after the restart");
}
