"""Semantic IDs: ads coded by what their creatives say, so a new ad starts from what similar ads learned.

A randomly hashed ad id gives a new ad a row that is noise (or another ad's) until it has had enough
impressions of its own. A *semantic ID* is an L-level code ``(c_1, ..., c_L)`` from residual hierarchical
k-means over the ads' content embeddings (what a text/image encoder gives for the creative): ads with similar
content share a prefix. Its *prefix n-gram* tokens ``(c_1)``, ``(c_1, c_2)``, ..., ``(c_1, ..., c_L)`` are sparse
features whose rows collide *meaningfully*: the coarse token's row is shared by every ad of a broad content
cluster and has learned from all of them on the day a new ad is born; the full code's row is nearly the ad's own
(the Semantic ID prefix-ngram paper, Meta ads ranking; digest in the project's papers).

Codebook (:meth:`SemanticIds.fit`): level 1 is FAISS k-means with ``codes`` centroids over the content vectors;
level ``l + 1`` is k-means over the residuals ``x - C_1[c_1] - ... - C_l[c_l]`` (residual quantization: one
codebook per level shared by all parents, so ``L`` levels of ``k`` codes tell ``k^L`` cells apart with
``L * k`` centroids). Assignment is greedy, nearest centroid level by level (:meth:`SemanticIds.assign`).

Online, at birth (:meth:`SemanticIds.add`): an ad's code is assigned when its content arrives (the
``AdCreative`` record; before its first impression) and never changes with traffic. Before the first codebook
exists the contents are buffered; the codebook is fitted once ``fit_min_ads`` ads have content, and every ad
buffered so far is coded then.

Refresh keeps codes stable (:meth:`SemanticIds.refresh`): the catalogue drifts (new kinds of ads are born), so
the codebook is re-fitted now and then (every time the catalogue has grown by ``refresh_growth`` of its size at
the last fit), but a code is a row in the model's tables: renumbering codes would hand every ad another ad's
rows. So a refresh

1. warm-starts each level's k-means from the old centroids (the new ones move only as far as the data asks);
2. matches the new centroids to the old ones level by level with the Hungarian algorithm on squared distances
   (``scipy.optimize.linear_sum_assignment``): code ``j`` keeps meaning "near old centroid ``j``" even where
   k-means swapped or moved clusters;
3. lets every known ad keep its code unless it is *far* from it: an ad moves to its new nearest code only when
   that code's reconstruction error is below ``(1 - keep_margin)`` times the error of its old code under the
   new centroids. New ads are coded with the new centroids.

``changed`` after a refresh counts the ads whose code moved. Measured (tests/test_semantic_ids.py, 400 ads,
3 levels x 8 codes): a refresh on the same catalogue changes no code; after the catalogue grew by a fifth (the
new-ad surge) 13 of 400 ads changed code with ``keep_margin = 0.5`` (the default: a new code must halve the
ad's error), 89 with 0.25 -- each level's k-means moves, and the residual levels below a moved centroid move
with it.

Tokens (:meth:`SemanticIds.tokens`): the prefix of length ``j`` (1-based) is the integer
``(j << 56) | (c_1 k^(j-1) + ... + c_j)``, so prefixes of different lengths never collide and no token collides
with a raw ad id below ``2**56``; the trainer hashes them into its tables like any id (trainer/features.py).

State (:meth:`SemanticIds.state` / :meth:`SemanticIds.from_state`): tensors and numbers only (checkpoints load
with ``weights_only=True``): centroids, ids, codes, contents (for the next refresh), counters. Checkpoints carry
it and published versions carry it (serving codes the request's ads with the codebook it was trained with).

>>> rng = np.random.default_rng(0)
>>> x = np.concatenate([rng.normal(c, 0.1, (40, 4)) for c in (-3.0, 0.0, 3.0)]).astype(np.float32)
>>> s = SemanticIds(SemanticIdConfig(levels=2, codes=3, fit_min_ads=30), dim=4)
>>> s.add(np.arange(1, 121), x).shape
(120, 2)
>>> codes, known = s.codes_of(np.array([1, 41, 81, 999]))
>>> bool(codes[0, 0] == s.codes_of(np.array([2]))[0][0, 0]), bool((codes[0] != codes[2]).any()), known.tolist()
(True, True, [True, True, True, False])
>>> int(s.tokens(codes[:1])[0, 0] >> 56), int(s.tokens(codes[:1])[0, 1] >> 56)
(1, 2)
"""

