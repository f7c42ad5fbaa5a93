"""The FAISS kinds of :class:`embedding_store.ann.AnnIndex` (``exact``, ``ivf``) and the coarse k-means that
trains IVF centroids; the module docstring of :mod:`embedding_store.ann` explains the choices and the traps.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from embedding_store.ann_base import AnnConfig, AnnError, AnnIndex, normalize, validate

TWO_LEVEL_ABOVE = 2048  # lists; above this the coarse k-means runs in two levels


def _faiss():
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # four INFO lines per process about SIMD builds
    import faiss  # imported lazily: the numpy reference works without it

    return faiss


def gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    f = _faiss()
    return hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0


class FaissIndex(AnnIndex):
    """``exact``: ``IndexIDMap2(IndexFlatIP)``; ``ivf``: ``IndexIVFFlat(IndexFlatIP, nlist, IP)`` with a
    hashtable direct map. Mutations go to the CPU index; with a GPU (faiss-gpu), searches use a GPU copy
    rebuilt lazily after mutations (one O(n) copy per search-after-write burst)."""

    def __init__(self, cfg: AnnConfig):
        super().__init__(cfg)
        f = _faiss()
        self._f = f
        self._exact = f.IndexIDMap2(f.IndexFlatIP(cfg.dim))  # the index (exact) or the staging area (ivf)
        self._ivf = None
        self._hnsw = None  # the HNSW coarse quantizer, when cfg.quantizer == "hnsw" (after training)
        self._use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpu_available())
        if cfg.device == "gpu" and not gpu_available():
            raise ValueError("AnnConfig.device: 'gpu' asked for, but FAISS has no GPU support or sees no GPU "
                             "(install faiss-gpu, or use device='auto'/'cpu')")
        self._gpu_copy = None

    @property
    def trained(self) -> bool:
        return self.cfg.kind == "exact" or self._ivf is not None

    def train(self, sample: np.ndarray) -> None:
        """Train the IVF coarse quantizer (k-means over ``sample`` (N, dim), N >= nlist), then move the
        staged vectors in. A no-op for ``exact``."""
        if self.cfg.kind != "ivf":
            return
        f, d, nlist = self._f, self.cfg.dim, self.cfg.nlist
        sample = normalize(sample)
        if len(sample) < nlist:
            raise AnnError(f"train: need at least nlist={nlist} vectors, got {len(sample)}")
        if self.cfg.quantizer == "flat" and nlist <= TWO_LEVEL_ABOVE:
            ivf = self._new_ivf(f.IndexFlatIP(d))
            ivf.cp.niter = 10  # k-means: 10 rounds place centroids well enough for routing; 25 (default) is 2.5x slower
            ivf.train(sample)
            self._install(ivf)
        else:
            self._install(self._ivf_from_centroids(train_centroids(sample, nlist)))

    def _ivf_from_centroids(self, centroids: np.ndarray):
        """An IVF index (untouched lists) whose quantizer holds ``centroids`` (nlist, dim)."""
        f, d = self._f, self.cfg.dim
        if self.cfg.quantizer == "hnsw":
            quant = f.IndexHNSWFlat(d, self.cfg.hnsw_m, f.METRIC_INNER_PRODUCT)
            quant.hnsw.efConstruction = 40  # the graph is built once over nlist points: quality over speed
        else:
            quant = f.IndexFlatIP(d)
        quant.add(np.ascontiguousarray(centroids, dtype=np.float32))
        ivf = self._new_ivf(quant)
        ivf.is_trained = True  # (fp16 codes need no training)
        return ivf

    def _new_ivf(self, quant):
        """IVF lists over ``quant`` (FAISS's Python constructor keeps a reference to it on the IVF)."""
        f, d, nlist = self._f, self.cfg.dim, self.cfg.nlist
        if self.cfg.codec == "fp16":  # by_residual=False: codes of the vectors themselves, cosine unchanged
            return f.IndexIVFScalarQuantizer(quant, d, nlist, f.ScalarQuantizer.QT_fp16, f.METRIC_INNER_PRODUCT, False)
        return f.IndexIVFFlat(quant, d, nlist, f.METRIC_INNER_PRODUCT)

    def _install(self, ivf) -> None:
        ivf.set_direct_map_type(self._f.DirectMap.Hashtable)
        staged = self.ids()
        vecs = self._get(staged) if len(staged) else None
        self._ivf = ivf
        self._hnsw = self._f.downcast_index(ivf.quantizer) if self.cfg.quantizer == "hnsw" else None
        self.set_search_params(self.cfg.nprobe, self.cfg.ef_search)
        self._exact.reset()
        if vecs is not None:
            self._add(staged, vecs)
        self._gpu_copy = None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Retune an IVF index in place: lists probed per query, HNSW quantizer beam (see :class:`AnnConfig`).
        Recorded in ``cfg`` (so snapshots keep it). No-op for ``exact``."""
        nprobe = self.cfg.nprobe if nprobe is None else nprobe
        ef = self.cfg.ef_search if ef_search is None else ef_search
        self.cfg = replace(self.cfg, nprobe=nprobe, ef_search=ef)
        validate(self.cfg)
        if self._ivf is not None:
            self._ivf.nprobe = nprobe
        if getattr(self, "_hnsw", None) is not None:
            self._hnsw.hnsw.efSearch = self._query_ef()

    def _query_ef(self) -> int:
        return max(self.cfg.ef_search or 16, self.cfg.nprobe)

    def centroids(self) -> np.ndarray | None:
        if self._ivf is None:
            return None
        q = self._ivf.quantizer
        return q.reconstruct_n(0, q.ntotal)

    def _restore_extra(self, snap):
        if self.cfg.kind == "ivf" and "centroids" in snap and len(snap["centroids"]) == self.cfg.nlist:
            self._install(self._ivf_from_centroids(snap["centroids"]))

    def snapshot(self):
        snap = super().snapshot()
        c = self.centroids()
        if c is not None:
            snap["centroids"] = c
        return snap

    def _active(self):
        return self._ivf if self._ivf is not None else self._exact

    def _add(self, ids, vecs):
        if self._hnsw is not None:  # assignment wants 1 list: a narrow beam, then back to the query beam
            self._hnsw.hnsw.efSearch = self.cfg.ef_add
            try:
                self._ivf.add_with_ids(vecs, ids)
            finally:
                self._hnsw.hnsw.efSearch = self._query_ef()
        else:
            self._active().add_with_ids(vecs, ids)
        self._gpu_copy = None

    def upsert(self, ids, vectors, ts_ms) -> None:
        super().upsert(ids, vectors, ts_ms)
        if self.cfg.kind == "ivf" and self._ivf is None and self._exact.ntotal >= 30 * self.cfg.nlist:
            self.train(self._get(self.ids()))

    def _remove(self, ids):
        f = self._f
        if self._ivf is not None:
            sel = f.IDSelectorArray(len(ids), f.swig_ptr(ids))  # the only selector the hashtable path takes
            removed = self._ivf.remove_ids(sel)
        else:
            removed = self._exact.remove_ids(f.IDSelectorBatch(len(ids), f.swig_ptr(ids)))
        if removed != len(ids):  # the id map said they were there: FAISS and we disagree
            raise AnnError(f"remove: FAISS removed {removed} of {len(ids)} ids known to be present")
        self._gpu_copy = None

    def _search(self, q, k):
        idx = self._active()
        if self._use_gpu:
            if self._gpu_copy is None:
                f = self._f
                self._gpu_res = getattr(self, "_gpu_res", None) or f.StandardGpuResources()
                self._gpu_copy = f.index_cpu_to_gpu(self._gpu_res, 0, idx)
            idx = self._gpu_copy
        return idx.search(q, k)

    def _get(self, ids):
        return self._active().reconstruct_batch(ids)


def train_centroids(x: np.ndarray, nlist: int, niter: int = 10, seed: int = 1234) -> np.ndarray:
    """Spherical k-means centroids (nlist, dim) of unit rows ``x`` (N >= nlist, dim); two levels above
    :data:`TWO_LEVEL_ABOVE` lists (sqrt(nlist) clusters, each split in proportion to its size)."""
    f = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape

    def km(pts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k >= len(pts):
            return pts.copy(), np.arange(len(pts))
        # min_points_per_centroid=1: small sub-clusters are expected here, FAISS would warn about each
        k_means = f.Kmeans(d, k, niter=niter, spherical=True, seed=seed, min_points_per_centroid=1,
                           max_points_per_centroid=256)
        k_means.train(pts)
        return k_means.centroids, k_means.index.search(pts, 1)[1][:, 0]

    if nlist <= TWO_LEVEL_ABOVE:
        return km(x, nlist)[0]
    top, assign = km(x, int(round(np.sqrt(nlist))))
    sizes = np.bincount(assign, minlength=len(top))
    share = sizes * nlist / n
    count = np.floor(share).astype(int)
    extra = np.argsort(-(share - count), kind="stable")[: nlist - count.sum()]
    count[extra] += 1  # sums to nlist; count <= size because nlist <= n
    threads = f.omp_get_max_threads()
    f.omp_set_num_threads(1)  # thousands of tiny k-means: OpenMP barriers cost more than they share (4x here)
    try:
        parts = [km(x[assign == c], int(count[c]))[0] for c in range(len(top)) if count[c]]
    finally:
        f.omp_set_num_threads(threads)
    return normalize(np.concatenate(parts))
