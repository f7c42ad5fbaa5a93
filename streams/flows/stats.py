"""The ``stats`` Bytewax dataflow: labelled examples -> per-window, per-domain feature and label statistics.

Shape (same batch-per-partition design as ``streams/flows/labels.py``)::

    examples topic, one source partition per Kafka partition p: StatsBatch(p, raw Example bytes, final)
      -> stateful_batch "stats.window": decode the batch in one call, numpy columns, update the open
         windows' aggregates (WindowAgg per (window start, domain)), close windows the partition's event
         time passed (+ lateness) -> encoded schema.FeatureStats
      -> sink: topic ``feature_stats`` (``topics.feature_stats`` when the config has it), key = stats_id

Per window and domain: ``count`` (examples), ``label.click`` / ``label.conversion`` (count of positives,
value = rate), ``late_positive`` (ES-DFM corrections, counted in the window of their label's time),
``dense.<i>`` (fixed-bucket histogram + mean + p50/p90/p99), ``delay.click`` / ``delay.conversion``
(label-delay histograms in seconds), ``hh.<field>`` (Misra-Gries heavy hitters of sparse ids).

Ids are deterministic ``window:domain:feature:p<partition>`` (partials per input partition, summed at query
time), so replaying after a crash rewrites identical rows: the ClickHouse sink stays idempotent.

>>> agg = WindowAgg()
>>> cols = columns([schema.Example(example_id="e", impression=schema.Impression(event_id="e", ts=0, user_id=1,
...     ad_id=5, campaign_id=1, advertiser_id=1, domain="feed", dense=[0.5]), click=1, conversion=0, click_ts=30_000)])
>>> agg.update(cols, np.arange(1))
>>> [(s.feature, s.count) for s in agg.records(0, 60_000, "feed", 0, now_ms=0)][:3]
[('count', 1), ('label.click', 1), ('label.conversion', 0)]
"""

from __future__ import annotations

import copy
import logging
import time
from typing import NamedTuple

import bytewax.operators as op
import msgspec
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from streams import schema
from config import Config
from streams.flows.routing import part_key

log = logging.getLogger(__name__)
WINDOW_MS = 60_000  # event-time window (stats.window_s when a config section exists)
LATENESS_MS = 0  # examples arrive in impression-time order per partition (window policy): no extra wait
DENSE_EDGES = np.linspace(-5.0, 5.0, 41)  # 42 buckets: below -5, 40 inner, at/above 5
DELAY_EDGES_S = np.array([1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600,
                          3 * 86400, 7 * 86400, 30 * 86400], dtype=float)
HH_K = 32  # Misra-Gries counters per sparse field
SPARSE = ("ad_id", "campaign_id", "advertiser_id", "user_id")
TOPIC = "feature_stats"
_decode_batch = msgspec.json.Decoder(list[schema.Example]).decode
_decode_one = msgspec.json.Decoder(schema.Example).decode


class Columns(NamedTuple):
    """Numpy columns of N examples. ``dense``: (N, D) with NaN where an example has fewer values."""

    ts: np.ndarray  # (N,) int64 window-assignment time (impression ts; label ts for late positives)
    domain: np.ndarray  # (N,) int64 index into schema.DOMAINS
    click: np.ndarray  # (N,) int8
    conversion: np.ndarray  # (N,) int8
    late: np.ndarray  # (N,) bool: a late_positive correction
    click_delay_s: np.ndarray  # (N,) float, NaN without a click
    conv_delay_s: np.ndarray  # (N,) float
    dense: np.ndarray  # (N, D) float
    sparse: np.ndarray  # (N, len(SPARSE)) int64


