"""LoKA FP8 (trainer/precision.py): the probe's per-layer error table, each layer's chosen kernel, and the NE change
of emulated (CPU) or real (CUDA) low-precision training against fp32.

Four learners train on the same featurized batches of generated traffic (``--n`` impressions, ``--batch``):
``trainer.precision`` fp32 (the baseline), bf16, fp8 (every layer the Mods allow in fp8 with row-wise scales) and
auto (the dispatch, bound ``--bound``). Quality is progressive: each batch is scored before the learner trains on
it; click NE = log loss / entropy of the stream's click rate. The table lists, per dense layer in forward order,
the auto learner's running mean relative GEMM error of each kernel (forward, data and weight gradient: the worst),
the input's crest factor (absmax / RMS), the share of gradient entries an e4m3 cast would flush, and the kernel
chosen. On CUDA the training step is also timed per mode (best of the timed batches, after a warm-up) and the
cost table is measured on the card; on CPU fp8 and bf16 are emulated (cast and back), so no speed is reported.

Last line: value = the auto run's click NE, baseline = fp32's; ``ne_change_pct`` per mode (and over the second half
of the stream, after the warm-up: ``ne_second_half``, ``ne_change_pct_second_half``), ``kernels`` per layer,
on CUDA ``step_ms`` (training step, median) and ``score_ms`` (forward alone) per mode, ``speedup_vs_bf16``
(auto's step against bf16's; issue 20's goal: >= 1.3x at <= 0.05% NE change) and ``speedup_fp8_vs_bf16``.

    streamrec bench fp8 [--quick] [--n 20000] [--batch 512] [--bound 0.02] [--probe-every 10] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
import time

import msgspec
import numpy as np
import torch

from benchmarks._common import parser, report
from config import TrainerConfig
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from trainer.model import Learner
from trainer.precision import KERNELS
from benchmarks._simulated import example_stream

MODES = ("fp32", "bf16", "fp8", "auto")


def click_ne(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    r = float(np.clip(y.mean(), 1e-7, 1 - 1e-7))
    return float(ll / -(r * np.log(r) + (1 - r) * np.log(1 - r)))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions (default 20000; quick 4096)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--bound", type=float, default=TrainerConfig().precision_bound,
                   help="the dispatch's bound on a layer's relative GEMM error")
    p.add_argument("--probe-every", type=int, default=None, help="steps between probes (default 10; quick 2)")
    p.add_argument("--device", default="cpu", help="cpu (emulated fp8) or cuda (real kernels, timed)")
    a = p.parse_args()
    n = a.n or (4096 if a.quick else 20_000)
    dev = torch.device(a.device)
    exs = example_stream(simulate(GeneratorConfig(n_impressions=n, seed=7, n_users=5_000, n_ads=1_000)), "oracle")
    tc = TrainerConfig(batch_size=a.batch, hash_buckets=20_000, device=a.device, backend="torch", user_model=False,
                       precision_bound=a.bound, precision_probe_every=a.probe_every or (2 if a.quick else 10))
    fbs = [featurize(exs[i:i + a.batch], tc) for i in range(0, len(exs) - a.batch + 1, a.batch)]
    learners = {m: Learner(msgspec.structs.replace(tc, precision=m)) for m in MODES}
    preds: dict[str, list[np.ndarray]] = {m: [] for m in MODES}
    step_s: dict[str, list[float]] = {m: [] for m in MODES}
    for fb in fbs:  # the modes interleaved: the same load on each
        for m, lr in learners.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = lr.train_step(fb)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            step_s[m].append(time.perf_counter() - t0)
            preds[m].append(r.p_click)
    y = np.concatenate([fb.click for fb in fbs])
    ne = {m: click_ne(np.concatenate(preds[m]), y) for m in MODES}
    half = sum(len(fb.click) for fb in fbs[:len(fbs) // 2])  # after the warm-up: the second half of the stream
    ne2 = {m: click_ne(np.concatenate(preds[m])[half:], y[half:]) for m in MODES}
    change = {m: round(100.0 * (ne[m] / ne["fp32"] - 1.0), 4) for m in MODES if m != "fp32"}
    auto = learners["auto"].precision
    rows = []
    for row in auto.table():
        rows.append((row["layer"], f"{row['k']}x{row['n']}", *(_fmt(row.get(f"err_{k}")) for k in KERNELS[:-1]),
                     _fmt(row.get("x_crest")), _fmt(row.get("g_underflow")),
                     learners["fp8"].precision.kernel(row["layer"]), row["kernel"] + (" (pinned)" if row["pinned"] else "")))
    print(f"{len(fbs)} batches of {a.batch} on {dev}; probe every {tc.precision_probe_every} steps "
          f"({auto.probe.probes} probes); bound {a.bound}; click NE: "
          + ", ".join(f"{m} {ne[m]:.5f}" for m in MODES) + "; second half: "
          + ", ".join(f"{m} {ne2[m]:.5f}" for m in MODES))
    change2 = {m: round(100.0 * (ne2[m] / ne2["fp32"] - 1.0), 4) for m in MODES if m != "fp32"}
    extra: dict = {"device": dev.type, "ne": {m: round(v, 6) for m, v in ne.items()}, "ne_change_pct": change,
                   "ne_second_half": {m: round(v, 6) for m, v in ne2.items()}, "ne_change_pct_second_half": change2,
                   "kernels": {r[0]: auto.kernel(r[0]) for r in rows}, "probes": auto.probe.probes,
                   "bound": a.bound, "batch": a.batch}
    if dev.type == "cuda":  # steady-state step time: skip the first batches (warm-up, cost measurement)
        ms = {m: 1000.0 * float(np.median(s[3:] or s)) for m, s in step_s.items()}
        extra["step_ms"] = {m: round(v, 3) for m, v in ms.items()}
        extra["speedup_vs_bf16"] = round(ms["bf16"] / ms["auto"], 3)
        extra["speedup_fp8_vs_bf16"] = round(ms["bf16"] / ms["fp8"], 3)
        fwd = {}  # scoring alone (forward, no probe): the kernels without the backward's casts
        for m, lr in learners.items():
            ts = []
            for fb in fbs:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                lr.score(fb)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            fwd[m] = 1000.0 * float(np.median(ts[3:] or ts))
        extra["score_ms"] = {m: round(v, 3) for m, v in fwd.items()}
        extra["gpu"] = torch.cuda.get_device_name(dev)
        print("step ms (median): " + ", ".join(f"{m} {v:.2f}" for m, v in ms.items()))
        print("score ms (median): " + ", ".join(f"{m} {v:.2f}" for m, v in fwd.items()))
    report("fp8", rows, ("layer", "KxN", "err fp8 tensor", "err fp8 row", "err bf16", "x crest", "g flushed",
                         "fp8 run", "auto chose"),
           value=ne["auto"], unit="click NE", baseline=ne["fp32"], **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
