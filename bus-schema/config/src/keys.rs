//! Key tables: for each block we read, the keys Haven implements and the
//! FortiOS keys it knows but ignores (with a warning). Anything else is an
//! error. Lists follow the FortiOS 6.4–7.4 CLI references.

/// The keys and nested blocks of one FortiOS block.
pub(crate) struct Spec {
    /// Printed name, e.g. `config system ha`.
    pub name: &'static str,
    /// Keys applied to the model.
    pub implemented: &'static [&'static str],
    /// FortiOS keys accepted with a "not implemented" warning.
    pub known: &'static [&'static str],
    /// FortiOS nested blocks ignored with a warning.
    pub known_blocks: &'static [&'static str],
}

pub(crate) const HA: Spec = Spec {
    name: "config system ha",
    implemented: &[
        "group-id",
        "group-name",
        "mode",
        "password",
        "hbdev",
        "priority",
        "override",
        "session-pickup",
        "hb-interval",
        "hb-interval-in-milliseconds",
        "hb-lost-threshold",
        "monitor",
        "sync-config",
    ],
    known: &[
        "arps",
        "arps-interval",
        "authentication",
        "auto-virtual-mac-interface",
        "backup-hbdev",
        "bounce-intf-upon-failover",
        "check-secondary-dev-health",
        "cpu-threshold",
        "encryption",
        "evpn-ttl",
        "failover-hold-time",
        "frup",
        "ftp-proxy-threshold",
        "gratuitous-arps",
        "ha-direct",
        "ha-eth-type",
        "ha-mgmt-status",
        "ha-uptime-diff-margin",
        "hbdev-second-vlan-id",
        "hbdev-vlan-id",
        "hc-eth-type",
        "hello-holddown",
        "http-proxy-threshold",
        "hw-session-hold-time",
        "hw-session-sync-delay",
        "hw-session-sync-dev",
        "imap-proxy-threshold",
        "inter-cluster-session-sync",
        "ipsec-phase2-proposal",
        "key",
        "l2ep-eth-type",
        "link-failed-signal",
        "load-balance-all",
        "logical-sn",
        "memory-based-failover",
        "memory-compatible-mode",
        "memory-failover-flip-timeout",
        "memory-failover-monitor-period",
        "memory-failover-sample-rate",
        "memory-failover-threshold",
        "memory-threshold",
        "minimum-worker-threshold",
        "multicast-ttl",
        "nntp-proxy-threshold",
        "override-wait-time",
        "pingserver-failover-threshold",
        "pingserver-flip-timeout",
        "pingserver-monitor-interface",
        "pingserver-secondary-force-reset",
        "pingserver-slave-force-reset",
        "pop3-proxy-threshold",
        "primary-hold-before-reboot",
        "route-hold",
        "route-ttl",
        "route-wait",
        "schedule",
        "sequential-upgrade",
        "session-pickup-connectionless",
        "session-pickup-delay",
        "session-pickup-expectation",
        "session-pickup-nat",
        "session-sync-dev",
        "smtp-proxy-threshold",
        "ssd-failover",
        "standalone-config-sync",
        "standalone-mgmt-vdom",
        "sync-packet-balance",
        "unicast-gateway",
        "unicast-hb",
        "unicast-hb-netmask",
        "unicast-hb-peerip",
        "unicast-status",
        "uninterruptible-primary-wait",
        "uninterruptible-upgrade",
        "upgrade-mode",
        "vcluster-id",
        "vcluster-status",
        "vcluster2",
        "vdom",
        "weight",
    ],
    known_blocks: &[
        "ha-mgmt-interfaces",
        "secondary-vcluster",
        "unicast-peers",
        "vcluster",
        "frup-settings",
    ],
};

pub(crate) const STANDALONE: Spec = Spec {
    name: "config system standalone-cluster",
    implemented: &[
        "standalone-group-id",
        "group-member-id",
        "layer2-connection",
        "session-sync-dev",
        "encryption",
        "psksecret",
    ],
    known: &[
        "asymmetric-traffic-control",
        "data-intf-session-sync-dev",
        "helper-traffic-bounce",
        "monitor-interface",
        "pingsvr-monitor-interface",
        "utm-traffic-bounce",
    ],
    known_blocks: &["monitor-prefix"],
};

