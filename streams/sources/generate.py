"""Synthetic ad traffic with a hidden, learnable ground truth (``streamrec generate``).

Each impression gets a true click probability and a post-click conversion probability from a fixed
random model (:class:`TruthParams`)::

    logit p_click = logit(base_ctr[domain]) + user_bias[u] + ad_bias[a] + latent_scale * <U[u], A[a]>
                    + position_effect * position + <w_dense, dense> + sum_s cat_effect[s, cat[s]]
    logit p_cvr   = logit(base_cvr[domain]) + cvr_user_bias[u] + cvr_ad_bias[a]
                    + cvr_latent_scale * <U[u], A[a]> + <w_cvr_dense, dense>

Clicks ~ Bernoulli(p_click) after a capped lognormal delay; conversions ~ Bernoulli(p_cvr) only after a
click, after a delay from :func:`streams.sources.scenarios.conversion_delays_s` (``short`` by default, or
``calibrated`` to Criteo's published delay statistics with a 30-day tail). Users and ads have Zipf activity
and popularity; ads are born and retired during the run (``ad_churn``); ``history`` holds ads the user is
drawn to (so it carries the user's latent taste). A drift scenario (:mod:`streams.sources.scenarios`) can move the
hidden model over event time. Everything is vectorised with numpy; the result is deterministic for a seed.

>>> sim = simulate(GeneratorConfig(n_impressions=1000, seed=1))
>>> sim.truth.num_rows, sim.counts()["impression"]
(1000, 1000)
>>> ts = [r.ts for r in sim.records]
>>> ts == sorted(ts)
True
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streams import schema
from streams.metrics import normalized_entropy, roc_auc
from config import NO_BROKER, Config
from streams.sources import scenarios, sessions
from streams.sources.hostile import make_bad_records
from streams.sources.logfile import BadRecord, write_jsonl
from streams.sources.replay import ProduceStats, produce, summary  # noqa: F401  (re-exported)

START_TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

_BASE_CTR = {"feed": 0.02, "stories": 0.012, "video": 0.008, "search": 0.05, "display": 0.004}
_BASE_CVR = {"feed": 0.05, "stories": 0.04, "video": 0.03, "search": 0.08, "display": 0.025}
_DOMAIN_SHARE = {"feed": 0.4, "stories": 0.2, "video": 0.2, "search": 0.15, "display": 0.05}
_COUNTRIES = ("us", "gb", "de", "fr", "br", "in", "jp", "mx")


class TruthParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Knobs of the hidden model (log-odds scale); defaults give AUC ~0.75 for the oracle."""

    base_ctr: dict[str, float] = msgspec.field(default_factory=lambda: dict(_BASE_CTR))
    base_cvr: dict[str, float] = msgspec.field(default_factory=lambda: dict(_BASE_CVR))
    domain_share: dict[str, float] = msgspec.field(default_factory=lambda: dict(_DOMAIN_SHARE))
    latent_dim: int = 8
    latent_scale: float = 0.8  # std of <U, A> term ~ latent_scale
    user_bias_std: float = 0.4
    ad_bias_std: float = 0.4
    position_effect: float = -0.15  # per slot below the top
    max_position: int = 6
    dense_weight_std: float = 0.2
    cat_vocab: int = 1000
    cat_effect_std: float = 0.25
    cvr_bias_std: float = 0.4
    cvr_latent_scale: float = 0.5
    zipf_users: float = 1.05
    zipf_ads: float = 1.1
    click_delay_median_s: float = 20.0
    click_delay_sigma: float = 1.0
    conv_fast_share: float = 0.35  # share of conversions from the fast component (Chapelle 2014: ~35% < 1 h)
    conv_fast_mean_s: float = 900.0
    conv_slow_mean_s: float = 4 * 3600.0


class GeneratorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    n_impressions: int = 10_000
    seed: int = 0
    start_ts: int = START_TS_MS  # ms
    domains: tuple[str, ...] = ("feed", "stories", "video", "search")
    n_users: int = 10_000
    n_ads: int = 2_000
    impressions_per_s: float = 50.0  # event-time rate
    bad_rate: float = 0.0  # extra malformed records, as a fraction of the good records
    cat_slots: int = 4
    dense_dim: int = 8
    history_len: int = 8
    max_click_delay_s: float = 300.0  # below LabelsConfig.click_window_s (900)
    max_conversion_delay_s: float = 6 * 3600.0  # from the impression; below conversion_window_s (24 h)
    truth: TruthParams = TruthParams()
    scenario: scenarios.ScenarioConfig = scenarios.ScenarioConfig()
    ad_churn: float = 0.2  # fraction of ads born during the run (and, separately, retired)
    delays: str = "short"  # short | calibrated (see streams.sources.scenarios)
    # Ad content (cold start, docs/generator.md "Ad content"): each ad's creative embedding (content_dim values,
    # content_noise: noise std relative to the signal's) and category path (one k-means level per entry of
    # category_levels); emit_creatives: an AdCreative record at each ad's birth (topics.ads), off by default
    content_dim: int = 32
    content_noise: float = 0.5
    category_levels: tuple[int, ...] = (8, 4)
    emit_creatives: bool = False
    # the sessions world (streams.sources.sessions; n_interests 0: off): interests, sessions, evolving intents
    sessions: sessions.SessionsConfig = sessions.SessionsConfig()
    # cohorts that really differ (C2AL, trainer/cohorts.py; 0 = off): this share of users live in the minority
    # countries (MINORITY_COUNTRIES; the others never do) and respond to ads differently: their ads' taste
    # vectors and biases are turned by minority_contrast * 90 degrees toward vectors of their own
    minority_share: float = 0.0
    minority_contrast: float = 1.0
    # ad targeting (SOLARIS, docs/transfer.md): 0 = every impression's ad drawn by popularity, independent of the
    # user (the default); k > 0 = each user's ads come from their own targeting set of k ads (popularity draws),
    # which changes slowly: at each of the user's impressions one ad of the set is replaced with probability
    # targeting_churn, and a retired ad at once. Drawn with a generator of its own: everything else stays as is.
    targeting: int = 0
    targeting_churn: float = 0.02


