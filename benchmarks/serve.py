"""The ranking service: max QPS at p99 <= 50 ms, micro-batched against one request per forward pass.

One process serves the same model twice, on two ports: the batched service (``serving.max_batch``,
``max_wait_ms`` as configured, default 64 / 2 ms) and the same service with ``max_batch=1`` (every request
its own forward pass: the baseline). A load process (a separate process, so the clients do not take the
server's interpreter lock) runs C closed-loop clients, each sending ranking requests of 100 candidates
(random user, domain and context; explicit candidate objects) over a keep-alive connection and waiting for
the answer before the next. C steps up (1, 2, 4, 6, 8, 12, ... ``--max-clients``) until p99 passes 50 ms; a service's
score is the highest QPS of a step whose p99 (client side: send to last byte) stays within 50 ms. The table
also shows the service's own p99 (body read to answer ready): the rest is HTTP and the clients' share of the CPU.

``value``: batched max QPS; ``baseline``: unbatched; ``ratio`` (goal >= 3).

Then continuous publishing, end to end: a trainer thread trains the same model on a generated stream as fast as
it can and publishes a version every ``--publish-every`` seconds (``trainer.publish_every_s``: a delta, the
first a full snapshot) into a version store that the batched service polls (``serving.poll_s``), while a
client sends a ranking request every 20 ms. ``publish_p99_s``: p99 over versions of (the first answer
carrying that version - the wall time of the newest training step it includes; goal <= 10 s);
``delta_fraction``: mean over the deltas of delta bytes / full bytes (goal <= 0.10; ``bench publish`` measures
it at a fixed stream rate).

    streamrec bench serve [--quick] [--step-s S] [--max-clients C] [--candidates N] [--publish-s S]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks._common import parser, report

P99_BOUND_MS = 50.0
LADDER = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # concurrency steps


# -- the load process --------------------------------------------------------------------------------------
def _bodies(n: int, candidates: int, seed: int = 0) -> list[bytes]:
    from streams import schema

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ads = rng.choice(50_000, candidates, replace=False)
        out.append(json.dumps({
            "user_id": int(rng.integers(0, 100_000)), "domain": schema.DOMAINS[i % len(schema.DOMAINS)], "k": 10,
            "context": {"device": "ios", "country": "US", "dense": rng.normal(size=8).round(3).tolist(),
                        "history": rng.integers(0, 50_000, 8).tolist()},
            "candidates": [{"ad_id": int(a), "campaign_id": int(a) // 10, "advertiser_id": int(a) // 100}
                           for a in ads]}).encode())
    return out


async def _load(port: int, clients: int, seconds: float, candidates: int) -> dict:
    from serving.client import AsyncClient

    bodies = _bodies(64, candidates)
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def one(c: int) -> None:
        nonlocal errors
        cl = AsyncClient("127.0.0.1", port)
        i = c
        try:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                status, _ = await cl.request("POST", "/rank", bodies[i % len(bodies)])
                lat.append((time.perf_counter() - t) * 1000.0)
                errors += status != 200
                i += clients
        finally:
            await cl.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) if lat else np.zeros(1)
    return {"clients": clients, "requests": len(lat), "errors": errors, "qps": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def load_main(argv: list[str]) -> None:
    port, clients, seconds, candidates = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    print(json.dumps(asyncio.run(_load(port, clients, seconds, candidates))), flush=True)


def run_load(port: int, clients: int, seconds: float, candidates: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--load", str(port), str(clients), str(seconds),
                          str(candidates)], capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the services ------------------------------------------------------------------------------------------
def max_qps(name: str, port: int, args, rows: list, svc) -> tuple[float, dict]:
    best, best_step = 0.0, {}
    run_load(port, 2, 1.0, args.candidates)  # warm-up: connections, allocator, torch's first calls
    for c in LADDER:
        if c > args.max_clients:
            break
        b0 = svc.batcher.batches
        svc.stats.take()
        r = run_load(port, c, args.step_s, args.candidates)
        server = svc.stats.take()  # the service's own view: body read -> answer ready
        batches = svc.batcher.batches - b0
        r["batch_mean"] = r["requests"] / batches if batches else 0.0
        ok = r["p99_ms"] <= P99_BOUND_MS and r["errors"] == 0
        rows.append((name, c, f"{r['qps']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{server.get('latency_p99_ms', 0.0):.1f}", f"{r['batch_mean']:.1f}", r["errors"],
                     "yes" if ok else "no"))
        print(*rows[-1], sep="  ", flush=True)
        if ok and r["qps"] > best:
            best, best_step = r["qps"], r
        if r["p99_ms"] > P99_BOUND_MS:
            break
    return best, best_step


def publish_phase(cfg, learner, seconds: float, every_s: float, rows: list) -> dict:
    """Train + publish in a thread, serve from the store, time each version's first answer (module docstring)."""
    import shutil
    import tempfile
    import threading

    from benchmarks._simulated import example_stream
    from serving.client import Client
    from serving.models import open_store
    from serving.service import RankingService, ServingServer
    from streams.sources.generate import GeneratorConfig, simulate
    from trainer.features import featurize
    from trainer.publish import Publisher

    root = tempfile.mkdtemp(prefix="streamrec-bench-serve-")
    sim = simulate(GeneratorConfig(n_impressions=200_000, seed=2, n_users=50_000))
    examples = example_stream(sim, "oracle", elapsed_s=60)
    pub = Publisher(root, full_every=10_000, keep_full=2)
    published: dict[int, tuple[int, str, float]] = {}  # seq -> (trained_ts ms, kind, delta fraction)
    stop = threading.Event()

    def train() -> None:
        bs, i, last = cfg.trainer.batch_size, 0, time.monotonic()
        info = pub.publish(learner, examples_trained=0, full=True)
        published[info.seq] = (info.trained_ts, info.kind, 1.0)
        while not stop.is_set():
            batch = examples[i % len(examples):i % len(examples) + bs] or examples[:bs]
            learner.train_step(featurize(batch, cfg.trainer, learner.user_view))
            trained_ms = int(time.time() * 1000)
            i += bs
            if time.monotonic() - last >= every_s:
                info = pub.publish(learner, examples_trained=i, trained_ts=trained_ms)
                published[info.seq] = (info.trained_ts, info.kind, pub.stats()["delta_fraction"])
                last = time.monotonic()

    first_seen: dict[int, float] = {}
    body = _bodies(1, 100)[0]
    try:
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        while not published:
            time.sleep(0.05)
        svc = RankingService(cfg, {"main": open_store(root)}, emit=False, feed=False)
        with ServingServer(cfg, svc) as srv:
            client = Client("127.0.0.1", srv.port)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                status, answer = client.request("POST", "/rank", body)
                if status == 200:
                    seq = json.loads(answer)["model_version"]
                    first_seen.setdefault(seq, time.time())
                time.sleep(0.02)
            stop.set()
            trainer.join()
            client.close()
    finally:
        stop.set()
        shutil.rmtree(root, ignore_errors=True)
    delays = {seq: first_seen[seq] - published[seq][0] / 1000.0 for seq in first_seen if seq in published}
    for seq in sorted(published):
        ts, kind, frac = published[seq]
        d = delays.get(seq)
        rows.append(("publish", f"v{seq} {kind}", f"{frac:.4f}", "-" if d is None else f"{d:.2f}"))
    fracs = [f for s_, (_, k, f) in published.items() if k == "delta"]
    lat = sorted(delays.values())
    return {"publish_p99_s": round(float(np.percentile(lat, 99)), 2) if lat else None,
            "publish_p50_s": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "delta_fraction": round(float(np.mean(fracs)), 4) if fracs else None,
            "versions_published": len(published), "versions_served": len(delays),
            "versions_skipped": len(published) - len(delays)}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--step-s", type=float, default=None, help="seconds per concurrency step (default 8; quick 1.5)")
    p.add_argument("--max-clients", type=int, default=None, help="highest concurrency tried (default 128; quick 64)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per request (default 100)")
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--publish-s", type=float, default=None,
                   help="seconds of the publishing phase (default 60; quick 20)")
    p.add_argument("--publish-every", type=float, default=None,
                   help="seconds between published versions (default: trainer.publish_every_s; quick 2)")
    args = p.parse_args()
    args.step_s = args.step_s or (1.5 if args.quick else 8.0)
    args.max_clients = args.max_clients or (64 if args.quick else 128)

    from config import TrainerConfig, load_config
    from serving.models import LocalModel, StaticStore
    from serving.service import RankingService, ServingServer, set_torch_threads
    from trainer.embeddings import quiet_fbgemm_logs
    from trainer.model import Learner

    quiet_fbgemm_logs()
    threads = set_torch_threads()  # as `streamrec serve` does
    learner = Learner(TrainerConfig(device=args.device))  # the default model: 15 tables x 100k rows x 16
    model = LocalModel.of(learner)
    base = load_config(env={})
    rows: list[tuple] = []
    results = {}
    for name, max_batch in (("batched", base.serving.max_batch), ("unbatched", 1)):
        cfg = load_config(env={}, serving={"port": 0, "max_batch": max_batch, "emit_impressions": False})
        svc = RankingService(cfg, {"main": StaticStore(model)}, emit=False, feed=False)
        with ServingServer(cfg, svc) as srv:
            results[name] = max_qps(name, srv.port, args, rows, svc)
    (b_qps, b_step), (u_qps, u_step) = results["batched"], results["unbatched"]
    every_s = args.publish_every or (2.0 if args.quick else base.trainer.publish_every_s)
    pub_rows: list[tuple] = []
    publishing = publish_phase(load_config(env={}, serving={"port": 0}), learner,
                               args.publish_s or (20.0 if args.quick else 60.0), every_s, pub_rows)
    print(f"publishing every {every_s:g} s into the store the batched service polls every "
          f"{base.serving.poll_s:g} s:")
    print(f"{'version':>16}  {'delta fraction':>14}  {'trained -> served s':>19}")
    for _, version, frac, delay in pub_rows:
        print(f"{version:>16}  {frac:>14}  {delay:>19}")
    report("serve", rows, ("service", "clients", "QPS", "p50 ms", "p99 ms", "server p99", "req/batch", "errors",
                 "p99<=50"),
           value=b_qps, unit=f"requests/s of {args.candidates} candidates at p99 <= {P99_BOUND_MS:g} ms",
           baseline=u_qps, max_batch=base.serving.max_batch, max_wait_ms=base.serving.max_wait_ms,
           batched_clients=b_step.get("clients"), batched_p99_ms=round(b_step.get("p99_ms", 0.0), 1),
           unbatched_clients=u_step.get("clients"), unbatched_p99_ms=round(u_step.get("p99_ms", 0.0), 1),
           candidates=args.candidates, device=args.device, torch_threads=threads, publish_every_s=every_s,
           **publishing)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2:])
    else:
        main()
