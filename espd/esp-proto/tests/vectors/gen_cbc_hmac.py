#!/usr/bin/env python3
"""Independent ESP CBC+HMAC vectors for esp-proto's tests (src/sa_tests.rs), built with the
Python `cryptography` package straight from RFC 4303 (§2.2.1 ICV coverage with ESN, §2.4
padding), RFC 3602 (AES-CBC) and RFC 2404 / RFC 4868 (truncated HMAC).
Run: python3 gen_cbc_hmac.py  (prints the Rust table rows)."""
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def ipv4(length, ident):
    hdr = bytearray(20)
    hdr[0] = 0x45
    hdr[2:4] = struct.pack(">H", length)
    hdr[4:6] = struct.pack(">H", ident)
    hdr[8] = 64
    hdr[9] = 17
    hdr[12:16] = bytes([10, 1, 0, 1])
    hdr[16:20] = bytes([10, 2, 0, 2])
    s = sum(struct.unpack(">10H", bytes(hdr)))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack(">H", (~s) & 0xFFFF)
    return bytes(hdr) + bytes((i * 7) & 0xFF for i in range(length - 20))


def esp(key, ikey, digest, trunc, spi, seq, esn, iv, inner):
    k = (16 - (len(inner) + 2) % 16) % 16
    payload = inner + bytes(range(1, k + 1)) + bytes([k, 4])
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(payload) + enc.finalize()
    head = struct.pack(">II", spi, seq & 0xFFFFFFFF) + iv
    extra = struct.pack(">I", seq >> 32) if esn else b""
    icv = hmac.new(ikey, head + ct + extra, digest).digest()[:trunc]
    return head + ct + icv


CASES = [
    ("aes128-sha1", 16, 20, hashlib.sha1, 12, 0x0000BEEF, 1, False, 61),
    ("aes128-sha256", 16, 32, hashlib.sha256, 16, 0x12345678, 0x2A, False, 100),
    ("aes256-sha512", 32, 64, hashlib.sha512, 32, 0xC0FFEE01, (3 << 32) | 7, True, 84),
]

for name, klen, ilen, digest, trunc, spi, seq, esn, n in CASES:
    key = bytes((0x10 + i) for i in range(klen))
    ikey = bytes((0x80 + i) & 0xFF for i in range(ilen))
    iv = bytes((0xA0 + i) for i in range(16))
    inner = ipv4(n, 0x1234)
    pkt = esp(key, ikey, digest, trunc, spi, seq, esn, iv, inner)
    print(f'    ("{name}", {seq:#x}, {str(esn).lower()}, "{inner.hex()}", "{pkt.hex()}"),')
