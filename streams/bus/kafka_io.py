"""The only module that imports confluent-kafka: producers, consumers and topic administration.

Settings tuned for the embedded broker but valid on any Kafka: a short ``session.timeout.ms`` (Tansu answers
the second JoinGroup after about half of it), no reliance on watermarks or transactions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Producer as _KafkaProducer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.bus.partition import partition_for

__all__ = ["OFFSET_BEGINNING", "KafkaError", "KafkaException", "Message", "TopicPartition", "make_producer",
           "make_consumer", "ensure_topics", "list_topics", "produce", "partition_for", "topic_partitions"]


def _base(bootstrap: str, extra: Mapping[str, str] | None) -> dict:
    conf = {"bootstrap.servers": bootstrap}
    conf.update(extra or {})
    return conf


# message.timeout.ms 0: a produced message is retried until the broker takes it (acks=all, librdkafka's
# default), never dropped after a timeout while the broker is down; what librdkafka gives up on anyway is
# produced again (:class:`Producer`); callers that move offsets past what they produced wait for delivery
# first (:func:`flush_all`). Delivery reports only for failures: a Python callback per message costs ~10%.
PRODUCER_DEFAULTS = {"linger.ms": 5, "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                     "compression.type": "lz4", "enable.idempotence": False, "partitioner": "murmur2_random",
                     "message.timeout.ms": 0, "delivery.report.only.error": True}
# Errors no retry can cure (the message or the configuration is wrong): counted and reported, not retried.
_PERMANENT = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG,
              KafkaError.INVALID_MSG_SIZE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
              KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._INVALID_ARG}


def producer_config(bootstrap: str, extra: Mapping[str, str] | None = None, **overrides) -> dict:
    """Throughput defaults, then the user's ``kafka.client`` settings (``extra``), then the caller's
    ``overrides`` (what the calling code depends on): a user's ``compression.type: zstd`` is kept.

    >>> producer_config("h:9092", {"compression.type": "zstd"}, **{"delivery.report.only.error": True})["compression.type"]
    'zstd'
    """
    return {"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **(extra or {}), **overrides}


class Producer(_KafkaProducer):
    """A confluent-kafka producer that produces again what the broker failed to take.

    librdkafka retries transport errors by itself, but not every error a broker answers: Tansu answers
    UNKNOWN while the storage behind it is away, and such a message would be lost. Its delivery report puts
    it back on a queue that :meth:`poll` and :meth:`flush` produce again (at-least-once: every consumer of
    streamrec's topics is idempotent). ``failed``: messages refused for good (see ``_PERMANENT``), with
    ``on_failure(err, msg)`` called for each.
    """

    def __init__(self, conf: dict, on_failure: Callable | None = None):
        self.redo: deque = deque()
        self.failed = self.retried = 0
        self.on_failure = on_failure
        super().__init__({**conf, "on_delivery": self._on_delivery})

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            return
        if err.code() in _PERMANENT:
            self.failed += 1
            report(_CLIENT_LOG.logger, f"producer {msg.topic()}", f"{err.name()}: {err.str()} (not retried)",
                   logging.ERROR)
            if self.on_failure is not None:
                self.on_failure(err, msg)
            return
        self.retried += 1
        report(_CLIENT_LOG.logger, f"producer {msg.topic()}", f"{err.name()}: {err.str()} (producing again)")
        self.redo.append((msg.topic(), msg.value(), msg.key(), msg.partition()))

    def _redo(self) -> None:
        while self.redo:
            topic, value, key, part = self.redo[0]
            try:
                super().produce(topic, value, key, part)
            except BufferError:
                return
            self.redo.popleft()

    def poll(self, timeout: float = 0) -> int:
        n = super().poll(timeout)
        self._redo()
        return n

    def flush(self, timeout: float = -1) -> int:
        """As ``Producer.flush``, counting the messages waiting to be produced again as not delivered."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            left = super().flush(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
            self._redo()
            left += len(self.redo)
            if not left or (deadline is not None and time.monotonic() >= deadline):
                return left


def make_producer(bootstrap: str, extra: Mapping[str, str] | None = None, *, on_failure: Callable | None = None,
                  **overrides) -> Producer:
    """A :class:`Producer` with :func:`producer_config`; ``on_failure(err, msg)``: see :class:`Producer`."""
    return Producer({**producer_config(bootstrap, extra, **overrides), "logger": _CLIENT_LOG,
                     "error_cb": _client_error}, on_failure)


def flush_all(producer: Producer, what: str, log: logging.Logger | None = None) -> None:
    """Wait until every produced message is delivered, however long the broker is away: a caller about to
    record that its input was handled (a snapshot, a checkpoint) must not get ahead of its output."""
    t0 = time.monotonic()
    while (left := producer.flush(5.0)) > 0:
        report(log or _CLIENT_LOG, f"{what}: waiting for the broker", f"{left} messages not yet delivered after "
               f"{time.monotonic() - t0:.0f}s")


class _Reporter:
    """Logs each (place, problem) the first time, then at most once per ``every_s`` with how many were
    suppressed: a broker that is down for an hour costs a few log lines, not megabytes."""

    def __init__(self, every_s: float = 30.0):
        self.every_s, self.lock = every_s, threading.Lock()
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, log: logging.Logger, where: str, problem: str, level: int = logging.WARNING) -> None:
        key, now = (where, problem.split(":", 1)[0]), time.monotonic()
        with self.lock:
            last, suppressed = self.seen.get(key, (-1e18, 0))
            if now - last < self.every_s:
                self.seen[key] = (last, suppressed + 1)
                return
            self.seen[key] = (now, 0)
        log.log(level, "%s: %s%s", where, problem, f" ({suppressed} more like it since)" if suppressed else "")


report = _Reporter()


class _ClientLog(logging.LoggerAdapter):
    """librdkafka's own log lines (``logger`` setting), through :data:`report`'s rate limit."""

    def log(self, level, msg, *args, **kwargs):
        text = msg % args if args else str(msg)
        report(self.logger, "kafka client", text, level if level >= logging.WARNING else logging.DEBUG)


_CLIENT_LOG = _ClientLog(logging.getLogger("streamrec.kafka"), {})


def _client_error(err: KafkaError) -> None:
    report(_CLIENT_LOG.logger, "kafka client", f"{err.name()}: {err.str()}")


def consumer_error(err: KafkaError, where: str, log: logging.Logger) -> None:
    """A consumer's error message: fatal ones raise; end of partition is not an error; others (broker away,
    transport errors) are logged through :data:`report`'s rate limit while the client retries."""
    if err.code() == KafkaError._PARTITION_EOF:
        return
    if err.fatal():
        raise KafkaException(err)
    report(log, where, f"{err.name()}: {err.str()}")


def make_consumer(bootstrap: str, group: str, extra: Mapping[str, str] | None = None, *, on_error=None,
                  **overrides) -> Consumer:
    """A consumer that never auto-commits: streamrec keeps offsets in its own checkpoints.

    ``on_error(KafkaError)``: also called with the client's errors (all brokers down, transport errors), which
    librdkafka reports through its error callback rather than as messages."""
    conf = _base(bootstrap, extra)
    conf.update({"group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
                 "enable.auto.offset.store": False, "session.timeout.ms": 6000,
                 "heartbeat.interval.ms": 1000, "enable.partition.eof": False})
    conf.update(overrides)
    conf["logger"] = _CLIENT_LOG
    conf["error_cb"] = _client_error if on_error is None else (lambda err: (_client_error(err), on_error(err)))
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