pub(crate) const CLUSTER_PEER: Spec = Spec {
    name: "config cluster-peer",
    implemented: &["peerip", "peervd", "hb-interval", "hb-lost-threshold"],
    known: &[
        "down-intfs-before-sess-sync",
        "ipsec-tunnel-sync",
        "secondary-add-ipsec-routes",
        "sync-id",
        "syncvd",
    ],
    known_blocks: &["session-sync-filter"],
};

pub(crate) const PHASE1: Spec = Spec {
    name: "config vpn ipsec phase1-interface",
    implemented: &[
        "type",
        "interface",
        "ip-version",
        "ike-version",
        "local-gw",
        "remote-gw",
        "local-gw6",
        "remote-gw6",
        "remotegw-ddns",
        "keylife",
        "peertype",
        "peerid",
        "localid",
        "localid-type",
        "proposal",
        "dhgrp",
        "dpd",
        "dpd-retrycount",
        "dpd-retryinterval",
        "dpd-backoff",
        "dpd-backoff-initial",
        "dpd-backoff-max",
        "fgsp-sync",
        "ha-sync-esp-seqno",
        "nattraversal",
        "psksecret",
        "net-device",
        "add-route",
        "auto-negotiate",
        "monitor",
        "passive-mode",
        "dpd-action",
        "tunnel-monitor",
        "tunnel-monitor-destination-ip",
        "tunnel-monitor-source-ip",
        "tunnel-monitor-interval",
        "tunnel-monitor-threshold",
        "tunnel-monitor-action",
        "remote-gw-preempt-interval",
        "authmethod",
        "certificate",
        "rekey",
        "comments",
    ],
    known: &[
        "acct-verify",
        "add-gw-route",
        "addke1",
        "addke2",
        "addke3",
        "addke4",
        "addke5",
        "addke6",
        "addke7",
        "aggregate-member",
        "aggregate-weight",
        "assign-ip",
        "assign-ip-from",
        "authmethod-remote",
        "authpasswd",
        "authusr",
        "authusrgrp",
        "auto-discovery-crossover",
        "auto-discovery-dialup-placeholder",
        "auto-discovery-forwarder",
        "auto-discovery-offer-interval",
        "auto-discovery-psk",
        "auto-discovery-receiver",
        "auto-discovery-sender",
        "auto-discovery-shortcuts",
        "auto-transport-threshold",
        "azure-ad-autoconnect",
        "backup-gateway",
        "banner",
        "cert-id-validation",
        "cert-peer-username-strip",
        "cert-peer-username-validation",
        "cert-trust-store",
        "childless-ike",
        "client-auto-negotiate",
        "client-keep-alive",
        "client-resume",
        "client-resume-interval",
        "default-gw",
        "default-gw-priority",
        "dev-id",
        "dev-id-notification",
        "dhcp-ra-giaddr",
        "dhcp6-ra-linkaddr",
        "digital-signature-auth",
        "distance",
        "dns-mode",
        "domain",
        "eap",
        "eap-cert-auth",
        "eap-exclude-peergrp",
        "eap-identity",
        "ems-sn-check",
        "encap-local-gw4",
        "encap-local-gw6",
        "encap-remote-gw4",
        "encap-remote-gw6",
        "encapsulation",
        "encapsulation-address",
        "enforce-unique-id",
        "esn",
        "exchange-fgt-device-id",
        "exchange-interface-ip",
        "exchange-ip-addr4",
        "exchange-ip-addr6",
        "fallback-tcp-threshold",
        "fec-base",
        "fec-codec",
        "fec-egress",
        "fec-health-check",
        "fec-ingress",
        "fec-mapping-profile",
        "fec-receive-timeout",
        "fec-redundant",
        "fec-send-timeout",
        "fortinet-esp",
        "forticlient-enforcement",
        "fragmentation",
        "fragmentation-mtu",
        "group-authentication",
        "group-authentication-secret",
        "idle-timeout",
        "idle-timeoutinterval",
        "include-local-lan",
        "inbound-dscp-copy",
        "internal-domain-list",
        "ip-delay-interval",
        "ip-fragmentation",
        "ipv4-dns-server1",
        "ipv4-dns-server2",
        "ipv4-dns-server3",
        "ipv4-end-ip",
        "ipv4-exclude-range",
        "ipv4-name",
        "ipv4-netmask",
        "ipv4-split-exclude",
        "ipv4-split-include",
        "ipv4-start-ip",
        "ipv4-wins-server1",
        "ipv4-wins-server2",
        "ipv6-auto-linklocal",
        "ipv6-dns-server1",
        "ipv6-dns-server2",
        "ipv6-dns-server3",
        "ipv6-end-ip",
        "ipv6-exclude-range",
        "ipv6-name",
        "ipv6-prefix",
        "ipv6-split-exclude",
        "ipv6-split-include",
        "ipv6-start-ip",
        "keepalive",
        "kms",
        "link-cost",
        "loopback-asymroute",
        "mesh-selector-type",
        "mode",
        "mode-cfg",
        "mode-cfg-allow-client-selector",
        "mobike",
        "monitor-hold-down-delay",
        "monitor-hold-down-time",
        "monitor-hold-down-type",
        "monitor-hold-down-weekday",
        "monitor-min",
        "nattraversal-port",
        "negotiate-timeout",
        "network-id",
        "network-overlay",
        "npu-offload",
        "packet-redistribution",
        "peer",
        "peergrp",
        "ppk",
        "ppk-identity",
        "ppk-secret",
        "priority",
        "psksecret-remote",
        "qkd",
        "qkd-profile",
        "reauth",
        "remote-gw-country",
        "remote-gw-end-ip",
        "remote-gw-match",
        "remote-gw-start-ip",
        "remote-gw-subnet",
        "remote-gw-ztna-tags",
        "remote-gw6-country",
        "remote-gw6-end-ip",
        "remote-gw6-match",
        "remote-gw6-start-ip",
        "remote-gw6-subnet",
        "rsa-signature-format",
        "rsa-signature-hash-override",
        "save-password",
        "send-cert-chain",
        "share-cert",
        "shared-idle-timeout",
        "signature-hash-alg",
        "split-include-service",
        "suite-b",
        "transport",
        "tunnel-search",
        "unity-support",
        "usrgrp",
        "vni",
        "wizard-type",
        "xauthtype",
    ],
    known_blocks: &["ipv4-exclude-range", "ipv6-exclude-range", "backup-gateway"],
};

