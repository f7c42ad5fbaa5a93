"""A simulated audience: the generator's hidden world as users who send ranking requests and react to what
was actually served (``streamrec up --serve`` and ``streamrec audience``; the driver is :mod:`deploy.audience`).

The world is the one :func:`streams.sources.generate.simulate` draws for the same :class:`GeneratorConfig`
(same seed: the same users, tastes, ads, campaigns), so a model trained on a generated warm-up log meets the
very users it learned. Nothing about the truth is copied here: requests are drawn by the generator's own
draws (user by activity, domain by share, the user's device, country and history, dense and categorical
context), the click and conversion probabilities come from its ``_truth`` and the outcomes and their delays
from its ``_outcomes`` -- one implementation for the log and the audience.

Time. A request's ``ts`` (ms, normally the wall clock) decides the world's state: ``progress`` (0..1 of the
generator's run: which ads are alive, how far a drift scenario turned the tastes) is fixed at the end of the
warm-up log by default (1.0), or moves from 0 to 1 over ``run_s`` seconds from ``start_ms`` (a scenario played
during serving); the seasonal cycle follows ``ts - g.start_ts`` as in the log. Feedback delays are the
generator's, divided by ``time_scale`` (60: a minute of user time passes in a second), so a short test sees
its conversions; a click's event ``ts`` is the request's plus the compressed delay.

The oracle: :meth:`Audience.truth` gives the true ``p_click``/``p_conversion`` of any (request, ad, position)
-- what tells which arm served better ads, independently of the noisy clicks.

>>> from streams.sources.generate import GeneratorConfig
>>> aud = Audience(GeneratorConfig(n_users=500, n_ads=200, seed=3), time_scale=60.0)
>>> req = aud.requests(1, ts=1_767_225_600_000)[0]
>>> cands = aud.candidates(req, 20)
>>> len(cands), len({c.ad_id for c in cands})
(20, 20)
>>> pc, pv = aud.truth(req, [c.ad_id for c in cands[:3]], [0, 1, 2])
>>> bool(((0 < pc) & (pc < 1)).all()), pc.shape
(True, (3,))
>>> out = aud.respond(req, [(c.ad_id, i) for i, c in enumerate(cands[:10])])
>>> [o.impression_id for o in out[:2]] == [f"{req.request_id}.0", f"{req.request_id}.1"]
True
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import msgspec
import numpy as np

from streams import schema
from streams.sources import scenarios
from streams.sources.generate import (_COUNTRIES, GeneratorConfig, _draw_cat, _draw_dense, _draw_domains,
                                      _draw_users, _outcomes, _truth, _world, validate)

# the audience's own random stream (requests, candidates, outcomes): the world itself is the generator's
# first draws from the seed, as in simulate(); this stream never disturbs it
_STREAM = 0xA0D1E


class Ad(msgspec.Struct, frozen=True, gc=False):
    """A catalogue entry, as a ranking request's candidate names it."""

    ad_id: int
    campaign_id: int
    advertiser_id: int


