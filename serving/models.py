"""Which model serves a request: arms (hashed user -> arm), one model slot per arm, and the poller that swaps
newer published versions in.

A :class:`ModelSlot` holds the arm's current :class:`trainer.publish.Published` (or anything with its
attributes: ``model``, ``tcfg``, ``device``, ``seq``, ``steps``, ``trained_ts``, ``created_ts``, ``user_view``;
:class:`LocalModel` for a model held in memory). The :class:`Poller` thread calls ``store.advance(current)``
every ``serving.poll_s`` and replaces the slot's reference in one assignment: a batch reads ``slot.current``
once when it starts and scores every request of that batch with that object, so a swap never fails, mixes or
drops a request; the old version is freed when the last batch holding it ends (versions are never mutated).

This module is the only place that imports :mod:`trainer.publish` (:func:`open_store`), so anything with
``advance(current) -> new | None`` (and optionally ``list()``) can stand in for a version store.

>>> from config import ArmConfig
>>> arms = (ArmConfig(name="A", share=0.7), ArmConfig(name="B", share=0.3), ArmConfig(name="S", shadow=True))
>>> [arms_for_user(u, arms) for u in range(12, 20)]
['A', 'B', 'A', 'A', 'A', 'A', 'B', 'B']
>>> arms_for_user(3, arms) == arms_for_user(3, arms)   # stable: the same user always gets the same arm
True
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from config import ArmConfig, ServingConfig

log = logging.getLogger(__name__)

_MASK = (1 << 64) - 1
ARM_SALT = 0x5EED_A4B5_0F_A4B5  # arms get their own hash of the user id (not the embedding rows' hash)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def user_fraction(user_id: int) -> float:
    """A stable point in [0, 1) for ``user_id``: the same in every process and run."""
    return _splitmix64((user_id ^ ARM_SALT) & _MASK) / 2.0 ** 64


def arms_for_user(user_id: int, arms: Sequence[ArmConfig] = ServingConfig().arms) -> str:
    """The serving (non-shadow) arm of ``user_id``: the arm whose cumulative share covers
    :func:`user_fraction` (shares are normalised by their sum; all zero: equal shares)."""
    serving = [a for a in arms if not a.shadow]
    if not serving:
        raise ValueError("serving.arms: at least one arm must not be a shadow")
    total = sum(max(a.share, 0.0) for a in serving)
    shares = [max(a.share, 0.0) / total for a in serving] if total > 0 else [1.0 / len(serving)] * len(serving)
    x, acc = user_fraction(user_id), 0.0
    for a, s in zip(serving, shares):
        acc += s
        if x < acc:
            return a.name
    return serving[-1].name


class Store(Protocol):
    def advance(self, current): ...


def open_store(root, device: str = "cpu") -> Store:
    """The arm's :class:`trainer.publish.VersionStore` under ``root`` (the one import of trainer.publish)."""
    from trainer.publish import VersionStore

    return VersionStore(root, device=device)


def version_error() -> tuple[type[BaseException], ...]:
    """The exception a store raises for a refused version (trainer.publish.VersionError when it exists)."""
    try:
        from trainer.publish import VersionError
    except ImportError:  # a stand-in store without the publish module
        return (RuntimeError,)
    return (VersionError,)


@dataclass(frozen=True)
class LocalModel:
    """A model held in memory, with the attributes of ``trainer.publish.Published`` that serving reads: for
    benchmarks and tests that serve one fixed model (:class:`StaticStore`)."""

    model: object
    tcfg: object
    device: object
    seq: int = 1
    steps: int = 0
    examples_trained: int = 0
    trained_ts: int = 0
    created_ts: int = 0
    arm: str = "main"
    user_view: object = None
    meta: dict = field(default_factory=dict)
    early_stage: object = None  # trainer.early_stage.EarlyStageModel, for the cascade (serving.cascade_k)
    semantic_ids: object = None  # embedding_store.semantic_ids.SemanticIds when the model reads semantic IDs

    @classmethod
    def of(cls, learner, seq: int = 1, arm: str = "main") -> "LocalModel":
        """From a :class:`trainer.model.Learner` or a :class:`trainer.export.ExportedModel` (put in eval mode)."""
        learner.model.eval()
        now = int(time.time() * 1000)
        es = getattr(learner, "early_stage", None)  # an EarlyStage (its .model) or a model already
        es = getattr(es, "model", es)
        if es is not None:
            es.eval()
        return cls(model=learner.model, tcfg=learner.tcfg, device=learner.device, seq=seq, steps=learner.steps,
                   trained_ts=now, created_ts=now, arm=arm, user_view=getattr(learner, "user_view", None),
                   early_stage=es,
                   semantic_ids=getattr(learner, "semantic_ids", None))


