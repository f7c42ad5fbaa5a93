"""Delayed feedback: an online estimate of the label-delay distribution and ES-DFM importance weights.

Under the ``elapsed`` label policy (``streams/flows/join.py``) every impression leaves the labels dataflow once,
``elapsed`` after it was shown, with the labels seen so far (``decided="elapsed"``); feedback arriving later
inside the attribution window produces a duplicate positive (``decided="late_positive"``, id
``<impression>#late-click`` / ``#late-conversion``). The stream the trainer sees is then biased: a delayed
positive appears once as a (fake) negative and once as a positive. ES-DFM (Yang et al., "Capturing Delayed
Feedback in Conversion Rate Prediction via Elapsed-Time Sampling", AAAI 2021) shows that with

    p_dp(x) = p(y=1|x) * P(delay > elapsed)     probability that x is a delayed positive
    q(y=1|x) = p(y=1|x) / (1 + p_dp(x))          label distribution of the observed stream

the importance-weighted loss ``-sum w1 * y log f(x) + w0 * (1-y) log(1-f(x))`` with

    w1 = 1 + p_dp(x)
    w0 = (1 + p_dp(x)) * p(y=0|x) / (p(y=0|x) + p_dp(x))

is an unbiased estimate of the loss under the true label distribution. The paper learns ``p_dp`` with
auxiliary classifiers; here ``p(y=1|x)`` is the model's own current (detached) prediction and
``P(delay > elapsed)`` comes from :class:`DelayHistogram`, a running histogram of the delays of the
positives seen so far (``feedback_ts - impression.ts``), one per objective.

>>> h = DelayHistogram()
>>> h.update(np.array([10_000, 20_000, 7_200_000, 9_000_000]))   # two fast, two slow conversions (ms)
>>> round(h.survival(3_600_000), 3)
0.5
>>> w1, w0 = esdfm_weights(np.array([0.2]), 0.5)
>>> round(float(w1[0]), 3), round(float(w0[0]), 4)   # w1 = 1.1; w0 = 1.1 * 0.8 / 0.9
(1.1, 0.9778)
"""

from __future__ import annotations

import numpy as np

from config import LabelsConfig

DECIDED: tuple[str, ...] = ("window_closed", "end_of_stream", "elapsed", "late_positive")
DECIDED_INDEX: dict[str, int] = {d: i for i, d in enumerate(DECIDED)}
ELAPSED = DECIDED_INDEX["elapsed"]
LATE = DECIDED_INDEX["late_positive"]
LATE_SUFFIXES: tuple[str, ...] = ("#late-click", "#late-conversion")  # late kind 1 / 2 (0: not a late positive)
ELAPSED_S = float(LabelsConfig().elapsed_s)  # the labels dataflow's default elapsed time

# log-spaced bin edges from 1 s to 40 days (ms): delays of clicks (seconds) and conversions (up to 30 days)
_EDGES_MS = np.concatenate([[0.0], np.geomspace(1_000.0, 40 * 86_400_000.0, 256)])


def late_kind(example_id: str) -> int:
    """1 for ``...#late-click``, 2 for ``...#late-conversion``, else 0."""
    if "#late-" not in example_id:
        return 0
    for k, suf in enumerate(LATE_SUFFIXES, 1):
        if example_id.endswith(suf):
            return k
    return 0


