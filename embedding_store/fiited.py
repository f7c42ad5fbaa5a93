"""FIITED embeddings: per-row widths learned during training, stored in size-class pools that free memory.

Each table has ``rows`` virtual slots (the trainer's hashed ids). An admitted slot's code is
``pool << 24 | physical_row``, kept with its other metadata in dense per-row arrays reached through a
vectorised hash map (:class:`embedding_store.slotmap.SlotMap`); a slot without an entry reads code 0 (pool 0,
row 0), its table's *shared* row, and costs nothing (candidates are counted in a bounded count-min sketch).
A lookup gathers the ids' codes (one map lookup) and runs one kernel (embedding_store/kernels: C++ on the CPU,
torch ops on any device) that sums every pool's rows per bag straight into the zero-padded ``(B, T*D)``
output; its backward is fused with the row-wise Adagrad update (``FiitedConfig.kernel``; ``fbgemm`` keeps the
old path: the pools as one fbgemm TBE after a routing sort, per-pool outputs padded by ``_Pad``). Every
``maintain_every`` training steps :meth:`maintain` evicts stale unimportant rows (ids seen ``admit_hits`` times
are admitted when seen), and every ``resize_every`` steps moves rows between pools under the memory budget
(weights truncated or zero-extended, momentum follows the row).

Shapes: ``indices`` (N,) int64 in [0, rows), ``offsets`` (T*B+1,), bag (t, b) at ``t*B + b``; output (B, T*D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from embedding_store import admission, importance
from embedding_store.base import Changes, SparseEmbeddings
from embedding_store.config import POOL_SHIFT, ROW_MASK, FiitedConfig, trainer_config, validate
from embedding_store.ids import validate_batch
from embedding_store.kernels import Lookup, resolve
from embedding_store.pools import EPS, SHARED, PoolSet
from embedding_store.slotmap import CountMinSketch, SlotMap, capacity_for
from streams.names import Stat

STATE_VERSION = 2  # 2: metadata per admitted slot (slot map + dense arrays) and a count-min sketch; 1: dense per slot
COUNTERS = ("admitted", "evicted", "resized", "grown", "shrunk", "rebuilds", "maintenances")
META_FIELDS = (("slot", np.int32), ("code", np.int32), ("last", np.int32), ("imp", np.float32),
               ("snap", np.float32))  # per admitted slot, dense index i: the SlotMap maps slot -> i
META_BYTES_PER_ROW = sum(np.dtype(t).itemsize for _, t in META_FIELDS)  # 20


class _Pad(torch.autograd.Function):
    """Per-pool TBE output (B, T*sum(dims)) -> zero-padded (B, T*D) (``dims[-1] == D``). Forward: the widest
    pool's slice, plus the narrower ones added into their leading columns; backward: one ``index_select`` of
    the incoming gradient by ``colmap``. (Autograd through in-place slice adds cost several copies and fills per
    step, and every extra parallel op is a chance to stall on a shared machine.)"""

    @staticmethod
    def forward(ctx, out: torch.Tensor, dims: tuple[int, ...], num_tables: int, colmap: torch.Tensor):
        b, w = out.shape[0], sum(dims)
        y = out.view(b, num_tables, w)
        padded = torch.empty(b, num_tables, dims[-1], dtype=out.dtype)
        padded.copy_(y[:, :, w - dims[-1]:])
        start = w - dims[-1]
        for d in reversed(dims[:-1]):
            start -= d
            padded[:, :, :d].add_(y[:, :, start:start + d])
        ctx.save_for_backward(colmap)
        return padded.view(b, num_tables * dims[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (colmap,) = ctx.saved_tensors
        return grad.index_select(1, colmap), None, None, None


class FiitedEmbeddings(SparseEmbeddings):
    """Variable-width embeddings behind the trainer's ``SparseEmbeddings`` interface. The pools live on ``device``
    (the slot metadata and maintenance stay on the CPU); :attr:`kernel` is the lookup path that runs."""

    def __init__(self, num_tables: int, rows: int, cfg: FiitedConfig = FiitedConfig(),
                 device: torch.device | str = "cpu"):
        super().__init__()
        validate(cfg)
        self.device = torch.device(device)
        self.kernel = resolve(cfg.kernel, self.device)  # cpp | torch | fbgemm
        self._anchor = torch.empty(0, requires_grad=True)  # joins the kernel's output to the autograd graph
        if num_tables * rows >= 2**31:
            raise ValueError(f"fiited: num_tables * rows must be < 2**31, got {num_tables} * {rows}")
        self.cfg, self.num_tables, self.rows, self.dim = cfg, num_tables, rows, cfg.dim
        self.dims = cfg.pool_dims()
        self._meta_init()  # everyone starts on the shared row
        self.steps = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pending: torch.Tensor | None = None
        caps = np.ones((num_tables, len(self.dims)), dtype=np.int64)
        caps[:, 0] = 64
        self.pools = PoolSet(caps, self.dims, cfg.lr, self.device)
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for t in range(num_tables):
                self.pools.alloc(t, 0, np.array([SHARED], dtype=np.int32))  # row 0
                self.pools.weights(t, 0)[0] = torch.empty(self.dims[0]).uniform_(-cfg.init_range, cfg.init_range,
                                                                                 generator=g).to(self.device)
        self._colmap_cache: tuple | None = None
        self._rb = importance.row_bytes(cfg.pool_chunks, cfg.chunk_dim)

    # -- lookup --------------------------------------------------------------------------------------
    def colmap(self) -> torch.Tensor:
        """(T * sum(dims),) output column of the TBE -> column in the padded (B, T*D) result."""
        w = sum(self.dims)
        base = torch.cat([torch.arange(d) for d in self.dims])  # (sum dims,)
        return (torch.arange(self.num_tables).repeat_interleave(w) * self.dim + base.repeat(self.num_tables))

    def route(self, indices: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated batch -> (pool rows (N,), TBE offsets (T*P*B+1,), global slots (N,))."""
        b = validate_batch(indices, offsets, self.num_tables, self.rows)
        bag, t, slots = self._slots(indices, offsets, b)
        return (*self._route(bag, t, self._codes(slots.numpy()), b, offsets.numel() - 1), slots)

    def _slots(self, indices: torch.Tensor, offsets: torch.Tensor, b: int):
        """(bag (N,), table (N,), global slot (N,)) of every id."""
        bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff(), output_size=indices.numel())
        t = bag // b
        return bag, t, t * self.rows + indices.long()

    def _route(self, bag: torch.Tensor, t: torch.Tensor, codes: np.ndarray, b: int, tb: int):
        P = len(self.dims)
        code = torch.from_numpy(codes).long()
        key = (t * P + (code >> POOL_SHIFT)) * b + (bag - t * b)  # TBE bag of each id: ((t*P + p)*B + b)
        key_sorted, order = torch.sort(key, stable=True)
        off = torch.zeros(tb * P + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(key_sorted, minlength=tb * P), 0, out=off[1:])
        return (code & ROW_MASK)[order], off

    def use_kernel(self, kernel: str) -> None:
        """Switch the lookup path (``cpp`` | ``torch`` | ``fbgemm`` | ``auto``; the environment is not consulted):
        every path reads and updates the same pool buffers, so a store may switch between steps."""
        self.kernel = resolve(kernel, self.device, use_env=False)

    def _prepare(self, indices: torch.Tensor, offsets: torch.Tensor):
        """Validate, admit (``admit_hits = 0``), note the slots for :meth:`step`; (B, bag, table, slots, codes) on
        the CPU, ``codes`` (N,) int32 the ids' (pool, row) codes after admission: one slot-map lookup, a second
        only when this batch admitted rows (admission may also move rows of other slots)."""
        indices, offsets = indices.cpu(), offsets.cpu()
        b = validate_batch(indices, offsets, self.num_tables, self.rows)
        bag, t, slots = self._slots(indices, offsets, b)
        s = slots.numpy()
        codes = self._codes(s)
        train = torch.is_grad_enabled()
        if train and self.cfg.admit_hits == 0:  # admit on the first training lookup
            admitted = self.counters["admitted"]
            self._admit_candidates(np.unique(s[codes == 0]))
            if self.counters["admitted"] != admitted:
                codes = self._codes(s)
        if train:
            self._pending = slots  # counted in step(): scoring (no_grad) never mutates the store
        return b, bag, t, slots, codes

    def forward_pools(self, indices: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The old path (fbgemm TBE over the pools, CPU): (per-pool outputs (B, T*sum(dims)), colmap); a consumer
        may fold the zero padding into its next linear layer (``x @ W[:, colmap]``)."""
        b, bag, t, _, codes = self._prepare(indices, offsets)
        rows, off = self._route(bag, t, codes, b, offsets.numel() - 1)
        return self.pools.tbe(rows, off), self._colmap()

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            out, _ = self.forward_pools(indices, offsets)
            return _Pad.apply(out, self.dims, self.num_tables, self._colmap())
        b, _, _, _, codes = self._prepare(indices, offsets)
        ps, dev = self.pools, self.device
        if b == 0:  # no bags at all
            return torch.zeros(0, self.num_tables * self.dim, device=dev)
        off = offsets.to(device=dev, dtype=torch.int64)  # codes gathered now: backward uses these rows
        return Lookup.apply(self._anchor, self.kernel, ps.w, ps.m, torch.from_numpy(codes).to(dev), off, ps.w_off, ps.m_off,
                            ps.dims_t, b, self.dim, ps.lr, EPS)

    def _colmap(self) -> torch.Tensor:
        if self._colmap_cache is None:
            self._colmap_cache = (self.colmap(),)
        return self._colmap_cache[0]

    # -- per-slot metadata: only admitted slots, plus a bounded sketch for candidates ---------------------
    # A slot on its table's shared row has no entry at all. An admitted slot has one entry i in dense arrays
    # (slot, code, last seen step, importance, momentum snapshot: META_BYTES_PER_ROW bytes) and one in the
    # SlotMap (slot -> i); candidates (admit_hits >= 2) are counted in a CountMinSketch. Memory therefore
    # grows with the live rows, not with the virtual slots. Entries are compacted on eviction (indices change:
    # callers look slots up again after _meta_drop).
    def _meta_init(self, cap: int = 64) -> None:
        self.slotmap = SlotMap(cap, universe=self.num_tables * self.rows)
        self._n = 0
        self._meta = {k: np.zeros(cap, dtype=t) for k, t in META_FIELDS}
        cfg = self.cfg
        self.sketch = CountMinSketch(cfg.sketch_width, cfg.sketch_depth) if cfg.admit_hits >= 2 else None

    def _meta_append(self, slots: np.ndarray, codes: np.ndarray) -> None:
        """New entries for not-yet-admitted ``slots`` (K,): ``codes``, seen now, importance 0."""
        n, k = self._n, len(slots)
        if n + k > len(self._meta["slot"]):
            cap = int(np.ceil((n + k) * (1 + self.cfg.headroom))) + 64
            self._meta = {f: np.concatenate([a[:n], np.zeros(cap - n, dtype=a.dtype)]) for f, a in self._meta.items()}
        m = self._meta
        m["slot"][n:n + k], m["code"][n:n + k], m["last"][n:n + k] = slots, codes, self.steps
        m["imp"][n:n + k] = m["snap"][n:n + k] = 0.0
        self.slotmap.put(slots, np.arange(n, n + k))
        self._n = n + k

    def _meta_drop(self, slots: np.ndarray) -> None:
        """Remove the entries of admitted ``slots``; the rest are packed (order kept) and re-indexed."""
        if not len(slots):
            return
        keep = np.ones(self._n, dtype=bool)
        i = self.slotmap.get(slots)
        keep[i[i >= 0]] = False
        n = int(keep.sum())
        cap = int(np.ceil(n * (1 + self.cfg.headroom))) + 64
        new = {f: np.zeros(cap, dtype=a.dtype) for f, a in self._meta.items()}
        for f, a in self._meta.items():
            new[f][:n] = a[: self._n][keep]
        self._meta, self._n = new, n
        self.slotmap = SlotMap(capacity_for(n), universe=self.num_tables * self.rows)
        self.slotmap.put(new["slot"][:n], np.arange(n))

    def _idx(self, slots: np.ndarray) -> np.ndarray:
        """Dense index (K,) int64 of global ``slots`` (K,); -1 for slots on the shared row."""
        return self.slotmap.get(slots).astype(np.int64)

    def _codes(self, slots: np.ndarray) -> np.ndarray:
        """Codes (K,) int32 of global ``slots``: ``pool << 24 | row``, 0 for the shared row."""
        i = self._idx(slots)
        return np.where(i >= 0, self._meta["code"][np.maximum(i, 0)], 0).astype(np.int32)

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """(admitted slots sorted (L,) int64, their dense indices (L,))."""
        s = self._meta["slot"][: self._n].astype(np.int64)
        order = np.argsort(s, kind="stable")
        return s[order], order

    @property
    def code(self) -> torch.Tensor:
        """Dense (T * rows,) int32 view of every slot's code (0: shared row); O(T * rows), for tests/serving."""
        out = np.zeros(self.num_tables * self.rows, dtype=np.int32)
        out[self._meta["slot"][: self._n]] = self._meta["code"][: self._n]
        return torch.from_numpy(out)

    def importance(self, slots: np.ndarray) -> np.ndarray:
        """Importance (K,) float32 of global ``slots`` (0 for the shared row's)."""
        i = self._idx(np.asarray(slots, dtype=np.int64))
        return np.where(i >= 0, self._meta["imp"][np.maximum(i, 0)], 0.0).astype(np.float32)

    def set_importance(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Overwrite the importance of admitted ``slots`` (others ignored); for tests and warm starts."""
        i = self._idx(np.asarray(slots, dtype=np.int64))
        self._meta["imp"][i[i >= 0]] = np.asarray(values, dtype=np.float32)[i >= 0]

    def seen_counts(self, slots: np.ndarray) -> np.ndarray:
        """Sightings (K,) of not-admitted ``slots`` as the admission sketch estimates them (zeros without one)."""
        if self.sketch is None:
            return np.zeros(len(slots), dtype=np.int64)
        return self.sketch.estimate(slots)

    # -- training bookkeeping ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """After backward (the TBE already updated weights): count hits/recency; maintain periodically."""
        if self._pending is None:
            return
        slots, self._pending = self._pending, None
        s = slots.numpy()
        idx = self._idx(s)
        adm = idx >= 0
        if self._changed is not None:  # trained: private rows of these slots, shared rows of their tables
            self._shared_changed[torch.unique(slots[torch.from_numpy(~adm)] // self.rows)] = True
            self._note_slots(slots[torch.from_numpy(adm)])
        self.steps += 1
        self._meta["last"][idx[adm]] = self.steps
        cand = s[~adm]
        if self.sketch is not None:
            self.sketch.add(cand)
            if self.steps % self.cfg.ttl_steps == 0:
                self.sketch.halve()  # sightings older than about ttl_steps fade
        if self.cfg.admit_hits > 0:  # (admit_hits = 0: admitted in forward already, or no room)
            self._admit_seen(cand)
        if self.steps % self.cfg.maintain_every == 0:
            self.maintain()

    def budget_bytes(self, extra_rows: int = 0) -> float:
        """Private-row bytes allowed: ``budget`` of full fixed tables, and with ``live_budget`` at most that
        fraction of the full-width bytes of the admitted rows (plus ``extra_rows`` about to be admitted)."""
        b = self.cfg.budget * self.num_tables * self.rows * (self.dim + 1) * 4
        if self.cfg.live_budget > 0:
            b = min(b, self.cfg.live_budget * (self._n + extra_rows) * float(self._rb[-1]))
        return b

    def _momentum_of(self, slots: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Row-wise momentum (K,) of private ``slots`` with ``codes``: one gather from the flat momentum buffer."""
        tp = (slots // self.rows) * len(self.dims) + (codes >> POOL_SHIFT)
        flat = self.pools.momentum_offsets()[tp] + (codes & ROW_MASK)
        return self.pools.m.cpu().numpy()[flat]

    def _groups(self, *keys: np.ndarray):
        """Yield ``(*key values, positions)`` per distinct key tuple (small ints), sorted; vectorised."""
        k = np.zeros(len(keys[0]), dtype=np.int64)
        for a in keys:
            k = k * 256 + a
        order = np.argsort(k, kind="stable")
        ks = k[order]
        cuts = np.flatnonzero(np.diff(ks)) + 1
        for part in np.split(order, cuts):
            if len(part):
                yield (*(int(a[part[0]]) for a in keys), part)

    @torch.no_grad()
    def maintain(self) -> None:
        """Importance refresh, TTL eviction (floor-protected), resize under the budget. (Candidates are
        admitted when seen: a slot denied for lack of room is tried again on its next lookup.)"""
        cfg, c, m = self.cfg, self.counters, self._meta
        c["maintenances"] += 1
        live, li = self._live()
        mom = self._momentum_of(live, m["code"][li].astype(np.int64))
        imp = importance.update_importance(m["imp"][li], mom, m["snap"][li], cfg.decay)
        m["imp"][li], m["snap"][li] = imp, mom
        # eviction: stale and below the floor
        ev, _ = admission.evict_mask(m["last"][li], self.steps, cfg.ttl_steps, imp, np.ones(len(live), bool),
                                     cfg.protect_quantile)
        rb = self._rb
        max_rows = int(self.budget_bytes() // rb[0])
        keep, kimp = live[~ev], imp[~ev]
        if len(keep) > max_rows:  # even at the smallest width the live rows overflow: drop the least important
            order = np.argsort(-kimp, kind="stable")
            ev_extra = keep[order[max_rows:]]
            sel = np.sort(order[:max_rows])
            keep, kimp = keep[sel], kimp[sel]
        else:
            ev_extra = np.zeros(0, dtype=np.int64)
        self._evict(np.concatenate([live[ev], ev_extra]))
        # resize
        if self.steps % cfg.resize_every == 0 and len(keep):
            cur = self._codes(keep).astype(np.int64) >> POOL_SHIFT
            tgt = importance.assign_pools(kimp, cfg.pool_chunks, cfg.chunk_dim,
                                          self.budget_bytes() * cfg.resize_fill, power=cfg.importance_power)
            mv = tgt != cur
            self._move(keep[mv], tgt[mv])
            c["resized"] += int(mv.sum())
            c["grown"] += int((tgt[mv] > cur[mv]).sum())
            c["shrunk"] += int((tgt[mv] < cur[mv]).sum())

    def _private_rows(self) -> np.ndarray:
        """(P,) private rows per width class, from the pools' live counts (no scan over the slots)."""
        live = self.pools.live_p.copy()
        live[0] -= self.num_tables  # the shared rows
        return live

    def _private_bytes(self) -> int:
        """Bytes of the private rows (weights + momentum)."""
        return int((self._private_rows() * self._rb).sum())

    def _admit_seen(self, cand: np.ndarray) -> None:
        """Per step: not-admitted slots of this batch (``cand``) seen ``admit_hits`` times get their own row."""
        cand = np.unique(cand)
        if self.sketch is not None:
            cand = cand[self.sketch.estimate(cand) >= self.cfg.admit_hits]
        self._admit_candidates(cand)

    def _admit_candidates(self, cand: np.ndarray) -> None:
        """Admit sorted slots ``cand``: most-seen first, in the pool :func:`admission.admit_plan` picks."""
        if not len(cand):
            return
        order = np.argsort(-self.seen_counts(cand), kind="stable")
        pool, k = admission.admit_plan(len(cand), self.budget_bytes(len(cand)) - self._private_bytes(), self._rb)
        self._admit(np.sort(cand[order[:k]]), int(pool))

    def _apply(self, remap) -> None:
        if remap is not None:
            self.counters["rebuilds"] += 1
            slots, codes = remap
            self._meta["code"][self._idx(slots)] = codes.astype(np.int32)

    def _need(self, slots: np.ndarray, pools: np.ndarray) -> np.ndarray:
        need = np.zeros((self.num_tables, len(self.dims)), dtype=np.int64)
        np.add.at(need, (slots // self.rows, pools), 1)
        return need

    def _evict(self, slots: np.ndarray) -> None:
        if not len(slots):
            return
        codes = self._codes(slots).astype(np.int64)
        self._free(slots, codes)
        self._note_slots(torch.from_numpy(slots))  # back on the shared row
        self._meta_drop(slots)
        self.counters["evicted"] += len(slots)
        self._apply(self.pools.reserve(np.zeros_like(self.pools.caps), self.cfg.headroom))

    def _free(self, slots: np.ndarray, codes: np.ndarray) -> None:
        for tt, pp, m in self._groups(slots // self.rows, codes >> POOL_SHIFT):
            self.pools.release(tt, pp, (codes[m] & ROW_MASK).astype(np.int32))

    def _move(self, slots: np.ndarray, tgt: np.ndarray) -> None:
        """Move ``slots`` to pools ``tgt``: keep min(old, new) columns, zero the rest; momentum follows."""
        if not len(slots):
            return
        self._apply(self.pools.reserve(self._need(slots, tgt), self.cfg.headroom))
        codes = self._codes(slots).astype(np.int64)
        idx = self._idx(slots)
        t, src = slots // self.rows, codes >> POOL_SHIFT
        new_codes = np.zeros(len(slots), dtype=np.int64)
        for tt, sp, dp, m in self._groups(t, src, tgt):
            old_rows = torch.from_numpy(codes[m] & ROW_MASK)
            new_rows = self.pools.alloc(tt, dp, slots[m].astype(np.int32))
            k = min(self.dims[sp], self.dims[dp])
            w = self.pools.weights(tt, dp)
            nr = torch.from_numpy(new_rows.astype(np.int64))
            w[nr] = 0.0
            w[nr, :k] = self.pools.weights(tt, sp)[old_rows, :k]
            mom = self.pools.momentum(tt, sp)[old_rows]
            if dp > sp:  # grown: the new chunks need a fresh learning rate (the old ones get a boost too)
                mom = mom * np.float32(self.cfg.grow_momentum)
            self.pools.momentum(tt, dp)[nr] = mom
            new_codes[m] = (dp << POOL_SHIFT) | new_rows.astype(np.int64)
            self._meta["snap"][idx[m]] = mom.cpu().numpy()  # importance counts gradient energy from here on
        self._free(slots, codes)
        self._meta["code"][idx] = new_codes.astype(np.int32)
        self._note_slots(torch.from_numpy(slots))  # width changed (columns truncated or zero-extended)

    def _admit(self, slots: np.ndarray, pool: int = 0) -> None:
        """Private rows in ``pool`` for ``slots``: :func:`admission.init_rows` values, except that an id which
        already trained the shared row (``admit_hits > 0``) starts its first chunk from it; momentum 0."""
        if not len(slots):
            return
        self._apply(self.pools.reserve(self._need(slots, np.full(len(slots), pool, np.int64)), self.cfg.headroom))
        t = slots // self.rows
        new_codes = np.zeros(len(slots), dtype=np.int64)
        d0, cfg = self.dims[0], self.cfg
        init = torch.from_numpy(admission.init_rows(slots, self.dims[pool], self.dim, cfg.init_range, cfg.seed))
        for tt, m in self._groups(t):
            rows = self.pools.alloc(tt, pool, slots[m].astype(np.int32))
            w = self.pools.weights(tt, pool)
            nr = torch.from_numpy(rows.astype(np.int64))
            w[nr] = init[torch.from_numpy(m)].to(w.device)
            if cfg.admit_hits > 0:
                w[nr, :d0] = self.pools.weights(tt, 0)[0].clone()
            self.pools.momentum(tt, pool)[nr] = 0.0
            new_codes[m] = (pool << POOL_SHIFT) | rows.astype(np.int64)
        self._meta_append(slots, new_codes.astype(np.int32))
        self._note_slots(torch.from_numpy(slots))  # off the shared row, onto its own
        self.counters["admitted"] += len(slots)

    @torch.no_grad()
    def place(self, slots: np.ndarray, pools: np.ndarray) -> None:
        """Give global ``slots`` (K,) private rows in pool indices ``pools`` (K,) now (admitting where needed);
        for warm starts and benchmarks that need a given width mix."""
        slots = np.asarray(slots, dtype=np.int64)
        new = slots[self._codes(slots) == 0]
        self._admit(np.unique(new))
        cur = self._codes(slots).astype(np.int64) >> POOL_SHIFT
        mv = cur != pools
        self._move(slots[mv], np.asarray(pools, dtype=np.int64)[mv])
        self.compact()

    def compact(self) -> None:
        """Rebuild every pool at ``live * (1 + headroom)`` rows (frees the slack for real)."""
        live = self.pools.live_rows()
        self._apply(self.pools.rebuild(np.maximum(np.ceil(live * (1 + self.cfg.headroom)).astype(np.int64), 1)))

    # -- introspection (shared with the reference twin) ----------------------------------------------
    def chunks(self, t: int, v: int) -> int:
        """Chunks of slot (t, v): 0 when it still uses the shared row."""
        c = int(self._codes(np.array([t * self.rows + v]))[0])
        return 0 if c == 0 else self.cfg.pool_chunks[c >> POOL_SHIFT]

    def row(self, t: int, v: int) -> np.ndarray:
        """The (D,) vector slot (t, v) looks up (zero-padded)."""
        return self.vectors(np.array([t * self.rows + v]))[0].numpy()

    @torch.no_grad()
    def vectors(self, slots: np.ndarray) -> torch.Tensor:
        """(K, D) vectors that global ``slots`` (K,) look up: each slot's row (the table's shared row until it is
        admitted), zero-padded to D; one gather per (table, pool)."""
        codes = self._codes(np.asarray(slots, dtype=np.int64)).astype(np.int64)
        out = torch.zeros(len(slots), self.dim)
        for t, p, m in self._groups(slots // self.rows, codes >> POOL_SHIFT):
            rows = torch.from_numpy(codes[m] & ROW_MASK)
            out[torch.from_numpy(m), : self.dims[p]] = self.pools.weights(t, p)[rows].cpu()
        return out

    def row_momentum(self, t: int, v: int) -> float:
        c = int(self._codes(np.array([t * self.rows + v]))[0])
        return float(self.pools.momentum(t, c >> POOL_SHIFT)[c & ROW_MASK])

    # -- change tracking and the serving layout (trainer/publish.py) ----------------------------------
    # A slot's serving vector changes when its private row trains, when it is admitted, evicted or resized,
    # and, while it reads its table's shared row, whenever that row trains (any not-admitted id of the
    # table in a batch). The store knows each of these events, so it reports them (Changes.slots and
    # Changes.shared_tables) instead of a publisher diffing (T, R, D) serving states every version: a
    # trained shared row then costs one vector per table in a delta, not every slot reading it. Pool
    # rebuilds move rows but keep every slot's vector, so they are not changes.
    def track_changes(self) -> None:
        super().track_changes()
        self._shared_changed = torch.zeros(self.num_tables, dtype=torch.bool)

    def take_changes(self) -> Changes | None:
        ch = super().take_changes()
        if ch is None:
            return None
        shared = torch.nonzero(self._shared_changed).view(-1).numpy().astype(np.int64)
        self._shared_changed.zero_()
        return Changes(ch.slots, shared)

    @torch.no_grad()
    def serving_rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        slots = np.asarray(slots, dtype=np.int64)
        widths = np.asarray(self.dims, dtype=np.int16)[self._codes(slots) >> POOL_SHIFT]
        return self.vectors(slots), torch.from_numpy(widths)

    def serving_shared(self) -> np.ndarray:
        return self.code.numpy() == 0  # dense (T * rows,): the serving layout is dense anyway

    @torch.no_grad()
    def shared_rows(self, tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(len(tables), self.dim)
        for i, t in enumerate(np.asarray(tables, dtype=np.int64).tolist()):
            out[i, : self.dims[0]] = self.pools.weights(t, 0)[0].cpu()  # row 0 of pool 0: the shared row
        return out, torch.full((len(tables),), self.dims[0], dtype=torch.int16)

    # -- state ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_state(self) -> dict[str, torch.Tensor]:
        st = {f"pools.{k}": v for k, v in self.pools.export().items()}
        live, li = self._live()  # entries in slot order: the same state whatever the insertion history
        st.update({"fiited_version": torch.tensor(STATE_VERSION),
                   **{f"meta.{f}": torch.from_numpy(a[li].copy()) for f, a in self._meta.items()},
                   "sketch": torch.from_numpy(self.sketch.table.copy() if self.sketch is not None
                                              else np.zeros((0, 0), np.uint8)),
                   "steps": torch.tensor(self.steps),
                   "counters": torch.tensor([self.counters[k] for k in COUNTERS], dtype=torch.int64),
                   "shape": torch.tensor([self.num_tables, self.rows, self.dim, *self.cfg.pool_chunks])})
        return st

    @torch.no_grad()
    def serving_state(self) -> dict[str, torch.Tensor]:
        """Every slot's vector padded to D (T, R, D) and the width of the row it reads (T, R): the layout the
        fixed-width backends export, so one serving export (and loader) serves every backend; a not-admitted
        slot carries its table's shared row."""
        t, r = self.num_tables, self.rows
        code = self.code.numpy()
        widths = np.asarray(self.dims, dtype=np.int16)[code >> POOL_SHIFT]
        return {"weights": self.vectors(np.arange(t * r)).view(t, r, self.dim),
                "widths": torch.from_numpy(widths).view(t, r)}

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        if "fiited_version" not in state:
            raise ValueError("fiited: checkpoint holds fixed-width tables (backend fbgemm/torch), "
                             "not a fiited store; start fresh or use that backend")
        want = [self.num_tables, self.rows, self.dim, *self.cfg.pool_chunks]
        if state["shape"].tolist() != want:
            raise ValueError(f"fiited state: expected (tables, rows, dim, *pool_chunks) = {want}, "
                             f"got {state['shape'].tolist()}")
        self.pools = PoolSet.restore({k[6:]: v for k, v in state.items() if k.startswith("pools.")},
                                     self.dims, self.cfg.lr, self.device)
        if int(state["fiited_version"]) == 1:
            state = _state_v1_to_v2(state)
        elif int(state["fiited_version"]) != STATE_VERSION:
            raise ValueError(f"fiited state: version {int(state['fiited_version'])} is not one this store reads "
                             f"(1 or {STATE_VERSION}); written by a newer streamrec?")
        self._meta_init()
        n = len(state["meta.slot"])
        self._meta_append(state["meta.slot"].numpy().astype(np.int64), state["meta.code"].numpy())
        for f, _ in META_FIELDS:
            self._meta[f][:n] = state[f"meta.{f}"].numpy()
        sk = state["sketch"].numpy()
        if self.sketch is not None and "v1_hits.slot" in state:  # converted from version 1
            self.sketch.add(state["v1_hits.slot"].numpy(), state["v1_hits.n"].numpy())
        elif self.sketch is not None:
            if sk.shape == self.sketch.table.shape:
                self.sketch.table[...] = sk
            elif sk.size:
                raise ValueError(f"fiited state: admission sketch {sk.shape} but this store's is "
                                 f"{self.sketch.table.shape} (trainer.fiited.sketch_width/sketch_depth changed?)")
        self.steps = int(state["steps"])
        self.counters = dict(zip(COUNTERS, state["counters"].tolist()))
        self._pending = None
        self._note_import()

    def memory_report(self) -> dict[str, float]:
        """Gauges for ``ServiceStats.values``: bytes per pool, live rows per width, totals and counters (from the
        pools' counts: no scan over the slots, cheap enough for every step). ``fiited_meta_bytes`` is every
        byte of bookkeeping: the slot map, the per-row arrays (capacity), the admission sketch and the pools'
        owner (int32 per physical row) and free lists (int32 per free row)."""
        per_pool = self._private_rows()
        pool_bytes = self.pools.nbytes()
        n_phys = int(self.pools.caps.sum())
        map_b, rows_b = self.slotmap.nbytes, META_BYTES_PER_ROW * len(self._meta["slot"])
        sketch_b = self.sketch.nbytes if self.sketch is not None else 0
        n_free = sum(len(f) for ts in self.pools.free for f in ts)
        meta = map_b + rows_b + sketch_b + 4 * (n_phys + n_free)  # + the pools' owner (per row) and free lists
        fixed = self.num_tables * self.rows * (self.dim + 1) * 4
        out: dict[str, float] = {}
        for p, d in enumerate(self.dims):
            out[f"fiited_pool_bytes_d{d}"] = float(pool_bytes[p])
            out[f"fiited_rows_d{d}"] = float(per_pool[p])
            # the names every backend reports (SparseEmbeddings.memory_report): the dashboards read these
            out[f"{Stat.EMBEDDING_BYTES_PREFIX}{d}"] = float(pool_bytes[p])
            out[f"{Stat.EMBEDDING_ROWS_PREFIX}{d}"] = float(per_pool[p])
        total = float(pool_bytes.sum() + meta)
        out.update({"fiited_shared_rows": float(self.num_tables), "fiited_meta_bytes": float(meta),
                    "fiited_map_bytes": float(map_b), "fiited_row_meta_bytes": float(rows_b),
                    "fiited_sketch_bytes": float(sketch_b), "fiited_admitted_rows": float(self._n),
                    "fiited_total_bytes": total, "fiited_fixed_bytes": float(fixed),
                    "fiited_memory_ratio": total / fixed, "fiited_steps": float(self.steps),
                    **{f"fiited_{k}": float(v) for k, v in self.counters.items()}})
        return out


def _state_v1_to_v2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A version-1 export (dense per-slot ``code/hits/last_seen/imp/snap``) in the version-2 layout: entries for
    the admitted slots only, and the not-admitted slots' hits folded into an admission sketch on import
    (saturating at 255) -- the sketch is rebuilt here as a list of (slot, hits) so its shape can follow the
    importing store's config."""
    code = state["code"].numpy()
    live = np.flatnonzero(code != 0)
    out = {k: v for k, v in state.items() if k not in ("code", "hits", "last_seen", "imp", "snap")}
    out.update({"meta.slot": torch.from_numpy(live.astype(np.int32)), "meta.code": torch.from_numpy(code[live]),
                "meta.last": torch.from_numpy(state["last_seen"].numpy()[live].astype(np.int32)),
                "meta.imp": torch.from_numpy(state["imp"].numpy()[live]),
                "meta.snap": torch.from_numpy(state["snap"].numpy()[live]),
                "sketch": torch.zeros((0, 0), dtype=torch.uint8), "fiited_version": torch.tensor(STATE_VERSION)})
    hits = state["hits"].numpy()
    cand = np.flatnonzero((code == 0) & (hits > 0))
    out["v1_hits.slot"], out["v1_hits.n"] = torch.from_numpy(cand), torch.from_numpy(hits[cand].astype(np.int64))
    return out


def fiited_for_trainer(num_tables: int, rows: int, dim: int, lr: float, device: torch.device,
                       overrides: Mapping[str, Any] | None = None) -> FiitedEmbeddings:
    """The trainer's ``backend=fiited``: :func:`config.trainer_config` (chunks making up ``dim``, ``lr``, then
    ``overrides`` = ``TrainerConfig.fiited``), pools on ``device`` (CUDA: the torch kernel path). Errors name
    ``trainer.fiited.<field>``."""
    return FiitedEmbeddings(num_tables, rows, trainer_config(overrides, dim, lr), device)
