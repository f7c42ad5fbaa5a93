"""Cold start: new-ad click AUC with semantic IDs and prefix n-grams against random hashing, in-process.

One generated stream on the ``new-ad-surge`` scenario (:mod:`streams.sources.scenarios`: at 50% of the run a
batch of new ads is born and takes half the traffic; regular ads are also born and retired throughout,
``ad_churn``), with each ad's creative content (:func:`streams.sources.generate.ad_content`: an embedding close
for ads the hidden world treats alike, plus noise). The same ranker (:class:`trainer.model.Learner`) is trained
progressively on the stream (each batch scored before it trains; labels without delay) once per ad id
parameterisation (``trainer.ad_id_features``):

* ``hash``: the raw ad id, randomly hashed (today's ranker);
* ``sid``: the ad's full semantic ID as its only id token (ads of one leaf cell share a row);
* ``sid_ngram``: the prefix n-gram tokens of the semantic ID (``(c1)``, ``(c1,c2)``, ``(c1,c2,c3)``) instead
  of the raw id;
* ``hash+sid_ngram``: the raw id and, in a table of its own, the prefix tokens.

Semantic IDs (:mod:`embedding_store.semantic_ids`): the codebook is fitted on the contents of the ads alive at
the start; every ad born later is coded at its birth, from its content alone, before its first impression
(as the trainer does with ``AdCreative`` records); the codebook refreshes itself when the catalogue has grown
by half (codes kept stable), which the surge does not reach in the default sizes.

Metrics, progressive click AUC on the impressions of

* **new ads**: the ad is younger than ``--young`` (1 h of event time) since its birth *and* has had fewer than
  ``--max-imps`` impressions before this one (ads born during the run only);
* **warm ads**: the ad is alive from the start or older than ``--young``, and has had at least ``--max-imps``
  impressions before this one;
* **all**, and the oracle (the true probabilities) on each subset.

The stream spans about 4 hours of event time (the rate is set from ``--n``) so that "younger than one hour"
is a minority of the traffic. Last line: ``value`` = new-ad click AUC lift of ``sid_ngram`` over ``hash`` in
AUC points (issue 18's goal: >= 2), ``baseline`` = hash's new-ad AUC; ``warm_delta`` = the same lift on warm
ads (goal: no worse, within noise).

    streamrec bench coldstart [--quick] [--n 120000] [--seed 0] [--content-noise 0.5] [--max-imps 50]
"""

from __future__ import annotations

import sys
import time

import msgspec
import numpy as np

from benchmarks._common import parser, report
from benchmarks._simulated import example_stream, truth_arrays
from config import TrainerConfig
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, TruthParams, ad_content, simulate
from streams.sources.scenarios import ScenarioConfig
from trainer.features import featurize
from trainer.model import Learner

BATCH = 256
SPAN_S = 4 * 3600.0  # event time the stream spans
VARIANTS = ("hash", "sid", "sid_ngram", "hash+sid_ngram")
# frequent clicks (as in bench transfer) so that a minute of training learns something; ads differ in quality
# as real ads do (ad_bias_std 0.8: the middle 95% of ads' CTRs a factor ~20 apart at equal targeting)
TRUTH = TruthParams(base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25},
                    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25}, ad_bias_std=0.8)
MODEL = TrainerConfig(batch_size=BATCH, device="cpu", backend="torch", user_model=False, hash_buckets=20_000,
                      embedding_dim=8, history_len=4, cat_slots=2, sid_levels=3, sid_codes=16)


def world(n: int, seed: int, content_noise: float, n_ads: int) -> GeneratorConfig:
    return GeneratorConfig(n_impressions=n, seed=seed, n_users=3000, n_ads=n_ads, truth=TRUTH,
                           impressions_per_s=n / SPAN_S, content_noise=content_noise,
                           scenario=ScenarioConfig(name="new-ad-surge", at=0.5, surge_ads=0.2))


def masks(truth: dict, ad: np.ndarray, birth_ts: np.ndarray, young_s: float, max_imps: int) -> dict[str, np.ndarray]:
    """Subsets of the impressions (truth order = event-time order): new, warm, all."""
    ts = truth["ts"]
    order = np.argsort(ts, kind="stable")
    seen = np.empty(len(ts), np.int64)  # impressions of the same ad before this one
    counts: dict[int, int] = {}
    for i in order.tolist():
        a = int(ad[i])
        seen[i] = counts.get(a, 0)
        counts[a] = seen[i] + 1
    born = birth_ts[ad - 1]
    age_s = (ts - born) / 1000.0
    start = born <= ts.min()
    new = ~start & (age_s < young_s) & (seen < max_imps)
    warm = (start | (age_s >= young_s)) & (seen >= max_imps)
    return {"new ads": new, "warm ads": warm, "all": np.ones(len(ts), bool)}


