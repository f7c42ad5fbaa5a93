"""Each user's recent events, bounded, following the stream; the input of the user model.

An entry is ``(ts, ad_id, action, domain, event_id)``; a user keeps at most ``max_len`` entries in
event-time order (most recent last; when full, the oldest plain impression goes first, then the oldest
entry) and at most ``max_users`` users are kept (least recently touched
evicted first). Actions (:data:`ACTIONS`)::

    0 prior       an id from Impression.history (the log's own notion of the user's past; time unknown)
    1 impression  the user saw the ad and (as far as we know) did nothing
    2 click       ... and clicked
    3 conversion  ... and converted

Raw events (:meth:`UserHistory.observe`) and labelled examples are both accepted: a Click upgrades the
entry of its impression (found by event id) in place, an Example adds its impression with its labels. A
user seen for the first time is seeded with its ``Impression.history`` as ``prior`` entries.

>>> from streams import schema
>>> h = UserHistory(HistoryConfig(max_len=3, engaged_only=False))
>>> imp = schema.Impression(event_id="i1", ts=2_000_000_000_000, user_id=7, ad_id=5, campaign_id=1,
...                         advertiser_id=1, domain="video", history=[1, 2])
>>> h.observe(imp), h.observe(schema.Click(event_id="c1", impression_id="i1", ts=2_000_000_001_000, user_id=7))
(7, 7)
>>> [(e[1], ACTIONS[e[2]]) for e in h.get(7)]
[(1, 'prior'), (2, 'prior'), (5, 'click')]
>>> s = h.sequences([7, 8], now_ms=2_000_000_010_000)
>>> s.ad.tolist(), s.mask.tolist(), float(s.gap_s[0, 2])
([[1, 2, 5], [0, 0, 0]], [[True, True, True], [False, False, False]], 10.0)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from streams import schema
from embedding_store.ann import npz_arrays, save_npz_atomic

ACTIONS: tuple[str, ...] = ("prior", "impression", "click", "conversion")
PRIOR, IMPRESSION, CLICK, CONVERSION = range(4)
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class HistoryConfig:
    """``max_len`` events per user, ``max_users`` users (LRU), ``seed_prior``: seed new users from
    ``Impression.history``; ``engaged_only``: :meth:`UserHistory.sequences` leaves out plain impressions
    (kept in the store so a later click can upgrade them). Measured on generated traffic: random non-clicked
    ads in the model input drown the taste signal (progressive AUC of the user model 0.64 with, 0.70 without).
    """

    max_len: int = 32
    max_users: int = 1_000_000
    seed_prior: bool = True
    engaged_only: bool = True


@dataclass(frozen=True)
class Sequences:
    """B users' sequences right-aligned in L slots (most recent last, padding on the left).

    ad / action / domain (B, L) int64; gap_s (B, L) float32: seconds from the event to ``now`` (-1 for
    prior entries, whose time is unknown); mask (B, L) bool: a real entry.
    """

    ad: np.ndarray
    action: np.ndarray
    domain: np.ndarray
    gap_s: np.ndarray
    mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.ad.shape


class UserHistory:
    """``observe(event)``, ``add(...)``, ``get(user)``, ``sequences(users, now_ms)``, ``snapshot``/``restore``."""

    def __init__(self, cfg: HistoryConfig = HistoryConfig()):
        if cfg.max_len < 1 or cfg.max_users < 1:
            raise ValueError(f"HistoryConfig: max_len and max_users must be >= 1, got {cfg.max_len}, {cfg.max_users}")
        self.cfg = cfg
        self._users: OrderedDict[int, list[list]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: int) -> bool:
        return user_id in self._users

    def get(self, user_id: int) -> list[tuple]:
        """The user's entries ``(ts, ad_id, action, domain_index, event_id)``, oldest first."""
        return [tuple(e) for e in self._users.get(user_id, ())]

    def _touch(self, user_id: int) -> list[list]:
        seq = self._users.get(user_id)
        if seq is None:
            seq = self._users[user_id] = []
            if len(self._users) > self.cfg.max_users:
                self._users.popitem(last=False)
                self.evicted += 1
        else:
            self._users.move_to_end(user_id)
        return seq

    def add(self, user_id: int, ts: int, ad_id: int, action: int, domain: int, event_id: str = "") -> None:
        seq = self._touch(user_id)
        seq.append([ts, ad_id, action, domain, event_id])
        if len(seq) > 1 and seq[-2][0] > ts:  # out of event-time order (late example): re-sort, L is small
            seq.sort(key=lambda e: e[0])
        while len(seq) > self.cfg.max_len:
            # evict the oldest plain impression first: engagements and priors carry the taste, a user sees
            # many more ads than they act on, and a window of non-clicks would push every click out
            j = next((k for k, e in enumerate(seq) if e[2] == IMPRESSION), 0)
            del seq[j]

    def _seed(self, imp: schema.Impression) -> None:
        if self.cfg.seed_prior and imp.user_id not in self._users and imp.history:
            dom = schema.DOMAIN_INDEX.get(imp.domain, 0)
            for ad in imp.history[-self.cfg.max_len:]:
                self.add(imp.user_id, 0, ad, PRIOR, dom)

    def _upgrade(self, user_id: int, impression_id: str, action: int) -> bool:
        for e in reversed(self._users.get(user_id, ())):
            if e[4] == impression_id:
                e[2] = max(e[2], action)
                self._users.move_to_end(user_id)
                return True
        return False

    def observe(self, ev) -> int | None:
        """Fold one Impression / Click / Conversion / Example in; returns the user id it touched, or None
        (feedback whose impression is no longer, or never was, in the user's window)."""
        if isinstance(ev, schema.Example):
            imp = ev.impression
            action = CONVERSION if ev.conversion else CLICK if ev.click else IMPRESSION
            if not self._upgrade(imp.user_id, imp.event_id, action):
                self._seed(imp)
                self.add(imp.user_id, imp.ts, imp.ad_id, action, schema.DOMAIN_INDEX.get(imp.domain, 0), imp.event_id)
            return imp.user_id
        if isinstance(ev, schema.Impression):
            self._seed(ev)
            self.add(ev.user_id, ev.ts, ev.ad_id, IMPRESSION, schema.DOMAIN_INDEX.get(ev.domain, 0), ev.event_id)
            return ev.user_id
        if isinstance(ev, (schema.Click, schema.Conversion)):
            action = CLICK if isinstance(ev, schema.Click) else CONVERSION
            return ev.user_id if self._upgrade(ev.user_id, ev.impression_id, action) else None
        return None

    def observe_all(self, events: Iterable) -> set[int]:
        return {u for u in map(self.observe, events) if u is not None}

    def sequences(self, user_ids: Sequence[int], now_ms: int | Sequence[int], *, before_ms: bool = False,
                  max_len: int | None = None) -> Sequences:
        """Right-aligned arrays of the users' entries (see :class:`Sequences`); ``now_ms`` scalar or per user.

        ``before_ms``: keep only entries strictly older than ``now_ms`` (features of an impression at that
        time must not see the impression itself or later events)."""
        L = max_len or self.cfg.max_len
        b = len(user_ids)
        now = np.broadcast_to(np.asarray(now_ms, dtype=np.int64), (b,))
        ad = np.zeros((b, L), np.int64)
        act = np.zeros((b, L), np.int64)
        dom = np.zeros((b, L), np.int64)
        ts = np.zeros((b, L), np.int64)
        mask = np.zeros((b, L), bool)
        for i, u in enumerate(user_ids):
            seq = self._users.get(u)
            if not seq:
                continue
            if before_ms:
                t = int(now[i])
                seq = [e for e in seq if e[0] < t]
            if self.cfg.engaged_only:
                seq = [e for e in seq if e[2] != IMPRESSION]
            seq = seq[-L:]
            n = len(seq)
            if not n:
                continue
            cols = list(zip(*seq))
            ts[i, L - n:], ad[i, L - n:], act[i, L - n:], dom[i, L - n:] = cols[0], cols[1], cols[2], cols[3]
            mask[i, L - n:] = True
        gap = np.where(mask & (act != PRIOR), np.maximum(now[:, None] - ts, 0) / 1000.0, -1.0).astype(np.float32)
        return Sequences(ad=ad, action=act, domain=dom, gap_s=gap, mask=mask)

    # -- snapshot --
    def snapshot(self) -> dict[str, np.ndarray]:
        """Flat arrays: users (U,), lengths (U,), ts / ad / action / domain / event_id (sum of lengths,)."""
        users = list(self._users.keys())  # LRU order, oldest first: restore keeps it
        seqs = [self._users[u] for u in users]
        flat = [e for s in seqs for e in s]
        col = lambda j, dt: np.array([e[j] for e in flat], dtype=dt)
        return {"format": np.array(SNAPSHOT_FORMAT), "users": np.array(users, dtype=np.int64),
                "lengths": np.array([len(s) for s in seqs], dtype=np.int64), "ts": col(0, np.int64),
                "ad": col(1, np.int64), "action": col(2, np.int8), "domain": col(3, np.int8),
                "event_id": np.array([e[4] for e in flat], dtype=str) if flat else np.zeros(0, "<U1"),
                "evicted": np.array(self.evicted)}

    @classmethod
    def restore(cls, snap: dict[str, np.ndarray], cfg: HistoryConfig = HistoryConfig()) -> "UserHistory":
        if int(snap["format"]) != SNAPSHOT_FORMAT:
            raise ValueError(f"UserHistory.restore: snapshot format {int(snap['format'])}, expected {SNAPSHOT_FORMAT}")
        h = cls(cfg)
        ts, ad, act, dom, eid = (snap[k].tolist() for k in ("ts", "ad", "action", "domain", "event_id"))
        pos = 0
        for u, n in zip(snap["users"].tolist(), snap["lengths"].tolist()):
            h._users[u] = [[ts[j], ad[j], act[j], dom[j], eid[j]] for j in range(pos, pos + n)][-cfg.max_len:]
            pos += n
        while len(h._users) > cfg.max_users:
            h._users.popitem(last=False)
        h.evicted = int(snap["evicted"])
        return h

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write of :meth:`snapshot` (temp file, fsync, rename)."""
        return save_npz_atomic(path, self.snapshot())

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: HistoryConfig = HistoryConfig()) -> "UserHistory":
        return cls.restore(npz_arrays(path), cfg)
