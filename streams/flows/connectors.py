"""Kafka connectors of the dataflows: the Bytewax sources and sinks that the flows take as arguments.

labels::

    KafkaPartitionsSource: one source partition per Kafka partition NUMBER p, one consumer assigned to
      (impressions, p), (clicks, p), (conversions, p); one item = SourceBatch(up to labels.batch_size raw
      messages, topics caught up); snapshot = next offset per topic
    LabelsSink: one writer per partition key, one producer per process; examples -> topics.examples
      (key user_id), dead letters -> topics.dead_letters; ServiceStats(component="labels") about every
      second (events_in, examples_out, dead_letters, dead.<reason>, late_positives, pending_impressions, the
      join state's gauges join_state_memory_bytes, join_state_disk_bytes, join_compacted_impressions)

stats::

    KafkaExamplesSource: one source partition per examples-topic partition; StatsBatch(p, raw Examples)
    StatsReporter: the flow's counters -> ServiceStats(component="stats") about every second
    FeatureStatsSink: encoded FeatureStats -> the feature_stats topic, key = stats_id

distill::

    KafkaDistillSource: one source partition per partition number p, one consumer assigned to (examples, p)
      and (teacher_predictions, p); DistillBatch(p, raw messages, wall ms); snapshot = next offset per topic
    DistillSink: examples (with or without teacher) -> topics.examples_distilled partition p (key user id),
      dead letters -> topics.dead_letters; ServiceStats(component="distill") about every second

Event-time pacing (labels): the source takes the largest valid event time among the last messages per topic
of each batch (malformed and far-future records do not count) and pauses the topic-partitions more than
``labels.pace_slack_s`` ahead of the slowest live one, so feedback read before its impression (the join's
orphan buffer) stays bounded.

Delivery: every sink waits for its messages to be delivered before Bytewax snapshots the epoch's source
offsets (at-least-once; the consumers of both topics are idempotent).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition

from streams import schema
from streams.bus import kafka_io
from config import Config
from streams.flows import distill, join
from streams.flows.distill import DistillBatch, DistillOut
from streams.flows.join import OutBatch
from streams.flows.routing import part_key
from streams.flows.stats import StatsBatch, stats_topic
from streams.names import Component, Stat

log = logging.getLogger(__name__)
GROUP = "streamrec-labels"  # assign() only, never committed: offsets live in Bytewax snapshots


# ------------------------------------------------------------------------------------------- labels source

HEARTBEAT_S = 1.0


class _PartitionReader(StatefulSourcePartition[join.SourceBatch, dict]):
    """One consumer on (impressions, clicks, conversions) partition ``p``; snapshot = next offset per topic."""

    def __init__(self, cfg: Config, p: int, offsets: dict[str, int] | None, bounded: bool):
        self.topics, self.p, self.bounded = cfg.topics.input_topics(), p, bounded
        self.batch_size = cfg.labels.batch_size
        self.next = dict(offsets or {})
        self.eof = {t: False for t in self.topics}
        self.eof_since: dict[str, float] = {}  # monotonic time each topic-partition last reached its end
        self.idle_s = 0.0 if bounded else cfg.labels.idle_s
        self.reported: frozenset[str] = frozenset()
        self.last_emit = 0.0
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, GROUP, cfg.kafka.client,
                                               **{"enable.partition.eof": True, "fetch.wait.max.ms": 100})
        self.consumer.assign([kafka_io.TopicPartition(t, p, self.next.get(t, kafka_io.OFFSET_BEGINNING))
                              for t in self.topics])
        self.finished = False
        self.head: dict[str, int] = {}  # latest event ts read per topic (from the last message of a batch)
        self.paused: set[str] = set()
        self.pauses = 0
        self.slack_ms = int(cfg.labels.pace_slack_s * 1000)

    def next_batch(self) -> list[join.SourceBatch]:
        if self.finished:
            raise StopIteration()
        msgs, p, eof, eof_at = [], self.p, self.eof, {}
        for m in self.consumer.consume(num_messages=self.batch_size, timeout=0.05):
            err = m.error()
            if err is None:
                msgs.append((m.topic(), p, m.offset(), m.value() or b""))
            elif err.code() == kafka_io.KafkaError._PARTITION_EOF:
                if not eof[m.topic()]:
                    self.eof_since[m.topic()] = time.monotonic()
                eof[m.topic()], eof_at[m.topic()] = True, len(msgs)
            else:
                kafka_io.consumer_error(err, f"labels source partition {p}", log)
        seen, latest = set(), int(time.time() * 1000) + join.FUTURE_TOLERANCE_MS
        for i in range(len(msgs) - 1, -1, -1):  # last message per topic: next offset; data after EOF: not caught up
            topic = msgs[i][0]
            if topic not in seen:
                seen.add(topic)
                self.next[topic] = msgs[i][2] + 1
                if eof[topic] and eof_at.get(topic, -1) <= i:
                    eof[topic] = False
                ts = _head_ts(msgs, i, latest)
                if ts is not None and ts > self.head.get(topic, -1):
                    self.head[topic] = ts
        self._pace()
        if self.bounded and all(self.eof.values()):
            self.finished = True
        # At its end a tailing topic may still receive data: it stops holding event time back only once idle
        # for idle_s (otherwise a momentarily caught-up impressions topic lets windows close too early).
        now = time.monotonic()
        caught = frozenset(t for t, e in self.eof.items() if e and now - self.eof_since[t] >= self.idle_s)
        if not msgs and caught == self.reported and now - self.last_emit < HEARTBEAT_S:
            return []
        # an empty batch at least every HEARTBEAT_S keeps the sink publishing stats while the input is quiet
        self.reported, self.last_emit = caught, now
        return [join.SourceBatch(self.p, tuple(msgs), caught)]

    def _pace(self) -> None:
        """Pause topic-partitions more than ``slack`` ahead in event time of the slowest live one.

        The slowest topic that is not at its end is never paused, so reading always progresses; the join's
        orphan buffers (feedback read before its impression) stay bounded by ``slack`` of event time.
        """
        live = [self.head.get(t) for t in self.topics if not self.eof[t]]
        if None in live:  # a topic with unread data and no time yet (start-up): hold the others until it has one
            want = {t for t in self.topics if not self.eof[t] and t in self.head}
        else:
            floor = min(live) if live else 0
            want = {t for t in self.topics if not self.eof[t] and self.head[t] > floor + self.slack_ms}
        if want != self.paused:
            tps = lambda ts: [kafka_io.TopicPartition(t, self.p) for t in ts]
            if want - self.paused:
                self.consumer.pause(tps(want - self.paused))
            if self.paused - want:
                self.consumer.resume(tps(self.paused - want))
            self.paused = want
            self.pauses += 1

    def snapshot(self) -> dict:
        return dict(self.next)

    def close(self) -> None:
        self.consumer.close()


def _head_ts(msgs: list[join.RawMsg], i: int, latest: int) -> int | None:
    """The largest event time among message ``i`` and the valid records of its topic just before it (the
    last 8 messages of the batch); None when none of them is valid.

    Valid: an event the join takes, with a ts no later than ``latest`` (the wall clock plus the join's future
    tolerance), or a watermark (sent to all three topics alike, so it moves no topic ahead of the others).
    Decoded and checked as the join does: a malformed record may carry any ts of the log (its damage is
    elsewhere), and the head only grows while a topic whose head runs ahead is paused: one ts from the year
    2100 paused its topic for as long as any other topic had data. The largest, not the last: a duplicate or
    late feedback from an hour ago must not hold the head back. A few records a batch are decoded here:
    nothing next to the join's decoding."""
    topic, best = msgs[i][0], None
    for j in range(i, max(i - 8, -1), -1):
        if msgs[j][0] == topic:
            ev = schema.decode(msgs[j][3])
            if isinstance(ev, schema.Invalid) or (ev.ts > latest and type(ev) is not schema.Watermark):
                continue
            if best is None or ev.ts > best:
                best = ev.ts
    return best


