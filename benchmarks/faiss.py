"""FAISS user-vector index: upserts/s, queries/s and recall@10 against exact search in the same run; and
freshness (event -> updated vector in the index) in the user-model service loop.

Data: N x 64 vectors from a mixture of N/250 Gaussian clusters (centres N(0, 1), noise N(0, 0.9^2) per
coordinate), like user vectors of a trained model, which cluster by taste. Uniformly random vectors
in 64 dimensions have no neighbourhood structure for an IVF index to exploit (their true neighbours
are barely nearer than anyone else) and would need nprobe close to nlist. Queries: perturbed members.

    streamrec bench faiss [--quick] [--n N] [--nlist L]
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks._common import parser, report, timer
from embedding_store.ann import AnnConfig, make_index, normalize

D, K = 64, 10


def data(n: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.normal(size=(max(n // 250, 1), D)).astype(np.float32)
    return c[rng.integers(0, len(c), n)] + rng.normal(0, 0.9, (n, D)).astype(np.float32)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(got, want)]))


def freshness(n_impressions: int) -> dict:
    """Run the user-model service over generated traffic; event arrival -> vector upserted."""
    import torch

    from streams import schema
    from streams.generate import GeneratorConfig, simulate
    from trainer.user_model import UserModelConfig
    from trainer.user_service import UserModelService, UserServiceConfig

    torch.set_num_threads(1)
    sim = simulate(GeneratorConfig(n_impressions=n_impressions, seed=3, n_users=2000))
    yc = sim.truth.column("click").to_numpy()
    imps = [r for r in sim.records if isinstance(r, schema.Impression)]
    exs = [schema.Example(example_id=i.event_id, impression=i, click=int(c), conversion=0) for i, c in zip(imps, yc)]
    svc = UserModelService(UserServiceConfig(model=UserModelConfig(dim=32), index=AnnConfig(dim=32, kind="exact"),
                                             refresh_every_s=0.25))
    t0 = time.perf_counter()
    for s in range(0, len(exs), 256):
        svc.process(exs[s:s + 256])
    svc.refresh()
    wall = time.perf_counter() - t0
    return {**svc.freshness_ms(), "examples_per_s": len(exs) / wall, "users": len(svc.index)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="vectors (default 1M; 100k with --quick)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(n))")
    args = p.parse_args()
    import faiss

    n = args.n or (100_000 if args.quick else 1_000_000)
    nlist = args.nlist or (256 if n <= 200_000 else 1024)
    rng = np.random.default_rng(0)
    x = data(n, rng)
    ids = rng.permutation(np.arange(1, n + 1) * 7919)  # sparse, unordered user ids
    rows: list[tuple[str, ...]] = []
    idx = make_index(AnnConfig(dim=D, kind="ivf", nlist=nlist, nprobe=8))
    with timer() as t:
        idx.train(x[rng.choice(n, min(n, 40 * nlist), replace=False)])
    rows.append(("ivf train (k-means, 40 x nlist sample)", f"{t['s']:.1f} s", ""))
    batch = 10_000
    with timer() as t:
        for s in range(0, n, batch):
            idx.upsert(ids[s:s + batch], x[s:s + batch], ts_ms=s)
    ins = n / t["s"]
    rows.append((f"ivf insert {n:,} new ids (batches of {batch:,})", f"{ins:,.0f} /s", ""))
    m = n // 5  # replace a fifth: remove through the hashtable direct map + add
    who = rng.choice(n, m, replace=False)
    x[who] += rng.normal(0, 0.3, (m, D)).astype(np.float32)
    with timer() as t:
        for s in range(0, m, batch):
            idx.upsert(ids[who[s:s + batch]], x[who[s:s + batch]], ts_ms=n + s)
    ups = m / t["s"]
    rows.append((f"ivf upsert {m:,} existing ids (replace)", f"{ups:,.0f} /s", ""))
    gone = rng.choice(n, n // 100, replace=False)
    with timer() as t:
        idx.delete(ids[gone])
    rows.append((f"ivf delete {len(gone):,} ids", f"{len(gone) / t['s']:,.0f} /s", ""))
    alive = np.setdiff1d(np.arange(n), gone)
    # exact search over the same live vectors: the baseline and the ground truth
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    exact.add_with_ids(normalize(x[alive]), ids[alive])
    nq = 20_000 if not args.quick else 10_000
    q = x[alive[rng.integers(0, len(alive), nq)]] + rng.normal(0, 0.5, (nq, D)).astype(np.float32)
    n_truth = 1000
    with timer() as t:
        _, truth = exact.search(normalize(q[:n_truth]), K)
    exact_qps = n_truth / t["s"]
    rows.append((f"exact IndexFlatIP search ({n_truth} queries)", f"{exact_qps:,.0f} q/s", "1.000"))
    best = None
    for nprobe in (2, 4, 8, 16, 32):
        idx._ivf.nprobe = nprobe
        idx.search(q[:100], K)  # warm
        with timer() as t:
            for s in range(0, nq, 1000):
                _, got = idx.search(q[s:s + 1000], K)
                if s == 0:
                    r = recall(got[:n_truth], truth)
        qps = nq / t["s"]
        rows.append((f"ivf search nprobe={nprobe} (batches of 1000)", f"{qps:,.0f} q/s", f"{r:.3f}"))
        if r >= 0.95 and (best is None or qps > best[1]):
            best = (nprobe, qps, r)
    fr = freshness(5_000 if args.quick else 20_000)
    rows.append(("service: examples/s (train + encode + upsert)", f"{fr['examples_per_s']:,.0f} /s", ""))
    rows.append(("service: freshness event->vector p50 / p99", f"{fr['p50']:.0f} / {fr['p99']:.0f} ms",
                 f"{fr['users']} users"))
    print(f"{n:,} x {D} vectors, nlist={nlist}, faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}; "
          f"2 shared cores: expect noise")
    nprobe, qps, r = best if best else (None, 0.0, 0.0)
    report("faiss", rows, ("step", "throughput", "recall@10"), value=qps, unit="queries/s at recall@10>=0.95",
           baseline=exact_qps, n=n, nlist=nlist, nprobe=nprobe, recall_at_10=round(r, 4),
           inserts_per_s=round(ins), upserts_per_s=round(ups), freshness_p50_ms=round(fr["p50"], 1),
           freshness_p99_ms=round(fr["p99"], 1))


if __name__ == "__main__":
    main()
