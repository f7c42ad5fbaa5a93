"""SOLARIS: the FM's (user, ad) pair predictions, computed ahead of the requests and cached for the VMs.

A VM cannot run the FM on its path (the FM is too costly to serve). SOLARIS has a precompute service guess
which pairs will be requested soon, score them with the FM asynchronously, and keep the results in a TTL cache
(:class:`embedding_store.pair_cache.PairCache`) that the VMs read as an input feature: a request whose pair is
in the cache gets the FM's prediction for free, a miss gets zeros (``present`` 0, counted).

**The pair predictor** (:class:`PairPredictor`). For each request (impression) seen, of user ``u``, the
candidates in order:

1. ``u``'s recent ads: the ads of ``u``'s latest ``solaris.recent_ads`` distinct impressions (newest first):
   real ad requests repeat within a targeting set that changes slowly;
2. the ads of ``u``'s nearest users (``solaris.neighbours``) in a user index (an
   :class:`embedding_store.ann.AnnIndex` of user vectors: the FM's LoopFM user vectors in the benchmark, the
   trainer's user-vector snapshot in the service when one exists), their recent ads, nearest first;
3. the most shown ads of ``u``'s latest domain (``solaris.domain_candidates``, over the last
   :data:`DOMAIN_WINDOW` requests).

A candidate already cached and younger than :data:`REFRESH_FRACTION` of the TTL is skipped; older ones are
computed again by the FM as it is now (the FM learns on: a pair computed by a much older FM is a worse
feature), and so are the missing ones, at most ``solaris.budget`` pairs per request seen: a credit grows by
``budget`` per request and each pair costs 1 (a request may use at most ``2 * budget`` of it, the credit is
capped at ``budget`` x :data:`CREDIT_REQUESTS` requests), so over any run ``pairs computed <= budget *
requests``.

**What the FM computes for a pair** (:func:`pair_impression`): the FM's click and click-and-conversion
probabilities of an impression made of the *user's side of their latest request* (user id, device, country,
history) and the *ad's ids* (ad, campaign, advertiser, from the newest request that showed the ad), in one
reference domain (:data:`REFERENCE_DOMAIN`), with the request-side context neutral: position 0, no cat features,
dense zeros. The request's own context (its domain, slot, page features) is unknown ahead of time (the cache is
keyed by the pair, and a user's next request may come from any surface); the VM adds it from its own features
and its own domain biases (a prediction in the user's latest domain carried that domain's base rate into the
requests of other domains: noise of +-0.5 logit in the benchmark's world). "On demand"
(benchmarks/transfer.py) is the same function at request time.

**What a VM reads** (:class:`SolarisView`): per impression ``[logit p_click, logit p_cvr, present]`` (B, 3)
(``p_cvr = p_conversion / p_click``, both clipped to ``sigmoid(+-9)``, like the teacher's logits), zeros where
the pair is missing or older than ``trainer.solaris_max_age_s``. The VM's model takes it as its ``solaris_in``
input block and as a linear term beside the shortcuts (trainer/model.py).

**The live path**: ``streamrec precompute`` (:func:`run_service`) consumes the impressions topic (the requests),
scores pairs with the FM's newest published version (``trainer.publish_dir`` of the FM: a
:class:`serving.models.ModelSlot` polled like serving does) and publishes
:class:`~streams.schema.SolarisPairs` to ``topics.solaris_pairs``; a VM with ``trainer.solaris`` consumes them
into its cache (:class:`Solaris`, :class:`SolarisConsumer`: every partition from the beginning, records older
than the TTL skipped; bad records to dead letters with step :data:`STEP`). The service reports ServiceStats
component ``solaris``: pairs computed, requests seen, budget used (computed / requests), candidates skipped as
fresh, the FM version; each VM reports its cache's hit rate and age of hits with its trainer stats.
Serving refuses a model trained with ``trainer.solaris`` (:func:`trainer.features.impression_batch`), like a
LoopFM one: the ranking service does not read the cache yet.
"""

from __future__ import annotations

import heapq
import logging
import sys
import time
from collections import Counter, OrderedDict, deque
from typing import Sequence

import numpy as np
import torch

from config import Config, SolarisConfig
from embedding_store.pair_cache import PairCache
from streams import schema
from streams.bus.feed import TopicFeed

log = logging.getLogger("streamrec.solaris")

