"""LoKA FP8 on CPU (trainer/precision.py): emulated formats, the probe's errors, Mods, the dispatch's decisions
(given cost tables, drift), the real ``_scaled_mm`` path against the emulation, the trainer integration, and the
GPU script's CPU-testable paths (scripts/gpu-check.sh, benchmarks/_gpu.py, bench fp8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from torch import nn

from config import ConfigError, TrainerConfig
from trainer import precision as P

ROOT = Path(__file__).resolve().parents[1]


def test_float8_casts_and_row_scaling_keep_small_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    for fmt, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        y = P.qdq(x, fmt)
        assert y.dtype == torch.float32 and not torch.equal(x, y)
        # relative error of a round-to-nearest with 3 (e4m3) / 2 (e5m2) mantissa bits
        rel = ((y - x).abs() / x.abs().clamp(min=1e-3)).median()
        assert rel < (2 ** -4 if dt == torch.float8_e4m3fn else 2 ** -3)
    x[0] *= 1e5  # one outlier row: one scale per tensor drowns the others, row scales do not
    err = {s: float((P.qdq(x, "e4m3", s, 1) - x)[1:].norm() / x[1:].norm()) for s in ("tensor", "row")}
    assert err["row"] < 0.05 < err["tensor"]
    assert torch.equal(P.qdq(x, "fp32"), x)


def test_gemm_errors_order_the_kernels():
    g = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(128, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(128, 32, generator=g)
    err = {k: P.gemm_error(x, w, dy, k) for k in P.KERNELS}
    assert err["fp32"] == 0.0 < err["bf16"] < 0.01 < err["fp8_row"] <= err["fp8_tensor"] < 0.2
    x[:4] *= 1e6  # outlier examples: per-tensor fp8 flushes the other examples, per-row scales keep them
    assert P.gemm_error(x, w, None, "fp8_tensor") > 5 * P.gemm_error(x, w, None, "fp8_row")


def test_real_scaled_mm_matches_the_emulation():
    """``torch._scaled_mm`` runs on this CPU build: the real kernel's numbers are the emulation's (padding incl.)."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 50, generator=g), torch.randn(21, 50, generator=g)
    for k in P.KERNELS:
        a, _, s = P.operand_formats(k)
        want = P.qdq(x, a, s, 1) @ P.qdq(w, a, s, 1).T
        got = P.scaled_linear(x, w, k)
        assert got.shape == (37, 21)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_emulated_linear_forward_and_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = torch.randn(64, 48, requires_grad=True)
    ref_y = lin(x)
    ref_y.sum().backward()
    ref = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    for k in ("bf16", "fp8_row"):
        x.grad = None
        lin.zero_grad()
        y = P.dispatched_forward(lin, x, k, out_fp32=True, real=False)
        y.sum().backward()
        tol = 0.01 if k == "bf16" else 0.1
        assert float((y - ref_y).detach().norm() / ref_y.detach().norm()) < tol
        for got, want in zip((x.grad, lin.weight.grad, lin.bias.grad), ref):
            assert 0 < float((got - want).norm() / want.norm()) < tol or torch.equal(got, want)
    y = P.dispatched_forward(lin, x, "bf16", out_fp32=False, real=False)  # the output rounded to bf16
    assert torch.equal(y, y.to(torch.bfloat16).float())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def _step(model, prec, x):
    prec.before_step()
    model(x).pow(2).mean().backward()
    prec.after_backward()
    model.zero_grad()


def _fp8_first(layer: str, kernel: str, m: int, k: int, n: int) -> float:  # a given cost table: fp8 fastest
    return {"fp8_tensor": 1.0, "fp8_row": 2.0, "bf16": 3.0, "fp32": 4.0}[kernel]


class GivenCosts(P.CostTable):
    def seconds(self, layer, kernel, m, k, n):
        return _fp8_first(layer, kernel, m, k, n)


