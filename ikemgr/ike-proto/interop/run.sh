#!/bin/bash
# Manual strongSwan interop run for ike-proto (root; strongSwan packages of
# ../../../../shared/INTEROP.md). Creates namespaces ikep-a (probe,
# 10.231.0.1) and ikep-b (charon, 10.231.0.2), runs each proposal set with
# the probe as initiator and as responder, compares nothing automatically
# beyond the probe's own verdict, and always removes the namespaces.
#   usage: ./run.sh            (all sets)
set -u
D=$(mktemp -d /tmp/ikep.XXXXXX)
HERE=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$D/target}
(cd "$HERE" && cargo build -q) || exit 1
PROBE=$CARGO_TARGET_DIR/debug/ike-proto-interop-probe
S="--uri unix://$D/charon.vici"

teardown() {
  [ -f "$D/charon.pid" ] && kill "$(cat "$D/charon.pid")" 2>/dev/null
  sleep 1
  ip netns del ikep-a 2>/dev/null; ip netns del ikep-b 2>/dev/null
  rm -f "$D/charon.pid"
}
trap 'teardown; rm -rf "$D"' EXIT
trap 'exit 1' INT TERM

setup() { # $1 strongSwan IKE proposal, $2 ESP proposal
  ip netns add ikep-a && ip netns add ikep-b || exit 1
  ip link add ikepa0 type veth peer name ikepb0
  ip link set ikepa0 netns ikep-a; ip link set ikepb0 netns ikep-b
  ip -n ikep-a addr add 10.231.0.1/24 dev ikepa0; ip -n ikep-a link set ikepa0 up; ip -n ikep-a link set lo up
  ip -n ikep-b addr add 10.231.0.2/24 dev ikepb0; ip -n ikep-b link set ikepb0 up; ip -n ikep-b link set lo up
  ip -n ikep-b addr add 10.2.0.1/32 dev lo
  cat > "$D/strongswan.conf" <<EOC
charon {
  load = random nonce openssl kdf pem pkcs1 x509 revocation constraints pubkey socket-default kernel-libipsec kernel-netlink vici updown curve25519 chapoly gcm aes sha1 sha2 hmac
  filelog { log { path = $D/charon.log
    flush_line = yes
    default = 1
    ike = 2
    chd = 4 } }
  plugins { vici { socket = unix://$D/charon.vici } }
  install_routes = yes
}
EOC
  cat > "$D/swanctl.conf" <<EOC
connections {
  t {
    version = 2
    local_addrs = 10.231.0.2
    remote_addrs = 10.231.0.1
    proposals = $1
    encap = yes
    local { auth = psk
            id = 10.231.0.2 }
    remote { auth = psk
             id = 10.231.0.1 }
    children { c { esp_proposals = $2
                   local_ts = 10.2.0.0/16
                   remote_ts = 10.1.0.0/16
                   rekey_time = 0 } }
    rekey_time = 0
  }
}
secrets { ike-1 { id-1 = 10.231.0.1
                  id-2 = 10.231.0.2
                  secret = "interop-secret" } }
EOC
  ip netns exec ikep-b unshare -m sh -c "mount -t tmpfs none /run && STRONGSWAN_CONF=$D/strongswan.conf exec /usr/lib/ipsec/charon" > "$D/charon.out" 2>&1 &
  echo $! > "$D/charon.pid"
  sleep 2
  ip netns exec ikep-b swanctl --load-all $S --file "$D/swanctl.conf" > /dev/null 2>&1
}

as_initiator() { # ss-ike ss-esp our-p1 our-dh our-p2 our-pfs
  setup "$1" "$2"
  echo "== initiator: $3 dhgrp $4 / $5 pfs '$6'"
  timeout 60 ip netns exec ikep-a "$PROBE" "$3" "$4" "$5" "$6" | grep -E "EVENT (IkeSa|ChildSa|Auth|Liveness)|PROBE result"
  teardown
}

as_responder() {
  setup "$1" "$2"
  echo "== responder: $3 dhgrp $4 / $5 pfs '$6'"
  timeout 60 ip netns exec ikep-a "$PROBE" "$3" "$4" "$5" "$6" resp > "$D/resp.out" 2>&1 &
  PROBE_PID=$!
  sleep 1
  ip netns exec ikep-b swanctl --initiate --child c $S > /dev/null 2>&1
  sleep 1; ip netns exec ikep-b swanctl --rekey --child c $S > /dev/null
  sleep 1; ip netns exec ikep-b swanctl --rekey --ike t $S > /dev/null
  sleep 1; ip netns exec ikep-b swanctl --terminate --ike t $S > /dev/null
  wait "$PROBE_PID"
  grep -E "EVENT (IkeSa|ChildSa|Auth)|PROBE result" "$D/resp.out"
  teardown
}

for set in \
  "aes128gcm16-prfsha256-ecp256|aes128gcm16|aes128gcm-prfsha256|19|aes128gcm|" \
  "aes256-sha256-modp2048|aes256-sha256-modp2048|aes256-sha256|14|aes256-sha256|14" \
  "chacha20poly1305-prfsha256-x25519|chacha20poly1305-x25519|chacha20poly1305-prfsha256|31|chacha20poly1305|31" \
  "aes256-sha512-ecp521|aes256-sha512-ecp521|aes256-sha512|21|aes256-sha512|21" \
  "aes128-sha1-modp1024|aes128-sha1|aes128-sha1|2|aes128-sha1|"
do
  IFS='|' read -r a b c d e f <<EOS
$set
EOS
  as_initiator "$a" "$b" "$c" "$d" "$e" "$f"
  as_responder "$a" "$b" "$c" "$d" "$e" "$f"
done
