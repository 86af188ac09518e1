#!/usr/bin/env bash
# Reference throughput for Haven's gateway benchmarks, measured in one run on this machine:
#   1. iperf3 TCP (8 s) from a client namespace to a server namespace through two strongSwan
#      gateways (kernel-libipsec, ESP in UDP 4500, AES-GCM-128);
#   2. the same client -> server path routed in clear by the two gateways (no IPsec);
#   3. iperf3 TCP (8 s) over the bare veth pair between the two gateways.
# Topology (addresses exist only inside the namespaces this script creates):
#   client 10.99.1.2 -- 10.99.1.1 gwa 172.31.0.1 == veth == 172.31.0.2 gwb 10.99.2.1 -- 10.99.2.2 server
# The clear-routed path uses a second set of four namespaces with the same shape.
# Needs root, iproute2, iperf3 and the strongSwan packages listed in /work/shared/INTEROP.md.
# Every namespace, process and file this script makes is removed on exit (trap), also on error or ^C.
# Usage: tests/bench/strongswan-baseline.sh [seconds]   (default 8)
set -euo pipefail

SECS=${1:-8}
CHARON=${CHARON:-/usr/lib/ipsec/charon}
TAG="hv-$$-bench"
WORK=$(mktemp -d "/tmp/${TAG}.XXXXXX")
NAMESPACES=()

die() { echo "strongswan-baseline: $*" >&2; exit 1; }

cleanup() {
    set +e
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    # Give the killed processes a moment to leave the namespaces before deleting them.
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
for tool in ip iperf3 swanctl unshare; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ -x "$CHARON" ] || die "missing charon at $CHARON (package strongswan-charon)"

mkns() {
    local ns="$TAG-$1"
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
}
nx() { local ns="$TAG-$1"; shift; ip netns exec "$ns" "$@"; }

# Four namespaces in a line; $1 is a name prefix (t = tunnel, r = routed).
build_line() {
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

# $1 = namespace short name, $2 = local outer, $3 = remote outer, $4 = local ts, $5 = remote ts,
# $6 = local id, $7 = remote id.
start_charon() {
    local h=$1 dir="$WORK/$1"
    # swanctl --file looks for these credential folders next to swanctl.conf.
    for d in x509 x509ca x509ocsp x509aa x509ac x509crl pubkey private rsa ecdsa bliss pkcs8 pkcs12; do
        mkdir -p "$dir/$d"
    done
    cat >"$dir/strongswan.conf" <<EOF
charon {
  load = random nonce openssl kdf pem pkcs1 x509 revocation constraints pubkey socket-default kernel-libipsec kernel-netlink vici updown
  filelog { log { path = $dir/charon.log
    default = 1
    ike = 2
    flush_line = yes } }
  plugins { vici { socket = unix://$dir/charon.vici } }
  install_routes = yes
}
EOF
    cat >"$dir/swanctl.conf" <<EOF
connections {
  bench {
    version = 2
    local_addrs = $2
    remote_addrs = $3
    encap = yes
    dpd_delay = 30s
    proposals = aes128gcm16-prfsha256-x25519
    local { auth = psk
      id = $6 }
    remote { auth = psk
      id = $7 }
    children {
      bench {
        local_ts = $4
        remote_ts = $5
        esp_proposals = aes128gcm16
        mode = tunnel
      }
    }
  }
}
secrets {
  ike-bench { id-a = gwa@bench.test
    id-b = gwb@bench.test
    secret = "bench-only-pre-shared-key" }
}
EOF
    STRONGSWAN_CONF="$dir/strongswan.conf" ip netns exec "$TAG-t$h" \
        unshare -m sh -c 'mount -t tmpfs none /run && exec "$0"' "$CHARON" \
        >"$dir/charon.out" 2>&1 &
    disown  # the cleanup trap kills it; no "Killed" notice from bash
    for _ in $(seq 50); do [ -S "$dir/charon.vici" ] && break; sleep 0.1; done
    [ -S "$dir/charon.vici" ] || die "charon in $h did not open its vici socket: $(tail -n 5 "$dir/charon.out")"
    swanctl --load-all --uri "unix://$dir/charon.vici" --file "$dir/swanctl.conf" >/dev/null
}

iperf() { # $1 = client ns, $2 = server ns, $3 = server address; prints Gbit/s received
    nx "$2" iperf3 -s -1 -D -I "$WORK/iperf-$2.pid" >/dev/null
    for _ in $(seq 50); do
        nx "$2" ss -ltn 2>/dev/null | grep -q ':5201 ' && break
        sleep 0.1
    done
    nx "$1" iperf3 -c "$3" -t "$SECS" -J >"$WORK/iperf-$1-$2.json"
    # sum_received.bits_per_second, without needing jq.
    awk '/"sum_received"/{f=1} f&&/"bits_per_second"/{gsub(/[^0-9.eE+]/,"",$2); printf "%.2f", $2/1e9; exit}' \
        "$WORK/iperf-$1-$2.json"
}

build_line t
build_line r
# Clear routing for the reference line: each gateway knows the far LAN via its peer.
nx rgwa ip route add 10.99.2.0/24 via 172.31.0.2
nx rgwb ip route add 10.99.1.0/24 via 172.31.0.1

start_charon gwa 172.31.0.1 172.31.0.2 10.99.1.0/24 10.99.2.0/24 gwa@bench.test gwb@bench.test
start_charon gwb 172.31.0.2 172.31.0.1 10.99.2.0/24 10.99.1.0/24 gwb@bench.test gwa@bench.test
swanctl --initiate --child bench --timeout 20 --uri "unix://$WORK/gwa/charon.vici" >"$WORK/initiate.out" 2>&1 ||
    die "tunnel did not come up: $(tail -n 5 "$WORK/initiate.out")"
nx tclient ping -c 1 -W 5 10.99.2.2 >/dev/null || die "no ping through the tunnel"
esp=$(swanctl --list-sas --uri "unix://$WORK/gwa/charon.vici" | grep -m1 -o 'AES_GCM_16-128' || true)

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
tunnel=$(iperf tclient tserver 10.99.2.2)
routed=$(iperf rclient rserver 10.99.2.2)
veth=$(iperf rgwa rgwb 172.31.0.2)

echo "load average before the runs: $LOAD (shared machine: compare figures of one run only)"
printf '%-66s %8s\n' "path (iperf3 TCP, ${SECS} s, one run, same machine)" "Gbit/s"
printf '%-66s %8s\n' "strongSwan <-> strongSwan, kernel-libipsec, ${esp:-?} in UDP" "$tunnel"
printf '%-66s %8s\n' "clear routing through the same two gateways" "$routed"
printf '%-66s %8s\n' "bare veth between the gateways" "$veth"
