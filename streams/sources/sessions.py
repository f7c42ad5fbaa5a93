"""The sessions world of the generator: long-term interests, sessions and intents that evolve within them.

A world whose sequences carry what a single id embedding cannot (issue 17, LLaTTE). Off by default
(``SessionsConfig.n_interests = 0``): the generator's default world is unchanged. On (``streamrec generate
--world sessions``, or ``GeneratorConfig(sessions=SESSIONS)``):

* **interests**: each user ``u`` has ``K = n_interests`` latent vectors ``I[u, k]`` (drawn like the default
  world's taste vectors) and mixture weights ``pi[u] ~ Dirichlet(interest_concentration)``; the user's
  *average taste* ``sum_k pi[u, k] I[u, k]`` is the world's ``user_lat`` (what the stale oracle, the initial
  ``history`` and a ranker's user-id embedding can know);
* **sessions**: users arrive in sessions. Session requests come as a Poisson process (``impressions_per_s /
  session_len`` per second), each for a user drawn by the usual Zipf activity; a session holds
  ``Geometric(1 / session_len)`` impressions ``Exp(event_gap_s)`` apart. A user is in at most one session at a
  time and sessions of a user are at least ``session_gap_s`` apart: a request drawn for a user still in a
  session or within the gap goes to another user drawn the same way (up to :data:`TRIES` draws, then it is
  dropped). The heaviest users' activity is capped by that (about one session per ``session_gap_s``), the
  others take their share, and the realised rate stays near ``impressions_per_s`` unless most users are busy;
* **intent**: a session picks one interest ``k ~ pi[u]``; its intent at the session's j-th impression is::

      intent_j = (I[u, k] + session_intent_scale * std * e_j) / sqrt(1 + session_intent_scale^2)
      e_0 ~ N(0, 1),  e_j = (1 - intent_drift) e_{j-1} + sqrt(1 - (1 - intent_drift)^2) * N(0, 1)

  (an AR(1) deviation from the interest: it evolves within the session, a fresh one each session); the click
  logit's affinity term is ``<intent_j, A[a]>`` in place of ``<U[u], A[a]>`` (same variance);
* **history**: ``Impression.history`` (what the ranker reads) is the user's latest ``history_len`` clicked ads
  in time order, a click counting from its click time (strictly before the impression), starting from the
  ads the user was drawn to before the run (the default world's history, by the average taste).

Why a sequence helps: the clicks of the current session reveal its interest and the intent's current
deviation; the id (or the average taste) knows only the mixture. :func:`oracles` gives the oracle with the
true intent and the oracle with the user's average taste in its place (measured in docs/generator.md).

>>> from streams.sources.generate import GeneratorConfig, simulate
>>> sim = simulate(GeneratorConfig(n_impressions=2000, seed=1, n_users=200, n_ads=100, sessions=SESSIONS))
>>> o = oracles(sim)
>>> bool(o["auc_intent"] > o["auc_average_taste"])
True
"""

from __future__ import annotations

from collections import deque

import msgspec
import numpy as np

SEED_INTERESTS, SEED_SCHEDULE = 0x5E55, 0x5E56  # the world's own generators: the default draws stay the same
TRIES = 8  # users drawn per session request: the first one free takes it (none free: the request is dropped)


class SessionsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The sessions world (module docstring); ``n_interests = 0``: off."""

    n_interests: int = 0  # K long-term interests per user (0: the default world)
    interest_concentration: float = 1.0  # Dirichlet alpha of each user's interest weights
    session_intent_scale: float = 0.3  # std of the intent's deviation from its interest (x the interests' std)
    intent_drift: float = 0.3  # share of the deviation renewed per impression within a session (0: fixed)
    session_gap_s: float = 1800.0  # least event time between two sessions of a user
    session_len: float = 30.0  # mean impressions per session (geometric)
    event_gap_s: float = 20.0  # mean event time between impressions of a session

    @property
    def on(self) -> bool:
        return self.n_interests > 0

    def __post_init__(self) -> None:
        checks = [("n_interests", 0 <= self.n_interests <= 64), ("interest_concentration", self.interest_concentration > 0),
                  ("session_intent_scale", self.session_intent_scale >= 0), ("intent_drift", 0 <= self.intent_drift <= 1),
                  ("session_gap_s", self.session_gap_s >= 0), ("session_len", self.session_len >= 1),
                  ("event_gap_s", self.event_gap_s > 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SessionsConfig.{name}: bad value {getattr(self, name)!r}")


# the preset of `streamrec generate --world sessions` and `bench llatte`
SESSIONS = SessionsConfig(n_interests=4)
WORLDS: dict[str, SessionsConfig] = {"default": SessionsConfig(), "sessions": SESSIONS}


class Interests(msgspec.Struct, frozen=True):
    vectors: np.ndarray  # (U, K, k)
    weights: np.ndarray  # (U, K)

    def average(self) -> np.ndarray:
        """Each user's average taste (U, k): the mixture's mean."""
        return np.einsum("uk,ukd->ud", self.weights, self.vectors)


def interests(cfg: SessionsConfig, n_users: int, latent_dim: int, lat_std: float, seed: int) -> Interests:
    rng = np.random.default_rng([seed, SEED_INTERESTS])
    return Interests(vectors=rng.normal(0, lat_std, (n_users, cfg.n_interests, latent_dim)),
                     weights=rng.dirichlet(np.full(cfg.n_interests, cfg.interest_concentration), n_users))


class Schedule(msgspec.Struct, frozen=True):
    """n impressions in event-time order: ``user`` index, ``t_s`` seconds from the start, ``session`` id
    (increasing with the session's start), ``step`` (0-based position in the session), ``intent`` (n, k)."""

    user: np.ndarray
    t_s: np.ndarray
    session: np.ndarray
    step: np.ndarray
    intent: np.ndarray


def schedule(cfg: SessionsConfig, n: int, rate: float, user_w: np.ndarray, it: Interests, lat_std: float,
             seed: int) -> Schedule:
    """The first ``n`` impressions of the session process (module docstring). Deterministic for ``seed``."""
    rng = np.random.default_rng([seed, SEED_SCHEDULE])
    m, gap = cfg.session_len, cfg.session_gap_s
    busy = np.full(len(user_w), -np.inf)  # per user: when the next session may start
    parts: list[tuple[np.ndarray, ...]] = []
    t_req, n_sess, have = 0.0, 0, 0
    block = max(16, int(np.ceil(1.2 * n / m)))
    while have < n:
        req = t_req + np.cumsum(rng.exponential(m / rate, block))
        cands = rng.choice(len(user_w), (block, TRIES), p=user_w)
        users = cands[:, 0].copy()
        lens = rng.geometric(1.0 / m, block)
        within = rng.exponential(cfg.event_gap_s, lens.sum())
        first = np.concatenate([[0], np.cumsum(lens)[:-1]])
        within[first] = 0.0
        offs = np.cumsum(within)
        offs -= np.repeat(offs[first], lens)  # seconds from the session's start
        dur = offs[first + lens - 1]
        keep = np.zeros(block, bool)
        for j, (row, r) in enumerate(zip(cands.tolist(), req.tolist())):  # sequential: a user's sessions never overlap
            for u in row:  # the first free candidate takes the session
                if r >= busy[u]:
                    keep[j], users[j] = True, u
                    busy[u] = r + dur[j] + gap
                    break
        ev = np.repeat(keep, lens)
        sid = np.repeat(n_sess + np.arange(block), lens)[ev]
        parts.append((np.repeat(users, lens)[ev], np.repeat(req, lens)[ev] + offs[ev], sid,
                      (np.arange(lens.sum()) - np.repeat(first, lens))[ev]))
        t_req, n_sess = float(req[-1]), n_sess + block
        have = sum(int((p[1] <= t_req).sum()) for p in parts)  # later sessions start after t_req
    user, t_s, sess, step = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.argsort(t_s, kind="stable")[:n]
    user, t_s, sess, step = user[order], t_s[order], sess[order], step[order]
    return Schedule(user=user, t_s=t_s, session=sess, step=step,
                    intent=_intents(cfg, user, sess, step, it, lat_std, rng))


def _intents(cfg: SessionsConfig, user: np.ndarray, sess: np.ndarray, step: np.ndarray, it: Interests,
             lat_std: float, rng: np.random.Generator) -> np.ndarray:
    """The intent of every impression (n, k): its session's interest plus the AR(1) deviation at its step."""
    n, k = len(user), it.vectors.shape[2]
    if not n:
        return np.zeros((0, k))
    ids, inv = np.unique(sess, return_inverse=True)
    s_user = np.zeros(len(ids), np.int64)
    s_user[inv] = user
    cum = np.cumsum(it.weights[s_user], axis=1)  # one interest per session, by the user's weights
    pick = np.minimum((rng.random((len(ids), 1)) * cum[:, -1:] > cum).sum(axis=1), cfg.n_interests - 1)
    rho = 1.0 - cfg.intent_drift
    L = int(step.max()) + 1
    dev = np.zeros((len(ids), L, k))
    dev[:, 0] = rng.normal(0, 1, (len(ids), k))
    for j in range(1, L):
        dev[:, j] = rho * dev[:, j - 1] + np.sqrt(1 - rho ** 2) * rng.normal(0, 1, (len(ids), k))
    s = cfg.session_intent_scale
    return (it.vectors[user, pick[inv]] + s * lat_std * dev[inv, step]) / np.sqrt(1 + s * s)


def click_histories(user: np.ndarray, ts: np.ndarray, ad: np.ndarray, click: np.ndarray, click_ms: np.ndarray,
                    initial: np.ndarray, length: int) -> list[list[int]]:
    """Per impression, the ad indices of the user's latest ``length`` clicks strictly before its ``ts`` (in
    click-time order), after the user's ``initial`` (U, L) ads; impressions in ``ts`` order.

    >>> click_histories(np.array([0, 0, 0]), np.array([0, 10, 20]), np.array([5, 6, 7]), np.array([True, True, False]),
    ...                 np.array([5, 3, -1]), np.array([[1, 2]]), 2)
    [[1, 2], [2, 5], [5, 6]]
    """
    n = len(user)
    ci = np.flatnonzero(click)
    at = np.concatenate([ts, ts[ci] + click_ms[ci]])
    kind = np.concatenate([np.zeros(n, np.int8), np.ones(len(ci), np.int8)])  # at equal times: the impression first
    idx = np.concatenate([np.arange(n), ci])
    order = np.lexsort((idx, kind, at))
    recent: dict[int, deque] = {}
    out: list[list[int]] = [[] for _ in range(n)]
    users, ads = user.tolist(), ad.tolist()
    for k_, i in zip(kind[order].tolist(), idx[order].tolist()):
        u = users[i]
        q = recent.get(u)
        if q is None:
            q = recent[u] = deque(initial[u].tolist()[-length:] if length else [], maxlen=length)
        if k_ == 0:
            out[i] = list(q)
        elif length:
            q.append(ads[i])
    return out


def oracles(sim, mask: np.ndarray | None = None) -> dict[str, float]:
    """Click AUC / NE of the oracle (the true intent) and of the same truth with each user's average taste in the
    intent's place (what a perfect user-id model could score): ``auc_intent``, ``auc_average_taste``,
    ``ne_intent``, ``ne_average_taste``; over the impressions of ``mask`` (n,) bool (default: all)."""
    from streams.metrics import normalized_entropy, roc_auc
    from streams.sources.generate import session_tastes

    t = sim.truth
    intent, avg, ad = session_tastes(sim)
    p = t.column("p_click").to_numpy()
    logit = np.log(p / (1 - p)) - np.einsum("nk,nk->n", intent, ad) + np.einsum("nk,nk->n", avg, ad)
    p_avg = 1 / (1 + np.exp(-logit))
    y = t.column("click").to_numpy()
    if mask is not None:
        p, p_avg, y = p[mask], p_avg[mask], y[mask]
    return {"auc_intent": roc_auc(y, p), "auc_average_taste": roc_auc(y, p_avg),
            "ne_intent": normalized_entropy(y, p), "ne_average_taste": normalized_entropy(y, p_avg)}
