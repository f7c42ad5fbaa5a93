"""The metrics sink: Kafka topics -> ClickHouse tables, columnar and idempotent.

It reads ``predictions`` (:class:`~streams.schema.PredictionBatch`), ``service_stats``, ``dead_letters`` and
``feature_stats`` (:class:`~streams.schema.FeatureStats`, rows by :mod:`dashboards.feature_stats`; the topic is
created here when missing), each decoded with the schema, with ``assign()`` at the offsets it recorded in
``sink_offsets`` (or from the beginning), inserts each poll's
rows with one ``insert_arrow`` per table, and only then records the next offsets. A crash between the two
re-inserts rows that the ReplacingMergeTree tables collapse, so the at-least-once window is harmless.
Messages it cannot decode are counted, logged and stored as dead letters (step ``metrics_sink``); they never
stop it. It publishes nothing. After inserting predictions it recomputes the ``prediction_rollup`` slots they touched
(at most every ``rollup_every_s``; :meth:`MetricsSink.flush_rollup` forces it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa

from dashboards.feature_stats import feature_stats_rows, feature_stats_topic
from dashboards.store import Store, StoreUnavailable
from streams import schema
from streams.bus import kafka_io
from config import Config, TrainerConfig
from streams.names import Step

log = logging.getLogger(__name__)

GROUP_ID = "streamrec-metrics-sink"  # never committed to: offsets live in the store
STEP = Step.METRICS_SINK
RAW_PREFIX = 256  # bytes of a dead letter's payload kept for the table
DEFAULT_ARM = TrainerConfig().arm  # the arm of predictions from a trainer that did not name one (before arms)


def _ts(ms) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))


def batch_problem(ev: object) -> str | None:
    """Why a decoded message cannot become rows (a PredictionBatch's columns must have equal lengths)."""
    if not isinstance(ev, schema.PredictionBatch):
        return None
    n = len(ev.example_ids)
    lens = {len(ev.domains), len(ev.event_ts), len(ev.emitted_ts), len(ev.p_click), len(ev.p_conversion),
            len(ev.click), len(ev.conversion)}
    if lens - {n}:
        return f"invalid: PredictionBatch columns have lengths {sorted(lens)}, expected {n} (example_ids)"
    served = {len(ev.served_arms), len(ev.served_versions)} - {0}
    if served - {n}:
        return (f"invalid: PredictionBatch served_arms / served_versions have lengths {len(ev.served_arms)} / "
                f"{len(ev.served_versions)}, expected {n} (example_ids) or none")
    if len(ev.cohorts) not in (0, n):
        return f"invalid: PredictionBatch cohorts has length {len(ev.cohorts)}, expected {n} (example_ids) or none"
    return None


def prediction_rows(batches: list[schema.PredictionBatch], inserted_ms: int) -> pa.Table:
    """Two rows per example (objective click and conversion), shape ``(2 * sum(len(batch)),)`` per column, each
    with the scoring model's arm (:data:`DEFAULT_ARM` when the batch names none) and the arm and version that
    served the example ('' / 0 when logged), and the example's cohort ('' when the batch names none)."""
    cols: dict[str, list] = defaultdict(list)
    for b in batches:
        problem = batch_problem(b)
        if problem:
            raise ValueError(f"prediction_rows: batch model_version={b.model_version}: {problem}")
        n = len(b.example_ids)
        served_arms = b.served_arms or [""] * n
        served_versions = b.served_versions or [0] * n
        cohorts = b.cohorts or [""] * n
        for objective, scores, labels in (("click", b.p_click, b.click), ("conversion", b.p_conversion, b.conversion)):
            cols["arm"] += [b.arm or DEFAULT_ARM] * n
            cols["served_arm"] += served_arms
            cols["served_version"] += served_versions
            cols["cohort"] += cohorts
            cols["example_id"] += b.example_ids
            cols["objective"] += [objective] * n
            cols["domain"] += b.domains
            cols["model_version"] += [b.model_version] * n
            cols["score"] += scores
            cols["label"] += labels
            cols["event_ts"] += b.event_ts
            cols["emitted_ts"] += b.emitted_ts
            cols["trained_ts"] += [b.trained_ts] * n
    total = len(cols["example_id"])
    return pa.table({
        "arm": pa.array(cols["arm"], pa.string()),
        "served_arm": pa.array(cols["served_arm"], pa.string()),
        "served_version": pa.array(np.asarray(cols["served_version"], dtype=np.uint64)),
        "cohort": pa.array(cols["cohort"], pa.string()),
        "example_id": pa.array(cols["example_id"], pa.string()),
        "objective": pa.array(cols["objective"], pa.string()),
        "domain": pa.array(cols["domain"], pa.string()),
        "model_version": pa.array(np.asarray(cols["model_version"], dtype=np.uint64)),
        "score": pa.array(np.asarray(cols["score"], dtype=np.float32)),
        "label": pa.array(np.clip(np.asarray(cols["label"], dtype=np.int64), 0, 1).astype(np.uint8)),
        "event_ts": _ts(cols["event_ts"]),
        "emitted_ts": _ts(cols["emitted_ts"]),
        "trained_ts": _ts(cols["trained_ts"]),
        "inserted_ts": _ts(np.full(total, inserted_ms)),
    })


def stats_rows(stats: list[schema.ServiceStats]) -> pa.Table:
    """One row per (component, instance, ts, name)."""
    rows = [(s.component, s.instance, s.ts, k, float(v)) for s in stats for k, v in s.values.items()]
    comp, inst, ts, name, value = zip(*rows) if rows else ((),) * 5
    return pa.table({"component": pa.array(comp, pa.string()), "instance": pa.array(inst, pa.string()),
                     "ts": _ts(list(ts)), "name": pa.array(name, pa.string()),
                     "value": pa.array(value, pa.float64())})


def dead_letter_rows(letters: list[schema.DeadLetter]) -> pa.Table:
    return pa.table({
        "ts": _ts([d.ts for d in letters]),
        "topic": pa.array([d.topic for d in letters], pa.string()),
        "partition": pa.array([d.partition for d in letters], pa.int32()),
        "offset": pa.array([d.offset for d in letters], pa.int64()),
        "step": pa.array([d.step for d in letters], pa.string()),
        "reason": pa.array([d.reason for d in letters], pa.string()),
        "raw_prefix": pa.array([d.raw[:RAW_PREFIX].decode("utf-8", "replace") for d in letters], pa.string()),
    })


class MetricsSink:
    """Consumes the metric topics into ``client`` (a :class:`~dashboards.store.Store`).

    ``poll_once()`` handles one batch of messages and returns the rows inserted; ``run(stop_event)`` loops
    until the event is set. ``counters`` holds messages, rows per table, bad messages and store errors.
    """

    def __init__(self, cfg: Config, client: Store, *, batch_messages: int = 2000, poll_timeout_s: float = 0.5,
                 rollup_every_s: float = 1.0):
        self.cfg, self.store = cfg, client
        self.batch_messages, self.poll_timeout_s, self.rollup_every_s = batch_messages, poll_timeout_s, rollup_every_s
        t = cfg.topics
        self.feature_topic = feature_stats_topic(cfg)
        self.kinds = {t.predictions: schema.PredictionBatch, t.service_stats: schema.ServiceStats,
                      t.dead_letters: schema.DeadLetter, self.feature_topic: schema.FeatureStats}
        self.counters: dict[str, int] = defaultdict(int)
        self.consumer = None
        self._rewind = False  # a batch failed: start again from the recorded offsets before consuming more
        self._dirty: tuple[int, int] | None = None  # training-time range (ms) whose rollup slots are stale
        self._last_rollup = 0.0
        # the bus as this sink sees it: the page says so when the broker is away instead of showing stale data
        self.last_message_at = 0.0  # monotonic time of the last message consumed
        self.bus_error, self.bus_error_at = "", 0.0

    # ---- consumer ------------------------------------------------------------------------------------
    def _partitions(self, topic: str) -> int:
        md = self.consumer.list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        n = len(meta.partitions) if meta is not None and meta.error is None else 0
        if not n and topic == self.feature_topic:  # the stats flow may start after the sink: create it here
            try:
                kafka_io.ensure_topics(self.cfg.kafka.bootstrap_servers, [topic], self.cfg.topics.partitions,
                                       self.cfg.kafka.client)
            except Exception as e:  # noqa: BLE001 - no rights to create: read it once it exists
                log.warning("metrics sink: cannot create topic %s (%s); assigning its default partitions", topic, e)
        return n or self.cfg.topics.partitions

    def _assign(self) -> None:
        """(Re)assign every partition at the offsets recorded in the store (or the beginning)."""
        if self.consumer is None:
            self.consumer = kafka_io.make_consumer(self.cfg.kafka.bootstrap_servers, GROUP_ID, self.cfg.kafka.client,
                                                   on_error=self._bus_error)
        # Offsets are recorded per cluster: a reused store must not skip the start of a new broker's topics.
        self._scope = kafka_io.cluster_id(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.client) + "/"
        offsets = {(t[len(self._scope):], p): o for (t, p), o in self.store.sink_offsets().items()
                   if t.startswith(self._scope)}
        tps = [tp for topic in self.kinds for tp in kafka_io.topic_partitions([topic], self._partitions(topic), offsets)]
        self.consumer.assign(tps)
        log.info("metrics sink: assigned %d partitions (%d with recorded offsets)", len(tps),
                 sum(1 for tp in tps if (tp.topic, tp.partition) in offsets))

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None

    def _bus_error(self, err) -> None:
        self.bus_error, self.bus_error_at = f"{err.name()}: {err.str()}", time.monotonic()

    def bus_status(self, quiet_s: float = 10.0) -> dict:
        """``ok`` unless the consumer reported a transport error in the last ``quiet_s`` seconds with no message
        since; ``last_message_age_s``: how old the newest data on the page can be."""
        now = time.monotonic()
        down = self.bus_error_at > self.last_message_at and now - self.bus_error_at < quiet_s
        return {"ok": not down, "error": self.bus_error if down else "",
                "last_message_age_s": round(now - self.last_message_at, 1) if self.last_message_at else None}

    # ---- one batch -----------------------------------------------------------------------------------
    def _decode(self, msgs: Iterable) -> tuple[dict[str, list], dict[tuple[str, int], int]]:
        good: dict[str, list] = defaultdict(list)
        bad: list[schema.DeadLetter] = []
        offsets: dict[tuple[str, int], int] = {}
        now_ms = int(time.time() * 1000)
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != kafka_io.KafkaError._PARTITION_EOF:
                    self._bus_error(m.error())
                kafka_io.consumer_error(m.error(), "metrics sink consumer", log)
                continue
            self.last_message_at = time.monotonic()
            topic, raw = m.topic(), m.value() or b""
            offsets[(topic, m.partition())] = m.offset() + 1
            ev = schema.decode(raw, self.kinds[topic])
            reason = ev.reason if isinstance(ev, schema.Invalid) else batch_problem(ev)
            if reason:
                self.counters["bad_messages"] += 1
                if self.counters["bad_messages"] <= 10 or self.counters["bad_messages"] % 1000 == 0:
                    log.warning("metrics sink: bad message %s[%d]@%d (%d so far): %s", topic, m.partition(),
                                m.offset(), self.counters["bad_messages"], reason)
                bad.append(schema.dead_letter(reason, raw, topic=topic, partition=m.partition(),
                                              offset=m.offset(), ts=now_ms, step=STEP))
                continue
            good[topic].append(ev)
        good[self.cfg.topics.dead_letters] += bad
        return good, offsets

    def _insert(self, good: dict[str, list]) -> int:
        t = self.cfg.topics
        now_ms = int(time.time() * 1000)
        batches = good.get(t.predictions, [])
        rows = self._count("predictions", self.store.insert("predictions", prediction_rows(batches, now_ms)))
        if batches:
            lo, hi = min(b.trained_ts for b in batches), max(b.trained_ts for b in batches)
            self._dirty = (min(lo, self._dirty[0]), max(hi, self._dirty[1])) if self._dirty else (lo, hi)
        rows += self._count("feature_stats", self.store.insert(
            "feature_stats", feature_stats_rows(good.get(self.feature_topic, []), now_ms)))
        rows += self._count("service_stats", self.store.insert(
            "service_stats", stats_rows(good.get(t.service_stats, []))))
        letters = good.get(t.dead_letters, [])
        if letters:
            rows += self._count("dead_letters", self.store.insert("dead_letters", dead_letter_rows(letters)))
        return rows

    def _count(self, table: str, n: int) -> int:
        self.counters[f"rows_{table}"] += n
        return n

    def poll_once(self) -> int:
        """Consume up to ``batch_messages`` messages, insert their rows, record offsets; returns rows inserted."""
        if self.consumer is None or self._rewind:
            self._assign()
            self._rewind = False
        msgs = self.consumer.consume(num_messages=self.batch_messages, timeout=self.poll_timeout_s)
        if not msgs:
            self.flush_rollup()
            return 0
        good, offsets = self._decode(msgs)
        rows = self._insert(good)
        # after the rows: a crash in between only re-inserts (idempotent)
        self.store.record_offsets({(self._scope + t, p): o for (t, p), o in offsets.items()})
        self.counters["messages"] += len(msgs)  # handled: stored and recorded
        if time.monotonic() - self._last_rollup >= self.rollup_every_s:
            self.flush_rollup()
        return rows

    def flush_rollup(self) -> None:
        """Recompute the rollup slots touched since the last flush (a recompute is idempotent)."""
        self._last_rollup = time.monotonic()
        if self._dirty is not None:
            self.store.refresh_rollup(*self._dirty)
            self._dirty = None
            self.counters["rollup_refreshes"] += 1

    def run(self, stop_event: threading.Event) -> None:
        """Poll until ``stop_event`` is set. A store or broker error waits (0.5 s, doubling to 30 s), rewinds to the
        recorded offsets and retries: until a rewind has succeeded nothing new is consumed, so a store that stays
        away through several tries loses nothing."""
        backoff = 0.5
        try:
            while not stop_event.is_set():
                try:
                    self.poll_once()
                    backoff = 0.5
                except Exception as e:  # noqa: BLE001 - the sink must outlive a store hiccup
                    self.counters["store_errors"] += 1
                    self._rewind = True
                    if isinstance(e, StoreUnavailable):  # no traceback: it says what is wrong (and the page too)
                        log.warning("metrics sink: %s; retrying from the recorded offsets in %.1fs", e, backoff)
                    else:
                        log.exception("metrics sink: batch failed; rewinding to recorded offsets in %.1fs", backoff)
                    stop_event.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self.close()
