"""The user model beside the ranker (LLaTTE two-stage, LoopFM feature hand-off).

The user model (:mod:`trainer.user_service`) is an *upstream* model on its own schedule: a background
thread trains it on the examples the ranker has just trained on, folds them into the user histories and
re-encodes changed users into the ANN index every ``refresh_every_s``. The ranker reads the newest
vectors through :class:`UserVectors`, a plain id -> row table, so the transformer never runs on the
ranking path::

    trainer main loop:  featurize(batch, users=view) -> ranker train_step -> worker.submit(batch)
    worker thread:      process (score, train, histories) -> refresh -> index.upsert + view.update

Ranking features per impression (B, 2d): ``[u, u * v_ad]``, ``u`` the user's newest vector (zeros for a
user not yet encoded), ``v_ad`` the user model's embedding of the impression's ad (its click score is
``<u, v_ad>``). The vectors are *near-line*: at most one refresh interval plus the queue old, and a user's
vector may already have seen events that came after an example's impression (never the example's own
outcome: a batch reaches the user model only after the ranker trained on it). Serving sees the same kind
of vector.

The user model's step costs ~10x the ranker's per example, so it trains on a subsample: at most
``train_duty`` of the worker's time goes to training (the service uses 0.25: without the cap the thread
trained non-stop and halved the stack's throughput on 2 cores); batches that arrive meanwhile, or queue
up, are folded into the histories without training. Every example still reaches the histories exactly
once. ``drain()`` waits for the queue to
empty, so a checkpoint holds histories that match its Kafka offsets.

>>> import numpy as np
>>> v = UserVectors(dim=2, ad_table=torch.ones(10, 2))
>>> v.update(np.array([7]), np.array([[1.0, 2.0]], np.float32))
>>> v.features(np.array([7, 8]), np.array([3, 3])).tolist()   # user 8 has no vector yet: zeros
[[1.0, 2.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Sequence

import numpy as np
import torch

from embedding_store.ann import AnnConfig
from streams import schema
from streams.config import Config
from trainer.user_model import ad_rows

log = logging.getLogger("streamrec.trainer.users")


class UserVectors:
    """Ranker-side table of the newest user vectors plus the user model's ad embeddings.

    ``update(ids (N,), vecs (N, d))`` from the worker thread; ``features(user_ids (B,), ad_ids (B,)) -> (B, 2d)``
    from the trainer's thread. Rows are written in place, so a reader sees each row either old or new
    (Python dict operations are atomic; a row being copied may mix both, harmless for features).
    ``ad_table``: the live ad embedding (ad_buckets, d) of the user model, or a frozen copy.
    """

    def __init__(self, dim: int, ad_table: torch.Tensor, capacity: int = 1024):
        self.dim = dim
        self.ad_table = ad_table
        self._row: dict[int, int] = {}
        self._vecs = np.zeros((capacity, dim), np.float32)
        self._grow_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._row)

    def update(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        rows = np.empty(len(ids), np.int64)
        with self._grow_lock:
            for j, u in enumerate(ids.tolist()):
                r = self._row.get(u)
                if r is None:
                    r = len(self._row)
                    if r >= len(self._vecs):  # grow by doubling; readers keep the old array until swapped
                        bigger = np.zeros((2 * len(self._vecs), self.dim), np.float32)
                        bigger[:r] = self._vecs[:r]
                        self._vecs = bigger
                    self._vecs[r] = vecs[j]  # the row is filled before the id becomes visible
                    self._row[u] = r
                rows[j] = r
            self._vecs[rows] = vecs

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


class UserWorker:
    """A :class:`~trainer.user_service.UserModelService` run by a background thread (see the module doc).

    ``train_duty``: the largest share of time spent training (1: train on every batch it gets to; the
    quality benchmark's synchronous runs use 1). ``submit(examples)`` queues a batch (never blocks);
    ``drain()`` waits until everything queued is in the histories and re-encoded; ``state()``/``load_state()``
    (call after ``drain``); ``close()``.
    An exception in the thread is raised again by the next ``submit``/``drain``.
    """

    def __init__(self, svc, view: UserVectors | None = None, train_duty: float = 1.0):
        if not 0 < train_duty <= 1:
            raise ValueError(f"UserWorker: train_duty must be in (0, 1], got {train_duty}")
        self.svc = svc
        self.train_duty = train_duty
        self._next_train = 0.0
        self.view = view or UserVectors(svc.cfg.model.dim, svc.model.tower.ad.weight)
        svc.on_upsert = self.view.update
        self.trained_batches = self.absorbed_batches = 0
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # the service is used by one thread at a time (worker, or drain/state)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="user-model", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:  # wake up when idle too: the last users of a burst get their vectors within a refresh period
                batches = [self._q.get(timeout=self.svc.cfg.refresh_every_s or 1.0)]
            except queue.Empty:
                with self._lock:
                    if self._error is None:
                        try:
                            self.svc.maybe_refresh()
                        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
                            log.exception("user model thread failed")
                            self._error = e
                continue
            while True:  # take everything queued: fold the older batches in, train on the newest
                try:
                    batches.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = batches[-1] is None
            work = [b for b in batches if b is not None]
            try:
                self._lock.acquire()
                if self._error is None and work:
                    train = time.monotonic() >= self._next_train
                    for b in work[:-1] if train else work:
                        self.svc.absorb(b)
                    if train:
                        t0 = time.monotonic()
                        self.svc.process(work[-1])
                        # at most train_duty of the time training: the ranker shares the cores
                        self._next_train = time.monotonic() + (time.monotonic() - t0) * (1 / self.train_duty - 1)
                        self.trained_batches += 1
                    self.absorbed_batches += len(work) - train
            except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
                log.exception("user model thread failed")
                self._error = e
            finally:
                self._lock.release()
                for _ in batches:
                    self._q.task_done()
            if stop:
                return

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"user model thread failed: {self._error!r}") from self._error

    def submit(self, examples: Sequence[schema.Example]) -> None:
        self._check()
        if not self._thread.is_alive():
            raise RuntimeError("user model thread is closed")
        self._q.put(list(examples))

    def drain(self) -> None:
        """Wait until every submitted batch is processed, then re-encode the changed users."""
        self._q.join()
        self._check()
        with self._lock:
            self.svc.refresh()

    def backlog(self) -> int:
        return self._q.qsize()

    def state(self) -> dict:
        self.drain()
        with self._lock:
            # the raw vectors; the view's ad table is the model's, saved under "model"
            return {**self.svc.state(), "trained_batches": self.trained_batches,
                    "absorbed_batches": self.absorbed_batches, "view": self.view.vectors()}

    def load_state(self, st: dict) -> None:
        self.drain()
        with self._lock:
            self.svc.load_state(st)
        self.trained_batches = int(st.get("trained_batches", 0))
        self.absorbed_batches = int(st.get("absorbed_batches", 0))
        view = st["view"]  # the raw vectors (the index keeps them normalised for cosine search)
        self.view.update(view["ids"].numpy(), view["vectors"].numpy())

    def stats(self) -> dict[str, float]:
        f = self.svc.freshness_ms()
        out = {"user_vectors": float(len(self.view)), "user_backlog": float(self.backlog()),
               "user_trained_batches": float(self.trained_batches),
               "user_absorbed_batches": float(self.absorbed_batches)}
        if f["n"]:
            out["user_freshness_p50_ms"], out["user_freshness_p99_ms"] = f["p50"], f["p99"]
        return out

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(60)



def user_worker(cfg: Config, train_duty: float = 0.25) -> UserWorker:
    """The trainer's user model: ``trainer.user_dim`` wide, its index configured for up to ~1M users."""
    from trainer.user_model import UserModelConfig
    from trainer.user_service import UserModelService, UserServiceConfig

    d = cfg.trainer.user_dim
    # exact search while small (IVF stages vectors in a flat index until 30 * nlist), then the configuration
    # measured at 1M vectors (docs/users.md): 16384 lists, HNSW coarse quantizer, fp16 lists, nprobe 40
    index = AnnConfig(dim=d, kind="ivf", nlist=16384, nprobe=40, quantizer="hnsw", codec="fp16")
    return UserWorker(UserModelService(UserServiceConfig(model=UserModelConfig(dim=d), index=index,
                                                         seed=cfg.trainer.seed)), train_duty=train_duty)
