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

/// `keylifekbs 5120` on gwa: soft at 7/8 of 5120 KiB (4 587 520 inner bytes per direction).
const SOFT_BYTES: u64 = 5120 * 1024 - 5120 * 1024 / 8;

/// `count` flood pings of 1400-byte IPv4 packets from the client to the server (1400
/// inner bytes each way per answered ping); returns (sent, received).
fn flood(pair: &Pair, count: u32) -> (u32, u32) {
    let out = pair
        .topo
        .client
        .exec(
            "ping",
            &[
                "-n",
                "-q",
                "-f",
                "-s",
                "1372",
                "-c",
                &count.to_string(),
                "-W",
                "1",
                SiteToSite::SERVER,
            ],
        )
        .expect("flood ping");
    espd_common::parse_ping(&String::from_utf8_lossy(&out.stdout))
}

/// An IKE tunnel between two Haven gateways, gwa with `keylife-type both`, `keylifekbs
/// 5120` (gwb's limits are far away, so only gwa's espd can start the rekey). About 2.8 MB
/// go each way, below the soft limit; espd on gwa is killed with SIGKILL and restarted; its
/// SA keeps its age and byte counts, and about 2 MB more (below the soft limit on their
/// own, above it with what went before) make it report the soft volume limit, and ikemgr
/// rekeys. With counts restarted from zero there would be no rekey. Once the replaced SA
/// is removed, its persisted sequence mark is deleted and only its successor's is left.
#[test]
fn kill_9_espd_keeps_sa_age_and_byte_counts() {
    let mut pair = Pair::ike(
        "espd-restart-life",
        "        set keylife-type both\n        set keylifeseconds 3600\n        set keylifekbs 5120\n",
        "        set keylife-type kbs\n        set keylifekbs 4000000000\n",
    );
    pair.wait_ping();
    let (sent, got) = flood(&pair, 2000);
    assert!(got > 1900, "flood before the kill: {got}/{sent}");
    // espd writes the counts down within a tick (200 ms).
    std::thread::sleep(Duration::from_secs(1));
    let before = pair.a.sa().expect("gwa SA");
    let spi = before["dec"]["spi"].clone();
    let (rx, tx) = (
        before["dec_bytes"].as_u64().unwrap(),
        before["enc_bytes"].as_u64().unwrap(),
    );
    let age = before["life"]["timeout"].as_u64().unwrap();
    assert!(
        rx < SOFT_BYTES && tx < SOFT_BYTES && rx > 2_500_000 && tx > 2_500_000,
        "in {rx} out {tx} bytes before the kill"
    );
    assert!(
        !pair.a.log("espd").contains("soft lifetime reached"),
        "{}",
        pair.a.log("espd")
    );
    // Let the SA age by a few seconds, so that an age counted from the restart shows.
    std::thread::sleep(Duration::from_secs(3));
    let age = age + 3;

    pair.a
        .espd
        .as_mut()
        .unwrap()
        .kill_now()
        .expect("kill -9 espd");
    pair.a.start_espd();
    let after = wait_for(
        "SA back in the restarted espd",
        Duration::from_secs(20),
        || pair.a.sa().ok_or_else(|| pair.a.log("espd")),
    );
    assert_eq!(after["dec"]["spi"], spi, "the same SA came back");
    assert!(
        after["dec_bytes"].as_u64().unwrap() >= rx && after["enc_bytes"].as_u64().unwrap() >= tx,
        "byte counts restarted: before the kill in {rx} out {tx}, after {}",
        serde_json::to_string_pretty(&after).unwrap()
    );
    assert!(
        after["life"]["timeout"].as_u64().unwrap() >= age,
        "age restarted: {age} s before the kill, {} after",
        after["life"]["timeout"]
    );

    // 1400 more pings: about 1.96 MB each way, the soft limit only with the earlier bytes.
    let (sent, got) = flood(&pair, 1400);
    assert!(got > 1300, "flood after the restart: {got}/{sent}");
    wait_for(
        "soft volume limit reported by the restarted espd and a rekey",
        Duration::from_secs(20),
        || {
            let log = pair.a.log("espd");
            let ike = pair.a.log("ikemgr");
            (log.contains("soft lifetime reached (bytes)") && ike.contains(", replaces "))
                .then_some(())
                .ok_or_else(|| {
                    format!(
                        "espd:\n{log}\nikemgr:\n{ike}\n{}",
                        serde_json::to_string_pretty(&pair.a.sa().unwrap_or_default()).unwrap()
                    )
                })
        },
    );
    let (sent, got) = pair.ping(5);
    assert!(sent == 5 && got >= 4, "{got}/{sent} after the rekey");

    // The replaced SA never comes back: once it is removed (after its inbound linger) its
    // persisted sequence mark goes with it, and only the successor's stays (a mark kept
    // for every rekeyed SA would fill the run-dir under churn).
    // The live marks of the journal (`<name> <mark> <secs> <check>` lines; the latest of
    // a name wins, a mark of 0 forgets it).
    let marks = || -> Vec<String> {
        let text = std::fs::read_to_string(pair.a.run.join("espd-seq/marks")).unwrap_or_default();
        let mut live = std::collections::BTreeSet::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if let [name, mark, _, _] = f.as_slice() {
                if *mark == "0" {
                    live.remove(*name);
                } else {
                    live.insert(name.to_string());
                }
            }
        }
        live.into_iter().collect()
    };
    let old_out = before["enc"]["spi"].as_str().unwrap_or("").to_string();
    let sas = || -> Vec<String> {
        pair.a.tunnel_list()["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["name"] == espd_common::TUNNEL)
            .flat_map(|t| t["sas"].as_array().cloned().unwrap_or_default())
            .filter_map(|sa| sa["enc"]["spi"].as_str().map(str::to_string))
            .collect()
    };
    wait_for(
        "the replaced SA removed and only its successor's mark left",
        Duration::from_secs(30),
        || {
            let (now, m) = (sas(), marks());
            match now.as_slice() {
                [new] if *new != old_out && m.len() == 1 && m[0].ends_with(new.as_str()) => Ok(()),
                _ => Err(format!(
                    "SAs out {now:?} (before the rekey {old_out}), marks {m:?}\n{}",
                    pair.a.log("espd")
                )),
            }
        },
    );
}

