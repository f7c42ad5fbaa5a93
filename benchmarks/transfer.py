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
  - ``all together`` (aux head + adapter + LoopFM; SOLARIS is not built yet).

Two runs: ``stationary`` (scenario ``none``; metrics on the second half) and ``sudden`` (the ads' taste vectors
turn at 50%: the teacher stays on the old world for ``lag`` examples, then catches up; metrics after the drift).

The world (``WORLD``) gives the FM an honest advantage: every user's tastes (latent vector, biases) are shared
by all domains, so the FM learns each user from all of their traffic while a VM sees only its domains' share
(``display`` is 5% of the stream); the FM also reads features a VM does not serve (all cat slots, a longer
history). The oracle is the generator's true probability of each impression.

Headline: the **transfer ratio** of a VM variant = (its AUC - VM alone's) / (the FM's AUC - VM alone's), click
AUC; per domain and pooled (all VMs' predictions together). Click NE beside it (calibration counts there: what
ExFM's auxiliary head protects). Last line: ``value`` = pooled transfer ratio of the
best combination available (aux head + adapter), stationary; ``baseline`` = plain distillation's ratio in the
same run (so ``ratio`` > 1 means the combination transfers more than plain KD), ``goal`` 0.5; after the drift
``drift_adapter_minus_kd`` (click AUC points); ``loopfm_vs_kd`` and ``solaris_hit_rate`` null until those exist.

    streamrec bench transfer [--quick] [--n 200000] [--lag 4096] [--teacher-weight 1.0] [--seed 0]
    streamrec bench transfer --quick --runs stationary,sudden-levels
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import msgspec
import numpy as np

from benchmarks._common import parser, report
from benchmarks._simulated import example_stream, truth_arrays
from config import TrainerConfig
from streams import schema
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, TruthParams, simulate
from streams.sources.scenarios import ScenarioConfig
from trainer.features import featurize
from embedding_store.fm_embeddings import FMEmbeddingStore
from trainer.loopfm import FMEmbeddingView, fm_embeddings, representation_dim
from trainer.model import Learner

BATCH = 256
DOMAINS = ("feed", "stories", "video", "search", "display")
# frequent clicks (as in bench quality) so that the stream teaches something within a minute; users' tastes
# are shared across domains (the generator's hidden model has one latent vector and bias per user)
TRUTH = TruthParams(base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25, "display": 0.1},
                    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25, "display": 0.1},
                    domain_share={"feed": 0.4, "stories": 0.2, "video": 0.2, "search": 0.15, "display": 0.05})
WORLD = {"n_users": 3000, "n_ads": 300, "truth": TRUTH, "domains": DOMAINS}
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
VARIANTS[ALL_TOGETHER] = {"aux_head": True, "student_adapter": True, "loopfm": True,
                          "loopfm_dim": representation_dim(FM)}


def _imp_index(example_id: str) -> int:
    return int(example_id.rsplit("-", 1)[1])


