"""``streamrec up``: the whole local stack as one supervised command.

    broker (embedded Tansu, or the configured cluster)
      -> dashboard process (sole owner of the chDB store: metrics sink + live page)
      -> labels dataflow (Bytewax, tailing)
      -> trainer (continuous, checkpoints under the run directory)
      <- generator or replay of a log, in this process, with a progress bar

Progress comes from the ``service_stats`` topic every component publishes to. Ctrl-C (or the end of the
work when not attached to a terminal) stops producers first, then the trainer, the dashboard and the broker.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import yaml
from tqdm import tqdm

from deploy.supervisor import Child, Supervisor
from streams import schema
from streams.bus import kafka_io
from streams.bus.broker import EmbeddedBroker
from streams.config import Config, replace

log = logging.getLogger("streamrec.up")


class StatsWatcher:
    """Latest ``ServiceStats`` values per component, read from the service_stats topic."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "streamrec-up", cfg.kafka.client)
        self.consumer.assign(kafka_io.topic_partitions([cfg.topics.service_stats], cfg.topics.partitions))
        self.latest: dict[str, dict[str, float]] = {}
        self.latest_ts: dict[str, int] = {}

    def poll(self) -> dict[str, dict[str, float]]:
        """Read what arrived; per component keep the newest report by its timestamp (reports land on any
        partition of the topic, so read order is not time order)."""
        for msg in self.consumer.consume(num_messages=10_000, timeout=0.05):
            if msg.error():
                continue
            st = schema.decode(msg.value(), schema.ServiceStats)
            if isinstance(st, schema.ServiceStats) and st.ts >= self.latest_ts.get(st.component, 0):
                self.latest_ts[st.component] = st.ts
                self.latest.setdefault(st.component, {}).update(st.values)
        return self.latest

    def value(self, component: str, name: str) -> float:
        return self.latest.get(component, {}).get(name, 0.0)

    def close(self) -> None:
        self.consumer.close()


class StatusPublisher:
    """Publishes the supervisor's view (each process up or not, restarts, crash loops) as ``ServiceStats`` of
    component ``supervisor`` about once a second, from the supervisor's watch thread."""

    def __init__(self, cfg: Config, sup: Supervisor, every_s: float = 1.0):
        self.cfg, self.sup, self.every_s = cfg, sup, every_s
        self.producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.client)
        self.next_t = 0.0

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if now < self.next_t:
            return
        self.next_t = now + self.every_s
        st = schema.ServiceStats(component="supervisor", ts=int(time.time() * 1000), values=self.sup.status())
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st))
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(5)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _write_run_config(cfg: Config, run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False))
    return path


