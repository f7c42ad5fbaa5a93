"""Drift scenarios, ad lifecycles and conversion-delay models of the synthetic traffic generator.

Pure numpy functions of the run's *progress* ``t`` (0 at the first impression, 1 at the last; shape (n,)),
used by :mod:`streams.sources.generate`. See docs/generator.md for what each scenario does to the oracle metrics.

Scenarios (``ScenarioConfig.name``):

==============  ======================================================================================
none            the hidden model is fixed
gradual         users' taste for ads rotates smoothly: ad latent vectors and biases turn from ``A`` to an
                independent ``A'`` by ``angle`` radians over the run (``cos a * A + sin a * A'``)
sudden          the same rotation, all at once at progress ``at``
seasonal        click and conversion log-odds follow ``amplitude * sin(2 pi * elapsed / period_s)`` (a daily
                cycle by default; shorten ``period_s`` to see several cycles in a short run)
new-ad-surge    at progress ``at`` a batch of ``surge_ads`` x n_ads new ads is born, takes ``surge_share`` of
                the traffic from then on, and is ``surge_bias`` log-odds more clickable (cold start)
sudden-levels   ``sudden``'s rotation at ``at``, and at the same moment every domain's click and conversion log-odds
                jump by ``level_shift`` times +1, -1, +1, ... (domains in the run's order): a change of the
                surfaces' levels (a redesign, a policy change) on top of the change of tastes; a model trained
                before it is miscalibrated per domain as well as mis-ranked (bench transfer: what the student
                adapter can correct in a stale teacher)
interest-shift  each user's taste vector jumps to a fresh one at the user's own moment (uniform in 10-90% of
                the run): per-user drift that only the user's recent engagements reveal (the impressions'
                ``history`` field stays the old taste's)
==============  ======================================================================================

Every scenario also has ad churn (``GeneratorConfig.ad_churn``): that fraction of the catalogue is born
during the run and the same fraction retired, so ids appear and disappear.

Conversion delays (``GeneratorConfig.delays``), measured from the click:

* ``short`` (default): 35% exponential with mean 15 min, 65% exponential with mean 4 h, capped by
  ``max_conversion_delay_s`` (6 h) -- the 24 h conversion window of the labels dataflow always closes;
* ``calibrated``: a piecewise log-uniform distribution through the published points of Criteo's conversion
  logs -- about 35% of conversions within 1 hour and about 50% within 24 hours of the click, inside a
  30-day attribution window (O. Chapelle, "Modeling Delayed Feedback in Display Advertising", KDD 2014,
  section 3; the same anchors are used by Yang et al., "Capturing Delayed Feedback in Conversion Rate
  Prediction via Elapsed-Time Sampling", AAAI 2021) -- truncated at ``max_conversion_delay_s`` (<= 30 days).

>>> rng = np.random.default_rng(0)
>>> d = conversion_delays_s("calibrated", 200_000, rng, 30 * DAY_S)
>>> round(float((d <= 3600).mean()), 2), round(float((d <= DAY_S).mean()), 2), bool(d.max() <= 30 * DAY_S)
(0.35, 0.5, True)
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

SCENARIOS: tuple[str, ...] = ("none", "gradual", "sudden", "seasonal", "new-ad-surge", "interest-shift",
                              "sudden-levels")
DELAY_MODELS: tuple[str, ...] = ("short", "calibrated")
DAY_S = 86_400.0
MAX_DELAY_S = 30 * DAY_S  # Criteo's 30-day attribution window (Chapelle 2014)

# (delay after the click in s, share of conversions by then). Published: 1 h -> ~35%, 24 h -> ~50%, 30 days
# -> 100% (Chapelle, KDD 2014). The 30 s start is ours (the fastest purchases take a few clicks).
CALIBRATED_CDF: tuple[tuple[float, float], ...] = ((30.0, 0.0), (3600.0, 0.35), (DAY_S, 0.50), (MAX_DELAY_S, 1.0))


class ScenarioConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A drift scenario and its parameters (each used only by the scenarios named in its comment)."""

    name: str = "none"
    angle: float = math.pi / 2  # gradual, sudden, sudden-levels: rotation of the ad taste vectors (radians)
    at: float = 0.5  # sudden, sudden-levels, new-ad-surge: progress of the run (0..1) when it happens
    amplitude: float = 0.6  # seasonal: log-odds amplitude
    period_s: float = DAY_S  # seasonal: cycle length in event-time seconds
    surge_ads: float = 0.1  # new-ad-surge: new ads, as a fraction of n_ads
    surge_share: float = 0.5  # new-ad-surge: share of the traffic the new ads take
    surge_bias: float = 0.5  # new-ad-surge: extra click log-odds of the new ads
    level_shift: float = 0.7  # sudden-levels: the jump of each domain's log-odds (alternating signs)

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"scenario: unknown {self.name!r} (known: {', '.join(SCENARIOS)})")
        checks = [("at", 0.0 <= self.at <= 1.0), ("period_s", self.period_s > 0),
                  ("surge_ads", 0.0 <= self.surge_ads <= 10.0), ("surge_share", 0.0 <= self.surge_share < 1.0)]
        for field, ok in checks:
            if not ok:
                raise ValueError(f"scenario {self.name}: bad {field} {getattr(self, field)!r}")

    def n_surge_ads(self, n_ads: int) -> int:
        return int(round(self.surge_ads * n_ads)) if self.name == "new-ad-surge" else 0


