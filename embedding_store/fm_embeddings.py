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
:data:`~embedding_store.ttl_store.FUTURE_SLACK_MS` in the future. What the store shares with SOLARIS's pair
cache (the bounded rows, decode / check / count on arrival, the lookup's counters) is
:mod:`embedding_store.ttl_store`.

Restart: the consumer reads the topic from the beginning (no consumer group, no committed offsets): records
older than ``max_age_s`` are skipped cheaply as they arrive, the rest rebuild the newest state. So the
topic's retention only needs to cover ``loopfm_max_age_s``; a VM that restarts has its store back as soon as
it has read the retained tail, and meanwhile counts misses and trains on (the features degrade to zeros).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from embedding_store.ttl_store import BoundedRows, TTLStore, ids_outside
from streams import schema
from streams.bus.feed import TopicFeed

log = logging.getLogger("streamrec.loopfm")

STEP = "loopfm.store"  # DeadLetter.step of refused FMEmbeddings records
KINDS = ("user", "ad")
DEFAULT_CAPACITY = {"user": 200_000, "ad": 50_000}
RMS_ALPHA = 0.05  # weight of a record in the running mean square of the coordinates


class FMEmbeddingStore(TTLStore):
    """The VM's copy of the FM's user and ad vectors (module docstring; the common part:
    :class:`embedding_store.ttl_store.TTLStore`). Thread-safe: the consumer thread :meth:`apply`\\s records, the
    trainer's thread :meth:`lookup`\\s."""

    record_type = schema.FMEmbeddings
    stale_counter = "stale"

    def __init__(self, dim: int, max_age_s: float, capacity: dict[str, int] | None = None):
        if dim < 1:
            raise ValueError(f"FMEmbeddingStore: dim must be >= 1, got {dim}")
        super().__init__(int(max_age_s * 1000), {
            "records": 0, "ids_stored": 0, "older_ignored": 0, "expired_on_arrival": 0, "dead_letters": 0,
            "lookups": 0, "misses": 0, "stale": 0})
        self.dim, self.max_age_ms = dim, self.ttl_ms
        cap = {**DEFAULT_CAPACITY, **(capacity or {})}
        # one kind's id -> (vector, model version, ts), at most capacity ids
        self.tables = {k: BoundedRows(dim, cap[k], 1024, "FMEmbeddingStore") for k in KINDS}
        self._ms = {k: None for k in KINDS}  # running mean square per coordinate (see rms())

    # ---- writing (the consumer thread) ---------------------------------------------------------
    def check_record(self, rec: schema.FMEmbeddings) -> str | None:
        if rec.kind not in KINDS:
            return f"kind {rec.kind!r}: this store keeps {' and '.join(KINDS)} vectors"
        if rec.dim != self.dim:
            return f"dim mismatch: record dim {rec.dim}, store dim {self.dim} (trainer.loopfm_dim)"
        if len(rec.vectors) != len(rec.ids) * rec.dim:
            return f"shape: {len(rec.vectors)} values for {len(rec.ids)} ids x dim {rec.dim}"
        return None

    def check_values(self, rec: schema.FMEmbeddings) -> str | None:
        if ids_outside(rec.ids):
            return "id outside [0, 2**63)"
        if rec.vectors and not np.isfinite(np.asarray(rec.vectors, np.float64)).all():
            return "vectors hold NaN or infinite values"
        return None

    def keys_of(self, rec: schema.FMEmbeddings) -> int:
        return len(rec.ids)

    def _store_record(self, rec: schema.FMEmbeddings, now_ms: int) -> None:
        """Rows of ``rec.kind``: an id whose stored version is newer keeps it unless it is stale."""
        stale_before = now_ms - self.max_age_ms
        vecs = np.asarray(rec.vectors, np.float32).reshape(len(rec.ids), self.dim)
        if len(vecs):
            ms, old = (vecs.astype(np.float64) ** 2).mean(0), self._ms[rec.kind]
            self._ms[rec.kind] = ms if old is None else (1 - RMS_ALPHA) * old + RMS_ALPHA * ms
        t, version = self.tables[rec.kind], rec.model_version
        stored, ignored = t.put(rec.ids, vecs, version, rec.ts,
                                lambda r: t.version[r] > version and t.ts[r] >= stale_before)
        self.counters["ids_stored"] += stored
        self.counters["older_ignored"] += ignored
        self.newest_version = max(self.newest_version, version)

    # ---- reading (the trainer's thread) --------------------------------------------------------
    def lookup(self, kind: str, ids, now_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (N, dim) float32, present (N,) bool): zeros and False for missing or stale ids."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            vecs, fresh, _ = self._lookup(self.tables[kind], [int(i) for i in ids], now_ms)
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
        :data:`~embedding_store.ttl_store.AGE_WINDOW` hits (absent before the first hit)."""
        with self._lock:
            out = self._stats("loopfm_")
            out["loopfm_users"] = float(len(self.tables["user"]))
            out["loopfm_ads"] = float(len(self.tables["ad"]))
            out["loopfm_evicted"] = float(sum(t.evicted for t in self.tables.values()))
        return out


class FMEmbeddingConsumer(TopicFeed):
    """A daemon thread feeding ``store`` from ``cfg.topics.fm_embeddings`` (every partition from the
    beginning; see the module docstring), refused records to ``cfg.topics.dead_letters`` (step :data:`STEP`).
    ``start()``, ``stop()`` (joins; idempotent); ``error``: what stopped the thread, if anything did."""

    def __init__(self, cfg, store: FMEmbeddingStore, poll_s: float = 0.2):
        super().__init__(cfg, cfg.topics.fm_embeddings, store.apply_raw, group="streamrec-loopfm", step=STEP,
                         name="loopfm", poll_s=poll_s)
        self.store = store