class DelayHistogram:
    """Running histogram of label delays (ms) with optional exponential forgetting.

    ``update(delays)`` adds observations (negative values are ignored); ``survival(t)`` is the estimated
    ``P(delay > t)`` (0.0 before any observation: with no evidence of delay, labels count as complete);
    ``state()`` / ``from_state()`` round-trip through checkpoints. ``decay`` < 1 multiplies the old counts at
    every update, so the estimate follows a drifting delay distribution.
    """

    def __init__(self, decay: float = 1.0, counts: np.ndarray | None = None):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"DelayHistogram.decay: expected 0 < decay <= 1, got {decay}")
        self.decay = decay
        self.counts = np.zeros(len(_EDGES_MS), dtype=np.float64) if counts is None else counts.astype(np.float64)
        if self.counts.shape != (len(_EDGES_MS),):
            raise ValueError(f"DelayHistogram: expected {len(_EDGES_MS)} counts, got shape {self.counts.shape}")

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def update(self, delays_ms: np.ndarray) -> None:
        d = np.asarray(delays_ms, dtype=np.float64)
        d = d[d >= 0]
        if not d.size:
            return
        if self.decay < 1.0:
            self.counts *= self.decay
        # bin i holds delays in (edge[i-1], edge[i]]; the last bin everything beyond
        self.counts += np.bincount(np.searchsorted(_EDGES_MS, d, side="left"), minlength=len(_EDGES_MS))[
            :len(_EDGES_MS)]

    def survival(self, t_ms: float) -> float:
        """``P(delay > t_ms)``: counts of bins above ``t`` (the bin holding ``t`` split linearly)."""
        total = self.counts.sum()
        if total <= 0:
            return 0.0
        i = int(np.searchsorted(_EDGES_MS, t_ms, side="left"))
        if i >= len(_EDGES_MS):
            return 0.0
        above = self.counts[i + 1:].sum()
        lo = _EDGES_MS[i - 1] if i > 0 else 0.0
        frac_above = (_EDGES_MS[i] - t_ms) / (_EDGES_MS[i] - lo) if _EDGES_MS[i] > lo else 0.0
        return float((above + self.counts[i] * frac_above) / total)

    def quantile(self, q: float) -> float:
        """Approximate delay quantile (ms; the upper edge of the bin where the CDF reaches ``q``)."""
        total = self.counts.sum()
        if total <= 0:
            return float("nan")
        return float(_EDGES_MS[min(int(np.searchsorted(np.cumsum(self.counts), q * total)), len(_EDGES_MS) - 1)])

    def state(self) -> dict:
        return {"decay": self.decay, "counts": self.counts.tolist()}

    @classmethod
    def from_state(cls, st: dict) -> "DelayHistogram":
        return cls(float(st["decay"]), np.asarray(st["counts"], dtype=np.float64))


def esdfm_weights(p, survival):
    """ES-DFM importance weights ``(w1, w0)`` for observed positives / negatives (see the module docstring).

    ``p``: the model's current ``P(y=1|x)`` (B,), detached (numpy array or torch tensor, same type out);
    ``survival``: ``P(delay > elapsed)`` (scalar or (B,)). With ``survival == 0`` both weights are 1.
    """
    p = p * (1.0 - 1e-7)  # keeps 1 - p > 0 where a float32 sigmoid rounded to 1.0
    p_dp = p * survival
    w1 = 1.0 + p_dp
    w0 = w1 * (1.0 - p) / (1.0 - p + p_dp)
    return w1, w0


def objective_weights(decided, late, click, conversion, p_click, p_ctcvr, s_click: float, s_conv: float):
    """Per-example loss weights ``(w_click, w_conversion)`` (B,) for the ESMM objectives.

    ``decided`` (B,) codes of :data:`DECIDED`; ``late`` (B,) :func:`late_kind`; labels and probabilities (B,)
    (numpy or torch, not needing gradients); ``s_*`` = ``P(delay > elapsed)`` per objective.

    * ``elapsed`` examples: ES-DFM ``w1`` where the label is positive, ``w0`` where it is negative.
    * ``late_positive`` examples: ``w1`` for the objective the correction is about, 0 for the other (its
      label is already counted by the original example).
    * ``window_closed`` / ``end_of_stream``: 1 (the labels are final).

    >>> d = np.array([ELAPSED, ELAPSED, LATE, 0]); k = np.array([0, 0, 2, 0])
    >>> y_c = np.array([1.0, 0.0, 1.0, 0.0]); y_v = np.array([0.0, 0.0, 1.0, 0.0]); p = np.full(4, 0.5)
    >>> wc, wv = objective_weights(d, k, y_c, y_v, p, p * 0.2, 0.0, 0.5)
    >>> wc.tolist(), [round(x, 3) for x in wv.tolist()]
    ([1.0, 1.0, 0.0, 1.0], [0.995, 0.995, 1.05, 1.0])
    """
    is_el = (decided == ELAPSED) * 1.0
    is_late = (decided == LATE) * 1.0
    final = 1.0 - is_el - is_late
    out = []
    for obj, (y, p, s) in enumerate(((click, p_click, s_click), (conversion, p_ctcvr, s_conv)), 1):
        w1, w0 = esdfm_weights(p, s)
        el = y * w1 + (1.0 - y) * w0
        out.append(final + is_el * el + is_late * (late == obj) * w1)
    return out[0], out[1]
