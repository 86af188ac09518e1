//! FGSP move benchmark (issue 6): time from the router moving a strongSwan dial-up tunnel
//! to another FGSP member to the first ping answered through it, over N runs (default 10).
//! Prints figures; asserts nothing about time.
//!
//!     cargo build --workspace --bins
//!     cargo run -p haven-tests --example ha_fgsp_bench [-- RUNS]
//!
//! The lab is `tests/tests/fgsp_common` (seed 000: four FGSP members sharing the `local-gw`
//! loopback behind a router, DC1_VM4 without fgsp-sync). Each run: a ping every 10 ms from
//! the client's inside address to the server; 0.5 s in, the router's route for the client
//! is moved from the member carrying the tunnel to the next synced member (the old one
//! stays up: a live move, as when the router's ECMP set changes) and the server's route
//! back follows. The outage is the longest run of unanswered pings. Printed beside, from
//! the same runs: the same ping stream's longest gap over a route replace that does not
//! move the tunnel (the reference: what the router change alone costs).

#[path = "../tests/fgsp_common/mod.rs"]
mod fgsp_common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fgsp_common::*;
use haven_tests::daemons::wait_for;
use haven_tests::netns::Netns;

/// Ping interval.
const EVERY_MS: u64 = 10;
/// Pings per run.
const COUNT: u64 = 200;

fn pct(v: &[u64], p: f64) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s.get(i).copied().unwrap_or(0)
}

/// Pings for COUNT x EVERY_MS; `act` runs 0.5 s in. Returns the longest gap in ms.
fn gap_around(client: &Netns, act: impl FnOnce()) -> u64 {
    let mut cmd = client.command("ping");
    cmd.args([
        "-n",
        "-c",
        &COUNT.to_string(),
        "-i",
        &format!("{}", EVERY_MS as f64 / 1000.0),
        "-W",
        "1",
        "-I",
        CLIENT_INNER,
        SERVER,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut ping = client.spawn_command(cmd).expect("ping");
    std::thread::sleep(Duration::from_millis(500));
    act();
    wait_for("ping to finish", Duration::from_secs(60), || {
        match ping.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err("still running".to_string()),
        }
    });
    let mut out = String::new();
    let _ = ping.stdout.take().unwrap().read_to_string(&mut out);
    let mut seqs = received_seqs(&out);
    seqs.sort_unstable();
    seqs.dedup();
    let first = seqs.first().copied().unwrap_or(COUNT);
    let last = seqs.last().copied().unwrap_or(0);
    let inner = seqs
        .windows(2)
        .map(|w| w[1] - w[0] - 1)
        .max()
        .unwrap_or(COUNT);
    // Lost at the start or never answered again count too.
    let worst = inner.max(first - 1).max(COUNT - last);
    worst * EVERY_MS
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let mut lab = Lab::new("ha-fgsp-bench", "fgspb");
    let spis = lab.before.spis();
    let client = lab.client.clone();
    // Start from a single next hop: the member carrying the tunnel.
    let synced: Vec<usize> = (0..MEMBERS - 1).collect();
    for i in synced.clone() {
        if i != lab.owner {
            lab.withdraw(i);
        }
    }
    let mut owner = lab.owner;
    let mut outages = Vec::new();
    let mut promoted_ms = Vec::new();
    let mut reference = Vec::new();
    let mut replays_before = replay_failures(&lab.charon);
    for run in 0..runs {
        // Reference: the router replaces the route with the same next hop.
        let r = gap_around(&client, || {
            lab.restore(owner);
        });
        reference.push(r);
        let next = synced[(synced.iter().position(|i| *i == owner).unwrap() + 1) % synced.len()];
        let mut t0 = Instant::now();
        let out = gap_around(&client, || {
            t0 = Instant::now();
            // Move: next in, owner out.
            lab.restore(next);
            let chosen = lab.withdraw(owner);
            assert_eq!(chosen, next);
            lab.route_back_via(next);
        });
        let m = &lab.members[next];
        wait_for("the new owner's role", WAIT, || match m.role().as_deref() {
            Some("sync-primary") => Ok(()),
            other => Err(format!("{other:?}\n{}", m.logs())),
        });
        promoted_ms.push(t0.elapsed().as_millis() as u64);
        let carried = m.ike_sa() == Some(spis);
        let replays = replay_failures(&lab.charon);
        eprintln!(
            "run {run}: {} -> {}: outage {out} ms (reference {r} ms); IKE SA kept: {carried}; replay failures +{}",
            lab.members[owner].name(),
            m.name(),
            replays - replays_before
        );
        replays_before = replays;
        outages.push(out);
        owner = next;
    }
    let after = client_sa(&lab.charon).map(|s| s.spis());
    println!("FGSP tunnel moves by the router ({runs} runs, ping every {EVERY_MS} ms, debug build, shared cores):");
    println!(
        "  outage (route moved -> first ping answered via the new member): min {} / median {} / p90 {} / max {} ms",
        pct(&outages, 0.0),
        pct(&outages, 0.5),
        pct(&outages, 0.9),
        pct(&outages, 1.0)
    );
    println!(
        "  reference, same runs (route replaced, tunnel not moved):          min {} / median {} / max {} ms",
        pct(&reference, 0.0),
        pct(&reference, 0.5),
        pct(&reference, 1.0)
    );
    println!("  goal: < 100 ms");
    println!(
        "  strongSwan IKE SA SPIs unchanged across all runs: {} ; ESP replay failures logged by strongSwan: {}",
        after == Some(spis),
        replay_failures(&lab.charon)
    );
    for m in &mut lab.members {
        m.kill_all();
    }
    let _ = lab.charon.kill();
}
