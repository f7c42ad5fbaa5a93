"""Kafka's key -> partition mapping in pure Python: what librdkafka's default partitioner picks, so the
producer can place records explicitly (an impression and its feedback in the same partition number) and
watermarks can target each partition. No confluent-kafka import here: the replay decoder worker uses it
and starts faster without (``streams.bus.kafka_io`` re-exports :func:`partition_for`).

>>> [partition_for(str(user).encode(), 4) for user in (1, 2, 3, 42)]
[3, 0, 3, 0]
"""

from __future__ import annotations


def partition_for(key: bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (consistent_random: murmur2) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (the Java client's DefaultPartitioner)."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length - length % 4
    for i in range(0, end, 4):
        k = (int.from_bytes(data[i:i + 4], "little") * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ (((k ^ (k >> 24)) * m) & 0xFFFFFFFF)
    rest = length - end
    if rest:
        if rest == 3:
            h ^= data[end + 2] << 16
        if rest >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)