def _produce(cfg: Config, args) -> tuple[int, int]:
    """Generate or replay into the input topics. Returns (good impressions, bad records)."""
    if args.replay:
        from streams.sources.replay import replay_file

        stats = replay_file(cfg, args.replay, speed=args.speed, progress=True)
        return stats.impressions, stats.dead_letters + stats.bad_records
    from streams.sources.generate import GeneratorConfig, simulate
    from streams.sources.replay import produce

    # Every event of the log, feedback included, lies in the past: its impressions end one longest feedback
    # delay ago and its last conversions now. Events stamped after the wall clock would be the stack's future.
    g = GeneratorConfig()
    span_ms = int(args.events / g.impressions_per_s * 1000) + int(g.max_conversion_delay_s * 1000)
    gcfg = GeneratorConfig(n_impressions=args.events, seed=args.seed, bad_rate=args.bad_rate,
                           start_ts=int(time.time() * 1000) - span_ms)
    sim = simulate(gcfg)
    stats = produce(cfg, sim.records, progress=True)
    return gcfg.n_impressions, stats.bad_records


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the dashboard's server does: a port left in TIME_WAIT by the previous run is free, a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def up(args, cfg: Config) -> int:
    port = args.port or cfg.dashboard.port
    if not _port_free(cfg.dashboard.host, port):  # before anything starts: the dashboard would crash-loop
        print(f"streamrec up: {cfg.dashboard.host}:{port} is in use (another `streamrec up`?); stop it, or pass "
              "--port", file=sys.stderr)
        return 2
    run_dir = Path(cfg.data_dir, "runs", time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    if not cfg.kafka.bootstrap_servers:
        broker = EmbeddedBroker(log_path=run_dir / "broker.log").start()
        cfg = replace(cfg, kafka={"bootstrap_servers": broker.bootstrap_servers})
        print(f"broker: embedded Tansu on {broker.bootstrap_servers}", file=sys.stderr)
    cfg = replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()),
                  trainer={"checkpoint_dir": str(run_dir / "checkpoints")},
                  dashboard={"port": port})
    sup = Supervisor(_write_run_config(cfg, run_dir), run_dir)
    watcher = status = None
    started_ms = int(time.time() * 1000)
    # SIGTERM behaves like Ctrl-C so `kill` of the supervisor also stops everything in order. SIGINT gets the
    # same explicit handler: a shell starts background jobs with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt (`streamrec up --stay &` ignored `kill -INT`).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions,
                               cfg.kafka.client)
        sup.start(Child("dashboard", ["dashboard"]))
        # with a recovery directory a restarted flow resumes from its last snapshot instead of offset 0
        sup.start(Child("labels", ["labels", "--recovery-dir", str(run_dir / "labels-recovery")]))
        sup.start(Child("trainer", ["train", "--fresh"], restart_args=["train", "--resume"]))
        status = StatusPublisher(cfg, sup)
        sup.watch(on_tick=status.maybe_publish)
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        print(f"dashboard: {url}   (logs: {run_dir})", file=sys.stderr)
        watcher = StatsWatcher(cfg)
        t0 = time.monotonic()
        expected, bad = _produce(cfg, args)
        trained = _follow(sup, watcher, expected, args.timeout)
        ok = trained is not None and _ingested(sup, url, 2 * trained, started_ms)
        elapsed = time.monotonic() - t0
        _summary(watcher, sup, expected, bad, elapsed, ok)
        print(f"dashboard: {url}", file=sys.stderr)
        stay = args.stay if args.stay is not None else sys.stdin.isatty()
        if stay:
            print("running; press Ctrl-C to stop", file=sys.stderr)
            while True:
                watcher.poll()
                time.sleep(1.0)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
        return 0
    except RuntimeError as e:
        print(f"streamrec up: {e}", file=sys.stderr)
        return 1
    finally:
        if watcher is not None:
            watcher.close()
        sup.stop_all()
        if status is not None:
            status.close()
        if broker is not None:
            broker.stop()
        print("stopped: no process left running", file=sys.stderr)


SETTLE_S = 5.0


def _follow(sup: Supervisor, watcher: StatsWatcher, expected: int, timeout: float) -> int | None:
    """Progress bars until the trainer has trained every expected example; returns how many were trained.

    A replayed log can hold impressions the labels dataflow rejects (duplicates, absurd timestamps): then
    the run also ends once nothing is pending in the dataflow and the trainer has caught up with it, with
    no change for ``SETTLE_S``. ``None`` on timeout.
    """
    bars = {name: tqdm(total=expected, desc=name, unit="ex", position=i, leave=True, dynamic_ncols=True)
            for i, name in enumerate(("labelled", "trained"))}
    settled_since: dict[str, object] = {"sig": None, "t": 0.0}

    def done() -> bool:
        watcher.poll()
        labelled, trained = watcher.value("labels", "examples_out"), watcher.value("trainer", "examples_trained")
        for name, n in (("labelled", labelled), ("trained", trained)):
            bar = bars[name]
            if int(n) != bar.n and not bar.disable:
                bar.n = int(n)
                bar.refresh()
                if bar.n >= expected:
                    bar.close()  # frozen at its own finish: later redraws would divide by a longer time
        if trained >= expected:
            return True
        if not (labelled > 0 and trained >= labelled and watcher.value("labels", "pending_impressions") == 0):
            settled_since["sig"] = None
            return False
        if settled_since["sig"] != (labelled, trained):
            settled_since.update(sig=(labelled, trained), t=time.monotonic())
        return time.monotonic() - settled_since["t"] >= SETTLE_S

    try:
        ok = sup.wait_until(done, timeout)
    finally:
        for bar in bars.values():
            bar.close()
    if not ok:
        log.warning("timed out after %.0fs waiting for %d examples to be trained", timeout, expected)
        return None
    trained = int(watcher.value("trainer", "examples_trained"))
    if trained < expected:
        log.warning("%d of %d impressions became no example: the labels dataflow dead-lettered them "
                    "(see the dashboard's dead letters)", expected - trained, expected)
    return trained


