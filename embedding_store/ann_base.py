"""The ANN index interface shared by its implementations (:mod:`embedding_store.ann` holds the numpy
reference and the factory, :mod:`embedding_store.ann_faiss` the FAISS one): configuration, errors, the
:class:`AnnIndex` base, and the snapshot files' I/O."""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

KINDS: tuple[str, ...] = ("numpy", "exact", "ivf")
QUANTIZERS: tuple[str, ...] = ("flat", "hnsw")
CODECS: tuple[str, ...] = ("flat", "fp16")
SNAPSHOT_FORMAT = 1


class AnnError(ValueError):
    """Bad input to the index (wrong shape, negative id) or a bad snapshot; names the place and the mismatch."""


@dataclass(frozen=True)
class AnnConfig:
    """``dim``: vector width; ``kind``: one of :data:`KINDS`; ``nlist``/``nprobe``: IVF lists and lists
    probed per query; ``device``: ``auto`` (GPU search when faiss-gpu sees a GPU) | ``cpu`` | ``gpu``;
    ``quantizer``: IVF coarse quantizer, ``flat`` | ``hnsw``; ``hnsw_m``: graph degree of the HNSW quantizer;
    ``ef_search``: its search beam for queries, raised to ``nprobe`` when smaller (a beam narrower than
    k can return fewer than k lists; 0: ``max(nprobe, 16)``); ``ef_add``: its beam when assigning upserted
    vectors to lists (1 list wanted: 8 finds the nearest centroid for 99.6% of vectors at 4k lists,
    assigning ~1.8x as fast as 16); ``codec``: how
    IVF lists store vectors, ``flat`` (float32) | ``fp16`` (half the bytes to scan; ``get`` returns them
    to ~1e-3)."""

    dim: int = 32
    kind: str = "exact"
    nlist: int = 1024
    nprobe: int = 16
    device: str = "auto"
    quantizer: str = "flat"
    hnsw_m: int = 32
    ef_search: int = 0
    ef_add: int = 8
    codec: str = "flat"


def validate(cfg: AnnConfig) -> None:
    if cfg.kind == "hnsw":
        raise ValueError("AnnConfig.kind: 'hnsw' cannot delete or replace vectors (FAISS HNSW has no remove_ids); "
                         "use 'exact' or 'ivf' for a mutable user index")
    if cfg.kind not in KINDS:
        raise ValueError(f"AnnConfig.kind: expected one of {KINDS}, got {cfg.kind!r}")
    if cfg.dim < 1 or cfg.nlist < 1 or not 1 <= cfg.nprobe:
        raise ValueError(f"AnnConfig: dim, nlist, nprobe must be >= 1, got {cfg.dim}, {cfg.nlist}, {cfg.nprobe}")
    if cfg.codec not in CODECS:
        raise ValueError(f"AnnConfig.codec: expected one of {CODECS}, got {cfg.codec!r}")
    if cfg.quantizer not in QUANTIZERS:
        raise ValueError(f"AnnConfig.quantizer: expected one of {QUANTIZERS}, got {cfg.quantizer!r}")
    if cfg.hnsw_m < 2 or cfg.ef_search < 0 or cfg.ef_add < 1:
        raise ValueError(f"AnnConfig: hnsw_m must be >= 2, ef_search >= 0, ef_add >= 1; "
                         f"got {cfg.hnsw_m}, {cfg.ef_search}, {cfg.ef_add}")
    if cfg.device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"AnnConfig.device: expected auto|cpu|gpu, got {cfg.device!r}")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


