#!/usr/bin/env python3
"""Writes Haven's Grafana dashboards (ops/grafana/dashboards/*.json) from the panel lists below.

Edit this file, not the JSON, then run:  ops/grafana/gen-dashboards.py
tests/tests/ops_prometheus.rs checks that the JSON is what this script writes, runs every
panel's query against a real Prometheus scraping real daemons, and checks that every metric
named in a query is exported by the daemons.

Panels whose key ends in "!" are key panels: the test requires them to return data on a
gateway with a tunnel carrying traffic. Queries may use $member, $__rate_interval, $__range.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "haven-prometheus"}
DAEMON_JOBS = 'job=~"ikemgr|dpdmon|hasyncd|espd"'
M = 'member=~"$member"'
LAG_DESC = 'Sync lag: seconds since this member applied the last sync update (IKE SA, message IDs, CHILD SA, deletion, lease, claim; not a heartbeat) from each peer. An age, not a queue: it grows on an idle cluster; it should drop back after each IKE exchange, rekey or lease on the carrier. Empty until a peer sent an update. See hasyncd/src/lag.rs.'


def q(expr, legend=""):
    return {"expr": expr, "legend": legend}


def panel(title, kind, queries, unit="short", desc="", key=False, mappings=None):
    return {"title": title, "kind": kind, "queries": queries, "unit": unit, "desc": desc,
            "key": key, "mappings": mappings or []}


def daemon_row(d):
    """Process and bus health of one daemon."""
    sel = f'{M}'
    return [
        panel("Up", "stat", [q(f'up{{job="{d}", {sel}}}', "{{member}}")], key=True,
              mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                      "1": {"text": "UP", "color": "green"}}}]),
        panel("Uptime", "stat", [q(f'{d}_uptime_seconds{{{sel}}}', "{{member}}")], unit="s", key=True),
        panel("Restarts (range)", "stat",
              [q(f'changes(process_start_time_seconds{{job="{d}", {sel}}}[$__range])', "{{member}}")],
              key=True),
        panel("Resident memory", "timeseries",
              [q(f'process_resident_memory_bytes{{job="{d}", {sel}}}', "{{member}}")], unit="bytes", key=True),
        panel("CPU", "timeseries",
              [q(f'rate(process_cpu_seconds_total{{job="{d}", {sel}}}[$__rate_interval])', "{{member}}")],
              unit="percentunit", key=True),
        panel("Bus messages / s", "timeseries", [
            q(f'rate({d}_bus_messages_published_total{{{sel}}}[$__rate_interval])', "{{member}} published"),
            q(f'rate({d}_bus_messages_received_total{{{sel}}}[$__rate_interval])', "{{member}} received"),
        ], unit="ops", key=True),
        panel("Bus gaps, snapshots, decode errors", "timeseries", [
            q(f'increase({d}_bus_gaps_total{{{sel}}}[$__rate_interval])', "{{member}} gaps"),
            q(f'increase({d}_bus_snapshots_applied_total{{{sel}}}[$__rate_interval])', "{{member}} snapshots applied"),
            q(f'increase({d}_bus_snapshots_served_total{{{sel}}}[$__rate_interval])', "{{member}} snapshots served"),
            q(f'increase({d}_bus_decode_errors_total{{{sel}}}[$__rate_interval])', "{{member}} decode errors"),
            q(f'increase({d}_bus_send_errors_total{{{sel}}}[$__rate_interval])', "{{member}} send errors"),
        ]),
        panel("Control requests / s", "timeseries", [
            q(f'rate({d}_ctl_requests_total{{{sel}}}[$__rate_interval])', "{{member}} requests"),
            q(f'rate({d}_ctl_errors_total{{{sel}}}[$__rate_interval])', "{{member}} errors"),
        ], unit="reqps"),
        panel("Debug sessions attached", "stat", [q(f'{d}_debug_sessions{{{sel}}}', "{{member}}")]),
        panel("Debug lines dropped", "timeseries",
              [q(f'increase({d}_debug_lines_dropped_total{{{sel}}}[$__rate_interval])', "{{member}}")]),
    ]


ROLE_MAP = [{"type": "value", "options": {
    "2": {"text": "primary", "color": "green"}, "1": {"text": "secondary", "color": "blue"},
    "0": {"text": "hello", "color": "yellow"}, "-1": {"text": "no FGCP", "color": "text"}}}]

DASHBOARDS = {
    "haven-overview": ("Haven: overview", "Every member at a glance: tunnels, traffic, drops, DPD, HA, daemons.", [
        panel("Tunnels up per member", "stat",
              [q(f'sum by (member) (ikemgr_tunnels{{state="up", {M}}})', "{{member}}")], key=True),
        panel("IKE SAs established", "stat",
              [q(f'sum by (member) (ikemgr_ike_sas{{state="established", {M}}})', "{{member}}")]),
        panel("ESP SAs installed (espd)", "stat",
              [q(f'sum by (member) (espd_sas{{{M}}})', "{{member}}")], key=True),
        panel("Throughput", "timeseries",
              [q(f'sum by (member, direction) (rate(espd_bytes_total{{{M}}}[$__rate_interval])) * 8',
                 "{{member}} {{direction}}")], unit="bps", key=True),
        panel("Drops by reason", "timeseries",
              [q(f'sum by (member, reason) (rate(espd_drops_total{{{M}}}[$__rate_interval]))',
                 "{{member}} {{reason}}")], unit="pps", key=True),
        panel("DPD state of tunnels", "timeseries",
              [q(f'sum by (member, state) (dpdmon_tunnels{{{M}}})', "{{member}} {{state}}")], key=True),
        panel("HA role (FGCP)", "stat", [q(f'hasyncd_role{{{M}}}', "{{member}}")], key=True, mappings=ROLE_MAP),
        panel("Tunnels by HA role (FGSP)", "timeseries",
              [q(f'sum by (member, role) (hasyncd_tunnels{{{M}}})', "{{member}} {{role}}")], key=True),
        panel("Failovers (range)", "stat",
              [q(f'sum by (member) (increase(hasyncd_failovers_total{{{M}}}[$__range]))', "{{member}}")]),
        panel("HA sync messages / s", "timeseries", [
            q(f'sum by (member, link) (rate(hasyncd_sync_messages_sent_total{{{M}}}[$__rate_interval]))',
              "{{member}} {{link}} sent"),
            q(f'sum by (member, link) (rate(hasyncd_sync_messages_received_total{{{M}}}[$__rate_interval]))',
              "{{member}} {{link}} received")], unit="ops", key=True),
        panel("HA sync lag (age of the last update applied, per peer)", "timeseries",
              [q(f'max by (member, link, peer) (hasyncd_sync_lag_seconds{{{M}}})', "{{member}} {{link}} from {{peer}}")],
              unit="s", desc=LAG_DESC),
        panel("Daemons up", "stat", [q(f'up{{{DAEMON_JOBS}, {M}}}', "{{member}} {{job}}")], key=True,
              mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                      "1": {"text": "UP", "color": "green"}}}]),
        panel("Daemon restarts (range)", "stat",
              [q(f'changes(process_start_time_seconds{{{DAEMON_JOBS}, {M}}}[$__range])', "{{member}} {{job}}")],
              key=True),
    ]),
    "haven-ikemgr": ("Haven: tunnels (ikemgr)", "Tunnels, IKE SAs and CHILD SAs as ikemgr sees them.", [
        panel("Tunnels by state", "timeseries",
              [q(f'sum by (member, state) (ikemgr_tunnels{{{M}}})', "{{member}} {{state}}")], key=True),
        panel("IKE SAs by state", "timeseries",
              [q(f'sum by (member, state) (ikemgr_ike_sas{{{M}}})', "{{member}} {{state}}")], key=True),
        panel("CHILD SA pairs", "timeseries", [q(f'ikemgr_child_sas{{{M}}}', "{{member}}")], key=True),
        panel("IKE datagrams relayed by espd (UDP 4500)", "timeseries",
              [q(f'rate(espd_ike_relayed_total{{{M}}}[$__rate_interval])', "{{member}} {{direction}}")],
              unit="pps"),
    ] + daemon_row("ikemgr")),
    "haven-dpdmon": ("Haven: dead peer detection (dpdmon)", "DPD states, probes and verdicts.", [
        panel("Tunnels by DPD state", "timeseries",
              [q(f'sum by (member, state) (dpdmon_tunnels{{{M}}})', "{{member}} {{state}}")], key=True),
        panel("Probes / s", "timeseries", [
            q(f'rate(dpdmon_probes_sent_total{{{M}}}[$__rate_interval])', "{{member}} sent"),
            q(f'rate(dpdmon_probe_replies_total{{{M}}}[$__rate_interval])', "{{member}} replies"),
            q(f'rate(dpdmon_probe_failures_total{{{M}}}[$__rate_interval])', "{{member}} failures"),
        ], unit="ops", key=True),
        panel("Dead peers (range)", "stat",
              [q(f'increase(dpdmon_dead_peers_total{{{M}}}[$__range])', "{{member}}")], key=True),
        panel("Detection time (quantiles)", "timeseries",
              [q(f'dpdmon_detection_seconds{{{M}}}', "{{member}} q{{quantile}}")], unit="s",
              desc="Time from the start of a peer's silence to its dead verdict; empty until a verdict."),
        panel("Detection time / configured budget", "timeseries",
              [q(f'dpdmon_detection_budget_ratio{{{M}}}', "{{member}} q{{quantile}}")],
              desc="1.0 means the verdict came exactly at retrycount x retryinterval."),
    ] + daemon_row("dpdmon")),
    "haven-hasyncd": ("Haven: HA (hasyncd)", "FGCP roles, FGSP peers, tunnel roles and the HA link.", [
        panel("FGCP role", "stat", [q(f'hasyncd_role{{{M}}}', "{{member}}")], key=True, mappings=ROLE_MAP),
        panel("Tunnels by role", "timeseries",
              [q(f'sum by (member, role) (hasyncd_tunnels{{{M}}})', "{{member}} {{role}}")], key=True),
        panel("Standby CHILD SAs held", "timeseries",
              [q(f'hasyncd_standby_child_sas{{{M}}}', "{{member}}")], key=True),
        panel("FGSP peers heard", "stat", [q(f'hasyncd_fgsp_detected_peers{{{M}}}', "{{member}}")], key=True),
        panel("HA link bytes / s", "timeseries", [
            q(f'rate(hasyncd_sync_bytes_sent_total{{{M}}}[$__rate_interval])', "{{member}} {{link}} sent"),
            q(f'rate(hasyncd_sync_bytes_received_total{{{M}}}[$__rate_interval])', "{{member}} {{link}} received"),
        ], unit="Bps", key=True),
        panel("HA link datagrams rejected", "timeseries",
              [q(f'sum by (member, link, reason) (increase(hasyncd_link_drops_total{{{M}}}[$__rate_interval]))',
                 "{{member}} {{link}} {{reason}}")],
              desc="Forged, replayed or undecryptable HA datagrams; empty while there are none."),
        panel("Sync lag per peer", "timeseries",
              [q(f'hasyncd_sync_lag_seconds{{{M}}}', "{{member}} {{link}} from {{peer}}")],
              unit="s", desc=LAG_DESC),
        panel("Sync updates applied / s", "timeseries",
              [q(f'rate(hasyncd_sync_updates_applied_total{{{M}}}[$__rate_interval])',
                 "{{member}} {{link}} from {{peer}}")], unit="ops",
              desc="Sync updates (not heartbeats) applied from each peer; empty until a peer sent one."),
        panel("Failovers", "timeseries",
              [q(f'increase(hasyncd_failovers_total{{{M}}}[$__rate_interval])', "{{member}}")],
              desc="Times this member took the primary role over; empty until the first one."),
        panel("Peers heard", "timeseries", [
            q(f'hasyncd_fgcp_peers{{{M}}}', "{{member}} FGCP members heard"),
            q(f'hasyncd_fgsp_detected_peers{{{M}}}', "{{member}} FGSP peers heard"),
            q(f'hasyncd_fgsp_peers_configured{{{M}}}', "{{member}} FGSP peers configured"),
        ], key=True,
              desc="Other FGCP members and FGSP peers whose heartbeats arrive. An FGCP member alone can fail over to nobody; FGSP peers heard below those configured cannot take its tunnels."),
        panel("Configuration in sync (FGCP)", "stat",
              [q(f'hasyncd_config_in_sync{{{M}}}', "{{member}}")], key=True,
              mappings=[{"type": "value", "options": {"0": {"text": "OUT OF SYNC", "color": "red"},
                                                      "1": {"text": "in sync", "color": "green"}}}],
              desc="1 when the member's running configuration checksum is its FGCP primary's (on the primary: every member heard agrees). Also 0 without FGCP. Details: vpnctl diagnose sys ha checksum cluster."),
        panel("Configuration syncs and refusals", "timeseries", [
            q(f'sum by (member) (increase(hasyncd_config_syncs_total{{{M}}}[$__rate_interval]))', "{{member}} taken from the primary"),
            q(f'sum by (member, reason) (increase(hasyncd_config_sync_rejected_total{{{M}}}[$__rate_interval]))', "{{member}} refused: {{reason}}"),
            q(f'sum by (member, daemon) (increase(hasyncd_config_reload_failures_total{{{M}}}[$__rate_interval]))', "{{member}} reload failed: {{daemon}}"),
        ], key=True,
              desc="Configurations a secondary took from its FGCP primary, refused (by reason: the text, this member's file or their merge does not load, checksum, write, transfer) and daemons that did not confirm the reload. hasyncd's log has the first error with line and column."),
    ] + daemon_row("hasyncd")),
    "haven-espd": ("Haven: ESP datapath (espd)", "Packets, bytes, drops and SAs of the datapath.", [
        panel("Datapath up", "stat", [q(f'espd_datapath_up{{{M}}}', "{{member}}")], key=True,
              mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                      "1": {"text": "UP", "color": "green"}}}]),
        panel("SAs installed / failed", "timeseries", [
            q(f'espd_sas{{{M}}}', "{{member}} installed"),
            q(f'espd_sas_failed{{{M}}}', "{{member}} failed")], key=True),
        panel("TUN devices", "stat", [q(f'espd_tun_devices{{{M}}}', "{{member}}")], key=True),
        panel("Packets / s", "timeseries",
              [q(f'rate(espd_packets_total{{{M}}}[$__rate_interval])', "{{member}} {{direction}}")],
              unit="pps", key=True),
        panel("Throughput", "timeseries",
              [q(f'rate(espd_bytes_total{{{M}}}[$__rate_interval]) * 8', "{{member}} {{direction}}")],
              unit="bps", key=True),
        panel("Drops by reason", "timeseries",
              [q(f'rate(espd_drops_total{{{M}}}[$__rate_interval])', "{{member}} {{reason}}")],
              unit="pps", key=True),
        panel("NAT-T keepalives received", "timeseries",
              [q(f'rate(espd_nat_keepalives_total{{{M}}}[$__rate_interval])', "{{member}}")], unit="pps"),
    ] + daemon_row("espd")),
}

KINDS = {"stat": "stat", "timeseries": "timeseries"}


def render(uid, title, desc, panels):
    out = []
    x = y = 0
    for i, p in enumerate(panels, start=1):
        w = 6 if p["kind"] == "stat" else 12
        h = 5 if p["kind"] == "stat" else 8
        if x + w > 24:
            x = 0
            y += 8
        targets = [{"datasource": DS, "refId": chr(ord("A") + j), "expr": t["expr"],
                    "legendFormat": t["legend"], "range": True}
                   for j, t in enumerate(p["queries"])]
        fc = {"defaults": {"unit": p["unit"], "mappings": p["mappings"]}, "overrides": []}
        out.append({"id": i, "type": KINDS[p["kind"]], "title": p["title"], "description": p["desc"],
                    "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
                    "fieldConfig": fc, "targets": targets})
        x += w
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["haven"],
        "schemaVersion": 39, "version": 1, "editable": True, "timezone": "utc",
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "member", "label": "member", "type": "query", "datasource": DS,
            "query": {"query": f'label_values(up{{{DAEMON_JOBS}}}, member)', "refId": "member"},
            "definition": f'label_values(up{{{DAEMON_JOBS}}}, member)',
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"}}]},
        "links": [{"title": "Haven dashboards", "type": "dashboards", "tags": ["haven"], "asDropdown": True}],
        "panels": out,
    }


def main():
    """No argument: write ops/grafana/dashboards/. `--out DIR`: write there instead.
    `--key-panels`: print `<uid>\t<title>` of every key panel."""
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "dashboards")
    if sys.argv[1:2] == ["--key-panels"]:
        for uid, (_, _, panels) in DASHBOARDS.items():
            for p in panels:
                if p["key"]:
                    print(f"{uid}\t{p['title']}")
        return
    if sys.argv[1:2] == ["--out"] and len(sys.argv) == 3:
        out_dir = sys.argv[2]
    elif len(sys.argv) > 1:
        sys.exit("usage: gen-dashboards.py [--out DIR | --key-panels]")
    for uid, (title, desc, panels) in DASHBOARDS.items():
        path = os.path.join(out_dir, f"{uid}.json")
        with open(path, "w") as f:
            json.dump(render(uid, title, desc, panels), f, indent=2, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