/// A manual-key SA that disappears from ikemgr's state without a delete (ikemgr restarted
/// with a configuration that lacks the tunnel) and comes back (restarted again with it: the
/// same SPIs and keys, so the same SA) resumes above the numbers it sent before: espd keeps
/// a removed SA's persisted mark, so gwb's replay window drops nothing. An HA member that
/// takes a tunnel back without a lease record for its SA relies on the same mark.
#[test]
fn an_sa_removed_and_installed_again_resumes_above_its_old_numbers() {
    let mut pair = Pair::new("espd-readd", false);
    pair.wait_ping();
    let (sent, got) = pair.ping(20);
    assert!(
        sent == 20 && got >= 19,
        "{got}/{sent} pings before the removal"
    );
    let seq_before = pair.a.sa().expect("gwa SA")["seqno"].as_u64().unwrap();
    assert!(seq_before > 20, "seqno {seq_before}");

    let conf = std::fs::read_to_string(&pair.a.conf).unwrap();
    let restart_ikemgr = |gw: &mut espd_common::Gw, text: &str| {
        std::fs::write(&gw.conf, text).unwrap();
        if let Some(mut p) = gw.ikemgr.take() {
            let _ = p.kill_now();
        }
        gw.start_ikemgr();
    };
    restart_ikemgr(&mut pair.a, "# no tunnels\n");
    wait_for("gwa's SA removed", Duration::from_secs(20), || {
        match pair.a.sa() {
            None => Ok(()),
            Some(sa) => Err(sa.to_string()),
        }
    });
    restart_ikemgr(&mut pair.a, &conf);
    pair.a.wait_tunnel();
    let seq_again = pair.a.sa().expect("gwa SA again")["seqno"]
        .as_u64()
        .unwrap();
    assert!(
        seq_again >= seq_before,
        "the SA came back at sequence {seq_again}, below the {seq_before} it had reached: {}",
        pair.a.log("espd")
    );
    let (sent, got) = pair.ping(10);
    assert!(
        sent == 10 && got >= 9,
        "{got}/{sent} pings after the re-add"
    );
    assert_eq!(
        pair.b.drop_total("replay"),
        0,
        "{}",
        pair.b.tunnel_list_text()
    );
}