class _PerPartitionSource(FixedPartitionedSource):
    """One source partition per Kafka partition number of a flow's input topics (keyed by :func:`part_key`, so
    each lands on the worker the flow's state for it lives on); ``reader(cfg, partition, resume_state,
    bounded)`` reads one."""

    reader: type

    def __init__(self, cfg: Config, bounded: bool):
        self.cfg, self.bounded = cfg, bounded
        n = cfg.topics.partitions
        self.keys = {part_key(p, n): p for p in range(n)}

    def list_parts(self) -> list[str]:
        return list(self.keys)

    def build_part(self, step_id: str, for_part: str, resume_state):
        return self.reader(self.cfg, self.keys[for_part], resume_state, self.bounded)


class KafkaPartitionsSource(_PerPartitionSource):
    """The labels flow's input: the three input topics, per partition number."""

    reader = _PartitionReader


# --------------------------------------------------------------------------------------------- labels sink

class _Stats:
    """Process-wide totals of every partition, published as ``ServiceStats`` about once a second."""

    def __init__(self, cfg: Config):
        self.cfg, self.lock = cfg, threading.Lock()
        self.parts: dict[str, tuple[dict, int, tuple[int, int, int]]] = {}
        self.last_t, self.last_in = time.monotonic(), 0.0
        self.instance = f"{socket.gethostname()}-{os.getpid()}"

    def update(self, key: str, batch: OutBatch) -> None:
        self.parts[key] = (batch.counts, batch.pending, batch.state)

    def totals(self) -> dict[str, float]:
        """Counters and gauges summed over the process's partitions (events_per_s aside)."""
        names = {k for c, _, _ in self.parts.values() for k in c}
        names.update((Stat.EVENTS_IN, Stat.EXAMPLES_OUT, Stat.DEAD_LETTERS))
        values = {k: float(sum(c.get(k, 0) for c, _, _ in self.parts.values())) for k in sorted(names)}
        values[Stat.PENDING_IMPRESSIONS] = float(sum(p for _, p, _ in self.parts.values()))
        for i, name in enumerate((Stat.JOIN_STATE_MEMORY_BYTES, Stat.JOIN_STATE_DISK_BYTES, Stat.JOIN_COMPACTED)):
            values[name] = float(sum(g[i] for _, _, g in self.parts.values()))
        return values

    def maybe_publish(self, producer, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_t < 1.0:
            return
        with self.lock:
            if not force and now - self.last_t < 1.0:
                return
            values = self.totals()
            dt = max(now - self.last_t, 1e-6)
            values[Stat.EVENTS_PER_S] = (values[Stat.EVENTS_IN] - self.last_in) / dt
            self.last_t, self.last_in = now, values[Stat.EVENTS_IN]
        st = schema.ServiceStats(component=Component.LABELS, ts=int(time.time() * 1000), values=values,
                                 instance=self.instance)
        key = b"labels"
        kafka_io.produce(producer, self.cfg.topics.service_stats, schema.encode(st), key=key,
                         partition=kafka_io.partition_for(key, self.cfg.topics.partitions))


@functools.lru_cache(maxsize=1 << 16)
def _partition_for(key: bytes, partitions: int) -> int:
    return kafka_io.partition_for(key, partitions)  # pure-Python murmur2: cached, users repeat


class _PartitionWriter(StatefulSinkPartition[OutBatch, None]):
    def __init__(self, cfg: Config, key: str, p: int, stats: _Stats, sink: LabelsSink):
        self.cfg, self.key, self.p, self.stats, self.sink = cfg, key, p, stats, sink
        self.producer = sink.acquire()  # shared by the process's partitions: one set of threads, bigger batches
        self.last_flush = time.monotonic()

    def write_batch(self, values: list[OutBatch]) -> None:
        t, n, produce = self.cfg.topics, self.cfg.topics.partitions, self.producer.produce
        examples, dead, p = t.examples, t.dead_letters, self.p % n
        for batch in values:
            for kind, key, value in batch.records:
                topic, part = (examples, _partition_for(key, n)) if kind == join.EXAMPLE else (dead, p)
                try:
                    produce(topic, value, key, part)  # positional: no kwargs parsing on the hot path
                except BufferError:
                    kafka_io.produce(self.producer, topic, value, key=key, partition=part)
            self.stats.update(self.key, batch)
        self.producer.poll(0)
        self.stats.maybe_publish(self.producer)
        if time.monotonic() - self.last_flush > 1.0:
            self.producer.flush(30)
            self.last_flush = time.monotonic()

    def snapshot(self) -> None:
        # Everything before this epoch's source offsets is written before they are saved: at-least-once.
        kafka_io.flush_all(self.producer, f"labels sink partition {self.p}", log)

    def close(self) -> None:
        self.stats.maybe_publish(self.producer, force=True)
        kafka_io.flush_all(self.producer, f"labels sink partition {self.p}", log)
        self.producer = None
        self.sink.release()


class _PerPartitionSink(FixedPartitionedSink):
    """One writer per partition key (items stay on the worker whose state made them), one producer per process
    shared by its writers: :meth:`acquire` when a writer is built, :meth:`release` when it closes."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.producer, self.users, self.lock = None, 0, threading.Lock()
        n = cfg.topics.partitions
        self.keys = [part_key(p, n) for p in range(n)]

    def acquire(self):
        with self.lock:  # worker threads build their parts concurrently
            if self.producer is None:
                self.producer = kafka_io.make_producer(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.client)
            self.users += 1
            return self.producer

    def release(self) -> None:
        with self.lock:  # the last writer drops the producer: no broker connection outlives the flow
            self.users -= 1
            if self.users == 0:
                self.producer = None

    def list_parts(self) -> list[str]:
        return list(self.keys)

    def part_fn(self, item_key: str) -> int:
        return sorted(self.keys).index(item_key)


class LabelsSink(_PerPartitionSink):
    """The labels flow's output: examples, dead letters and its ServiceStats."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.stats = _Stats(cfg)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _PartitionWriter:
        return _PartitionWriter(self.cfg, for_part, self.keys.index(for_part), self.stats, self)


# -------------------------------------------------------------------------------------------- stats source

class _Reader(StatefulSourcePartition[StatsBatch, int]):
    """One consumer on examples partition ``p``; snapshot = next offset."""

    def __init__(self, cfg: Config, p: int, offset: int | None, bounded: bool):
        self.p, self.bounded, self.topic = p, bounded, cfg.topics.examples
        self.next = offset
        self.batch_size = cfg.labels.batch_size
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "streamrec-stats", cfg.kafka.client,
                                               **{"enable.partition.eof": True, "fetch.wait.max.ms": 100})
        start = kafka_io.OFFSET_BEGINNING if offset is None else offset
        self.consumer.assign([kafka_io.TopicPartition(self.topic, p, start)])
        self.done, self.last_emit = False, 0.0

    def next_batch(self) -> list[StatsBatch]:
        if self.done:
            raise StopIteration()
        values, eof = [], False
        for m in self.consumer.consume(num_messages=self.batch_size, timeout=0.05):
            if m.error() is None:
                values.append(m.value() or b"")
                self.next = m.offset() + 1
            elif m.error().code() == kafka_io.KafkaError._PARTITION_EOF:
                eof = True
            else:
                kafka_io.consumer_error(m.error(), f"stats source partition {self.p}", log)
        self.done = eof and self.bounded
        now = time.monotonic()
        if not values and not self.done and now - self.last_emit < HEARTBEAT_S:
            return []
        self.last_emit = now  # an empty batch at least every HEARTBEAT_S: the flow reports while input is quiet
        return [StatsBatch(self.p, tuple(values), self.done)]

    def snapshot(self) -> int | None:
        return self.next

    def close(self) -> None:
        self.consumer.close()


