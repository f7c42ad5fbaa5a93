"""What the trainer reports about itself: throughput, latencies and lag per interval, and its ServiceStats.

Latencies of the examples trained in the last interval: ``event_to_trained`` (trained wall ms - impression
ts, holds the label wait), ``emitted_to_trained`` (trained - the labels dataflow's emission time: the trainer's
own delay); ``lag_ms``: now - emission time of the newest trained example (how far the model is behind).
"""

from __future__ import annotations

import time

import numpy as np

from streams import schema
from streams.names import Component, Stat


class Throughput:
    """Throughput, latencies and lag over the last stats interval (see the module docstring)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.examples = 0
        self.lat_ms: list[np.ndarray] = []
        self.emit_lat_ms: list[np.ndarray] = []
        self.newest_emitted_ts = 0

    def add(self, event_ts: np.ndarray, now_ms: int, emitted_ts: np.ndarray | None = None) -> None:
        self.examples += len(event_ts)
        self.lat_ms.append(now_ms - event_ts)
        if emitted_ts is not None and len(emitted_ts):
            ok = emitted_ts > 0
            self.emit_lat_ms.append(now_ms - emitted_ts[ok])
            if ok.any():
                self.newest_emitted_ts = max(self.newest_emitted_ts, int(emitted_ts[ok].max()))

    def take(self, now_ms: int | None = None) -> dict[str, float]:
        now = time.monotonic()
        out = {"examples_per_s": self.examples / max(now - self.t0, 1e-9)}
        for name, parts in (("event_to_trained", self.lat_ms), ("emitted_to_trained", self.emit_lat_ms)):
            lat = np.concatenate(parts) if parts else np.zeros(0)
            if lat.size:
                out[f"{name}_p50_ms"] = float(np.percentile(lat, 50))
                out[f"{name}_p99_ms"] = float(np.percentile(lat, 99))
        if self.newest_emitted_ts:
            out["lag_ms"] = float((now_ms or int(time.time() * 1000)) - self.newest_emitted_ts)
        self.t0, self.examples, self.lat_ms, self.emit_lat_ms = now, 0, [], []
        return out


def service_stats(trainer, throughput: Throughput) -> schema.ServiceStats:
    """The trainer's report now: its counters, this interval's throughput and latencies, the delay distribution
    the ES-DFM weights use, freshness, embedding memory and the user model's figures."""
    now = int(time.time() * 1000)
    learner = trainer.learner
    values = {k: float(trainer.counters[k])
              for k in (Stat.EXAMPLES_TRAINED, Stat.STEPS, Stat.DUPLICATES, Stat.DEAD_LETTERS, Stat.EXAMPLES_OTHER_ARM)}
    values.update({k: float(trainer.counters[k]) for k in (Stat.TEACHERS_PUBLISHED, Stat.EXAMPLES_OTHER_DOMAIN)
                   if k in trainer.counters})  # an FM's / a VM's (trainer/loop.py, roles)
    values.update(throughput.take(now))
    values[Stat.MODEL_VERSION] = float(learner.steps)
    for name, h in learner.delays.items():
        if h.total:
            values[f"{name}_delay_p50_ms"] = h.quantile(0.5)
            values[f"{name}_delayed_share"] = h.survival(learner.elapsed_ms)
    if trainer.newest_event_ts:
        values[Stat.FRESHNESS_MS] = float(now - trainer.newest_event_ts)
    report = getattr(learner.model.emb, "memory_report", None)  # FIITED: bytes per pool, dims
    if report is not None:
        values.update(report())
    if trainer.users is not None:
        values.update(trainer.users.stats())
    loopfm = getattr(trainer, "loopfm", None)  # LoopFM: an FM's published ids; a VM's lookups, misses, stale, age
    if loopfm is not None:
        values.update(loopfm.stats())
    early = getattr(trainer, "early", None)  # the early-stage ranker's rows and mean losses since the last report
    if early is not None:
        values.update(early.take_stats())
    creatives = getattr(trainer, "creatives", None)  # semantic IDs: creatives read/applied, ads coded, refreshes
    if creatives is not None:
        values.update(creatives.stats(learner.semantic_ids))
    solaris = getattr(trainer, "solaris", None)  # SOLARIS: a VM's pair cache (hit rate, age of hits, dead letters)
    if solaris is not None:
        values.update(solaris.stats())
    precision = getattr(learner, "precision", None)  # LoKA: per layer the kernel, probed errors, tensor stats
    if precision is not None:
        values.update(precision.stats())
    publisher = getattr(trainer, "publisher", None)  # published_seq, publish_bytes, publish_s, delta_fraction
    if publisher is not None:
        values.update(publisher.stats())
    # the instance is the trainer's arm: arms side by side report apart (the store keys rows by instance), and
    # a restarted trainer continues its arm's series
    return schema.ServiceStats(component=Component.TRAINER, ts=now, values=values, instance=trainer.tc.arm)
