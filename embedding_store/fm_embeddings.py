"""The VM-side LoopFM store: the FM's newest user and ad vectors, keyed by id, with their model version and age.

The FM trainer publishes :class:`~streams.schema.FMEmbeddings` records to ``topics.fm_embeddings``
(:mod:`trainer.loopfm`); a VM trainer keeps the newest vector of each id here and reads it as input features
(:class:`trainer.loopfm.FMEmbeddingView`), so no FM inference ever runs on a VM's path::

    FM trainer --FMEmbeddings--> topics.fm_embeddings --FMEmbeddingConsumer (thread)--> FMEmbeddingStore
                                                                       VM featurize --lookup--^

Two tables (users, ads), each id -> (vector, model version, ts): the wall-clock ms the FM computed the vector;
a vector's age is ``now - ts``. A lookup of an id that is absent is a *miss*; one older than ``max_age_s``
is *stale*: both read as "not present" (zeros, present = 0 in the VM's features). Counted per id looked up.

Versions: a record whose ``model_version`` is older than the one stored for an id is ignored for that id
(``older_ignored``; messages arrive out of order across partitions, and a restarted FM re-publishes), unless
the stored vector is already stale (an FM started over with ``--fresh`` counts steps from 0 again: its new
vectors replace the old FM's once those have aged out). A record older than ``max_age_s`` when it arrives is
not stored (``expired_on_arrival``).

Bounded: each table holds at most ``capacity`` ids; past it the id updated least recently is evicted (LRU
by update: an id the FM no longer publishes goes first; lookups do not refresh it, which keeps them cheap).
Memory per id is about ``4 * dim`` bytes of vector, 16 of version and ts, and ~150 of index (an OrderedDict
entry with its two ints): ~340 bytes at dim 48, so the default 200k users + 50k ads take ~85 MB when full.
Arrays grow by doubling up to ``capacity``.

Bad records go to ``topics.dead_letters`` (step ``loopfm.store``) with a reason, the whole message refused:
undecodable bytes, an unknown ``kind`` (this store keeps ``user`` and ``ad``; ``pair`` belongs to SOLARIS),
a ``dim`` other than the store's (``trainer.loopfm_dim``), ``len(vectors) != len(ids) * dim``, NaN or
infinite values, ids outside ``[0, 2**63)``, a negative model version, a ts more than
:data:`FUTURE_SLACK_MS` in the future.

Restart: the consumer reads the topic from the beginning (no consumer group, no committed offsets): records
older than ``max_age_s`` are skipped cheaply as they arrive, the rest rebuild the newest state. So the
topic's retention only needs to cover ``loopfm_max_age_s``; a VM that restarts has its store back as soon as
it has read the retained tail, and meanwhile counts misses and trains on (the features degrade to zeros).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from streams import schema
from streams.bus.feed import TopicFeed

log = logging.getLogger("streamrec.loopfm")

STEP = "loopfm.store"  # DeadLetter.step of refused FMEmbeddings records
KINDS = ("user", "ad")
DEFAULT_CAPACITY = {"user": 200_000, "ad": 50_000}
FUTURE_SLACK_MS = 300_000  # clocks of the FM's and the VM's machines may differ this much
AGE_WINDOW = 10_000  # ages of the most recent hits kept for the p50
_ID_MAX = 2 ** 63
RMS_ALPHA = 0.05  # weight of a record in the running mean square of the coordinates


class FMEmbeddingTable:
    """One kind's id -> (vector, model version, ts), at most ``capacity`` ids (see the module docstring).
    Not locked: :class:`FMEmbeddingStore` serialises access."""

    def __init__(self, dim: int, capacity: int, initial: int = 1024):
        if capacity < 1:
            raise ValueError(f"FMEmbeddingTable: capacity must be >= 1, got {capacity}")
        self.dim, self.capacity = dim, capacity
        self._row: OrderedDict[int, int] = OrderedDict()  # id -> row, least recently updated first
        n = min(initial, capacity)
        self._vecs = np.zeros((n, dim), np.float32)
        self._version = np.zeros(n, np.int64)
        self._ts = np.zeros(n, np.int64)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._row)

    def _new_row(self) -> int:
        if len(self._row) >= self.capacity:  # full: reuse the least recently updated id's row
            _, r = self._row.popitem(last=False)
            self.evicted += 1
            return r
        r = len(self._row)  # rows are never freed otherwise: live ids hold rows 0 .. len-1
        if r >= len(self._vecs):
            n = min(2 * len(self._vecs), self.capacity)
            self._vecs = np.concatenate([self._vecs, np.zeros((n - len(self._vecs), self.dim), np.float32)])
            self._version = np.concatenate([self._version, np.zeros(n - len(self._version), np.int64)])
            self._ts = np.concatenate([self._ts, np.zeros(n - len(self._ts), np.int64)])
        return r

    def put(self, ids: list[int], vecs: np.ndarray, version: int, ts: int, stale_before_ms: int) -> tuple[int, int]:
        """Store rows; returns (stored, older_ignored). An id whose stored version is newer keeps it unless
        its ts is before ``stale_before_ms``."""
        stored = ignored = 0
        for j, i in enumerate(ids):
            r = self._row.get(i)
            if r is None:
                r = self._new_row()
                self._row[i] = r
            elif self._version[r] > version and self._ts[r] >= stale_before_ms:
                ignored += 1
                continue
            else:
                self._row.move_to_end(i)
            self._vecs[r] = vecs[j]
            self._version[r] = version
            self._ts[r] = ts
            stored += 1
        return stored, ignored

    def get(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(vectors (N, dim) float32, found (N,) bool, version (N,), ts (N,)); zeros where absent."""
        get = self._row.get
        rows = np.fromiter((get(int(i), -1) for i in ids), np.int64, len(ids))
        found = rows >= 0
        r = np.maximum(rows, 0)
        vecs = np.where(found[:, None], self._vecs[r], 0.0).astype(np.float32, copy=False)
        return vecs, found, np.where(found, self._version[r], -1), np.where(found, self._ts[r], 0)


