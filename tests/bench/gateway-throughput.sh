#!/usr/bin/env bash
# End-to-end throughput of two Haven gateways (ikemgr + espd, manual-key AES-GCM-128 tunnel)
# beside the strongSwan baseline, in one run on this machine:
#   1. iperf3 TCP (8 s) client -> server through two Haven gateways, ESP in UDP 4500;
#   2. the same over raw ESP (IP protocol 50);
#   3. a strongSwan dial-up client (kernel-libipsec) <-> a Haven dynamic gateway (ikemgr
#      negotiates, espd carries ESP in UDP 4500): one end is strongSwan, so expect its speed;
#   4. tests/bench/strongswan-baseline.sh: strongSwan <-> strongSwan (kernel-libipsec, ESP in
#      UDP), the clear-routed path and the bare veth between the gateways.
# Topology as in strongswan-baseline.sh (addresses exist only inside the namespaces made here):
#   client 10.99.1.2 -- 10.99.1.1 gwa 172.31.0.1 == veth == 172.31.0.2 gwb 10.99.2.1 -- 10.99.2.2 server
# Needs root, iproute2, iperf3, the strongSwan packages of /work/shared/INTEROP.md, and release
# builds of ikemgr and espd: cargo build --release -p ikemgr -p espd
# (HAVEN_BIN=dir overrides where they are; default <workspace>/target/release).
# Every namespace, process and file this script makes is removed on exit (trap).
# Usage: tests/bench/gateway-throughput.sh [seconds]   (default 8)
# HAVEN_ONLY=1 skips the baseline (quick iteration only); ESPD_WORKERS=n sets espd's packet threads.
set -euo pipefail

