"""Cohorts and cohort-contrastive auxiliary labels (C2AL; docs/cohorts.md).

**Cohorts.** Every example belongs to one cohort, named ``"domain/activity/country"`` (e.g. ``"feed/heavy/us"``):

* ``domain``: the surface (:data:`streams.schema.DOMAINS`), whose base rates differ by up to 10x;
* ``activity``: how many impressions of the user this trainer had seen before, bucketed by :data:`ACTIVITY_EDGES`
  into ``new`` (< 3), ``casual`` (< 30) and ``heavy``: new users are the tail a global model serves worst (it
  knows nothing of them but their context), heavy users the head;
* ``country``: markets differ in what their users respond to (the generator's ``minority_share`` world gives a
  few countries their own tastes: :mod:`streams.sources.generate`).

These three axes are what a serving system knows of every request without a model, so a cohort costs nothing
to compute at serving and in the metrics; 5 x 3 x 8 = 120 cohorts at most. Activity needs state: a
:class:`CohortAssigner` counts each user's impressions in a fixed table (a count-min sketch of one row,
:data:`COUNT_ROWS` counters: bounded memory whatever the number of users; a collision can only make a user
look more active), stored in the trainer's checkpoints.

**Which cohorts to target** is found from the data, as the C2AL paper does (it exposes the cohorts with strong
distributional contrast): :func:`find_targets` ranks the minority cohorts (between ``min_share`` and
``max_share``, 1-10% by default, of the traffic) at the granularity of one axis value (``"*/*/br"``, ``"display/*/*"``,
``"*/new/*"``) by how much worse a model's NE is on them than on all traffic (NE normalises by the cohort's
own base rate, so a rare-click surface is not "worst" merely for being rare). ``streamrec bench cohorts`` runs
it on the baseline's progressive predictions of a warm-up prefix and trains C2AL on what it found;
a live trainer names its targets in ``trainer.c2al_cohorts`` (patterns, :func:`fnmatch.fnmatch` syntax).

**Auxiliary labels** (:func:`c2al_labels`). For each targeted cohort ``c`` one auxiliary binary task with the
label ``y_c = click * [example in c]``: it agrees with the main label inside the cohort and contradicts it on
every click outside (there it says 0), so the auxiliary tasks partially conflict with the main task and with
each other. A head can only fit ``y_c`` if the shared representation separates the cohort's clicks from
everyone else's: the auxiliary gradient keeps cohort-specific interactions alive in the shared embeddings,
cross layers and experts that the global objective, dominated by the majority, lets fade (the paper's reading:
denser attention / FM interaction weights). The heads (:class:`trainer.model.C2ALHeads`) are training only:
serving exports and published versions never hold them, so they cost nothing at serving.

>>> a = CohortAssigner()
>>> imps = [schema.Impression(event_id=f"i{i}", ts=1, user_id=7, ad_id=1, campaign_id=1, advertiser_id=1,
...                           domain="feed", country="br") for i in range(4)]
>>> a.assign(imps)        # the 4th impression of user 7 is their 4th: casual from then on
['feed/new/br', 'feed/new/br', 'feed/new/br', 'feed/casual/br']
>>> t = CohortTargets(("*/*/br", "video/*/*"))
>>> t.masks(["feed/new/br", "video/heavy/us"]).tolist()
[[1.0, 0.0], [0.0, 1.0]]
>>> c2al_labels(np.array([1.0, 1.0], np.float32), t.masks(["feed/new/br", "video/heavy/us"])).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

import numpy as np

from embedding_store.ids import splitmix64
from streams import schema
from streams.metrics import normalized_entropy, roc_auc

ACTIVITY = ("new", "casual", "heavy")
ACTIVITY_EDGES = (3, 30)  # impressions seen before: < 3 new, < 30 casual, else heavy
AXES = ("domain", "activity", "country")
COUNT_ROWS = 1 << 18  # activity counters (1 MiB of uint32)


def cohort_key(domain: str, activity: str, country: str) -> str:
    """``"domain/activity/country"``; an empty country is ``"-"``."""
    return f"{domain}/{activity}/{country or '-'}"


class CohortAssigner:
    """Names each impression's cohort and counts it toward its user's activity (see the module docstring)."""

    def __init__(self, rows: int = COUNT_ROWS):
        self.counts = np.zeros(rows, np.uint32)

    def activity(self, user_ids: np.ndarray) -> np.ndarray:
        """Impressions seen so far of each user (B,), without counting anything."""
        return self.counts[self._rows(user_ids)].astype(np.int64)

    def _rows(self, user_ids: np.ndarray) -> np.ndarray:
        return (splitmix64(np.asarray(user_ids, np.uint64)) % np.uint64(len(self.counts))).astype(np.int64)

    def assign(self, imps: Sequence[schema.Impression]) -> list[str]:
        """The cohort of each impression in order, counting each one: an impression's activity is the number of
        its user's impressions before it (earlier ones of the same batch included)."""
        if not imps:
            return []
        rows = self._rows(np.fromiter((i.user_id for i in imps), np.uint64, len(imps)))
        # the k-th occurrence of a row within the batch sees the count before the batch plus k
        order = np.argsort(rows, kind="stable")
        sr = rows[order]
        start = np.r_[0, np.flatnonzero(sr[1:] != sr[:-1]) + 1]
        rank = np.arange(len(sr)) - np.repeat(start, np.diff(np.r_[start, len(sr)]))
        seen = np.empty(len(rows), np.int64)
        seen[order] = self.counts[sr].astype(np.int64) + rank
        np.add.at(self.counts, rows, 1)
        bucket = np.searchsorted(np.array(ACTIVITY_EDGES), seen, side="right")
        return [cohort_key(i.domain, ACTIVITY[b], i.country) for i, b in zip(imps, bucket.tolist())]

    def state(self) -> dict:
        """For checkpoints: a torch tensor (checkpoints load with torch's weights-only unpickler, no numpy)."""
        import torch

        return {"counts": torch.from_numpy(self.counts.astype(np.int64))}

    @classmethod
    def from_state(cls, st: dict) -> "CohortAssigner":
        counts = st["counts"]
        counts = counts.numpy() if hasattr(counts, "numpy") else np.asarray(counts)
        a = cls(len(counts))
        a.counts[:] = counts
        return a


