"""The only module that imports confluent-kafka: producers, consumers and topic administration.

Settings tuned for the embedded broker but valid on any Kafka: a short ``session.timeout.ms`` (Tansu answers
the second JoinGroup after about half of it), no reliance on watermarks or transactions.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.partition import partition_for

__all__ = ["OFFSET_BEGINNING", "KafkaError", "KafkaException", "Message", "TopicPartition", "make_producer",
           "make_consumer", "ensure_topics", "list_topics", "produce", "partition_for", "topic_partitions"]


def _base(bootstrap: str, extra: Mapping[str, str] | None) -> dict:
    conf = {"bootstrap.servers": bootstrap}
    conf.update(extra or {})
    return conf


PRODUCER_DEFAULTS = {"linger.ms": 5, "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                     "compression.type": "lz4", "enable.idempotence": False, "partitioner": "murmur2_random"}


def producer_config(bootstrap: str, extra: Mapping[str, str] | None = None, **overrides) -> dict:
    """Throughput defaults, then the user's ``kafka.client`` settings (``extra``), then the caller's
    ``overrides`` (what the calling code depends on): a user's ``compression.type: zstd`` is kept.

    >>> producer_config("h:9092", {"compression.type": "zstd"}, **{"delivery.report.only.error": True})["compression.type"]
    'zstd'
    """
    return {"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **(extra or {}), **overrides}


def make_producer(bootstrap: str, extra: Mapping[str, str] | None = None, **overrides) -> Producer:
    return Producer(producer_config(bootstrap, extra, **overrides))


def make_consumer(bootstrap: str, group: str, extra: Mapping[str, str] | None = None, **overrides) -> Consumer:
    """A consumer that never auto-commits: streamrec keeps offsets in its own checkpoints."""
    conf = _base(bootstrap, extra)
    conf.update({"group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
                 "enable.auto.offset.store": False, "session.timeout.ms": 6000,
                 "heartbeat.interval.ms": 1000, "enable.partition.eof": False})
    conf.update(overrides)
    return Consumer(conf)


def list_topics(bootstrap: str, timeout: float = 5.0, extra: Mapping[str, str] | None = None) -> dict[str, int]:
    """Topic name -> partition count."""
    admin = AdminClient(_base(bootstrap, extra))
    md = admin.list_topics(timeout=timeout)
    return {name: len(t.partitions) for name, t in md.topics.items() if not name.startswith("__")}


def cluster_id(bootstrap: str, extra: Mapping[str, str] | None = None, timeout: float = 10.0) -> str:
    """The cluster's id: offsets are only meaningful within one cluster (the embedded broker gets a new id per
    start)."""
    admin = AdminClient(_base(bootstrap, extra))
    return admin.list_topics(timeout=timeout).cluster_id or ""


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int, extra: Mapping[str, str] | None = None,
                  timeout: float = 15.0) -> None:
    """Create missing topics; existing ones must have ``partitions`` partitions (no CreatePartitions here)."""
    admin = AdminClient(_base(bootstrap, extra))  # keep referenced until the futures resolve
    existing = {name: len(t.partitions) for name, t in admin.list_topics(timeout=timeout).topics.items()}
    wanted = [t for t in dict.fromkeys(topics) if t not in existing]
    for t in topics:
        if t in existing and existing[t] != partitions:
            raise ValueError(f"topic {t!r} has {existing[t]} partitions, expected {partitions}: impressions, clicks "
                             "and conversions must share one partition count; recreate the topic")
    if not wanted:
        return
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in wanted])
    for t, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def produce(producer: Producer, topic: str, value: bytes, key: bytes | None = None,
            partition: int | None = None) -> None:
    """Produce one message, waiting for queue space instead of failing with BufferError."""
    while True:
        try:
            if partition is None:
                producer.produce(topic, value=value, key=key)
            else:
                producer.produce(topic, value=value, key=key, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def topic_partitions(topics: Iterable[str], partitions: int, offsets: Mapping[tuple[str, int], int] | None = None
                     ) -> list[TopicPartition]:
    """TopicPartitions for every (topic, partition), at ``offsets`` when known, else the beginning."""
    offsets = offsets or {}
    return [TopicPartition(t, p, offsets.get((t, p), OFFSET_BEGINNING)) for t in topics for p in range(partitions)]


def wait_for(cond, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()
