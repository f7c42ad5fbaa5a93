"""Model quality on generated traffic, against the generator's oracle (in-process: no broker, no dataflow).

Examples are built from the simulation's truth table as the labels dataflow would emit them
(:mod:`benchmarks._simulated`) and fed in emission order, batch by batch; every metric is *progressive*: each
example is scored before the model trains on it, against the impression's true final labels. Four studies:

1. stationary (scenario ``none``, labels without delay): per-domain click / conversion AUC of the unified
   MDMO model vs the oracle (the true probabilities) on the second half of the stream, next to a reference
   learner given the generator's exact functional form (:mod:`benchmarks._form_fm`): what it misses of the
   oracle is what the stream's length allows, the rest of the MDMO model's gap is the model's;
2. drift (scenario ``sudden`` at 50%, or ``--drift NAME``): the online model vs the same model frozen after
   40% of the stream vs an online logistic regression (:mod:`benchmarks._online_lr`), after the drift;
3. delayed conversions (``elapsed`` policy, 1 h elapsed, conversions up to 6 h after the click): ES-DFM
   weighting vs the naive stream (fake negatives never corrected) vs the duplicates without weights vs oracle
   labels; conversion AUC and NE on the true labels of the second half;
4. unified vs separate: one model for all domains vs one model per domain (each seeing only its domain),
   sum over domains of click + conversion AUC, and parameter counts;
5. user model: ``interest-shift`` traffic, the ranker reading the user model's vectors (trainer/users/features.py)
   vs the same ranker without them; overall AUC on the second half. Two references in the same input slot
   (:class:`TasteFeatures`) bound what user vectors can bring: each user's true current taste (no model can
   know it), and the mean true taste of the ads the user clicked last (what a history model could at best
   read from clicks).

Last line: value = unified model's mean per-domain click AUC (stationary), baseline = the oracle's.

    streamrec bench quality [--quick]     # full: 3M impressions in studies 1 and 4 (~7 min, 6 GB)
    streamrec bench quality --curve 300000,1000000,3000000   # study 1's gap to the oracle by stream length
    streamrec bench quality --quick --seed 1   # the same studies on other generated traffic (seeds + 1)
"""

from __future__ import annotations

import sys
import time

import numpy as np

# `benchmarks/trainer.py` would shadow the `trainer` package: keep this directory behind the project root
from benchmarks._common import parser, report
from benchmarks._form_fm import FormFM
from config import TrainerConfig
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, TruthParams, hidden_tastes, simulate
from streams.sources.scenarios import ScenarioConfig
from trainer.features import featurize
from trainer.model import Learner, count_parameters
from benchmarks._online_lr import OnlineLR
from benchmarks._simulated import example_stream, truth_arrays

TC = TrainerConfig(batch_size=256, device="cpu", user_model=False)
TC_USERS = TrainerConfig(batch_size=256, device="cpu", user_model=True)  # study 5
ELAPSED_S = 3600.0
# a small world with frequent clicks and conversions, so that learning curves approach their plateau within a
# run that 2 cores finish in minutes (with the generator's default 10k users / 2k ads and 1-5% CTR, 100k
# impressions hold ~2k clicks: far too few to learn per-user tastes, and the gap to the oracle is data, not model)
TRUTH = TruthParams(base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25, "display": 0.1},
                    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25, "display": 0.1})
WORLD = {"n_users": 500, "n_ads": 100, "truth": TRUTH}
# generator seed of each study; --seed S adds S to every one (0: the published numbers)
SEEDS = {"stationary": 11, "drift": 12, "delay": 13, "users": 14}


def _imp_index(example_id: str) -> int:
    return int(example_id.split("#", 1)[0].rsplit("-", 1)[1])  # "imp-<seed>-<i>[#late-...]"