def test_probe_mods_and_dispatch_pick_the_fastest_safe_kernel_and_follow_drift():
    model = _mlp()
    prec = P.Precision(model, "auto", bound=0.15, probe_every=1, costs=GivenCosts())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 32, generator=g)
    _step(model, prec, x)
    assert prec.probe.order == ["0", "2", "4", "6"]  # forward order, from the hooks
    assert all(prec.kernel(n) == "fp32" for n in prec.layers)  # too few probes to trust
    for _ in range(P.MIN_PROBES):
        _step(model, prec, x)
    pins = prec.mods.pinned(prec.probe.order)
    assert pins == {"0", "6"}
    for n in prec.layers:
        want = ("bf16",) if n in pins else ("fp8_tensor", "fp8_row")
        assert prec.kernel(n) in want, (n, prec.kernel(n), prec.table())
    # an accuracy bound fp8 cannot meet: bf16 where it is within it
    tight = P.Dispatch(0.01, costs=GivenCosts()).decide(prec.probe)
    assert "bf16" in set(tight.values()) and not set(tight.values()) & set(P.FP8)
    # drift: outlier examples appear in the stream; per-tensor fp8 breaks the bound at the next probe and is
    # left at once (per-row scaling, or bf16, takes over); the switches are counted
    mid = "2"
    switches = prec.dispatch.switches
    bad = x.clone()
    bad[:3] *= 1e6
    _step(model, prec, bad)
    assert prec.probe.errors[(mid, "fp8_tensor")].last > 0.15
    assert prec.kernel(mid) in ("fp8_row", "bf16") and prec.dispatch.switches > switches
    # a deep copy of the model carries its own dispatch over its own layers (a publisher may copy models)
    import copy

    twin = copy.deepcopy(model)
    assert twin[2].loka is not prec and twin[2].loka.layers["2"] is twin[2]
    assert twin[2].loka.kernel("2") == prec.kernel("2")
    assert set(twin.state_dict()) == set(model.state_dict())
    # stats for the dashboard: a kernel code and errors per layer
    st = prec.stats()
    assert st["precision_probes"] == P.MIN_PROBES + 2
    assert st[f"precision_kernel/{mid}"] == P.KERNEL_CODE[prec.kernel(mid)]
    assert st[f"precision_err/{mid}/fp8_tensor"] > st[f"precision_err/{mid}/bf16"] > 0


def test_cost_table_model_prefers_bf16_for_small_gemms_and_fp8_for_large():
    c = P.H100_COSTS
    best = lambda m, k, n: min(P.KERNELS, key=lambda kern: c.seconds(kern, m, k, n))
    assert best(512, 208, 40) == "bf16"  # launches and casts dominate
    assert best(65536, 4096, 4096) in P.FP8
    t = P.CostTable(measured={("a", "bf16"): 1.0})
    assert t.seconds("a", "bf16", 1, 1, 1) == 1.0 and t.seconds("a", "fp32", 8, 8, 8) == c.seconds("fp32", 8, 8, 8)
    meas = P.measure_costs({"a": nn.Linear(32, 16)}, 64, torch.device("cpu"), reps=2)
    assert {k for _, k in meas.measured} == set(P.KERNELS)  # _scaled_mm runs on this CPU build


def test_config_refuses_an_unknown_precision():
    with pytest.raises(ConfigError, match="trainer.precision"):
        TrainerConfig(precision="fp4")
    with pytest.raises(ConfigError, match="precision_bound"):
        TrainerConfig(precision_bound=0.0)


def test_learner_runs_fp8_reports_stats_and_resumes_its_dispatch(tmp_path):
    from types import SimpleNamespace

    from trainer.telemetry import Throughput, service_stats
    from benchmarks._simulated import example_stream
    from streams.sources.generate import GeneratorConfig, simulate
    from trainer import checkpoint
    from trainer.features import featurize
    from trainer.model import Learner

    exs = example_stream(simulate(GeneratorConfig(n_impressions=1024, seed=7, n_users=500, n_ads=100)), "oracle")
    tc = TrainerConfig(device="cpu", user_model=False, hash_buckets=500, batch_size=256, precision="fp8",
                       precision_probe_every=2, backend="torch")
    base = Learner(msgspec.structs.replace(tc, precision="fp32"))
    assert base.precision is None
    learner = Learner(tc)
    fbs = [featurize(exs[i:i + 256], tc) for i in range(0, 1024, 256)]
    for fb in fbs[:3]:
        r = learner.train_step(fb)
        r0 = base.train_step(fb)
        assert np.isfinite(r.loss) and r.loss != r0.loss  # other numerics, same ballpark
        assert abs(r.loss - r0.loss) < 0.05 * r0.loss
    ks = {row["layer"]: row["kernel"] for row in learner.precision.table()}
    assert ks["cross.0"] == "bf16" and ks["bottom"] == "fp8_row"  # the first layer pinned by the Mods
    assert learner.precision.probe.probes == 2
    # the trainer's ServiceStats carry them (what the panel reads)
    fake = SimpleNamespace(learner=learner, counters={k: 0 for k in ("examples_trained", "steps", "duplicates",
                                                                      "dead_letters", "examples_other_arm")},
                           newest_event_ts=0, users=None, tc=tc)
    vals = service_stats(fake, Throughput()).values
    assert vals["precision_kernel/bottom"] == P.KERNEL_CODE["fp8_row"] and vals["precision_probes"] == 2
    assert vals["precision_err/cross.1/fp8_row"] > vals["precision_err/cross.1/bf16"] > 0
    path = checkpoint.save(tmp_path, {"learner": learner.state()}, seq=1)
    twin = Learner(tc)
    twin.load_state(checkpoint.load(path)["learner"])
    a, b = learner.train_step(fbs[3]), twin.train_step(fbs[3])
    np.testing.assert_array_equal(a.p_click, b.p_click)
    assert a.loss == b.loss and twin.precision.state() == learner.precision.state()
    assert twin.precision.dispatch.choice == learner.precision.dispatch.choice


