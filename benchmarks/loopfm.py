"""LoopFM's lift, in-process: does a small VM predict its domain better with the FM's user/ad vectors as input?

One generated stream (streams.sources.generate, all domains), cut into chunks in event-time order. Per chunk:

1. the VM (small tables, its domain's examples only) scores its chunk's examples (progressive validation:
   before it learns from them) and trains on them; with LoopFM, its input holds the FM's vectors from the store
   as the FM published them *after the previous chunk* (the FM trails the stream by one chunk: it never saw
   the labels the VM is scored on);
2. the FM (larger tables, every domain) scores and trains on the whole chunk, then publishes the chunk's users
   and ads (:func:`trainer.loopfm.fm_embeddings`) into the VM's store (encoded and decoded as on the topic).

Reported per variant: the VM's click AUC on its domain (second half of the stream, after warm-up), and the FM's
on the same examples. ``lift_ratio`` = (VM + LoopFM - VM alone) / (FM - VM alone): the transfer ratio of the
issue's benchmark for LoopFM alone. ``run_lift`` is the piece ``bench transfer`` can call for its "+ LoopFM" row.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks import _common
from config import TrainerConfig
from embedding_store.fm_embeddings import FMEmbeddingStore
from streams import schema
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from trainer.loopfm import FMEmbeddingView, fm_embeddings, representation_dim
from trainer.model import Learner


def examples(n: int, seed: int = 0, n_users: int = 5_000, n_ads: int = 1_000) -> list[schema.Example]:
    sim = simulate(GeneratorConfig(n_impressions=n, seed=seed, n_users=n_users, n_ads=n_ads))
    clicks = {r.impression_id for r in sim.records if isinstance(r, schema.Click)}
    convs = {r.impression_id for r in sim.records if isinstance(r, schema.Conversion)}
    return [schema.Example(example_id=r.event_id, impression=r, click=int(r.event_id in clicks),
                           conversion=int(r.event_id in convs))
            for r in sim.records if isinstance(r, schema.Impression)]


def run_lift(stream: list[schema.Example], fm_tc: TrainerConfig, vm_tc: TrainerConfig, domains: tuple[str, ...],
             chunk: int = 2048, warmup: float = 0.5) -> dict[str, float]:
    """AUCs of the VM alone, the VM + LoopFM and the FM on ``domains``' examples after ``warmup`` of the stream."""
    fm = Learner(fm_tc)
    dim = representation_dim(fm_tc)
    vms = {"alone": Learner(vm_tc), "loopfm": Learner(TrainerConfig(**{
        **{f: getattr(vm_tc, f) for f in vm_tc.__struct_fields__}, "loopfm": True, "loopfm_dim": dim}))}
    store = FMEmbeddingStore(dim, max_age_s=3600)
    vms["loopfm"].loopfm_view = FMEmbeddingView(store)
    scores: dict[str, list[np.ndarray]] = {"alone": [], "loopfm": [], "fm": []}
    labels: list[np.ndarray] = []
    start = int(len(stream) * warmup)
    published = 0
    for s in range(0, len(stream), chunk):
        part = stream[s:s + chunk]
        mine = [e for e in part if e.impression.domain in domains]
        keep = s >= start
        if mine:
            for name, vm in vms.items():
                for b in range(0, len(mine), vm_tc.batch_size):
                    fb = featurize(mine[b:b + vm_tc.batch_size], vm.tcfg, None, vm.loopfm_view)
                    r = vm.train_step(fb)
                    if keep:
                        scores[name].append(r.p_click)
            if keep:
                labels.append(np.array([e.click for e in mine], np.float32))
        for b in range(0, len(part), fm_tc.batch_size):
            batch = part[b:b + fm_tc.batch_size]
            fb = featurize(batch, fm_tc)
            in_dom = np.array([e.impression.domain in domains for e in batch])
            r = fm.train_step(fb)
            if keep and in_dom.any():
                scores["fm"].append(r.p_click[in_dom])
            for rec in fm_embeddings(fm, [e.impression for e in batch]):
                store.apply_raw(schema.encode(rec))  # as the VM's consumer gets it
                published += len(rec.ids)
    y = np.concatenate(labels)
    out = {k: float(roc_auc_score(y, np.concatenate(v))) for k, v in scores.items()}
    gain = out["fm"] - out["alone"]
    out["lift_ratio"] = (out["loopfm"] - out["alone"]) / gain if gain > 0 else float("nan")
    out["examples"] = float(len(y))
    out["published_ids"] = float(published)
    out.update({k: v for k, v in store.stats().items() if k in ("loopfm_misses", "loopfm_lookups")})
    return out


def main() -> int:
    p = _common.parser("LoopFM lift: a small VM with and without the FM's user/ad vectors as input features")
    p.add_argument("--n", type=int, default=0, help="impressions (default 150k; --quick 60k)")
    p.add_argument("--domains", default="", help="the VMs' domains, comma-separated, one VM each "
                                                 "(default feed,stories; --quick feed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = args.n or (60_000 if args.quick else 150_000)
    domains = [d for d in (args.domains or ("feed" if args.quick else "feed,stories")).split(",") if d]
    common = {"device": "cpu", "backend": "torch", "user_model": False, "seed": 0}
    fm_tc = TrainerConfig(**common, embedding_dim=16, hash_buckets=50_000, batch_size=256)
    vm_tc = TrainerConfig(**common, embedding_dim=4, hash_buckets=2_000, batch_size=128)
    stream = examples(n, seed=args.seed)
    rows, res = [], []
    for dom in domains:
        with _common.timer() as t:
            r = run_lift(stream, fm_tc, vm_tc, (dom,))
        res.append(r)
        rows.append((dom, f"{r['examples']:.0f}", f"{r['alone']:.4f}", f"{r['loopfm']:.4f}", f"{r['fm']:.4f}",
                     f"{r['lift_ratio']:.2f}", f"{r['loopfm_misses'] / max(r['loopfm_lookups'], 1):.1%}",
                     f"{t['s']:.0f}"))
    _common.report("loopfm", rows, ("VM domain", "scored", "VM alone", "VM + LoopFM", "FM", "ratio", "miss", "s"),
                   value=float(np.mean([r["lift_ratio"] for r in res])), unit="transfer ratio", baseline=0.0,
                   n=n, seed=args.seed, vm_auc={d: round(r["alone"], 4) for d, r in zip(domains, res)},
                   vm_loopfm_auc={d: round(r["loopfm"], 4) for d, r in zip(domains, res)},
                   fm_auc={d: round(r["fm"], 4) for d, r in zip(domains, res)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