def run_stream(model, exs, n_imps: int, batch: int, freeze_at: float | None = None, users=None):
    """Feed ``exs`` in order; returns (p_click, p_conversion) per impression from its first (non-late) example,
    scored before training on it. ``freeze_at``: stop training after that fraction of the examples.
    ``users``: a :class:`trainer.users.features.UserWorker` fed each batch after the ranker trained on it (and
    drained, so the run is deterministic: the service does the same asynchronously)."""
    tc = getattr(model, "tcfg", TC)
    pc, pv = np.full(n_imps, np.nan), np.full(n_imps, np.nan)
    stop = len(exs) if freeze_at is None else int(freeze_at * len(exs))
    for i in range(0, len(exs), batch):
        chunk = exs[i:i + batch]
        fb = featurize(chunk, tc, users.view if users is not None else None)
        if i < stop:
            r = model.train_step(fb)
            if users is not None:
                users.submit(chunk)
                users.drain()
            a, b = (r.p_click, r.p_conversion) if hasattr(r, "p_click") else r
        else:
            a, b = model.score(fb)
        for ex, x, y in zip(chunk, a, b):
            if ex.decided != "late_positive":
                j = _imp_index(ex.example_id)
                pc[j], pv[j] = x, y
    return pc, pv


def metrics(truth, pc, pv, mask) -> dict[str, dict[str, float]]:
    out = {}
    for d in ["all", *sorted(set(truth["domain"].tolist()))]:
        m = mask & (truth["domain"] == d) if d != "all" else mask
        out[d] = {"auc_click": roc_auc(truth["click"][m], pc[m]), "auc_conv": roc_auc(truth["conversion"][m], pv[m]),
                  "ne_click": normalized_entropy(truth["click"][m], pc[m]),
                  "ne_conv": normalized_entropy(truth["conversion"][m], pv[m]), "n": float(m.sum())}
    return out


def _f(x: float) -> str:
    return f"{x:.4f}" if x == x else "nan"


def study_stationary(n: int, rows: list, res: dict, seed: int = 0) -> tuple[object, dict, list]:
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS["stationary"] + seed, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    second = truth["ts"] >= np.median(truth["ts"])
    model = metrics(truth, *run_stream(Learner(TC), exs, n, TC.batch_size), second)
    form = metrics(truth, *run_stream(FormFM(TC), exs, n, TC.batch_size), second)
    oracle = metrics(truth, truth["p_click"], truth["p_ctcvr"], second)
    for d in model:
        rows.append(("1 stationary", f"MDMO / generator's form / oracle [{d}]",
                     *(" / ".join(_f(m[d][k]) for m in (model, form, oracle)) for k in ("auc_click", "auc_conv",
                                                                                         "ne_click"))))
    res["stationary"] = {"model": model, "form": form, "oracle": oracle}
    return sim, truth, exs


def study_drift(n: int, scenario: str, rows: list, res: dict, seed: int = 0) -> None:
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS["drift"] + seed,
                                   scenario=ScenarioConfig(name=scenario, at=0.5),
                                   **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    after = truth["ts"] >= np.quantile(truth["ts"], 0.6)
    runs = {"online MDMO": run_stream(Learner(TC), exs, n, TC.batch_size),
            "frozen MDMO (trained on first 40%)": run_stream(Learner(TC), exs, n, TC.batch_size, freeze_at=0.4),
            "online LR": run_stream(OnlineLR(TC), exs, n, TC.batch_size)}
    res["drift"] = {"scenario": scenario}
    for name, (pc, pv) in runs.items():
        m = metrics(truth, pc, pv, after)["all"]
        res["drift"][name] = m
        rows.append((f"2 drift ({scenario})", name, _f(m["auc_click"]), _f(m["auc_conv"]), _f(m["ne_click"])))
    o = metrics(truth, truth["p_click"], truth["p_ctcvr"], after)["all"]
    res["drift"]["oracle"] = o
    rows.append((f"2 drift ({scenario})", "oracle", _f(o["auc_click"]), _f(o["auc_conv"]), _f(o["ne_click"])))


