//! Prometheus and Grafana for real: a real Prometheus server (Debian `prometheus`) scrapes
//! the four real daemons of a gateway with a tunnel carrying traffic, using the shipped
//! `ops/prometheus/prometheus.yml` unchanged, and the test checks through its HTTP API that
//! - every daemon's target is up and the key series exist and move (tunnels up, ESP bytes
//!   and packets, DPD probes and a dead verdict, HA role and HA link messages);
//! - every alert rule of `ops/prometheus/haven-alerts.yml` loads and evaluates, and its unit
//!   tests (`haven-alerts.test.yml`, `promtool test rules`) pass;
//! - every dashboard's `member` variable, asked as Grafana does
//!   (`/api/v1/label/member/values?match[]=…`), lists this gateway's member;
//! - every query of every panel of every dashboard in `ops/grafana/dashboards/` parses and
//!   runs, as an instant and as a range query, with `$member` as "All" (`.*`) and as each
//!   member (only ever inside `member=~"$member"`, so a multi-value selection works); the key
//!   panels return data both ways, and every metric a query names is exported by the
//!   daemons (a renamed metric fails here), except the few series that only exist after an
//!   event (a dead verdict, a failover, a forged HA datagram), which must still be
//!   registered under that name in the daemons' sources;
//! - the dashboards' JSON is what `ops/grafana/gen-dashboards.py` writes.
//!
//! The gateway is gwb of the manual-key pair of the `espd_*` suites (ikemgr + espd on both
//! sides), with dpdmon and hasyncd added and a one-member FGCP cluster plus an FGSP peer
//! list in its configuration, so that the HA series exist. Prometheus runs inside gwb's
//! namespace, where the daemons listen on their default 127.0.0.1:9701..9704.

mod espd_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bus_schema::{ctl_call, CtlReply, CtlRequest, DaemonKind};
use espd_common::{Gw, Pair};
use haven_tests::daemons::{bin, wait_for, workspace_root, DAEMONS};
use haven_tests::netns::{Netns, Proc, ScratchDir, SiteToSite};
use serde_json::Value;

/// gwb's extra configuration: a one-member FGCP cluster (heartbeats on in0) and gwa as its
/// FGSP peer.
const HA_EXTRA: &str = r#"
config system ha
    set group-id 7
    set group-name "opsprom"
    set mode a-p
    set password "ops-prometheus-test-secret"
    set hbdev "in0" 50
    set priority 100
end
config system standalone-cluster
    set standalone-group-id 3
    set group-member-id 1
    set psksecret "ops-prometheus-fgsp-secret"
    config cluster-peer
        edit 1
            set peerip 172.31.0.1
        next
    end
end
"#;

/// Appended to gwa's configuration before its hasyncd starts: gwb as FGSP peer.
const FGSP_A: &str = r#"
config system standalone-cluster
    set standalone-group-id 3
    set group-member-id 2
    set psksecret "ops-prometheus-fgsp-secret"
    config cluster-peer
        edit 1
            set peerip 172.31.0.2
        next
    end
end
"#;

/// Series that exist only after an event this test does not cause, with the event.
const EVENT_ONLY: [(&str, &str); 4] = [
    ("hasyncd_failovers_total", "a failover"),
    (
        "hasyncd_sync_lag_seconds",
        "a sync update from a peer (tests/tests/ops_lab.rs sees it)",
    ),
    (
        "hasyncd_sync_updates_applied_total",
        "a sync update from a peer (tests/tests/ops_lab.rs sees it)",
    ),
    (
        "hasyncd_link_drops_total",
        "a forged or replayed HA datagram",
    ),
];

/// Series Prometheus itself adds to every target.
const SCRAPE_SERIES: [&str; 1] = ["up"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Grafana's variables, as the test substitutes them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$__range", "2m")
        .replace("$member", ".*")
}

fn spawn_daemon(gw: &Gw, daemon: &str) -> Proc {
    let log = gw.dir.path().join(format!("{daemon}-ops.log"));
    let f = std::fs::File::create(log).expect("log file");
    let mut cmd = gw.ns.command(bin(daemon));
    cmd.arg("--config")
        .arg(&gw.conf)
        .arg("--run-dir")
        .arg(&gw.run)
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f);
    gw.ns.spawn_command(cmd).expect("spawn daemon")
}