def columns(examples: list[schema.Example]) -> Columns:
    """One pass over decoded examples into numpy columns (the only per-example Python loop)."""
    n = len(examples)
    imps = [e.impression for e in examples]
    ts = np.fromiter((e.impression.ts if e.decided != "late_positive" else
                      max(e.click_ts or 0, e.conversion_ts or 0) for e in examples), np.int64, n)
    its = np.fromiter((i.ts for i in imps), np.int64, n)
    cts = np.array([np.nan if e.click_ts is None else e.click_ts for e in examples], dtype=float)
    vts = np.array([np.nan if e.conversion_ts is None else e.conversion_ts for e in examples], dtype=float)
    d = max((len(i.dense) for i in imps), default=0)
    dense = np.full((n, d), np.nan)
    for r, i in enumerate(imps):
        if i.dense:
            dense[r, :len(i.dense)] = i.dense
    return Columns(ts=ts, domain=np.fromiter((schema.DOMAIN_INDEX.get(i.domain, 0) for i in imps), np.int64, n),
                   click=np.fromiter((e.click for e in examples), np.int8, n),
                   conversion=np.fromiter((e.conversion for e in examples), np.int8, n),
                   late=np.fromiter((e.decided == "late_positive" for e in examples), bool, n),
                   click_delay_s=(cts - its) / 1000.0, conv_delay_s=(vts - its) / 1000.0, dense=dense,
                   sparse=np.array([[getattr(i, f) for f in SPARSE] for i in imps], dtype=np.int64).reshape(n, -1))


def misra_gries(items: np.ndarray, counts: np.ndarray, new: np.ndarray, k: int = HH_K) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``new`` ids into a Misra-Gries summary (``items``, ``counts``) of at most ``k`` counters.

    Mergeable (Agarwal et al. 2012): add the batch's exact counts, then subtract the (k+1)-th largest count
    and drop counters <= 0. Each kept count underestimates the truth by at most N / (k + 1).

    >>> i, c = misra_gries(np.array([], np.int64), np.array([], np.int64), np.array([1, 1, 1, 2, 3]), k=1)
    >>> i.tolist(), c.tolist()
    ([1], [2])
    """
    ids = np.concatenate([items, new])
    w = np.concatenate([counts, np.ones(len(new), np.int64)])
    u, inv = np.unique(ids, return_inverse=True)
    c = np.bincount(inv, weights=w).astype(np.int64)
    if len(u) > k:
        thr = np.partition(c, len(c) - k - 1)[len(c) - k - 1]
        c = c - thr
        keep = c > 0
        u, c = u[keep], c[keep]
    return u, c


def _quantiles(counts: np.ndarray, edges: np.ndarray, qs=(0.5, 0.9, 0.99)) -> list[float]:
    """Quantiles from bucket counts: the upper edge of the bucket holding each rank (clamped to the edges)."""
    total = counts.sum()
    if total == 0:
        return []
    cum = np.cumsum(counts)
    idx = np.searchsorted(cum, np.asarray(qs) * total, side="left")
    return [float(edges[min(i, len(edges) - 1)]) for i in idx]


def _bins(edges: list[float]) -> list[str]:
    """Bucket labels: each bucket's lower edge (``-inf`` for the first), len(edges) + 1 of them."""
    return ["-inf", *(f"{e:g}" for e in edges)]


