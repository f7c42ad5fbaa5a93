"""The trainer across ranks: 1 rank against 2 on this machine, and a cost model extrapolated to 8 GPUs and 4 hosts.

Each rank is a spawned process with ONE torch thread and gloo over localhost, running what a rank of
``streamrec train --nproc N`` runs per step (trainer/distributed.py): featurize its share of the global batch,
forward and backward through the model with row-wise sharded embedding tables (trainer/sharded.py: all-gather
of sizes, all-to-all of ids, of partial pooled sums, all-gather of their gradients with, at 2 ranks, the dense
gradients; with more ranks an all-reduce of the dense gradients), the optimizers. The "a2a ms" column is the
wall time in the exchange's collectives (the dense gradients' share included at 2 ranks), "allreduce ms" a
separate dense all-reduce's.
The baseline is one process of the ordinary trainer step (trainer/model.py, torch backend: the same row-wise
Adagrad kernel as a shard) with the whole batch, on one thread. The same global batch for both: scaling
efficiency = examples/s of W ranks / (W x examples/s of one process). The examples come from the simulator, split
between the ranks by user (the examples topic's key), read from memory (no broker: the broker's share is
measured by `streamrec bench trainer`).

Cost model of one step of W ranks, global batch B (b = B/W per rank), T tables of D floats, L ids per bag on
average, P dense parameters (all per rank; gloo/NCCL links as latency alpha + bytes/beta)::

    t(W) = c * b                                   compute (featurize, forward, backward, optimizers)
         + 2 (W-1)/W * 4P / beta_ar [+ 2 (W-1) alpha]  ring all-reduce of the dense gradients (at W = 2 they
                                                   ride in the gradients' all-gather: same bytes, no alpha)
         + [(W-1)/W * b*T*(L+1)*8                  ids and bag lengths to their owners (input dist)
            + 2 (W-1) * b*T*D*4] / beta_a2a          partial pooled sums out, their gradients back
         + 4 alpha (W-1)                           the step's 4 collectives: all-gather of sizes, all-to-all
                                                   of ids, all-to-all of pooled sums, all-gather of gradients

``c`` is calibrated on the one-process run; alpha and beta on this machine's gloo (micro-measured in the
2-rank run); the model's 2-rank step is printed beside the measured one. Extrapolation (not measured: no GPU
here), assumptions stated in the output: a GPU does ``--gpu-speedup`` times the examples/s of one CPU thread of
this model; 8 GPUs on one host talk over NVLink (alpha 10 us, 350 GB/s all-reduce bus and all-to-all
bandwidth per GPU); 4 hosts of 8 GPUs over 400 Gb/s per GPU (alpha 20 us, 45 GB/s); per-GPU batch 4096 (weak
scaling: the global batch grows with the GPUs). The pooled exchange of row-wise sharding grows with W per rank
(every owner sends a partial sum for every bag), so it is what bounds first across hosts: see docs/trainer.md.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time

import numpy as np
import torch

from benchmarks._common import parser, report
from benchmarks._simulated import example_stream
from config import TrainerConfig
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from trainer.model import Learner
from trainer.sharded import FUSE_DENSE_MAX_WORLD

TCFG = dict(user_model=False, backend="torch", device="cpu", hash_buckets=50_000)
WARMUP = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, chunks: list, tcfg: TrainerConfig, q) -> None:
    """One rank (world 0: the one-process baseline without torch.distributed): time its steps."""
    torch.set_num_threads(1)
    from trainer import sharded
    micro = {}
    if not world:
        learner = Learner(tcfg, elapsed_s=0)
    if world:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        with sharded.sharded_tables():
            learner = Learner(tcfg, elapsed_s=0)
        sync = sharded.shard_learner(learner)
        # gloo on this machine: latency (tiny all-reduce) and bandwidth (4 MB all-reduce, all-to-all)
        small, big = torch.zeros(1), torch.zeros(1 << 20)
        for name, fn, t in (("ar_small", dist.all_reduce, small), ("ar_big", dist.all_reduce, big),
                            ("a2a_big", lambda x: dist.all_to_all_single(torch.empty_like(x), x), big)):
            fn(t)
            reps = 30 if t is small else 5
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(t)
            micro[name] = (time.perf_counter() - t0) / reps
    times, cpu = [], []
    for i, exs in enumerate(chunks):
        if world:
            total = len(exs) * world  # equal shares (the bench splits evenly)
            learner.model.emb.share = sync.share = len(exs) / total
        if i == WARMUP:
            for k in sharded.COMM:
                sharded.COMM[k] = 0 * sharded.COMM[k]
        t0, c0 = time.perf_counter(), time.process_time()
        learner.train_step(featurize(exs, tcfg, None, None))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    q.put((rank, times[WARMUP:], dict(sharded.COMM), micro,
           sum(p.numel() for p in learner.dense_params), learner.model.num_tables, cpu[WARMUP:]))
    if world:
        dist.destroy_process_group()


def run(world: int, per_rank: list[list], tcfg: TrainerConfig) -> dict:
    ctx, port = mp.get_context("spawn"), _free_port()  # fork after torch threads ran can deadlock the child
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, per_rank[r], tcfg, q)) for r in range(max(world, 1))]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=600) for _ in procs), key=lambda x: x[0])
    for p in procs:
        p.join(60)
    # a step ends when its slowest rank ends: the step time is the max over ranks
    steps = np.max(np.array([r[1] for r in res]), axis=0)
    comm = {k: float(np.mean([r[2][k] for r in res])) / len(steps) for k in res[0][2]}
    cpu = np.max(np.array([r[6] for r in res]), axis=0)
    return {"step_s": float(np.mean(steps)), "cpu_s": float(np.mean(cpu)), "comm": comm, "micro": res[0][3], "dense_params": res[0][4],
            "tables": res[0][5]}


def model_step(w: int, b: int, *, c: float, alpha: float, beta_ar: float, beta_a2a: float, p: int, t: int, d: int,
               ids_per_bag: float) -> dict[str, float]:
    """The cost model (module docstring): seconds per step of each part, for w ranks of b examples each."""
    comp = c * b
    fused = w <= FUSE_DENSE_MAX_WORLD  # the dense gradients in the gradients' all-gather (trainer/sharded.py)
    ar = 0.0 if w == 1 else 2 * (w - 1) / w * 4 * p / beta_ar + (0 if fused else 2 * (w - 1) * alpha)
    a2a_bytes = (w - 1) / w * b * t * (ids_per_bag + 1) * 8 + 2 * (w - 1) * b * t * d * 4
    a2a = 0.0 if w == 1 else a2a_bytes / beta_a2a + 4 * alpha * (w - 1)
    return {"compute": comp, "allreduce": ar, "alltoall": a2a, "total": comp + ar + a2a}


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions simulated (default 60000, quick 20000)")
    p.add_argument("--batch", type=int, default=None, help="global batch per step (default 4096, quick 2048)")
    p.add_argument("--gpu-speedup", type=float, default=50.0,
                   help="ASSUMED examples/s of one GPU over one CPU thread, for the extrapolation (default 50)")
    a = p.parse_args()
    n = a.n or (20_000 if a.quick else 60_000)
    batch = a.batch or (2048 if a.quick else 4096)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    sim = simulate(GeneratorConfig(n_impressions=n, seed=3))
    exs = example_stream(sim, "oracle", elapsed_s=0)
    tcfg = TrainerConfig(batch_size=batch, **TCFG)
    by_rank = [[e for e in exs if e.impression.user_id % 2 == r] for r in range(2)]
    steps = min(len(by_rank[0]), len(by_rank[1])) // (batch // 2)
    if steps <= WARMUP + 1:
        raise SystemExit(f"streamrec bench scale: {n} impressions give {steps} steps of {batch}; raise --n")
    halves = [[rk[i * (batch // 2):(i + 1) * (batch // 2)] for i in range(steps)] for rk in by_rank]
    whole = [halves[0][i] + halves[1][i] for i in range(steps)]  # the same examples, one process
    log(f"{len(exs)} examples, {steps} steps of {batch}; 1 process ...")
    one = run(0, [whole], tcfg)
    log("2 ranks ...")
    two = run(2, halves, tcfg)
    eps1, eps2 = batch / one["step_s"], batch / two["step_s"]
    eff = eps2 / (2 * eps1)
    # the same from CPU seconds per step (slowest rank): what the ranks would do with a core each, on a machine
    # whose cores other work shares (the wall figures then measure the sharing, too)
    eff_cpu = one["cpu_s"] / (2 * two["cpu_s"])
    load = os.getloadavg()[0]
    # calibration
    c = one["cpu_s"] / batch  # CPU seconds: the compute of one thread, without the time other work took
    mi = two["micro"]
    alpha = mi["ar_small"]
    beta_ar = 4 * (1 << 20) / max(mi["ar_big"] - alpha, 1e-9)
    beta_a2a = 4 * (1 << 20) / 2 / max(mi["a2a_big"] - alpha, 1e-9)  # half the tensor goes to the other rank
    fb = featurize(whole[0], tcfg, None, None)
    ids_per_bag = len(fb.indices) / (fb.batch_size * one["tables"])
    shape = dict(p=one["dense_params"], t=one["tables"], d=tcfg.embedding_dim, ids_per_bag=ids_per_bag)
    here = model_step(2, batch // 2, c=c, alpha=alpha, beta_ar=beta_ar, beta_a2a=beta_a2a, **shape)
    cm = two["comm"]
    # what the model leaves out: CPU per step of a rank beyond its compute share and gloo's transfer time (the
    # exchange's bookkeeping, each collective's fixed cost in gloo)
    overhead = max(0.0, two["cpu_s"] - c * batch / 2)
    rows = [("1 process, whole batch", "1", f"{1e3 * one['step_s']:.1f}", f"{1e3 * one['cpu_s']:.1f}", "", "",
             f"{eps1:,.0f}", "1.000"),
            ("2 ranks, half each", "2", f"{1e3 * two['step_s']:.1f}", f"{1e3 * two['cpu_s']:.1f}",
             f"{1e3 * cm['a2a_s']:.1f}", f"{1e3 * cm['allreduce_s']:.1f}", f"{eps2:,.0f}", f"{eff:.3f}"),
            ("  the same in CPU seconds per step", "2", "", "", "", "", f"{batch / two['cpu_s']:,.0f}",
             f"{eff_cpu:.3f}"),
            ("  cost model, 2 ranks here", "2", f"{1e3 * here['total']:.1f}", "", f"{1e3 * here['alltoall']:.1f}",
             f"{1e3 * here['allreduce']:.1f}", f"{batch / here['total']:,.0f}",
             f"{c * batch / (2 * here['total']):.3f}")]
    # extrapolation (assumptions in the module docstring and printed below)
    c_gpu = c / a.gpu_speedup
    per_gpu = 4096
    hosts = {"8 GPUs, 1 host (NVLink)": (8, 10e-6, 350e9, 350e9), "32 GPUs, 4 hosts x 8 (400 Gb/s per GPU)":
             (32, 20e-6, 45e9, 45e9)}
    base = model_step(1, per_gpu, c=c_gpu, alpha=0, beta_ar=1, beta_a2a=1, **shape)["total"]
    extra = {}
    for name, (w, al, bar, ba2a) in hosts.items():
        m = model_step(w, per_gpu, c=c_gpu, alpha=al, beta_ar=bar, beta_a2a=ba2a, **shape)
        e = base / m["total"]
        bound = "communication" if m["alltoall"] + m["allreduce"] > m["compute"] else "compute"
        rows.append((f"  model: {name}", str(w), f"{1e3 * m['total']:.3f}", "", f"{1e3 * m['alltoall']:.3f}",
                     f"{1e3 * m['allreduce']:.3f}", f"{w * per_gpu / m['total']:,.0f}", f"{e:.3f}"))
        extra[f"efficiency_{w}"] = round(e, 3)
        extra[f"bound_{w}"] = bound
    print(f"{len(exs)} examples, global batch {batch} ({steps - WARMUP} timed steps), one torch thread per rank, "
          f"gloo over localhost; {time.perf_counter() - t_start:.0f} s; load average {load:.1f} on "
          f"{os.cpu_count()} cores (above the ranks' 2: the wall figures include waiting for a core)")
    print(f"calibrated: compute {1e6 * c:.1f} us/example (one thread); gloo alpha {1e6 * alpha:.0f} us, all-reduce "
          f"{beta_ar / 1e9:.2f} GB/s, all-to-all {beta_a2a / 1e9:.2f} GB/s; model: {shape['p']:,} dense params, "
          f"{shape['t']} tables x {tcfg.embedding_dim}, {ids_per_bag:.2f} ids per bag; a rank's CPU per step beyond "
          f"its compute share: {1e3 * overhead:.1f} ms (the exchange's bookkeeping, pooling and summing every rank's bags, "
          "and gloo's CPU per collective, 4 per step: not in the model)")
    print(f"assumed for the GPU rows (not measured, no GPU here): a GPU = {a.gpu_speedup:g} CPU threads of this "
          f"model; {per_gpu} examples per GPU per step (weak scaling); NVLink alpha 10 us, 350 GB/s; across hosts "
          "alpha 20 us, 45 GB/s per GPU; ring all-reduce, all-to-all at link bandwidth, no overlap of communication "
          "with compute (what the code does today)")
    report("scale", rows, ("run", "ranks", "ms/step", "CPU ms/step", "a2a ms", "allreduce ms", "examples/s", "efficiency"),
           value=eff, unit="2-rank scaling efficiency (examples/s of 2 ranks / 2 x one process)", baseline=1.0,
           goal=0.8, cpu_efficiency=round(eff_cpu, 3), load_average=round(load, 2), examples_per_s_1=round(eps1, 1), examples_per_s_2=round(eps2, 1),
           model_step_ms_2=round(1e3 * here["total"], 2), rank_overhead_ms=round(1e3 * overhead, 2), measured_step_ms_2=round(1e3 * two["step_s"], 2),
           compute_us_per_example=round(1e6 * c, 2), gloo_alpha_us=round(1e6 * alpha, 1),
           gloo_allreduce_gbs=round(beta_ar / 1e9, 3), gloo_a2a_gbs=round(beta_a2a / 1e9, 3),
           gpu_speedup_assumed=a.gpu_speedup, **extra)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
