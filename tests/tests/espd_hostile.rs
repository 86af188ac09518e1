//! Hostile ESP packets sent from a namespace on the outside link to a Haven gateway: each is
//! dropped and counted under its reason, espd stays up, and the tunnel still passes pings.
//!
//! gwb carries the real tunnel `vpn1` (SPI 0x2001) plus a second manual-key tunnel `vpn2`
//! (SPI 0x3001) that only the attacker uses, so that packets with a valid ICV (which move
//! the replay window) do not disturb `vpn1`'s sequence numbers.

mod espd_common;

use std::time::Duration;

use espd_common::{Pair, KEY_GCM, SPI_B};
use haven_tests::daemons::{bin, wait_for};
use haven_tests::netns::SiteToSite;

const SPI_V2: u32 = 0x3001;

fn vpn2() -> String {
    format!(
        "config vpn ipsec manualkey-interface\n    edit \"vpn2\"\n        set interface \"out0\"\n        set local-gw {}\n        set remote-gw {}\n        set enc-alg aes128gcm\n        set enc-key {KEY_GCM}\n        set local-spi {SPI_V2:#x}\n        set remote-spi 0x3002\n        set src-subnet 10.99.2.0/24\n        set dst-subnet 10.99.1.0/24\n    next\nend\n",
        SiteToSite::GWB_OUTER,
        SiteToSite::GWA_OUTER
    )
}

/// The `vpn2` SA's drop counter `reason` on gwb.
fn v2_drop(pair: &Pair, reason: &str) -> u64 {
    let v = pair.b.tunnel_list();
    v["tunnels"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "vpn2"))
        .map(|t| t["sas"][0]["drops"][reason].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn hostile_packets_are_counted_and_harmless() {
    let mut pair = Pair::with_extra("espd-hostile", false, &vpn2());
    pair.wait_ping();
    wait_for("vpn2 installed", Duration::from_secs(10), || {
        let v = pair.b.tunnel_list();
        v["tunnels"]
            .as_array()
            .filter(|a| a.iter().any(|t| t["name"] == "vpn2"))
            .map(|_| ())
            .ok_or_else(|| format!("{v}"))
    });
    let inject = bin("esp-inject");
    let send_to = |dst: &str, spi: u32, kind: &str, seq: u64, inner: &[&str]| {
        let mut args = vec![
            dst.to_string(),
            format!("{spi:x}"),
            KEY_GCM.to_string(),
            "aes128gcm".to_string(),
            kind.to_string(),
            seq.to_string(),
        ];
        args.extend(inner.iter().map(|s| s.to_string()));
        let out = pair
            .topo
            .gwa
            .exec(inject.to_str().unwrap(), &args)
            .expect("esp-inject");
        assert!(
            out.status.success(),
            "esp-inject {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let send = |spi: u32, kind: &str, seq: u64, inner: &[&str]| {
        send_to(SiteToSite::GWB_OUTER, spi, kind, seq, inner)
    };

    // Against the live tunnel: nothing here can move its window.
    send(SPI_B, "truncated", 5, &[]);
    send(SPI_B, "bad-icv", 4_000_000, &[]);
    send(0xdead_beef, "valid", 1, &[]);
    // Against vpn2: valid ICVs with broken contents, a replay and a selector violation.
    send(SPI_V2, "bad-padding", 1, &[]);
    send(SPI_V2, "inner-length", 2, &[]);
    send(SPI_V2, "valid", 3, &[]);
    send(SPI_V2, "valid", 3, &[]);
    send(SPI_V2, "valid", 4, &["192.0.2.66", "10.99.2.2"]);
    // vpn2 is raw ESP: the same SA in UDP 4500 is an encapsulation mismatch (RFC 3948).
    let udp = format!("{}:4500/34500", SiteToSite::GWB_OUTER);
    send_to(&udp, SPI_V2, "valid", 5, &[]);

    let b = &pair.b;
    wait_for("drops counted", Duration::from_secs(5), || {
        let got = (
            b.sa_drop("truncated"),
            b.sa_drop("icv"),
            b.drop_total("unknown_spi"),
            v2_drop(&pair, "padding"),
            v2_drop(&pair, "inner_header"),
            v2_drop(&pair, "replay"),
            v2_drop(&pair, "selector"),
            v2_drop(&pair, "encap_mismatch"),
        );
        if got == (1, 1, 1, 1, 1, 1, 1, 1) {
            Ok(())
        } else {
            Err(format!(
                "(truncated, icv, unknown_spi, padding, inner_header, replay, selector, encap_mismatch) = {got:?}\n{}",
                b.tunnel_list()
            ))
        }
    });
    assert!(pair.b.espd.as_mut().unwrap().is_running(), "espd died");
    let (sent, got) = pair.ping(5);
    assert!(
        sent == 5 && got >= 4,
        "tunnel broken after hostile packets: {got}/{sent}"
    );
    assert_eq!(
        pair.b.sa_drop("replay"),
        0,
        "vpn1 lost packets to the replay window"
    );
}