def study_delay(n: int, rows: list, res: dict, seed: int = 0) -> None:
    # 16 h of event time: conversions (up to 6 h after the click, ~half after 1 h) straddle the elapsed time
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS["delay"] + seed, impressions_per_s=n / (16 * 3600),
                                   **WORLD))
    truth = truth_arrays(sim)
    second = truth["ts"] >= np.median(truth["ts"])
    variants = {"oracle labels (no delay)": ("oracle", True), "ES-DFM (elapsed + weights)": ("elapsed", True),
                "elapsed + duplicates, unweighted": ("elapsed", False),
                "naive (fake negatives)": ("naive", True)}
    res["delay"] = {}
    for name, (policy, weighting) in variants.items():
        exs = example_stream(sim, policy, elapsed_s=ELAPSED_S)
        pc, pv = run_stream(Learner(TC, elapsed_s=ELAPSED_S, delay_weighting=weighting), exs, n, TC.batch_size)
        m = metrics(truth, pc, pv, second)["all"]
        res["delay"][name] = m
        rows.append(("3 delayed conversions", name, _f(m["auc_click"]), _f(m["auc_conv"]),
                     f"{_f(m['ne_conv'])} (conv)"))


def study_unified(sim, truth, exs, rows: list, res: dict) -> None:
    n = sim.truth.num_rows
    second = truth["ts"] >= np.median(truth["ts"])
    uni = res["stationary"]["model"]
    domains = sorted(set(truth["domain"].tolist()))
    pc, pv = np.full(n, np.nan), np.full(n, np.nan)
    sep_params = 0
    for d in domains:
        own = [e for e in exs if e.impression.domain == d]
        learner = Learner(TC)
        sep_params += sum(count_parameters(learner.model).values())
        a, b = run_stream(learner, own, n, TC.batch_size)
        mask = ~np.isnan(a)
        pc[mask], pv[mask] = a[mask], b[mask]
    sep = metrics(truth, pc, pv, second)
    uni_params = sum(count_parameters(Learner(TC).model).values())
    s_uni = sum(uni[d]["auc_click"] + uni[d]["auc_conv"] for d in domains)
    s_sep = sum(sep[d]["auc_click"] + sep[d]["auc_conv"] for d in domains)
    res["unified"] = {"sum_auc_unified": s_uni, "sum_auc_separate": s_sep, "params_unified": uni_params,
                      "params_separate": sep_params, "separate": sep}
    rows.append(("4 unified vs separate", f"unified: sum of {len(domains)}x(click+conv AUC), params",
                 f"{s_uni:.4f}", f"{uni_params:,}", ""))
    rows.append(("4 unified vs separate", f"{len(domains)} separate models: same", f"{s_sep:.4f}",
                 f"{sep_params:,}", ""))


class TasteFeatures:
    """The generator's hidden tastes in the ranker's user-model input ``[u, u * v_ad]`` (zero-padded to
    ``user_dim``), fed like :class:`trainer.users.features.UserWorker` (``view``, ``submit``, ``drain``).

    ``current``: ``u`` = the user's true taste at the impression, ``v_ad`` = the ad's (an upper bound);
    ``clicks``: ``u`` = the mean true taste of the last ``k`` ads the user clicked, from the batches trained
    so far (the best a model reading click histories could do, given perfect ad vectors)."""

    def __init__(self, sim, mode: str, dim: int, k: int = 20):
        from collections import defaultdict, deque

        self.user, self.ad = hidden_tastes(sim)
        self.mode, self.dim = mode, dim
        self.clicked = defaultdict(lambda: deque(maxlen=k))
        self.view = self

    def features_of(self, imps) -> np.ndarray:
        idx = np.array([_imp_index(i.event_id) for i in imps])
        v = self.ad[idx]
        if self.mode == "current":
            u = self.user[idx]
        else:
            u = np.zeros_like(v)
            for r, imp in enumerate(imps):
                if self.clicked[imp.user_id]:
                    u[r] = np.mean(self.clicked[imp.user_id], axis=0)
        out = np.zeros((len(imps), 2 * self.dim), np.float32)
        k = v.shape[1]
        out[:, :k], out[:, self.dim:self.dim + k] = u, u * v
        return out

    def submit(self, chunk) -> None:
        for ex in chunk:
            if ex.click and ex.decided != "late_positive":
                self.clicked[ex.impression.user_id].append(self.ad[_imp_index(ex.example_id)])

    def drain(self) -> None:
        pass


