"""C2AL: per-cohort click NE with and without cohort-contrastive auxiliary heads, in-process.

One generated stream per seed (:func:`streams.sources.generate.simulate` with ``minority_share``: a share of
the users live in the minority countries and respond to ads through taste vectors of their own; labels without
delay via :mod:`benchmarks._simulated`), fed batch by batch in emission order to two unified models that differ
only in C2AL; every metric is *progressive* (each example scored before the model trains on it):

1. **baseline**: the MDMO model (trainer/model.py) as the ranker trains it;
2. the targets: :func:`trainer.cohorts.find_targets` on the baseline's progressive predictions of the warm-up
   (the first ``--warmup`` of the stream): the minority cohorts (1-10% of the traffic, one axis value each)
   where its NE is worst relative to its NE on all traffic; the top ``--targets``;
3. **C2AL**: the same model and seed with one auxiliary head per target (``trainer.c2al``, weight
   ``--weight``), trained on ``click * [in cohort]`` (trainer/cohorts.py).

Metrics on the second half of each stream: click NE and AUC overall, on the targeted cohorts together and on
each, and on every country and activity cohort. Headline ``value``: the relative click NE gain of C2AL on the
targeted cohorts together, ``100 * (NE_base - NE_c2al) / NE_base`` in percent, averaged over the seeds (the
paper's goal: >= 0.3%, with overall NE not worse: ``overall_gain_pct`` >= 0). The per-seed gains are in the JSON
(``gains_pct``) to judge the noise; ``--noise`` also trains the baseline from another initialisation (no
C2AL): the NE change that alone gives (``noise_pct``), the floor a C2AL gain must clear.

    streamrec bench cohorts [--quick] [--n 60000] [--seeds 3] [--weight 0.1] [--targets 2]
"""

from __future__ import annotations

import sys
import time

import msgspec
import numpy as np

from benchmarks._common import parser, report
from benchmarks._simulated import DOMAINS, FREQUENT_CLICKS, example_stream, impression_index, progressive, truth_arrays
from config import TrainerConfig
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, simulate
from trainer.cohorts import AXES, CohortTargets, axis_values, cohort_metrics, find_targets, pattern
from trainer.features import featurize
from trainer.model import Learner

BATCH = 256
WORLD = {"n_users": 3000, "n_ads": 300, "truth": FREQUENT_CLICKS, "domains": DOMAINS, "minority_share": 0.2,
         "minority_contrast": 1.0}
MODEL = TrainerConfig(batch_size=BATCH, device="cpu", user_model=False, hash_buckets=20_000, embedding_dim=16,
                      history_len=8, cat_slots=4)


def with_cohorts(tc: TrainerConfig, exs: list, n: int) -> tuple[np.ndarray, list[str]]:
    """(p_click per impression, cohort per impression) of a learner over the stream."""
    lr = Learner(tc)
    keys: list[str] = [""] * n

    def note(chunk, fb, _r) -> None:
        for e, k in zip(chunk, fb.cohort):
            keys[impression_index(e.example_id)] = k

    p = progressive(lr, exs, n, batch=BATCH, features=lambda chunk: featurize(chunk, tc, cohorts=lr.cohorts),
                    beside=note)
    return p, keys


