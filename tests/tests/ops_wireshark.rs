//! Wireshark key export, end to end: two Haven gateways carry ping through a tunnel (the
//! manual-key pair of the `espd_*` suites), tcpdump captures the ESP between them, `vpnctl
//! diagnose vpn ike export-keys --wireshark DIR` writes `DIR/esp_sa`, and tshark, with DIR as
//! its configuration directory, decrypts the capture: the inner ICMP echo requests and
//! replies between client and server appear, on both SPIs, with no malformed packet. Without
//! the file tshark shows no ICMP at all (so the decryption comes from the export).
//! Run for raw ESP (IP protocol 50) and for ESP in UDP 4500.

mod espd_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use espd_common::{Pair, SPI_A, SPI_B};
use haven_tests::daemons::{vpnctl, wait_for};
use haven_tests::netns::{ScratchDir, SiteToSite};

/// tshark's fields for each packet matching `filter`, one line per packet. `config_dir`
/// becomes Wireshark's personal configuration directory (where it reads `esp_sa`).
fn tshark(pcap: &Path, config_dir: &Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.env("WIRESHARK_CONFIG_DIR", config_dir)
        .arg("-n")
        .arg("-r")
        .arg(pcap)
        .args([
            "-o",
            "esp.enable_encryption_decode:TRUE",
            "-o",
            "esp.enable_authentication_check:TRUE",
            "-Y",
            filter,
            "-T",
            "fields",
        ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("tshark not found: run ops/install-deps");
    assert!(
        out.status.success(),
        "tshark {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn capture_and_decrypt(label: &str, udp: bool) {
    let pair = Pair::new(label, udp);
    let scratch = ScratchDir::new(&format!("{label}-pcap")).expect("scratch");
    let pcap = scratch.path().join("out0.pcap");
    let err = std::fs::File::create(scratch.path().join("tcpdump.err")).unwrap();
    let mut cmd = pair.a.ns.command("tcpdump");
    cmd.args(["-i", "out0", "-n", "-U", "--immediate-mode", "-w"])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    let mut tcpdump = pair.a.ns.spawn_command(cmd).expect("tcpdump");
    wait_for("tcpdump listening", Duration::from_secs(10), || {
        let e = std::fs::read_to_string(scratch.path().join("tcpdump.err")).unwrap_or_default();
        if e.contains("listening on") {
            Ok(())
        } else {
            Err(e)
        }
    });
    pair.wait_ping();
    let (sent, received) = pair.ping(5);
    assert!(received >= 4, "ping through the tunnel: {received}/{sent}");
    // SIGTERM: tcpdump writes out what it holds and ends.
    tcpdump.stop(Duration::from_secs(5)).expect("stop tcpdump");

    let keys = scratch.path().join("wireshark");
    let out = vpnctl(
        &pair.a.run,
        &[
            "diagnose",
            "vpn",
            "ike",
            "export-keys",
            "--wireshark",
            keys.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "export-keys: {out:?}");
    let esp_sa = keys.join("esp_sa");
    let text = std::fs::read_to_string(&esp_sa).expect("esp_sa written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&esp_sa).unwrap().permissions().mode() & 0o777,
        0o600,
        "esp_sa holds keys: owner only"
    );
    let records: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(records.len(), 2, "one record per direction:\n{text}");
    for spi in [SPI_A, SPI_B] {
        assert!(
            text.contains(&format!("\"0x{spi:08x}\"")),
            "SPI {spi:08x} missing:\n{text}"
        );
    }

    // Decrypted: the inner ICMP between client and server, both ways, on both SPIs.
    let icmp = tshark(
        &pcap,
        &keys,
        "icmp",
        &["esp.spi", "ip.src", "ip.dst", "icmp.type"],
    );
    let has = |spi: u32, src: &str, dst: &str, ty: &str| {
        icmp.iter().any(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            f.len() == 4
                && u32::from_str_radix(f[0].trim_start_matches("0x"), 16).ok() == Some(spi)
                && f[1].split(',').any(|a| a == src)
                && f[2].split(',').any(|a| a == dst)
                && f[3] == ty
        })
    };
    // gwa sends with gwb's inbound SPI (SPI_B) and receives on its own (SPI_A).
    assert!(
        has(SPI_B, SiteToSite::CLIENT, SiteToSite::SERVER, "8"),
        "no decrypted echo request on SPI {SPI_B:08x}: {icmp:?}\n{text}"
    );
    assert!(
        has(SPI_A, SiteToSite::SERVER, SiteToSite::CLIENT, "0"),
        "no decrypted echo reply on SPI {SPI_A:08x}: {icmp:?}\n{text}"
    );
    assert!(icmp.len() >= 8, "too few decrypted ICMP packets: {icmp:?}");
    let malformed = tshark(
        &pcap,
        &keys,
        "_ws.malformed || esp.icv_bad == 1",
        &["frame.number"],
    );
    assert!(malformed.is_empty(), "malformed packets: {malformed:?}");
    let esp = tshark(&pcap, &keys, "esp", &["frame.number"]);
    assert!(
        esp.len() >= icmp.len(),
        "ESP {} < ICMP {}",
        esp.len(),
        icmp.len()
    );

    // Without the exported keys the same capture shows no ICMP.
    let empty = scratch.path().join("no-keys");
    std::fs::create_dir_all(&empty).unwrap();
    let blind = tshark(&pcap, &empty, "icmp", &["frame.number"]);
    assert!(blind.is_empty(), "ICMP visible without keys: {blind:?}");
    eprintln!(
        "ops_wireshark ({label}): {} ESP packets, {} decrypted ICMP",
        esp.len(),
        icmp.len()
    );
}

#[test]
fn tshark_decrypts_raw_esp_with_exported_keys() {
    capture_and_decrypt("opswsk-raw", false);
}

#[test]
fn tshark_decrypts_esp_in_udp_with_exported_keys() {
    capture_and_decrypt("opswsk-udp", true);
}