def study_users(n: int, rows: list, res: dict, seed: int = 0) -> None:
    """The ranker with the user model's vectors ``[u, u * v_ad]`` vs without, on ``interest-shift`` traffic
    (each user's taste jumps at their own moment: only recent engagements reveal the new one)."""
    from config import Config
    from trainer.users.features import user_worker

    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEEDS["users"] + seed,
                                   scenario=ScenarioConfig(name="interest-shift"),
                                   **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    second = truth["ts"] >= np.median(truth["ts"])
    worker = user_worker(Config(trainer=TC_USERS), train_duty=1.0)  # every batch: a deterministic run
    learner = Learner(TC_USERS)
    learner.user_view = worker.view
    try:
        runs = {"MDMO without user vectors": run_stream(Learner(TC), exs, n, TC.batch_size),
                "MDMO + [u, u*v_ad] of the user model": run_stream(learner, exs, n, TC.batch_size, users=worker),
                "reference: true tastes of the last 20 clicked ads": run_stream(
                    Learner(TC_USERS), exs, n, TC.batch_size, users=TasteFeatures(sim, "clicks", TC_USERS.user_dim)),
                "reference: the user's true current taste": run_stream(
                    Learner(TC_USERS), exs, n, TC.batch_size, users=TasteFeatures(sim, "current", TC_USERS.user_dim))}
    finally:
        worker.close()
    res["users"] = {}
    for name, (pc, pv) in runs.items():
        m = res["users"][name] = metrics(truth, pc, pv, second)["all"]
        rows.append(("5 user model (interest-shift)", name, _f(m["auc_click"]), _f(m["auc_conv"]), _f(m["ne_click"])))
    o = metrics(truth, truth["p_click"], truth["p_ctcvr"], second)["all"]
    rows.append(("5 user model (interest-shift)", "oracle", _f(o["auc_click"]), _f(o["auc_conv"]), _f(o["ne_click"])))


def domain_click_aucs(st: dict, who: str = "model") -> tuple[dict[str, float], dict[str, float]]:
    """Per-domain click AUC of ``who`` (``model`` or ``form``) and of the oracle, from ``res["stationary"]``."""
    doms = [d for d in st["model"] if d != "all"]
    return ({d: st[who][d]["auc_click"] for d in doms}, {d: st["oracle"][d]["auc_click"] for d in doms})


def gap_points(st: dict, who: str = "model") -> list[float]:
    """Per-domain click AUC gap of ``who`` to the oracle, in AUC points."""
    model, oracle = domain_click_aucs(st, who)
    return [100 * (oracle[d] - model[d]) for d in model]


