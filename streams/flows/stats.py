"""The ``stats`` Bytewax dataflow: labelled examples -> per-window, per-domain feature and label statistics.

Shape (same batch-per-partition design as ``streams/flows/labels.py``)::

    examples topic, one source partition per Kafka partition p: StatsBatch(p, raw Example bytes, final)
      -> stateful_batch "stats.window": decode the batch in one call, numpy columns, update the open
         windows' aggregates (WindowAgg per (window start, domain)), close windows the partition's event
         time passed (+ lateness) -> encoded schema.FeatureStats
      -> sink: topic ``topics.feature_stats``, key = stats_id

Per window and domain: ``count`` (examples), ``label.click`` / ``label.conversion`` (count of positives,
value = rate), ``late_positive`` (ES-DFM corrections, counted in the window of their label's time),
``dense.<i>`` (fixed-bucket histogram, exact mean / std / min / max, p50/p90/p99 interpolated in the
buckets, examples missing the value), ``delay.click`` / ``delay.conversion`` (histograms and moments of click /
conversion time minus impression time, seconds: the feedback delay), ``hh.<field>`` (Misra-Gries heavy hitters
of sparse ids). Names: :class:`streams.names.Feature`.

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
from typing import Callable, NamedTuple

import bytewax.operators as op
import msgspec
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from streams import schema
from config import Config
from streams.flows.routing import part_key
from streams.names import Feature, Stat

log = logging.getLogger(__name__)
WINDOW_MS = 60_000  # event-time window (stats.window_s when a config section exists)
LATENESS_MS = 0  # examples arrive in impression-time order per partition (window policy): no extra wait
DENSE_EDGES = np.linspace(-5.0, 5.0, 41)  # 42 buckets: below -5, 40 inner, at/above 5
DELAY_EDGES_S = np.array(schema.DELAY_EDGES_S, dtype=float)  # seconds
HH_K = 32  # Misra-Gries counters per sparse field
SPARSE = ("ad_id", "campaign_id", "advertiser_id", "user_id")
STATE_VERSION = 2  # of StatsState / WindowAgg in recovery snapshots (1: before exact moments)
LATE_CONVERSION = "#late-conversion"  # id suffix of an ES-DFM conversion correction (streams/flows/join.py)
_decode_batch = msgspec.json.Decoder(list[schema.Example]).decode
_decode_one = msgspec.json.Decoder(schema.Example).decode


class Columns(NamedTuple):
    """Numpy columns of N examples. ``dense``: (N, D) with NaN where an example has fewer values."""

    ts: np.ndarray  # (N,) int64 window-assignment time (impression ts; label ts for late positives)
    domain: np.ndarray  # (N,) int64 index into schema.DOMAINS
    click: np.ndarray  # (N,) int8
    conversion: np.ndarray  # (N,) int8
    late: np.ndarray  # (N,) bool: a late_positive correction
    delay_s: np.ndarray  # (N, 2) float: click, conversion time minus impression time; NaN where not counted
    dense: np.ndarray  # (N, D) float
    sparse: np.ndarray  # (N, len(SPARSE)) int64


def columns(examples: list[schema.Example]) -> Columns:
    """One pass over decoded examples into numpy columns (the only per-example Python loop).

    Every click and conversion delay is counted once, with the example that first carries it: an ES-DFM
    correction (``late_positive``, id ``<impression>#late-click`` / ``#late-conversion``, streams/flows/join.py)
    carries only the delay of the objective it corrects, at that label's time; the other one left earlier.
    """
    n = len(examples)
    imps = [e.impression for e in examples]
    late = np.fromiter((e.decided == "late_positive" for e in examples), bool, n)
    late_conv = np.fromiter((e.example_id.endswith(LATE_CONVERSION) for e in examples), bool, n) & late
    its = np.fromiter((i.ts for i in imps), np.int64, n)
    cts = np.array([np.nan if e.click_ts is None else e.click_ts for e in examples], dtype=float)
    vts = np.array([np.nan if e.conversion_ts is None else e.conversion_ts for e in examples], dtype=float)
    cts[late_conv], vts[late & ~late_conv] = np.nan, np.nan  # a correction counts its own objective only
    ts = np.where(late, np.nan_to_num(np.fmax(cts, vts)), its).astype(np.int64)
    d = max((len(i.dense) for i in imps), default=0)
    dense = np.full((n, d), np.nan)
    for r, i in enumerate(imps):
        if i.dense:
            dense[r, :len(i.dense)] = i.dense
    return Columns(ts=ts, domain=np.fromiter((schema.DOMAIN_INDEX.get(i.domain, 0) for i in imps), np.int64, n),
                   click=np.fromiter((e.click for e in examples), np.int8, n),
                   conversion=np.fromiter((e.conversion for e in examples), np.int8, n), late=late,
                   delay_s=(np.stack([cts, vts], axis=1) - its[:, None]) / 1000.0, dense=dense,
                   sparse=np.array([[getattr(i, f) for f in SPARSE] for i in imps], dtype=np.int64).reshape(n, -1))


class Moments(NamedTuple):
    """Exact count, mean, sum of squared deviations, min and max of K columns, shapes (K,); mergeable
    (Chan et al.), so batches and partitions combine without keeping the values. Never updated in place.

    >>> m = Moments.of(np.array([[1.0], [3.0]])).merge(Moments.of(np.array([[5.0], [np.nan]])))
    >>> m.n.tolist(), m.mean.tolist(), m.std().tolist(), m.lo.tolist(), m.hi.tolist()
    ([3], [3.0], [1.632993161855452], [1.0], [5.0])
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def empty(cls, k: int) -> "Moments":
        return cls(np.zeros(k, np.int64), np.zeros(k), np.zeros(k), np.full(k, np.inf), np.full(k, -np.inf))

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """Moments of the columns of ``x`` (N, K), NaN = no value."""
        ok = ~np.isnan(x)
        n = ok.sum(axis=0)
        mean = np.divide(np.where(ok, x, 0.0).sum(axis=0), n, out=np.zeros(x.shape[1]), where=n > 0)
        return cls(n, mean, np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0), np.where(ok, x, np.inf).min(axis=0),
                   np.where(ok, x, -np.inf).max(axis=0))

    def widen(self, k: int) -> "Moments":
        if len(self.n) >= k:
            return self
        pad = Moments.empty(k - len(self.n))
        return Moments(*(np.concatenate([a, b]) for a, b in zip(self, pad)))

    def merge(self, o: "Moments") -> "Moments":
        a, o = self.widen(len(o.n)), o.widen(len(self.n))
        n = a.n + o.n
        w = np.divide(o.n, n, out=np.zeros(len(n)), where=n > 0)
        delta = o.mean - a.mean
        return Moments(n, a.mean + delta * w, a.m2 + o.m2 + delta ** 2 * a.n * w, np.fmin(a.lo, o.lo),
                       np.fmax(a.hi, o.hi))

    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0): what partial aggregates of one window combine into."""
        return np.sqrt(np.divide(self.m2, self.n, out=np.zeros(len(self.n)), where=self.n > 0))


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


def bucket_quantiles(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float,
                     qs: tuple[float, ...] = schema.FEATURE_QUANTILES) -> list[float]:
    """Quantiles from bucket counts, interpolated linearly inside the bucket holding each rank. Bucket i spans
    ``[edges[i-1], edges[i])``; the outer ones end at the observed ``lo`` / ``hi``, and every bucket is clamped
    to ``[lo, hi]``, so the error is below one bucket's width and a constant feature gets its value exactly.

    >>> bucket_quantiles(np.array([0, 4, 0]), np.array([0.0, 1.0]), 0.2, 0.6, qs=(0.5, 1.0))
    [0.4, 0.6]
    """
    total = int(counts.sum())
    if total == 0:
        return []
    bounds = np.clip(np.concatenate([[lo], edges, [hi]]), lo, hi)
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        rank = q * total
        i = min(int(np.searchsorted(cum, rank, side="left")), len(counts) - 1)
        f = (rank - (cum[i] - counts[i])) / counts[i] if counts[i] else 1.0
        out.append(float(bounds[i] + f * (bounds[i + 1] - bounds[i])))
    return out


def _hist(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket counts of the columns of ``x`` (N, K), NaN skipped: shape (K, len(edges) + 1)."""
    out = np.zeros((x.shape[1], len(edges) + 1), np.int64)
    for j in range(x.shape[1]):
        col = x[:, j]
        out[j] = np.bincount(np.searchsorted(edges, col[~np.isnan(col)], side="right"), minlength=len(edges) + 1)
    return out