pub(crate) const PHASE2: Spec = Spec {
    name: "config vpn ipsec phase2-interface",
    implemented: &[
        "phase1name",
        "proposal",
        "pfs",
        "dhgrp",
        "keylife-type",
        "keylifeseconds",
        "keylifekbs",
        "src-addr-type",
        "src-subnet",
        "src-start-ip",
        "src-end-ip",
        "dst-addr-type",
        "dst-subnet",
        "dst-start-ip",
        "dst-end-ip",
        "src-subnet6",
        "src-start-ip6",
        "dst-subnet6",
        "dst-start-ip6",
        "protocol",
        "src-port",
        "dst-port",
        "auto-negotiate",
        "keepalive",
        "replay",
        "encapsulation",
        "comments",
    ],
    known: &[
        "add-route",
        "addke1",
        "addke2",
        "addke3",
        "addke4",
        "addke5",
        "addke6",
        "addke7",
        "auto-discovery-forwarder",
        "auto-discovery-sender",
        "dhcp-ipsec",
        "diffserv",
        "diffservcode",
        "dst-end-ip6",
        "dst-name",
        "dst-name6",
        "inbound-dscp-copy",
        "initiator-ts-narrow",
        "ipv4-df",
        "l2tp",
        "route-overlap",
        "selector-match",
        "single-source",
        "src-end-ip6",
        "src-name",
        "src-name6",
        "use-natip",
    ],
    known_blocks: &[],
};

/// `config vpn ipsec manualkey-interface`. The FortiOS keys, plus Haven's
/// extension keys `encapsulation`, `replay`, `src-subnet` and `dst-subnet`
/// (documented on [`crate::ManualKey`]).
pub(crate) const MANUALKEY: Spec = Spec {
    name: "config vpn ipsec manualkey-interface",
    implemented: &[
        "interface",
        "ip-version",
        "addr-type",
        "remote-gw",
        "local-gw",
        "auth-alg",
        "enc-alg",
        "auth-key",
        "enc-key",
        "local-spi",
        "remote-spi",
        "encapsulation",
        "replay",
        "src-subnet",
        "dst-subnet",
        "local-gw6",
        "remote-gw6",
        "src-subnet6",
        "dst-subnet6",
    ],
    known: &["npu-offload"],
    known_blocks: &[],
};

