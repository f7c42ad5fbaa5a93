"""The GPU check's own steps (scripts/gpu-check.sh; docs/gpu.md), each printing one JSON line; CPU-tested.

    python -m benchmarks._gpu fiited --device cuda     # FIITED on the device: runs, or today's refusal
    python -m benchmarks._gpu search --device cuda     # user-vector search on the device

``fiited``: builds the trainer's FIITED embeddings (``fiited_for_trainer``) on the device and runs one lookup and
update; today it refuses any device but the CPU (its pools are fbgemm host pools; issue 20's kernel work lifts
that): the refusal is reported as ``status: refused`` with its reason, not raised, so the script goes on.

``search``: ``--n`` unit user vectors (the FAISS bench's ``tower`` distribution) and ``--queries`` noisy copies;
FAISS-GPU (``faiss.StandardGpuResources``, an exact ``GpuIndexFlatIP``) when the installed faiss has it, else an
exact inner-product search written in torch on the device (``topk`` of ``Q @ V^T`` in blocks of 1024 queries). Recall@k
against numpy's exact answer on the first 256 queries; queries/s over all, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def fiited_check(device: torch.device) -> dict:
    from embedding_store.fiited import fiited_for_trainer

    try:
        emb = fiited_for_trainer(2, 1000, 16, 0.05, device)
    except ValueError as e:
        return {"bench": "gpu-fiited", "device": device.type, "status": "refused", "reason": str(e)}
    idx = torch.arange(8, dtype=torch.int64, device=device)
    off = torch.tensor([0, 2, 4, 6, 8], dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    out = emb(idx, off)
    out.sum().backward()
    emb.step()
    return {"bench": "gpu-fiited", "device": device.type, "status": "ran", "shape": list(out.shape),
            "seconds": round(time.perf_counter() - t0, 4)}


def user_search(device: torch.device, n: int = 1_000_000, dim: int = 64, queries: int = 10_000, k: int = 10,
                prefer_faiss_gpu: bool = True) -> dict:
    from benchmarks.faiss import jitter, tower

    rng = np.random.default_rng(0)
    if dim == 64:
        x = tower(n, rng)
    else:
        x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = jitter(x[rng.integers(0, n, queries)], 0.35, rng)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    engine = "torch-exact"
    search = None
    if prefer_faiss_gpu and device.type == "cuda":
        try:
            import faiss

            res = faiss.StandardGpuResources()
            gi = faiss.GpuIndexFlatIP(res, dim)
            gi.add(x)
            search = lambda qq: gi.search(qq, k)[1]
            engine = "faiss-gpu"
        except (ImportError, AttributeError, RuntimeError):
            search = None
    if search is None:
        v = torch.from_numpy(x).to(device)

        def search(qq: np.ndarray) -> np.ndarray:
            out = []
            for s in range(0, len(qq), 1024):  # 1024 x 1M scores: 4 GB on the card at a time
                qt = torch.from_numpy(qq[s:s + 1024]).to(device)
                out.append(torch.topk(qt @ v.T, k, dim=1).indices.cpu())
            return torch.cat(out).numpy()
    search(q[:64])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = search(q)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ref = []  # numpy's exact top k of the first 256 queries, 16 at a time (a 256 x 1M score matrix is 1 GB)
    for s in range(0, min(256, len(q)), 16):
        sc = q[s:s + 16] @ x.T
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        ref.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(sc, top, 1), axis=1), 1))
    ref = np.concatenate(ref)
    rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got[:256].tolist(), ref.tolist())]))
    return {"bench": "gpu-search", "device": device.type, "engine": engine, "n": n, "dim": dim, "k": k,
            "queries_per_s": round(queries / wall, 1), f"recall_at_{k}": round(rec, 4)}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._gpu", description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("fiited", "search"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=1_000_000, help="search: vectors")
    p.add_argument("--queries", type=int, default=10_000, help="search: queries")
    a = p.parse_args()
    dev = torch.device(a.device)
    r = fiited_check(dev) if a.step == "fiited" else user_search(dev, a.n, queries=a.queries)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
