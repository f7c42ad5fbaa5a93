"""Size-class pools: T tables x P widths in one flat weight buffer (fbgemm's TBE layout), with free lists,
growth and compaction.

Pool ``(t, p)`` is table ``t*P + p`` of the flat buffers: ``caps[t, p]`` physical rows of ``dims[p]`` float32
columns (``w`` from ``w_off[t*P+p]``) plus one row-wise Adagrad momentum each (``m`` from ``m_off[t*P+p]``), on
``device``. The FIITED kernels (embedding_store/kernels) read and update these buffers; :attr:`tbe` (the old
path, CPU only) is an fbgemm TBE built on demand whose weight and momentum parameters alias them.
``owner[t][p][row]`` is the virtual slot living in that row (``-1`` free, ``SHARED`` for row 0 of pool 0: the
table's shared row for not-yet-admitted ids). Rebuilding (grow or compact) allocates new buffers and copies live
rows, so the old buffers are really freed; rows keep their slot (the caller rewrites its slot map from the
returned ``(slots, codes)``)::

    tables:  (t0,p0) (t0,p1) ... (t0,pP-1) (t1,p0) ...      output columns in the same order, widths dims[p]
"""

from __future__ import annotations

import numpy as np
import torch

from embedding_store.config import POOL_SHIFT

SHARED = -2
FREE = -1
EPS = 1e-8


def make_tbe(caps: np.ndarray, dims: tuple[int, ...], lr: float):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode,
        ComputeDevice,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    specs = [(int(caps[t, p]), dims[p], EmbeddingLocation.HOST, ComputeDevice.CPU)
             for t in range(caps.shape[0]) for p in range(caps.shape[1])]
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=EPS,
        pooling_mode=PoolingMode.SUM, device=torch.device("cpu"),
        # rows come from the slot map, in range by construction (raw input is checked by ids.validate_batch)
        bounds_check_mode=BoundsCheckMode.NONE)