class AnnIndex:
    """The interface: ``upsert``, ``delete``, ``search``, ``get``, ``written_ts``, ``ids``, ``snapshot``.

    Subclasses implement ``_add(ids, vecs)`` (ids not present), ``_remove(ids)`` (ids present),
    ``_search(q, k)`` and ``_get(ids)``; this class keeps the id -> written-ts map, which is also the
    membership truth.
    """

    def __init__(self, cfg: AnnConfig):
        validate(cfg)
        self.cfg = cfg
        self._ts: dict[int, int] = {}

    # -- input checks (the edge) --
    def _ids(self, ids, where: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise AnnError(f"{where}: ids must be a 1-d integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise AnnError(f"{where}: ids must be >= 0 (-1 is FAISS's 'no result'), got {int(ids.min())}")
        return np.ascontiguousarray(ids)

    def _vecs(self, v, n: int, where: str) -> np.ndarray:
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[1] != self.cfg.dim or v.shape[0] != n:
            raise AnnError(f"{where}: expected vectors of shape ({n}, {self.cfg.dim}), got {v.shape}")
        if not np.isfinite(v).all():
            raise AnnError(f"{where}: vectors contain NaN or infinity")
        return normalize(v)

    # -- public API --
    def __len__(self) -> int:
        return len(self._ts)

    def __contains__(self, user_id: int) -> bool:
        return int(user_id) in self._ts

    def upsert(self, ids, vectors, ts_ms) -> None:
        """Insert or replace: ids (N,) int >= 0, vectors (N, dim), ts_ms int or (N,) event-time of each vector.

        A repeated id within one call keeps its last vector."""
        ids = self._ids(ids, "upsert")
        vecs = self._vecs(vectors, len(ids), "upsert")
        ts = np.broadcast_to(np.asarray(ts_ms, dtype=np.int64), ids.shape)
        if not len(ids):
            return
        # keep the last occurrence of each id: unique over the reversed array
        _, first_rev = np.unique(ids[::-1], return_index=True)
        if len(first_rev) != len(ids):
            keep = np.sort(len(ids) - 1 - first_rev)
            ids, vecs, ts = ids[keep], vecs[keep], ts[keep]
        known = self._ts
        present = np.fromiter((i in known for i in ids.tolist()), dtype=bool, count=len(ids))
        if present.any():
            self._remove(np.ascontiguousarray(ids[present]))
        self._add(ids, vecs)
        known.update(zip(ids.tolist(), ts.tolist()))

    def delete(self, ids) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        ids = np.unique(self._ids(ids, "delete"))
        known = self._ts
        gone = np.ascontiguousarray(ids[np.fromiter((i in known for i in ids.tolist()), dtype=bool, count=len(ids))])
        if len(gone):
            self._remove(gone)
            for i in gone.tolist():
                del known[i]
        return len(gone)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, dim) -> (scores (Q, k) float32 descending, ids (Q, k) int64); -1 / -inf pad missing."""
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.cfg.dim:
            raise AnnError(f"search: expected queries of shape (Q, {self.cfg.dim}), got {q.shape}")
        if k < 1:
            raise AnnError(f"search: k must be >= 1, got {k}")
        if not len(self._ts):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, ids = self._search(normalize(q), k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def get(self, ids) -> np.ndarray:
        """Stored (normalised) vectors (N, dim) of ids that must all be present."""
        ids = self._ids(ids, "get")
        missing = [i for i in ids.tolist() if i not in self._ts]
        if missing:
            raise AnnError(f"get: {len(missing)} id(s) not in the index, e.g. {missing[:5]}")
        return self._get(ids) if len(ids) else np.zeros((0, self.cfg.dim), np.float32)

    def written_ts(self, ids) -> np.ndarray:
        """Event-time (ms) each id's vector was written, -1 for absent ids: (N,) int64."""
        ids = self._ids(ids, "written_ts")
        return np.fromiter((self._ts.get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))

    def ids(self) -> np.ndarray:
        return np.fromiter(self._ts.keys(), dtype=np.int64, count=len(self._ts))

    def snapshot(self) -> dict[str, np.ndarray]:
        """Plain arrays (ids, vectors, written_ts, meta; IVF adds its trained centroids): :func:`save_index`."""
        ids = self.ids()
        return {"ids": ids, "vectors": self.get(ids), "written_ts": self.written_ts(ids),
                "meta": np.frombuffer(json.dumps({"format": SNAPSHOT_FORMAT, **asdict(self.cfg)}).encode(), np.uint8)}

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        """Load a :meth:`snapshot` into this (empty) index; the snapshot may come from another kind."""
        if len(self._ts):
            raise AnnError(f"restore: the index already holds {len(self._ts)} vectors; restore into an empty one")
        if snap["vectors"].shape[1:] != (self.cfg.dim,):
            raise AnnError(f"restore: snapshot vectors have dim {snap['vectors'].shape[1:]}, index has {self.cfg.dim}")
        self._restore_extra(snap)
        self.upsert(snap["ids"], snap["vectors"], snap["written_ts"])

    def _restore_extra(self, snap: dict[str, np.ndarray]) -> None:
        pass

    # -- implementation hooks --
    def _add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        raise NotImplementedError

    def _remove(self, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _get(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def save_npz_atomic(path: str | os.PathLike, arrays: dict) -> Path:
    """Write ``arrays`` as one .npz: a temporary file, fsync, then rename over ``path`` (never half written)."""
    return write_atomic(path, npz_bytes(arrays))


def npz_bytes(arrays: dict) -> bytes:
    """``arrays`` as the bytes of one uncompressed .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_arrays(source) -> dict[str, np.ndarray]:
    """Every array of one .npz (a path or a binary file object), read whole; no pickles.

    >>> npz_arrays(io.BytesIO(npz_bytes({"a": np.arange(3)})))["a"].tolist()
    [0, 1, 2]
    """
    with np.load(source, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share one
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_snapshot(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a snapshot file written by :func:`save_index`."""
    try:
        snap = npz_arrays(path)
        meta = json.loads(snap["meta"].tobytes())
    except (OSError, ValueError, KeyError) as e:
        raise AnnError(f"index snapshot {path}: unreadable ({e})") from None
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise AnnError(f"index snapshot {path}: format {meta.get('format')}, expected {SNAPSHOT_FORMAT}")
    return snap, meta