def _ingested(sup: Supervisor, url: str, rows: int, since_ms: int, timeout: float = 60.0) -> bool:
    """Wait until the store holds ``rows`` prediction rows (click + conversion per example) trained since
    ``since_ms``: counted in the store, so rows a sink stored before it was restarted count too."""
    def stored() -> int:
        try:
            with urllib.request.urlopen(f"{url}healthz?since_ms={since_ms}", timeout=10) as r:
                return int(json.load(r).get("stored_predictions", 0))
        except (OSError, ValueError, KeyError):
            return 0

    if sup.wait_until(lambda: stored() >= rows, timeout):
        return True
    log.warning("the metrics sink stored %d of %d prediction rows within %.0fs", stored(), rows, timeout)
    return False


def _summary(watcher: StatsWatcher, sup: Supervisor, expected: int, bad: int, elapsed: float, ok: bool) -> None:
    trained = watcher.value("trainer", "examples_trained")
    events = watcher.value("replay", "events_produced")
    dead = {step: int(watcher.value(step, "dead_letters")) for step in ("replay", "labels", "trainer")}
    print(f"{'done' if ok else 'INCOMPLETE'}: {int(events):,} events produced ({bad:,} malformed), "
          f"{int(watcher.value('labels', 'examples_out')):,} examples labelled, {int(trained):,} trained, "
          f"{sum(dead.values()):,} dead letters ({', '.join(f'{k} {v:,}' for k, v in dead.items())}), "
          f"in {elapsed:.1f}s ({events / elapsed:,.0f} events/s, {trained / elapsed:,.0f} examples/s end to end)",
          file=sys.stderr)
    restarts = {c.name: c.restarts for c in sup.children if c.restarts}
    if restarts:
        print("restarted: " + ", ".join(f"{k} {v}x" for k, v in restarts.items())
              + f" (logs in {sup.log_dir})", file=sys.stderr)
    users = watcher.value("trainer", "user_vectors")
    if users:
        print(f"user vectors: {int(users):,} users, index written at each trainer checkpoint; try "
              "`streamrec users info` or `streamrec users similar USER_ID -k 10`", file=sys.stderr)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole local stack: broker, labels dataflow, trainer, dashboard",
                       description="Start the embedded broker (unless kafka.bootstrap_servers is set), the metrics "
                                   "sink and live dashboard, the labels dataflow and the trainer; then generate N "
                                   "events (or replay a log) through them. Ctrl-C stops everything cleanly.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--events", type=int, default=100_000, help="impressions to generate (default 100000)")
    src.add_argument("--replay", metavar="LOG", help="replay this JSONL log instead of generating")
    p.add_argument("--speed", type=float, default=None, help="replay speed (x real time); default: as fast as possible")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--bad-rate", type=float, default=0.01, help="fraction of malformed events to inject (default 0.01)")
    p.add_argument("--port", type=int, default=None, help="dashboard port (default from config: 8050)")
    p.add_argument("--timeout", type=float, default=1800, help="give up waiting for training after this many seconds")
    stay = p.add_mutually_exclusive_group()
    stay.add_argument("--stay", dest="stay", action="store_true", default=None,
                      help="keep running after the work is done until Ctrl-C (default when attached to a terminal)")
    stay.add_argument("--exit-when-done", dest="stay", action="store_false",
                      help="stop everything once every example is trained (default when not on a terminal)")
    p.set_defaults(func=up)