class PoolSet:
    """The physical storage. ``caps`` (T, P) int64 >= 1; weights start at zero (the caller initialises)."""

    def __init__(self, caps: np.ndarray, dims: tuple[int, ...], lr: float, device: torch.device | str = "cpu"):
        self.dims, self.lr, self.device = tuple(dims), lr, torch.device(device)
        self.dims_t = torch.tensor(self.dims, dtype=torch.int64, device=self.device)
        self.T, self.P = caps.shape
        self._build(caps.astype(np.int64))
        self.n_live = 0  # rows in use over all pools (kept so per-step admission needs no scan)
        self.live_p = np.zeros(self.P, dtype=np.int64)  # rows in use per width class, all tables
        self.owner = [[np.full(int(caps[t, p]), FREE, dtype=np.int32) for p in range(self.P)]
                      for t in range(self.T)]
        # free rows as stacks (pop from the end): lowest rows are reused first
        self.free = [[np.arange(int(caps[t, p]) - 1, -1, -1, dtype=np.int32) for p in range(self.P)]
                     for t in range(self.T)]

    def _build(self, caps: np.ndarray) -> None:
        self.caps = caps
        n = caps.reshape(-1)
        d = np.tile(np.asarray(self.dims, dtype=np.int64), self.T)
        self._w_off = np.concatenate([[0], np.cumsum(n * d)]).astype(np.int64)
        self._mom_off = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        self.w = torch.zeros(int(self._w_off[-1]), dtype=torch.float32, device=self.device)
        self.m = torch.zeros(int(self._mom_off[-1]), dtype=torch.float32, device=self.device)
        self.w_off = torch.from_numpy(self._w_off[:-1].copy()).to(self.device)
        self.m_off = torch.from_numpy(self._mom_off[:-1].copy()).to(self.device)
        self._tbe = None

    @property
    def tbe(self):
        """fbgemm TBE over the same buffers (the old path; built on first use, CPU only)."""
        if self._tbe is None:
            if self.device.type != "cpu":
                raise ValueError(f"fiited: the fbgemm path uses host pools, not device {self.device}")
            tbe = make_tbe(self.caps, self.dims, self.lr)
            if tbe.weights_host.shape != self.w.shape or tbe.momentum1_host.shape != self.m.shape:
                raise RuntimeError("fiited: fbgemm's TBE layout differs from the pools' flat layout")
            tbe.weights_host = torch.nn.Parameter(self.w)  # shares storage: updates land in self.w / self.m
            tbe.momentum1_host = torch.nn.Parameter(self.m)
            self._tbe = tbe
        return self._tbe

    # -- views ---------------------------------------------------------------------------------------
    def weights(self, t: int, p: int) -> torch.Tensor:
        """(caps[t,p], dims[p]) view of the live weights."""
        tp = t * self.P + p
        off, d = int(self._w_off[tp]), self.dims[p]
        return self.w[off: off + int(self.caps[t, p]) * d].view(-1, d)

    def momentum_offsets(self) -> np.ndarray:
        """(T*P,) start of pool (t, p)'s momentum in the flat ``m`` (row r at start + r)."""
        return self._mom_off[:-1]

    def momentum(self, t: int, p: int) -> torch.Tensor:
        tp = t * self.P + p
        off = int(self._mom_off[tp])
        return self.m[off: off + int(self.caps[t, p])]

    def live_rows(self) -> np.ndarray:
        """(T, P) rows in use (the shared rows included)."""
        return np.array([[int((self.owner[t][p] != FREE).sum()) for p in range(self.P)] for t in range(self.T)])

    def nbytes(self) -> np.ndarray:
        """(P,) bytes held by each width class (capacity, not only live rows): weights + momentum."""
        return np.array([int(self.caps[:, p].sum()) * 4 * (self.dims[p] + 1) for p in range(self.P)])

    # -- allocation ----------------------------------------------------------------------------------
    def alloc(self, t: int, p: int, slots: np.ndarray) -> np.ndarray:
        """Rows for ``slots`` (K,) in pool (t, p), popped from its free list (call :meth:`reserve` first)."""
        k = len(slots)
        st = self.free[t][p]
        if k > len(st):
            raise RuntimeError(f"pool ({t}, {p}): {k} rows wanted, {len(st)} free (reserve() first)")
        rows = st[len(st) - k:][::-1].copy()
        self.free[t][p] = st[: len(st) - k]
        self.owner[t][p][rows] = slots
        self.n_live += k
        self.live_p[p] += k
        return rows

    @torch.no_grad()
    def release(self, t: int, p: int, rows: np.ndarray) -> None:
        """Return ``rows`` to the free list, zeroing their weights and momentum (no stale data survives)."""
        if not len(rows):
            return
        idx = torch.from_numpy(rows.astype(np.int64)).to(self.device)
        self.weights(t, p)[idx] = 0.0
        self.momentum(t, p)[idx] = 0.0
        self.owner[t][p][rows] = FREE
        self.n_live -= len(rows)
        self.live_p[p] -= len(rows)
        self.free[t][p] = np.concatenate([self.free[t][p], np.sort(rows)[::-1].astype(np.int32)])

    def reserve(self, need: np.ndarray, headroom: float, shrink_below: float = 0.25
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """Make sure pool (t,p) has ``need[t,p]`` free rows; also compact pools used below ``shrink_below``.

        Returns ``(slots, codes)`` whose slot-map entries must be rewritten when a rebuild moved rows, else None.
        """
        live = self.live_rows()
        free = np.array([[len(self.free[t][p]) for p in range(self.P)] for t in range(self.T)])
        grow = need > free
        target = np.maximum(np.ceil((live + need) * (1 + headroom)).astype(np.int64), 1)
        shrink = (live + need) < shrink_below * self.caps
        shrink &= (self.caps - target) > 64  # not worth a rebuild for a few rows
        if not (grow.any() or shrink.any()):
            return None
        # grow to live * (1 + headroom), not by doubling: capacity is the memory we report (rebuilds stay
        # amortised: each one buys ``headroom`` of growth)
        caps = np.where(grow, target, np.where(shrink, target, self.caps))
        return self.rebuild(caps)

    @torch.no_grad()
    def rebuild(self, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New buffers with capacities ``caps``; live rows packed to the front of each pool in row order
        (row 0 stays row 0, so shared rows stay put). Returns ``(slots, codes)`` of every private row."""
        old_w = [[self.weights(t, p) for p in range(self.P)] for t in range(self.T)]
        old_m = [[self.momentum(t, p) for p in range(self.P)] for t in range(self.T)]
        old_owner = self.owner
        self._build(caps.astype(np.int64))
        slots, codes = [], []
        self.owner = [[None] * self.P for _ in range(self.T)]
        self.free = [[None] * self.P for _ in range(self.T)]
        for t in range(self.T):
            for p in range(self.P):
                rows = np.flatnonzero(old_owner[t][p] != FREE)
                n, cap = len(rows), int(caps[t, p])
                if n > cap:
                    raise RuntimeError(f"pool ({t}, {p}): rebuild to {cap} rows but {n} are live")
                idx = torch.from_numpy(rows).to(self.device)
                self.weights(t, p)[:n] = old_w[t][p][idx]
                self.momentum(t, p)[:n] = old_m[t][p][idx]
                own = np.full(cap, FREE, dtype=np.int32)
                own[:n] = old_owner[t][p][rows]
                self.owner[t][p] = own
                self.free[t][p] = np.arange(cap - 1, n - 1, -1, dtype=np.int32)
                priv = own[:n] >= 0
                slots.append(own[:n][priv].astype(np.int64))
                codes.append((p << POOL_SHIFT) | np.flatnonzero(priv).astype(np.int64))
        return np.concatenate(slots), np.concatenate(codes)

    # -- checkpoint ----------------------------------------------------------------------------------
    def export(self) -> dict[str, torch.Tensor]:
        free_lens = [len(self.free[t][p]) for t in range(self.T) for p in range(self.P)]
        return {"caps": torch.from_numpy(self.caps.copy()),
                "weights": self.w.detach().cpu().clone(),
                "momentum": self.m.detach().cpu().clone(),
                "owner": torch.from_numpy(np.concatenate([o for ts in self.owner for o in ts])),
                "free": torch.from_numpy(np.concatenate([f for ts in self.free for f in ts])),
                "free_lens": torch.tensor(free_lens, dtype=torch.int64)}

    @classmethod
    @torch.no_grad()
    def restore(cls, st: dict[str, torch.Tensor], dims: tuple[int, ...], lr: float,
                device: torch.device | str = "cpu") -> "PoolSet":
        caps = st["caps"].numpy().astype(np.int64)
        ps = cls(caps, dims, lr, device)
        if ps.w.shape != st["weights"].shape or ps.m.shape != st["momentum"].shape:
            raise ValueError(f"fiited pools: weights {tuple(st['weights'].shape)} / momentum "
                             f"{tuple(st['momentum'].shape)} do not match caps {caps.tolist()} and dims {dims}")
        ps.w.copy_(st["weights"])
        ps.m.copy_(st["momentum"])
        owner, free, lens = st["owner"].numpy(), st["free"].numpy(), st["free_lens"].numpy()
        o = f = 0
        for t in range(ps.T):
            for p in range(ps.P):
                c, k = int(caps[t, p]), int(lens[t * ps.P + p])
                ps.owner[t][p] = owner[o: o + c].astype(np.int32).copy()
                ps.free[t][p] = free[f: f + k].astype(np.int32).copy()
                o, f = o + c, f + k
        ps.n_live = int((owner != FREE).sum())
        ps.live_p = ps.live_rows().sum(axis=0).astype(np.int64)
        return ps
