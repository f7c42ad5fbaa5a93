"""What the ranking service writes to the bus: every served ad as an impression, and its ServiceStats.

:class:`Emitter`: requests hand their served impressions over in memory (never blocking on the broker);
one thread produces them to ``cfg.topics.impressions``, keyed and partitioned by user exactly as every other
producer of that topic (:func:`streams.bus.partition.partition_for` of :func:`streams.schema.user_key`), so the
labels dataflow joins them with the clicks the user makes on them. While the broker is away the producer
produces again what it failed to deliver (:class:`streams.bus.kafka_io.Producer`) and the hand-over queue
absorbs the rest (``impressions_pending``); past :data:`MAX_PENDING` the oldest are dropped and counted
(``impressions_dropped``): requests are never failed for the sake of logging.

Acknowledged impressions (``serving.ack_impressions``, the default): the batcher hands a batch's impressions
over with a callback that answers its requests; the emitter thread produces them, flushes, and calls it once
the broker has acknowledged them, so an answered request's impressions survive a SIGKILL of the service.
The callbacks taken in one round are those whose impressions were queued before that round's produce, so a
flush that returns with nothing left covers all of them. If the broker does not acknowledge within
``serving.ack_timeout_ms`` the requests are answered anyway (``impressions_unacked``) and, until a flush
empties the queue again, later ones are answered at once: a broker outage costs one wait, not one per request.

:class:`ServingStats`: counters and this interval's samples; :meth:`ServingStats.take` makes the values of
the ``ServiceStats(component="serving")`` published every second.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import numpy as np

from streams import schema
from streams.names import Component, Stat

log = logging.getLogger(__name__)

MAX_PENDING = 1_000_000  # impressions held in memory while the broker is away
STATS_EVERY_S = 1.0


class ServingStats:
    """Counters (monotonic) and per-interval samples; thread-safe (handlers, the batcher, the stats thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.batches = 0
        self.batched_requests = 0
        self.lat_ms: list[float] = []
        self.sizes: list[int] = []
        self.shadow_sum: dict[str, float] = {}
        self.shadow_n: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.interval_requests = 0

    def request(self, status: int, took_ms: float) -> None:
        with self.lock:
            self.requests += 1
            self.interval_requests += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 200:
                self.lat_ms.append(took_ms)

    def batch(self, n: int) -> None:
        with self.lock:
            self.batches += 1
            self.batched_requests += n
            self.sizes.append(n)

    def shadow(self, arm: str, agreement: float) -> None:
        with self.lock:
            self.shadow_sum[arm] = self.shadow_sum.get(arm, 0.0) + agreement
            self.shadow_n[arm] = self.shadow_n.get(arm, 0) + 1

    def take(self) -> dict[str, float]:
        """The values of one report: counters, and this interval's QPS, latency percentiles and batch sizes."""
        with self.lock:
            now = time.monotonic()
            lat, sizes = np.asarray(self.lat_ms), np.asarray(self.sizes)
            out = {Stat.REQUESTS: float(self.requests),
                   Stat.ERRORS: float(sum(n for s, n in self.by_status.items() if s >= 400)),
                   Stat.QPS: self.interval_requests / max(now - self.t0, 1e-9),
                   Stat.BATCHES: float(self.batches)}
            for s, n in self.by_status.items():
                if s >= 400:
                    out[f"{Stat.ERRORS_PREFIX}{s}"] = float(n)
            if lat.size:
                out[Stat.LATENCY_P50_MS] = float(np.percentile(lat, 50))
                out[Stat.LATENCY_P99_MS] = float(np.percentile(lat, 99))
            if sizes.size:
                out[Stat.BATCH_SIZE_MEAN] = float(sizes.mean())
                out[Stat.BATCH_SIZE_MAX] = float(sizes.max())
            for arm, total in self.shadow_sum.items():
                out[f"{Stat.SHADOW_AGREEMENT_PREFIX}{arm}"] = total / max(self.shadow_n[arm], 1)
            self.t0, self.interval_requests, self.lat_ms, self.sizes = now, 0, [], []
            self.shadow_sum, self.shadow_n = {}, {}
        return out


class Emitter:
    """The thread producing served impressions and, every second, the service's ServiceStats."""

    def __init__(self, cfg, stats_values, *, emit_impressions: bool = True, producer=None):
        self.cfg = cfg
        self.stats_values = stats_values  # () -> dict of the service's values
        self.emit_impressions = emit_impressions
        self.producer = producer
        self.pending: deque[schema.Impression] = deque()
        self.emitted = 0
        self.dropped = 0
        self.ack_timeout_s = cfg.serving.ack_timeout_ms / 1000.0
        self.waiters: list = []  # callbacks to call once what was queued before them is acknowledged
        self._waiters_lock = threading.Lock()
        self.degraded = False  # the last acknowledgement timed out: answer at once until a flush empties
        self.acked = 0  # impressions acknowledged before their requests were answered
        self.unacked = 0  # impressions of requests answered without the broker's acknowledgement
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.instance = f"pid{os.getpid()}"
        self.flush_s = 10.0  # how long stop() waits for the broker to take what is pending

    def put(self, imps: list[schema.Impression], on_delivered=None) -> None:
        """Queue ``imps``; ``on_delivered()`` (optional) is called from the emitter thread once the broker has
        acknowledged them (or the wait timed out, see the module docstring)."""
        if not self.emit_impressions or not imps:
            if on_delivered is not None:
                on_delivered()
            return
        self.pending.extend(imps)
        if on_delivered is not None:
            with self._waiters_lock:
                self.waiters.append((len(imps), on_delivered))
        over = len(self.pending) - MAX_PENDING
        for _ in range(max(over, 0)):
            try:
                self.pending.popleft()
                self.dropped += 1
            except IndexError:
                break
        self._wake.set()

    def pending_count(self) -> int:
        n = len(self.pending)
        p = self.producer
        if p is not None:
            n += len(p) + len(getattr(p, "redo", ()))
        return n

    def start(self) -> None:
        if self.producer is None:
            from streams.bus import kafka_io

            self.producer = kafka_io.make_producer(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.client)
        self._thread = threading.Thread(target=self._run, name="serving-emitter", daemon=True)
        self._thread.start()

    def _drain_once(self) -> None:
        from streams.bus.kafka_io import produce
        from streams.bus.partition import partition_for

        topic, parts, p = self.cfg.topics.impressions, self.cfg.topics.partitions, self.producer
        while self.pending:
            try:
                imp = self.pending.popleft()
            except IndexError:
                break
            key = schema.user_key(imp)
            produce(p, topic, schema.encode(imp), key, partition_for(key, parts))
            self.emitted += 1
        p.poll(0)

    def publish_stats(self) -> None:
        values = self.stats_values()
        values[Stat.IMPRESSIONS_EMITTED] = float(self.emitted)
        values[Stat.IMPRESSIONS_PENDING] = float(self.pending_count())
        values[Stat.IMPRESSIONS_DROPPED] = float(self.dropped)
        values[Stat.IMPRESSIONS_UNACKED] = float(self.unacked)
        st = schema.ServiceStats(component=Component.SERVING, ts=int(time.time() * 1000), values=values,
                                 instance=self.instance)
        self.producer.produce(self.cfg.topics.service_stats, value=schema.encode(st))

    def _acknowledge(self, waiters: list) -> None:
        """Wait (at most ack_timeout_s) until the broker acknowledged everything produced, then answer."""
        if not waiters:
            return
        n = sum(k for k, _ in waiters)
        left = 1
        if not self.degraded:
            deadline = time.monotonic() + self.ack_timeout_s
            while left and time.monotonic() < deadline:
                left = self.producer.flush(min(0.05, max(0.0, deadline - time.monotonic())))
                left += len(getattr(self.producer, "redo", ()))
            self.degraded = left > 0
        if left:
            self.unacked += n
        else:
            self.acked += n
        for _, answer in waiters:
            try:
                answer()
            except Exception:  # noqa: BLE001 - one callback's failure must not keep the others' requests waiting
                log.exception("serving: answering acknowledged requests failed")

    def _run(self) -> None:
        next_stats = time.monotonic() + STATS_EVERY_S
        while True:
            stopping = self._stop.is_set()
            with self._waiters_lock:  # their impressions are all in `pending` already: this round produces them
                waiters, self.waiters = self.waiters, []
            try:
                self._drain_once()
                if self.degraded and self.producer.flush(0) == 0 and not getattr(self.producer, "redo", ()):
                    self.degraded = False  # the broker takes messages again
                self._acknowledge(waiters)
                waiters = []
                if time.monotonic() >= next_stats or stopping:
                    next_stats = time.monotonic() + STATS_EVERY_S
                    self.publish_stats()
            except BufferError:  # the producer's queue is full (broker away): keep the rest pending
                self.producer.poll(0.1)
            except Exception:  # noqa: BLE001 - logging problems never stop serving
                log.exception("serving: producing impressions or stats failed")
            if waiters:  # not produced this round (queue full, an error): answer them rather than hold them
                self.degraded = True
                self._acknowledge(waiters)
            if stopping:
                return
            self._wake.wait(0.05)
            self._wake.clear()

    def stop(self) -> None:
        """Produce what is pending and wait up to ``flush_s`` for delivery."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._waiters_lock:  # handed over after the thread's last round: answer them too
            waiters, self.waiters = self.waiters, []
        for _, answer in waiters:
            answer()
        if self.producer is not None:
            left = self.producer.flush(self.flush_s)
            if left or self.pending:
                log.warning("serving: %d impressions not delivered at shutdown (broker away?)",
                            left + len(self.pending))