from __future__ import annotations

import contextlib
import logging

import msgspec
import numpy as np

log = logging.getLogger("streamrec.semantic_ids")

TOKEN_SHIFT = 56  # prefix length in the top bits of a token; the code value below
MAX_LEVELS = 4


class SemanticIdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``levels`` x ``codes``: the code's length and the centroids per level (``codes ** levels`` cells);
    ``fit_min_ads``: contents buffered before the first codebook; ``refresh_growth``: refresh when the catalogue
    has grown by this fraction since the last fit (0: never by itself); ``keep_margin``: see the module
    docstring; ``niter``/``seed``: FAISS k-means."""

    levels: int = 3
    codes: int = 16
    fit_min_ads: int = 256
    refresh_growth: float = 0.5
    keep_margin: float = 0.5
    niter: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("levels", 1 <= self.levels <= MAX_LEVELS), ("codes", 2 <= self.codes <= 4096),
                  ("levels x codes", self.levels * np.log2(self.codes) <= TOKEN_SHIFT),
                  ("fit_min_ads", self.fit_min_ads >= 1), ("refresh_growth", self.refresh_growth >= 0),
                  ("keep_margin", 0 <= self.keep_margin < 1), ("niter", self.niter >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SemanticIdConfig.{name}: bad value (levels {self.levels}, codes {self.codes}, "
                                 f"fit_min_ads {self.fit_min_ads}, refresh_growth {self.refresh_growth}, "
                                 f"keep_margin {self.keep_margin}, niter {self.niter})")


def _nearest(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest row of ``c`` for each row of ``r``, its squared distance)."""
    d2 = (r * r).sum(1, keepdims=True) - 2.0 * r @ c.T + (c * c).sum(1)[None, :]
    a = d2.argmin(1)
    return a, np.maximum(d2[np.arange(len(r)), a], 0.0)


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None) -> np.ndarray:
    """``k`` FAISS k-means centroids of ``x`` (float32), warm-started from ``init`` when given. Fewer rows than
    ``k``: the rows themselves, repeated (a degenerate but usable codebook until more ads arrive)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        reps = np.resize(np.arange(len(x)), k)
        return x[reps].copy() if len(x) else np.zeros((k, x.shape[1]), np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    with one_faiss_thread():
        km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


@contextlib.contextmanager
def one_faiss_thread():
    """FAISS on one OpenMP thread for the duration: a codebook is small (thousands of ads x k centroids), and
    OpenMP's spinning threads made one k-means take 1.5 s instead of 0.02 s on two busy cores."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _match(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``new`` reordered so that row ``j`` is the new centroid matched to old centroid ``j`` (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = ((old[:, None, :] - new[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty_like(new)
    out[rows] = new[cols]
    return out


