"""The user model beside the ranker (LLaTTE two-stage, LoopFM feature hand-off).

The user model (:mod:`trainer.users.service`) is an *upstream* model on its own schedule: a background
thread trains it on the examples the ranker has just trained on, folds them into the user histories and
re-encodes changed users into the ANN index every ``refresh_every_s``. The ranker reads the newest
vectors through :class:`UserVectors`, a plain id -> row table, so the transformer never runs on the
ranking path::

    trainer main loop:  featurize(batch, users=view) -> ranker train_step -> worker.submit(batch)
    worker thread:      process (score, train, histories) -> refresh -> view.update + index.upsert

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

>>> import numpy as np, torch
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

from embedding_store.ann import AnnConfig
from streams import schema
from config import Config
from trainer.users.vectors import UserVectors  # noqa: F401  (re-exported: checkpoints, exports and score use it)

log = logging.getLogger("streamrec.trainer.users")


class UserWorker:
    """A :class:`~trainer.users.service.UserModelService` run by a background thread (see the module doc).

    ``train_duty``: the largest share of time spent training (1: train on every batch it gets to; the
    quality benchmark's synchronous runs use 1). ``submit(examples)`` queues a batch (never blocks);
    ``drain()`` waits until everything queued is in the histories and re-encoded; ``state()``/``load_state()``
    (call after ``drain``); ``close()``.
    An exception in the thread is raised again by the next ``submit``/``drain``.
    """

    def __init__(self, svc, train_duty: float = 1.0):
        if not 0 < train_duty <= 1:
            raise ValueError(f"UserWorker: train_duty must be in (0, 1], got {train_duty}")
        self.svc = svc
        self.train_duty = train_duty
        self._next_train = 0.0
        self.trained_batches = self.absorbed_batches = 0
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # the service is used by one thread at a time (worker, or drain/state)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="user-model", daemon=True)
        self._thread.start()

    @property
    def view(self) -> UserVectors:
        """The ranker's table of raw user vectors: the service's, kept in step with its index."""
        return self.svc.view

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
            # the service's state carries the view's raw vectors; its ad table is the model's, under "model"
            return {**self.svc.state(), "trained_batches": self.trained_batches,
                    "absorbed_batches": self.absorbed_batches}

    def load_state(self, st: dict) -> None:
        self.drain()
        with self._lock:
            self.svc.load_state(st)  # a new view: callers holding the old one take ``view`` again
        self.trained_batches = int(st.get("trained_batches", 0))
        self.absorbed_batches = int(st.get("absorbed_batches", 0))

    def stats(self) -> dict[str, float]:
        svc = self.svc
        f = svc.freshness_ms()
        out = {"user_vectors": float(len(self.view)), "user_backlog": float(self.backlog()),
               "user_trained_batches": float(self.trained_batches),
               "user_absorbed_batches": float(self.absorbed_batches),
               # users that left: unseen for the TTL (event time), or over the histories' max_users
               "user_evicted": float(svc.counters.get("evicted", 0)), "user_evicted_cap": float(svc.history.evicted)}
        if f["n"]:
            out["user_freshness_p50_ms"], out["user_freshness_p99_ms"] = f["p50"], f["p99"]
        return out

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(60)



def user_worker(cfg: Config, train_duty: float = 0.25) -> UserWorker:
    """The trainer's user model: ``trainer.user_dim`` wide, its index configured for up to ~1M users, users
    leaving after ``trainer.user_ttl_s`` of event time unseen (``trainer.user_ttl_keep`` most active kept)."""
    from trainer.users.history import HistoryConfig, TtlConfig
    from trainer.users.model import UserModelConfig
    from trainer.users.service import UserModelService, UserServiceConfig

    d, tc = cfg.trainer.user_dim, cfg.trainer
    if not 0 <= tc.user_ttl_s < float("inf") or tc.user_ttl_keep < 0:
        raise ValueError(f"trainer.user_ttl_s must be finite and >= 0 (0: never), trainer.user_ttl_keep >= 0; "
                         f"got {tc.user_ttl_s}, {tc.user_ttl_keep}")
    # exact search while small (IVF stages vectors in a flat index until 30 * nlist), then the configuration
    # measured at 1M vectors (docs/users.md): 16384 lists, HNSW coarse quantizer, fp16 lists, nprobe 40
    index = AnnConfig(dim=d, kind="ivf", nlist=16384, nprobe=40, quantizer="hnsw", codec="fp16")
    history = HistoryConfig(ttl=TtlConfig(ttl_s=tc.user_ttl_s, keep=tc.user_ttl_keep))
    return UserWorker(UserModelService(UserServiceConfig(model=UserModelConfig(dim=d), history=history, index=index,
                                                         seed=tc.seed)), train_duty=train_duty)