SECS=${1:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${HAVEN_BIN:-$ROOT/target/release}
TAG="hv-$$-gwbench"
WORK=$(mktemp -d "/tmp/${TAG}.XXXXXX")
NAMESPACES=()
KEY=0102030405060708-090a0b0c0d0e0f10-11121314   # benchmark-only key

die() { echo "gateway-throughput: $*" >&2; exit 1; }

cleanup() {
    set +e
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        left=0
        for ns in "${NAMESPACES[@]}"; do
            [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && left=1
        done
        [ "$left" = 0 ] && break
        sleep 0.2
    done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
for tool in ip iperf3; do command -v "$tool" >/dev/null || die "missing tool: $tool"; done
for b in ikemgr espd; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b: cargo build --release -p ikemgr -p espd (or set HAVEN_BIN)"
done

mkns() { local ns="$TAG-$1"; ip netns add "$ns"; NAMESPACES+=("$ns"); ip -n "$ns" link set lo up; }
nx() { local ns="$TAG-$1"; shift; ip netns exec "$ns" "$@"; }

build_line() { # $1 = name prefix
    local p=$1
    for h in client gwa gwb server; do mkns "$p$h"; done
    ip link add c0 netns "$TAG-${p}client" type veth peer name in0 netns "$TAG-${p}gwa"
    ip link add out0 netns "$TAG-${p}gwa" type veth peer name out0 netns "$TAG-${p}gwb"
    ip link add in0 netns "$TAG-${p}gwb" type veth peer name s0 netns "$TAG-${p}server"
    nx "${p}client" ip addr add 10.99.1.2/24 dev c0
    nx "${p}gwa" ip addr add 10.99.1.1/24 dev in0
    nx "${p}gwa" ip addr add 172.31.0.1/24 dev out0
    nx "${p}gwb" ip addr add 172.31.0.2/24 dev out0
    nx "${p}gwb" ip addr add 10.99.2.1/24 dev in0
    nx "${p}server" ip addr add 10.99.2.2/24 dev s0
    for pair in client:c0 gwa:in0 gwa:out0 gwb:out0 gwb:in0 server:s0; do
        nx "$p${pair%%:*}" ip link set "${pair##*:}" up
    done
    nx "${p}client" ip route add default via 10.99.1.1
    nx "${p}server" ip route add default via 10.99.2.1
    for g in gwa gwb; do nx "$p$g" sysctl -qw net.ipv4.ip_forward=1; done
}

# $1 = line prefix, $2 = gw, $3 local, $4 remote, $5 spi in, $6 spi out, $7 src, $8 dst, $9 encap
start_haven() {
    local dir="$WORK/$1$2"
    mkdir -p "$dir"
    cat >"$dir/haven.conf" <<EOF
config vpn ipsec manualkey-interface
    edit "vpn1"
        set interface "out0"
        set local-gw $3
        set remote-gw $4
        set enc-alg aes128gcm
        set enc-key $KEY
        set local-spi $5
        set remote-spi $6
        set encapsulation $9
        set src-subnet $7
        set dst-subnet $8
    next
end
EOF
    for d in ikemgr espd; do
        nx "$1$2" "$BIN/$d" --config "$dir/haven.conf" --run-dir "$dir/run" --log-level warn \
            >"$dir/$d.log" 2>&1 &
        disown
    done
    for _ in $(seq 100); do nx "$1$2" ip link show vpn1 >/dev/null 2>&1 && break; sleep 0.1; done
    nx "$1$2" ip link show vpn1 >/dev/null 2>&1 || die "no vpn1 device on $1$2: $(tail -n 5 "$dir/espd.log")"
    nx "$1$2" ip route replace "$8" dev vpn1
}

iperf() { # $1 = client ns, $2 = server ns, $3 = server address; prints Gbit/s received
    nx "$2" iperf3 -s -1 -D -I "$WORK/iperf-$2.pid" >/dev/null
    for _ in $(seq 50); do
        nx "$2" ss -ltn 2>/dev/null | grep -q ':5201 ' && break
        sleep 0.1
    done
    nx "$1" iperf3 -c "$3" -t "$SECS" -J >"$WORK/iperf-$1-$2.json"
    awk '/"sum_received"/{f=1} f&&/"bits_per_second"/{gsub(/[^0-9.eE+]/,"",$2); printf "%.2f", $2/1e9; exit}' \
        "$WORK/iperf-$1-$2.json"
}

haven_line() { # $1 = prefix, $2 = encap; writes Gbit/s to $WORK/result-$1 (no subshell:
    # the namespaces it makes must reach the cleanup list)
    build_line "$1"
    start_haven "$1" gwa 172.31.0.1 172.31.0.2 0x1001 0x2001 10.99.1.0/24 10.99.2.0/24 "$2"
    start_haven "$1" gwb 172.31.0.2 172.31.0.1 0x2001 0x1001 10.99.2.0/24 10.99.1.0/24 "$2"
    nx "${1}client" ping -c 1 -W 5 10.99.2.2 >/dev/null || die "no ping through the Haven tunnel ($2)"
    iperf "${1}client" "${1}server" 10.99.2.2 >"$WORK/result-$1"
}

CHARON=${CHARON:-/usr/lib/ipsec/charon}
PSK=bench-only-pre-shared-key-0123456789

# A strongSwan dial-up client (charon, kernel-libipsec, ESP in UDP) in "$1gwa".
start_charon_client() { # $1 = prefix
    local dir="$WORK/$1charon"
    for d in x509 x509ca x509ocsp x509aa x509ac x509crl pubkey private rsa ecdsa bliss pkcs8 pkcs12; do
        mkdir -p "$dir/$d"
    done
    cat >"$dir/strongswan.conf" <<EOF
charon {
  load = random nonce openssl kdf pem pkcs1 x509 revocation constraints pubkey socket-default kernel-libipsec kernel-netlink vici updown
  filelog { log { path = $dir/charon.log
    default = 1
    flush_line = yes } }
  plugins { vici { socket = unix://$dir/charon.vici } }
  install_routes = yes
}
EOF
    cat >"$dir/swanctl.conf" <<EOF
connections {
  dial {
    version = 2
    local_addrs = 172.31.0.1
    remote_addrs = 172.31.0.2
    encap = yes
    proposals = aes128gcm16-prfsha256-ecp256
    local { auth = psk
      id = client.bench.test }
    remote { auth = psk
      id = gwb.bench.test }
    children {
      net {
        local_ts = 10.99.1.0/24
        remote_ts = 10.99.2.0/24
        esp_proposals = aes128gcm16
        mode = tunnel
      }
    }
  }
}
secrets {
  ike-dial { id-a = client.bench.test
    id-b = gwb.bench.test
    secret = "$PSK" }
}
EOF
    STRONGSWAN_CONF="$dir/strongswan.conf" ip netns exec "$TAG-$1gwa" \
        unshare -m sh -c 'mount -t tmpfs none /run && exec "$0"' "$CHARON" \
        >"$dir/charon.out" 2>&1 &
    disown
    for _ in $(seq 50); do [ -S "$dir/charon.vici" ] && break; sleep 0.1; done
    [ -S "$dir/charon.vici" ] || die "charon did not open its vici socket: $(tail -n 5 "$dir/charon.out")"
    swanctl --load-all --uri "unix://$dir/charon.vici" --file "$dir/swanctl.conf" >/dev/null
    swanctl --initiate --child net --timeout 20 --uri "unix://$dir/charon.vici" >"$dir/initiate.out" 2>&1 ||
        die "strongSwan client could not connect to the Haven gateway: $(tail -n 5 "$dir/initiate.out")"
}

# Haven's dial-up gateway (ikemgr negotiates with the client, espd carries ESP) in "$1gwb".
start_haven_dialup() { # $1 = prefix
    local dir="$WORK/$1gwb"
    mkdir -p "$dir"
    cat >"$dir/haven.conf" <<EOF
config vpn ipsec phase1-interface
    edit "vpn1"
        set type dynamic
        set interface "out0"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid "gwb.bench.test"
        set dpd disable
        set psksecret "$PSK"
    next
end
config vpn ipsec phase2-interface
    edit "vpn1"
        set phase1name "vpn1"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 10.99.2.0/24
        set dst-subnet 10.99.1.0/24
    next
end
EOF
    for d in ikemgr espd; do
        nx "$1gwb" "$BIN/$d" --config "$dir/haven.conf" --run-dir "$dir/run" --log-level warn \
            >"$dir/$d.log" 2>&1 &
        disown
    done
    sleep 1
}

swan_haven_line() { # $1 = prefix; writes Gbit/s to $WORK/result-$1
    [ -x "$CHARON" ] || die "missing charon at $CHARON (package strongswan-charon)"
    command -v swanctl >/dev/null || die "missing tool: swanctl"
    build_line "$1"
    start_haven_dialup "$1"
    start_charon_client "$1"
    for _ in $(seq 50); do
        nx "${1}client" ping -c 1 -W 1 10.99.2.2 >/dev/null 2>&1 && break
        sleep 0.2
    done
    nx "${1}client" ping -c 1 -W 5 10.99.2.2 >/dev/null || die "no ping through strongSwan client <-> Haven gateway"
    iperf "${1}client" "${1}server" 10.99.2.2 >"$WORK/result-$1"
}

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
haven_line u udp
haven_line e none
haven_udp=$(cat "$WORK/result-u")
haven_raw=$(cat "$WORK/result-e")
# Each path runs alone: stop the Haven <-> Haven lines first.
cleanup
NAMESPACES=()
WORK=$(mktemp -d "/tmp/${TAG}.XXXXXX")
swan_haven_line s
swan_haven=$(cat "$WORK/result-s")
if [ "${HAVEN_ONLY:-0}" = 1 ]; then  # quick iteration: no baseline, figures not comparable
    echo "Haven only (HAVEN_ONLY=1), ${SECS} s: UDP 4500 $haven_udp Gbit/s, raw ESP $haven_raw Gbit/s, strongSwan client <-> Haven $swan_haven Gbit/s"
    exit 0
fi
# Stop the Haven lines before the baseline runs, so they do not compete for the CPUs.
cleanup
NAMESPACES=()
WORK=$(mktemp -d "/tmp/${TAG}.XXXXXX")

base=$("$HERE/strongswan-baseline.sh" "$SECS") || die "strongswan-baseline.sh failed"
val() { echo "$base" | awk -v k="$1" 'index($0, k) {print $NF; exit}'; }
ss=$(val "strongSwan <-> strongSwan")
routed=$(val "clear routing")
veth=$(val "bare veth")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }

echo "load average before the runs: $LOAD (shared machine: compare figures of one run only)"
printf '%-66s %8s %10s %10s\n' "path (iperf3 TCP, ${SECS} s, one run, same machine)" "Gbit/s" "/strongSwan" "/bare veth"
printf '%-66s %8s %10s %10s\n' "Haven <-> Haven (espd), AES_GCM_16-128 in UDP 4500" "$haven_udp" "$(ratio "$haven_udp" "$ss")" "$(ratio "$haven_udp" "$veth")"
printf '%-66s %8s %10s %10s\n' "Haven <-> Haven (espd), AES_GCM_16-128 raw ESP" "$haven_raw" "$(ratio "$haven_raw" "$ss")" "$(ratio "$haven_raw" "$veth")"
printf '%-66s %8s %10s %10s\n' "strongSwan client <-> Haven gateway (IKE), AES_GCM_16-128 UDP" "$swan_haven" "$(ratio "$swan_haven" "$ss")" "$(ratio "$swan_haven" "$veth")"
printf '%-66s %8s %10s %10s\n' "strongSwan <-> strongSwan, kernel-libipsec, AES_GCM_16-128 in UDP" "$ss" "1.0x" "$(ratio "$ss" "$veth")"
printf '%-66s %8s %10s %10s\n' "clear routing through two gateways" "$routed" "$(ratio "$routed" "$ss")" "$(ratio "$routed" "$veth")"
printf '%-66s %8s %10s %10s\n' "bare veth between the gateways" "$veth" "$(ratio "$veth" "$ss")" "1.0x"