class WindowAgg:
    """Aggregates of one (window, domain, partition): counts, histograms, heavy hitters. Arrays only."""

    def __init__(self) -> None:
        self.n = 0
        self.labels = np.zeros(3, np.int64)  # clicks, conversions, late positives
        self.dense_hist: np.ndarray | None = None  # (D, len(DENSE_EDGES) + 1)
        self.dense_sum: np.ndarray | None = None  # (D,)
        self.dense_n: np.ndarray | None = None
        self.delay_hist = np.zeros((2, len(DELAY_EDGES_S) + 1), np.int64)
        self.hh = [(np.array([], np.int64), np.array([], np.int64)) for _ in SPARSE]

    def update(self, c: Columns, rows: np.ndarray) -> None:
        """Add the examples ``rows`` of ``c`` (corrections count only as late positives)."""
        late = c.late[rows]
        self.labels[2] += int(late.sum())
        rows = rows[~late]
        if not len(rows):
            return
        self.n += len(rows)
        self.labels[0] += int(c.click[rows].sum())
        self.labels[1] += int(c.conversion[rows].sum())
        dense = c.dense[rows]
        d = dense.shape[1]
        if self.dense_hist is None or self.dense_hist.shape[0] < d:
            old = self.dense_hist
            self.dense_hist = np.zeros((d, len(DENSE_EDGES) + 1), np.int64)
            self.dense_sum, self.dense_n = np.zeros(d), np.zeros(d, np.int64)
            if old is not None:  # widen, keeping what was counted
                self.dense_hist[:old.shape[0]] = old
        for j in range(d):
            col = dense[:, j]
            col = col[~np.isnan(col)]
            self.dense_hist[j] += np.bincount(np.searchsorted(DENSE_EDGES, col, side="right"),
                                              minlength=len(DENSE_EDGES) + 1)
            self.dense_sum[j] += col.sum()
            self.dense_n[j] += len(col)
        for k, delays in enumerate((c.click_delay_s[rows], c.conv_delay_s[rows])):
            delays = delays[~np.isnan(delays)]
            self.delay_hist[k] += np.bincount(np.searchsorted(DELAY_EDGES_S, delays, side="right"),
                                              minlength=len(DELAY_EDGES_S) + 1)
        for k in range(len(SPARSE)):
            self.hh[k] = misra_gries(*self.hh[k], c.sparse[rows, k])

    def records(self, start: int, window_ms: int, domain: str, partition: int, now_ms: int
                ) -> list[schema.FeatureStats]:
        """The window's FeatureStats records, one per feature, with deterministic ids."""
        def rec(feature: str, kind: str, count: int, **kw) -> schema.FeatureStats:
            return schema.FeatureStats(stats_id=f"{start}:{domain}:{feature}:p{partition}", window_start=start,
                                       window_end=start + window_ms, domain=domain, feature=feature, kind=kind,
                                       partition=partition, instance=f"p{partition}", count=int(count),
                                       emitted_ts=now_ms, **kw)

        n = max(self.n, 1)
        out = [rec("count", "count", self.n),
               rec("label.click", "count", self.labels[0], value=float(self.labels[0]) / n),
               rec("label.conversion", "count", self.labels[1], value=float(self.labels[1]) / n),
               rec("late_positive", "count", self.labels[2])]
        edges = DENSE_EDGES.tolist()
        for j in range(0 if self.dense_hist is None else self.dense_hist.shape[0]):
            h, n_j = self.dense_hist[j], int(self.dense_n[j])
            mean = float(self.dense_sum[j]) / n_j if n_j else None
            out.append(rec(f"dense.{j}", "histogram", n_j, value=mean or 0.0, mean=mean, bins=_bins(edges),
                           edges=edges, counts=h.tolist(), quantiles=_quantiles(h, DENSE_EDGES)))
        for k, name in enumerate(("delay.click", "delay.conversion")):
            h = self.delay_hist[k]
            out.append(rec(name, "histogram", h.sum(), bins=_bins(DELAY_EDGES_S.tolist()),
                           edges=DELAY_EDGES_S.tolist(), counts=h.tolist(), quantiles=_quantiles(h, DELAY_EDGES_S)))
        for k, name in enumerate(SPARSE):
            items, counts = self.hh[k]
            order = np.argsort(-counts, kind="stable")
            out.append(rec(f"hh.{name}", "heavy_hitters", counts.sum(), items=items[order].tolist(),
                           item_counts=counts[order].tolist()))
        return out