/// `curl` inside `ns`; the body on HTTP success.
fn curl(ns: &Netns, url: &str, query: Option<&str>) -> Result<String, String> {
    let mut args = vec!["-sS", "--fail", "--max-time", "5", "-G", url];
    let q;
    if let Some(query) = query {
        q = format!("query={query}");
        args.extend(["--data-urlencode", q.as_str()]);
    }
    let out = ns
        .exec("curl", &args)
        .map_err(|e| format!("curl {url}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {url} {query:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const PROM: &str = "http://127.0.0.1:9090";

/// An instant query; the `data.result` array.
fn query(ns: &Netns, expr: &str) -> Result<Vec<Value>, String> {
    let body = curl(ns, &format!("{PROM}/api/v1/query"), Some(expr))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("query {expr:?}: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// A range query over the last two minutes, as a Grafana time-series panel runs it; the
/// `data.result` array.
fn query_range(ns: &Netns, expr: &str) -> Result<Vec<Value>, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let url = format!(
        "{PROM}/api/v1/query_range?start={}&end={now}&step=5",
        now.saturating_sub(120)
    );
    let body = curl(ns, &url, Some(expr))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("range query {expr:?}: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// What Grafana asks Prometheus for a `label_values(SELECTOR, LABEL)` variable:
/// `/api/v1/label/LABEL/values?match[]=SELECTOR`; the values.
fn label_values(ns: &Netns, definition: &str) -> Result<Vec<String>, String> {
    let inner = definition
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("not a label_values() variable: {definition}"))?;
    let (selector, label) = inner
        .rsplit_once(',')
        .ok_or_else(|| format!("label_values() without a label: {definition}"))?;
    let out = ns
        .exec(
            "curl",
            &[
                "-sS",
                "--fail",
                "--max-time",
                "5",
                "-G",
                &format!("{PROM}/api/v1/label/{}/values", label.trim()),
                "--data-urlencode",
                &format!("match[]={}", selector.trim()),
            ],
        )
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Every dashboard's template variables: (dashboard uid, name, `label_values(...)` query).
fn dashboard_variables(dir: &Path) -> Vec<(String, String, String)> {
    let mut vars = Vec::new();
    for e in std::fs::read_dir(dir).expect("ops/grafana/dashboards") {
        let p = e.expect("dir entry").path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let uid = v["uid"].as_str().unwrap_or("").to_string();
        for t in v["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            assert_eq!(
                t["type"], "query",
                "{uid}: variable {t} is not a query variable"
            );
            assert_eq!(t["datasource"]["uid"], "haven-prometheus", "{uid}: {t}");
            let q = t["query"]["query"].as_str().unwrap_or("").to_string();
            vars.push((uid.clone(), t["name"].as_str().unwrap_or("").to_string(), q));
        }
    }
    vars.sort();
    vars
}

/// The largest value of an instant query's result.
fn max_value(result: &[Value]) -> Option<f64> {
    result
        .iter()
        .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// Metric names a PromQL expression reads (a small lexer: skips strings, label matchers,
/// ranges, numbers, Grafana variables, functions, aggregations, keywords and the label
/// lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const WORDS: [&str; 19] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "inf",
    ];
    let b: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        let mut quote: Option<char> = None;
        while *i < b.len() {
            let c = b[*i];
            *i += 1;
            match quote {
                Some(_) if c == '\\' => *i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == close => return,
                None => {}
            }
        }
    };
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            let mut j = i;
            while j < b.len() && b[j] != c {
                j += if b[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '{' {
            i += 1;
            skip_to(&mut i, '}');
        } else if c == '[' {
            i += 1;
            skip_to(&mut i, ']');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            i += 1;
            while i < b.len() && (is_ident(b[i]) || b[i] == '.') {
                i += 1;
            }
        } else if is_ident(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            let mut j = i;
            while j < b.len() && b[j].is_whitespace() {
                j += 1;
            }
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if j < b.len() && b[j] == '(' {
                    i = j + 1;
                    skip_to(&mut i, ')');
                }
            } else if j < b.len() && b[j] == '(' {
                // A function or an aggregation.
            } else if !WORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_of_promql() {
    let n = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        n(
            r#"sum by (member, direction) (rate(espd_bytes_total{member=~"$member", x="a}b"}[$__rate_interval])) * 8"#
        ),
        vec!["espd_bytes_total"]
    );
    assert_eq!(
        n("rate(a_total[5m]) > 0 or on (job) rate(b_total[5m]) > 1e3"),
        vec!["a_total", "b_total"]
    );
    assert_eq!(
        n(r#"up{job=~"ikemgr|espd"} == 0 and ignoring(x) changes(c[1h]) unless d offset 5m"#),
        vec!["c", "d", "up"]
    );
    assert_eq!(n("sum without(a) (x) / count(y)"), vec!["x", "y"]);
}

/// Every metric name in the daemons' own /metrics text.
fn exported_names(ns: &Netns) -> Result<BTreeSet<String>, String> {
    let mut names = BTreeSet::new();
    for (i, d) in DAEMONS.iter().enumerate() {
        let text = curl(ns, &format!("http://127.0.0.1:{}/metrics", 9701 + i), None)
            .map_err(|e| format!("{d}: {e}"))?;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name: String = line
                .chars()
                .take_while(|c| *c != '{' && *c != ' ')
                .collect();
            names.insert(name);
        }
    }
    Ok(names)
}

/// A name counts as exported if the daemons print it, or print it with a suffix Prometheus
/// derives (`_sum`/`_count`/`_bucket` of a summary or histogram).
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_sum", "_count", "_bucket"]
            .iter()
            .any(|s| exported.contains(&format!("{name}{s}")))
}

/// True if `"name"` appears in a Rust source of a daemon (so the series can exist).
fn registered_in_sources(name: &str) -> bool {
    let root = workspace_root();
    let needle = format!("\"{name}\"");
    let mut stack: Vec<PathBuf> = ["ikemgr", "dpdmon", "hasyncd", "espd", "bus-schema"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if p.ends_with("target") || p.ends_with("fuzz") {
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if p.extension().is_some_and(|e| e == "rs")
            && std::fs::read_to_string(&p).is_ok_and(|s| s.contains(&needle))
        {
            return true;
        }
    }
    false
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool not found: run ops/install-deps");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (dashboard uid, panel title, queries) of every panel.
fn dashboard_panels(dir: &Path) -> Vec<(String, String, Vec<String>)> {
    let mut panels = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("ops/grafana/dashboards")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "dashboards missing in {}", dir.display());
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let uid = v["uid"].as_str().expect("dashboard uid").to_string();
        for p in v["panels"].as_array().expect("panels") {
            assert_eq!(
                p["datasource"]["uid"], "haven-prometheus",
                "{uid}: panel {} uses another datasource",
                p["title"]
            );
            let exprs: Vec<String> = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| t["expr"].as_str().expect("expr").to_string())
                .collect();
            assert!(
                !exprs.is_empty(),
                "{uid}: panel {} has no query",
                p["title"]
            );
            panels.push((uid.clone(), p["title"].as_str().unwrap().to_string(), exprs));
        }
    }
    panels
}

/// The committed dashboards are exactly what the generator writes; returns its key panels.
fn generated_dashboards_match(dash_dir: &Path) -> Vec<(String, String)> {
    let gen = workspace_root().join("ops/grafana/gen-dashboards.py");
    let tmp = ScratchDir::new("grafana-gen").expect("scratch");
    let out = Command::new("python3")
        .arg(&gen)
        .arg("--out")
        .arg(tmp.path())
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        let committed = std::fs::read_to_string(dash_dir.join(name)).unwrap_or_default();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            committed,
            "{:?} differs from gen-dashboards.py's output: run ops/grafana/gen-dashboards.py",
            name
        );
    }
    let out = Command::new("python3")
        .arg(&gen)
        .arg("--key-panels")
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(u, t)| (u.to_string(), t.to_string()))
        .collect()
}

