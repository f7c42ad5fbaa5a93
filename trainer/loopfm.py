"""LoopFM: the FM's user and ad representations, published by the FM and read by VMs as input features.

**What the FM publishes** (:func:`fm_embeddings`): per distinct user of a batch its *user-side* vector, per
distinct ad its *ad-side* vector, both of width :func:`representation_dim` = ``embedding_dim`` (+ ``user_dim``
with the user model on)::

    u_fm = [ sum_{t in USER_SIDE} e_t(impression) ,  u_usermodel(user) ]          (user_id, device, country, history)
    a_fm = [ sum_{t in AD_SIDE}   e_t(impression) ,  v_ad_usermodel(ad) ]          (ad_id, campaign_id, advertiser_id)

``e_t`` are the FM's pooled embedding rows (trainer/model.py), summed per side exactly like the FM shortcut
(:func:`trainer.model._shortcuts`) sums them. So the vectors carry what the FM learned in three parts, each
useful to a VM:

- coordinates ``[0, N_OBJ)``: the first-order weights: the user's and the ad's learned click/conversion
  bias (the FM's wide term; an ad's is its CTR as the FM sees it with all domains' data);
- coordinates ``[N_OBJ, embedding_dim)``: the FM factors: ``<u_fm, a_fm>`` over them is the FM's
  user x ad interaction term (without the context tables, position and cat, which are per impression),
  so ``u_fm * a_fm`` in the VM's input is that interaction term coordinate by coordinate;
- with the user model on, the user model's user vector and its embedding of the ad (LLaTTE): their inner
  product is the user model's click score, so ``u_fm * a_fm`` carries it too.

The user side of an impression also holds its device, country and history: a user's vector is taken at the
user's last impression in the batch (its newest history). An ad's side is per ad. The raw embedding rows are
not published: a VM never shares the FM's hashing or table sizes, only ids.

**When** (:class:`LoopFMPublisher`): after training, the users and ads a batch touched are marked; every
``trainer.loopfm_publish_every_s`` (0: after every batch) the FM computes the marked ids' vectors *as it is
now* (the newest weights, after the update) and publishes them, at most :data:`MAX_IDS_PER_MESSAGE` ids per
message, ``model_version`` = the FM's step count, ``ts`` = wall-clock ms. At most :data:`MAX_PENDING` ids
wait (more: it publishes at once). Traffic: one vector per distinct id touched per interval, JSON floats
~21 bytes each (measured: 341 bytes per id at dim 16), so ~1 KB per id at dim 48; an FM training 10k examples/s over 5k distinct users and 1k ads a
second publishes ~6k ids/s ~ 5.5 MB/s in ~25 messages/s (at 1 s; the interval caps it at the number of
distinct ids per interval, however fast the FM trains).

**What a VM reads** (:class:`FMEmbeddingView`, fed by :class:`embedding_store.fm_embeddings.FMEmbeddingStore`):
per impression ``[u_fm, a_fm, u_fm * a_fm, present]`` (B, 3*dim + 1); a missing or stale (older than
``trainer.loopfm_max_age_s``) side is zeros, and ``present`` is 1 only when both sides are there. The VM's
model takes it as the ``loopfm_in`` block of its input (trainer/model.py, like the user model's ``user_in``).

Serving: a VM trained with ``trainer.loopfm`` needs the store at serving time; the ranking service does not
read it yet, so published versions of such a model are refused by serving (trainer/publish.py) and
:func:`trainer.features.impression_batch` refuses to build its input without a view.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch

from config import Config, TrainerConfig
from streams import schema

log = logging.getLogger("streamrec.loopfm")

AD_SIDE = ("ad_id", "campaign_id", "advertiser_id")
MAX_IDS_PER_MESSAGE = 256  # ~230 KB per message at dim 48 (JSON), under Kafka's default 1 MB
MAX_PENDING = 100_000  # marked ids waiting for the next publish (then it publishes at once)


def representation_dim(tcfg: TrainerConfig) -> int:
    """Width of the vectors an FM with ``tcfg`` publishes."""
    return tcfg.embedding_dim + (tcfg.user_dim if tcfg.user_model else 0)


def _last_per(imps: Sequence[schema.Impression], key: str) -> dict[int, schema.Impression]:
    out: dict[int, schema.Impression] = {}
    for i in imps:  # later impressions win: the newest history
        out[getattr(i, key)] = i
    return out


@torch.no_grad()
def side_vectors(learner, last: dict[int, schema.Impression], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), vectors (N, d)) for ``last`` (id -> the impression to take it from), ``key`` "user_id" (the
    user side) or "ad_id" (the ad side), as ``learner``'s model sees them now. Changes nothing."""
    from trainer.features import featurize_impressions, table_names
    from trainer.model import USER_SIDE

    tcfg = learner.tcfg
    ids = np.fromiter(last.keys(), np.int64, len(last))
    if not len(ids):
        return ids, np.zeros((0, representation_dim(tcfg)), np.float32)
    names = table_names(tcfg)
    side = USER_SIDE if key == "user_id" else AD_SIDE
    sel = [i for i, n in enumerate(names) if n in side]
    idx, off, _, _ = featurize_impressions(list(last.values()), tcfg)
    dev = learner.device
    e = learner.model.emb(torch.from_numpy(idx).to(dev), torch.from_numpy(off).to(dev))
    e = e.view(len(ids), len(names), -1)[:, sel].sum(1).float().cpu().numpy()
    if tcfg.user_model:
        e = np.concatenate([e, _user_model_part(learner, key, ids)], axis=1)
    return ids, e.astype(np.float32, copy=False)


