"""Training-step throughput of the MDMO model against a plain PyTorch implementation of the same model.

In one run, on the same featurized batches of generated traffic (Zipf users and ads):

* ``streamrec (fbgemm)``: :class:`trainer.model.Learner` with the fbgemm TBE (row-wise Adagrad fused into
  backward) -- the default backend where fbgemm loads;
* ``streamrec (torch)``: the same Learner on its plain-torch backend (one stacked ``nn.EmbeddingBag``, our
  row-wise Adagrad) -- what runs where fbgemm is missing;
* ``plain PyTorch`` (baseline): the same dense model (DCNv2, MMoE, heads: the same module) with one
  ``nn.EmbeddingBag(sparse=True)`` per table, same sizes, ``torch.optim.Adagrad`` on the sparse weights and
  Adam on the dense ones, same batch.

"train step" = forward + loss + backward + optimizer updates on a featurized batch (features built before
the clock); "with features" adds :func:`trainer.features.featurize` of the Example objects. Each phase runs
``--repeat`` times alternating and the best pass counts (2 shared cores: the others' load is noise).
Last line: value = streamrec (fbgemm or, without it, torch) train-step examples/s, baseline = plain PyTorch.

``--latency RATE`` (default 2000 examples/s for 20 s; 0 skips it, as ``--quick`` does) then measures the
service end to end on a fresh embedded broker: examples are produced at a steady RATE with ``emitted_ts`` =
the wall clock at produce time, a :class:`trainer.loop.Trainer` (in a thread of this process)
consumes, scores, trains; latency = ``trained_ts`` of its prediction batch - ``emitted_ts``, p50/p99.

    streamrec bench trainer [--quick] [--batch 512] [--steps 40] [--latency 2000 --seconds 20]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec
import torch
from torch import nn

from benchmarks._common import parser, report, sparse_step
from config import TrainerConfig
from streams.sources.generate import GeneratorConfig, simulate
from trainer.embeddings import fbgemm_available
from trainer.features import featurize
from trainer.model import Learner, MDMOModel, count_parameters, esmm_loss
from benchmarks._simulated import example_stream


class PerTableBags(nn.Module):
    """The plain-PyTorch embeddings: one ``nn.EmbeddingBag`` per table; TBE input split per table."""

    def __init__(self, num_tables: int, rows: int, dim: int):
        super().__init__()
        self.num_tables, self.rows, self.dim = num_tables, rows, dim
        self.bags = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for _ in range(num_tables))
        for b in self.bags:
            nn.init.uniform_(b.weight, -0.01, 0.01)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        b = (offsets.numel() - 1) // self.num_tables
        starts = offsets[::b].tolist()  # T+1 table boundaries in `indices`
        outs = [bag(indices[starts[t]:starts[t + 1]], offsets[t * b:(t + 1) * b] - starts[t])
                for t, bag in enumerate(self.bags)]
        return torch.cat(outs, dim=1)

    def step(self) -> None:
        pass


class PlainLearner:
    """Same dense model, per-table EmbeddingBags, stock torch optimizers."""

    def __init__(self, tcfg: TrainerConfig):
        torch.manual_seed(tcfg.seed)
        self.device = torch.device(tcfg.device)
        self.model = MDMOModel(tcfg, "torch", self.device)
        self.model.emb = PerTableBags(self.model.num_tables, tcfg.hash_buckets, tcfg.embedding_dim).to(self.device)
        dense = [p for n, p in self.model.named_parameters() if not n.startswith("emb.")]
        self.opt_dense = torch.optim.Adam(dense, lr=tcfg.lr_dense)
        self.opt_sparse = torch.optim.Adagrad(list(self.model.emb.parameters()), lr=tcfg.lr_sparse)

    def train_step(self, fb) -> float:
        b = fb.to_torch(self.device)
        l_ctr, l_cvr = self.model.logits(b)
        loss = esmm_loss(l_ctr, l_cvr, b.click, b.conversion, b.weight)
        self.opt_dense.zero_grad(set_to_none=True)
        self.opt_sparse.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_dense.step()
        sparse_step(self.opt_sparse)
        return float(loss.detach())


def _time_steps(step, fbs) -> float:
    for fb in fbs[:3]:  # warm-up: allocator, lazy init
        step(fb)
    t0 = time.perf_counter()
    for fb in fbs[3:]:
        step(fb)
    return time.perf_counter() - t0


def latency(rate: float, seconds: float, exs, batch: int) -> dict[str, float]:
    """Emitted-to-trained latency through the real broker at a sustained ``rate`` (see the docstring)."""
    import tempfile
    import threading

    from streams import schema
    from streams.bus import kafka_io
    from streams.bus.broker import EmbeddedBroker
    from config import load_config
    from trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp, "tansu.log")) as broker:
        bs = broker.bootstrap_servers
        topics = {k: f"lat_{k}" for k in ("impressions", "clicks", "conversions", "examples", "dead_letters",
                                           "predictions", "service_stats")}
        cfg = load_config(env={}, kafka={"bootstrap_servers": bs}, topics={**topics, "partitions": 2},
                          trainer={"batch_size": batch, "device": "cpu", "checkpoint_dir": str(Path(tmp, "ckpt")),
                                   "checkpoint_every_s": 1e9, "checkpoint_every_examples": 10**9})
        kafka_io.ensure_topics(bs, cfg.topics.all(), 2)
        svc = Trainer(cfg, resume=False)
        th = threading.Thread(target=svc.run, kwargs={"idle_exit_s": 3.0}, daemon=True)
        th.start()
        prod = kafka_io.make_producer(bs, cfg.kafka.client)
        n = min(len(exs), int(rate * seconds))
        t0 = time.monotonic()
        for i in range(n):
            lag = t0 + i / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            ex = msgspec.structs.replace(exs[i], emitted_ts=int(time.time() * 1000))
            kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
            if i % 256 == 0:
                prod.poll(0)
        prod.flush(30)
        sent_s = time.monotonic() - t0
        th.join(120)
        cons = kafka_io.make_consumer(bs, "lat-reader")
        cons.assign(kafka_io.topic_partitions([cfg.topics.predictions], 2))
        lat: list[int] = []
        idle = time.monotonic()
        while len(lat) < n and time.monotonic() - idle < 5:
            for m in cons.consume(1000, timeout=0.2):
                if m.error() is None:
                    pb = schema.decode(m.value(), schema.PredictionBatch)
                    lat.extend(pb.trained_ts - e for e in pb.emitted_ts)
                    idle = time.monotonic()
        cons.close()
        del prod
    import numpy as np

    a = np.asarray(lat, dtype=np.float64)
    return {"rate": n / sent_s, "examples": float(len(a)), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps per pass (default 40, quick 15)")
    p.add_argument("--repeat", type=int, default=None, help="passes per phase (default 3, quick 2)")
    p.add_argument("--buckets", type=int, default=TrainerConfig().hash_buckets)
    p.add_argument("--latency", type=float, default=None, metavar="RATE",
                   help="examples/s for the broker latency phase (default 2000; quick: 0 = skip)")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of the latency phase")
    p.add_argument("--device", default="cpu", help="cpu or cuda (scripts/gpu-check.sh; the latency phase: cpu only)")
    p.add_argument("--backend", choices=("both", "fbgemm", "torch"), default="both",
                   help="streamrec backends to time (default: fbgemm where it loads, and torch)")
    a = p.parse_args()
    rate = a.latency if a.latency is not None else (0.0 if a.quick or a.device != "cpu" else 2000.0)
    steps = a.steps or (15 if a.quick else 40)
    repeat = a.repeat or (2 if a.quick else 3)
    # the ranker step alone: the user model trains in its own thread (trainer/users/features.py)
    tc = TrainerConfig(batch_size=a.batch, hash_buckets=a.buckets, device=a.device, user_model=False)
    n = max(a.batch * (steps + 3), int(rate * a.seconds))
    sim = simulate(GeneratorConfig(n_impressions=n, seed=7, n_users=50_000, n_ads=5_000))
    exs = example_stream(sim, "oracle")
    batches = [exs[i:i + a.batch] for i in range(0, a.batch * (steps + 3), a.batch)]
    fbs = [featurize(b, tc) for b in batches]

    learners = {}
    if a.backend != "torch" and fbgemm_available():
        learners["streamrec (fbgemm)"] = Learner(msgspec.structs.replace(tc, backend="fbgemm"))
    if a.backend != "fbgemm" or not learners:
        learners["streamrec (torch)"] = Learner(msgspec.structs.replace(tc, backend="torch"))
    plain = PlainLearner(tc)
    phases = {name: (lambda fb, lr=lr: lr.train_step(fb)) for name, lr in learners.items()}
    phases["plain PyTorch"] = plain.train_step
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, step in phases.items():
            s = _time_steps(step, fbs)
            best[name] = min(best.get(name, float("inf")), s)
    first = next(iter(learners))
    feat_s = float("inf")
    for _ in range(repeat):  # featurize alone (Example objects -> numpy), same batches
        t0 = time.perf_counter()
        for b in batches[3:]:
            featurize(b, tc)
        feat_s = min(feat_s, time.perf_counter() - t0)
    timed = a.batch * steps
    base = timed / best["plain PyTorch"]
    rows = []
    for name, s in best.items():
        eps = timed / s
        with_feat = timed / (s + feat_s)
        rows.append((name, f"{eps:,.0f}", f"{with_feat:,.0f}", f"{1000 * s / steps:.2f}", f"{eps / base:.2f}"))
    params = count_parameters(learners[first].model)
    print(f"batch {a.batch}, {steps} timed steps x best of {repeat}, {tc.hash_buckets} rows x "
          f"{learners[first].model.num_tables} tables x {tc.embedding_dim} dims, dense params {params['dense']:,}; "
          f"featurize {timed / feat_s:,.0f} examples/s")
    extra = {"torch_threads": torch.get_num_threads(), "device": a.device}  # of the timed steps
    if a.device.startswith("cuda"):
        extra["gpu"] = torch.cuda.get_device_name()
    if rate > 0:
        lat = latency(rate, a.seconds, exs, a.batch)
        print(f"through the broker at {lat['rate']:,.0f} examples/s for {a.seconds:g} s: {lat['examples']:,.0f} "
              f"trained, emitted-to-trained p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms")
        extra.update(latency_rate=round(lat["rate"]), latency_p50_ms=round(lat["p50_ms"]),
                     latency_p99_ms=round(lat["p99_ms"]))
    report("trainer", rows, ("implementation", "train step ex/s", "with features ex/s", "ms/step", "x plain"),
           value=timed / best[first], unit="examples/s", baseline=base, batch=a.batch, backend=first,
           featurize_per_s=round(timed / feat_s), **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