def ne_auc(click: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    return normalized_entropy(click, p), roc_auc(click, p)


def run(seed: int, n: int, warmup: float, weight: float, n_targets: int, log, *, model: TrainerConfig = MODEL,
        min_clicks: int = 20, noise: bool = False) -> dict:
    """One stream: baseline, targets from its warm-up, C2AL; the metrics of both (see the module docstring)."""
    sim = simulate(GeneratorConfig(n_impressions=n, seed=100 + seed, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    click = truth["click"]
    tc = msgspec.structs.replace(model, seed=seed)
    t0 = time.perf_counter()
    base, keys = with_cohorts(tc, exs, n)
    log(f"  seed {seed}: baseline {time.perf_counter() - t0:.1f} s")
    order = np.argsort(truth["ts"], kind="stable")
    warm = np.zeros(n, bool)
    warm[order[:int(warmup * n)]] = True
    cands = find_targets([keys[i] for i in np.flatnonzero(warm)], click[warm], base[warm], top=n_targets,
                         min_clicks=min_clicks)
    if not cands:
        raise SystemExit(f"bench cohorts: no minority cohort with {min_clicks}+ clicks in the warm-up's "
                         f"{int(warmup * n)} impressions: give more (--n, --warmup)")
    targets = [c.pattern for c in cands]
    log(f"  seed {seed}: targets " + ", ".join(f"{c.pattern} (share {c.share:.3f}, NE x{c.rel_ne:.3f})"
                                                 for c in cands))
    t0 = time.perf_counter()
    c2al, _ = with_cohorts(msgspec.structs.replace(tc, c2al=True, c2al_cohorts=tuple(targets), c2al_weight=weight),
                          exs, n)
    log(f"  seed {seed}: C2AL {time.perf_counter() - t0:.1f} s")
    ev = truth["ts"] >= np.median(truth["ts"])
    ek = [keys[i] for i in np.flatnonzero(ev)]
    in_t = CohortTargets(targets).masks(ek).max(axis=1) > 0
    c, pb, pc = click[ev], base[ev], c2al[ev]
    res = {"targets": targets, "overall": (ne_auc(c, pb), ne_auc(c, pc)),
           "targeted": (ne_auc(c[in_t], pb[in_t]), ne_auc(c[in_t], pc[in_t])), "share_targeted": float(in_t.mean()),
           "oracle": {"overall": ne_auc(c, truth["p_click"][ev]),
                      "targeted": ne_auc(c[in_t], truth["p_click"][ev][in_t])}}
    pats = list(targets) + [pattern(a, v) for a in AXES[1:] for v in sorted(set(axis_values(ek, a).tolist()))
                            if pattern(a, v) not in targets]
    mb, mc = cohort_metrics(ek, c, pb, pats), cohort_metrics(ek, c, pc, pats)
    res["cohorts"] = {p_: (mb[p_], mc[p_]) for p_ in pats}
    if noise:  # the noise floor: the baseline again from another initialisation, no C2AL
        t0 = time.perf_counter()
        other, _ = with_cohorts(msgspec.structs.replace(tc, seed=seed + 1000), exs, n)
        log(f"  seed {seed}: baseline, other init {time.perf_counter() - t0:.1f} s")
        po = other[ev]
        res["noise"] = (ne_auc(c, po), ne_auc(c[in_t], po[in_t]))
    return res


def gain(b: float, c: float) -> float:
    return 100.0 * (b - c) / b


def table_rows(seed: int, r: dict) -> list[tuple[str, ...]]:
    """The table's rows of one :func:`run`: overall, targeted together, each cohort; with the noise floor's
    rows when it ran (the other initialisation's NE in the C2AL column)."""
    rows = []
    if "noise" in r:
        for name, base, (ne_o, auc_o) in (("overall: other init", r["overall"][0], r["noise"][0]),
                                          ("targeted: other init", r["targeted"][0], r["noise"][1])):
            rows.append((str(seed), name, "", f"{base[0]:.4f}", f"{ne_o:.4f}", f"{gain(base[0], ne_o):+.3f}",
                         f"{base[1]:.4f}", f"{auc_o:.4f}"))
    for name, ((nb, ab), (nc, ac)) in (("overall", r["overall"]), ("targeted together", r["targeted"])):
        rows.append((str(seed), name, "", f"{nb:.4f}", f"{nc:.4f}", f"{gain(nb, nc):+.3f}", f"{ab:.4f}",
                     f"{ac:.4f}"))
    for pat, (mb, mc) in r["cohorts"].items():
        tag = "target" if pat in r["targets"] else ""
        rows.append((str(seed), pat, tag, f"{mb['ne']:.4f}", f"{mc['ne']:.4f}", f"{gain(mb['ne'], mc['ne']):+.3f}",
                     f"{mb['auc']:.4f}", f"{mc['auc']:.4f}"))
    return rows


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions per seed (default 60000, quick 20000)")
    p.add_argument("--seeds", type=int, default=None, help="streams (default 3, quick 1)")
    p.add_argument("--weight", type=float, default=0.1, help="C2AL loss weight (trainer.c2al_weight, default 0.1)")
    p.add_argument("--targets", type=int, default=2, help="targeted cohorts found in the warm-up (default 2)")
    p.add_argument("--warmup", type=float, default=0.25, help="share of the stream the targets come from (0.25)")
    p.add_argument("--noise", action="store_true",
                   help="also train the baseline from another initialisation: how much NE moves without C2AL")
    a = p.parse_args()
    n = a.n or (20_000 if a.quick else 60_000)
    seeds = a.seeds or (1 if a.quick else 3)
    t0 = time.perf_counter()
    rows: list[tuple[str, ...]] = []
    runs = []
    for s in range(seeds):
        r = run(s, n, a.warmup, a.weight, a.targets, lambda m: print(m, file=sys.stderr, flush=True),
                noise=a.noise)
        runs.append(r)
        rows += table_rows(s, r)
    print(f"{n} impressions per seed, {seeds} seed(s), {WORLD['n_users']} users ({WORLD['minority_share']:.0%} in "
          f"minority countries, contrast {WORLD['minority_contrast']}), C2AL weight {a.weight}; progressive click "
          f"NE/AUC on the second half; {time.perf_counter() - t0:.0f} s")
    gains = [gain(r["targeted"][0][0], r["targeted"][1][0]) for r in runs]
    overall = [gain(r["overall"][0][0], r["overall"][1][0]) for r in runs]
    report("cohorts", rows, ("seed", "cohort", "", "NE base", "NE C2AL", "NE gain %", "AUC base", "AUC C2AL"),
           value=float(np.mean(gains)), unit="% relative click NE gain on the targeted cohorts",
           baseline=0.0, goal=0.3, gains_pct=[round(g, 3) for g in gains],
           overall_gain_pct=round(float(np.mean(overall)), 3), overall_gains_pct=[round(g, 3) for g in overall],
           targets=[r["targets"] for r in runs], share_targeted=[round(r["share_targeted"], 3) for r in runs],
           ne_base_targeted=[round(r["targeted"][0][0], 4) for r in runs],
           ne_oracle_targeted=[round(r["oracle"]["targeted"][0], 4) for r in runs],
           noise_pct=[round(gain(r["targeted"][0][0], r["noise"][1][0]), 3) for r in runs] if a.noise else None,
           weight=a.weight, n=n, seeds=seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