class SemanticIds:
    """The codebook and the code of every ad seen (see the module docstring). Not thread-safe: one owner."""

    def __init__(self, cfg: SemanticIdConfig = SemanticIdConfig(), dim: int | None = None):
        self.cfg, self.dim = cfg, dim
        self.centroids: np.ndarray | None = None  # (levels, codes, dim) float32
        self._row: dict[int, int] = {}
        self._ids = np.zeros(0, np.int64)
        self._codes = np.zeros((0, cfg.levels), np.int32)  # -1: buffered, not coded yet
        self._content = np.zeros((0, dim or 0), np.float32)
        self.n = 0
        self._sorted_n = -1  # the lookup index (:meth:`_rows_of`) is of this many ads
        self._order = self._sorted = np.zeros(0, np.int64)
        self.version = 0  # fits so far (0: no codebook yet)
        self.fitted_at = 0  # ads known at the last fit
        self.stats = {"coded_at_birth": 0, "refreshes": 0, "changed_last_refresh": 0, "lookups": 0,
                      "unknown_lookups": 0}

    # -- ads ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def fitted(self) -> bool:
        return self.centroids is not None

    def _grow(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self._ids):
            return
        cap = max(need, 2 * len(self._ids), 1024)
        for name, fill in (("_ids", 0), ("_codes", -1), ("_content", 0.0)):
            a = getattr(self, name)
            b = np.full((cap, *a.shape[1:]), fill, a.dtype)
            b[:self.n] = a[:self.n]
            setattr(self, name, b)

    def add(self, ad_ids: np.ndarray, content: np.ndarray) -> np.ndarray:
        """Register ads at birth with their content (n, dim); returns their codes (n, levels), -1 while no
        codebook exists yet. An ad already known keeps its code (its content is not re-read). May fit the first
        codebook (``fit_min_ads`` reached) or refresh it (``refresh_growth``)."""
        ad_ids = np.asarray(ad_ids, dtype=np.int64).ravel()
        content = np.asarray(content, dtype=np.float32)
        if content.ndim != 2 or len(content) != len(ad_ids):
            raise ValueError(f"SemanticIds.add: content must be (n, dim) for n = {len(ad_ids)} ids, got "
                             f"{content.shape}")
        if self.dim is None:
            self.dim = content.shape[1]
            self._content = np.zeros((0, self.dim), np.float32)
        if content.shape[1] != self.dim:
            raise ValueError(f"SemanticIds.add: content has {content.shape[1]} dims, the codebook {self.dim}")
        if not np.isfinite(content).all():
            raise ValueError("SemanticIds.add: content has NaN or infinite values")
        _, first = np.unique(ad_ids, return_index=True)  # an id given twice: its first content counts
        new = [i for i in np.sort(first).tolist() if int(ad_ids[i]) not in self._row]
        if new:
            idx = np.asarray(new, dtype=np.int64)
            self._grow(len(idx))
            rows = np.arange(self.n, self.n + len(idx))
            self._ids[rows] = ad_ids[idx]
            self._content[rows] = content[idx]
            for r, a in zip(rows.tolist(), ad_ids[idx].tolist()):
                self._row[a] = r
            self.n += len(idx)
            if self.fitted:
                self._codes[rows] = self.assign(content[idx])
                self.stats["coded_at_birth"] += len(idx)
        if not self.fitted and self.n >= self.cfg.fit_min_ads:
            self.fit()
        elif (self.fitted and self.cfg.refresh_growth > 0
              and self.n - self.fitted_at >= self.cfg.refresh_growth * max(self.fitted_at, 1)):
            self.refresh()
        return self.codes_of(ad_ids, count=False)[0]

    def codes_of(self, ad_ids: np.ndarray, count: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, levels) int32, known (n,) bool) of ``ad_ids``; -1 codes where not known (or not coded)."""
        ad_ids = np.asarray(ad_ids, dtype=np.int64).ravel()
        rows = self._rows_of(ad_ids)
        codes = np.where((rows >= 0)[:, None], self._codes[np.maximum(rows, 0)] if self.n else -1, -1)
        known = codes[:, 0] >= 0 if len(codes) else np.zeros(0, bool)
        if count:
            self.stats["lookups"] += len(ad_ids)
            self.stats["unknown_lookups"] += int((~known).sum())
        return codes.astype(np.int32), known

    def _rows_of(self, ad_ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1: unknown), vectorised: a sorted copy of the ids, rebuilt after ads were added
        (adds come in batches between training steps; lookups come with every batch)."""
        if self._sorted_n != self.n:
            self._order = np.argsort(self._ids[:self.n], kind="stable")
            self._sorted = self._ids[:self.n][self._order]
            self._sorted_n = self.n
        if not self.n:
            return np.full(len(ad_ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ad_ids), self.n - 1)
        return np.where(self._sorted[pos] == ad_ids, self._order[pos], -1)

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        """Prefix n-gram tokens (n, levels) uint64 of ``codes`` (n, levels): column ``j`` is the prefix of
        length ``j + 1`` (module docstring). Rows with a -1 code give undefined tokens: mask them."""
        c = np.maximum(np.asarray(codes, dtype=np.int64), 0).astype(np.uint64)
        out = np.empty(c.shape, np.uint64)
        v = np.zeros(len(c), np.uint64)
        k = np.uint64(self.cfg.codes)
        for j in range(c.shape[1]):
            v = v * k + c[:, j]
            out[:, j] = (np.uint64(j + 1) << np.uint64(TOKEN_SHIFT)) | v
        return out

    def ad_tokens(self, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prefix tokens (n, levels) uint64, known (n,) bool) of ``ad_ids``: what the trainer's features read."""
        codes, known = self.codes_of(ad_ids)
        return self.tokens(codes), known

    # -- codebook -----------------------------------------------------------------------------------------
    def assign(self, content: np.ndarray) -> np.ndarray:
        """Greedy residual assignment (n, levels) int32 of contents under the current codebook."""
        if self.centroids is None:
            raise ValueError("SemanticIds.assign: no codebook yet (fewer than fit_min_ads ads with content)")
        r = np.asarray(content, dtype=np.float32).copy()
        out = np.empty((len(r), self.cfg.levels), np.int32)
        for lvl in range(self.cfg.levels):
            a, _ = _nearest(r, self.centroids[lvl])
            out[:, lvl] = a
            r -= self.centroids[lvl][a]
        return out

    def _error(self, content: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Squared reconstruction error of each content under ``codes`` with the current centroids."""
        rec = sum(self.centroids[lvl][codes[:, lvl]] for lvl in range(self.cfg.levels))
        return ((content - rec) ** 2).sum(1)

    def _train(self, x: np.ndarray, warm: np.ndarray | None) -> np.ndarray:
        """Residual k-means over ``x``; with ``warm`` (the old centroids) warm-started and matched level by level."""
        cfg = self.cfg
        cents = np.zeros((cfg.levels, cfg.codes, x.shape[1]), np.float32)
        r = x.copy()
        for lvl in range(cfg.levels):
            c = _kmeans(r, cfg.codes, cfg.niter, cfg.seed + lvl, None if warm is None else warm[lvl])
            if warm is not None:
                c = _match(c, warm[lvl])
            cents[lvl] = c
            a, _ = _nearest(r, c)
            r = r - c[a]
        return cents

    def fit(self) -> None:
        """The first codebook, from every ad known so far; codes them all."""
        x = self._content[:self.n]
        self.centroids = self._train(x, None)
        self._codes[:self.n] = self.assign(x)
        self.version, self.fitted_at = 1, self.n
        log.info("semantic ids: codebook of %d x %d codes fitted on %d ads", self.cfg.levels, self.cfg.codes, self.n)

    def refresh(self) -> int:
        """Re-fit the codebook on every ad known, keeping codes stable (module docstring); returns how many
        known ads changed code."""
        if self.centroids is None:
            self.fit()
            return 0
        x = self._content[:self.n]
        old_codes = self._codes[:self.n].copy()
        self.centroids = self._train(x, self.centroids)
        best = self.assign(x)
        coded = old_codes[:, 0] >= 0
        keep = coded & (self._error(x, best) >= (1 - self.cfg.keep_margin) * self._error(x, np.maximum(old_codes, 0)))
        codes = np.where(keep[:, None], old_codes, best)
        changed = int((coded & (codes != old_codes).any(1)).sum())
        self._codes[:self.n] = codes
        self.version += 1
        self.fitted_at = self.n
        self.stats["refreshes"] += 1
        self.stats["changed_last_refresh"] = changed
        log.info("semantic ids: codebook refreshed on %d ads (version %d), %d changed code", self.n, self.version,
                 changed)
        return changed

    # -- state --------------------------------------------------------------------------------------------
    def state(self, with_content: bool = True) -> dict:
        """Tensors and numbers (checkpoint- and publish-safe). ``with_content=False`` leaves the contents out
        (a published version needs codes and centroids, not what the next refresh reads)."""
        import torch

        st = {"config": msgspec.to_builtins(self.cfg), "dim": -1 if self.dim is None else int(self.dim),
              "version": self.version, "fitted_at": self.fitted_at, "stats": dict(self.stats),
              "ids": torch.from_numpy(self._ids[:self.n].copy()),
              "codes": torch.from_numpy(self._codes[:self.n].copy()),
              "centroids": None if self.centroids is None else torch.from_numpy(self.centroids.copy())}
        if with_content:
            st["content"] = torch.from_numpy(self._content[:self.n].copy())
        return st

    @classmethod
    def from_state(cls, st: dict) -> "SemanticIds":
        cfg = msgspec.convert(st["config"], SemanticIdConfig)
        dim = int(st["dim"])
        s = cls(cfg, None if dim < 0 else dim)
        ids = st["ids"].numpy().astype(np.int64)
        s.n = len(ids)
        s._ids = ids.copy()
        s._codes = st["codes"].numpy().astype(np.int32).reshape(len(ids), cfg.levels).copy()
        content = st.get("content")
        s._content = (content.numpy().astype(np.float32).copy() if content is not None
                      else np.zeros((len(ids), max(dim, 0)), np.float32))
        s._row = {a: i for i, a in enumerate(ids.tolist())}
        s.centroids = None if st["centroids"] is None else st["centroids"].numpy().astype(np.float32).copy()
        s.version, s.fitted_at = int(st["version"]), int(st["fitted_at"])
        s.stats.update({k: int(v) for k, v in st.get("stats", {}).items()})
        return s