def learning_curve(sizes: list[int], seed: int = 0) -> int:
    """Study 1 alone at growing stream lengths: how the per-domain click AUC gap to the oracle closes."""
    rows: list[tuple[str, ...]] = []
    gaps, form_gaps = {}, {}
    for n in sizes:
        res: dict = {}
        t0 = time.perf_counter()
        study_stationary(n, [], res, seed)
        model, oracle = domain_click_aucs(res["stationary"])
        gap, form_gap = gap_points(res["stationary"]), gap_points(res["stationary"], "form")
        gaps[n], form_gaps[n] = round(max(gap), 2), round(max(form_gap), 2)
        rows.append((f"{n:,}", f"{min(model.values()):.4f}-{max(model.values()):.4f}",
                     f"{min(oracle.values()):.4f}-{max(oracle.values()):.4f}",
                     f"{min(gap):.2f}-{max(gap):.2f}", f"{min(form_gap):.2f}-{max(form_gap):.2f}",
                     f"{time.perf_counter() - t0:.0f}"))
    last = sizes[-1]
    report("quality_curve", rows, ("impressions", "MDMO click AUC (per domain)", "oracle", "gap (points)",
                                   "generator's form: gap", "s"),
           value=gaps[last], unit="largest per-domain click AUC gap to the oracle (points)", baseline=1.0,
           gaps={str(k): v for k, v in gaps.items()}, form_gaps={str(k): v for k, v in form_gaps.items()}, seed=seed)
    return 0


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions of studies 2, 3 and 5 (default 120000, quick 30000)")
    p.add_argument("--n-stationary", type=int, default=None,
                   help="impressions of studies 1 and 4 (default 3000000, quick 30000)")
    p.add_argument("--drift", default="sudden", help="drift scenario of study 2 (streams.sources.scenarios)")
    p.add_argument("--curve", default=None, metavar="N,N,...",
                   help="only study 1, at these stream lengths (e.g. 300000,1000000,3000000: ~5 min, 5 GB)")
    p.add_argument("--seed", type=int, default=0,
                   help="added to every study's generator seed: other traffic from the same world (default 0: the "
                        "published numbers; seeds per study in SEEDS)")
    a = p.parse_args()
    if a.curve:
        return learning_curve([int(x) for x in a.curve.split(",")], a.seed)
    n = a.n or (30_000 if a.quick else 120_000)
    n_st = a.n_stationary or (30_000 if a.quick else 3_000_000)
    rows: list[tuple[str, ...]] = []
    res: dict = {}
    t0 = time.perf_counter()
    sim, truth, exs = study_stationary(n_st, rows, res, a.seed)
    study_drift(n, a.drift, rows, res, a.seed)
    study_delay(n, rows, res, a.seed)
    study_unified(sim, truth, exs, rows, res)
    study_users(n, rows, res, a.seed)
    print(f"{n_st} impressions in studies 1 and 4, {n} in 2 and 3, {WORLD['n_users']} users, "
          f"{WORLD['n_ads']} ads, batch {TC.batch_size}, progressive metrics on true labels; "
          f"{time.perf_counter() - t0:.0f} s")
    st = res["stationary"]
    model, oracle = domain_click_aucs(st)
    mean_model, mean_oracle = float(np.mean(list(model.values()))), float(np.mean(list(oracle.values())))
    dr, dl, un = res["drift"], res["delay"], res["unified"]
    report("quality", rows, ("study", "model", "AUC click", "AUC conv", "NE"), value=mean_model,
           unit="mean per-domain click AUC", baseline=mean_oracle,
           max_domain_gap_click=round(max(oracle[d] - model[d] for d in model), 4),
           max_domain_gap_click_form=round(max(gap_points(st, "form")) / 100, 4),
           drift_online=round(dr["online MDMO"]["auc_click"], 4),
           drift_frozen=round(dr["frozen MDMO (trained on first 40%)"]["auc_click"], 4),
           drift_lr=round(dr["online LR"]["auc_click"], 4),
           conv_auc_esdfm=round(dl["ES-DFM (elapsed + weights)"]["auc_conv"], 4),
           conv_auc_naive=round(dl["naive (fake negatives)"]["auc_conv"], 4),
           conv_auc_oracle=round(dl["oracle labels (no delay)"]["auc_conv"], 4),
           sum_auc_unified=round(un["sum_auc_unified"], 4), sum_auc_separate=round(un["sum_auc_separate"], 4),
           params_unified=un["params_unified"], params_separate=un["params_separate"],
           click_auc_with_user_model=round(res["users"]["MDMO + [u, u*v_ad] of the user model"]["auc_click"], 4),
           click_auc_without_user_model=round(res["users"]["MDMO without user vectors"]["auc_click"], 4),
           click_auc_true_taste=round(res["users"]["reference: the user's true current taste"]["auc_click"], 4), n=n,
           n_stationary=n_st, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