def test_bench_fp8_on_a_tiny_stream(capsys, monkeypatch):
    from benchmarks import fp8

    monkeypatch.setattr(sys, "argv", ["fp8.py", "--quick", "--n", "1024", "--batch", "256", "--probe-every", "2"])
    assert fp8.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["bench"] == "fp8" and res["device"] == "cpu"
    assert set(res["kernels"]) == {"cross.0", "cross.1", "bottom", "experts", "gates", "dense_wide"}
    assert res["kernels"]["cross.0"] in ("bf16", "fp32")
    assert abs(res["ne_change_pct"]["fp8"]) < 5 and "speedup_vs_bf16" not in res  # speed only on CUDA
    assert any(line.startswith("cross.1") for line in out)


def test_gpu_script_paths_on_cpu(capsys):
    from benchmarks import _gpu

    # FIITED's CUDA path is the torch kernel: run here on the CPU against a CPU twin (the C++ kernel if it builds)
    r = _gpu.fiited_check(torch.device("cpu"), kernel="torch", rows=500, batch=64, steps=3)
    assert r["status"] == "ran" and r["device"] == "cpu" and r["kernel"] == "torch", r
    assert r["max_out_diff"] < 1e-4 and r["max_row_diff"] < 1e-4 and r["examples_per_s"] > 0 and r["ratio"] > 0
    r = _gpu.fiited_check(torch.device("meta"), kernel="cpp")  # a store that cannot run there: reported, not raised
    assert r["status"] == "refused" and "CPU only" in r["reason"]
    r = _gpu.user_search(torch.device("cpu"), n=2000, dim=16, queries=64, k=10, prefer_faiss_gpu=False)
    assert r["engine"] == "torch-exact" and r["recall_at_10"] == 1.0 and r["queries_per_s"] > 0
    script = (ROOT / "scripts" / "gpu-check.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    steps = [line for line in dry.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 5 and all("--device" in s for s in steps)
    # the script itself, one step, on CPU: the environment line, the step's JSON line, its rc line, the summary
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DEVICE": "cpu", "ONLY": "fiited"})
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    assert run.returncode == 0 and lines[0]["check"] == "gpu-env" and lines[0]["available"] in (True, False)
    assert [x.get("bench") or x.get("check") for x in lines[1:]] == ["gpu-fiited", "fiited", "gpu-check"]
    assert lines[1]["status"] == "ran" and lines[2]["rc"] == 0 and lines[3]["failed_steps"] == 0


def test_precision_panel_reads_the_trainer_stats(store):
    from dashboards import queries as q
    from dashboards.definitions import DASHBOARDS
    from dashboards.sink import stats_rows
    from streams import schema
    import time

    model = _mlp()
    prec = P.Precision(model, "fp8", probe_every=1)
    _step(model, prec, torch.randn(64, 32, generator=torch.Generator().manual_seed(5)))
    now = int(time.time() * 1000)
    store.insert("service_stats", stats_rows([schema.ServiceStats("trainer", now, prec.stats(), "main")]))
    panel = DASHBOARDS["overview"].panel("precision")
    got = {r["layer"]: r for r in store.query(q.render(panel.sql, "live"), q.live_parameters(2)).records()}
    assert set(got) == set(prec.layers)
    for n in prec.layers:
        assert got[n]["kernel"] == prec.kernel(n) and got[n]["arm"] == "main"
        assert got[n]["err_fp8_row"] == pytest.approx(prec.probe.errors[(n, "fp8_row")].mean)
    assert got["0"]["kernel"] == "bf16" and got["2"]["kernel"] == "fp8_row"  # the first layer pinned


def test_real_kernel_path_trains_like_the_emulation_and_measures_its_costs():
    """``real=True`` (what CUDA runs): the forward on ``_scaled_mm`` / bf16 matmuls, which this CPU build has;
    its outputs and gradients match the emulated layer's, and the first probe measures the cost table."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    outs = {}
    for real in (False, True):
        model = _mlp()
        # no pins, fp32 outputs: every layer fp8 and no bf16 rounding, so both paths see the same casts
        prec = P.Precision(model, "fp8", probe_every=1, real=real, mods=P.Mods(False, False, ("",)))
        _step(model, prec, x)  # the first probe (bf16 until the pins are known)
        y = model(x)
        y.pow(2).mean().backward()
        outs[real] = (y.detach(), model[2].weight.grad.clone())
        if real:
            assert prec.kernel("2") == "fp8_row" and {k for _, k in prec.dispatch.costs.measured} == set(P.KERNELS)
    for got, want in zip(outs[True], outs[False]):  # equal up to the order of fp32 sums (and 1/scale vs / scale)
        assert float((got - want).norm() / want.norm()) < 1e-3