class StatsState:
    """Open windows of one partition: ``(window start, domain index) -> WindowAgg``; time = max ts seen."""

    def __init__(self, partition: int, window_ms: int = WINDOW_MS, lateness_ms: int = LATENESS_MS):
        self.partition, self.window_ms, self.lateness_ms = partition, window_ms, lateness_ms
        self.open: dict[tuple[int, int], WindowAgg] = {}
        self.time: int | None = None
        self.counts = {"examples_in": 0, "invalid": 0, "too_late": 0, "records_out": 0}

    def step(self, raws: list[bytes], now_ms: int, final: bool = False) -> list[schema.FeatureStats]:
        """Add a batch of raw Example messages; return the records of every window that closed."""
        examples = _decode(raws, self.counts)
        if examples:
            c = columns(examples)
            start = c.ts - c.ts % self.window_ms
            closed_before = None if self.time is None else self.time - self.lateness_ms - self.window_ms
            ok = np.ones(len(start), bool) if closed_before is None else start > closed_before
            self.counts["too_late"] += int((~ok).sum())
            key = start[ok] * len(schema.DOMAINS) + c.domain[ok]
            rows_ok = np.flatnonzero(ok)
            keys, inv = np.unique(key, return_inverse=True)
            for g, k in enumerate(keys.tolist()):
                w = (k // len(schema.DOMAINS), k % len(schema.DOMAINS))
                self.open.setdefault(w, WindowAgg()).update(c, rows_ok[inv == g])
            if not c.late.all():  # corrections carry a label time ahead of the stream: they do not move time
                t = int(c.ts[~c.late].max())
                self.time = t if self.time is None else max(self.time, t)
        out = []
        limit = None if self.time is None else self.time - self.lateness_ms
        for w in sorted(self.open):
            if final or (limit is not None and w[0] + self.window_ms <= limit):
                out += self.open.pop(w).records(w[0], self.window_ms, schema.DOMAINS[w[1]], self.partition, now_ms)
        self.counts["records_out"] += len(out)
        return out


def _decode(raws: list[bytes], counts: dict) -> list[schema.Example]:
    """Decode a batch in one call; on any bad record fall back to one at a time, skipping (counting) bad ones."""
    if not raws:
        return []
    counts["examples_in"] += len(raws)
    try:
        out = _decode_batch(b"[" + b",".join(raws) + b"]")
        if len(out) == len(raws):  # a record holding "},{" would decode as two
            return out
    except schema.DECODE_ERRORS:
        pass
    out = []
    for r in raws:
        try:
            out.append(_decode_one(r))
        except schema.DECODE_ERRORS:
            counts["invalid"] += 1
    return out


# ------------------------------------------------------------------------------------------- Bytewax wiring

class StatsBatch(NamedTuple):
    """One item: raw Example messages of examples-topic partition ``partition``; ``final`` at end of input."""

    partition: int
    values: tuple[bytes, ...]
    final: bool = False


class _WindowLogic(StatefulBatchLogic[StatsBatch, bytes, StatsState]):
    def __init__(self, state: StatsState):
        self.state = state

    def on_batch(self, values: list[StatsBatch]) -> tuple[list[bytes], bool]:
        now, out = int(time.time() * 1000), []
        for b in values:
            self.state.partition = b.partition
            out += self.state.step(list(b.values), now, final=b.final)
        return [schema.encode(r) for r in out], self.RETAIN

    def snapshot(self) -> StatsState:
        return copy.deepcopy(self.state)  # arrays of open windows only (a few windows x domains): small


def stats_topic(cfg: Config) -> str:
    return getattr(cfg.topics, "feature_stats", TOPIC)


def build_stats_flow(source, sink, *, partitions: int, window_ms: int = WINDOW_MS) -> Dataflow:
    """``source`` yields :class:`StatsBatch`; ``sink`` receives encoded ``FeatureStats`` (key = partition key)."""
    flow = Dataflow("stats")
    keys = [part_key(p, partitions) for p in range(partitions)]
    batches = op.input("stats_input", flow, source)
    keyed = op.key_on("stats_key", batches, lambda b: keys[b.partition])

    def builder(snap: StatsState | None) -> _WindowLogic:
        return _WindowLogic(snap if snap is not None else StatsState(-1, window_ms))  # partition: first batch

    windows = op.stateful_batch("stats_window", keyed, builder)
    op.output("stats_output", op.map("stats_value", windows, lambda kv: kv[1]), sink)
    return flow