class KafkaExamplesSource(_PerPartitionSource):
    """The stats flow's input: the examples topic, per partition."""

    reader = _Reader


class StatsReporter:
    """The stats flow's counters over every partition of this process (examples in, invalid, too late, records
    out, open windows), published as ``ServiceStats(component="stats")`` about once a second and at the end of
    a bounded run; the source's heartbeat keeps it reporting while the examples topic is quiet, so the stack
    health panel and the ``component_silent`` alert see the flow."""

    def __init__(self, cfg: Config):
        self.cfg, self.lock = cfg, threading.Lock()
        self.parts: dict[int, tuple[dict, int]] = {}
        self.producer = None
        self.last_t, self.last_in = 0.0, 0.0
        self.instance = f"{socket.gethostname()}-{os.getpid()}"

    def __call__(self, state, final: bool) -> None:
        with self.lock:  # worker threads report their partitions concurrently
            self.parts[state.partition] = (dict(state.counts), len(state.open))
            now = time.monotonic()
            if not final and now - self.last_t < 1.0:
                return
            names = {k for c, _ in self.parts.values() for k in c}
            values = {str(k): float(sum(c.get(k, 0) for c, _ in self.parts.values())) for k in sorted(names)}
            values[Stat.OPEN_WINDOWS] = float(sum(n for _, n in self.parts.values()))
            values[Stat.EXAMPLES_PER_S] = ((values[Stat.EXAMPLES_IN] - self.last_in) / (now - self.last_t)
                                           if self.last_t else 0.0)
            self.last_t, self.last_in = now, values[Stat.EXAMPLES_IN]
            if self.producer is None:
                self.producer = kafka_io.make_producer(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.client)
        st = schema.ServiceStats(component=Component.STATS, ts=int(time.time() * 1000), values=values,
                                 instance=self.instance)
        key = b"stats"
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st), key=key,
                         partition=kafka_io.partition_for(key, self.cfg.topics.partitions))
        if final:
            kafka_io.flush_all(self.producer, "stats reporter", log)
        else:
            self.producer.poll(0)


