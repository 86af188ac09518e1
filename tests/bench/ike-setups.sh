#!/usr/bin/env bash
# IKE SA + first CHILD SA setups per second and memory per IKE SA, Haven's ikemgr against
# strongSwan's charon as the reference, measured in one run on this machine with the same
# load initiator (ike-proto's examples/ike_bench: our IKEv2 core, one thread and UDP socket
# per source address, SOURCES addresses with 3 handshakes in flight each: under charon's
# cookie_threshold_ip (3) and ikemgr's 5 half-open SAs per source, and SOURCES x 3 under both
# COOKIE thresholds (30), so neither responder asks for COOKIEs) and the same proposal (IKE
# aes128gcm16-prfsha256-ecp256, ESP aes128gcm16, PSK):
#   1. setups/s for SECONDS against each responder, with the responder's CPU time over the
#      phase (share of one core, CPU per setup, setups per CPU-second) and the load
#      initiator's CPU share: a responder near 100% of a core (charon may use both) is the
#      bottleneck; a low responder share with a busy initiator means the figure is the
#      initiator's;
#   2. then up to TARGET established SAs on each (or FILL_SECONDS), with the responder's RSS
#      before/after, per SA, and extrapolated to 100 000 SAs.
# Topology (addresses exist only inside the namespaces this script creates):
#   load 10.231.1.1,.11-.17 == veth == 10.231.1.2 ikemgr
#   load 10.231.2.1,.11-.17 == veth == 10.231.2.2 charon
# ikemgr runs alone (no espd: the CHILD SAs go to the bus), add-route and DPD off, log level
# warn; charon logs nothing, installs no routes, and its CHILD SAs go into kernel-libipsec.
# Needs root, iproute2 and the strongSwan packages of /work/shared/INTEROP.md; builds with
# cargo --release first (not timed). Every namespace, process and file it makes is removed on
# exit (trap), also on error or ^C. Prints figures; asserts nothing.
# Usage: tests/bench/ike-setups.sh [SECONDS] [TARGET] [FILL_SECONDS]   (default 10 10000 40)
# Environment: SOURCES (load addresses, default 8, at most 9), IKEMGR_ONLY=1 (skip charon),
# NO_BUILD=1 (use the release binaries as built). charon uses kernel-libipsec: with
# kernel-netlink alone every CHILD SA install fails in these namespaces (tried: 0 setups).
set -euo pipefail

SECS=${1:-10}
TARGET=${2:-10000}
FILL=${3:-40}
SOURCES=${SOURCES:-8}
CHARON=${CHARON:-/usr/lib/ipsec/charon}
TAG="hv-$$-ikeb"
WORK=$(mktemp -d "/tmp/${TAG}.XXXXXX")
NAMESPACES=()
PSK="haven-ike-bench-psk"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

die() { echo "ike-setups: $*" >&2; exit 1; }

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
for tool in ip swanctl unshare cargo; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ -x "$CHARON" ] || die "missing charon at $CHARON (package strongswan-charon)"

# NO_BUILD=1: use the release binaries already in the target dir as they are.
[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build -q --release -p ikemgr --bin ikemgr && \
    cargo build -q --release -p ike-proto --example ike_bench) || die "build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
IKEMGR=$TARGET_DIR/release/ikemgr
BENCH=$TARGET_DIR/release/examples/ike_bench

mkns() { local ns="$TAG-$1"; ip netns add "$ns"; NAMESPACES+=("$ns"); ip -n "$ns" link set lo up; }
nx() { local ns="$TAG-$1"; shift; ip netns exec "$ns" "$@"; }
mkns l; mkns h; mkns s
link() { # $1 peer ns, $2 subnet third octet
    ip link add "ikb$2a" type veth peer name "ikb$2b"
    ip link set "ikb$2a" netns "$TAG-l"; ip link set "ikb$2b" netns "$TAG-$1"
    ip -n "$TAG-l" addr add "10.231.$2.1/24" dev "ikb$2a"; ip -n "$TAG-l" link set "ikb$2a" up
    for i in $(seq 11 $((9 + SOURCES))); do ip -n "$TAG-l" addr add "10.231.$2.$i/24" dev "ikb$2a"; done
    ip -n "$TAG-$1" addr add "10.231.$2.2/24" dev "ikb$2b"; ip -n "$TAG-$1" link set "ikb$2b" up
}
link h 1
link s 2

# ikemgr: one dial-up gateway.
cat > "$WORK/haven.conf" <<EOC
config vpn ipsec phase1-interface
    edit "bench"
        set type dynamic
        set interface "ikb1b"
        set ike-version 2
        set proposal aes128gcm-prfsha256
        set dhgrp 19
        set localid "gw.bench"
        set dpd disable
        set add-route disable
        set psksecret "$PSK"
    next