def train(variant: str, exs: list, content, n: int, log) -> tuple[np.ndarray, dict]:
    """Progressive p_click per impression of one variant; the semantic-id stats."""
    tc = msgspec.structs.replace(MODEL, ad_id_features=variant)
    lr = Learner(tc)
    sids = lr.semantic_ids
    pending = np.argsort(content.birth_ts, kind="stable")  # ads by birth time: each coded at its birth
    nxt = 0
    out = np.full(n, np.nan)
    t0 = time.perf_counter()
    for i in range(0, len(exs), BATCH):
        chunk = exs[i:i + BATCH]
        if sids is not None:  # creatives born by the end of this batch arrive before it is trained
            upto = int(np.searchsorted(content.birth_ts[pending], max(e.impression.ts for e in chunk), "right"))
            if upto > nxt:
                born = pending[nxt:upto]
                sids.add(content.ad_ids[born], content.content[born])
                if not sids.fitted:  # the first codebook: the catalogue alive at the start
                    sids.fit()
                nxt = upto
        r = lr.train_step(featurize(chunk, tc, sids=sids))
        out[[int(e.example_id.rsplit("-", 1)[1]) for e in chunk]] = r.p_click
    log(f"  {variant}: {time.perf_counter() - t0:.1f} s")
    st = dict(sids.stats, version=sids.version, ads=len(sids)) if sids is not None else {}
    return out, st


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions (default 120000, quick 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ads", type=int, default=1000, help="regular ads in the catalogue (default 1000; the surge "
                                                         "adds a fifth as many)")
    p.add_argument("--content-noise", type=float, default=GeneratorConfig().content_noise,
                   help="noise of the creative embeddings relative to their signal (default %(default)s)")
    p.add_argument("--young", type=float, default=3600.0, help="new ads: younger than this many s (default 3600)")
    p.add_argument("--max-imps", type=int, default=50, help="new ads: fewer impressions than this (default 50)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    if "hash" not in variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: a comma-separated subset of {', '.join(VARIANTS)} including hash")
    n = a.n or (20_000 if a.quick else 120_000)
    t0 = time.perf_counter()
    sim = simulate(world(n, 31 + a.seed, a.content_noise, a.ads))
    content = ad_content(sim)
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    ad = sim.truth.column("ad_id").to_numpy()
    m = masks(truth, ad, content.birth_ts, a.young, a.max_imps)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    log(f"  stream of {n} impressions and {len(content.ad_ids)} ads' content: {time.perf_counter() - t0:.1f} s")
    preds = {"oracle": truth["p_click"]}
    stats = {}
    for v in variants:
        preds[v], stats[v] = train(v, exs, content, n, log)
    rows = []
    res: dict[str, dict[str, float]] = {}
    for v, pr in preds.items():
        res[v] = {}
        for sub, mk in m.items():
            auc = roc_auc(truth["click"][mk], pr[mk])
            res[v][sub] = auc
            d = "" if v == "oracle" else f"{100 * (auc - res.get('hash', {}).get(sub, auc)):+.2f}"
            rows.append((v, sub, str(int(mk.sum())), f"{auc:.4f}", d if v != "hash" else "",
                         f"{normalized_entropy(truth['click'][mk], pr[mk]):.4f}"))
    best = "sid_ngram" if "sid_ngram" in res else variants[-1]
    value = 100 * (res[best]["new ads"] - res["hash"]["new ads"])
    warm = 100 * (res[best]["warm ads"] - res["hash"]["warm ads"])
    s = stats.get(best, {})
    print(f"{n} impressions over {SPAN_S / 3600:.0f} h of event time, {len(content.ad_ids)} ads "
          f"({int(content.surge.sum())} born in the surge at 50%), new ads: younger than {a.young:.0f} s and fewer "
          f"than {a.max_imps} impressions; semantic ids {MODEL.sid_levels} x {MODEL.sid_codes}, content noise "
          f"{a.content_noise}; progressive click AUC; {time.perf_counter() - t0:.0f} s")
    report("coldstart", rows, ("ad ids", "impressions of", "n", "AUC click", "vs hash (pts)", "NE click"),
           value=value, unit="new-ad click AUC lift over hashing (points)", baseline=round(res["hash"]["new ads"], 4),
           goal=2.0, variant=best, warm_delta=round(warm, 2),
           new_auc={v: round(r["new ads"], 4) for v, r in res.items()},
           warm_auc={v: round(r["warm ads"], 4) for v, r in res.items()},
           hash_plus_ngram_new_delta=(round(100 * (res["hash+sid_ngram"]["new ads"] - res["hash"]["new ads"]), 2)
                                      if "hash+sid_ngram" in res else None),
           new_impressions=int(m["new ads"].sum()), warm_impressions=int(m["warm ads"].sum()),
           sid_coded_at_birth=s.get("coded_at_birth"), sid_refreshes=s.get("refreshes"), n=n, seed=a.seed,
           content_noise=a.content_noise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
