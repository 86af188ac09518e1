//! `tunnel-monitor*` and `remote-gw-preempt-interval` (issue 9): values, defaults, and
//! errors with line and column.

use haven_config::*;

fn tunnel(extra_p1: &str) -> String {
    format!(
        "config vpn ipsec phase1-interface\n\
         \x20   edit \"t1\"\n\
         \x20       set interface \"port1\"\n\
         \x20       set ike-version 2\n\
         \x20       set remote-gw 192.0.2.1 192.0.2.2\n\
         \x20       set psksecret \"secret-key\"\n\
         {extra_p1}\
         \x20   next\n\
         end\n\
         config vpn ipsec phase2-interface\n\
         \x20   edit \"t1-p2\"\n\
         \x20       set phase1name \"t1\"\n\
         \x20       set src-subnet 10.1.0.0/24\n\
         \x20       set dst-subnet 10.2.0.0/24\n\
         \x20   next\n\
         end\n"
    )
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(p) => panic!("expected errors, got {:?}", p.config.phase1),
        Err(e) => e.errors,
    }
}

const MON: &str = "        set tunnel-monitor enable\n        \
                   set tunnel-monitor-destination-ip 10.2.0.1\n        \
                   set tunnel-monitor-source-ip 10.1.0.1\n";

#[test]
fn monitor_keys_and_defaults() {
    let p = parse(&tunnel("")).unwrap();
    let p1 = &p.config.phase1[0];
    assert_eq!(p1.tunnel_monitor, None);
    assert_eq!(p1.remote_gw_preempt_interval, 60);

    let p = parse(&tunnel(MON)).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let m = p.config.phase1[0].tunnel_monitor.clone().unwrap();
    assert_eq!(
        m,
        TunnelMonitor {
            destination: "10.2.0.1".parse().unwrap(),
            source: "10.1.0.1".parse().unwrap(),
            interval_ms: 3_000,
            threshold: 5,
            action: None,
        }
    );
    let p = parse(&tunnel(&format!(
        "{MON}        set tunnel-monitor-interval 0 500\n        set tunnel-monitor-threshold 3\n        \
         set tunnel-monitor-action fail-over\n        set remote-gw-preempt-interval 0\n"
    )))
    .unwrap();
    let p1 = &p.config.phase1[0];
    let m = p1.tunnel_monitor.clone().unwrap();
    assert_eq!((m.interval_ms, m.threshold), (500, 3));
    assert_eq!(m.action, Some(MonitorAction::FailOver));
    assert_eq!(p1.remote_gw_preempt_interval, 0);
}

#[test]
fn monitor_errors_carry_line_and_column() {
    // (extra lines, line, column, text)
    let cases = [
        (
            "        set tunnel-monitor enable\n        set tunnel-monitor-source-ip 10.1.0.1\n",
            7,
            28,
            "needs set tunnel-monitor-destination-ip",
        ),
        (
            "        set tunnel-monitor enable\n        set tunnel-monitor-destination-ip 10.2.0.1\n",
            7,
            28,
            "needs set tunnel-monitor-source-ip",
        ),
        (
            "        set tunnel-monitor enable\n        set tunnel-monitor-destination-ip 10.2.0.300\n        \
             set tunnel-monitor-source-ip 10.1.0.1\n",
            8,
            43,
            "an IPv4 address",
        ),
        (
            &format!("{MON}        set tunnel-monitor-threshold 0\n"),
            10,
            38,
            "an integer 1..=100",
        ),
        (
            &format!("{MON}        set tunnel-monitor-interval 0 50\n"),
            10,
            39,
            "at least 100 ms",
        ),
        (
            &format!("{MON}        set tunnel-monitor-action reboot\n"),
            10,
            35,
            "wait-recover, fail-over",
        ),
        (
            "        set tunnel-monitor enable\n        set tunnel-monitor-destination-ip 224.0.0.1\n        \
             set tunnel-monitor-source-ip 10.1.0.1\n",
            8,
            43,
            "unicast",
        ),
        (
            "        set remote-gw-preempt-interval 90000\n",
            7,
            40,
            "an integer 0..=86400",
        ),
    ];
    for (extra, line, col, what) in cases {
        let e = errors(&tunnel(extra));
        assert_eq!(e.len(), 1, "{extra:?}: {e:#?}");
        assert_eq!((e[0].line, e[0].col), (line, col), "{extra:?}: {}", e[0]);
        assert!(e[0].to_string().contains(what), "{extra:?}: {}", e[0]);
    }
    // A dial-up phase1 has no fixed peer to monitor.
    let text = tunnel(MON).replace("set remote-gw 192.0.2.1 192.0.2.2", "set type dynamic");
    let e = errors(&text);
    assert_eq!((e[0].line, e[0].col), (7, 28), "{}", e[0]);
    assert!(e[0].to_string().contains("static or ddns"), "{}", e[0]);
}

#[test]
fn monitor_warnings_point_at_the_keys() {
    // Outside the selectors: the probes could not cross.
    let p = parse(&tunnel(
        "        set tunnel-monitor enable\n        set tunnel-monitor-destination-ip 10.9.0.1\n        \
         set tunnel-monitor-source-ip 10.8.0.1\n",
    ))
    .unwrap();
    let w: Vec<(u32, u32, &str)> = p
        .warnings
        .iter()
        .map(|w| (w.line, w.col, w.key.as_str()))
        .collect();
    assert!(
        w.contains(&(8, 43, "tunnel-monitor-destination-ip")),
        "{w:?}"
    );
    assert!(w.contains(&(9, 38, "tunnel-monitor-source-ip")), "{w:?}");
    // Sub-keys without `tunnel-monitor enable` are ignored with a warning.
    let p = parse(&tunnel("        set tunnel-monitor-threshold 3\n")).unwrap();
    assert_eq!(p.config.phase1[0].tunnel_monitor, None);
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert_eq!(p.warnings[0].key, "tunnel-monitor-threshold");
    assert_eq!(p.warnings[0].line, 7);
}