class FMEmbeddingStore:
    """The VM's copy of the FM's user and ad vectors (module docstring). Thread-safe: the consumer thread
    :meth:`apply`\\s records, the trainer's thread :meth:`lookup`\\s."""

    def __init__(self, dim: int, max_age_s: float, capacity: dict[str, int] | None = None):
        if dim < 1:
            raise ValueError(f"FMEmbeddingStore: dim must be >= 1, got {dim}")
        self.dim, self.max_age_ms = dim, int(max_age_s * 1000)
        cap = {**DEFAULT_CAPACITY, **(capacity or {})}
        self.tables = {k: FMEmbeddingTable(dim, cap[k]) for k in KINDS}
        self._lock = threading.Lock()
        self.counters = {"records": 0, "ids_stored": 0, "older_ignored": 0, "expired_on_arrival": 0,
                         "dead_letters": 0, "lookups": 0, "misses": 0, "stale": 0}
        self.newest_version = -1
        self._ms = {k: None for k in KINDS}  # running mean square per coordinate (see rms())
        self._ages_ms: deque[np.ndarray] = deque()
        self._ages_n = 0

    # ---- writing (the consumer thread) ---------------------------------------------------------
    def check(self, rec: schema.FMEmbeddings, now_ms: int) -> str | None:
        """Why ``rec`` is refused (a dead letter's reason), or None."""
        if rec.kind not in KINDS:
            return f"kind {rec.kind!r}: this store keeps {' and '.join(KINDS)} vectors"
        if rec.dim != self.dim:
            return f"dim mismatch: record dim {rec.dim}, store dim {self.dim} (trainer.loopfm_dim)"
        if len(rec.vectors) != len(rec.ids) * rec.dim:
            return f"shape: {len(rec.vectors)} values for {len(rec.ids)} ids x dim {rec.dim}"
        if rec.model_version < 0:
            return f"model_version {rec.model_version} < 0"
        if rec.ts > now_ms + FUTURE_SLACK_MS:
            return f"ts {rec.ts} is {(rec.ts - now_ms) / 1000:.0f}s in the future"
        if rec.ids and (min(rec.ids) < 0 or max(rec.ids) >= _ID_MAX):
            return "id outside [0, 2**63)"
        if rec.vectors and not np.isfinite(np.asarray(rec.vectors, np.float64)).all():
            return "vectors hold NaN or infinite values"
        return None

    def apply(self, rec: schema.FMEmbeddings, now_ms: int | None = None) -> str | None:
        """Store a decoded record; returns the reason when it is refused (nothing stored), else None."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        reason = self.check(rec, now_ms)
        with self._lock:
            if reason is not None:
                self.counters["dead_letters"] += 1
                return reason
            self.counters["records"] += 1
            stale_before = now_ms - self.max_age_ms
            if rec.ts < stale_before:
                self.counters["expired_on_arrival"] += len(rec.ids)
                return None
            vecs = np.asarray(rec.vectors, np.float32).reshape(len(rec.ids), self.dim)
            if len(vecs):
                ms, old = (vecs.astype(np.float64) ** 2).mean(0), self._ms[rec.kind]
                self._ms[rec.kind] = ms if old is None else (1 - RMS_ALPHA) * old + RMS_ALPHA * ms
            stored, ignored = self.tables[rec.kind].put(rec.ids, vecs, rec.model_version, rec.ts, stale_before)
            self.counters["ids_stored"] += stored
            self.counters["older_ignored"] += ignored
            self.newest_version = max(self.newest_version, rec.model_version)
        return None

    def apply_raw(self, raw: bytes, now_ms: int | None = None) -> str | None:
        """Decode and :meth:`apply` one message's bytes; the reason when refused."""
        rec = schema.decode(raw, schema.FMEmbeddings)
        if isinstance(rec, schema.Invalid):
            with self._lock:
                self.counters["dead_letters"] += 1
            return rec.reason
        return self.apply(rec, now_ms)

    # ---- reading (the trainer's thread) --------------------------------------------------------
    def lookup(self, kind: str, ids, now_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (N, dim) float32, present (N,) bool): zeros and False for missing or stale ids."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            vecs, found, _, ts = self.tables[kind].get(ids)
            age = now_ms - ts
            fresh = found & (age <= self.max_age_ms)
            self.counters["lookups"] += len(found)
            self.counters["misses"] += int((~found).sum())
            self.counters["stale"] += int((found & ~fresh).sum())
            if fresh.any():
                self._ages_ms.append(age[fresh])
                self._ages_n += int(fresh.sum())
                while self._ages_n - len(self._ages_ms[0]) >= AGE_WINDOW:
                    self._ages_n -= len(self._ages_ms.popleft())
        vecs[~fresh] = 0.0
        return vecs, fresh

    def rms(self, kind: str) -> np.ndarray | None:
        """(dim,) the running root mean square of each coordinate of the ``kind`` vectors received (an
        exponential average over records, weight :data:`RMS_ALPHA`); None before the first."""
        with self._lock:
            ms = self._ms[kind]
        return None if ms is None else np.sqrt(ms).astype(np.float32)

    def stats(self) -> dict[str, float]:
        """Counters (since start) and gauges, named ``loopfm_*``; ``age_p50_s`` over the most recent
        :data:`AGE_WINDOW` hits (absent before the first hit)."""
        with self._lock:
            out = {f"loopfm_{k}": float(v) for k, v in self.counters.items()}
            out["loopfm_users"] = float(len(self.tables["user"]))
            out["loopfm_ads"] = float(len(self.tables["ad"]))
            out["loopfm_evicted"] = float(sum(t.evicted for t in self.tables.values()))
            out["loopfm_fm_version"] = float(self.newest_version)
            if self._ages_ms:
                out["loopfm_age_p50_s"] = float(np.percentile(np.concatenate(self._ages_ms), 50)) / 1000.0
        return out


class FMEmbeddingConsumer(TopicFeed):
    """A daemon thread feeding ``store`` from ``cfg.topics.fm_embeddings`` (every partition from the
    beginning; see the module docstring), refused records to ``cfg.topics.dead_letters`` (step :data:`STEP`).
    ``start()``, ``stop()`` (joins; idempotent); ``error``: what stopped the thread, if anything did."""

    def __init__(self, cfg, store: FMEmbeddingStore, poll_s: float = 0.2):
        super().__init__(cfg, cfg.topics.fm_embeddings, store.apply_raw, group="streamrec-loopfm", step=STEP,
                         name="loopfm", poll_s=poll_s)
        self.store = store