class CohortTargets:
    """The targeted cohorts of C2AL: patterns over cohort names (:func:`fnmatch.fnmatchcase`), one auxiliary
    head each."""

    def __init__(self, patterns: Sequence[str]):
        bad = [p for p in patterns if p.count("/") != 2]
        if not patterns or bad:
            raise ValueError(f"C2AL cohorts: patterns look like 'domain/activity/country' with * for any, e.g. "
                             f"'*/*/br' (got {list(patterns)!r})")
        self.patterns = tuple(patterns)
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.patterns)

    def row(self, key: str) -> np.ndarray:
        r = self._cache.get(key)
        if r is None:
            r = np.array([fnmatchcase(key, p) for p in self.patterns], np.float32)
            if len(self._cache) < 10_000:
                self._cache[key] = r
        return r

    def masks(self, keys: Sequence[str]) -> np.ndarray:
        """(B, K) float32: 1 where example b is in targeted cohort k."""
        if not len(keys):
            return np.zeros((0, len(self.patterns)), np.float32)
        return np.stack([self.row(k) for k in keys])


def c2al_labels(click: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B, K) the cohort-contrastive auxiliary labels ``click * [in cohort k]`` (module docstring)."""
    return (np.asarray(click, np.float32)[:, None] * masks).astype(np.float32)


def axis_values(keys: Sequence[str], axis: str) -> np.ndarray:
    """Each key's value on ``axis`` (one of :data:`AXES`) as an object array."""
    i = AXES.index(axis)
    return np.array([k.split("/")[i] for k in keys], dtype=object)


def pattern(axis: str, value: str) -> str:
    """The pattern of one axis value: ``pattern("country", "br") == "*/*/br"``."""
    return "/".join(value if a == axis else "*" for a in AXES)


@dataclass(frozen=True)
class Candidate:
    pattern: str
    share: float  # of the examples given
    ne: float  # the model's NE on the cohort
    rel_ne: float  # ne / the model's NE on all examples


def find_targets(keys: Sequence[str], click: np.ndarray, p: np.ndarray, *, min_share: float = 0.01,
                 max_share: float = 0.1, top: int = 2, min_clicks: int = 20) -> list[Candidate]:
    """The ``top`` minority cohorts (single axis values with ``min_share <= share <= max_share`` and at least
    ``min_clicks`` clicks) where the model's click NE (predictions ``p``) is worst relative to its NE on all
    examples, worst first; only cohorts it serves worse than all traffic (``rel_ne > 1``); see the module
    docstring."""
    click = np.asarray(click, np.float64)
    p = np.asarray(p, np.float64)
    overall = normalized_entropy(click, p)
    out = []
    for axis in AXES:
        vals = axis_values(keys, axis)
        for v in sorted(set(vals.tolist())):
            m = vals == v
            share = float(m.mean())
            if not (min_share <= share <= max_share) or click[m].sum() < min_clicks or click[m].sum() == m.sum():
                continue
            ne = normalized_entropy(click[m], p[m])
            if ne > overall:
                out.append(Candidate(pattern(axis, v), share, ne, ne / overall))
    return sorted(out, key=lambda c: -c.rel_ne)[:top]


def cohort_metrics(keys: Sequence[str], click: np.ndarray, p: np.ndarray, patterns: Sequence[str]
                   ) -> dict[str, dict[str, float]]:
    """``{pattern: {"n", "share", "ctr", "ne", "auc"}}`` of click predictions ``p`` on the examples each pattern
    matches (NaN where a cohort has no examples or one class only)."""
    click = np.asarray(click, np.float64)
    p = np.asarray(p, np.float64)
    t = CohortTargets(patterns)
    masks = t.masks(keys) > 0
    out = {}
    for j, pat in enumerate(t.patterns):
        m = masks[:, j]
        n = int(m.sum())
        ok = n > 0 and 0 < click[m].sum() < n
        out[pat] = {"n": n, "share": n / max(len(keys), 1), "ctr": float(click[m].mean()) if n else float("nan"),
                    "ne": normalized_entropy(click[m], p[m]) if ok else float("nan"),
                    "auc": roc_auc(click[m], p[m]) if ok else float("nan")}
    return out