end
config vpn ipsec phase2-interface
    edit "bench"
        set phase1name "bench"
        set proposal aes128gcm
        set pfs disable
        set src-subnet 0.0.0.0/0
        set dst-subnet 0.0.0.0/0
    next
end
EOC
ip netns exec "$TAG-h" "$IKEMGR" --config "$WORK/haven.conf" --run-dir "$WORK/run" \
    --log-level warn --metrics-listen 127.0.0.1:19701 >"$WORK/ikemgr.log" 2>&1 &

# charon: the same gateway.
mkdir -p "$WORK/swanctl"
for d in x509 x509ca x509ocsp x509aa x509ac x509crl pubkey private rsa ecdsa bliss pkcs8 pkcs12; do
    mkdir -p "$WORK/swanctl/$d"
done
cat > "$WORK/strongswan.conf" <<EOC
charon {
  load = random nonce openssl kdf pem pkcs1 x509 revocation constraints pubkey socket-default kernel-libipsec kernel-netlink vici updown
  ikesa_table_size = 4096
  ikesa_table_segments = 16
  install_routes = no
  filelog { log { path = $WORK/charon.log
    flush_line = yes
    default = ${CHARON_LOG:--1} } }
  plugins { vici { socket = unix://$WORK/charon.vici } }
}
EOC
cat > "$WORK/swanctl/swanctl.conf" <<EOC
connections {
  bench {
    version = 2
    local_addrs = 10.231.2.2
    remote_addrs = %any
    proposals = aes128gcm16-prfsha256-ecp256
    local { auth = psk
      id = gw.bench }
    remote { auth = psk }
    children { net { local_ts = 0.0.0.0/0
      remote_ts = 0.0.0.0/0
      esp_proposals = aes128gcm16 } }
  }
}
secrets { ike-any { secret = "$PSK" } }
EOC
ip netns exec "$TAG-s" unshare -m sh -c \
    "mount -t tmpfs none /run && STRONGSWAN_CONF=$WORK/strongswan.conf exec $CHARON" \
    >"$WORK/charon.out" 2>&1 &
for _ in $(seq 1 100); do
    nx s swanctl --stats --uri "unix://$WORK/charon.vici" >/dev/null 2>&1 && break
    sleep 0.1
done
nx s swanctl --load-all --uri "unix://$WORK/charon.vici" --file "$WORK/swanctl/swanctl.conf" \
    >/dev/null || die "swanctl load failed"
for _ in $(seq 1 100); do
    nx h sh -c 'ss -uln | grep -q ":500 "' && break
    sleep 0.1
done

# The daemons' own pids (for their RSS), whatever ip/unshare/sh did on the way.
IKEMGR_PID=$(ip netns pids "$TAG-h" | head -n1)
CHARON_PID=$(ip netns pids "$TAG-s" | head -n1)
[ -n "$IKEMGR_PID" ] && [ -n "$CHARON_PID" ] || die "a responder did not start"
echo "ikemgr pid $IKEMGR_PID ($(cat /proc/$IKEMGR_PID/comm)), charon pid $CHARON_PID ($(cat /proc/$CHARON_PID/comm))"

sources() { # $1 subnet prefix: the load namespace's addresses on it, comma-separated
    local list="$1.1" i
    for i in $(seq 11 $((9 + SOURCES))); do list="$list,$1.$i"; done
    echo "$list"
}
run() { # $1 label, $2 remote, $3 pid, $4 seconds, $5 target
    nx l "$BENCH" --local "$(sources "${2%.2}")" --remote "$2" --psk "$PSK" --seconds "$4" \
        --target "$5" --concurrency 3 --pid "$3" --label "$1"
}
echo "== setups per second ($SECS s each, same initiator, same proposal, $SOURCES sources x 3 in flight)"
run "ikemgr  " 10.231.1.2 "$IKEMGR_PID" "$SECS" 100000000
[ -n "${IKEMGR_ONLY:-}" ] || run "charon  " 10.231.2.2 "$CHARON_PID" "$SECS" 100000000
echo "== memory: up to $TARGET more established SAs on each (at most $FILL s each)"
run "ikemgr  " 10.231.1.2 "$IKEMGR_PID" "$FILL" "$TARGET"
# IKEMGR_ONLY=1: no charon phases (a memory figure at a TARGET charon cannot reach within
# the two minutes a benchmark may run here); the first phase's charon line is then missing.
[ -n "${IKEMGR_ONLY:-}" ] || run "charon  " 10.231.2.2 "$CHARON_PID" "$FILL" "$TARGET"
kill -0 "$IKEMGR_PID" 2>/dev/null || { cat "$WORK/ikemgr.log"; die "ikemgr died"; }
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/charon.log" "$KEEP_LOG"
exit 0