def validate(g: GeneratorConfig) -> None:
    """Raise ``ValueError`` naming the field when the configuration cannot generate sensible traffic."""
    unknown = [d for d in g.domains if d not in schema.DOMAIN_INDEX]
    if not g.domains or unknown:
        raise ValueError(f"GeneratorConfig.domains: unknown {unknown} (known: {', '.join(schema.DOMAINS)})")
    for d in g.domains:
        for name in ("base_ctr", "base_cvr", "domain_share"):
            if d not in getattr(g.truth, name):
                raise ValueError(f"TruthParams.{name}: no value for domain {d!r}")
    checks = [("n_impressions", g.n_impressions >= 0), ("n_users", g.n_users >= 1), ("n_ads", g.n_ads >= 1),
              ("impressions_per_s", g.impressions_per_s > 0), ("bad_rate", 0 <= g.bad_rate <= 1),
              ("max_click_delay_s", g.max_click_delay_s > 0),
              ("max_conversion_delay_s", g.max_click_delay_s < g.max_conversion_delay_s <= scenarios.MAX_DELAY_S),
              ("ad_churn", 0 <= g.ad_churn <= 1), ("minority_share", 0 <= g.minority_share < 1),
              ("minority_contrast", 0 <= g.minority_contrast <= 1), ("delays", g.delays in scenarios.DELAY_MODELS),
              ("targeting", g.targeting >= 0), ("targeting_churn", 0 <= g.targeting_churn <= 1),
              ("start_ts", schema.MIN_TS_MS <= g.start_ts <= schema.MAX_TS_MS - 10**11),
              ("history_len", 0 <= g.history_len <= schema.MAX_LIST),
              ("cat_slots", 0 <= g.cat_slots <= schema.MAX_LIST), ("dense_dim", 0 <= g.dense_dim <= schema.MAX_LIST),
              ("content_dim", 1 <= g.content_dim <= schema.MAX_LIST), ("content_noise", g.content_noise >= 0),
              ("category_levels", 1 <= len(g.category_levels) <= 3 and all(k >= 1 for k in g.category_levels))]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"GeneratorConfig.{name}: bad value {getattr(g, name)!r}")
    if g.sessions.on and g.scenario.name == "interest-shift":
        raise ValueError("GeneratorConfig.sessions: the sessions world has its own user dynamics; "
                         "it does not combine with the interest-shift scenario")


class Simulation(msgspec.Struct, frozen=True):
    """``records``: events (and BadRecords) in non-decreasing event-time order; ``truth``: one row per
    impression (see :func:`truth_schema`)."""

    config: GeneratorConfig
    records: list[Any]
    truth: pa.Table

    def counts(self) -> dict[str, int]:
        out = {"impression": 0, "click": 0, "conversion": 0, "bad": 0}
        names = {schema.Impression: "impression", schema.Click: "click", schema.Conversion: "conversion",
                 BadRecord: "bad", schema.AdCreative: "creative"}
        for r in self.records:
            k = names[type(r)]
            out[k] = out.get(k, 0) + 1  # "creative" only with emit_creatives
        return out


def truth_schema() -> pa.Schema:
    return pa.schema([("impression_id", pa.string()), ("domain", pa.string()), ("user_id", pa.int64()),
                      ("ts", pa.int64()), ("p_click", pa.float64()), ("p_cvr", pa.float64()),
                      ("click", pa.int8()), ("conversion", pa.int8()), ("click_delay_ms", pa.int64()),
                      ("conversion_delay_ms", pa.int64()), ("ad_id", pa.int64()),
                      ("p_click_t0", pa.float64()), ("p_cvr_t0", pa.float64())])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return rng.permutation(w / w.sum())  # popularity rank independent of id


class _World(msgspec.Struct):
    """The hidden population: per-user and per-ad parameters (arrays indexed by user / ad index)."""

    user_w: np.ndarray
    user_lat: np.ndarray  # (n_users, k)
    user_bias: np.ndarray
    user_cvr_bias: np.ndarray
    user_device: np.ndarray
    user_country: np.ndarray
    user_hist: np.ndarray  # (n_users, history_len) ad indices
    ad_w: np.ndarray  # (n_ads + n_surge,): regular ads first, then the surge ads of new-ad-surge
    ad_lat: np.ndarray  # (n_ads + n_surge, k)
    ad_lat2: np.ndarray  # (n_ads + n_surge, k): where drift rotates the taste to
    ad_bias: np.ndarray
    ad_bias2: np.ndarray
    ad_birth: np.ndarray  # progress (0..1) when each ad is born / retired (inf: never)
    ad_death: np.ndarray
    ad_cvr_bias: np.ndarray
    ad_campaign: np.ndarray
    campaign_advertiser: np.ndarray
    w_dense: np.ndarray
    w_cvr_dense: np.ndarray
    cat_effect: np.ndarray  # (cat_slots, cat_vocab)
    cat_w: np.ndarray
    user_lat2: np.ndarray | None = None  # interest-shift: each user's taste after their switch
    user_switch: np.ndarray | None = None  # interest-shift: progress (0..1) of each user's switch
    user_minority: np.ndarray | None = None  # minority_share > 0: whether each user is in a minority country
    ad_lat_m: np.ndarray | None = None  # the ads' taste vectors and biases as the minority sees them
    ad_bias_m: np.ndarray | None = None
    minority_angle: float = 0.0