def _widen(h: np.ndarray, k: int) -> np.ndarray:
    return h if h.shape[0] >= k else np.concatenate([h, np.zeros((k - h.shape[0], h.shape[1]), h.dtype)])


class WindowAgg:
    """Aggregates of one (window, domain, partition): counts, histograms, moments, heavy hitters.

    Arrays are replaced, never updated in place: a snapshot (:meth:`copy`) shares them, so it costs a few
    object copies per open window instead of a deep copy (DESIGN.md: Bytewax snapshots every touched key's
    state at every epoch end).
    """

    def __init__(self) -> None:
        self.n = 0
        self.labels = np.zeros(3, np.int64)  # clicks, conversions, late positives
        self.dense_hist = np.zeros((0, len(DENSE_EDGES) + 1), np.int64)  # (D, buckets)
        self.dense = Moments.empty(0)
        self.delay_hist = np.zeros((2, len(DELAY_EDGES_S) + 1), np.int64)  # click, conversion
        self.delay = Moments.empty(2)
        self.hh = tuple((np.array([], np.int64), np.array([], np.int64)) for _ in SPARSE)

    def copy(self) -> "WindowAgg":
        return copy.copy(self)  # shallow: the arrays are immutable by convention (see the class docstring)

    def update(self, c: Columns, rows: np.ndarray) -> None:
        """Add the examples ``rows`` of ``c``; corrections count as late positives and with their delay only."""
        late = c.late[rows]
        delays = c.delay_s[rows]
        self.delay_hist = self.delay_hist + _hist(delays, DELAY_EDGES_S)
        self.delay = self.delay.merge(Moments.of(delays))
        rows = rows[~late]
        self.labels = self.labels + [c.click[rows].sum(), c.conversion[rows].sum(), late.sum()]
        if not len(rows):
            return
        self.n += len(rows)
        dense = c.dense[rows]
        self.dense_hist = _widen(self.dense_hist, dense.shape[1]) + _widen(_hist(dense, DENSE_EDGES),
                                                                           self.dense_hist.shape[0])
        self.dense = self.dense.merge(Moments.of(dense))
        self.hh = tuple(misra_gries(*self.hh[k], c.sparse[rows, k]) for k in range(len(SPARSE)))

    def records(self, start: int, window_ms: int, domain: str, partition: int, now_ms: int
                ) -> list[schema.FeatureStats]:
        """The window's FeatureStats records, one per feature, with deterministic ids."""
        def rec(feature: str, kind: str, count: int, **kw) -> schema.FeatureStats:
            return schema.FeatureStats(stats_id=f"{start}:{domain}:{feature}:p{partition}", window_start=start,
                                       window_end=start + window_ms, domain=domain, feature=str(feature), kind=kind,
                                       partition=partition, instance=f"p{partition}", count=int(count),
                                       emitted_ts=now_ms, **kw)

        def hist(feature: str, h: np.ndarray, m: Moments, j: int, edges: np.ndarray, **kw) -> schema.FeatureStats:
            n_j = int(m.n[j])
            if not n_j:
                return rec(feature, "histogram", 0, bins=schema.bin_labels(edges), edges=edges.tolist(),
                           counts=h.tolist(), **kw)
            lo, hi = float(m.lo[j]), float(m.hi[j])
            return rec(feature, "histogram", n_j, mean=float(m.mean[j]), std=float(m.std()[j]), min=lo, max=hi,
                       bins=schema.bin_labels(edges), edges=edges.tolist(), counts=h.tolist(),
                       quantiles=bucket_quantiles(h, edges, lo, hi), **kw)

        n = max(self.n, 1)
        out = [rec(Feature.COUNT, "count", self.n, value=float(self.n > 0)),
               rec(Feature.LABEL_CLICK, "count", self.labels[0], value=float(self.labels[0]) / n),
               rec(Feature.LABEL_CONVERSION, "count", self.labels[1], value=float(self.labels[1]) / n),
               rec(Feature.LATE_POSITIVE, "count", self.labels[2], value=float(self.labels[2]) / n)]
        for j in range(self.dense_hist.shape[0]):
            out.append(hist(f"{Feature.DENSE_PREFIX}{j}", self.dense_hist[j], self.dense, j, DENSE_EDGES,
                            missing=self.n - int(self.dense.n[j])))
        for k, name in enumerate((Feature.DELAY_CLICK, Feature.DELAY_CONVERSION)):
            out.append(hist(name, self.delay_hist[k], self.delay, k, DELAY_EDGES_S))
        for k, name in enumerate(SPARSE):
            items, counts = self.hh[k]
            order = np.argsort(-counts, kind="stable")
            out.append(rec(f"{Feature.HH_PREFIX}{name}", "heavy_hitters", counts.sum(), items=items[order].tolist(),
                           item_counts=counts[order].tolist()))
        return out