def parse_params(name: str, pairs: list[str]) -> ScenarioConfig:
    """``ScenarioConfig`` from ``--scenario NAME --scenario-param key=value ...``.

    >>> parse_params("sudden", ["at=0.3"]).at
    0.3
    """
    kw: dict[str, float] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or key not in ScenarioConfig.__struct_fields__ or key == "name":
            raise ValueError(f"--scenario-param: expected KEY=VALUE with KEY in "
                             f"{', '.join(f for f in ScenarioConfig.__struct_fields__ if f != 'name')}, got {p!r}")
        try:
            kw[key] = float(val)
        except ValueError:
            raise ValueError(f"--scenario-param {key}: not a number: {val!r}") from None
    return ScenarioConfig(name=name, **kw)


def interest_switch(n_users: int, latent_dim: int, lat_std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """interest-shift: each user's taste jumps to a fresh latent vector at a progress drawn uniformly in
    [0.1, 0.9], one user at a time. Returns (switch progress (U,), the new taste vectors (U, latent_dim)).
    A generator of its own, so the other scenarios' worlds stay the same for a seed."""
    rng = np.random.default_rng([seed, 0x5EC])
    return rng.uniform(0.1, 0.9, n_users), rng.normal(0, lat_std, (n_users, latent_dim))


def taste_angle(sc: ScenarioConfig, t: np.ndarray) -> np.ndarray:
    """Rotation (radians) of the ad taste vectors at progress ``t``; shape (n,)."""
    if sc.name == "gradual":
        return sc.angle * t
    if sc.name in ("sudden", "sudden-levels"):
        return np.where(t >= sc.at, sc.angle, 0.0)
    return np.zeros_like(t)


def level_logit(sc: ScenarioConfig, t: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """Additive log-odds of ``sudden-levels`` at progress ``t`` for domain indices ``domain`` (the run's domain
    order): ``level_shift * (+1, -1, +1, ...)[domain]`` from ``at`` on, else 0; shape (n,).

    >>> level_logit(ScenarioConfig(name="sudden-levels", level_shift=0.5), np.array([0.2, 0.6, 0.6]),
    ...             np.array([0, 0, 1])).tolist()
    [0.0, 0.5, -0.5]
    """
    if sc.name != "sudden-levels":
        return np.zeros_like(t, dtype=np.float64)
    sign = np.where(domain % 2 == 0, 1.0, -1.0)
    return np.where(t >= sc.at, sc.level_shift * sign, 0.0)


def season_logit(sc: ScenarioConfig, elapsed_s: np.ndarray) -> np.ndarray:
    """Additive log-odds of the seasonal cycle at ``elapsed_s`` seconds of event time; shape (n,)."""
    if sc.name != "seasonal":
        return np.zeros_like(elapsed_s, dtype=np.float64)
    return sc.amplitude * np.sin(2 * np.pi * elapsed_s / sc.period_s)


def ad_lifetimes(n_ads: int, n_surge: int, churn: float, sc: ScenarioConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(birth, retirement) progress of every ad, shape (n_ads + n_surge,): ``churn`` x n_ads regular ads
    are born uniformly during the run, as many (other or the same) retire uniformly after their birth;
    surge ads are born at ``sc.at`` and never retire."""
    k = int(round(churn * n_ads))
    birth, death = np.zeros(n_ads + n_surge), np.full(n_ads + n_surge, np.inf)
    born = rng.choice(n_ads, k, replace=False)
    birth[born] = rng.random(k)
    retired = rng.choice(n_ads, k, replace=False)
    death[retired] = birth[retired] + (1 - birth[retired]) * rng.random(k)
    birth[n_ads:] = sc.at
    return birth, death


def sample_ads(t: np.ndarray, weights: np.ndarray, birth: np.ndarray, death: np.ndarray, n_surge: int,
               surge_share: float, rng: np.random.Generator, buckets: int = 64) -> np.ndarray:
    """Ad index of every impression at progress ``t`` (sorted), by popularity among the ads alive at the
    start of its time bucket; the last ``n_surge`` ads take ``surge_share`` of the traffic once born."""
    out = np.empty(len(t), np.int64)
    b = np.minimum((t * buckets).astype(np.int64), buckets - 1)
    starts = np.searchsorted(b, np.arange(buckets + 1))
    for i in range(buckets):
        lo, hi = starts[i], starts[i + 1]
        if lo == hi:
            continue
        p = ad_weights(i / buckets, weights, birth, death, n_surge, surge_share)
        out[lo:hi] = rng.choice(len(p), hi - lo, p=p / p.sum())
    return out


def ad_weights(now: float, weights: np.ndarray, birth: np.ndarray, death: np.ndarray, n_surge: int,
               surge_share: float) -> np.ndarray:
    """Traffic weight of every ad at progress ``now`` (not normalised): its popularity if alive (born, not yet
    retired), else 0; the last ``n_surge`` ads take ``surge_share`` once born. Used by :func:`sample_ads` and
    by the simulated audience's candidates (:mod:`streams.sources.audience`)."""
    n_reg = len(weights) - n_surge
    p = weights * ((birth <= now) & (death > now))
    reg, new = p[:n_reg].sum(), p[n_reg:].sum()
    if reg == 0:  # everything retired: fall back to the whole regular catalogue
        p[:n_reg], reg = weights[:n_reg], weights[:n_reg].sum()
    if new > 0:
        p[:n_reg] *= (1 - surge_share) / reg
        p[n_reg:] *= surge_share / new
    return p


def conversion_delays_s(model: str, n: int, rng: np.random.Generator, max_s: float,
                        fast_share: float = 0.35, fast_mean_s: float = 900.0,
                        slow_mean_s: float = 4 * 3600.0) -> np.ndarray:
    """Delays (s) from click to conversion, shape (n,); see the module docstring for the two models."""
    if model == "short":
        fast = rng.random(n) < fast_share
        return np.where(fast, rng.exponential(fast_mean_s, n), rng.exponential(slow_mean_s, n))
    if model != "calibrated":
        raise ValueError(f"delays: unknown model {model!r} (known: {', '.join(DELAY_MODELS)})")
    log_t = np.log([x for x, _ in CALIBRATED_CDF])
    cdf = np.array([c for _, c in CALIBRATED_CDF])
    top = float(np.interp(np.log(max(max_s, CALIBRATED_CDF[0][0])), log_t, cdf))
    u = rng.random(n) * top  # inverse-CDF sampling of the distribution truncated at max_s
    return np.exp(np.interp(u, cdf, log_t))
