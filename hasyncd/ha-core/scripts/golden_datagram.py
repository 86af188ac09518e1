#!/usr/bin/env python3
"""Independent computation of link::tests::GOLDEN: PBKDF2 (hashlib), HKDF written out from
RFC 5869 with hmac, AES-256-GCM from the `cryptography` package. Run: python3 golden_datagram.py"""
import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

LABEL = b"haven ha link v1"
KIND_FGCP, GROUP, MEMBER, EPOCH, COUNTER, STREAM, MSG_SNAPSHOT_REQUEST = 1, 1, 1, 1, 0, 1, 8
VERSION = 2


def hkdf_sha256(ikm, salt, info, n):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]


salt = LABEL + bytes([KIND_FGCP]) + GROUP.to_bytes(2, "big")
master = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 1, 32)
key = hkdf_sha256(master, salt, LABEL + b" sender" + MEMBER.to_bytes(4, "big") + EPOCH.to_bytes(8, "big"), 32)
header = (bytes([VERSION, MSG_SNAPSHOT_REQUEST]) + GROUP.to_bytes(2, "big") + MEMBER.to_bytes(4, "big")
          + EPOCH.to_bytes(8, "big") + COUNTER.to_bytes(8, "big") + STREAM.to_bytes(8, "big"))
body = bytes([0x81, 0xAA]) + b"request_id" + bytes([1])  # msgpack {"request_id": 1}
nonce = bytes(4) + COUNTER.to_bytes(8, "big")
print((header + AESGCM(key).encrypt(nonce, body, header)).hex())