#[test]
fn prometheus_scrapes_every_daemon_and_dashboards_query_real_series() {
    let prom_dir = workspace_root().join("ops/prometheus");
    let config = prom_dir.join("prometheus.yml");
    promtool(&["check", "config", config.to_str().unwrap()]);
    promtool(&[
        "check",
        "rules",
        prom_dir.join("haven-alerts.yml").to_str().unwrap(),
    ]);
    // The alerts' semantics: which series fire which alert, when, with which text.
    promtool(&[
        "test",
        "rules",
        prom_dir.join("haven-alerts.test.yml").to_str().unwrap(),
    ]);
    let dash_dir = workspace_root().join("ops/grafana/dashboards");
    let key_panels = generated_dashboards_match(&dash_dir);
    assert!(key_panels.len() > 20, "key panels: {key_panels:?}");

    let mut pair = Pair::with_extra("opsprom", false, HA_EXTRA);
    let gw = &pair.b;
    let ns = gw.ns.clone();
    let _dpdmon = spawn_daemon(gw, "dpdmon");
    let _hasyncd = spawn_daemon(gw, "hasyncd");
    // gwa's ikemgr and espd have read their configuration; its hasyncd reads it with FGSP.
    let conf_a = std::fs::read_to_string(&pair.a.conf).expect("gwa config");
    std::fs::write(&pair.a.conf, conf_a + FGSP_A).expect("gwa config");
    let _hasyncd_a = spawn_daemon(&pair.a, "hasyncd");
    pair.wait_ping();
    // Traffic for the whole test: 5 pings a second from the client to the server.
    let _pinger = pair
        .topo
        .client
        .spawn("ping", &["-n", "-i", "0.2", SiteToSite::SERVER])
        .expect("ping");

    let data = ScratchDir::new("opsprom-tsdb").expect("scratch");
    let log = std::fs::File::create(data.path().join("prometheus.log")).unwrap();
    let mut cmd = ns.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.path().join("tsdb").display()
        ))
        .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let _prom = ns
        .spawn_command(cmd)
        .expect("prometheus not found: run ops/install-deps");
    let prom_log =
        || std::fs::read_to_string(data.path().join("prometheus.log")).unwrap_or_default();

    // Every daemon's target is up.
    wait_for("all four targets up", Duration::from_secs(60), || {
        let body = curl(&ns, &format!("{PROM}/api/v1/targets"), None)
            .map_err(|e| format!("{e}\n{}", prom_log()))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let targets = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for d in DAEMONS {
            let t = targets
                .iter()
                .find(|t| t["labels"]["job"] == d)
                .ok_or_else(|| format!("no target for {d}: {body}"))?;
            if t["health"] != "up" {
                return Err(format!("{d}: {} {}", t["health"], t["lastError"]));
            }
            if t["labels"]["member"] != "gw1" {
                return Err(format!("{d} has no member label: {t}"));
            }
        }
        Ok(())
    });

    // Key series exist with the values this gateway has, and move.
    let at_least = |expr: &str, min: f64| {
        wait_for(expr, Duration::from_secs(60), || {
            let r = query(&ns, expr)?;
            match max_value(&r) {
                Some(v) if v >= min => Ok(v),
                other => Err(format!("{expr} = {other:?} (want >= {min}): {r:?}")),
            }
        })
    };
    for d in DAEMONS {
        at_least(&format!("up{{job=\"{d}\"}}"), 1.0);
        at_least(&format!("{d}_uptime_seconds"), 0.0);
    }
    at_least(r#"ikemgr_tunnels{state="up"}"#, 1.0);
    at_least("ikemgr_child_sas", 1.0);
    at_least("espd_sas", 1.0);
    at_least("espd_datapath_up", 1.0);
    at_least(r#"dpdmon_tunnels{state="idle"}"#, 0.0);
    at_least("hasyncd_role", 0.0);
    at_least(r#"hasyncd_sync_messages_sent_total{link="fgcp"}"#, 1.0);
    // Bytes and packets move: the counters grow between scrapes.
    at_least(r#"increase(espd_bytes_total{direction="out"}[20s])"#, 1.0);
    at_least(r#"increase(espd_packets_total{direction="in"}[20s])"#, 1.0);
    at_least(r#"increase(hasyncd_sync_messages_sent_total[20s])"#, 1.0);
    at_least("hasyncd_fgsp_detected_peers", 1.0);
    at_least(
        r#"increase(hasyncd_sync_messages_received_total{link="fgsp"}[20s])"#,
        1.0,
    );

    // DPD: gwb probes its silent peer and declares it dead. Manual-key tunnels carry no DPD
    // settings, so vpn1 gets short on-idle ones at run time (3 probes 3 s apart), then
    // gwa's ikemgr and espd are killed.
    let dpd = rt()
        .block_on(ctl_call(
            &gw.run,
            DaemonKind::Dpdmon,
            &CtlRequest::Command {
                name: "dpd-set".into(),
                args: ["vpn1", "on-idle", "3", "3000"].map(String::from).to_vec(),
            },
            Duration::from_secs(2),
        ))
        .expect("dpd-set");
    assert!(matches!(dpd, CtlReply::View(_)), "dpd-set: {dpd:?}");
    pair.a.espd.take();
    pair.a.ikemgr.take();
    at_least("dpdmon_probes_sent_total", 1.0);
    at_least(r#"max_over_time(dpdmon_tunnels{state="probing"}[2m])"#, 1.0);
    at_least("dpdmon_dead_peers_total", 1.0);
    at_least("dpdmon_detection_seconds_count", 1.0);

    // Alert rules loaded from haven-alerts.yml evaluate without error.
    let exported = exported_names(&ns).expect("daemon /metrics");
    let body = curl(&ns, &format!("{PROM}/api/v1/rules"), None).expect("rules");
    let rules: Value = serde_json::from_str(&body).unwrap();
    let mut all_exprs: Vec<(String, String)> = Vec::new();
    let mut nrules = 0;
    for g in rules["data"]["groups"].as_array().expect("rule groups") {
        for r in g["rules"].as_array().unwrap() {
            nrules += 1;
            wait_for(
                &format!("rule {} evaluated", r["name"]),
                Duration::from_secs(30),
                || {
                    let body = curl(&ns, &format!("{PROM}/api/v1/rules"), None)?;
                    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                    let now = v["data"]["groups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                        .find(|x| x["name"] == r["name"])
                        .ok_or("rule gone")?;
                    match now["health"].as_str() {
                        Some("ok") => Ok(()),
                        h => Err(format!("{}: health {h:?} {}", r["name"], now["lastError"])),
                    }
                },
            );
            all_exprs.push((
                format!("alert {}", r["name"]),
                r["query"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(nrules >= 9, "rules not loaded: {rules}");

    // The `member` variable of every dashboard, as Grafana fills it: the label values of
    // its selector, which must name this member.
    let vars = dashboard_variables(&dash_dir);
    assert!(vars.len() >= 5, "dashboard variables: {vars:?}");
    let mut members = Vec::new();
    for (uid, name, q) in &vars {
        assert_eq!(
            name, "member",
            "{uid}: only the member variable is substituted here"
        );
        members = wait_for(
            &format!("{uid}: values of ${name}"),
            Duration::from_secs(30),
            || {
                let v = label_values(&ns, q)?;
                if v.iter().any(|m| m == "gw1") {
                    Ok(v)
                } else {
                    Err(format!("{q} gave {v:?}"))
                }
            },
        );
    }

    // Every panel query runs, as an instant and as a range query, with `$member` = All
    // (`.*`, the variables' allValue) and = this member; key panels return data with both.
    let panels = dashboard_panels(&dash_dir);
    for (uid, title, exprs) in &panels {
        for e in exprs {
            // Grafana joins a multi-value selection as a regex: only `=~` works for it.
            let uses = e.matches("$member").count();
            let as_regex = e.matches("member=~\"$member\"").count();
            assert_eq!(
                uses, as_regex,
                "{uid}: {title}: $member outside member=~\"$member\": {e}"
            );
            for m in &members {
                let one = substitute(e).replace("member=~\".*\"", &format!("member=~\"{m}\""));
                query_range(&ns, &one).unwrap_or_else(|err| panic!("{uid}: {title}: {err}"));
            }
        }
        if key_panels.iter().any(|(u, t)| u == uid && t == title) {
            wait_for(
                &format!("data for key panel {uid}: {title} with member=gw1"),
                Duration::from_secs(30),
                || {
                    for e in exprs {
                        let one = substitute(e).replace("member=~\".*\"", "member=~\"gw1\"");
                        if !query_range(&ns, &one)?.is_empty() {
                            return Ok(());
                        }
                    }
                    Err(format!("no data for {exprs:?}"))
                },
            );
        }
        let key = key_panels.iter().any(|(u, t)| u == uid && t == title);
        let what = format!("{uid}: {title}");
        let results: Vec<usize> = exprs
            .iter()
            .map(|e| {
                query(&ns, &substitute(e))
                    .unwrap_or_else(|err| panic!("{what}: {err}"))
                    .len()
            })
            .collect();
        if key && results.iter().all(|n| *n == 0) {
            // Rates need two scrapes in their window: wait a little before failing.
            wait_for(
                &format!("data for key panel {what}"),
                Duration::from_secs(30),
                || {
                    for e in exprs {
                        if !query(&ns, &substitute(e))?.is_empty() {
                            return Ok(());
                        }
                    }
                    Err(format!("no data for {exprs:?}"))
                },
            );
        }
        for e in exprs {
            all_exprs.push((what.clone(), e.clone()));
        }
    }

    // Every metric a dashboard or alert names is one the daemons export.
    let event_only: BTreeSet<&str> = EVENT_ONLY.iter().map(|(n, _)| *n).collect();
    let mut missing = Vec::new();
    let mut checked = BTreeSet::new();
    for (what, e) in &all_exprs {
        for name in metric_names(e) {
            checked.insert(name.clone());
            if SCRAPE_SERIES.contains(&name.as_str()) || is_exported(&name, &exported) {
                continue;
            }
            if event_only.contains(name.as_str()) && registered_in_sources(&name) {
                continue;
            }
            missing.push(format!("{what}: {name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named in dashboards/alerts but not exported by the daemons:\n{}\nexported: {exported:?}",
        missing.join("\n")
    );
    assert!(
        checked.len() > 40,
        "only {} names checked: {checked:?}",
        checked.len()
    );
    eprintln!(
        "ops_prometheus: {} panels, {} rules, {} metric names checked against {} exported",
        panels.len(),
        nrules,
        checked.len(),
        exported.len()
    );
}