def representations(learner, imps: Sequence[schema.Impression]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids (U,), user vectors (U, d), ad ids (A,), ad vectors (A, d)) of the distinct users and ads of
    ``imps`` (a user at its last impression) as ``learner``'s model sees them now."""
    uids, uvecs = side_vectors(learner, _last_per(imps, "user_id"), "user_id")
    aids, avecs = side_vectors(learner, _last_per(imps, "ad_id"), "ad_id")
    return uids, uvecs, aids, avecs


def _user_model_part(learner, key: str, ids: np.ndarray) -> np.ndarray:
    """The user model's user vectors (``user_id``) or ad embeddings (``ad_id``); zeros without a user view."""
    view = getattr(learner, "user_view", None)
    if view is None:
        return np.zeros((len(ids), learner.tcfg.user_dim), np.float32)
    if key == "user_id":  # features = [u, u * v_ad]: u is the first half (zeros for a user not yet encoded)
        # scaled by 1 / sqrt(dim): the pair's inner product over these coordinates is then the user model's own
        # affinity logit <u, v_ad> / sqrt(dim), the scale of the FM's factor terms it is summed with in a VM's
        # LoopFM shortcut (unscaled, it entered sqrt(dim) times too large: bench llatte's VMs' NE 1.34-1.59)
        return view.features(ids, np.zeros_like(ids))[:, :view.dim] * np.float32(view.dim ** -0.5)
    from trainer.users.model import ad_rows

    return view.ad_table[torch.from_numpy(ad_rows(ids, view.ad_table.shape[0]))].detach().cpu().numpy()


def _messages(kind: str, ids: np.ndarray, vecs: np.ndarray, version: int, ts: int, max_ids: int
              ) -> list[schema.FMEmbeddings]:
    d = vecs.shape[1]
    return [schema.FMEmbeddings(kind=kind, model_version=version, ts=ts, dim=d, ids=ids[s:s + max_ids].tolist(),
                                vectors=vecs[s:s + max_ids].ravel().tolist())
            for s in range(0, len(ids), max_ids)]