def fm_pass(exs: list[schema.Example], n: int, lag: int
            ) -> tuple[list[schema.Example], np.ndarray, list[list[bytes]]]:
    """Train the FM on every example; returns (the examples with their teacher attached, the FM's own
    progressive p_click per impression, what the FM published after training each batch: LoopFM's records).
    The FM trains ``lag // BATCH`` batches behind the batch it scores: the teacher of batch k is the FM trained
    through batch ``k - L - 1``."""
    fm = Learner(FM)
    batches = [exs[i:i + BATCH] for i in range(0, len(exs), BATCH)]
    L = max(lag // BATCH, 0)
    own = np.full(n, np.nan)
    taught: list[schema.Example] = []
    published: list[list[bytes]] = []  # [j]: the FM's LoopFM records after training batch j, as on the topic
    for k in range(len(batches) + L):
        if k < len(batches):
            chunk = batches[k]
            pc, pv = fm.score(featurize(chunk, FM))
            # the snapshot's time: when the FM had last trained (the newest example it knew), as wall-clock ms
            src = batches[k - L - 1][-1].emitted_ts if k - L - 1 >= 0 else chunk[0].emitted_ts
            taught.extend(msgspec.structs.replace(e, teacher=schema.Teacher(
                p_click=float(a), p_conversion=float(b), model_version=fm.steps, scored_ts=int(src)))
                for e, a, b in zip(chunk, pc, pv))
        if k - L >= 0:
            chunk = batches[k - L]
            r = fm.train_step(featurize(chunk, FM))
            own[[_imp_index(e.example_id) for e in chunk]] = r.p_click
            published.append([schema.encode(x) for x in fm_embeddings(fm, [e.impression for e in chunk])])
    return taught, own, published


def vm_pass(taught: list[schema.Example], n: int, overrides: dict, teacher_weight: float,
            published: list[list[bytes]], lag: int) -> np.ndarray:
    """Every VM group of one variant over its domains' examples; progressive p_click per impression. A LoopFM
    VM reads a store fed with what the FM had published when the teacher of its batch was made."""
    out = np.full(n, np.nan)
    L = max(lag // BATCH, 0)
    for group in VM_GROUPS:
        kw = {"teacher_weight": teacher_weight, **overrides, "vm_domains": group}
        tc = msgspec.structs.replace(VM, **kw)
        vm = Learner(tc)
        store = view = None
        applied = 0
        if tc.loopfm:
            store = FMEmbeddingStore(tc.loopfm_dim, max_age_s=365 * 86_400.0)  # age plays no part in-process
            view = vm.loopfm_view = FMEmbeddingView(store)
        mine = [e for e in taught if e.impression.domain in group]
        for i in range(0, len(mine), BATCH):
            chunk = mine[i:i + BATCH]
            if store is not None:  # the FM had trained through batch k - L - 1 when batch k was scored
                known = max(_imp_index(e.example_id) for e in chunk) // BATCH - L
                while applied < min(known, len(published)):
                    for raw in published[applied]:
                        store.apply_raw(raw)
                    applied += 1
            r = vm.train_step(featurize(chunk, tc, None, view))
            out[[_imp_index(e.example_id) for e in chunk]] = r.p_click
    return out


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


def run(name: str, n: int, lag: int, teacher_weight: float, seed: int, log: Callable[[str], None]) -> dict:
    sc = ScenarioConfig(name=name, at=0.5) if name != "stationary" else ScenarioConfig()
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS[name] + seed, scenario=sc, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    mask = truth["ts"] >= np.median(truth["ts"])  # second half: after the drift in `sudden`
    t0 = time.perf_counter()
    taught, fm_own, published = fm_pass(exs, n, lag)
    teacher = np.array([e.teacher.p_click for e in taught])[np.argsort([_imp_index(e.example_id) for e in taught])]
    res = {"FM itself": aucs(truth, fm_own, mask), f"FM as teacher (lag {lag})": aucs(truth, teacher, mask),
           "oracle": aucs(truth, truth["p_click"], mask)}
    log(f"  {name}: FM pass {time.perf_counter() - t0:.1f} s")
    for vname, ov in VARIANTS.items():
        t0 = time.perf_counter()
        res[vname] = aucs(truth, vm_pass(taught, n, ov, teacher_weight, published, lag), mask)
        log(f"  {name}: {vname} {time.perf_counter() - t0:.1f} s")
    return res


def table(name: str, res: dict, rows: list) -> dict[str, dict[str, float]]:
    alone, fm = res["VM alone"], res["FM itself"]
    ratios: dict[str, dict[str, float]] = {}
    for model, a in res.items():
        is_vm = model.startswith("+") or model == ALL_TOGETHER
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
    p.add_argument("--runs", default="stationary,sudden",
                   help="which runs, of stationary, sudden, sudden-levels (default stationary,sudden)")
    a = p.parse_args()
    n = a.n or (20_000 if a.quick else 200_000)
    lag = a.lag if a.lag is not None else (1024 if a.quick else 4096)
    runs = a.runs.split(",")
    unknown = [r for r in runs if r not in SEEDS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)} (known: {', '.join(SEEDS)})")
    t0 = time.perf_counter()
    rows: list[tuple[str, ...]] = []
    out: dict = {}
    for name in runs:
        res = run(name, n, lag, a.teacher_weight, a.seed, lambda s: print(s, file=sys.stderr, flush=True))
        out[name] = (res, table(name, res, rows))
    print(f"{n} impressions per run, {WORLD['n_users']} users, {WORLD['n_ads']} ads, FM lag {lag} examples, "
          f"teacher_weight {a.teacher_weight}, VM groups {'; '.join('+'.join(g) for g in VM_GROUPS)}; progressive "
          f"click AUC on the second half (sudden: after the drift); {time.perf_counter() - t0:.0f} s")

    def r(run_name: str, variant: str) -> float | None:
        if run_name not in out:
            return None
        x = out[run_name][1][variant]["pooled"]
        return None if x != x else round(x, 3)

    def auc(run_name: str, variant: str) -> float | None:
        return round(out[run_name][0][variant]["pooled"], 4) if run_name in out else None

    st = "stationary" if "stationary" in out else next(iter(out))
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
           adapter_ratio=r(st, "+ aux head + adapter"), solaris_hit_rate=None, n=n, lag=lag, teacher_weight=a.teacher_weight, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