class StatsState:
    """Open windows of one partition: ``(window start, domain index) -> WindowAgg``; time = max ts seen."""

    def __init__(self, partition: int, window_ms: int = WINDOW_MS, lateness_ms: int = LATENESS_MS):
        self.version = STATE_VERSION
        self.partition, self.window_ms, self.lateness_ms = partition, window_ms, lateness_ms
        self.open: dict[tuple[int, int], WindowAgg] = {}
        self.time: int | None = None
        self.counts = {Stat.EXAMPLES_IN: 0, Stat.INVALID_EXAMPLES: 0, Stat.TOO_LATE: 0, Stat.RECORDS_OUT: 0}

    def snapshot(self) -> "StatsState":
        """A copy that later steps leave alone, for Bytewax's epoch snapshot: new dicts and window objects over
        the same (never mutated) arrays. Cost ~ open windows, not their contents."""
        snap = copy.copy(self)
        snap.open = {w: agg.copy() for w, agg in self.open.items()}
        snap.counts = dict(self.counts)
        return snap

    def step(self, raws: list[bytes], now_ms: int, final: bool = False) -> list[schema.FeatureStats]:
        """Add a batch of raw Example messages; return the records of every window that closed."""
        examples = _decode(raws, self.counts)
        if examples:
            c = columns(examples)
            start = c.ts - c.ts % self.window_ms
            closed_before = None if self.time is None else self.time - self.lateness_ms - self.window_ms
            ok = np.ones(len(start), bool) if closed_before is None else start > closed_before
            self.counts[Stat.TOO_LATE] += int((~ok).sum())
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
        self.counts[Stat.RECORDS_OUT] += len(out)
        return out


