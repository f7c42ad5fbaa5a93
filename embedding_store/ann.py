"""A mutable nearest-neighbour index of user vectors: upsert by id, delete, search, age, snapshot.

One interface (:class:`AnnIndex`), three implementations (STYLE #10; the FAISS ones in
:mod:`embedding_store.ann_faiss`):

=========  ==========================================================  =====================================
kind       structure                                                   use
=========  ==========================================================  =====================================
``numpy``  dict id -> row + a dense matrix, brute-force ``Q @ V.T``     the reference; tests
``exact``  ``IndexIDMap2(IndexFlatIP)``                                 small indexes (<~100k), exact answers
``ivf``    ``IndexIVFFlat`` with ``DirectMap.Hashtable``                large indexes; approximate (``nprobe``)
=========  ==========================================================  =====================================

IVF lists hold float32 vectors (``codec="flat"``) or half floats (``codec="fp16"``,
``IndexIVFScalarQuantizer``): scanning lists is bound by the bytes read, and half the bytes gave ~1.3-1.5x
the queries/s at the same recall at 1M.

The IVF coarse quantizer (``AnnConfig.quantizer``) is ``flat`` (brute force over the ``nlist`` centroids:
fine up to ~2k lists) or ``hnsw`` (an ``IndexHNSWFlat`` graph over the centroids, for 4k-64k lists, where a
flat quantizer would cost as much per query as scanning the lists). Deletes still work with ``hnsw``:
removal happens on the inverted lists through the direct map, the quantizer never changes after training.
More than 2048 lists are trained by two-level spherical k-means (sqrt(nlist) clusters, then each split in
proportion to its size): one level costs ``nlist`` dot products per training point and iteration, which at
16k lists is minutes; two levels cost ~2 sqrt(nlist).

Vectors are L2-normalised on the way in, so scores are cosine similarities in [-1, 1].

Traps this module exists to contain:

* Removing ids from an IVF index **without** a direct map makes FAISS scan every list, and with the
  ``Array`` direct map removal is refused; an IVF index whose ids are replaced outside FAISS's knowledge
  returns stale duplicates. We always set ``DirectMap.Hashtable`` and remove through ``IDSelectorArray``
  (the hashtable path accepts no other selector; ``index.remove_ids(np_array)`` builds an
  ``IDSelectorBatch`` and FAISS raises).
* ``IndexIDMap2.remove_ids`` scans all ``ntotal`` ids and asks the selector about each: an
  ``IDSelectorArray`` there is O(ntotal * n); we pass ``IDSelectorBatch`` (hash set + Bloom filter).
* HNSW cannot delete: ``kind="hnsw"`` is refused (ValueError) because this index is mutable. (An HNSW
  *quantizer* can: see above.)
* IVF must be trained before the first add. Until :meth:`~embedding_store.ann_faiss.FaissIndex.train` runs (explicitly, or
  automatically once ``30 * nlist`` vectors are staged) vectors live in an exact staging index, so the
  index answers correctly from the first upsert.

Each stored vector carries the event-time (ms) it was written, for "how old is this vector".

>>> import numpy as np
>>> idx = make_index(AnnConfig(dim=2, kind="numpy"))
>>> idx.upsert(np.array([7, 8]), np.array([[1.0, 0.0], [1.0, 1.0]]), ts_ms=1000)
>>> idx.upsert(np.array([7]), np.array([[0.0, 2.0]]), ts_ms=2000)   # replaces user 7's vector
>>> scores, ids = idx.search(np.array([[0.0, 1.0]]), k=3)
>>> ids.tolist(), [round(float(s), 3) for s in scores[0][:2]], idx.written_ts(np.array([7, 9])).tolist()
([[7, 8, -1]], [1.0, 0.707], [2000, -1])
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from embedding_store.ann_base import (CODECS, KINDS, QUANTIZERS, SNAPSHOT_FORMAT, AnnConfig, AnnError, AnnIndex,
                                      normalize, npz_arrays, npz_bytes, read_snapshot, save_npz_atomic, validate,
                                      write_atomic)
from embedding_store.ann_faiss import FaissIndex  # imports faiss itself only when a FAISS index is built

__all__ = ["CODECS", "KINDS", "QUANTIZERS", "SNAPSHOT_FORMAT", "AnnConfig", "AnnError", "AnnIndex", "NumpyIndex",
           "load_index", "make_index", "normalize", "npz_arrays", "npz_bytes", "read_snapshot", "save_index",
           "save_npz_atomic", "validate", "write_atomic"]


class NumpyIndex(AnnIndex):
    """The reference: rows in a growable matrix, a dict id -> row, deletion by moving the last row in."""

    def __init__(self, cfg: AnnConfig):
        super().__init__(cfg)
        self._mat = np.zeros((16, cfg.dim), np.float32)
        self._row_id = np.zeros(16, np.int64)
        self._row: dict[int, int] = {}

    def _add(self, ids, vecs):
        n0, n = len(self._row), len(ids)
        if n0 + n > len(self._mat):
            cap = max(2 * len(self._mat), n0 + n)
            self._mat = np.resize(self._mat, (cap, self.cfg.dim))
            self._row_id = np.resize(self._row_id, cap)
        self._mat[n0:n0 + n] = vecs
        self._row_id[n0:n0 + n] = ids
        self._row.update(zip(ids.tolist(), range(n0, n0 + n)))

    def _remove(self, ids):
        for i in ids.tolist():
            r, last = self._row.pop(i), len(self._row)
            if r != last:
                moved = int(self._row_id[last])
                self._mat[r], self._row_id[r] = self._mat[last], moved
                self._row[moved] = r

    def _search(self, q, k):
        n = len(self._row)
        s = q @ self._mat[:n].T  # (Q, n)
        kk = min(k, n)
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        ts = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-ts, axis=1, kind="stable")
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        scores[:, :kk] = np.take_along_axis(ts, order, axis=1)
        ids[:, :kk] = self._row_id[np.take_along_axis(top, order, axis=1)]
        return scores, ids

    def _get(self, ids):
        return self._mat[[self._row[i] for i in ids.tolist()]].copy()


def make_index(cfg: AnnConfig) -> AnnIndex:
    validate(cfg)
    if cfg.kind == "numpy":
        return NumpyIndex(cfg)
    return FaissIndex(cfg)


def save_index(index: AnnIndex, path: str | os.PathLike) -> Path:
    """Write :meth:`AnnIndex.snapshot` to ``path`` atomically (temp file, fsync, rename); returns the path."""
    return save_npz_atomic(path, index.snapshot())


def load_index(path: str | os.PathLike, kind: str | None = None, device: str = "auto") -> AnnIndex:
    """Rebuild an index from a snapshot file; ``kind`` overrides the kind it was saved with."""
    snap, meta = read_snapshot(path)
    known = {fl.name for fl in fields(AnnConfig)}  # older snapshots lack the newer fields: their defaults
    cfg = AnnConfig(**{**{k: v for k, v in meta.items() if k in known}, "kind": kind or meta["kind"], "device": device})
    idx = make_index(cfg)
    idx.restore(snap)
    return idx
