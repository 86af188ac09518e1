//! FGCP configuration sync (issue 6 point 2; seed 001: "The configuration is
//! automatically synchronized"): the primary's configuration reaches the secondary over
//! the encrypted HA link, but for the per-member keys (haven-config `member::PER_MEMBER`).
//!
//! The FGCP pair of `ha_failover` (see `ha_common`: all four daemons on each member, a
//! strongSwan dial-up client whose tunnel gw1 carries). Then:
//! 0. gw2 (secondary) restarts (`kill -9` of its four daemons) with a file holding only its
//!    HA settings: it joins and takes the whole configuration.
//! 1. gw2 (secondary) is edited locally (a synced key: DPD `on-demand`; per-member keys:
//!    its `hbdev` priority, a host name) and reloaded: its checksum no longer matches the
//!    primary's, it takes the primary's configuration back, keeping its per-member keys.
//! 2. gw1 (primary) gets a new phase1/phase2 (`vpn2`), DPD `on-idle` every 7 s on `vpn1`,
//!    and per-member changes of its own (priority 250, `override enable`), and is reloaded
//!    (`vpnctl config reload`): gw2's file and its ikemgr (`vpnctl show snapshot ikemgr`)
//!    get `vpn2` and the DPD change; gw2 keeps priority 100, no override, its `hbdev`; both
//!    members' checksums (`vpnctl diagnose sys ha checksum cluster`) converge.
//!    A broken file on the primary does not load there, so nothing reaches gw2. A
//!    primary configuration gw2 cannot merge (its operator staged a `mode standalone` file
//!    without `hbdev`, so the merge is `mode a-p` without a heartbeat interface) is refused:
//!    gw2 keeps its running configuration and file, counts the refusal
//!    (`hasyncd_config_sync_rejected_total{reason="merged_invalid"}`), logs line and
//!    column, both members' `checksum cluster` show the mismatch; once the primary's
//!    configuration is fixed, the checksums converge.
//! 3. gw1 dies: gw2 takes the tunnel over and runs with the synced tunnel configuration.
//!
//! Needs root, iproute2 and the strongSwan packages (INTEROP.md).

mod ha_common;

use bus_schema::DaemonKind;
use ha_common::*;
use haven_tests::daemons::{vpnctl, vpnctl_json, wait_for};
use serde_json::Value;

/// `hb-interval` 200 ms, `hb-lost-threshold` 10: this test is about configuration, and a
/// loaded machine must not fail the pair over by accident while the daemons reload.
const STEADY_HEARTBEAT: (u32, u32) = (2, 10);

/// First words of the header hasyncd writes on a synced file (haven-config
/// `member::HEADER_MARK`).
const HEADER_MARK: &str = "# haven-config-sync:";

/// The refusals of a merged configuration that does not load.
const REFUSED_MERGE: &str = "hasyncd_config_sync_rejected_total{reason=\"merged_invalid\"}";

const VPN2: &str = "config vpn ipsec phase1-interface
    edit \"vpn2\"
        set type static
        set interface \"port2\"
        set ike-version 2
        set remote-gw 192.0.2.99
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set auto-negotiate disable
        set dpd disable
        set psksecret \"vpn2-secret-0123456789\"
    next
end
config vpn ipsec phase2-interface
    edit \"vpn2\"
        set phase1name \"vpn2\"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.99.1.0 255.255.255.0
        set dst-subnet 10.99.2.0 255.255.255.0
    next
end
";

fn conf_path(m: &Member) -> std::path::PathBuf {
    m.dir.join("haven.conf")
}

fn read_conf(m: &Member) -> String {
    std::fs::read_to_string(conf_path(m)).unwrap_or_default()
}