def fm_embeddings(learner, imps: Sequence[schema.Impression], now_ms: int | None = None,
                  max_ids: int = MAX_IDS_PER_MESSAGE) -> list[schema.FMEmbeddings]:
    """What an FM publishes for ``imps``: user records, then ad records, at most ``max_ids`` ids each, with
    the FM's model version (``learner.steps``) and ``now_ms`` (default: now)."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    uids, uvecs, aids, avecs = representations(learner, imps)
    return (_messages("user", uids, uvecs, learner.steps, ts, max_ids)
            + _messages("ad", aids, avecs, learner.steps, ts, max_ids))


class LoopFMPublisher:
    """The FM trainer's side: :meth:`mark` the impressions of each trained batch, :meth:`maybe_publish` between
    batches (every ``every_s``; ``force`` at shutdown); see the module docstring."""

    def __init__(self, learner, producer, topic: str, every_s: float):
        self.learner, self.producer, self.topic, self.every_s = learner, producer, topic, every_s
        self._users: dict[int, schema.Impression] = {}
        self._ads: dict[int, schema.Impression] = {}
        self._last = time.monotonic()
        self.counters = {"loopfm_published_ids": 0, "loopfm_published_messages": 0, "loopfm_published_bytes": 0}

    def mark(self, imps: Sequence[schema.Impression]) -> None:
        self._users.update(_last_per(imps, "user_id"))
        self._ads.update(_last_per(imps, "ad_id"))

    def pending(self) -> int:
        return len(self._users) + len(self._ads)

    def maybe_publish(self, force: bool = False) -> int:
        """Publish the marked ids when due; returns the number of messages produced."""
        now = time.monotonic()
        if not self.pending() or not (force or now - self._last >= self.every_s or self.pending() >= MAX_PENDING):
            return 0
        self._last = now
        ts, version = int(time.time() * 1000), self.learner.steps
        recs = [*_messages("user", *side_vectors(self.learner, self._users, "user_id"), version, ts,
                           MAX_IDS_PER_MESSAGE),
                *_messages("ad", *side_vectors(self.learner, self._ads, "ad_id"), version, ts, MAX_IDS_PER_MESSAGE)]
        self._users, self._ads = {}, {}
        from streams.bus import kafka_io

        for r in recs:
            raw = schema.encode(r)
            kafka_io.produce(self.producer, self.topic, raw)
            self.counters["loopfm_published_ids"] += len(r.ids)
            self.counters["loopfm_published_bytes"] += len(raw)
        self.counters["loopfm_published_messages"] += len(recs)
        return len(recs)

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counters.items()}


class FMEmbeddingView:
    """A VM's LoopFM features from a :class:`~embedding_store.fm_embeddings.FMEmbeddingStore`:
    ``features_of(imps) -> (B, 3*dim + 1)`` float32 ``[u_fm, a_fm, u_fm * a_fm, present]``, zeros and
    present 0 where a side is missing or stale; ``stats()``: the store's counters and ``loopfm_age_p50_s``.

    ``standardize``: divide each coordinate of ``u_fm`` and ``a_fm`` by its running RMS over the vectors the FM
    published (:meth:`FMEmbeddingStore.rms`) before the product. Off by default: the first-order coordinates are
    ~50x the FM factors (mean |x| 0.9-2.0 against 0.02-0.05), which looked like it would starve the factors, but
    the raw vectors gave the VM the higher AUC in 6 of 7 runs of ``benchmarks/loopfm.py`` (e.g. feed, 60k:
    0.6829 raw, 0.6805 standardized, 0.6690 alone): the running scale moves under the VM's weights.

    >>> from embedding_store.fm_embeddings import FMEmbeddingStore
    >>> st = FMEmbeddingStore(dim=2, max_age_s=60)
    >>> st.apply(schema.FMEmbeddings(kind="user", model_version=1, ts=1000, dim=2, ids=[7], vectors=[1.0, 2.0]), 1000)
    >>> st.apply(schema.FMEmbeddings(kind="ad", model_version=1, ts=1000, dim=2, ids=[3], vectors=[3.0, 0.5]), 1000)
    >>> imp = schema.Impression(event_id="i", ts=1, user_id=7, ad_id=3, campaign_id=1, advertiser_id=1, domain="feed")
    >>> FMEmbeddingView(st).features_of([imp], now_ms=2000).tolist()   # [u, a, u * a, present]
    [[1.0, 2.0, 3.0, 0.5, 3.0, 1.0, 1.0]]
    >>> FMEmbeddingView(st, standardize=True).features_of([imp], now_ms=2000).tolist()   # one vector each: its RMS
    [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    """

    def __init__(self, store, standardize: bool = False):
        self.store = store
        self.dim = store.dim
        self.standardize = standardize

    def _side(self, kind: str, ids: list[int], now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        v, ok = self.store.lookup(kind, ids, now_ms)
        if self.standardize:
            rms = self.store.rms(kind)
            if rms is not None:
                v = v / np.maximum(rms, 1e-6)
        return v, ok

    def features_of(self, imps: Sequence[schema.Impression], now_ms: int | None = None) -> np.ndarray:
        n = len(imps)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        u, u_ok = self._side("user", [i.user_id for i in imps], now_ms)
        a, a_ok = self._side("ad", [i.ad_id for i in imps], now_ms)
        present = (u_ok & a_ok).astype(np.float32).reshape(n, 1)
        return np.concatenate([u, a, u * a, present], axis=1).astype(np.float32, copy=False)

    def stats(self) -> dict[str, float]:
        return self.store.stats()


class LoopFM:
    """What a :class:`trainer.loop.Trainer` runs for LoopFM: an FM (``role`` fm) publishes; a trainer with
    ``loopfm`` on consumes into a store and reads its features. ``for_trainer(cfg, learner)`` is None when
    neither applies. ``start(producer)`` (in ``run``), ``after_step(imps)`` (each trained batch), ``tick()``
    (between batches), ``close()``, ``stats()``."""

    def __init__(self, cfg: Config, learner, publish: bool, consume: bool):
        self.cfg, self.learner = cfg, learner
        self.publish, self.consume = publish, consume
        self.publisher: LoopFMPublisher | None = None
        self.consumer = None
        self.store = None
        if consume:
            from embedding_store.fm_embeddings import FMEmbeddingStore

            self.store = FMEmbeddingStore(cfg.trainer.loopfm_dim, cfg.trainer.loopfm_max_age_s)
            learner.loopfm_view = FMEmbeddingView(self.store)

    @classmethod
    def for_trainer(cls, cfg: Config, learner) -> "LoopFM | None":
        tc = cfg.trainer
        publish, consume = tc.role == "fm", tc.loopfm and tc.role != "fm"
        if publish and representation_dim(tc) != tc.loopfm_dim:
            log.warning("this FM publishes vectors of width %d (embedding_dim + user_dim), but trainer.loopfm_dim "
                        "is %d: VMs with that setting will refuse them (dead letters)",
                        representation_dim(tc), tc.loopfm_dim)
        if consume and tc.publish_dir:
            log.warning("trainer.loopfm is on: the versions this trainer publishes to %s need the FM embedding store "
                        "at serving time, which serving does not read; `streamrec serve` refuses them",
                        tc.publish_dir)
        return cls(cfg, learner, publish, consume) if publish or consume else None

    def start(self, producer) -> None:
        if self.publish:
            self.publisher = LoopFMPublisher(self.learner, producer, self.cfg.topics.fm_embeddings,
                                             self.cfg.trainer.loopfm_publish_every_s)
        if self.consume and self.consumer is None:
            from embedding_store.fm_embeddings import FMEmbeddingConsumer

            self.consumer = FMEmbeddingConsumer(self.cfg, self.store).start()

    def after_step(self, imps: Sequence[schema.Impression]) -> None:
        if self.publisher is not None:
            self.publisher.mark(imps)
            self.publisher.maybe_publish()

    def tick(self, force: bool = False) -> None:
        """Between batches: publish what is due (``force``: everything marked, e.g. before the last checkpoint)."""
        if self.publisher is not None:
            self.publisher.maybe_publish(force)

    def close(self) -> None:
        """Stop the consumer thread (the store keeps its contents)."""
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def stats(self) -> dict[str, float]:
        out = self.publisher.stats() if self.publisher is not None else {}
        if self.store is not None:
            out.update(self.store.stats())
        return out