class StaticStore:
    """A store serving one fixed model (``advance`` hands it out once)."""

    def __init__(self, model):
        self.model = model

    def advance(self, current):
        return None if current is self.model else self.model


class ModelSlot:
    """One arm: its store, the version it serves now (``current``, swapped by the poller) and counters."""

    def __init__(self, arm: ArmConfig, store: Store | None):
        self.arm = arm
        self.name = arm.name
        self.shadow = arm.shadow
        self.store = store
        self.current = None  # the Published being served; replaced by one assignment, never mutated
        self.swaps = 0
        self.refused = 0  # advance() calls that raised (a refused version; the previous one keeps serving)
        self.last_error = ""
        self.loaded_mono = 0.0
        self.on_swap: list[Callable[["ModelSlot", object], None]] = []

    def poll(self) -> bool:
        """Ask the store for something newer; True when the slot changed."""
        if self.store is None:
            return False
        try:
            new = self.store.advance(self.current)
        except version_error() as e:  # no version yet, or only bad ones: keep what we have
            if str(e) != self.last_error:
                (log.warning if self.current is not None else log.info)("arm %s: %s", self.name, e)
            self.last_error = str(e)
            if self.current is not None:
                self.refused += 1
            return False
        except Exception as e:  # noqa: BLE001 - a store bug must not stop serving the current version
            if str(e) != self.last_error:
                log.exception("arm %s: loading a new version failed; the current one keeps serving", self.name)
            self.last_error = str(e)
            self.refused += 1
            return False
        if new is None or new is self.current:
            return False
        if new.model is not None:
            new.model.eval()
        first = self.current is None
        self.current = new  # the swap: one reference assignment; in-flight batches keep their object
        self.swaps += 1
        self.loaded_mono = time.monotonic()
        self.last_error = ""
        log.info("arm %s: serving model version %d (steps %d)%s", self.name, new.seq, new.steps,
                 " - ready" if first else "")
        for cb in self.on_swap:
            try:
                cb(self, new)
            except Exception:  # noqa: BLE001
                log.exception("arm %s: a swap listener failed", self.name)
        return True

    def describe(self) -> dict:
        """This slot for ``GET /models``."""
        cur = self.current
        out = {"arm": self.name, "shadow": self.shadow, "share": self.arm.share, "ready": cur is not None,
               "swaps": self.swaps, "refused": self.refused, "last_error": self.last_error or None}
        if cur is not None:
            now = int(time.time() * 1000)
            out.update({"seq": cur.seq, "steps": cur.steps, "trained_ts": cur.trained_ts,
                        "created_ts": cur.created_ts,
                        "age_s": round((now - cur.trained_ts) / 1000.0, 3) if cur.trained_ts else None})
        lister = getattr(self.store, "list", None)
        if lister is not None:
            try:
                infos = lister()
                out["versions"] = len(infos)
                out["versions_refused"] = sum(1 for v in infos if not getattr(v, "ok", True))
            except Exception as e:  # noqa: BLE001 - a listing problem is reported, not raised
                out["versions_error"] = str(e)[:300]
        return out


class Poller:
    """A thread calling :meth:`ModelSlot.poll` on every slot every ``poll_s`` (first poll at once), then its
    ``hooks``."""

    def __init__(self, slots: Sequence[ModelSlot], poll_s: float, hooks: Sequence[Callable[[], None]] = ()):
        self.slots = list(slots)
        self.poll_s = poll_s
        self.hooks = list(hooks)  # run after every poll (in this thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        return sum(slot.poll() for slot in self.slots)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-models", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.poll_once()
            for hook in self.hooks:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - a hook's failure must not stop the swaps
                    log.exception("serving: a model poller hook failed")
            if self._stop.wait(self.poll_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def table_rows(published, table: int, ids: np.ndarray) -> np.ndarray:
    """The served model's embedding rows of raw ``ids`` in table number ``table`` (trainer.features.table_names
    order), (N, D) float32: one lookup through the model's own embedding module (any backend)."""
    import torch

    from trainer.features import hash_ids, table_names

    ids = np.asarray(ids, dtype=np.uint64)
    n, t_all = len(ids), len(table_names(published.tcfg))
    rows = hash_ids(ids, np.full(n, table), published.tcfg.hash_buckets)
    lengths = np.zeros((t_all, n), np.int64)
    lengths[table] = 1
    offsets = np.zeros(t_all * n + 1, np.int64)
    np.cumsum(lengths.ravel(), out=offsets[1:])
    dev = published.device
    with torch.no_grad():
        out = published.model.emb(torch.from_numpy(rows).to(dev), torch.from_numpy(offsets).to(dev))
    d = published.tcfg.embedding_dim
    return out.view(n, t_all, d)[:, table].float().cpu().numpy()
