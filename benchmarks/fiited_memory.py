"""FIITED embedding memory against fixed D=64 tables at matched quality (the memory-quality curve).

Two streams, each trained once with fixed-width fbgemm tables (baseline) and once per FIITED budget, same
model (trainer.model.Learner, embedding_dim 64), same batches, same seed:

* ``generated``: ``streams.sources.generate.simulate`` traffic (Zipf users/ads, categories, history);
* ``criteo``: a Criteo-format replay: synthetic Criteo-shaped rows (label, I1..I13, C1..C26 hex; the shared
  200-row sample is too small to train on) written as the Kaggle TSV and read by ``streams.sources.formats.criteo``;
  C1..C26 become 26 tables with Zipf vocabularies from 4 to 200k values and a hidden logistic truth.

Quality = progressive-validation AUC of p_click (scored before learning) over the second half of the stream.
Memory = embedding bytes, the peak over the run: fixed = ``T*R*(64+1)*4`` (weights + row-wise momentum);
FIITED = pool capacity (weights + momentum) + every byte of metadata (slot map, per-row arrays, admission
sketch, pool owner/free lists). Two baselines: the fixed hashed tables (``saved``), and *live rows* (``vs
live``): full-width D=64 rows for exactly the (table, slot) pairs the stream touched, what a dynamic table
with a collision-free id map would hold, plus that id map (:class:`SlotMap` sized for them). Most of the
saving against fixed tables is slots the stream never touches; ``vs live`` is what FIITED's narrowing and
admission earn. Last line: JSON with ``value`` = ``narrowing_saved`` = the largest ``vs live`` saving within
0.2% relative AUC loss against fixed D=64 (worst stream), ``fixed_saved`` = the old figure.

    streamrec bench fiited-memory [--quick] [--live-budgets 0.3,0.2] [--admit-hits 0,2]
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks._common import parser, report, timer
from embedding_store.admission import init_rows
from embedding_store.config import FiitedConfig
from embedding_store.fiited import FiitedEmbeddings
from embedding_store.slotmap import SlotMap
from streams import schema
from config import TrainerConfig
from streams.sources.formats import ReadOptions, Row, criteo
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from trainer.model import Learner

D = 64
MAX_LOSS = 0.002  # relative AUC loss allowed


def generated_examples(n: int, seed: int = 0) -> list[schema.Example]:
    sim = simulate(GeneratorConfig(n_impressions=n, seed=seed, n_users=20_000, n_ads=3_000))
    clicks = {r.impression_id for r in sim.records if isinstance(r, schema.Click)}
    convs = {r.impression_id for r in sim.records if isinstance(r, schema.Conversion)}
    return [schema.Example(example_id=r.event_id, impression=r, click=int(r.event_id in clicks),
                           conversion=int(r.event_id in convs))
            for r in sim.records if isinstance(r, schema.Impression)]


def write_criteo_like(path: Path, n: int, seed: int = 0) -> None:
    """Kaggle ``train.txt`` layout (tab-separated, no header) with a hidden logistic truth."""
    rng = np.random.default_rng(seed)
    vocab = np.geomspace(4, 200_000, criteo.N_CAT).astype(int)
    cats = np.stack([np.minimum(rng.zipf(1.15, n), v) for v in vocab], axis=1)  # (n, 26) values 1..v
    effects = [rng.normal(0, s, v + 1) for v, s in zip(vocab, np.linspace(0.6, 0.3, criteo.N_CAT))]
    dense = rng.poisson(rng.uniform(0.5, 20, criteo.N_DENSE), (n, criteo.N_DENSE))
    logit = -1.6 + sum(effects[f][cats[:, f]] for f in range(criteo.N_CAT)) * 0.6 + 0.05 * (dense[:, 0] - 5)
    label = rng.random(n) < 1 / (1 + np.exp(-logit))
    salts = rng.integers(1, 2**31, criteo.N_CAT)
    with open(path, "w") as f:
        for i in range(n):
            hexes = "\t".join(f"{(int(c) * 2654435761 + int(s)) & 0xFFFFFFFF:08x}" for c, s in zip(cats[i], salts))
            f.write(f"{int(label[i])}\t" + "\t".join(map(str, dense[i])) + "\t" + hexes + "\n")


def criteo_examples(n: int) -> list[schema.Example]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "train.txt")
        write_criteo_like(p, n)
        out = []
        for item in criteo.read(p, ReadOptions()):
            if isinstance(item, Row):
                imp, *fb = item.records
                out.append(schema.Example(example_id=imp.event_id, impression=imp, click=int(bool(fb)),
                                          conversion=0))
    return out


def touched(batches, t: int, rows: int) -> int:
    """Distinct (table, slot) pairs the stream looks up: the rows a dynamic (collision-free id map) table holds."""
    seen = []
    for fb in batches:
        b = (len(fb.offsets) - 1) // t
        bag = np.repeat(np.arange(len(fb.offsets) - 1), np.diff(fb.offsets))
        seen.append(np.unique((bag // b) * rows + fb.indices))
    return len(np.unique(np.concatenate(seen)))


def live_rows_bytes(n: int, universe: int) -> tuple[int, int]:
    """(rows, id map) bytes of a dynamic table holding ``n`` full-width D=64 rows (weights + row-wise momentum)
    and a slot -> row map: the same open-addressing map FIITED uses, at the smallest capacity that holds ``n``
    (no per-row bookkeeping charged: it never evicts)."""
    return n * (D + 1) * 4, SlotMap.bytes_for(n, universe)


def run_one(tc: TrainerConfig, batches, fcfg: FiitedConfig | None) -> dict:
    """One pass over ``batches``: {auc (second half), peak (embedding bytes), s, live (private rows / slots),
    dim (their mean width), meta (bookkeeping bytes at the end)}; ``fcfg=None``: fixed D=64 tables."""
    learner = Learner(tc)
    t = learner.model.num_tables
    fixed = t * tc.hash_buckets * (D + 1) * 4
    emb = None
    base = fcfg or FIITED
    if fcfg is None:  # the same initial row values as FIITED's admitted rows: only the memory policy differs
        w = np.concatenate([init_rows(np.arange(i * tc.hash_buckets, (i + 1) * tc.hash_buckets), D, D,
                                      base.init_range, base.seed) for i in range(t)])
        learner.model.emb.import_state({"weights": torch.from_numpy(w).view(t, tc.hash_buckets, D),
                                        "momentum": torch.zeros(t, tc.hash_buckets)})
    else:
        emb = FiitedEmbeddings(t, tc.hash_buckets, replace(fcfg, lr=tc.lr_sparse))
        learner.model.emb = emb  # dense optimizer never held the embedding parameters
    ys, ps, peak = [], [], 0.0 if emb else float(fixed)
    half = len(batches) // 2
    with timer() as tm:
        for i, fb in enumerate(batches):
            r = learner.train_step(fb)
            if i >= half:
                ys.append(fb.click)
                ps.append(r.p_click)
            if emb is not None:  # every step: admissions grow pools between maintenance passes
                peak = max(peak, emb.memory_report()["fiited_total_bytes"])
    out = {"auc": float(roc_auc_score(np.concatenate(ys), np.concatenate(ps))), "peak": peak, "s": tm["s"],
           "live": t * tc.hash_buckets, "dim": float(D), "meta": 0.0}
    if emb is not None:
        rep = emb.memory_report()
        n = np.array([rep[f"fiited_rows_d{d}"] for d in emb.dims])
        out.update(live=int(n.sum()), dim=float((n * emb.dims).sum() / max(n.sum(), 1)),
                   meta=rep["fiited_meta_bytes"])
    print(f"  {'fixed' if fcfg is None else _label(fcfg)} seed={tc.seed} auc={out['auc']:.4f} "
          f"peak={peak / 2**20:.2f} MiB live={out['live']} dim={out['dim']:.1f} in {tm['s']:.0f} s",
          file=sys.stderr, flush=True)
    return out


def _label(c: FiitedConfig) -> str:
    b = f"live {c.live_budget:g}" if c.live_budget else f"budget {c.budget:g}"
    return f"fiited {b} w{min(c.pool_dims())}-{c.dim} admit {c.admit_hits}"


def curve(name: str, examples, tc: TrainerConfig, points, rows: list, lean: bool = False) -> list[dict]:
    batches = [featurize(examples[i:i + tc.batch_size], tc) for i in range(0, len(examples), tc.batch_size)]
    base = run_one(tc, batches, None)
    auc0, mem0 = base["auc"], base["peak"]
    other = None if lean else run_one(TrainerConfig(**{**_fields(tc), "seed": tc.seed + 1}), batches, None)
    t = Learner(tc).model.num_tables
    n_live = touched(batches, t, tc.hash_buckets)
    live_w, live_map = live_rows_bytes(n_live, t * tc.hash_buckets)
    live_mem = live_w + live_map

    def row(label: str, r: dict) -> tuple:
        return (name, label, f"{r['peak'] / 2**20:.2f}", f"{100 * (1 - r['peak'] / mem0):.1f}%",
                "" if label.startswith("fixed") else f"{100 * (1 - r['peak'] / live_mem):.1f}%", f"{r['auc']:.4f}",
                f"{100 * (auc0 - r['auc']) / auc0:+.2f}%", f"{r['live']}", f"{r['dim']:.1f}",
                f"{r['meta'] / 2**20:.2f}", f"{r['s']:.0f}")

    live_row = {"peak": live_mem, "auc": auc0, "live": n_live, "dim": float(D), "meta": live_map, "s": 0.0}
    rows += [row("fixed D=64", base), *([row("fixed, other seed", other)] if other else []),
             row("live rows D=64 (+id map)", live_row)]
    out = []
    for c in points:
        r = run_one(tc, batches, c)
        rows.append(row(_label(c), r))
        out.append({"stream": name, "config": _label(c), "saved": 1 - r["peak"] / mem0,
                    "narrowing_saved": 1 - r["peak"] / live_mem, "auc_loss": (auc0 - r["auc"]) / auc0,
                    "mean_dim": r["dim"], "rows": r["live"]})
    out.append({"stream": name, "seed_noise": abs(auc0 - other["auc"]) / auc0 if other else -1.0, "touched": n_live,
                "live_rows_bytes": live_w, "live_map_bytes": live_map})
    return out


# The bench's FIITED settings: widths 4..64 (chunks of 4), maintenance every 20 steps, resize every 40.
FIITED = FiitedConfig(chunk_dim=4, num_chunks=16, pool_chunks=(1, 2, 4, 8, 16), maintain_every=20,
                      resize_every=40, admit_hits=0, ttl_steps=400, protect_quantile=0.8, headroom=0.1,
                      sketch_width=1 << 15)


def points(lives: tuple[float, ...], admits: tuple[int, ...]) -> list[FiitedConfig]:
    """The FIITED settings measured: a budget with room (the store's overhead over live rows), then budgets
    that follow the live rows (``live_budget``) for each ``admit_hits`` (0: a row at first sight; 2: one-hit
    ids keep sharing their table's row, candidates counted in the sketch)."""
    return [replace(FIITED, live_budget=b, admit_hits=a) for a in admits for b in lives]


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--live-budgets", type=_floats, default=None, metavar="B,B,...",
                   help="live_budget values to measure (default quick 0.5,0.3,0.2; full 0.5,0.4,0.3,0.25,0.2,0.15)")
    p.add_argument("--admit-hits", type=_floats, default=(0, 2), metavar="N,N",
                   help="admit_hits values to measure each budget with (default 0,2)")
    p.add_argument("--lean", action="store_true",
                   help="skip the fixed other-seed run and the budget-with-room point (a full run on a busy machine)")
    args = p.parse_args()
    logging.getLogger("fbgemm_gpu").setLevel(logging.ERROR)
    n_gen, n_cri = (12_000, 8_000) if args.quick else (100_000, 60_000)
    lives = args.live_budgets or ((0.5, 0.3, 0.2) if args.quick else (0.5, 0.4, 0.3, 0.25, 0.2, 0.15))
    pts_cfg = points(lives, tuple(int(a) for a in args.admit_hits))
    if not args.lean:
        pts_cfg.insert(0, replace(FIITED, budget=0.25))
    base = TrainerConfig(embedding_dim=D, batch_size=512, device="cpu", backend="fbgemm", seed=0, user_model=False)
    rows: list = []
    pts = curve("generated", generated_examples(n_gen), TrainerConfig(**{**_fields(base), "hash_buckets": 50_000}),
                pts_cfg, rows, args.lean)
    pts += curve("criteo", criteo_examples(n_cri),
                 TrainerConfig(**{**_fields(base), "hash_buckets": 50_000, "cat_slots": criteo.N_CAT,
                                  "history_len": 0, "dense_dim": criteo.N_DENSE}), pts_cfg, rows, args.lean)
    info = {p["stream"]: p for p in pts if "seed_noise" in p}
    pts = [p for p in pts if "seed_noise" not in p]
    ok = [p for p in pts if p["auc_loss"] <= MAX_LOSS]
    best = lambda key: {s: max((p[key] for p in ok if p["stream"] == s), default=0.0) for s in info}
    narrow, fixed_saved = best("narrowing_saved"), best("saved")
    value = min(narrow.values())
    print(f"AUC: progressive validation over the second half; memory: peak embedding bytes (pools + every byte "
          f"of metadata); saved = against fixed D=64 hashed tables, vs live = against full-width rows for the "
          f"ids the stream touched plus their id map; {'quick' if args.quick else 'full'} run, timings noisy")
    report("fiited_memory", rows, ("stream", "embeddings", "MiB", "saved", "vs live", "AUC", "AUC loss", "rows",
                                   "mean dim", "meta MiB", "s"),
           value=100 * value, unit="% memory saved against live full-width rows within 0.2% AUC loss",
           baseline=50.0, narrowing_saved=round(100 * value, 1),
           narrowing_per_stream={k: round(100 * v, 1) for k, v in narrow.items()},
           fixed_saved=round(100 * min(fixed_saved.values()), 1),
           fixed_per_stream={k: round(100 * v, 1) for k, v in fixed_saved.items()},
           seed_noise={k: round(100 * v["seed_noise"], 2) for k, v in info.items() if v["seed_noise"] >= 0},
           touched={k: v["touched"] for k, v in info.items()},
           curve=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()} for p in pts])
    return 0


def _fields(tc: TrainerConfig) -> dict:
    return {f: getattr(tc, f) for f in tc.__struct_fields__}


if __name__ == "__main__":
    sys.exit(main())
