"""The dict/numpy reference twin of :class:`~embedding_store.fiited.FiitedEmbeddings` (STYLE #10).

Same interface and the same decisions (it calls the same pure policy functions in the same slot order),
but the obvious data structures: one dict entry per private row ``(t, v) -> (weights (d,), momentum)``, one
shared row per table, row-wise Adagrad written out in numpy. Slow; for contract tests only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from embedding_store import admission, importance
from embedding_store.config import FiitedConfig, validate
from embedding_store.fiited import COUNTERS
from embedding_store.ids import validate_batch
from embedding_store.pools import EPS
from embedding_store.slotmap import CountMinSketch


class ReferenceStore(nn.Module):
    """``forward(indices, offsets) -> (B, T*D)``, ``step()``, ``maintain()``, ``chunks/row/row_momentum``."""

    def __init__(self, num_tables: int, rows: int, cfg: FiitedConfig = FiitedConfig()):
        super().__init__()
        validate(cfg)
        self.cfg, self.num_tables, self.rows, self.dim = cfg, num_tables, rows, cfg.dim
        self.dims = cfg.pool_dims()
        n = num_tables * rows
        self.private: dict[int, list] = {}  # global slot -> [pool, weights (d,), momentum]
        g = torch.Generator().manual_seed(cfg.seed)
        self.shared = [[torch.empty(self.dims[0]).uniform_(-cfg.init_range, cfg.init_range, generator=g).numpy(),
                        np.float32(0)] for _ in range(num_tables)]
        # candidates' sightings: the same bounded sketch as the pooled store (its estimates are policy input)
        self.sketch = CountMinSketch(cfg.sketch_width, cfg.sketch_depth) if cfg.admit_hits >= 2 else None
        self.last_seen = np.zeros(n, np.int64)
        self.imp = np.zeros(n, np.float32)
        self.snap = np.zeros(n, np.float32)
        self.steps = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pending = None

    def _entry(self, s: int) -> list:
        return self.private.get(s) or self.shared[s // self.rows]

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        b = validate_batch(indices, offsets, self.num_tables, self.rows)
        off, idx = offsets.tolist(), indices.tolist()
        if self.cfg.admit_hits == 0 and torch.is_grad_enabled():  # admit on the first training lookup
            seen = {(bag // b) * self.rows + v for bag in range(len(off) - 1) for v in idx[off[bag]: off[bag + 1]]}
            self._admit_candidates(np.array(sorted(seen - set(self.private)), dtype=np.int64))
        keys, leaves = {}, []
        out = torch.zeros(b, self.num_tables * self.dim)
        terms = []
        for bag in range(len(off) - 1):
            t, bb = divmod(bag, b)
            for v in idx[off[bag]: off[bag + 1]]:
                s = t * self.rows + v
                k = s if s in self.private else -1 - t  # negative key: the table's shared row
                if k not in keys:
                    keys[k] = len(leaves)
                    leaves.append(torch.tensor(self._entry(s)[1 if k >= 0 else 0], requires_grad=True))
                terms.append((bb, t, keys[k], s))
        for bb, t, li, _ in terms:
            w = leaves[li]
            pad = torch.cat([w, torch.zeros(self.dim - w.numel())])
            out = out.index_add(0, torch.tensor([bb]),
                                torch.zeros(1, self.num_tables * self.dim).index_add(
                                    1, torch.arange(t * self.dim, (t + 1) * self.dim), pad[None]))
        if torch.is_grad_enabled():
            self._pending = (keys, leaves, [s for *_, s in terms])
        return out

    @torch.no_grad()
    def step(self) -> None:
        if self._pending is None:
            return
        keys, leaves, slots = self._pending
        self._pending = None
        self.steps += 1
        for k, li in keys.items():
            g = leaves[li].grad
            if g is None:
                continue
            e = self.private[k] if k >= 0 else self.shared[-1 - k]
            w = e[1] if k >= 0 else e[0]
            g = g.numpy().astype(np.float32)
            m = np.float32((e[2] if k >= 0 else e[1]) + np.mean(g * g))
            w -= (np.float32(self.cfg.lr) / (np.sqrt(m) + np.float32(EPS))) * g
            if k >= 0:
                e[2] = m
            else:
                e[1] = m
        for s in slots:
            self.last_seen[s] = self.steps
        cand = np.array([s for s in slots if s not in self.private], dtype=np.int64)
        if self.sketch is not None:
            self.sketch.add(cand)
            if self.steps % self.cfg.ttl_steps == 0:
                self.sketch.halve()
        if self.cfg.admit_hits > 0:  # (admit_hits = 0: admitted in forward already, or no room)
            self._admit_seen(cand)
        if self.steps % self.cfg.maintain_every == 0:
            self.maintain()

    def budget_bytes(self, extra_rows: int = 0) -> float:
        b = self.cfg.budget * self.num_tables * self.rows * (self.dim + 1) * 4
        if self.cfg.live_budget > 0:
            full = importance.row_bytes(self.cfg.pool_chunks, self.cfg.chunk_dim)[-1]
            b = min(b, self.cfg.live_budget * (len(self.private) + extra_rows) * float(full))
        return b

    @torch.no_grad()
    def maintain(self) -> None:
        cfg, c = self.cfg, self.counters
        c["maintenances"] += 1
        live = np.array(sorted(self.private), dtype=np.int64)
        mom = np.array([self.private[s][2] for s in live], dtype=np.float32)
        if len(live):
            self.imp[live] = importance.update_importance(self.imp[live], mom, self.snap[live], cfg.decay)
            self.snap[live] = mom
        ev, _ = admission.evict_mask(self.last_seen[live], self.steps, cfg.ttl_steps, self.imp[live],
                                     np.ones(len(live), bool), cfg.protect_quantile)
        max_rows = int(self.budget_bytes() // importance.row_bytes(cfg.pool_chunks, cfg.chunk_dim)[0])
        keep = live[~ev]
        gone = list(live[ev])
        if len(keep) > max_rows:
            order = np.argsort(-self.imp[keep], kind="stable")
            gone += list(keep[order[max_rows:]])
            keep = np.sort(keep[order[:max_rows]])
        for s in gone:
            del self.private[int(s)]
            self.imp[s] = self.snap[s] = 0
        c["evicted"] += len(gone)
        if self.steps % cfg.resize_every == 0 and len(keep):
            cur = np.array([self.private[int(s)][0] for s in keep])
            tgt = importance.assign_pools(self.imp[keep], cfg.pool_chunks, cfg.chunk_dim,
                                          self.budget_bytes() * cfg.resize_fill, power=cfg.importance_power)
            for s, a, z in zip(keep, cur, tgt):
                if a != z:
                    e = self.private[int(s)]
                    w = np.zeros(self.dims[z], np.float32)
                    k = min(self.dims[a], self.dims[z])
                    w[:k] = e[1][:k]
                    e[0], e[1] = int(z), w
                    if z > a:  # grown: fresh learning rate for the new chunks
                        e[2] = np.float32(e[2] * np.float32(cfg.grow_momentum))
                    self.snap[s] = e[2]
            mv = tgt != cur
            c["resized"] += int(mv.sum())
            c["grown"] += int((tgt[mv] > cur[mv]).sum())
            c["shrunk"] += int((tgt[mv] < cur[mv]).sum())

    def seen_counts(self, slots: np.ndarray) -> np.ndarray:
        return np.zeros(len(slots), np.int64) if self.sketch is None else self.sketch.estimate(slots)

    def _admit_seen(self, slots: np.ndarray) -> None:
        cand = np.array(sorted(set(slots.tolist())), dtype=np.int64)
        if self.sketch is not None:
            cand = cand[self.sketch.estimate(cand) >= self.cfg.admit_hits]
        self._admit_candidates(cand)

    def _admit_candidates(self, cand: np.ndarray) -> None:
        if not len(cand):
            return
        rb = importance.row_bytes(self.cfg.pool_chunks, self.cfg.chunk_dim)
        used = sum(int(rb[e[0]]) for e in self.private.values())
        order = np.argsort(-self.seen_counts(cand), kind="stable")
        pool, k = admission.admit_plan(len(cand), self.budget_bytes(len(cand)) - used, rb)
        cfg = self.cfg
        for s in sorted(cand[order[:k]].tolist()):
            w = admission.init_rows(np.array([s]), self.dims[pool], self.dim, cfg.init_range, cfg.seed)[0]
            if cfg.admit_hits > 0:  # the id trained the shared row so far: its first chunk starts from it
                w[: self.dims[0]] = self.shared[s // self.rows][0]
            self.private[s] = [int(pool), w, np.float32(0)]
            self.imp[s] = self.snap[s] = 0
        self.counters["admitted"] += int(k)

    def importance(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.imp[s] if s in self.private else 0.0 for s in slots], np.float32)

    def set_importance(self, slots: np.ndarray, values: np.ndarray) -> None:
        for s, v in zip(np.asarray(slots).tolist(), np.asarray(values).tolist()):
            if s in self.private:
                self.imp[s] = v

    def chunks(self, t: int, v: int) -> int:
        e = self.private.get(t * self.rows + v)
        return 0 if e is None else self.cfg.pool_chunks[e[0]]

    def row(self, t: int, v: int) -> np.ndarray:
        e = self.private.get(t * self.rows + v)
        w = self.shared[t][0] if e is None else e[1]
        out = np.zeros(self.dim, np.float32)
        out[: len(w)] = w
        return out

    def row_momentum(self, t: int, v: int) -> float:
        e = self.private.get(t * self.rows + v)
        return float(self.shared[t][1] if e is None else e[2])

    def export_state(self) -> dict:
        slots = sorted(self.private)
        return {"private_slots": torch.tensor(slots, dtype=torch.int64),
                "private_pool": torch.tensor([self.private[s][0] for s in slots], dtype=torch.int64),
                "private_w": [torch.from_numpy(self.private[s][1].copy()) for s in slots],
                "private_m": torch.tensor([float(self.private[s][2]) for s in slots], dtype=torch.float32),
                "shared_w": torch.from_numpy(np.stack([s[0] for s in self.shared])).clone(),
                "shared_m": torch.tensor([float(s[1]) for s in self.shared], dtype=torch.float32),
                **{k: torch.from_numpy(getattr(self, k).copy()) for k in ("last_seen", "imp", "snap")},
                "sketch": torch.from_numpy(self.sketch.table.copy() if self.sketch else np.zeros((0, 0), np.uint8)),
                "steps": torch.tensor(self.steps),
                "counters": torch.tensor([self.counters[k] for k in COUNTERS])}

    def import_state(self, st: dict) -> None:
        self.private = {int(s): [int(p), w.numpy().copy(), np.float32(m)] for s, p, w, m in
                        zip(st["private_slots"].tolist(), st["private_pool"].tolist(), st["private_w"],
                            st["private_m"].tolist())}
        self.shared = [[w.numpy().copy(), np.float32(m)] for w, m in zip(st["shared_w"], st["shared_m"].tolist())]
        for k in ("last_seen", "imp", "snap"):
            setattr(self, k, st[k].numpy().copy())
        if self.sketch is not None:
            self.sketch.table[...] = st["sketch"].numpy()
        self.steps = int(st["steps"])
        self.counters = dict(zip(COUNTERS, st["counters"].tolist()))
        self._pending = None

    def memory_report(self) -> dict[str, float]:
        n = np.bincount([e[0] for e in self.private.values()], minlength=len(self.dims))
        out = {f"fiited_rows_d{d}": float(n[p]) for p, d in enumerate(self.dims)}
        out.update({f"fiited_{k}": float(v) for k, v in self.counters.items()})
        return out
