"""Which Bytewax worker runs which Kafka partition: the routing keys of both dataflows' stateful steps.

A stateful step routes key ``k`` to worker ``siphash13(k + b"\\xff") % workers`` (Rust's ``DefaultHasher``
as Bytewax 0.21 uses it; checked against Bytewax itself in tests/test_labels_flow.py). :func:`part_key`
picks, for partition p of P, a key string whose route is ``p mod W`` for every W dividing lcm(P, 12), so
partitions spread evenly over 1, 2, 3, 4, 6, 12 and P workers, and a key never changes with the worker count
(recovery state stays addressable). Bytewax offers no way to choose a key's worker, hence the hash here.

>>> [route(part_key(p, 4), 2) for p in range(4)]
[0, 1, 0, 1]
"""

from __future__ import annotations

import math

_M64 = (1 << 64) - 1


def _siphash13(data: bytes) -> int:
    """SipHash-1-3 with a zero key: Rust's ``DefaultHasher::new()``, which Bytewax/Timely use to route keys."""
    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573

    def rnd(v0, v1, v2, v3):
        v0 = (v0 + v1) & _M64; v1 = ((v1 << 13) | (v1 >> 51)) & _M64; v1 ^= v0; v0 = ((v0 << 32) | (v0 >> 32)) & _M64
        v2 = (v2 + v3) & _M64; v3 = ((v3 << 16) | (v3 >> 48)) & _M64; v3 ^= v2
        v0 = (v0 + v3) & _M64; v3 = ((v3 << 21) | (v3 >> 43)) & _M64; v3 ^= v0
        v2 = (v2 + v1) & _M64; v1 = ((v1 << 17) | (v1 >> 47)) & _M64; v1 ^= v2; v2 = ((v2 << 32) | (v2 >> 32)) & _M64
        return v0, v1, v2, v3

    n, full = len(data), len(data) // 8 * 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def route(key: str, workers: int) -> int:
    """The worker index Bytewax 0.21 sends a stateful key to (Rust ``str`` hashing appends 0xff)."""
    return _siphash13(key.encode() + b"\xff") % workers


def part_key(p: int, partitions: int) -> str:
    """Key of Kafka partition number ``p``: ``"p<p>"`` plus the first salt that spreads keys over workers."""
    m = math.lcm(partitions, 12)
    for salt in range(100_000):
        key = f"p{p}" if salt == 0 else f"p{p}.{salt}"
        if route(key, m) == p % m:
            return key
    raise RuntimeError(f"labels: no routing key found for partition {p} of {partitions}")  # pragma: no cover
