"""The user-model service loop: histories follow the stream, the user model trains on examples, fresh
user vectors go into the ANN index.

    examples ──► score (progressive) ──► train_step ──► histories.observe ──► dirty users
    raw events ─────────────────────────────────────► histories.observe ──► dirty users
    every refresh_every_s: encode dirty users ──► view.update(user ids, raw vectors)
                                              └─► index.upsert(user ids, vectors - center, latest event ts)

The service owns both tables the vectors go to and keeps them in step: ``view`` (a
:class:`~trainer.users.vectors.UserVectors`, the raw vectors the ranker reads) and ``index`` (the ANN index,
centred vectors for cosine search). After every refresh, for every user ``u``::

    index.get(u) == normalize(view[u] - center)

with one ``center`` for all users. The centre follows a running mean of the encoded vectors, but it only
moves together with a re-centring of every stored vector (:meth:`UserModelService.refresh`), never by
itself: a user encoded before a move would otherwise stay centred on the old value while the users
re-encoded after it use the new one.

Users leave: at each refresh, users the histories forgot (unseen for ``history.ttl.ttl_s`` of event time and
not among the ``ttl.keep`` most active, or dropped by ``history.max_users``) are deleted from the index
(:meth:`~embedding_store.ann.AnnIndex.delete`) and from the view; one that comes back is a new user
(``counters["evicted"]``: TTL, ``history.evicted``: the bound).

Freshness is measured per user from the wall-clock moment an event reached the service to the moment
the user's new vector was in the index (:meth:`UserModelService.freshness_ms`).

Integration with the ranker (two-stage, LLaTTE): :meth:`UserModelService.features` gives, per impression,
the user vector ``u`` (B, d) from the history strictly before the impression and ``u * ad_vector``
(B, d), to append to the ranker's dense input; or read ``index.get(user_ids)`` for the asynchronously
refreshed vectors (staler, no transformer on the ranking path).

>>> from streams.sources.generate import GeneratorConfig, simulate
>>> from streams import schema
>>> svc = UserModelService(UserServiceConfig(model=UserModelConfig(dim=8, max_len=8, ad_buckets=1000),
...                                          index=AnnConfig(dim=8, kind="numpy"), refresh_every_s=0))
>>> imps = [r for r in simulate(GeneratorConfig(n_impressions=300, seed=3)).records
...         if isinstance(r, schema.Impression)]
>>> exs = [schema.Example(example_id=i.event_id, impression=i, click=0, conversion=0) for i in imps]
>>> out = svc.process(exs)
>>> out["trained"], len(svc.index) == len({i.user_id for i in imps}), svc.features(imps[:5])[0].shape
(300, True, (5, 8))
"""

from __future__ import annotations

import copy
import io
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from embedding_store.ann import (AnnConfig, AnnIndex, load_index, make_index, npz_arrays, npz_bytes, save_index,
                                 save_npz_atomic, write_atomic)
from streams import schema
from trainer.users.history import HistoryConfig, UserHistory
from trainer.users.model import UserModel, UserModelConfig
from trainer.users.vectors import UserVectors

CENTER_HORIZON = 100_000  # vectors: the index's centring offset follows about this many recent encodes
# the index's centre moves to the running mean (re-centring every stored vector) once the two are this far
# apart, in units of the vectors' spread around the mean (rms distance): random pairs of centred vectors
# then share at most ~RECENTER_TOL**2 = 4% of cosine through the lag. On generated traffic (60k examples,
# 5k users, a refresh per 512) 0.2 re-centred 16 times in 118 refreshes, the gaps growing to 16 refreshes
# (0.1: 27 times, gaps growing to 8)
RECENTER_TOL = 0.2