class Request(msgspec.Struct, frozen=True, gc=False):
    """One user's ranking request (the context of ``POST /rank``)."""

    request_id: str
    ts: int  # ms
    user_id: int
    domain: str
    device: str
    country: str
    dense: list[float]
    cat: list[int]
    history: list[int]

    def body(self, candidates: Sequence[Ad] | None = None, k: int = 10) -> dict:
        """The JSON body of ``POST /rank`` (see README, "Serving"); without candidates the service retrieves."""
        out = {"request_id": self.request_id, "user_id": self.user_id, "domain": self.domain, "k": k,
               "context": {"device": self.device, "country": self.country, "dense": self.dense, "cat": self.cat,
                           "history": self.history}, "ts": self.ts}
        if candidates is not None:
            out["candidates"] = [{"ad_id": a.ad_id, "campaign_id": a.campaign_id, "advertiser_id": a.advertiser_id}
                                 for a in candidates]
        return out


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What the user did with one served ad: the truth it was drawn from and the realized feedback."""

    impression_id: str  # f"{request_id}.{position}", the served impression's event id
    user_id: int
    ad_id: int
    position: int
    p_click: float
    p_conversion: float  # post-click
    click_ts: int | None  # event time of the click (request ts + compressed delay), None: no click
    conversion_ts: int | None
    value: float = 0.0

    def events(self) -> list[schema.Click | schema.Conversion]:
        """The feedback events (ids derived from the impression id: a re-sent event is a duplicate the labels
        join drops, never a second click)."""
        out: list = []
        if self.click_ts is not None:
            out.append(schema.Click(event_id=f"clk-{self.impression_id}", impression_id=self.impression_id,
                                    ts=self.click_ts, user_id=self.user_id))
        if self.conversion_ts is not None:
            out.append(schema.Conversion(event_id=f"cnv-{self.impression_id}", impression_id=self.impression_id,
                                         ts=self.conversion_ts, user_id=self.user_id, value=self.value))
        return out


class Audience:
    """Users of the generator's world for ``g`` (see the module docstring).

    ``time_scale``: feedback delays are divided by it. ``progress``: the world's fixed state (1.0: as the
    warm-up log of ``g`` left it), unless ``run_s`` is given: then progress runs from 0 at ``start_ms``
    (default: the first request) to 1 after ``run_s`` seconds. ``seed``: the audience's own random stream
    (default: derived from ``g.seed``). ``request_prefix``: request ids are ``<prefix><n>`` (default
    ``aud-<seed>-<start time in base 36>-``, unique per run). Thread-safe.
    """

    def __init__(self, g: GeneratorConfig, *, time_scale: float = 1.0, progress: float = 1.0,
                 run_s: float | None = None, start_ms: int | None = None, seed: int | None = None,
                 request_prefix: str | None = None):
        validate(g)
        if not time_scale > 0:
            raise ValueError(f"Audience: time_scale must be > 0, got {time_scale}")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"Audience: progress must be in [0, 1], got {progress}")
        if run_s is not None and not run_s > 0:
            raise ValueError(f"Audience: run_s must be > 0, got {run_s}")
        self.g, self.time_scale, self.fixed_progress = g, float(time_scale), float(progress)
        self.run_ms = None if run_s is None else max(int(run_s * 1000), 1)
        self.start_ms = start_ms
        self.w = _world(g, np.random.default_rng(g.seed))  # simulate()'s first draws: the same world
        self.n_surge = len(self.w.ad_w) - g.n_ads
        self.rng = np.random.default_rng([g.seed if seed is None else seed, _STREAM])
        camp = self.w.ad_campaign
        self._ads = [Ad(ad_id=i + 1, campaign_id=int(c) + 1, advertiser_id=int(self.w.campaign_advertiser[c]) + 1)
                     for i, c in enumerate(camp.tolist())]
        self.prefix = request_prefix if request_prefix is not None else \
            f"aud-{g.seed}-{np.base_repr(int(time.time() * 1000), 36).lower()}-"
        if not schema.tokens_ok(self.prefix) or len(self.prefix) > 40:
            raise ValueError(f"Audience: request_prefix {self.prefix!r}: at most 40 letters, digits and "
                             f"{schema.TOKEN_PUNCT}")
        self._n = 0
        self._lock = threading.Lock()

    # -- time -------------------------------------------------------------------------------------------

    def progress_at(self, ts: int) -> float:
        """The world's progress (0..1 of the generator's run) at event time ``ts`` (ms)."""
        if self.run_ms is None:
            return self.fixed_progress
        if self.start_ms is None:
            self.start_ms = int(ts)
        return float(np.clip((ts - self.start_ms) / self.run_ms, 0.0, 1.0))

    # -- the catalogue ----------------------------------------------------------------------------------

    def _weights(self, ts: int) -> np.ndarray:
        w, sc = self.w, self.g.scenario
        return scenarios.ad_weights(self.progress_at(ts), w.ad_w, w.ad_birth, w.ad_death, self.n_surge,
                                    sc.surge_share)

    def catalogue(self, ts: int | None = None) -> list[Ad]:
        """The ads alive at ``ts`` (default: now), with their campaign and advertiser."""
        p = self._weights(_now_ms() if ts is None else ts)
        return [self._ads[i] for i in np.flatnonzero(p > 0).tolist()]

    def ad(self, ad_id: int) -> Ad:
        if not 1 <= ad_id <= len(self._ads):
            raise ValueError(f"Audience: unknown ad id {ad_id} (the world has ads 1..{len(self._ads)})")
        return self._ads[ad_id - 1]

    def knows(self, ad_id: int) -> bool:
        """Whether ``ad_id`` is an ad of this world (alive or not)."""
        return 1 <= ad_id <= len(self._ads)

    def candidates(self, request: Request, n: int) -> list[Ad]:
        """``n`` distinct ads alive at the request's time, drawn by popularity as the generator draws an
        impression's ad (fewer when fewer are alive)."""
        p = self._weights(request.ts)
        n = min(int(n), int((p > 0).sum()))
        with self._lock:
            idx = self.rng.choice(len(p), n, replace=False, p=p / p.sum())
        return [self._ads[i] for i in idx.tolist()]

    # -- requests ---------------------------------------------------------------------------------------

    def requests(self, n: int, ts: int | Sequence[int] | None = None) -> list[Request]:
        """``n`` requests at ``ts`` (one time for all, one per request, or now), drawn as the generator draws
        impressions: the user by activity, the domain by share, the user's device, country and history,
        dense and categorical context."""
        g, w = self.g, self.w
        ts_arr = np.broadcast_to(np.asarray(_now_ms() if ts is None else ts, dtype=np.int64), (n,))
        with self._lock:
            dom = _draw_domains(g, n, self.rng)
            user = _draw_users(w, n, self.rng)
            dense = _draw_dense(g, n, self.rng)
            cat = _draw_cat(g, w, n, self.rng)
            first, self._n = self._n, self._n + n
        hist = (w.user_hist[user] + 1).tolist()
        return [Request(request_id=f"{self.prefix}{first + i}", ts=int(ts_arr[i]), user_id=int(u) + 1,
                        domain=g.domains[d], device=schema.DEVICES[int(w.user_device[u])],
                        country=_COUNTRIES[int(w.user_country[u])], dense=dense[i].tolist(), cat=cat[i].tolist(),
                        history=hist[i])
                for i, (u, d) in enumerate(zip(user.tolist(), dom.tolist()))]

    # -- the oracle and the users' reactions ------------------------------------------------------------

    def truth(self, request: Request, ad_ids: Sequence[int], positions: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray]:
        """The oracle: true (p_click, post-click p_conversion) of each ad shown at its position in
        ``request``, at the request's time (drift and season included)."""
        g = self.g
        ads = np.asarray(ad_ids, dtype=np.int64) - 1
        if len(ads) and (ads.min() < 0 or ads.max() >= len(self._ads)):
            bad = [a for a in ad_ids if not 1 <= a <= len(self._ads)]
            raise ValueError(f"Audience.truth: unknown ad ids {bad[:5]} (the world has ads 1..{len(self._ads)})")
        n = len(ads)
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (n,):
            raise ValueError(f"Audience.truth: {n} ads but {pos.shape} positions")
        try:
            dom = np.full(n, g.domains.index(request.domain))
        except ValueError:
            raise ValueError(f"Audience.truth: domain {request.domain!r} is not one of {g.domains}") from None
        user = np.full(n, request.user_id - 1)
        dense = np.broadcast_to(np.asarray(request.dense, dtype=np.float64).reshape(1, g.dense_dim), (n, g.dense_dim))
        cat = np.broadcast_to(np.asarray(request.cat, dtype=np.int64).reshape(1, g.cat_slots), (n, g.cat_slots))
        ts = np.full(n, request.ts, dtype=np.int64)
        progress = np.full(n, self.progress_at(request.ts))
        p = _truth(g, self.w, dom, user, ads, pos, dense, cat, ts, progress)
        return p["p_click"], p["p_cvr"]

    def respond(self, request: Request, served: Sequence[tuple[int, int]]) -> list[Outcome]:
        """The user's reaction to ``served`` ads ``(ad_id, position)``: clicks and conversions drawn with the
        true probabilities, delays from the generator's delay models divided by ``time_scale``."""
        if not served:
            return []
        ad_ids = [a for a, _ in served]
        positions = [p for _, p in served]
        pc, pv = self.truth(request, ad_ids, positions)
        with self._lock:
            o = _outcomes(self.g, pc, pv, self.rng)
        s, ts = self.time_scale, request.ts
        click_ts = ts + np.maximum(np.round(o["click_ms"] / s), 1).astype(np.int64)
        conv_ts = np.maximum(ts + np.round(o["conv_ms"] / s).astype(np.int64), click_ts)
        out = []
        for i, (a, pos) in enumerate(served):
            clicked, converted = bool(o["click"][i]), bool(o["conv"][i])
            out.append(Outcome(impression_id=f"{request.request_id}.{pos}", user_id=request.user_id, ad_id=int(a),
                               position=int(pos), p_click=float(pc[i]), p_conversion=float(pv[i]),
                               click_ts=int(click_ts[i]) if clicked else None,
                               conversion_ts=int(conv_ts[i]) if converted else None,
                               value=float(o["value"][i]) if converted else 0.0))
        return out

    def max_feedback_delay_ms(self) -> tuple[int, int]:
        """(click, conversion) delay caps after compression, ms from the impression."""
        g = self.g
        return (int(np.ceil(g.max_click_delay_s * 1000 / self.time_scale)),
                int(np.ceil(g.max_conversion_delay_s * 1000 / self.time_scale)))


def _now_ms() -> int:
    return int(time.time() * 1000)