STEP = "solaris.cache"  # DeadLetter.step of refused SolarisPairs records
LOGIT_CLIP = 9.0  # as trainer.model.TEACHER_LOGIT_CLIP
DOMAIN_WINDOW = 10_000  # requests behind the domains' most shown ads
CREDIT_REQUESTS = 256  # the budget's credit is capped at budget x this many requests
MAX_USERS = 1_000_000  # users whose recent ads the predictor remembers (least recently seen leave first)
MAX_PAIRS_PER_MESSAGE = 2048  # ~100 KB of JSON per SolarisPairs message
REFERENCE_DOMAIN = schema.DOMAINS[0]  # every pair is scored as if in this domain (module docstring)
REFRESH_FRACTION = 0.1  # a cached pair younger than this fraction of the TTL is not computed again


def pair_logits(p_click: np.ndarray, p_conversion: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(B, 3) float32 ``[logit p_click, logit p_cvr, present]``; zeros where not ``present``.

    >>> pair_logits(np.array([0.5, 0.2]), np.array([0.25, 0.1]), np.array([True, False])).tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    """
    lo = 1.0 / (1.0 + np.exp(LOGIT_CLIP))
    pc = np.clip(np.asarray(p_click, np.float64), lo, 1 - lo)
    pv = np.clip(np.asarray(p_conversion, np.float64) / pc, lo, 1 - lo)
    out = np.stack([np.log(pc / (1 - pc)), np.log(pv / (1 - pv)), np.ones_like(pc)], axis=1)
    out[~np.asarray(present, bool)] = 0.0
    return out.astype(np.float32)


class SolarisView:
    """A VM's SOLARIS features from a :class:`PairCache`: ``features_of(imps) -> (B, 3)``; ``stats()``."""

    def __init__(self, cache: PairCache):
        self.cache = cache

    def features_of(self, imps: Sequence[schema.Impression], now_ms: int | None = None) -> np.ndarray:
        pc, pv, hit, _ = self.cache.get([i.user_id for i in imps], [i.ad_id for i in imps], now_ms)
        return pair_logits(pc, pv, hit)

    def stats(self) -> dict[str, float]:
        return self.cache.stats()


def pair_impression(user_imp: schema.Impression, ad: schema.Impression) -> schema.Impression:
    """The impression the FM scores for the pair (user of ``user_imp``, ad of ``ad``): the user's side of
    ``user_imp`` (id, device, country, history) and the ad's ids, in :data:`REFERENCE_DOMAIN`, request context
    neutral (module docstring)."""
    return schema.Impression(event_id="solaris", ts=user_imp.ts, user_id=user_imp.user_id, ad_id=ad.ad_id,
                             campaign_id=ad.campaign_id, advertiser_id=ad.advertiser_id, domain=REFERENCE_DOMAIN,
                             position=0, device=user_imp.device, country=user_imp.country,
                             history=user_imp.history)


@torch.no_grad()
def score_pairs(fm, imps: Sequence[schema.Impression]) -> tuple[np.ndarray, np.ndarray]:
    """(p_click, p_conversion) of ``imps`` by ``fm``: anything with ``model``, ``tcfg``, ``device`` and
    ``user_view`` (a :class:`trainer.model.Learner`, a published version); changes nothing."""
    from trainer.features import impression_batch

    if not imps:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    model = fm.model
    was_training = model.training
    model.eval()
    try:
        pc, pv = model(impression_batch(imps, fm.tcfg, fm.device, getattr(fm, "user_view", None)))
    finally:
        model.train(was_training)
    return pc.float().cpu().numpy(), pv.float().cpu().numpy()


class PairPredictor:
    """Which (user, ad) pairs to compute, within the budget (module docstring). ``observe(imps)`` then
    ``plan(imps, cache, now_ms)`` per block of requests; ``index``: an optional user index (AnnIndex)."""

    def __init__(self, scfg: SolarisConfig, index=None):
        self.scfg, self.index = scfg, index
        self.recent: OrderedDict[int, deque[int]] = OrderedDict()  # user -> recent distinct ads, newest last
        self.latest: OrderedDict[int, schema.Impression] = OrderedDict()  # user -> their latest request
        self.ads: OrderedDict[int, schema.Impression] = OrderedDict()  # ad -> the newest request showing it
        self._window: deque[tuple[str, int]] = deque()
        self._shown: dict[str, Counter] = {}
        self._top: dict[str, list[int]] = {}
        self._since_top = 0
        self.credit = 0.0
        self.counters = {"requests": 0, "pairs_planned": 0, "skipped_fresh": 0, "from_recent": 0,
                         "from_neighbours": 0, "from_domain": 0}

    def observe(self, imps: Sequence[schema.Impression]) -> None:
        """Learn from requests: each user's recent ads and latest request, the ads' ids, the domains' counts."""
        k = max(self.scfg.recent_ads, 1)
        for i in imps:
            r = self.recent.get(i.user_id)
            if r is None:
                r = self.recent[i.user_id] = deque(maxlen=k)
                if len(self.recent) > MAX_USERS:
                    old, _ = self.recent.popitem(last=False)
                    self.latest.pop(old, None)
            else:
                self.recent.move_to_end(i.user_id)
                if i.ad_id in r:
                    r.remove(i.ad_id)
            r.append(i.ad_id)
            self.latest[i.user_id] = i
            self.latest.move_to_end(i.user_id)
            self.ads[i.ad_id] = i
            self.ads.move_to_end(i.ad_id)
            if len(self.ads) > MAX_USERS:
                self.ads.popitem(last=False)
            self._window.append((i.domain, i.ad_id))
            self._shown.setdefault(i.domain, Counter())[i.ad_id] += 1
            if len(self._window) > DOMAIN_WINDOW:
                d, a = self._window.popleft()
                c = self._shown[d]
                c[a] -= 1
                if c[a] <= 0:
                    del c[a]
        self._since_top += len(imps)
        if self._since_top >= 256 or not self._top:
            n = self.scfg.domain_candidates
            self._top = {d: [a for a, _ in heapq.nlargest(n, c.items(), key=lambda x: x[1])]
                         for d, c in self._shown.items()}
            self._since_top = 0

    def _neighbours(self, users: list[int]) -> dict[int, list[int]]:
        """user -> nearest users (nearest first, itself excluded), for those with a vector in the index."""
        k = self.scfg.neighbours
        if self.index is None or k <= 0 or not len(self.index):
            return {}
        have = [u for u in dict.fromkeys(users) if u in self.index]
        if not have:
            return {}
        _, ids = self.index.search(self.index.get(np.array(have, np.int64)), k + 1)
        return {u: [int(x) for x in row if x >= 0 and x != u][:k] for u, row in zip(have, ids.tolist())}

    def candidates(self, user: int, neighbours: Sequence[int] = ()) -> list[tuple[int, str]]:
        """(ad, source) in order of preference for ``user``; source: recent | neighbours | domain."""
        out: list[tuple[int, str]] = [(a, "recent") for a in reversed(self.recent.get(user, ()))]
        for v in neighbours:
            out.extend((a, "neighbours") for a in reversed(self.recent.get(v, ())))
        last = self.latest.get(user)
        if last is not None:
            out.extend((a, "domain") for a in self._top.get(last.domain, ()))
        return out

    def plan(self, imps: Sequence[schema.Impression], cache: PairCache | None, now_ms: int
             ) -> list[schema.Impression]:
        """The pairs to compute after the requests ``imps`` (already :meth:`observe`\\d), as the impressions
        the FM scores (:func:`pair_impression`), at most ``budget`` per request over time."""
        b = self.scfg.budget
        self.credit = min(self.credit + b * len(imps), b * CREDIT_REQUESTS)
        self.counters["requests"] += len(imps)
        users = [i.user_id for i in imps]
        near = self._neighbours(users)
        out: list[schema.Impression] = []
        done: set[tuple[int, int]] = set()
        fresh_ms = now_ms - (int(cache.ttl_ms * REFRESH_FRACTION) if cache is not None else 0)
        for u in users:
            if self.credit < 1:
                break
            seen: set[int] = set()
            cands = []
            for a, s in self.candidates(u, near.get(u, ())):  # each ad once, from its first source
                if a not in seen and (u, a) not in done and a in self.ads:
                    seen.add(a)
                    cands.append((a, s))
            if cache is not None and cands:
                _, _, hit, age = cache.get([u] * len(cands), [a for a, _ in cands], now_ms, count=False)
                young = hit & (now_ms - 1000 * age >= fresh_ms)
                self.counters["skipped_fresh"] += int(young.sum())
                cands = [c for c, y in zip(cands, young) if not y]
            take = int(min(self.credit, 2 * b, len(cands)))
            user_imp = self.latest[u]
            for a, s in cands[:take]:
                out.append(pair_impression(user_imp, self.ads[a]))
                done.add((u, a))
                self.counters["from_" + s] += 1
            self.credit -= take
        self.counters["pairs_planned"] += len(out)
        return out

    def stats(self) -> dict[str, float]:
        out = {f"solaris_{k}": float(v) for k, v in self.counters.items()}
        if self.counters["requests"]:
            out["solaris_budget_used"] = self.counters["pairs_planned"] / self.counters["requests"]
        return out


def publish_records(version: int, ts_ms: int, imps: Sequence[schema.Impression], p_click: np.ndarray,
                    p_conversion: np.ndarray, max_pairs: int = MAX_PAIRS_PER_MESSAGE) -> list[schema.SolarisPairs]:
    """The :class:`~streams.schema.SolarisPairs` messages for scored pairs, at most ``max_pairs`` each."""
    u = [i.user_id for i in imps]
    a = [i.ad_id for i in imps]
    pc, pv = np.asarray(p_click, np.float64).tolist(), np.asarray(p_conversion, np.float64).tolist()
    return [schema.SolarisPairs(model_version=version, ts=ts_ms, user_ids=u[s:s + max_pairs],
                                ad_ids=a[s:s + max_pairs], p_click=pc[s:s + max_pairs],
                                p_conversion=pv[s:s + max_pairs])
            for s in range(0, len(imps), max_pairs)]


# ---- the VM's side: the cache fed from topics.solaris_pairs -------------------------------------------------
class SolarisConsumer(TopicFeed):
    """A daemon thread feeding ``cache`` from ``cfg.topics.solaris_pairs`` (every partition from the beginning,
    no consumer group: records older than the TTL are skipped as they arrive), refused records to
    ``cfg.topics.dead_letters`` (step :data:`STEP`). ``start()``, ``stop()``; ``error``: what stopped it."""

    def __init__(self, cfg: Config, cache: PairCache, poll_s: float = 0.2):
        super().__init__(cfg, cfg.topics.solaris_pairs, cache.apply_raw, group="streamrec-solaris", step=STEP,
                         name="solaris", poll_s=poll_s)
        self.cache = cache


class Solaris:
    """What a :class:`trainer.loop.Trainer` with ``trainer.solaris`` runs (like :class:`trainer.loopfm.LoopFM`):
    a :class:`PairCache` (TTL ``trainer.solaris_max_age_s``, bound ``solaris.max_entries``) fed by a
    :class:`SolarisConsumer`, read through ``learner.solaris_view``. ``for_trainer(cfg, learner)`` is None when
    off; ``start()``, ``close()``, ``stats()``."""

    def __init__(self, cfg: Config, learner):
        self.cfg = cfg
        self.cache = PairCache(cfg.trainer.solaris_max_age_s, cfg.solaris.max_entries)
        learner.solaris_view = SolarisView(self.cache)
        self.consumer: SolarisConsumer | None = None

    @classmethod
    def for_trainer(cls, cfg: Config, learner) -> "Solaris | None":
        tc = cfg.trainer
        if not tc.solaris:
            return None
        if tc.role == "fm":
            log.warning("trainer.solaris is on for an FM: it reads its own predictions from the pair cache")
        if tc.publish_dir:
            log.warning("trainer.solaris is on: the versions this trainer publishes to %s need the pair cache at "
                        "serving time, which serving does not read; `streamrec serve` refuses them", tc.publish_dir)
        return cls(cfg, learner)

    def start(self) -> None:
        if self.consumer is None:
            self.consumer = SolarisConsumer(self.cfg, self.cache).start()

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def stats(self) -> dict[str, float]:
        return self.cache.stats()


# ---- the precompute service ---------------------------------------------------------------------------------
def fm_models_dir(cfg: Config) -> str:
    """Where the FM publishes its versions by default: ``<models_dir>/fm`` (the FM arm of ``up --with-fm``)."""
    from pathlib import Path

    return str(Path(cfg.models_dir(), "fm"))


class PrecomputeService:
    """``streamrec precompute``: requests (impressions on ``topics.impressions``) in, the FM's predictions of
    the pairs predicted to come next out to ``topics.solaris_pairs`` (module docstring).

    The service keeps a mirror of what it published (a :class:`PairCache` with the same TTL), so it skips pairs
    still fresh and reports, for each request it sees, whether its pair had been published before it: the hit
    rate and the age of hits a VM reading the topic would see (VMs report their own too). The FM: the newest
    version under ``fm_dir`` (trainer/publish.py), polled every ``poll_s``; until one exists requests are
    observed and nothing is computed (counted: ``solaris_requests_without_fm``). Offsets: consumer group
    ``streamrec-precompute``, committed after each block; a restarted service goes on from there (a SIGKILL
    repeats at most the uncommitted block: its pairs are computed again, which a cache absorbs)."""

    def __init__(self, cfg: Config, fm_dir: str, poll_s: float = 5.0, index_path: str | None = None):
        from config import ArmConfig
        from serving.models import ModelSlot, open_store

        self.cfg, self.scfg, self.fm_dir, self.poll_s = cfg, cfg.solaris, fm_dir, poll_s
        self.slot = ModelSlot(ArmConfig(name="fm"), open_store(fm_dir))
        self.cache = PairCache(self.scfg.ttl_s, self.scfg.max_entries)
        self.index_path = index_path
        self.pred = PairPredictor(self.scfg, self._load_index())
        self.counters = {"solaris_requests_without_fm": 0, "solaris_pairs_computed": 0, "solaris_messages": 0,
                         "solaris_dead_letters": 0, "solaris_score_s": 0.0}
        self._stop = False
        self._polled = 0.0

    def _load_index(self):
        """The user-vector index snapshot (the trainer writes it at each checkpoint), or None."""
        from pathlib import Path

        if not self.index_path or not Path(self.index_path).exists():
            return None
        try:
            from embedding_store.ann import load_index

            return load_index(self.index_path)
        except Exception:  # noqa: BLE001 - neighbours are optional: go on without
            log.exception("could not load the user index %s: no neighbour candidates", self.index_path)
            return None

    def fm(self):
        now = time.monotonic()
        if self.slot.current is None or now - self._polled >= self.poll_s:
            self._polled = now
            self.slot.poll()
        return self.slot.current

    def stop(self, *_args) -> None:
        self._stop = True

    def handle(self, imps: list[schema.Impression], now_ms: int | None = None) -> list[schema.SolarisPairs]:
        """One block of requests: count hits against what was published, observe, plan, score; the records to
        publish (also written to the mirror)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if not imps:
            return []
        self.cache.get([i.user_id for i in imps], [i.ad_id for i in imps], now_ms)  # counts hits, ages
        self.pred.observe(imps)
        fm = self.fm()
        if fm is None:
            self.counters["solaris_requests_without_fm"] += len(imps)
            self.pred.counters["requests"] += len(imps)
            return []
        todo = self.pred.plan(imps, self.cache, now_ms)
        if not todo:
            return []
        t0 = time.perf_counter()
        pc, pv = score_pairs(fm, todo)
        self.counters["solaris_score_s"] += time.perf_counter() - t0
        version = int(getattr(fm, "steps", 0))
        self.cache.put([i.user_id for i in todo], [i.ad_id for i in todo], pc, pv, version, now_ms)
        self.counters["solaris_pairs_computed"] += len(todo)
        return publish_records(version, now_ms, todo, pc, pv)

    def stats(self) -> dict[str, float]:
        from streams.names import Stat

        out = {**self.pred.stats(), **{k: float(v) for k, v in self.counters.items()}}
        c = self.cache.stats()
        if "solaris_hit_rate" in c:
            out[Stat.SOLARIS_HIT_RATE] = c["solaris_hit_rate"]
        if "solaris_age_p50_s" in c:
            out[Stat.SOLARIS_AGE_P50_S] = c["solaris_age_p50_s"]
        out["solaris_entries"] = c["solaris_entries"]
        cur = self.slot.current
        out["solaris_fm_version"] = float(getattr(cur, "steps", -1)) if cur is not None else -1.0
        return out

    def run(self, max_requests: int | None = None, idle_exit_s: float | None = None,
            block: int = 256) -> dict[str, float]:
        from confluent_kafka import TopicPartition

        from streams.bus import kafka_io
        from streams.names import Component

        cfg = self.cfg
        bs = cfg.kafka.bootstrap_servers
        consumer = kafka_io.make_consumer(bs, "streamrec-precompute", cfg.kafka.client)
        producer = kafka_io.make_producer(bs, cfg.kafka.client)
        consumer.subscribe([cfg.topics.impressions])
        if self.fm() is None:
            log.warning("no FM version under %s yet (%s): requests are observed, no pair is computed until the FM "
                        "publishes one (run the FM's trainer with --publish-dir %s, or pass --fm-models)",
                        self.fm_dir, self.slot.last_error or "empty", self.fm_dir)
        log.info("precompute: requests from %s, FM versions from %s, pairs to %s (budget %.1f per request, TTL %.0f s)",
                 cfg.topics.impressions, self.fm_dir, cfg.topics.solaris_pairs, self.scfg.budget, self.scfg.ttl_s)
        seen = 0
        last_msg = last_stats = time.monotonic()

        def report() -> None:
            st = schema.ServiceStats(component=Component.SOLARIS, ts=int(time.time() * 1000), values=self.stats())
            kafka_io.produce(producer, cfg.topics.service_stats, schema.encode(st))

        try:
            while not self._stop:
                msgs = consumer.consume(num_messages=block, timeout=0.2)
                now = time.monotonic()
                imps = []
                done: dict[tuple[str, int], int] = {}
                for m in msgs:
                    if m.error() is not None:
                        kafka_io.consumer_error(m.error(), "precompute consumer", log)
                        continue
                    done[(m.topic(), m.partition())] = m.offset() + 1
                    ev = schema.decode(m.value() or b"")
                    if isinstance(ev, schema.Impression):
                        imps.append(ev)
                if msgs:
                    last_msg = now
                for rec in self.handle(imps):
                    kafka_io.produce(producer, cfg.topics.solaris_pairs, schema.encode(rec))
                    self.counters["solaris_messages"] += 1
                if done:
                    producer.flush(10)  # published before the offsets move past their requests
                    consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()],
                                    asynchronous=False)
                producer.poll(0)
                seen += len(imps)
                if now - last_stats >= 2.0:
                    report()
                    last_stats = now
                if max_requests is not None and seen >= max_requests:
                    break
                if idle_exit_s is not None and now - last_msg >= idle_exit_s:
                    log.info("no requests for %.1fs (--idle-exit); stopping", idle_exit_s)
                    break
            report()
        finally:
            consumer.close()
            kafka_io.flush_all(producer, "precompute", log)
        return self.stats()


def add_cli(sub) -> None:
    p = sub.add_parser("precompute", help="SOLARIS: precompute the FM's predictions of the (user, ad) pairs "
                                          "predicted to be requested soon",
                       description="Consume the requests (topics.impressions), predict the (user, ad) pairs likely "
                                   "to come next (the user's recent ads, their nearest users' ads, the most shown "
                                   "ads of their domain; solaris.budget pairs per request at most), score them with "
                                   "the FM's newest published version and publish them to topics.solaris_pairs for "
                                   "the VMs' pair caches (trainer.solaris). SIGTERM stops it. See trainer/solaris.py.")
    p.add_argument("--fm-models", metavar="DIR",
                   help="the FM's published versions (default: <models_dir>/fm, the FM arm of `up --with-fm`)")
    p.add_argument("--user-index", metavar="PATH",
                   help="a user-vector index snapshot for neighbour candidates (default: <data_dir>/users/fm/index "
                        "when it exists; none: no neighbour candidates)")
    p.add_argument("--max-requests", type=int, metavar="N", help="stop after N requests")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without requests")
    p.set_defaults(func=run_service)


def run_service(args, cfg: Config) -> int:
    import signal

    from embedding_store.users import index_path

    fm_dir = args.fm_models or fm_models_dir(cfg)
    svc = PrecomputeService(cfg, fm_dir, index_path=args.user_index or str(index_path(cfg, "fm")))
    signal.signal(signal.SIGTERM, svc.stop)
    try:
        st = svc.run(max_requests=args.max_requests, idle_exit_s=args.idle_exit)
    except KeyboardInterrupt:
        return 0
    print(f"precompute: {st.get('solaris_requests', 0):.0f} requests, {st.get('solaris_pairs_computed', 0):.0f} "
          f"pairs computed (budget used {st.get('solaris_budget_used', 0):.2f}), hit rate "
          f"{st.get('solaris_hit_rate', float('nan')):.3f}", file=sys.stderr)
    return 0