@dataclass(frozen=True)
class UserServiceConfig:
    """The parts, and how often dirty users are re-encoded into the index (0: on every call)."""

    model: UserModelConfig = field(default_factory=UserModelConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    index: AnnConfig = field(default_factory=AnnConfig)
    refresh_every_s: float = 1.0
    seed: int = 0


class UserModelService:
    """``process(examples)``, ``observe(events)``, ``refresh()``, ``features(impressions)``, ``save``/``load``;
    ``view`` (raw vectors) and ``index`` (centred) hold the same users."""

    def __init__(self, cfg: UserServiceConfig = UserServiceConfig(), index: AnnIndex | None = None):
        if cfg.index.dim != cfg.model.dim:
            raise ValueError(f"UserServiceConfig: index.dim {cfg.index.dim} != model.dim {cfg.model.dim}")
        self.cfg = cfg
        self.model = UserModel(cfg.model, seed=cfg.seed)
        self.history = UserHistory(cfg.history)
        self.index = index if index is not None else make_index(cfg.index)
        self._dirty: dict[int, tuple[float, int]] = {}  # user -> (first unpublished arrival, monotonic s; latest ts)
        self._last_refresh = time.monotonic()
        self._fresh_ms: list[float] = []
        self.counters = {"examples": 0, "events": 0, "upserts": 0, "refreshes": 0, "recenters": 0, "evicted": 0}
        self.view = UserVectors(cfg.model.dim, self.model.tower.ad.weight)  # raw vectors: the ranker's table
        self.center = np.zeros(cfg.model.dim, np.float32)  # subtracted from every vector in the index
        self._mean = np.zeros(cfg.model.dim, np.float32)  # running mean of the encoded vectors
        self._spread2 = 0.0  # running mean squared distance of the encoded vectors from it
        self._center_n = 0

    def _mark(self, user_id: int | None, ts: int, now: float) -> None:
        if user_id is None:
            return
        old = self._dirty.get(user_id)
        self._dirty[user_id] = (old[0], max(old[1], ts)) if old else (now, ts)

    def _fold(self, examples: Sequence[schema.Example], now: float) -> None:
        for e in examples:
            self._mark(self.history.observe(e), e.impression.ts, now)

    def _sequences(self, imps: Sequence[schema.Impression]):
        return self.history.sequences([i.user_id for i in imps], [i.ts for i in imps], before_ms=True,
                                      max_len=self.cfg.model.max_len)

    def process(self, examples: Sequence[schema.Example]) -> dict:
        """Score (before learning), train one step, then fold the examples into the histories.

        Returns ``{"trained": n, "loss": float, "p_click": (n,) scores made before this step}``."""
        now = time.monotonic()
        if not examples:
            return {"trained": 0, "loss": float("nan"), "p_click": np.zeros(0, np.float32)}
        imps = [e.impression for e in examples]
        seq = self._sequences(imps)
        ads = np.fromiter((i.ad_id for i in imps), np.int64, len(imps))
        doms = np.fromiter((schema.DOMAIN_INDEX[i.domain] for i in imps), np.int64, len(imps))
        clicks = np.fromiter((1.0 if e.click else 0.0 for e in examples), np.float32, len(imps))
        p = self.model.score(seq, ads, doms)
        loss = self.model.train_step(seq, ads, doms, clicks)
        self._fold(examples, now)
        self.counters["examples"] += len(examples)
        self.maybe_refresh()
        return {"trained": len(examples), "loss": loss, "p_click": p}

    def absorb(self, examples: Sequence[schema.Example]) -> int:
        """Fold examples into the histories without training (a batch the model had no time for)."""
        self._fold(examples, time.monotonic())
        self.counters["examples_absorbed"] = self.counters.get("examples_absorbed", 0) + len(examples)
        self.maybe_refresh()
        return len(examples)

    def observe(self, events) -> int:
        """Raw Impression / Click / Conversion events into the histories (no training); returns users touched."""
        now = time.monotonic()
        n = 0
        for ev in events:
            u = self.history.observe(ev)
            if u is not None:
                self._mark(u, ev.ts, now)
                n += 1
        self.counters["events"] += n
        self.maybe_refresh()
        return n

    def maybe_refresh(self) -> None:
        """Refresh when ``refresh_every_s`` has passed since the last one."""
        if time.monotonic() - self._last_refresh >= self.cfg.refresh_every_s:
            self.refresh()

    def refresh(self) -> int:
        """Remove the users that left, re-encode every dirty user from its whole current history and upsert;
        returns how many were re-encoded."""
        self._last_refresh = time.monotonic()
        self._evict()
        if not self._dirty:
            return 0
        users = list(self._dirty)
        now_ts = np.array([self._dirty[u][1] for u in users], np.int64)
        vecs = []
        for s in range(0, len(users), 4096):  # bounded memory per encode
            vecs.append(self.model.encode(self.history.sequences(users[s:s + 4096], now_ts[s:s + 4096],
                                                                 max_len=self.cfg.model.max_len)))
        ids, vecs = np.array(users, np.int64), np.concatenate(vecs)
        self.index.upsert(ids, vecs - self.center, now_ts)
        self.view.update(ids, vecs)
        self._update_mean(vecs)
        if self._recenter_due():
            self._recenter()
        done = time.monotonic()
        self._fresh_ms.extend((done - self._dirty[u][0]) * 1000.0 for u in users)
        del self._fresh_ms[:-100_000]
        self._dirty.clear()
        self.counters["upserts"] += len(users)
        self.counters["refreshes"] += 1
        return len(users)

    def _evict(self) -> None:
        """Users the histories forgot (TTL; the max_users bound) leave the index and the view too."""
        expired = self.history.expire()
        gone = np.concatenate([expired, self.history.take_dropped()])
        if not len(gone):
            return
        self.index.delete(gone)
        self.view.delete(gone)
        for u in gone.tolist():
            self._dirty.pop(u, None)
        self.counters["evicted"] = self.counters.get("evicted", 0) + len(expired)

    def _update_mean(self, vecs: np.ndarray) -> None:
        """Running mean of the encoded vectors and of their squared distance from it (cumulative, then an
        EMA over the last ~CENTER_HORIZON).

        The index holds ``u - center``: user vectors share a large common component (random pairs had
        cosine 0.97 after 100k impressions), which would make every user everyone's nearest neighbour;
        centred, random pairs are near 0 and neighbours mean shared taste. The ranker reads raw ``u``."""
        n = len(vecs)
        self._center_n = min(self._center_n + n, CENTER_HORIZON)
        w = n / self._center_n
        self._mean = (self._mean + (vecs.mean(axis=0) - self._mean) * w).astype(np.float32)
        spread2 = float(((vecs - self._mean) ** 2).sum(axis=1).mean())
        self._spread2 += (spread2 - self._spread2) * w

    def _recenter_due(self) -> bool:
        drift2 = float(((self._mean - self.center) ** 2).sum())
        return drift2 > RECENTER_TOL ** 2 * self._spread2

    def _recenter(self) -> None:
        """Move the centre to the running mean and rewrite every stored vector against it, from the raw
        vectors of the view (it holds the same users as the index), keeping their event times. O(users):
        rare once the model settles (the mean moves slowly), cheap while the index is small."""
        self.center = self._mean.copy()
        ids = self.view.ids()
        self.index.upsert(ids, self.view.get(ids) - self.center, self.index.written_ts(ids))
        self.counters["recenters"] += 1

    def freshness_ms(self) -> dict[str, float]:
        """Event arrival -> vector in the index, over the last 100k upserts: p50 / p99 / max (ms)."""
        if not self._fresh_ms:
            return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
        a = np.asarray(self._fresh_ms)
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                "n": len(a)}

    def features(self, imps: Sequence[schema.Impression]) -> tuple[np.ndarray, np.ndarray]:
        """Ranking features of impressions: (u (B, d), u * ad_vector(ad) (B, d)); the history is cut
        strictly before each impression's ts, so an impression never sees its own outcome."""
        u = self.model.encode(self._sequences(imps))
        v = self.model.ad_vectors(np.fromiter((i.ad_id for i in imps), np.int64, len(imps)))
        return u, u * v

    # -- in-memory state for the trainer's one-file checkpoint (tensors only: loads with weights_only) --
    def state(self) -> dict:
        """Everything to continue exactly: model + optimisers, histories and index (as ``.npz`` bytes in
        uint8 tensors: they hold strings), the raw vectors (``view``), centre, counters. Dirty users are
        re-encoded first."""
        self.refresh()
        # deep copy: state_dict() tensors alias the live weights and optimiser moments
        return {"model": copy.deepcopy(self.model.state()), "counters": dict(self.counters), **self._center_state(),
                "history": _npz_tensor(self.history.snapshot()), "index": _npz_tensor(self.index.snapshot()),
                "view": self.view.vectors()}

    def load_state(self, st: dict) -> None:
        """Restore :meth:`state` into this (fresh) service."""
        self.model.load_state(st["model"])
        self.counters.update(st["counters"])
        self._load_center(st)
        self.history = UserHistory.restore(_tensor_npz(st["history"]), self.cfg.history)
        self.index = make_index(self.cfg.index)
        self.index.restore(_tensor_npz(st["index"]))
        self.view = UserVectors(self.cfg.model.dim, self.model.tower.ad.weight)
        self.view.update(st["view"]["ids"].numpy(), st["view"]["vectors"].numpy())
        self._dirty.clear()
        if "center_mean" not in st:  # written while the centre moved at every refresh: its index mixes centres
            self._recenter()

    def _center_state(self) -> dict:
        return {"center": torch.from_numpy(self.center.copy()), "center_n": self._center_n,
                "center_mean": torch.from_numpy(self._mean.copy()), "center_spread2": self._spread2}

    def _load_center(self, st: dict) -> None:
        self.center, self._center_n = st["center"].numpy().copy(), int(st["center_n"])
        # before the mean was kept apart from the centre: the centre was the mean
        self._mean = st["center_mean"].numpy().copy() if "center_mean" in st else self.center.copy()
        self._spread2 = float(st.get("center_spread2", 0.0))

    # -- checkpoint: model.pt, history.npz, index, vectors.npz (one directory; each file written atomically) --
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.refresh()
        tmp = d / "model.pt.tmp"
        torch.save({"model": self.model.state(), "counters": dict(self.counters), **self._center_state(),
                    "config": {"model": asdict(self.cfg.model), "history": asdict(self.cfg.history)}}, tmp)
        os.replace(tmp, d / "model.pt")
        self.history.save(d / "history.npz")
        save_index(self.index, d / "index")
        v = self.view.vectors()
        save_npz_atomic(d / "vectors.npz", {"ids": v["ids"].numpy(), "vectors": v["vectors"].numpy()})
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, cfg: UserServiceConfig = UserServiceConfig()) -> "UserModelService":
        d = Path(directory)
        svc = cls(cfg, index=load_index(d / "index", kind=cfg.index.kind, device=cfg.index.device))
        st = torch.load(d / "model.pt", weights_only=True)
        svc.model.load_state(st["model"])
        svc.counters.update(st["counters"])
        if "center" in st:
            svc._load_center(st)
        svc.history = UserHistory.load(d / "history.npz", cfg.history)
        if (d / "vectors.npz").exists():
            v = npz_arrays(d / "vectors.npz")
            svc.view.update(v["ids"], v["vectors"])
        else:  # saved before the raw vectors were: re-encode the indexed users at the next refresh
            ids = svc.index.ids()
            now = time.monotonic()
            for u, t in zip(ids.tolist(), svc.index.written_ts(ids).tolist()):
                svc._mark(u, t, now)
        return svc


def write_index_file(state: dict, path: str | os.PathLike) -> Path:
    """Write the index of a :meth:`UserModelService.state` to ``path``: the file :func:`save_index` would write
    (the same .npz bytes), without taking the snapshot a second time."""
    return write_atomic(path, state["index"].numpy().tobytes())


def _npz_tensor(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.frombuffer(bytearray(npz_bytes(arrays)), dtype=torch.uint8)


def _tensor_npz(t: torch.Tensor) -> dict[str, np.ndarray]:
    return npz_arrays(io.BytesIO(t.numpy().tobytes()))
