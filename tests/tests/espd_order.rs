//! Several TCP streams through one manual-key SA, each espd running more packet threads
//! than the machine has cores, in both directions, over raw ESP and over UDP 4500: no
//! packet may fall behind the receiver's replay window. Every inbound packet of an SA goes
//! to one worker in arrival order (per-worker sockets with SPI steering), and every
//! outbound packet of a TUN device is encrypted by one worker in read order, so espd itself
//! never reorders the sequence numbers of an SA; with workers sharing one socket and one
//! TUN queue, a worker kept off the CPU with a batch in hand let the other workers push
//! the window past its packets (`espd_drops_total{reason="replay"}` in a TCP burst).

mod espd_common;

use espd_common::{iperf_server, Pair, SPI_A, SPI_B};
use haven_tests::netns::SiteToSite;

/// Workers per espd: twice the cores of a small test machine, so workers are preempted
/// with batches in hand.
const WORKERS: usize = 4;

fn streams(label: &str, udp: bool) {
    let pair = Pair::with_workers(label, udp, WORKERS);
    pair.wait_ping();
    let mut server = iperf_server(&pair, &[]);
    for reverse in [false, true] {
        let mut args = vec!["-c", SiteToSite::SERVER, "-t", "3", "-P", "4", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = pair
            .topo
            .client
            .exec("iperf3", &args)
            .expect("iperf3 client");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            bytes > 1_000_000,
            "TCP (reverse: {reverse}) moved {bytes} bytes: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = server.kill_now();
    for (side, gw, spi) in [("gwa", &pair.a, SPI_A), ("gwb", &pair.b, SPI_B)] {
        let sa = gw.sa().unwrap_or_default();
        assert!(
            sa["dec_pkts"].as_u64().unwrap_or(0) > 1_000,
            "{side}: the SA (inbound SPI {spi:#x}) carried little: {sa}"
        );
        for reason in ["replay", "icv", "tun_write", "offload"] {
            assert_eq!(
                gw.drop_total(reason),
                0,
                "{side}: {reason} drops with {WORKERS} workers: {}",
                gw.tunnel_list_text()
            );
        }
    }
}

#[test]
fn parallel_streams_raw_esp_stay_in_the_replay_window() {
    streams("espd-order-raw", false);
}

#[test]
fn parallel_streams_udp_4500_stay_in_the_replay_window() {
    streams("espd-order-udp", true);
}