# ---------------------------------------------------------------------------------------------- stats sink

class FeatureStatsSink(DynamicSink[bytes]):
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[bytes]:
        return _Writer(self.cfg)


class _Writer(StatelessSinkPartition[bytes]):
    def __init__(self, cfg: Config):
        self.topic, self.n = stats_topic(cfg), cfg.topics.partitions
        self.producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.client)

    def write_batch(self, items: list[bytes]) -> None:
        for value in items:
            key = value[value.index(b'"stats_id":"') + 12:].split(b'"', 1)[0]  # id is plain ASCII
            kafka_io.produce(self.producer, self.topic, value, key=key,
                             partition=kafka_io.partition_for(key, self.n))
        kafka_io.flush_all(self.producer, "stats sink", log)  # before the epoch's offsets are snapshotted

    def close(self) -> None:
        kafka_io.flush_all(self.producer, "stats sink", log)


# ------------------------------------------------------------------------------------------------ distill

class _DistillReader(StatefulSourcePartition[DistillBatch, dict]):
    """One consumer on (examples, p) and (teacher_predictions, p); snapshot = next offset per topic.

    No event-time pacing: the join waits by wall clock, not event time. A teacher batch covers many examples
    in few bytes, so while catching up a backlog the teachers run ahead of their examples; they wait as
    orphans (as long as ``teacher_wait_s``, at most ``max_pending``)."""

    def __init__(self, cfg: Config, p: int, offsets: dict[str, int] | None, bounded: bool):
        self.topics = (cfg.topics.examples, cfg.topics.teacher_predictions)
        self.p, self.bounded, self.batch_size = p, bounded, cfg.labels.batch_size
        self.next = dict(offsets or {})
        self.eof = {t: False for t in self.topics}
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "streamrec-distill", cfg.kafka.client,
                                               **{"enable.partition.eof": True, "fetch.wait.max.ms": 100})
        self.consumer.assign([kafka_io.TopicPartition(t, p, self.next.get(t, kafka_io.OFFSET_BEGINNING))
                              for t in self.topics])
        self.last_emit = 0.0

    def next_batch(self) -> list[DistillBatch]:
        if self.bounded and all(self.eof.values()):
            raise StopIteration()
        msgs, p = [], self.p
        for m in self.consumer.consume(num_messages=self.batch_size, timeout=0.05):
            err = m.error()
            if err is None:
                msgs.append((m.topic(), p, m.offset(), m.value() or b""))
                self.next[m.topic()] = m.offset() + 1
                self.eof[m.topic()] = False
            elif err.code() == kafka_io.KafkaError._PARTITION_EOF:
                self.eof[m.topic()] = True
            else:
                kafka_io.consumer_error(err, f"distill source partition {p}", log)
        now = time.monotonic()
        if not msgs and now - self.last_emit < HEARTBEAT_S:
            return []
        self.last_emit = now  # an empty batch at least every HEARTBEAT_S: stats while the input is quiet
        return [DistillBatch(p, tuple(msgs), int(time.time() * 1000))]

    def snapshot(self) -> dict:
        return dict(self.next)

    def close(self) -> None:
        self.consumer.close()


