"""A batch of :class:`~streams.schema.Example` -> model tensors, vectorised with numpy.

Sparse fields are hashed into ``hash_buckets`` rows per table and laid out as fbgemm TBE input:
``indices`` (all ids, table-major, then example, then position in the bag) and ``offsets`` of length
``T*B + 1`` where bag ``(t, b)`` spans ``indices[offsets[t*B + b] : offsets[t*B + b + 1]]``.

Tables (``T = 8 + cat_slots``), in this order::

    user_id, ad_id, campaign_id, advertiser_id, position, device, country, cat_0 .. cat_{k-1}, history

Every single-valued field is a bag of one id; a missing ``cat`` slot is an empty bag (pools to zero);
``history`` is a bag of the last ``history_len`` ids.

>>> from streams import schema
>>> from config import TrainerConfig
>>> imp = schema.Impression(event_id="i1", ts=1_700_000_000_000, user_id=7, ad_id=3, campaign_id=1,
...                         advertiser_id=1, domain="video", cat=[5], dense=[2.0, -3.0], history=[1, 2, 3])
>>> ex = schema.Example(example_id="e1", impression=imp, click=1, conversion=0)
>>> fb = featurize([ex, ex], TrainerConfig(cat_slots=2, dense_dim=3, history_len=2))
>>> fb.num_tables, fb.batch_size, fb.offsets.shape, fb.indices.shape   # (7 single + 1 cat + 2 history ids) x 2
(10, 2, (21,), (20,))
>>> [round(float(x), 3) for x in fb.dense[0]], fb.domain.tolist(), fb.click.tolist()
([2.0, -3.0, 0.0], [2, 2], [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np

from embedding_store.ids import splitmix64
from streams import schema
from config import TrainerConfig

SINGLE_FIELDS: tuple[str, ...] = ("user_id", "ad_id", "campaign_id", "advertiser_id", "position", "device",
                                  "country")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def table_names(tcfg: TrainerConfig) -> list[str]:
    """Names of the embedding tables in TBE order (``ad_sid`` last, with ``ad_id_features = hash+sid_ngram``)."""
    return [*SINGLE_FIELDS, *(f"cat_{i}" for i in range(tcfg.cat_slots)), "history",
            *(["ad_sid"] if tcfg.ad_id_features == "hash+sid_ngram" else [])]


_str_ids: dict[str, int] = {}


def stable_str_id(s: str) -> int:
    """A process-independent 63-bit id for a string (Python's ``hash()`` is salted per process)."""
    v = _str_ids.get(s)
    if v is None:
        v = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1
        if len(_str_ids) < 100_000:  # device/country: a handful of values; bound it anyway
            _str_ids[s] = v
    return v


def hash_ids(ids: np.ndarray, tables: np.ndarray, buckets: int) -> np.ndarray:
    """Row of each raw id in its table: ``splitmix64(id ^ salt(table)) % buckets``, as int64.

    The per-table salt (golden-ratio multiple) sends the same raw id to different rows in different tables.

    ``ids``: uint64 (N,), ``tables``: int (N,) table index per id.
    """
    salts = (np.uint64(0x9E3779B97F4A7C15) * (tables.astype(np.uint64) + np.uint64(1))) & _MASK64
    return (splitmix64(ids ^ salts) % np.uint64(buckets)).astype(np.int64)


@dataclass(frozen=True)
class FeatureBatch:
    """Model inputs of B examples (numpy; see :meth:`to_torch`).

    indices (N,) int64, offsets (T*B+1,) int64, dense (B, dense_dim) float32, domain (B,) int64,
    click / conversion / weight (B,) float32, event_ts / emitted_ts (B,) int64, example_ids / domains: lists;
    decided (B,) int8 (:data:`trainer.delay.DECIDED` code), late (B,) int8 (:func:`trainer.delay.late_kind`),
    click_delay_ms / conversion_delay_ms (B,) int64: feedback ts - impression ts, -1 where absent.

    Teacher columns (foundation-model distillation, docs/transfer.md), None when no example of the batch has a
    teacher (:attr:`~streams.schema.Example.teacher`): ``has_teacher`` (B,) float32 1/0, ``teacher_p_click`` and
    ``teacher_p_conversion`` (B,) float32 (0 where absent), ``teacher_age_s`` (B,) float32: how far apart the
    FM's scoring and the example's emission are, ``|scored_ts - emitted_ts|`` in seconds (the FM's lag behind the
    stream; 0 where absent), ``teacher_version`` (B,) int64: the FM's ``model_version`` (-1 where absent).
    """

    indices: np.ndarray
    offsets: np.ndarray
    dense: np.ndarray
    domain: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    weight: np.ndarray
    event_ts: np.ndarray
    emitted_ts: np.ndarray
    example_ids: list[str]
    domains: list[str]
    num_tables: int
    decided: np.ndarray | None = None
    late: np.ndarray | None = None
    click_delay_ms: np.ndarray | None = None
    conversion_delay_ms: np.ndarray | None = None
    user: np.ndarray | None = None  # (B, 2 * user_dim) float32 user-model features (trainer/users/features.py)
    loopfm: np.ndarray | None = None  # (B, 3 * loopfm_dim + 1) float32 the FM's vectors (trainer/loopfm.py)
    solaris: np.ndarray | None = None  # (B, 3) float32 the FM's cached pair prediction (trainer/solaris.py)
    has_teacher: np.ndarray | None = None
    teacher_p_click: np.ndarray | None = None
    teacher_p_conversion: np.ndarray | None = None
    teacher_age_s: np.ndarray | None = None
    teacher_version: np.ndarray | None = None
    cohort: list[str] | None = None  # each example's cohort "domain/activity/country" (trainer/cohorts.py)

    @property
    def batch_size(self) -> int:
        return len(self.example_ids)

    def to_torch(self, device) -> "TorchBatch":
        import torch

        def t(a):
            return torch.from_numpy(a).to(device, non_blocking=True)

        return TorchBatch(indices=t(self.indices), offsets=t(self.offsets), dense=t(self.dense),
                          domain=t(self.domain), click=t(self.click), conversion=t(self.conversion),
                          weight=t(self.weight), num_tables=self.num_tables, batch_size=self.batch_size,
                          user=None if self.user is None else t(self.user),
                          loopfm=None if self.loopfm is None else t(self.loopfm),
                          solaris=None if self.solaris is None else t(self.solaris),
                          **({} if self.has_teacher is None else {
                              "has_teacher": t(self.has_teacher), "teacher_p_click": t(self.teacher_p_click),
                              "teacher_p_conversion": t(self.teacher_p_conversion),
                              "teacher_age_s": t(self.teacher_age_s)}))


@dataclass(frozen=True)
class TorchBatch:
    """The tensors of a :class:`FeatureBatch` on the training device (same shapes)."""

    indices: object
    offsets: object
    dense: object
    domain: object
    click: object
    conversion: object
    weight: object
    num_tables: int
    batch_size: int
    user: object = None
    loopfm: object = None
    solaris: object = None
    has_teacher: object = None  # the teacher columns of the FeatureBatch (B,) float32, None when it has none
    teacher_p_click: object = None
    teacher_p_conversion: object = None
    teacher_age_s: object = None


DENSE_LINEAR_RANGE = 3.0


def soft_log(x: np.ndarray, c: float = DENSE_LINEAR_RANGE) -> np.ndarray:
    """The dense input transform: the identity on ``[-c, c]``, logarithmic beyond (continuous at ``±c``).

    ``Impression.dense`` is already on a model scale: the formats log counts (``streams.sources.formats.signed_log1p``)
    and keep normalised features as they are. A second log bent those linear effects (the generator's dense
    term is linear: study 1 of ``bench quality`` lost 0.1 AUC points to it); the tail only keeps a stray
    raw magnitude from blowing up the cross layers.

    >>> soft_log(np.array([-2.0, 0.5, 3.0, 3.0 + (np.e - 1), 1e6])).round(3).tolist()
    [-2.0, 0.5, 3.0, 4.0, 16.816]
    """
    a = np.abs(x)
    return np.where(a <= c, x, np.sign(x) * (c + np.log1p(np.maximum(a - c, 0.0))))


def _ragged(lists: Sequence[Sequence], width: int, dtype, tail: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pad/truncate lists to ``width``: (values (B, width), mask (B, width)); ``tail`` keeps the last items."""
    cut = [x[-width:] if tail else x[:width] for x in lists] if width > 0 else [[] for _ in lists]
    lens = np.fromiter((len(x) for x in cut), dtype=np.int64, count=len(cut))
    mask = np.arange(width)[None, :] < lens[:, None]
    out = np.zeros((len(cut), width), dtype=dtype)
    out[mask] = np.fromiter(chain.from_iterable(cut), dtype=dtype, count=int(lens.sum()))
    return out, mask


def featurize_impressions(imps: Sequence[schema.Impression], tcfg: TrainerConfig, sids=None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Impressions -> (indices, offsets, dense, domain); see the module docstring for the layout, and
    :func:`semantic_id_bags` for the ad id's bags when ``tcfg.ad_id_features`` is not ``hash`` (``sids``: the
    :class:`embedding_store.semantic_ids.SemanticIds` that codes the ads)."""
    b = len(imps)
    k, hl = tcfg.cat_slots, tcfg.history_len
    single = np.empty((7 + k, b), dtype=np.uint64)
    single[0] = np.fromiter((i.user_id for i in imps), dtype=np.uint64, count=b)
    single[1] = np.fromiter((i.ad_id for i in imps), dtype=np.uint64, count=b)
    single[2] = np.fromiter((i.campaign_id for i in imps), dtype=np.uint64, count=b)
    single[3] = np.fromiter((i.advertiser_id for i in imps), dtype=np.uint64, count=b)
    single[4] = np.fromiter((i.position for i in imps), dtype=np.uint64, count=b)
    single[5] = np.fromiter((stable_str_id(i.device) for i in imps), dtype=np.uint64, count=b)
    single[6] = np.fromiter((stable_str_id(i.country) for i in imps), dtype=np.uint64, count=b)
    present = np.ones((7 + k, b), dtype=bool)
    if k:
        cat, cmask = _ragged([i.cat for i in imps], k, np.uint64)
        single[7:] = cat.T
        present[7:] = cmask.T
    hist, hmask = _ragged([i.history for i in imps], hl, np.uint64, tail=True)
    n_single = 7 + k
    # boolean indexing of (T, B) arrays walks table-major then example: exactly the TBE bag order
    single_tables = np.broadcast_to(np.arange(n_single)[:, None], (n_single, b))
    ids = np.concatenate([single[present], hist[hmask]])
    tables = np.concatenate([single_tables[present], np.full(int(hmask.sum()), n_single)])
    lengths = np.concatenate([present.ravel().astype(np.int64), hmask.sum(axis=1)])
    if tcfg.ad_id_features != "hash":
        path = path_tokens(single, present, tcfg) if tcfg.sid_path else None
        ids, tables, lengths = semantic_id_bags(ids, tables, lengths, single[1], b, tcfg, sids, path)
    indices = hash_ids(ids, tables, tcfg.hash_buckets)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dense, _ = _ragged([i.dense for i in imps], tcfg.dense_dim, np.float64)
    dense = soft_log(dense).astype(np.float32)
    domain = np.fromiter((schema.DOMAIN_INDEX[i.domain] for i in imps), dtype=np.int64, count=b)
    return indices, offsets, dense, domain


# -- semantic IDs (trainer.ad_id_features; embedding_store/semantic_ids.py) -----------------------------------

def path_tokens(single: np.ndarray, present: np.ndarray, tcfg: TrainerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Prefix tokens (B, L) uint64 of the category path ``tcfg.sid_path`` (feature names, coarse to fine) read
    off the impressions' single-valued fields ``single`` (7 + cat_slots, B), and known (B,): the path's first
    field is present. The prefix of length ``j`` is ``(j << 56) | h_j`` with ``h_j`` a 56-bit hash of the
    first ``j`` values (as :mod:`embedding_store.semantic_ids` lays out k-means codes)."""
    names = [*SINGLE_FIELDS, *(f"cat_{i}" for i in range(tcfg.cat_slots))]
    unknown = [f for f in tcfg.sid_path if f not in names]
    if unknown:
        raise ValueError(f"trainer.sid_path: unknown {unknown} (features: {', '.join(names)})")
    rows = [names.index(f) for f in tcfg.sid_path]
    b = single.shape[1]
    out = np.empty((b, len(rows)), np.uint64)
    h = np.zeros(b, np.uint64)
    mask56 = np.uint64((1 << 56) - 1)
    for j, r in enumerate(rows):
        v = np.where(present[r], single[r], np.uint64(0))
        h = splitmix64(h ^ splitmix64(v + np.uint64(j + 1)))
        out[:, j] = (np.uint64(j + 1) << np.uint64(56)) | (h & mask56)
    return out, present[rows[0]].copy()


def semantic_id_bags(ids: np.ndarray, tables: np.ndarray, lengths: np.ndarray, ad_ids: np.ndarray, b: int,
                     tcfg: TrainerConfig, sids=None, path: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hashed-id layout (raw ``ids``, their ``tables``, bag ``lengths`` (T*B,)) with the ad id's bags
    rewritten for ``tcfg.ad_id_features``; ``ad_ids`` (B,) uint64 the batch's raw ad ids; ``sids`` codes them
    (:meth:`~embedding_store.semantic_ids.SemanticIds.ad_tokens`; None: no ad is known).

    * ``sid``: the ad_id bag holds the full code's token (the last prefix) instead of the raw id;
    * ``sid_ngram``: the ad_id bag holds the ``sid_levels`` prefix tokens (sum-pooled);
    * ``hash+sid_ngram``: the ad_id bag keeps the raw id; the prefix tokens fill a last table, ``ad_sid``.

    An ad without a code (no content seen yet, or no codebook yet) keeps its raw id in the ad_id bag and has an
    empty ``ad_sid`` bag: it is hashed as before until its creative arrives.

    >>> from config import TrainerConfig
    >>> from embedding_store.semantic_ids import SemanticIdConfig, SemanticIds
    >>> s = SemanticIds(SemanticIdConfig(levels=2, codes=2, fit_min_ads=2), dim=1)
    >>> _ = s.add(np.array([10, 20]), np.array([[0.0], [5.0]], np.float32))
    >>> tc = TrainerConfig(cat_slots=0, history_len=0, ad_id_features="sid_ngram", sid_levels=2, sid_codes=2)
    >>> raw = np.array([1, 2, 10, 99], np.uint64)  # user_id and ad_id of two examples, table-major
    >>> ids, tables, lengths = semantic_id_bags(raw, np.array([0, 0, 1, 1]), np.ones(4, np.int64),
    ...                                          np.array([10, 99], np.uint64), 2, tc, s)
    >>> lengths.tolist(), tables.tolist(), int(ids[2] >> 56), int(ids[3] >> 56), int(ids[4])
    ([1, 1, 2, 1], [0, 0, 1, 1, 1], 1, 2, 99)
    """
    mode = tcfg.ad_id_features
    levels = len(tcfg.sid_path) or tcfg.sid_levels
    if path is not None:  # trainer.sid_path: the impressions' own category path (:func:`path_tokens`)
        tok, known = path
    elif sids is not None:
        tok, known = sids.ad_tokens(ad_ids.astype(np.int64))
    else:
        tok, known = np.zeros((b, levels), np.uint64), np.zeros(b, bool)
    if tok.shape[1] != levels:
        raise ValueError(f"semantic ids have {tok.shape[1]} levels, trainer.sid_levels is {levels}")
    ad_t = SINGLE_FIELDS.index("ad_id")
    lo = int(lengths[:ad_t * b].sum())  # the ad_id bags are one id each: ids[lo:lo + b]
    if mode == "hash+sid_ngram":
        new_ids = tok[known].ravel()
        extra_len = np.where(known, levels, 0).astype(np.int64)
        return (np.concatenate([ids, new_ids]),
                np.concatenate([tables, np.full(len(new_ids), len(table_names(tcfg)) - 1)]),
                np.concatenate([lengths, extra_len]))
    if mode == "sid":
        bag_ids = np.where(known, tok[:, -1], ad_ids)
        out_ids = ids.copy()
        out_ids[lo:lo + b] = bag_ids
        return out_ids, tables, lengths
    if mode != "sid_ngram":
        raise ValueError(f"trainer.ad_id_features: unknown {mode!r}")
    per = np.where(known, levels, 1).astype(np.int64)
    bag = np.where(known[:, None], tok, np.concatenate([ad_ids[:, None], np.zeros((b, levels - 1), np.uint64)],
                                                       axis=1))
    mask = np.arange(levels)[None, :] < per[:, None]
    new_ids = bag[mask]
    out_len = lengths.copy()
    out_len[ad_t * b:(ad_t + 1) * b] = per
    return (np.concatenate([ids[:lo], new_ids, ids[lo + b:]]),
            np.concatenate([tables[:lo], np.full(len(new_ids), ad_t), tables[lo + b:]]), out_len)


def impression_batch(imps: Sequence[schema.Impression], tcfg: TrainerConfig, device, users=None,
                     loopfm=None, sids=None) -> "TorchBatch":
    """Impressions to score (no labels): the :class:`TorchBatch` a model's forward takes, on ``device``, with the
    user-model input from ``users`` (:func:`user_features`) and the LoopFM input from ``loopfm``
    (:func:`loopfm_features`; required when ``tcfg.loopfm``: ValueError without). Labels and weights are zeros."""
    import torch

    if tcfg.loopfm and loopfm is None:
        raise ValueError("this model reads LoopFM features (trainer.loopfm: the FM's user and ad vectors), which "
                         "need the FM embedding store; scoring it without one (serving, offline scoring) is not "
                         "supported: serve a model trained with trainer.loopfm off")
    if tcfg.solaris:
        raise ValueError("this model reads SOLARIS features (trainer.solaris: the FM's cached pair predictions), "
                         "which need the pair cache; scoring it without one (serving, offline scoring) is not "
                         "supported: serve a model trained with trainer.solaris off")
    idx, off, dense, dom = featurize_impressions(imps, tcfg, sids)
    user = user_features(imps, tcfg, users)
    lf = loopfm_features(imps, tcfg, loopfm)
    zeros = torch.zeros(len(imps), device=device)
    return TorchBatch(indices=torch.from_numpy(idx).to(device), offsets=torch.from_numpy(off).to(device),
                      dense=torch.from_numpy(dense).to(device), domain=torch.from_numpy(dom).to(device),
                      click=zeros, conversion=zeros, weight=zeros, num_tables=0, batch_size=len(imps),
                      user=None if user is None else torch.from_numpy(user).to(device),
                      loopfm=None if lf is None else torch.from_numpy(lf).to(device))


def _delays(fb_ts: Sequence[int | None], imp_ts: np.ndarray) -> np.ndarray:
    t = np.fromiter((-1 if x is None else x for x in fb_ts), dtype=np.int64, count=len(imp_ts))
    return np.where(t >= 0, np.maximum(t - imp_ts, 0), -1)


def user_features(imps: Sequence[schema.Impression], tcfg: TrainerConfig, users=None) -> np.ndarray | None:
    """The ranker's user-model input (B, 2 * user_dim): from ``users`` (a
    :class:`trainer.users.features.UserVectors`), zeros without one; None when ``tcfg.user_model`` is off."""
    if not tcfg.user_model:
        return None
    if users is None:
        return np.zeros((len(imps), 2 * tcfg.user_dim), np.float32)
    return users.features_of(imps)


def loopfm_features(imps: Sequence[schema.Impression], tcfg: TrainerConfig, view=None) -> np.ndarray | None:
    """A VM's LoopFM input (B, 3 * loopfm_dim + 1): from ``view`` (a :class:`trainer.loopfm.FMEmbeddingView`),
    zeros (present = 0) without one; None when ``tcfg.loopfm`` is off."""
    if not tcfg.loopfm:
        return None
    if view is None:
        return np.zeros((len(imps), 3 * tcfg.loopfm_dim + 1), np.float32)
    return view.features_of(imps)


def solaris_features(imps: Sequence[schema.Impression], tcfg: TrainerConfig, view=None) -> np.ndarray | None:
    """A VM's SOLARIS input (B, 3) ``[logit p_click, logit p_cvr, present]``: from ``view`` (a
    :class:`trainer.solaris.SolarisView`), zeros (present = 0) without one; None when ``tcfg.solaris`` is off."""
    if not tcfg.solaris:
        return None
    if view is None:
        return np.zeros((len(imps), 3), np.float32)
    return view.features_of(imps)


def featurize(examples: Sequence[schema.Example], tcfg: TrainerConfig, users=None, loopfm=None, sids=None,
              cohorts=None, solaris=None) -> FeatureBatch:
    """Examples -> :class:`FeatureBatch` (domains must be known: ``schema.decode`` guarantees it);
    ``users``: see :func:`user_features`; ``loopfm``: see :func:`loopfm_features`; ``sids``: see
    :func:`semantic_id_bags`; ``cohorts``: a :class:`trainer.cohorts.CohortAssigner` names each example's
    cohort (and counts it), None: no cohorts; ``solaris``: see :func:`solaris_features`."""
    from trainer.delay import DECIDED_INDEX, late_kind

    imps = [e.impression for e in examples]
    b = len(examples)
    indices, offsets, dense, domain = featurize_impressions(imps, tcfg, sids)
    event_ts = np.fromiter((i.ts for i in imps), dtype=np.int64, count=b)
    ids = [e.example_id for e in examples]
    return FeatureBatch(
        indices=indices, offsets=offsets, dense=dense, domain=domain,
        click=(np.fromiter((e.click for e in examples), dtype=np.int64, count=b) > 0).astype(np.float32),
        conversion=(np.fromiter((e.conversion for e in examples), dtype=np.int64, count=b) > 0).astype(np.float32),
        weight=np.fromiter((e.weight for e in examples), dtype=np.float32, count=b),
        event_ts=event_ts,
        emitted_ts=np.fromiter((e.emitted_ts for e in examples), dtype=np.int64, count=b),
        example_ids=ids, domains=[i.domain for i in imps],
        num_tables=len(table_names(tcfg)),
        decided=np.fromiter((DECIDED_INDEX[e.decided] for e in examples), dtype=np.int8, count=b),
        late=np.fromiter(map(late_kind, ids), dtype=np.int8, count=b),
        click_delay_ms=_delays([e.click_ts for e in examples], event_ts),
        conversion_delay_ms=_delays([e.conversion_ts for e in examples], event_ts),
        user=user_features(imps, tcfg, users), loopfm=loopfm_features(imps, tcfg, loopfm),
        cohort=None if cohorts is None else cohorts.assign(imps),
        solaris=solaris_features(imps, tcfg, solaris),
        **teacher_columns(examples))


def teacher_columns(examples: Sequence[schema.Example]) -> dict[str, np.ndarray]:
    """The :class:`FeatureBatch` teacher columns of ``examples`` (empty when none has a teacher).

    >>> from streams import schema
    >>> imp = schema.Impression(event_id="i1", ts=1, user_id=1, ad_id=1, campaign_id=1, advertiser_id=1, domain="feed")
    >>> t = schema.Teacher(p_click=0.2, p_conversion=0.05, model_version=7, scored_ts=4000)
    >>> cols = teacher_columns([schema.Example("a", imp, 0, 0, emitted_ts=1000, teacher=t), schema.Example("b", imp, 1, 0)])
    >>> cols["has_teacher"].tolist(), cols["teacher_age_s"].tolist(), cols["teacher_version"].tolist()
    ([1.0, 0.0], [3.0, 0.0], [7, -1])
    >>> teacher_columns([schema.Example("b", imp, 1, 0)])
    {}
    """
    ts = [e.teacher for e in examples]
    if all(t is None for t in ts):
        return {}
    b = len(examples)
    has = np.fromiter((t is not None for t in ts), dtype=np.float32, count=b)
    pc = np.fromiter((0.0 if t is None else t.p_click for t in ts), dtype=np.float32, count=b)
    pv = np.fromiter((0.0 if t is None else t.p_conversion for t in ts), dtype=np.float32, count=b)
    age = np.fromiter((0.0 if t is None else abs(t.scored_ts - e.emitted_ts) / 1000.0
                       for t, e in zip(ts, examples)), dtype=np.float32, count=b)
    ver = np.fromiter((-1 if t is None else t.model_version for t in ts), dtype=np.int64, count=b)
    return {"has_teacher": has, "teacher_p_click": pc, "teacher_p_conversion": pv, "teacher_age_s": age,
            "teacher_version": ver}