fn reload(m: &Member) {
    let out = vpnctl(&m.run, &["config", "reload"]);
    assert!(
        out.status.success(),
        "vpnctl config reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn checksums(m: &Member) -> Result<Value, String> {
    vpnctl_json(&m.run, &["diagnose", "sys", "ha", "checksum", "cluster"])
}

/// Both members report the same running checksum, in sync, and each sees the other.
fn converged(m1: &Member, m2: &Member) -> Result<String, String> {
    let (a, b) = (checksums(m1)?, checksums(m2)?);
    let all = |v: &Value| v["running"]["all"].as_str().unwrap_or("").to_string();
    let ok = a["in_sync"] == true
        && b["in_sync"] == true
        && all(&a) == all(&b)
        && !all(&a).is_empty()
        && [&a, &b].iter().all(|v| {
            v["members"]
                .as_array()
                .is_some_and(|ms| ms.len() == 2 && ms.iter().all(|m| m["running"]["all"] == all(v)))
        });
    ok.then(|| all(&a))
        .ok_or_else(|| format!("gw1: {a}\ngw2: {b}"))
}

/// ikemgr's phase1 tunnel `name` as `vpnctl show snapshot ikemgr` shows it.
fn ikemgr_tunnel(m: &Member, name: &str) -> Option<Value> {
    let v = vpnctl_json(&m.run, &["show", "snapshot", "ikemgr"]).ok()?;
    v["items"]
        .as_array()?
        .iter()
        .find(|i| i["type"] == "Tunnel" && i["data"]["name"] == name)
        .map(|i| i["data"].clone())
}

fn metric(m: &Member, name: &str) -> f64 {
    m.ns.run("curl", &["-s", "http://127.0.0.1:9703/metrics"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_primarys_configuration_reaches_the_secondary_but_for_per_member_keys() {
    let Lab {
        scratch: _scratch,
        router: _router,
        client,
        server: _server,
        gw1,
        gw2: _gw2,
        mut m1,
        mut m2,
        charon,
        before,
        child_before: _,
    } = Lab::with_heartbeat("ha-cfgsync", "hacs", NO_DPD, STEADY_HEARTBEAT);

    // The same configuration but for the priority: in sync from the start, nothing written.
    let sum0 = wait_for("checksums agree", WAIT, || converged(&m1, &m2));
    assert!(!read_conf(&m2).contains(HEADER_MARK));
    let show = vpnctl(&m2.run, &["diagnose", "sys", "ha", "checksum", "show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("is_manage_primary()=0")
            && text.contains("debugzone")
            && text.contains("checksum")
            && text.matches("all: ").count() == 2,
        "{text}"
    );

    // 0. gw2 joins with its HA settings only (seed 001: configured on DC2_VM1, "the
    //    configuration is automatically synchronized to DC2_VM2"): all four daemons are
    //    killed and started again on a file without any tunnel.
    let ha_only = "config system ha
    set group-id 5
    set mode a-p
    set password \"ha-pair-password\"
    set hbdev \"port4\" 50
    set priority 100
    set hb-interval 2
    set hb-lost-threshold 10
end
";
    // Restarted at once, faster than gw1's loss detection (2 s): gw1 sees gw2's new link
    // epoch and sends it a snapshot of the SAs (the failover in step 3 needs them).
    std::fs::write(conf_path(&m2), ha_only).unwrap();
    for d in ["hasyncd", "espd", "ikemgr", "dpdmon"] {
        m2.kill9_and_restart(d);
    }
    wait_for(
        "the joining gw2 takes the whole configuration",
        WAIT,
        || {
            let c = read_conf(&m2);
            (c.contains(HEADER_MARK) && c.contains("config vpn ipsec phase2-interface"))
                .then_some(())
                .ok_or_else(|| format!("{c}\n{}", m2.log("hasyncd")))
        },
    );
    wait_for("the joining gw2's ikemgr runs vpn1", WAIT, || {
        ikemgr_tunnel(&m2, "vpn1")
            .map(|_| ())
            .ok_or_else(|| m2.log("ikemgr"))
    });
    assert_eq!(
        wait_for("checksums agree after the join", WAIT, || converged(
            &m1, &m2
        )),
        sum0
    );
    wait_for(
        "the restarted gw2 holds the standby IKE SA again",
        WAIT,
        || {
            let v = m2.view(DaemonKind::Hasyncd, "replicas")?;
            v["ike_standby"]
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|s| (hex_u64(&s["spi_i"]), hex_u64(&s["spi_r"])) == before.spis())
                })
                .then_some(())
                .ok_or_else(|| format!("{v}\n{}", m1.log("hasyncd")))
        },
    );
    assert!(m1.log("hasyncd").contains("restarted (new link epoch)"));

    // 1. A local change on the secondary is replaced by the primary's configuration; its
    //    per-member keys stay.
    let local = config_hb(100, "        set dpd on-demand\n", STEADY_HEARTBEAT)
        .replace("set hbdev \"port4\" 50", "set hbdev \"port4\" 60")
        + "config system global\n    set hostname \"gw2-own\"\nend\n";
    std::fs::write(conf_path(&m2), &local).unwrap();
    reload(&m2);
    wait_for("gw2 takes the primary's configuration back", WAIT, || {
        let c = read_conf(&m2);
        (c.contains(HEADER_MARK) && !c.contains("on-demand"))
            .then_some(())
            .ok_or_else(|| format!("{c}\n{}", m2.log("hasyncd")))
    });
    let c = read_conf(&m2);
    assert!(c.contains("set hbdev \"port4\" 60"), "{c}");
    assert!(c.contains("gw2-own"), "{c}");
    assert!(c.contains("set priority 100"), "{c}");
    let sum1 = wait_for("checksums agree again", WAIT, || converged(&m1, &m2));
    assert_eq!(sum1, sum0, "the synced part is the primary's again");
    wait_for("gw2's ikemgr runs the primary's DPD again", WAIT, || {
        let t = ikemgr_tunnel(&m2, "vpn1").ok_or("no vpn1")?;
        (t["dpd"]["mode"] == "disable")
            .then_some(())
            .ok_or_else(|| t.to_string())
    });

    // 2. A change on the primary: new phase1/phase2, DPD, and per-member keys of its own.
    let primary = config_hb(
        250,
        "        set dpd on-idle\n        set dpd-retryinterval 7\n",
        STEADY_HEARTBEAT,
    )
    .replace(
        "    set priority 250\n",
        "    set priority 250\n    set override enable\n",
    ) + VPN2;
    std::fs::write(conf_path(&m1), &primary).unwrap();
    reload(&m1);
    wait_for("gw2's file gets vpn2 and the DPD change", WAIT, || {
        let c = read_conf(&m2);
        (c.contains("\"vpn2\"") && c.contains("dpd-retryinterval 7"))
            .then_some(())
            .ok_or_else(|| format!("{c}\n{}", m2.log("hasyncd")))
    });
    let c = read_conf(&m2);
    assert!(
        c.contains("set priority 100") && !c.contains("priority 250"),
        "{c}"
    );
    assert!(!c.contains("override enable"), "{c}");
    assert!(
        c.contains("set hbdev \"port4\" 60") && c.contains("gw2-own"),
        "{c}"
    );
    assert_eq!(c.matches(HEADER_MARK).count(), 2, "{c}");
    let sum2 = wait_for("checksums converge on the new configuration", WAIT, || {
        converged(&m1, &m2)
    });
    assert_ne!(sum2, sum0);
    let view = vpnctl(&m1.run, &["diagnose", "sys", "ha", "checksum", "cluster"]);
    let view = String::from_utf8_lossy(&view.stdout).to_string();
    println!("gw1 # diagnose sys ha checksum cluster\n{view}");
    assert_eq!(view.matches("==================").count(), 4, "{view}");
    assert!(view.contains("in_sync=yes"), "{view}");
    wait_for("gw2's ikemgr has vpn2 and vpn1's new DPD", WAIT, || {
        let v1 = ikemgr_tunnel(&m2, "vpn1").ok_or("no vpn1")?;
        let v2 = ikemgr_tunnel(&m2, "vpn2").ok_or_else(|| format!("no vpn2; vpn1 {v1}"))?;
        (v1["dpd"]["mode"] == "on-idle" && v1["dpd"]["retry_interval_ms"] == 7000)
            .then_some(v2)
            .ok_or_else(|| v1.to_string())
    });
    assert_eq!(m1.role().as_deref(), Some("primary"));
    assert_eq!(m2.role().as_deref(), Some("secondary"));
    let st2 = m2.view(DaemonKind::Hasyncd, "ha-status").unwrap();
    assert_eq!(st2["override"], false, "override is gw2's own: {st2}");
    assert!(metric(&m2, "hasyncd_config_syncs_total") >= 2.0);
    assert_eq!(metric(&m2, "hasyncd_config_in_sync"), 1.0);
    assert_eq!(metric(&m2, "hasyncd_config_sync_rejected_total"), 0.0);
    assert!(metric(&m1, "hasyncd_config_chunks_served_total") >= 2.0);
    let log = m2.log("hasyncd");
    assert!(
        log.contains("config sync: configuration from primary member")
            && log.contains("config sync: ikemgr reloaded"),
        "{log}"
    );
    // `execute ha synchronize start`: the secondary takes the configuration again although
    // the checksums agree; the primary has nobody to take it from.
    let syncs = metric(&m2, "hasyncd_config_syncs_total");
    let out = vpnctl(&m2.run, &["execute", "ha", "synchronize", "start"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("gw2 synchronized again on request", WAIT, || {
        let n = metric(&m2, "hasyncd_config_syncs_total");
        (n > syncs).then_some(()).ok_or_else(|| format!("{n}"))
    });
    let out = vpnctl(&m1.run, &["execute", "ha", "synchronize", "start"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an FGCP secondary"));

    // The primary never took anything from the secondary.
    assert!(read_conf(&m1) == primary, "{}", read_conf(&m1));

    // A broken file on the primary: its reload is refused, so nothing reaches gw2; the
    // primary's view shows the file does not load while the running checksum stays.
    let broken = primary.replace("set dpd-retryinterval 7", "set dpd-retryinterval soon");
    std::fs::write(conf_path(&m1), &broken).unwrap();
    let out = vpnctl(&m1.run, &["config", "reload"]);
    assert!(!out.status.success(), "the broken file must not load");
    let gw2_file = read_conf(&m2);
    wait_for("gw1's view: file broken, running unchanged", WAIT, || {
        let v = vpnctl_json(&m1.run, &["diagnose", "sys", "ha", "checksum", "show"])?;
        (v["file"].is_null() && v["running"]["all"] == sum2.as_str())
            .then_some(())
            .ok_or_else(|| v.to_string())
    });
    assert_eq!(converged(&m1, &m2).expect("still in sync"), sum2);
    assert_eq!(read_conf(&m2), gw2_file);
    assert_eq!(metric(&m2, "hasyncd_config_sync_rejected_total"), 0.0);
    std::fs::write(conf_path(&m1), &primary).unwrap();

    // A primary configuration gw2 cannot take: gw2's operator staged a file that takes it
    // out of the cluster (`mode standalone`, no `hbdev`) without reloading it. gw2 keeps
    // its per-member keys from its file as it is now, so the primary's next configuration
    // merges into `mode a-p` without a heartbeat interface: refused, counted by reason,
    // logged with line and column; gw2 runs what it ran.
    let staged = "config system global\n    set hostname \"gw2-own\"\nend\nconfig system ha\n    set group-id 5\n    set mode standalone\nend\n";
    std::fs::write(conf_path(&m2), staged).unwrap();
    let refused_before = metric(&m2, REFUSED_MERGE);
    let hasyncd2_at = m2.log("hasyncd").len();
    let unmergeable = primary.replace("set dpd-retryinterval 7", "set dpd-retryinterval 9");
    std::fs::write(conf_path(&m1), &unmergeable).unwrap();
    reload(&m1);
    let refusal = wait_for("gw2 refuses the merge", WAIT, || {
        m2.log_since("hasyncd", hasyncd2_at)
            .lines()
            .find(|l| l.contains("refused, running configuration kept"))
            .map(str::to_string)
            .ok_or_else(|| m2.logs())
    });
    eprintln!("gw2 hasyncd: {refusal}");
    assert!(
        refusal.contains("the merged configuration does not load")
            && refusal.contains("line ")
            && refusal.contains("column ")
            && refusal.contains("hbdev"),
        "{refusal}"
    );
    assert_eq!(read_conf(&m2), staged, "gw2's file is its operator's");
    assert!(metric(&m2, REFUSED_MERGE) > refused_before);
    wait_for("the mismatch shows on both members", WAIT, || {
        let (a, b) = (checksums(&m1)?, checksums(&m2)?);
        let gw2_running = b["running"]["all"].as_str().unwrap_or("").to_string();
        (a["in_sync"] == false
            && b["in_sync"] == false
            && gw2_running == sum2
            && a["running"]["all"] != sum2.as_str()
            && metric(&m2, "hasyncd_config_in_sync") == 0.0)
            .then_some(())
            .ok_or_else(|| format!("gw1: {a}\ngw2: {b}"))
    });
    let view = vpnctl(&m2.run, &["diagnose", "sys", "ha", "checksum", "cluster"]);
    let view = String::from_utf8_lossy(&view.stdout).to_string();
    println!("gw2 # diagnose sys ha checksum cluster (refused)\n{view}");
    assert!(view.contains("in_sync=no"), "{view}");
    let v1 = ikemgr_tunnel(&m2, "vpn1").expect("vpn1 on gw2");
    assert_eq!(
        v1["dpd"]["retry_interval_ms"], 7000,
        "gw2 runs what it ran: {v1}"
    );
    // The primary's configuration is fixed (back to what gw2 runs): in sync again.
    std::fs::write(conf_path(&m1), &primary).unwrap();
    reload(&m1);
    assert_eq!(
        wait_for("checksums converge after the fix", WAIT, || converged(
            &m1, &m2
        )),
        sum2
    );
    assert_eq!(metric(&m2, "hasyncd_config_in_sync"), 1.0);
    std::fs::write(conf_path(&m2), &gw2_file).unwrap();

    // 3. gw1 dies: gw2 carries the tunnel with the configuration it was given.
    m1.kill_all();
    gw1.ip(&["link", "set", "port2", "down"]).unwrap();
    wait_for("gw2 primary", WAIT, || match m2.role() {
        Some(r) if r == "primary" => Ok(()),
        other => Err(format!("{other:?}\n{}", m2.logs())),
    });
    wait_for("gw2 took the IKE SA over", WAIT, || {
        m2.ike_sa()
            .filter(|(i, r, _)| (*i, *r) == before.spis())
            .ok_or_else(|| m2.logs())
    });
    wait_for("ping through gw2", WAIT, || {
        let (sent, got) = ping_burst(&client, 2);
        (got > 0)
            .then_some(())
            .ok_or_else(|| format!("{got}/{sent}\n{}", m2.logs()))
    });
    let v1 = ikemgr_tunnel(&m2, "vpn1").expect("vpn1 on gw2");
    assert_eq!(v1["dpd"]["mode"], "on-idle", "{v1}");
    assert!(ikemgr_tunnel(&m2, "vpn2").is_some());
    let inst = ikemgr_tunnel(&m2, "vpn1_1").expect("vpn1_1 on gw2");
    assert_eq!(
        inst["dpd"]["mode"], "on-idle",
        "the taken-over tunnel: {inst}"
    );
    assert_eq!(
        inst["dpd"]["retry_interval_ms"], 7000,
        "the taken-over tunnel: {inst}"
    );
    let after = client_sa(&charon).expect("client IKE SA");
    assert_eq!(after.spis(), before.spis(), "no renegotiation");
}