def _decode(raws: list[bytes], counts: dict) -> list[schema.Example]:
    """Decode a batch in one call; on any bad record fall back to one at a time, skipping (counting) bad ones."""
    if not raws:
        return []
    counts[Stat.EXAMPLES_IN] += len(raws)
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
            counts[Stat.INVALID_EXAMPLES] += 1
    return out


# ------------------------------------------------------------------------------------------- Bytewax wiring

class StatsBatch(NamedTuple):
    """One item: raw Example messages of examples-topic partition ``partition``; ``final`` at end of input."""

    partition: int
    values: tuple[bytes, ...]
    final: bool = False


Report = Callable[[StatsState, bool], None]  # (a partition's state after a batch, final): its counters


class _WindowLogic(StatefulBatchLogic[StatsBatch, bytes, StatsState]):
    def __init__(self, state: StatsState, clock: Callable[[], float], report: Report | None):
        self.state, self.clock, self.report = state, clock, report

    def on_batch(self, values: list[StatsBatch]) -> tuple[list[bytes], bool]:
        now, out = int(self.clock() * 1000), []
        for b in values:
            self.state.partition = b.partition
            out += self.state.step(list(b.values), now, final=b.final)
        if self.report is not None:
            self.report(self.state, any(b.final for b in values))
        return [schema.encode(r) for r in out], self.RETAIN

    def snapshot(self) -> StatsState:
        return self.state.snapshot()  # shallow over immutable arrays: no deepcopy at every epoch end


def restore(snap: StatsState | None, window_ms: int = WINDOW_MS) -> StatsState:
    """The state to resume from: ``snap``, or a new one (partition set by the first batch). A snapshot of an
    older layout (a recovery directory written by an older streamrec) cannot be updated: its open windows are
    dropped with a warning, keeping the partition's time, so the flow resumes instead of crash-looping."""
    if snap is None:
        return StatsState(-1, window_ms)
    if getattr(snap, "version", 1) == STATE_VERSION:
        return snap
    log.warning("stats: recovery snapshot of partition %s has state version %s, not %s: dropping its %d open "
                "windows (their records will miss what was counted before the restart)", snap.partition,
                getattr(snap, "version", 1), STATE_VERSION, len(getattr(snap, "open", {})))
    fresh = StatsState(snap.partition, snap.window_ms, snap.lateness_ms)
    fresh.time = snap.time
    return fresh


def stats_topic(cfg: Config) -> str:
    return cfg.topics.feature_stats


def build_stats_flow(source, sink, *, partitions: int, window_ms: int = WINDOW_MS,
                     clock: Callable[[], float] = time.time, report: Report | None = None) -> Dataflow:
    """``source`` yields :class:`StatsBatch`; ``sink`` receives encoded ``FeatureStats`` (key = partition key).
    ``clock`` (seconds) stamps ``emitted_ts``; ``report`` sees each partition's state after every batch (the
    service publishes its counters, ``streams.flows.connectors.StatsReporter``)."""
    flow = Dataflow("stats")
    keys = [part_key(p, partitions) for p in range(partitions)]
    batches = op.input("stats_input", flow, source)
    keyed = op.key_on("stats_key", batches, lambda b: keys[b.partition])

    def builder(snap: StatsState | None) -> _WindowLogic:
        return _WindowLogic(restore(snap, window_ms), clock, report)

    windows = op.stateful_batch("stats_window", keyed, builder)
    op.output("stats_output", op.map("stats_value", windows, lambda kv: kv[1]), sink)
    return flow