pub(crate) const ROUTE: Spec = Spec {
    name: "config router static",
    implemented: &[
        "status",
        "dst",
        "gateway",
        "device",
        "distance",
        "priority",
        "blackhole",
        "comment",
    ],
    known: &[
        "bfd",
        "dstaddr",
        "dynamic-gateway",
        "internet-service",
        "internet-service-custom",
        "link-monitor-exempt",
        "preferred-source",
        "sdwan",
        "sdwan-zone",
        "seq-num",
        "src",
        "tag",
        "virtual-wan-link",
        "vrf",
        "weight",
    ],
    known_blocks: &[],
};

/// First words of FortiOS top-level blocks. A block whose path starts with
/// one of these (and is not one Haven reads) is ignored with a warning.
pub(crate) const FORTIOS_TOP: &[&str] = &[
    "alertemail",
    "antivirus",
    "application",
    "authentication",
    "automation",
    "casb",
    "certificate",
    "cifs",
    "credential-store",
    "diameter-filter",
    "dlp",
    "dnsfilter",
    "dpdk",
    "emailfilter",
    "endpoint-control",
    "extender-controller",
    "extension-controller",
    "file-filter",
    "firewall",
    "ftp-proxy",
    "gui",
    "hardware",
    "icap",
    "ips",
    "log",
    "monitoring",
    "nsxt",
    "report",
    "router",
    "rule",
    "sctp-filter",
    "spamfilter",
    "ssh-filter",
    "switch-controller",
    "system",
    "user",
    "videofilter",
    "virtual-patch",
    "voip",
    "vpn",
    "waf",
    "wanopt",
    "web-proxy",
    "webfilter",
    "wireless-controller",
    "ztna",
];

/// `config vpn ipsec …` tables FortiOS has.
pub(crate) const VPN_IPSEC: &[&str] = &[
    "phase1",
    "phase2",
    "phase1-interface",
    "phase2-interface",
    "manualkey",
    "manualkey-interface",
    "concentrator",
    "forticlient",
    "fec",
];

/// `config router …` blocks FortiOS has.
pub(crate) const ROUTER: &[&str] = &[
    "access-list",
    "access-list6",
    "aspath-list",
    "auth-path",
    "bfd",
    "bfd6",
    "bgp",
    "community-list",
    "extcommunity-list",
    "isis",
    "key-chain",
    "multicast",
    "multicast-flow",
    "multicast6",
    "ospf",
    "ospf6",
    "policy",
    "policy6",
    "prefix-list",
    "prefix-list6",
    "rip",
    "ripng",
    "route-map",
    "setting",
    "static",
    "static6",
];

/// The blocks Haven reads, for "did you mean" hints and error messages.
pub(crate) const OURS: &[&str] = &[
    "system ha",
    "system standalone-cluster",
    "system interface",
    "vpn ipsec phase1-interface",
    "vpn ipsec phase2-interface",
    "vpn ipsec manualkey-interface",
    "router static",
];

/// Levenshtein distance, capped work: inputs longer than 64 characters are
/// treated as far from everything.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        if let Some(c0) = cur.first_mut() {
            *c0 = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            let del = prev
                .get(j + 1)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let ins = cur.get(j).copied().unwrap_or(usize::MAX).saturating_add(1);
            let sub = prev
                .get(j)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(cost);
            if let Some(c) = cur.get_mut(j + 1) {
                *c = del.min(ins).min(sub);
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev.last().copied().unwrap_or(usize::MAX)
}

/// The closest candidate within distance 2 (or 3 for long words).
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = if word.chars().count() > 12 { 3 } else { 2 };
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("dpd", "dpd"), 0);
        assert_eq!(
            suggest("psksecrte", PHASE1.implemented.iter().copied()),
            Some("psksecret")
        );
        assert_eq!(
            suggest("zzzzzzzz", PHASE1.implemented.iter().copied()),
            None
        );
    }

    #[test]
    fn no_key_is_both_implemented_and_known() {
        for spec in [
            &HA,
            &STANDALONE,
            &CLUSTER_PEER,
            &PHASE1,
            &PHASE2,
            &MANUALKEY,
            &ROUTE,
        ] {
            for k in spec.implemented {
                assert!(!spec.known.contains(k), "{} {k}", spec.name);
            }
        }
    }
}
