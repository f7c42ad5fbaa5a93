"""Knowledge transfer from a foundation model to vertical models (ExFM), in-process, against the FM itself.

One generated stream (:func:`streams.sources.generate.simulate`, labels without delay via
:mod:`benchmarks._simulated`), fed batch by batch in emission order; every metric is *progressive* (each example
scored before the model trains on it) on the impressions' true labels, per domain and pooled:

* **the FM**: one large unified model (:func:`trainer.roles.role_config` ``fm``-like: bigger tables, all cat
  slots, the longest history) trained on every domain's examples. Its predictions for example ``i`` -- the
  *teacher* -- come from the FM as it was ``lag`` examples earlier: the FM trains ``lag`` examples behind the
  batch it scores (no snapshots needed), so the teacher is honestly stale (by ``lag`` examples of event time
  and of FM versions);
* **the VMs**: small models (smaller tables, 2 of the 4 cat slots, history 2), one per large domain and one for
  the small-domain group ``search + display``; each sees only its domains' examples, each with its teacher
  attached (:class:`streams.schema.Teacher`), in the variants

  - ``VM alone`` (``teacher_weight = 0``),
  - ``+ plain KD`` (``aux_head = False``: distillation on the serving head, raw teacher as target),
  - ``+ aux head`` (distillation on the auxiliary head, raw teacher as target),
  - ``+ aux head + adapter`` (the student adapter's corrected teacher as the auxiliary head's target),
  - ``+ LoopFM`` (no distillation: the FM's user and ad vectors as input features, :mod:`trainer.loopfm`; after
    each FM training step the FM publishes its batch's users and ads, and a VM batch reads the store as it
    stood when the FM had trained what the teacher of that batch knew),
  - ``+ SOLARIS pairs`` (no distillation: the FM's cached prediction of the (user, ad) pair as input,
    :mod:`trainer.solaris`; the cache is fed by an in-process precompute service: after each block of
    ``BATCH`` requests (all domains, in emission order) its pair predictor picks the pairs to compute within
    the budget and the FM *as it was then* (the teacher's FM, ``lag`` behind) scores them; a request reads the
    cache as it stood before its block, so it hits only pairs computed earlier, with the TTL applied in event
    time),
  - ``SOLARIS on demand`` (the same feature computed by the same FM for every request at request time: 100%
    hits; what the cache approximates),
  - ``all together`` (aux head + adapter + LoopFM + SOLARIS pairs).

Two runs: ``stationary`` (scenario ``none``; metrics on the second half) and ``sudden`` (the ads' taste vectors
turn at 50%: the teacher stays on the old world for ``lag`` examples, then catches up; metrics after the drift).
``--quick`` runs ``stationary`` alone (the drift figures of the last line are null then; ``--runs`` adds it).

Cost: per run the FM trains once over the stream (scoring the teachers and SOLARIS's pairs as it goes); every
variant reuses what it produced (the teachers, its LoopFM records, the SOLARIS features recorded per request) and
trains only its small VMs. Torch runs on one thread: these models' steps are too small for a second one to pay,
and on shared cores OpenMP's threads wait on each other (measured: >5x slower under load on two threads).

The world (``WORLD``) has ad targeting (``GeneratorConfig.targeting``: each user's ads come from a slowly
changing set of 4; without it every ad is a popularity draw independent of the user and no predictor can know
which pairs come next). It gives the FM an honest advantage: every user's tastes (latent vector, biases) are shared
by all domains, so the FM learns each user from all of their traffic while a VM sees only its domains' share
(``display`` is 5% of the stream); the FM also reads features a VM does not serve (all cat slots, a longer
history). The oracle is the generator's true probability of each impression.

Headline: the **transfer ratio** of a VM variant = (its AUC - VM alone's) / (the FM's AUC - VM alone's), click
AUC; per domain and pooled (all VMs' predictions together). Click NE beside it (calibration counts there: what
ExFM's auxiliary head protects). Last line: ``value`` = pooled transfer ratio of the
best combination available (aux head + adapter), stationary; ``baseline`` = plain distillation's ratio in the
same run (so ``ratio`` > 1 means the combination transfers more than plain KD), ``goal`` 0.5; after the drift
``drift_adapter_minus_kd`` (click AUC points); ``loopfm_vs_kd``; SOLARIS's ``solaris_hit_rate`` (requests of the
second half served from the cache), ``solaris_budget`` (pairs computed / requests), ``solaris_gain_kept`` (the
cached variant's gain over VM alone / on demand's), ``solaris_age_s`` (median age of hits), and the AUC of the
SOLARIS VM on hits and on misses beside VM alone's on the same requests.

    streamrec bench transfer [--quick] [--n 200000] [--lag 4096] [--teacher-weight 1.0] [--seed 0]
    streamrec bench transfer --quick --runs stationary,sudden-levels
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import msgspec
import numpy as np
import torch

from benchmarks._common import parser, report
from benchmarks._simulated import DOMAINS, FREQUENT_CLICKS, example_stream, impression_index, progressive, truth_arrays
from config import TrainerConfig
from streams import schema
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, simulate
from streams.sources.scenarios import ScenarioConfig
from trainer.features import featurize
from embedding_store.fm_embeddings import FMEmbeddingStore
from trainer.loopfm import FMEmbeddingView, fm_embeddings, representation_dim
from trainer.model import Learner
from config import SolarisConfig
from embedding_store.ann import AnnConfig, make_index
from embedding_store.pair_cache import PairCache
from trainer.solaris import PairPredictor, pair_impression, pair_logits, score_pairs

BATCH = 256
# users' tastes are shared across domains (the generator's hidden model has one latent vector and bias per user)
WORLD = {"n_users": 3000, "n_ads": 300, "truth": FREQUENT_CLICKS, "domains": DOMAINS, "targeting": 4}
SEEDS = {"stationary": 21, "sudden": 22, "sudden-levels": 23}
# the FM: the whole stream, bigger tables, every feature (trainer.roles' fm preset, scaled to a CPU minute)
FM = TrainerConfig(role="fm", batch_size=BATCH, device="cpu", user_model=False, hash_buckets=50_000,
                   embedding_dim=16, history_len=8, cat_slots=4)
# a VM: small tables, fewer features (2 cat slots), a short history (trainer.roles' vm preset, scaled)
VM = TrainerConfig(role="vm", batch_size=BATCH, device="cpu", user_model=False, hash_buckets=10_000,
                   embedding_dim=8, history_len=2, cat_slots=2)
VM_GROUPS: tuple[tuple[str, ...], ...] = (("feed",), ("stories",), ("video",), ("search", "display"))
VARIANTS: dict[str, dict] = {
    "VM alone": {"teacher_weight": 0.0},
    "+ plain KD": {"aux_head": False, "student_adapter": False},
    "+ aux head": {"aux_head": True, "student_adapter": False},
    "+ aux head + adapter": {"aux_head": True, "student_adapter": True},
}
ALL_TOGETHER = "all together"
LOOPFM = "+ LoopFM"
VARIANTS[LOOPFM] = {"teacher_weight": 0.0, "loopfm": True, "loopfm_dim": representation_dim(FM)}
SOLARIS = "+ SOLARIS pairs"
ON_DEMAND = "SOLARIS on demand"
VARIANTS[SOLARIS] = {"teacher_weight": 0.0, "solaris": True}
VARIANTS[ON_DEMAND] = {"teacher_weight": 0.0, "solaris": True}
VARIANTS[ALL_TOGETHER] = {"aux_head": True, "student_adapter": True, "loopfm": True,
                          "loopfm_dim": representation_dim(FM), "solaris": True}
# which SOLARIS features a variant reads: the cache's, or computed on demand
SOLARIS_FEED = {SOLARIS: "cached", ON_DEMAND: "on_demand", ALL_TOGETHER: "cached"}
SOLARIS_CFG = SolarisConfig()  # the service's defaults: budget 2 per request, TTL 600 s


class SolarisSim:
    """The precompute service in-process (module docstring): :meth:`block` with the FM as it is when a block of
    requests arrives; :meth:`fm_published` with the FM's user vectors (its LoopFM records) after each of its
    training steps, for the predictor's neighbours. Per impression: ``cached`` and ``on_demand`` (n, 3)
    features, ``hit``, ``age_s``."""

    def __init__(self, n: int, scfg: SolarisConfig = SOLARIS_CFG):
        self.cache = PairCache(scfg.ttl_s, scfg.max_entries)
        self.index = make_index(AnnConfig(dim=representation_dim(FM), kind="exact"))
        self.pred = PairPredictor(scfg, self.index)
        self.cached = np.zeros((n, 3), np.float32)
        self.on_demand = np.zeros((n, 3), np.float32)
        self.hit = np.zeros(n, bool)
        self.age_s = np.zeros(n)
        self.computed = 0

    def block(self, fm: Learner, chunk: list[schema.Example]) -> None:
        imps = [e.impression for e in chunk]
        at = [impression_index(e.example_id) for e in chunk]
        ts = np.array([i.ts for i in imps], np.int64)
        # what the VMs read for these requests: the cache as it stood before them (each at its own time)
        pc, pv, hit, age = self.cache.get([i.user_id for i in imps], [i.ad_id for i in imps], ts)
        self.cached[at], self.hit[at], self.age_s[at] = pair_logits(pc, pv, hit), hit, age
        # on demand: the same computation for every request, at request time
        self.on_demand[at] = pair_logits(*score_pairs(fm, [pair_impression(i, i) for i in imps]), np.ones(len(imps)))
        # the service sees the requests, predicts the next pairs and has the FM (as it is now) compute them
        self.pred.observe(imps)
        todo = self.pred.plan(imps, self.cache, int(ts[-1]))
        if todo:
            self.cache.put([i.user_id for i in todo], [i.ad_id for i in todo], *score_pairs(fm, todo),
                           version=fm.steps, ts_ms=int(ts[-1]))
        self.computed += len(todo)

    def fm_published(self, records: list[bytes]) -> None:
        for raw in records:
            r = schema.decode(raw, schema.FMEmbeddings)
            if r.kind == "user" and r.ids:
                self.index.upsert(np.array(r.ids, np.int64), np.array(r.vectors, np.float32).reshape(len(r.ids), r.dim),
                                  ts_ms=r.ts)


def fm_pass(exs: list[schema.Example], n: int, lag: int, solaris: SolarisSim | None = None
            ) -> tuple[list[schema.Example], np.ndarray, list[list[bytes]]]:
    """Train the FM on every example; returns (the examples with their teacher attached, the FM's own
    progressive p_click per impression, what the FM published after training each batch: LoopFM's records).
    The FM trains ``lag // BATCH`` batches behind the batch it scores: the teacher of batch k is the FM trained
    through batch ``k - L - 1``; so is the FM that ``solaris`` (the precompute service) uses for that batch."""
    fm = Learner(FM)
    batches = [exs[i:i + BATCH] for i in range(0, len(exs), BATCH)]
    L = max(lag // BATCH, 0)
    taught: list[schema.Example] = []
    published: list[list[bytes]] = []  # [j]: the FM's LoopFM records after training batch j, as on the topic
    scored = 0

    def teach(j: int, _chunk) -> None:  # before the FM trains batch j: it scores every batch through j + L
        nonlocal scored
        while scored < min(j + L + 1, len(batches)):
            k, chunk = scored, batches[scored]
            pc, pv = fm.score(featurize(chunk, FM))
            # the snapshot's time: when the FM had last trained (the newest example it knew), as wall-clock ms
            src = batches[k - L - 1][-1].emitted_ts if k - L - 1 >= 0 else chunk[0].emitted_ts
            taught.extend(msgspec.structs.replace(e, teacher=schema.Teacher(
                p_click=float(a), p_conversion=float(b), model_version=fm.steps, scored_ts=int(src)))
                for e, a, b in zip(chunk, pc, pv))
            if solaris is not None:
                solaris.block(fm, chunk)
            scored += 1

    def publish(chunk, _fb, _r) -> None:
        published.append([schema.encode(x) for x in fm_embeddings(fm, [e.impression for e in chunk])])
        if solaris is not None:
            solaris.fm_published(published[-1])

    own = progressive(fm, exs, n, batch=BATCH, before=teach, beside=publish)
    return taught, own, published


class _Recorded:
    """A SOLARIS view over features recorded per impression (:class:`SolarisSim`)."""

    def __init__(self, feats: np.ndarray):
        self.feats = feats

    def features_of(self, imps) -> np.ndarray:
        return self.feats[[impression_index(i.event_id) for i in imps]]


def vm_pass(taught: list[schema.Example], n: int, overrides: dict, teacher_weight: float,
            published: list[list[bytes]], lag: int, solaris: np.ndarray | None = None) -> np.ndarray:
    """Every VM group of one variant over its domains' examples; progressive p_click per impression. A LoopFM
    VM reads a store fed with what the FM had published when the teacher of its batch was made; a SOLARIS VM
    the features ``solaris`` (n, 3) recorded for each request."""
    out = np.full(n, np.nan)
    recorded = None if solaris is None else _Recorded(solaris)
    for group in VM_GROUPS:
        tc = msgspec.structs.replace(VM, **{"teacher_weight": teacher_weight, **overrides, "vm_domains": group})
        p = vm_group(tc, [e for e in taught if e.impression.domain in group], n, published, lag, recorded)
        seen = ~np.isnan(p)
        out[seen] = p[seen]
    return out


def vm_group(tc: TrainerConfig, mine: list[schema.Example], n: int, published: list[list[bytes]], lag: int,
             solaris: _Recorded | None) -> np.ndarray:
    """One VM over its domains' examples ``mine`` (see :func:`vm_pass`); progressive p_click per impression."""
    vm = Learner(tc)
    L = max(lag // BATCH, 0)
    store = view = None
    if tc.loopfm:
        store = FMEmbeddingStore(tc.loopfm_dim, max_age_s=365 * 86_400.0)  # age plays no part in-process
        view = vm.loopfm_view = FMEmbeddingView(store)
    applied = 0

    def feed(_j: int, chunk) -> None:  # the FM had trained through batch k - L - 1 when batch k was scored
        nonlocal applied
        known = max(impression_index(e.example_id) for e in chunk) // BATCH - L
        while applied < min(known, len(published)):
            for raw in published[applied]:
                store.apply_raw(raw)
            applied += 1

    return progressive(vm, mine, n, batch=BATCH, before=None if store is None else feed,
                       features=lambda chunk: featurize(chunk, tc, None, view, solaris=solaris))


def aucs(truth: dict, p: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Click AUC under ``"pooled"`` and each domain's name, click NE under ``"ne_" + the same``."""
    out = {"pooled": roc_auc(truth["click"][mask], p[mask]),
           "ne_pooled": normalized_entropy(truth["click"][mask], p[mask])}
    for d in DOMAINS:
        m = mask & (truth["domain"] == d)
        out[d] = roc_auc(truth["click"][m], p[m])
        out["ne_" + d] = normalized_entropy(truth["click"][m], p[m])
    return out


def ratio(v: float, alone: float, fm: float) -> float:
    """Transfer ratio; NaN when the FM gains under 0.001 AUC over the VM alone (nothing to transfer)."""
    return (v - alone) / (fm - alone) if fm - alone >= 0.001 else float("nan")


def run(name: str, n: int, lag: int, teacher_weight: float, seed: int, log: Callable[[str], None]
        ) -> tuple[dict, dict]:
    """(model -> :func:`aucs`, SOLARIS's figures) of one run (on one torch thread; the caller's setting after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(name, n, lag, teacher_weight, seed, log)
    finally:
        torch.set_num_threads(threads)


def _run(name: str, n: int, lag: int, teacher_weight: float, seed: int, log: Callable[[str], None]
         ) -> tuple[dict, dict]:
    sc = ScenarioConfig(name=name, at=0.5) if name != "stationary" else ScenarioConfig()
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS[name] + seed, scenario=sc, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    mask = truth["ts"] >= np.median(truth["ts"])  # second half: after the drift in `sudden`
    t0 = time.perf_counter()
    sol = SolarisSim(n)
    taught, fm_own, published = fm_pass(exs, n, lag, sol)
    teacher = np.array([e.teacher.p_click for e in taught])
    teacher = teacher[np.argsort([impression_index(e.example_id) for e in taught])]
    res = {"FM itself": aucs(truth, fm_own, mask), f"FM as teacher (lag {lag})": aucs(truth, teacher, mask),
           "oracle": aucs(truth, truth["p_click"], mask)}
    preds: dict[str, np.ndarray] = {}
    log(f"  {name}: FM pass {time.perf_counter() - t0:.1f} s")
    for vname, ov in VARIANTS.items():
        t0 = time.perf_counter()
        feed = SOLARIS_FEED.get(vname)
        p = vm_pass(taught, n, ov, teacher_weight, published, lag,
                    None if feed is None else getattr(sol, feed))
        res[vname] = aucs(truth, p, mask)
        preds[vname] = p
        log(f"  {name}: {vname} {time.perf_counter() - t0:.1f} s")
    return res, solaris_figures(truth, mask, sol, preds, res)


def solaris_figures(truth: dict, mask: np.ndarray, sol: SolarisSim, preds: dict, res: dict) -> dict:
    """Hit rate (second half, and whole run), budget used, gain kept, median age of hits, and the AUC of the
    SOLARIS VM and of VM alone on the hits and on the misses of the second half."""
    alone = res["VM alone"]["pooled"]
    gain, full = res[SOLARIS]["pooled"] - alone, res[ON_DEMAND]["pooled"] - alone
    hits, misses = mask & sol.hit, mask & ~sol.hit
    c = truth["click"]

    def auc(p: np.ndarray, m: np.ndarray) -> float | None:
        return round(roc_auc(c[m], p[m]), 4) if m.sum() > 1 and 0 < c[m].sum() < m.sum() else None

    src = sol.pred.counters
    return {"hit_rate": round(float(sol.hit[mask].mean()), 3), "hit_rate_all": round(float(sol.hit.mean()), 3),
            "budget": round(sol.computed / len(sol.hit), 3),
            "gain_kept": round(gain / full, 3) if full >= 0.001 else None,
            "age_s": round(float(np.median(sol.age_s[hits])), 1) if hits.any() else None,
            "auc_hits": auc(preds[SOLARIS], hits), "auc_misses": auc(preds[SOLARIS], misses),
            "alone_auc_hits": auc(preds["VM alone"], hits), "alone_auc_misses": auc(preds["VM alone"], misses),
            "from": {k: src["from_" + k] for k in ("recent", "neighbours", "domain")},
            "skipped_fresh": src["skipped_fresh"]}


def table(name: str, res: dict, rows: list) -> dict[str, dict[str, float]]:
    alone, fm = res["VM alone"], res["FM itself"]
    ratios: dict[str, dict[str, float]] = {}
    for model, a in res.items():
        is_vm = model.startswith("+") or model in (ALL_TOGETHER, ON_DEMAND)
        ratios[model] = {d: ratio(a[d], alone[d], fm[d]) for d in ("pooled", *DOMAINS)} if is_vm else {}
        for d in ("pooled", *DOMAINS):
            r = f"{ratios[model][d]:.2f}" if is_vm and ratios[model][d] == ratios[model][d] else ""
            rows.append((name, d, model, f"{a[d]:.4f}", f"{100 * (a[d] - alone[d]):+.2f}", r, f"{a['ne_' + d]:.4f}"))
    return ratios


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions per run (default 200000, quick 20000)")
    p.add_argument("--lag", type=int, default=None,
                   help="examples the FM trails the stream by (default 4096, quick 1024; rounded to batches)")
    p.add_argument("--teacher-weight", type=float, default=1.0, help="weight of the distillation loss (default 1)")
    p.add_argument("--seed", type=int, default=0, help="added to each run's generator seed (default 0)")
    p.add_argument("--runs", default=None,
                   help="which runs, of stationary, sudden, sudden-levels (default stationary,sudden; quick "
                        "stationary)")
    a = p.parse_args()
    n = a.n or (20_000 if a.quick else 200_000)
    lag = a.lag if a.lag is not None else (1024 if a.quick else 4096)
    runs = (a.runs or ("stationary" if a.quick else "stationary,sudden")).split(",")
    unknown = [r for r in runs if r not in SEEDS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)} (known: {', '.join(SEEDS)})")
    t0 = time.perf_counter()
    rows: list[tuple[str, ...]] = []
    out: dict = {}
    for name in runs:
        res, sol = run(name, n, lag, a.teacher_weight, a.seed, lambda s: print(s, file=sys.stderr, flush=True))
        out[name] = (res, table(name, res, rows), sol)
    print(f"{n} impressions per run, {WORLD['n_users']} users, {WORLD['n_ads']} ads, FM lag {lag} examples, "
          f"teacher_weight {a.teacher_weight}, VM groups {'; '.join('+'.join(g) for g in VM_GROUPS)}; progressive "
          f"click AUC on the second half (sudden: after the drift); {time.perf_counter() - t0:.0f} s")
    for name, (_, _, sol) in out.items():
        print(f"SOLARIS {name}: hit rate {sol['hit_rate']} (second half; {sol['hit_rate_all']} whole run) at a "
              f"budget of {sol['budget']} pairs per request (pairs from {sol['from']}; {sol['skipped_fresh']} "
              f"candidates skipped as fresh), median age of hits {sol['age_s']} s, gain kept {sol['gain_kept']}; "
              f"AUC on hits {sol['auc_hits']} (VM alone {sol['alone_auc_hits']}), on misses {sol['auc_misses']} "
              f"(VM alone {sol['alone_auc_misses']})")

    def r(run_name: str, variant: str) -> float | None:
        if run_name not in out:
            return None
        x = out[run_name][1][variant]["pooled"]
        return None if x != x else round(x, 3)

    def auc(run_name: str, variant: str) -> float | None:
        return round(out[run_name][0][variant]["pooled"], 4) if run_name in out else None

    st = "stationary" if "stationary" in out else next(iter(out))
    sol_st = out[st][2]
    value = r(st, ALL_TOGETHER)
    kd = r(st, "+ plain KD")
    drift_run = next((x for x in ("sudden", "sudden-levels") if x in out), None)
    drift = (None if drift_run is None else
             round(100 * (auc(drift_run, ALL_TOGETHER) - auc(drift_run, "+ plain KD")), 2))
    def ne(run_name: str, variant: str) -> float | None:
        return round(out[run_name][0][variant]["ne_pooled"], 4) if run_name in out else None

    report("transfer", rows, ("run", "domain", "model", "AUC click", "vs VM alone (pts)", "transfer ratio",
                              "NE click"),
           # value 0 with value_defined false where the FM gained nothing over the VM (no ratio; JSON has no NaN)
           value=value if value is not None else 0.0, value_defined=value is not None,
           unit="transfer ratio (pooled click AUC)",
           # the baseline measured in the same run: plain distillation's ratio (the ratio column: all / plain KD)
           baseline=kd if kd is not None else 0.0, goal=0.5, kd_ratio=kd, aux_ratio=r(st, "+ aux head"),
           drift_run=drift_run, drift_ratio_all=r(drift_run, ALL_TOGETHER) if drift_run else None,
           drift_ratio_kd=r(drift_run, "+ plain KD") if drift_run else None,
           drift_adapter_minus_kd=drift,
           drift_ne_kd=ne(drift_run, "+ plain KD") if drift_run else None,
           drift_ne_all=ne(drift_run, ALL_TOGETHER) if drift_run else None,
           drift_ne_alone=ne(drift_run, "VM alone") if drift_run else None, fm_auc=auc(st, "FM itself"), vm_alone_auc=auc(st, "VM alone"),
           loopfm_ratio=r(st, LOOPFM), loopfm_vs_kd=(round(r(st, LOOPFM) / kd, 2) if kd and r(st, LOOPFM) is not None
                                                    else None),
           adapter_ratio=r(st, "+ aux head + adapter"), solaris_hit_rate=sol_st["hit_rate"],
           solaris_hit_rate_all=sol_st["hit_rate_all"], solaris_budget=sol_st["budget"],
           solaris_gain_kept=sol_st["gain_kept"], solaris_age_s=sol_st["age_s"], solaris_ratio=r(st, SOLARIS),
           solaris_on_demand_ratio=r(st, ON_DEMAND), solaris_auc_hits=sol_st["auc_hits"],
           solaris_auc_misses=sol_st["auc_misses"], solaris_alone_auc_hits=sol_st["alone_auc_hits"],
           solaris_alone_auc_misses=sol_st["alone_auc_misses"],
           n=n, lag=lag, teacher_weight=a.teacher_weight, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
