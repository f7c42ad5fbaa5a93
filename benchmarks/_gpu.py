"""The GPU check's own steps (scripts/gpu-check.sh; docs/gpu.md), each printing one JSON line; CPU-tested.

    python -m benchmarks._gpu fiited --device cuda     # FIITED on the device (the torch kernel path)
    python -m benchmarks._gpu search --device cuda     # user-vector search on the device

``fiited``: the trainer's FIITED embeddings (``fiited_for_trainer``) with pools on the device (kernel ``auto``:
torch ops on CUDA) and a CPU twin (the C++ kernel when it builds), rows placed in every width pool; a few training
steps of the same batches (duplicates, empty bags, shared rows) on both must agree (``max_out_diff``,
``max_row_diff``; ``status: ran`` only when within 1e-4), then ``examples_per_s`` of lookup + update on the
device against the trainer's fixed-width ``torch`` backend (``TorchEmbeddings``, full width) on the same device
and batches (``fixed_examples_per_s``, ``ratio``). A store that cannot be built on the device is reported as ``status: refused`` with its reason, not
raised, so the script goes on.

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


def _fiited_batches(rng, n: int, t: int, rows: int, b: int, hot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bags of 0-3 ids (empty bags included), ids Zipf-ish below ``hot`` (duplicates in a batch)."""
    out = []
    for _ in range(n):
        lengths = rng.integers(0, 4, t * b)
        idx = np.minimum(rng.zipf(1.3, int(lengths.sum())) - 1, hot - 1) % rows
        out.append((torch.from_numpy(idx.astype(np.int64)),
                    torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))))
    return out


def fiited_check(device: torch.device, kernel: str = "auto", tables: int = 4, rows: int = 5000, batch: int = 512,
                 steps: int = 30) -> dict:
    from embedding_store.fiited import fiited_for_trainer

    over = {"kernel": kernel, "budget": 1.0, "admit_hits": 10**6, "maintain_every": 10**6, "resize_every": 10**6}
    try:
        emb = fiited_for_trainer(tables, rows, 32, 0.05, device, over)
    except (ValueError, RuntimeError) as e:
        return {"bench": "gpu-fiited", "device": device.type, "status": "refused", "reason": str(e)}
    twin = fiited_for_trainer(tables, rows, 32, 0.05, torch.device("cpu"), {**over, "kernel": "auto"})
    rng = np.random.default_rng(0)
    placed = rng.permutation(tables * rows)[: tables * rows * 3 // 4]  # the rest stay on the shared rows
    pools = rng.integers(0, len(emb.dims), len(placed))
    for s in (emb, twin):
        s.place(placed, pools)
    gen = torch.Generator().manual_seed(0)
    out_diff = 0.0
    for idx, off in _fiited_batches(rng, 4, tables, rows, 64, hot=200):
        g = torch.randn(64, tables * emb.dim, generator=gen)
        a, b = emb(idx.to(device), off.to(device)), twin(idx, off)
        out_diff = max(out_diff, float((a.detach().cpu() - b.detach()).abs().max()))
        (a * g.to(device)).sum().backward()
        (b * g).sum().backward()
        emb.step()
        twin.step()
    every = np.arange(tables * rows)
    row_diff = float((emb.vectors(every) - twin.vectors(every)).abs().max())
    from trainer.embeddings import TorchEmbeddings

    batches = [(i.to(device), o.to(device)) for i, o in _fiited_batches(rng, steps, tables, rows, batch, rows)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(e) -> float:
        for i, o in batches[:3]:  # warm-up
            e(i, o).sum().backward()
            e.step()
        sync()
        t0 = time.perf_counter()
        for i, o in batches:
            e(i, o).sum().backward()
            e.step()
        sync()
        return steps * batch / (time.perf_counter() - t0)

    eps, fixed = timed(emb), timed(TorchEmbeddings(tables, rows, emb.dim, 0.05, device))
    ok = out_diff < 1e-4 and row_diff < 1e-4
    return {"bench": "gpu-fiited", "device": device.type, "status": "ran" if ok else "mismatch",
            "kernel": emb.kernel, "twin_kernel": twin.kernel, "max_out_diff": out_diff, "max_row_diff": row_diff,
            "examples_per_s": round(eps, 1), "fixed_examples_per_s": round(fixed, 1), "ratio": round(eps / fixed, 3),
            "tables": tables, "batch": batch}


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
    p.add_argument("--kernel", default="auto", help="fiited: the store's kernel (auto: torch on CUDA)")
    p.add_argument("--n", type=int, default=1_000_000, help="search: vectors")
    p.add_argument("--queries", type=int, default=10_000, help="search: queries")
    a = p.parse_args()
    dev = torch.device(a.device)
    r = fiited_check(dev, a.kernel) if a.step == "fiited" else user_search(dev, a.n, queries=a.queries)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