def _world(g: GeneratorConfig, rng: np.random.Generator) -> _World:
    t, k, sc = g.truth, g.truth.latent_dim, g.scenario
    n_surge = sc.n_surge_ads(g.n_ads)
    n_ads = g.n_ads + n_surge
    lat_std = (t.latent_scale ** 2 / k) ** 0.25  # var(<U,A>) = k * std^4 = latent_scale^2
    user_lat = rng.normal(0, lat_std, (g.n_users, k))
    if g.sessions.on:  # the sessions world: a user's taste is the mean of its interests (own generator)
        user_lat = sessions.interests(g.sessions, g.n_users, k, lat_std, g.seed).average()
    ad_lat = rng.normal(0, lat_std, (n_ads, k))
    ad_w = _zipf_weights(n_ads, t.zipf_ads, rng)
    n_campaigns = max(1, n_ads // 8)
    birth, death = scenarios.ad_lifetimes(g.n_ads, n_surge, g.ad_churn, sc, rng)
    ad_bias = rng.normal(0, t.ad_bias_std, n_ads)
    ad_bias[g.n_ads:] += sc.surge_bias
    # history: of 4x candidates drawn by popularity among the ads alive at the start, the ones the user likes most
    L = g.history_len
    alive0 = ad_w * (birth == 0)
    cand = rng.choice(n_ads, size=(g.n_users, max(4 * L, 1)), p=alive0 / alive0.sum())
    aff = np.einsum("uk,uck->uc", user_lat, ad_lat[cand])
    top = np.argsort(-aff, axis=1)[:, :L]
    w = _World(
        user_w=_zipf_weights(g.n_users, t.zipf_users, rng), user_lat=user_lat,
        user_bias=rng.normal(0, t.user_bias_std, g.n_users), user_cvr_bias=rng.normal(0, t.cvr_bias_std, g.n_users),
        user_device=rng.choice(len(schema.DEVICES), g.n_users, p=[0.4, 0.4, 0.15, 0.05]),
        user_country=rng.integers(0, len(_COUNTRIES), g.n_users),
        user_hist=np.take_along_axis(cand, top, axis=1),
        ad_w=ad_w, ad_lat=ad_lat, ad_lat2=rng.normal(0, lat_std, (n_ads, k)), ad_bias=ad_bias,
        ad_bias2=rng.normal(0, t.ad_bias_std, n_ads), ad_birth=birth, ad_death=death,
        ad_cvr_bias=rng.normal(0, t.cvr_bias_std, n_ads),
        ad_campaign=rng.integers(0, n_campaigns, n_ads),
        campaign_advertiser=rng.integers(0, max(1, n_campaigns // 4), n_campaigns),
        w_dense=rng.normal(0, t.dense_weight_std, g.dense_dim),
        w_cvr_dense=rng.normal(0, t.dense_weight_std, g.dense_dim),
        cat_effect=rng.normal(0, t.cat_effect_std, (g.cat_slots, t.cat_vocab)),
        cat_w=_zipf_weights(t.cat_vocab, 1.0, rng), **_interest_shift(g, lat_std))
    _minority(g, w, lat_std)
    return w


MINORITY_COUNTRIES = ("br", "in", "mx")


def _minority(g: GeneratorConfig, w: _World, lat_std: float) -> None:
    """``minority_share > 0``: choose the minority users, move them (and only them) to the minority countries,
    draw how the minority sees the ads (GeneratorConfig). Its own random stream: the rest of the world is
    drawn exactly as without it."""
    if g.minority_share <= 0:
        return
    rng = np.random.default_rng([g.seed, 0xC2A1])
    n, n_ads = len(w.user_w), len(w.ad_w)
    w.user_minority = rng.random(n) < g.minority_share
    major = [i for i, c in enumerate(_COUNTRIES) if c not in MINORITY_COUNTRIES]
    minor = [i for i, c in enumerate(_COUNTRIES) if c in MINORITY_COUNTRIES]
    w.user_country = np.where(w.user_minority, rng.choice(minor, n), rng.choice(major, n))
    w.ad_lat_m = rng.normal(0, lat_std, (n_ads, g.truth.latent_dim))
    w.ad_bias_m = rng.normal(0, g.truth.ad_bias_std, n_ads)
    w.minority_angle = float(np.clip(g.minority_contrast, 0.0, 1.0)) * np.pi / 2


def _interest_shift(g: GeneratorConfig, lat_std: float) -> dict[str, np.ndarray]:
    if g.scenario.name != "interest-shift":
        return {}
    switch, lat2 = scenarios.interest_switch(g.n_users, g.truth.latent_dim, lat_std, g.seed)
    return {"user_switch": switch, "user_lat2": lat2}


def _progress(ts: np.ndarray) -> np.ndarray:
    """Each impression's position in the run, 0 (first) .. 1 (last), by event time."""
    return (ts - ts[0]) / max(int(ts[-1] - ts[0]), 1) if len(ts) else np.zeros(0)


def _tastes(sc: scenarios.ScenarioConfig, w: _World, user: np.ndarray, ad: np.ndarray, progress: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user taste (n, k), ad taste (n, k), ad bias (n,)) of impressions at ``progress`` (0..1 of the run)."""
    a = scenarios.taste_angle(sc, progress)  # drift: the ads' taste vectors and biases turn from A to A'
    cos_a, sin_a = np.cos(a), np.sin(a)
    ad_lat = cos_a[:, None] * w.ad_lat[ad] + sin_a[:, None] * w.ad_lat2[ad]
    ad_bias = cos_a * w.ad_bias[ad] + sin_a * w.ad_bias2[ad]
    user_lat = w.user_lat[user]
    if w.user_switch is not None:  # interest-shift: a user's taste after their own switch time
        user_lat = np.where((progress >= w.user_switch[user])[:, None], w.user_lat2[user], user_lat)
    if w.user_minority is not None:  # minority users see every ad through their own taste vector and bias
        m, c, s = w.user_minority[user], np.cos(w.minority_angle), np.sin(w.minority_angle)
        ad_lat = np.where(m[:, None], c * ad_lat + s * w.ad_lat_m[ad], ad_lat)
        ad_bias = np.where(m, c * ad_bias + s * w.ad_bias_m[ad], ad_bias)
    return user_lat, ad_lat, ad_bias


def _session_schedule(g: GeneratorConfig, w: _World) -> sessions.Schedule:
    """The sessions world's users, times and intents of the ``n_impressions`` impressions (own generators)."""
    k = g.truth.latent_dim
    lat_std = (g.truth.latent_scale ** 2 / k) ** 0.25
    it = sessions.interests(g.sessions, g.n_users, k, lat_std, g.seed)
    return sessions.schedule(g.sessions, g.n_impressions, g.impressions_per_s, w.user_w, it, lat_std, g.seed)


def session_tastes(sim: Simulation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sessions world's (intent (n, k), the user's average taste (n, k), ad taste (n, k)) behind each
    impression of ``sim.truth``; ``<intent, ad>`` is the click logit's affinity term."""
    g = sim.config
    if not g.sessions.on:
        raise ValueError("session_tastes: this simulation is not of the sessions world (sessions.n_interests = 0)")
    w = _world(g, np.random.default_rng(g.seed))
    t = sim.truth
    user, ad = t.column("user_id").to_numpy() - 1, t.column("ad_id").to_numpy() - 1
    _, ad_lat, _ = _tastes(g.scenario, w, user, ad, _progress(t.column("ts").to_numpy()))
    return _session_schedule(g, w).intent, w.user_lat[user], ad_lat


def hidden_tastes(sim: Simulation) -> tuple[np.ndarray, np.ndarray]:
    """(user taste (n, k), ad taste (n, k)) behind each impression of ``sim.truth``, for oracle *features*
    in quality studies (what a perfect user model could know). The hidden world is drawn again from the
    seed, exactly as :func:`simulate` drew it; ``<user, ad>`` is the affinity term of the click logit.

    >>> sim = simulate(GeneratorConfig(n_impressions=50, seed=3))
    >>> u, a = hidden_tastes(sim)
    >>> u.shape, a.shape
    ((50, 8), (50, 8))
    """
    g = sim.config
    if g.sessions.on:  # the current intent is the user's taste of the moment
        intent, _, ad_lat = session_tastes(sim)
        return intent, ad_lat
    w = _world(g, np.random.default_rng(g.seed))  # simulate()'s first draws
    t = sim.truth
    user = t.column("user_id").to_numpy() - 1
    ad = t.column("ad_id").to_numpy() - 1
    user_lat, ad_lat, _ = _tastes(g.scenario, w, user, ad, _progress(t.column("ts").to_numpy()))
    return user_lat, ad_lat


class AdContent(msgspec.Struct, frozen=True):
    """What an ad's creative says about it, per ad (index ``i`` is ad id ``ad_ids[i] = i + 1``): ``content``
    (n, content_dim) float32, the embedding a text/image encoder would give the creative; ``category``
    (n, levels) int64, the category path (level ``l``'s id is global: ``category[:, l]`` tells the parent too);
    ``birth_ts`` / ``death_ts`` (n,) int64 event-time ms (``start_ts`` for the ads alive from the start,
    ``MAX_TS_MS`` for ads never retired); ``surge`` (n,) bool: the new-ad-surge batch."""

    ad_ids: np.ndarray
    content: np.ndarray
    category: np.ndarray
    birth_ts: np.ndarray
    death_ts: np.ndarray
    surge: np.ndarray


def _ad_signal(g: GeneratorConfig, w: _World) -> np.ndarray:
    """(n_ads, k + 1): what makes the hidden world treat ads alike: the taste vector (unit variance per
    coordinate) and the click bias, weighted by their shares of the click logit's variance (the bias carries
    ``ad_bias_std^2 / latent_scale^2`` of the taste's, so its column gets that share of the k taste columns)."""
    t, k = g.truth, g.truth.latent_dim
    lat_std = (t.latent_scale ** 2 / k) ** 0.25
    bias_w = math.sqrt(k) * t.ad_bias_std / max(t.latent_scale, 1e-9)
    return np.concatenate([w.ad_lat / lat_std, (w.ad_bias / max(t.ad_bias_std, 1e-9) * bias_w)[:, None]], axis=1)


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Nearest-centroid label of every row of ``x`` after FAISS k-means with ``k`` centroids (fewer rows than
    ``k``: each row its own label)."""
    if len(x) <= k:
        return np.arange(len(x), dtype=np.int64)
    import faiss

    from embedding_store.semantic_ids import one_faiss_thread

    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    with one_faiss_thread():  # deterministic, and fast on busy cores
        km.train(x32)
    return km.index.search(x32, 1)[1][:, 0].astype(np.int64)


def _ad_content(g: GeneratorConfig, w: _World, ts0: int, ts1: int) -> AdContent:
    """Content embeddings and category paths of every ad of world ``w`` (a run spanning ``ts0..ts1`` ms).

    ``content = signal @ P + content_noise * s * N(0, 1)``: ``signal`` from :func:`_ad_signal`, ``P`` a fixed
    random projection to ``content_dim`` (an encoder that mixes the hidden causes), ``s`` the signal's standard
    deviation per content coordinate. The category path clusters the noise-free signal (k-means per level,
    nested: level ``l + 1`` splits each level-``l`` category into ``category_levels[l + 1]``), as a catalogue's
    taxonomy groups ads that appeal to the same people. Own random stream: the traffic of a seed does not
    change."""
    rng = np.random.default_rng([g.seed, 0xC0DE])
    z = _ad_signal(g, w)
    proj = rng.normal(0, 1.0 / math.sqrt(z.shape[1]), (z.shape[1], g.content_dim))
    sig = z @ proj
    s = float(sig.std()) or 1.0
    content = (sig + g.content_noise * s * rng.normal(0, 1, sig.shape)).astype(np.float32)
    n = len(z)
    cat = np.zeros((n, len(g.category_levels)), np.int64)
    parent = np.zeros(n, np.int64)
    for lvl, k in enumerate(g.category_levels):
        for p in np.unique(parent).tolist():
            m = np.flatnonzero(parent == p)
            cat[m, lvl] = p * k + _kmeans_labels(z[m], k, g.seed + 7919 * lvl + p)
        parent = cat[:, lvl]
    span = max(ts1 - ts0, 1)
    birth = np.where(w.ad_birth > 0, ts0 + np.round(w.ad_birth * span), g.start_ts).astype(np.int64)
    death = np.where(np.isfinite(w.ad_death), ts0 + np.round(np.minimum(w.ad_death, 1.0) * span),
                     schema.MAX_TS_MS).astype(np.int64)
    surge = np.zeros(n, bool)
    surge[g.n_ads:] = True
    return AdContent(ad_ids=np.arange(1, n + 1, dtype=np.int64), content=content, category=cat, birth_ts=birth,
                     death_ts=death, surge=surge)


def ad_content(sim: Simulation) -> AdContent:
    """Every ad's creative content of ``sim``'s world (:class:`AdContent`), drawn again from the seed like
    :func:`hidden_tastes`: what a creative encoder and a catalogue would know about each ad at its birth.

    >>> sim = simulate(GeneratorConfig(n_impressions=50, seed=3, n_ads=40, content_dim=6))
    >>> c = ad_content(sim)
    >>> c.content.shape, c.category.shape, int(c.category[:, 0].max()) < 8, bool((c.category[:, 1] // 4 == c.category[:, 0]).all())
    ((40, 6), (40, 2), True, True)
    """
    g = sim.config
    w = _world(g, np.random.default_rng(g.seed))
    ts = sim.truth.column("ts").to_numpy()
    ts0, ts1 = (int(ts[0]), int(ts[-1])) if len(ts) else (g.start_ts, g.start_ts)
    return _ad_content(g, w, ts0, ts1)


def _draw_domains(g: GeneratorConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Domain index (into ``g.domains``) of ``n`` impressions or requests, by ``domain_share``."""
    share = np.array([g.truth.domain_share[d] for d in g.domains])
    return rng.choice(len(g.domains), n, p=share / share.sum())


def _draw_users(w: _World, n: int, rng: np.random.Generator) -> np.ndarray:
    """User index of ``n`` impressions or requests, by the users' Zipf activity."""
    return rng.choice(len(w.user_w), n, p=w.user_w)


def _draw_dense(g: GeneratorConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.round(rng.normal(0, 1, (n, g.dense_dim)), 4)


def _draw_cat(g: GeneratorConfig, w: _World, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(g.truth.cat_vocab, (n, g.cat_slots), p=w.cat_w)


def _targeted_ads(g: GeneratorConfig, w: _World, user: np.ndarray, drawn: np.ndarray, progress: np.ndarray
                  ) -> np.ndarray:
    """The ad of each impression from its user's targeting set (``GeneratorConfig.targeting``). A fresh
    member is the popularity draw of a nearby impression (``drawn``: :func:`scenarios.sample_ads`' ads, alive
    at about that time) that is alive now."""
    rng = np.random.default_rng([g.seed, 0x501A])  # its own stream: the other draws stay as they were
    n, k = len(drawn), g.targeting
    near = rng.integers(-256, 257, (n, k + 9))
    pick = rng.integers(0, k, n)
    churn = rng.random(n) < g.targeting_churn
    birth, death = w.ad_birth, w.ad_death
    sets: dict[int, list[int]] = {}
    out = np.empty(n, np.int64)
    for i, (u, p) in enumerate(zip(user.tolist(), progress.tolist())):
        js = iter(np.clip(i + near[i], 0, n - 1).tolist())

        def fresh() -> int:
            for j in js:
                a = int(drawn[j])
                if birth[a] <= p < death[a]:
                    return a
            return int(drawn[i])

        s = sets.get(u)
        if s is None:
            s = sets[u] = [int(drawn[i])] + [fresh() for _ in range(k - 1)]
        elif churn[i]:
            s[pick[i]] = fresh()
        for m, a in enumerate(s):
            if not birth[a] <= p < death[a]:
                s[m] = fresh()
        out[i] = s[pick[i]]
    return out


def _truth(g: GeneratorConfig, w: _World, dom: np.ndarray, user: np.ndarray, ad: np.ndarray, pos: np.ndarray,
           dense: np.ndarray, cat: np.ndarray, ts: np.ndarray, progress: np.ndarray, stale: bool = False,
           intent: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The hidden model (module docstring): true ``p_click`` and ``p_cvr`` of impressions (index arrays of
    length n; ``ts`` event time in ms, ``progress`` 0..1 of the run for the drift scenarios). With ``stale``
    also ``p_click_t0``/``p_cvr_t0``: the truth as it was at the start, knowing only the ads alive then (no
    drift, no season). The one implementation of the truth: :func:`simulate` and
    :class:`streams.sources.audience.Audience` both call it. ``intent`` (n, k): the sessions world's current
    intent of each impression, in the user's taste's place."""
    t, sc = g.truth, g.scenario
    user_lat, ad_lat, ad_bias = _tastes(sc, w, user, ad, progress)
    if intent is not None:
        user_lat = intent
    season = scenarios.season_logit(sc, (ts - g.start_ts) / 1000.0)
    if sc.name == "sudden-levels":  # per-domain level jumps (zero for every other scenario: left out of them)
        season = season + scenarios.level_logit(sc, progress, dom)
    affinity = np.einsum("nk,nk->n", user_lat, ad_lat)
    base_ctr = np.array([_logit(t.base_ctr[d]) for d in g.domains])[dom]
    base_cvr = np.array([_logit(t.base_cvr[d]) for d in g.domains])[dom]
    cat_term = w.cat_effect[np.arange(g.cat_slots), cat].sum(axis=1) if g.cat_slots else 0.0
    cvr_scale = t.cvr_latent_scale / max(t.latent_scale, 1e-9)
    common = t.position_effect * pos + dense @ w.w_dense + cat_term
    p_click = _sigmoid(base_ctr + season + w.user_bias[user] + ad_bias + affinity + common)
    p_cvr = _sigmoid(base_cvr + season + w.user_cvr_bias[user] + w.ad_cvr_bias[ad] + cvr_scale * affinity
                     + dense @ w.w_cvr_dense)
    out = {"p_click": p_click, "p_cvr": p_cvr}
    if stale:
        known = w.ad_birth[ad] == 0
        aff0 = np.where(known, np.einsum("nk,nk->n", w.user_lat[user], w.ad_lat[ad]), 0.0)
        out["p_click_t0"] = _sigmoid(base_ctr + w.user_bias[user] + np.where(known, w.ad_bias[ad], 0.0) + aff0
                                     + common)
        out["p_cvr_t0"] = _sigmoid(base_cvr + w.user_cvr_bias[user] + np.where(known, w.ad_cvr_bias[ad], 0.0)
                                   + cvr_scale * aff0 + dense @ w.w_cvr_dense)
    return out


def _outcomes(g: GeneratorConfig, p_click: np.ndarray, p_cvr: np.ndarray, rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
    """What users do with impressions of true ``p_click``/``p_cvr``: ``click``, ``conv`` (only after a click),
    ``click_ms`` and ``conv_ms`` (delays from the impression, drawn for every impression: meaningful where
    ``click`` / ``conv``), ``value`` of a conversion. The one implementation of outcomes and delays (the
    generator and :class:`streams.sources.audience.Audience`)."""
    t, n = g.truth, len(p_click)
    click = rng.random(n) < p_click
    conv = click & (rng.random(n) < p_cvr)
    max_click_ms = int(g.max_click_delay_s * 1000)
    click_ms = np.exp(rng.normal(np.log(t.click_delay_median_s * 1000), t.click_delay_sigma, n))
    click_ms = np.clip(click_ms, 100, max_click_ms).astype(np.int64)
    after_click_s = scenarios.conversion_delays_s(g.delays, n, rng, g.max_conversion_delay_s, t.conv_fast_share,
                                                  t.conv_fast_mean_s, t.conv_slow_mean_s)
    after_click_ms = (1000 * after_click_s).astype(np.int64) + (1000 if g.delays == "short" else 0)
    conv_ms = np.maximum(np.minimum(click_ms + after_click_ms, int(g.max_conversion_delay_s * 1000)), click_ms + 1)
    return {"click": click, "conv": conv, "click_ms": click_ms, "conv_ms": conv_ms,
            "value": np.round(rng.lognormal(3.0, 1.0, n), 2)}


def _impressions(g: GeneratorConfig, w: _World, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Column arrays of the impressions, true probabilities and realized outcomes (length n)."""
    t, n, sc = g.truth, g.n_impressions, g.scenario
    ts = g.start_ts + np.floor(np.cumsum(rng.exponential(1000.0 / g.impressions_per_s, n))).astype(np.int64)
    progress = _progress(ts)
    dom = _draw_domains(g, n, rng)
    user = _draw_users(w, n, rng)
    intent = None
    if g.sessions.on:  # the sessions world: its own users and times (the draws above keep the rest the same)
        sch = _session_schedule(g, w)
        ts = g.start_ts + np.floor(sch.t_s * 1000).astype(np.int64)
        progress, user, intent = _progress(ts), sch.user, sch.intent
    ad = scenarios.sample_ads(progress, w.ad_w, w.ad_birth, w.ad_death, len(w.ad_w) - g.n_ads, sc.surge_share, rng)
    if g.targeting > 0:
        ad = _targeted_ads(g, w, user, ad, progress)
    pos = rng.integers(0, t.max_position, n)
    dense = _draw_dense(g, n, rng)
    cat = _draw_cat(g, w, n, rng)
    p = _truth(g, w, dom, user, ad, pos, dense, cat, ts, progress, stale=True, intent=intent)
    o = _outcomes(g, p["p_click"], p["p_cvr"], rng)
    click, conv = o["click"], o["conv"]
    if g.sessions.on:  # history = the user's latest clicked ads, as of each impression
        p["history"] = sessions.click_histories(user, ts, ad, click, o["click_ms"], w.user_hist, g.history_len)
    return {"dom": dom, "user": user, "ad": ad, "pos": pos, "dense": dense, "cat": cat, "ts": ts, **p,
            "click": click, "conv": conv, "click_ms": np.where(click, o["click_ms"], -1),
            "conv_ms": np.where(conv, o["conv_ms"], -1), "value": o["value"]}


def _events(g: GeneratorConfig, w: _World, c: dict[str, np.ndarray]) -> list[Any]:
    """Impression/Click/Conversion structs, sorted by (ts, kind, impression index)."""
    n, s = g.n_impressions, g.seed
    ci, vi = np.flatnonzero(c["click"]), np.flatnonzero(c["conv"])
    all_ts = np.concatenate([c["ts"], c["ts"][ci] + c["click_ms"][ci], c["ts"][vi] + c["conv_ms"][vi]])
    kind = np.concatenate([np.zeros(n, np.int8), np.ones(len(ci), np.int8), np.full(len(vi), 2, np.int8)])
    idx = np.concatenate([np.arange(n), ci, vi])
    order = np.lexsort((idx, kind, all_ts))
    user_ids = (c["user"] + 1).tolist()
    ad = c["ad"]
    ad_ids, camp = (ad + 1).tolist(), w.ad_campaign[ad]
    camp_ids, adv_ids = (camp + 1).tolist(), (w.campaign_advertiser[camp] + 1).tolist()
    doms = [g.domains[d] for d in c["dom"].tolist()]
    pos = c["pos"].tolist()
    dev = [schema.DEVICES[d] for d in w.user_device[c["user"]].tolist()]
    ctry = [_COUNTRIES[x] for x in w.user_country[c["user"]].tolist()]
    cat, dense = c["cat"].tolist(), c["dense"].tolist()
    hist = ([[a + 1 for a in h] for h in c["history"]] if "history" in c
            else (w.user_hist[c["user"]] + 1).tolist())
    values = c["value"].tolist()
    out: list[Any] = []
    Imp, Clk, Cnv = schema.Impression, schema.Click, schema.Conversion
    for t_, k_, i in zip(all_ts[order].tolist(), kind[order].tolist(), idx[order].tolist()):
        if k_ == 0:
            out.append(Imp(event_id=f"imp-{s}-{i}", ts=t_, user_id=user_ids[i], ad_id=ad_ids[i],
                           campaign_id=camp_ids[i], advertiser_id=adv_ids[i], domain=doms[i], position=pos[i],
                           device=dev[i], country=ctry[i], cat=cat[i], dense=dense[i], history=hist[i]))
        elif k_ == 1:
            out.append(Clk(event_id=f"clk-{s}-{i}", impression_id=f"imp-{s}-{i}", ts=t_, user_id=user_ids[i]))
        else:
            out.append(Cnv(event_id=f"cnv-{s}-{i}", impression_id=f"imp-{s}-{i}", ts=t_, user_id=user_ids[i],
                           value=values[i]))
    return out


def _with_creatives(g: GeneratorConfig, w: _World, c: dict[str, np.ndarray], records: list[Any]) -> list[Any]:
    """``records`` with an :class:`~streams.schema.AdCreative` for every ad at its birth (ads alive from the
    start: at ``start_ts``), placed before the events of the same ms (emit_creatives; topics.ads)."""
    ts = c["ts"]
    content = _ad_content(g, w, int(ts[0]) if len(ts) else g.start_ts, int(ts[-1]) if len(ts) else g.start_ts)
    last = int(ts[-1]) if len(ts) else g.start_ts
    order = np.argsort(content.birth_ts, kind="stable")
    order = order[content.birth_ts[order] <= last]  # ads born after the last impression: never seen
    vals = np.round(content.content.astype(np.float64), 5)
    creatives = [schema.AdCreative(ad_id=int(content.ad_ids[i]), ts=int(content.birth_ts[i]), content=vals[i].tolist(),
                                   category=content.category[i].tolist()) for i in order.tolist()]
    out: list[Any] = []
    j = 0
    for r in records:
        t = getattr(r, "ts", None)  # a BadRecord has none: it stays where it is
        while t is not None and j < len(creatives) and creatives[j].ts <= t:
            out.append(creatives[j])
            j += 1
        out.append(r)
    out.extend(creatives[j:])
    return out


def simulate(g: GeneratorConfig) -> Simulation:
    """Generate traffic for ``g``: records in event-time order (plus BadRecords when ``bad_rate > 0``)."""
    validate(g)
    rng = np.random.default_rng(g.seed)
    w = _world(g, rng)
    c = _impressions(g, w, rng)
    records = _events(g, w, c)
    n_bad = int(round(g.bad_rate * len(records)))
    if n_bad:
        bad = make_bad_records(records, n_bad, rng)
        at = np.sort(rng.integers(0, len(records) + 1, n_bad))  # insert before these positions
        merged: list[Any] = []
        prev = 0
        for pos, b in zip(at.tolist(), bad):
            merged.extend(records[prev:pos])
            merged.append(b)
            prev = pos
        merged.extend(records[prev:])
        records = merged
    if g.emit_creatives:
        records = _with_creatives(g, w, c, records)
    n = g.n_impressions
    truth = pa.table({
        "impression_id": [f"imp-{g.seed}-{i}" for i in range(n)],
        "domain": [g.domains[d] for d in c["dom"].tolist()],
        "user_id": c["user"] + 1, "ts": c["ts"], "p_click": c["p_click"], "p_cvr": c["p_cvr"],
        "click": c["click"].astype(np.int8), "conversion": c["conv"].astype(np.int8),
        "click_delay_ms": c["click_ms"], "conversion_delay_ms": c["conv_ms"], "ad_id": c["ad"] + 1,
        "p_click_t0": c["p_click_t0"], "p_cvr_t0": c["p_cvr_t0"]}, schema=truth_schema())
    return Simulation(config=g, records=records, truth=truth)


# -- oracle metrics ---------------------------------------------------------------------------------------

def oracle_metrics(truth: pa.Table) -> dict[str, dict[str, float]]:
    """Per domain (and ``"all"``): rates and the AUC/NE that the true probabilities reach.

    Conversion is scored over impressions with ``p_click * p_cvr`` (ESMM's CTCVR), as the model's
    conversion head is evaluated.
    """
    dom = np.asarray(truth.column("domain").to_pylist(), dtype=object)
    pc, pv = truth.column("p_click").to_numpy(), truth.column("p_cvr").to_numpy()
    yc, yv = truth.column("click").to_numpy(), truth.column("conversion").to_numpy()
    out: dict[str, dict[str, float]] = {}
    for name in ["all", *sorted(set(dom.tolist()))]:
        m = np.ones(len(dom), bool) if name == "all" else dom == name
        n_clicks = int(yc[m].sum())
        out[name] = {"impressions": float(m.sum()), "ctr": float(yc[m].mean()) if m.any() else float("nan"),
                     "cvr": float(yv[m].sum() / n_clicks) if n_clicks else float("nan"),
                     "auc_click": roc_auc(yc[m], pc[m]), "ne_click": normalized_entropy(yc[m], pc[m]),
                     "auc_conversion": roc_auc(yv[m], pc[m] * pv[m]),
                     "ne_conversion": normalized_entropy(yv[m], pc[m] * pv[m])}
    return out


def oracle_by_window(truth: pa.Table, window_s: float) -> list[dict[str, float]]:
    """The oracle's metrics per event-time window of ``window_s`` seconds (from the first impression),
    all domains pooled: ``start_ts`` (ms), ``impressions``, ``ctr``, ``auc_click``, ``ne_click``,
    ``auc_conversion``, ``ne_conversion`` (conversion scored with ``p_click * p_cvr`` as in
    :func:`oracle_metrics`): what a model that knew the current hidden truth would score; and
    ``auc_click_t0``, ``ne_click_t0``: the *stale* oracle, the truth frozen at the start of the run (ads
    born later unknown to it) -- the gap between the two is what the drift costs a model that stops
    learning. Never shown to the trainer."""
    if window_s <= 0:
        raise ValueError(f"oracle_by_window: window_s must be > 0, got {window_s}")
    ts = truth.column("ts").to_numpy()
    if not len(ts):
        return []
    pc, pv = truth.column("p_click").to_numpy(), truth.column("p_cvr").to_numpy()
    yc, yv = truth.column("click").to_numpy(), truth.column("conversion").to_numpy()
    p0 = truth.column("p_click_t0").to_numpy()
    w = ((ts - ts.min()) // int(window_s * 1000)).astype(np.int64)
    out = []
    for k in np.unique(w).tolist():
        m = w == k
        out.append({"start_ts": float(ts.min() + k * int(window_s * 1000)), "impressions": float(m.sum()),
                    "ctr": float(yc[m].mean()), "auc_click": roc_auc(yc[m], pc[m]),
                    "ne_click": normalized_entropy(yc[m], pc[m]), "auc_conversion": roc_auc(yv[m], pc[m] * pv[m]),
                    "ne_conversion": normalized_entropy(yv[m], pc[m] * pv[m]),
                    "auc_click_t0": roc_auc(yc[m], p0[m]), "ne_click_t0": normalized_entropy(yc[m], p0[m])})
    return out


def oracle_window_table(truth: pa.Table, window_s: float) -> str:
    """:func:`oracle_by_window` as text lines (what ``streamrec generate`` prints)."""
    ts0 = truth.column("ts").to_numpy().min() if truth.num_rows else 0
    lines = [f"oracle by {window_s:g} s window:  start_s  imps    ctr  auc_click ne_click auc_conv ne_conv"
             "  | stale (t0) auc_click ne_click"]
    for r in oracle_by_window(truth, window_s):
        lines.append(f"  {(r['start_ts'] - ts0) / 1000:30.0f} {r['impressions']:5.0f} {r['ctr']:.4f}  "
                     f"{r['auc_click']:9.3f} {r['ne_click']:8.3f} {r['auc_conversion']:8.3f} {r['ne_conversion']:7.3f}"
                     f"  | {r['auc_click_t0']:20.3f} {r['ne_click_t0']:8.3f}")
    return "\n".join(lines)


def write_log(path: str | Path, records: list[Any]) -> int:
    """Write ``records`` as Parquet (``*.parquet``, one row per record) or JSONL (any other suffix)."""
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        from streams.sources.formats.native import write_parquet

        return write_parquet(path, records)
    return write_jsonl(path, records)


def write_truth(truth: pa.Table, path: str | Path) -> None:
    pq.write_table(truth, str(path))


# -- CLI ----------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate synthetic ad traffic into the topics or a log file",
                              description="Synthetic impressions, clicks and conversions from a hidden model "
                                          "that can be learned; with --out write a JSONL log, else produce to "
                                          "the broker (ending with a watermark on every input partition).")
    p.add_argument("--events", type=int, required=True, metavar="N", help="number of impressions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-rate", type=float, default=0.0, help="extra malformed records, fraction of good ones")
    p.add_argument("--domains", default=",".join(GeneratorConfig().domains),
                   help=f"comma-separated surfaces (known: {','.join(schema.DOMAINS)})")
    p.add_argument("--out", metavar="LOG", help="write a log instead of producing to the broker: "
                                                 "LOG.parquet (one row per record) or JSONL (any other name)")
    p.add_argument("--truth", metavar="TRUTH.parquet", help="write per-impression ground truth to Parquet")
    p.add_argument("--scenario", default="none", choices=scenarios.SCENARIOS,
                   help="drift scenario (default: none; see docs/generator.md)")
    p.add_argument("--scenario-param", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario parameter, repeatable: angle, at, amplitude, period_s, surge_ads, surge_share, "
                        "surge_bias")
    p.add_argument("--world", default="default", choices=tuple(sessions.WORLDS),
                   help="default, or sessions: users with several long-term interests who arrive in sessions whose "
                        "intent evolves; history = the latest clicked ads (streams/sources/sessions.py)")
    p.add_argument("--delays", default="short", choices=scenarios.DELAY_MODELS,
                   help="conversion delays: short (default, <= 6 h) or calibrated (Chapelle 2014: ~35%% < 1 h, "
                        "~50%% < 24 h, 30-day tail)")
    p.add_argument("--max-conversion-delay", metavar="DURATION", default=None,
                   help="cap on conversion delay from the impression, e.g. 6h, 7d, 30d (max); "
                        "default 6h, or 30d with --delays calibrated")
    p.add_argument("--ad-churn", type=float, default=GeneratorConfig().ad_churn,
                   help="fraction of ads born during the run, and retired (default %(default)s)")
    p.add_argument("--rate", type=float, default=GeneratorConfig().impressions_per_s,
                   help="impressions per second of event time (default %(default)s)")
    p.add_argument("--oracle-window", metavar="DURATION", default=None,
                   help="window of the per-window oracle metrics (default: a tenth of the run)")
    p.add_argument("--creatives", action="store_true",
                   help="also an AdCreative record (content embedding, category path) at each ad's birth, to "
                        "topics.ads: the content trainer.ad_id_features codes semantic IDs from (broker only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _oracle_line(truth: pa.Table) -> str:
    m = oracle_metrics(truth)
    return "oracle AUC click " + ", ".join(f"{d} {v['auc_click']:.3f}" for d, v in m.items())


def duration_s(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``6h`` or ``30d``.

    >>> duration_s("30d"), duration_s("1.5h"), duration_s("90")
    (2592000.0, 5400.0, 90.0)
    """
    unit = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * unit[t[-1]] if t and t[-1] in unit else float(t)
    except ValueError:
        raise ValueError(f"bad duration {text!r}: expected e.g. 90, 90s, 15m, 6h, 30d") from None


def _config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    max_conv = (duration_s(args.max_conversion_delay) if args.max_conversion_delay else
                scenarios.MAX_DELAY_S if args.delays == "calibrated" else GeneratorConfig().max_conversion_delay_s)
    g = GeneratorConfig(n_impressions=args.events, seed=args.seed, bad_rate=args.bad_rate,
                        domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
                        scenario=scenarios.parse_params(args.scenario, args.scenario_param),
                        delays=args.delays, max_conversion_delay_s=max_conv, ad_churn=args.ad_churn,
                        impressions_per_s=args.rate, emit_creatives=bool(getattr(args, "creatives", False)),
                        sessions=sessions.WORLDS[args.world])
    validate(g)
    return g


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        g = _config_from_args(args)
        window_s = duration_s(args.oracle_window) if args.oracle_window else None
    except ValueError as e:
        print(f"streamrec generate: {e}", file=sys.stderr)
        return 2
    if not args.out and not cfg.kafka.bootstrap_servers:
        print(f"streamrec generate: {NO_BROKER}", file=sys.stderr)
        return 2
    if args.out and g.emit_creatives:
        print("streamrec generate: --creatives go to the broker's ads topic; a log (--out) holds input events only",
              file=sys.stderr)
        return 2
    lab = cfg.labels
    if g.max_click_delay_s >= lab.click_window_s or g.max_conversion_delay_s >= lab.conversion_window_s:
        print(f"streamrec generate: warning: delays (click <= {g.max_click_delay_s:.0f} s, conversion <= "
              f"{g.max_conversion_delay_s:.0f} s) reach past the label windows ({lab.click_window_s} s, "
              f"{lab.conversion_window_s} s): some positives will be labelled negative", file=sys.stderr)
    t0 = time.monotonic()
    sim = simulate(g)
    gen_s = time.monotonic() - t0
    if args.truth:
        write_truth(sim.truth, args.truth)
    c = sim.counts()
    if window_s is None:
        span_s = (sim.truth.column("ts").to_numpy().max() - g.start_ts) / 1000 if g.n_impressions else 1.0
        window_s = float(max(1, math.ceil((span_s + 1) / 10)))  # ten windows
    print(oracle_window_table(sim.truth, window_s))
    head = (f"generated {c['impression']} impressions, {c['click']} clicks, {c['conversion']} conversions, "
            f"{c['bad']} bad records in {gen_s:.1f} s")
    if args.out:
        write_log(args.out, sim.records)
        print(f"{head} -> {args.out}; {_oracle_line(sim.truth)}")
        return 0
    from streams.bus import kafka_io

    try:
        kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions,
                               cfg.kafka.client)
        s = produce(cfg, sim.records, progress=not args.no_progress)
    except (ValueError, RuntimeError, kafka_io.KafkaException) as e:
        print(f"streamrec generate: {e}", file=sys.stderr)
        return 1
    print(f"{head}; produced {summary(s)}; {_oracle_line(sim.truth)}")
    return 0
