"""The ranker-side table of user vectors: user id -> the newest raw vector of the user model.

Written by the user model's thread (:class:`~trainer.users.service.UserModelService` owns it and writes it
together with the ANN index, so both always hold the same users), read by the trainer's thread without a
lock: rows are written in place, so a reader sees each row either old or new (a row being copied may mix
both, harmless for features). A deleted user reads as zeros ("no vector yet"); its row is reused only
after the *next* :meth:`UserVectors.delete` call (one eviction pass later), so a reader that looked the row
up just before the delete never reads another user's vector.

>>> import numpy as np, torch
>>> v = UserVectors(dim=2, ad_table=torch.ones(10, 2))
>>> v.update(np.array([7, 9]), np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
>>> v.features(np.array([7, 8]), np.array([3, 3])).tolist()   # user 8 has no vector yet: zeros
[[1.0, 2.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
>>> v.delete(np.array([7, 8])), len(v), v.features(np.array([7]), np.array([3])).tolist()
(1, 1, [[0.0, 0.0, 0.0, 0.0]])
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from streams import schema
from trainer.users.model import ad_rows


class UserVectors:
    """``update(ids (N,), vecs (N, d))``, ``delete(ids)``, ``get(ids) -> (N, d)`` from the user model's
    thread; ``features(user_ids (B,), ad_ids (B,)) -> (B, 2d)`` from the trainer's thread.
    ``ad_table``: the live ad embedding (ad_buckets, d) of the user model, or a frozen copy.
    """

    def __init__(self, dim: int, ad_table: torch.Tensor, capacity: int = 1024):
        self.dim = dim
        self.ad_table = ad_table
        self._row: dict[int, int] = {}
        self._vecs = np.zeros((capacity, dim), np.float32)
        self._used = 0  # rows handed out so far (live + free + quarantined)
        self._free: list[int] = []  # rows of deleted users, reusable
        self._quarantine: list[int] = []  # rows freed by the last delete: reusable after the next one
        self._grow_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, user_id: int) -> bool:
        return int(user_id) in self._row

    def _new_row(self) -> int:
        if self._free:
            return self._free.pop()
        r = self._used
        self._used += 1
        if r >= len(self._vecs):  # grow by doubling; readers keep the old array until swapped
            bigger = np.zeros((2 * len(self._vecs), self.dim), np.float32)
            bigger[:r] = self._vecs[:r]
            self._vecs = bigger
        return r

    def update(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        rows = np.empty(len(ids), np.int64)
        with self._grow_lock:
            for j, u in enumerate(ids.tolist()):
                r = self._row.get(u)
                if r is None:
                    r = self._new_row()
                    self._vecs[r] = vecs[j]  # the row is filled before the id becomes visible
                    self._row[u] = r
                rows[j] = r
            self._vecs[rows] = vecs

    def delete(self, ids: np.ndarray) -> int:
        """Forget users (absent ones are ignored); returns how many were removed."""
        freed = []
        with self._grow_lock:
            for u in np.asarray(ids, np.int64).tolist():
                r = self._row.pop(u, None)
                if r is not None:
                    self._vecs[r] = 0.0
                    freed.append(r)
            self._free.extend(self._quarantine)
            self._quarantine = freed
        return len(freed)

    def ids(self) -> np.ndarray:
        with self._grow_lock:
            return np.fromiter(self._row.keys(), np.int64, len(self._row))

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Raw vectors (N, dim) of users that must all be present (KeyError otherwise)."""
        with self._grow_lock:
            rows = [self._row[u] for u in np.asarray(ids, np.int64).tolist()]
            return self._vecs[rows].copy()

    def features(self, user_ids: np.ndarray, ad_ids: np.ndarray) -> np.ndarray:
        """``[u, u * v_ad]`` (B, 2 * dim) float32."""
        vecs, get = self._vecs, self._row.get
        rows = np.fromiter((get(u, -1) for u in np.asarray(user_ids).tolist()), np.int64, len(user_ids))
        u = np.where((rows >= 0)[:, None], vecs[np.maximum(rows, 0)], 0.0).astype(np.float32)
        buckets = self.ad_table.shape[0]
        with torch.no_grad():
            v = self.ad_table[torch.from_numpy(ad_rows(np.asarray(ad_ids, np.int64), buckets))].numpy()
        return np.concatenate([u, u * v], axis=1)

    def features_of(self, imps: Sequence[schema.Impression]) -> np.ndarray:
        n = len(imps)
        return self.features(np.fromiter((i.user_id for i in imps), np.int64, n),
                             np.fromiter((i.ad_id for i in imps), np.int64, n))

    # -- state: a frozen copy (checkpoints, exports, scoring) --
    def vectors(self) -> dict[str, torch.Tensor]:
        """``{"ids": (N,), "vectors": (N, dim)}``: a copy of the user rows."""
        with self._grow_lock:
            ids = np.fromiter(self._row.keys(), np.int64, len(self._row))
            vecs = self._vecs[np.fromiter(self._row.values(), np.int64, len(self._row))].copy()
        return {"ids": torch.from_numpy(ids), "vectors": torch.from_numpy(vecs)}

    def state(self) -> dict[str, torch.Tensor]:
        """:meth:`vectors` plus a copy of the ad table."""
        return {**self.vectors(), "ad_table": self.ad_table.detach().clone()}

    @classmethod
    def from_state(cls, st: dict[str, torch.Tensor]) -> "UserVectors":
        vecs = st["vectors"].numpy()
        v = cls(vecs.shape[1], st["ad_table"].clone(), capacity=max(1024, len(vecs)))
        v.update(st["ids"].numpy(), vecs)
        return v