class KafkaDistillSource(_PerPartitionSource):
    """The teacher join's input: the examples and teacher-predictions topics, per partition number."""

    reader = _DistillReader


def _p50(xs: list[int]) -> float:
    return float(sorted(xs)[len(xs) // 2]) if xs else 0.0


class _DistillStats:
    """Process-wide totals of every partition, published as ``ServiceStats(component="distill")`` about once a
    second: counters summed, coverage = with / out, the interval's p50 teacher age and wait."""

    def __init__(self, cfg: Config):
        self.cfg, self.lock = cfg, threading.Lock()
        self.parts: dict[str, tuple[dict, int, int]] = {}
        self.ages: list[int] = []
        self.waits: list[int] = []
        self.last_t, self.last_in = time.monotonic(), 0.0
        self.instance = f"{socket.gethostname()}-{os.getpid()}"

    def update(self, key: str, b: DistillOut) -> None:
        with self.lock:
            self.parts[key] = (b.counts, b.pending, b.orphans)
            if len(self.ages) < 4096:
                self.ages.extend(b.ages_ms)
            if len(self.waits) < 4096:
                self.waits.extend(b.waits_ms)

    def values(self) -> dict[str, float]:
        """The current totals (and the interval's p50s, which this resets)."""
        with self.lock:
            names = {k for c, _, _ in self.parts.values() for k in c}
            names.update((Stat.EXAMPLES_IN, Stat.EXAMPLES_OUT, Stat.EXAMPLES_WITH_TEACHER,
                          Stat.EXAMPLES_WITHOUT_TEACHER, Stat.TEACHERS_IN, Stat.TEACHERS_LATE, Stat.DEAD_LETTERS))
            v = {str(k): float(sum(c.get(k, 0) for c, _, _ in self.parts.values())) for k in sorted(names)}
            v[Stat.PENDING_EXAMPLES] = float(sum(p for _, p, _ in self.parts.values()))
            v[Stat.PENDING_TEACHERS] = float(sum(o for _, _, o in self.parts.values()))
            out = v[Stat.EXAMPLES_OUT]
            v[Stat.TEACHER_COVERAGE] = v[Stat.EXAMPLES_WITH_TEACHER] / out if out else 0.0
            if self.ages:
                v[Stat.TEACHER_AGE_P50_MS] = _p50(self.ages)
            if self.waits:
                v[Stat.TEACHER_WAIT_P50_MS] = _p50(self.waits)
            self.ages, self.waits = [], []
            now = time.monotonic()
            v[Stat.EXAMPLES_PER_S] = (v[Stat.EXAMPLES_IN] - self.last_in) / max(now - self.last_t, 1e-6)
            self.last_t, self.last_in = now, v[Stat.EXAMPLES_IN]
            return v

    def maybe_publish(self, producer, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_t < 1.0:
            return
        st = schema.ServiceStats(component=Component.DISTILL, ts=int(time.time() * 1000), values=self.values(),
                                 instance=self.instance)
        key = b"distill"
        kafka_io.produce(producer, self.cfg.topics.service_stats, schema.encode(st), key=key,
                         partition=kafka_io.partition_for(key, self.cfg.topics.partitions))


class _DistillWriter(StatefulSinkPartition[DistillOut, None]):
    def __init__(self, cfg: Config, key: str, sink: DistillSink):
        self.cfg, self.key, self.sink = cfg, key, sink
        self.producer = sink.acquire()
        self.last_flush = time.monotonic()

    def write_batch(self, values: list[DistillOut]) -> None:
        t, n, produce = self.cfg.topics, self.cfg.topics.partitions, self.producer.produce
        for batch in values:
            for kind, key, p, value in batch.records:
                topic = t.examples_distilled if kind == distill.EXAMPLE else t.dead_letters
                try:
                    produce(topic, value, key, p % n)  # the example's partition number: user-id partitioning kept
                except BufferError:
                    kafka_io.produce(self.producer, topic, value, key=key, partition=p % n)
            self.sink.stats.update(self.key, batch)
        self.producer.poll(0)
        with self.sink.lock:
            self.sink.stats.maybe_publish(self.producer)
        if time.monotonic() - self.last_flush > 1.0:
            self.producer.flush(30)
            self.last_flush = time.monotonic()

    def snapshot(self) -> None:
        # everything before this epoch's source offsets is delivered before they are saved: at-least-once
        kafka_io.flush_all(self.producer, f"distill sink {self.key}", log)

    def close(self) -> None:
        with self.sink.lock:
            self.sink.stats.maybe_publish(self.producer, force=True)
        kafka_io.flush_all(self.producer, f"distill sink {self.key}", log)
        self.producer = None
        self.sink.release()


class DistillSink(_PerPartitionSink):
    """examples_distilled (each example to its input partition number, key user id), dead letters, and the
    flow's ServiceStats."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.stats = _DistillStats(cfg)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DistillWriter:
        return _DistillWriter(self.cfg, for_part, self)
