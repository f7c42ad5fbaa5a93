"""``streamrec audience``: the simulated audience driving ``streamrec serve`` (the closed loop of issue 16).

A paced loop draws requests from the generator's users (:class:`streams.sources.audience.Audience`), each
with candidate ads alive now, and posts them to ``POST /rank`` at ``--rate`` requests/s with ``--concurrency``
connections. For every ad served (the response's ``ads``, each at its ``position``) the audience decides,
with the world's true probabilities, whether the user clicks and converts and when; the feedback is produced
to ``topics.clicks`` / ``topics.conversions`` when it is due (the compressed delay has passed on the wall
clock), with ``impression_id = f"{request_id}.{position}"`` -- the event id of the impression the service
emitted for that ad -- keyed and partitioned by user like every input record
(:func:`streams.bus.partition.partition_for`), so the labels join meets it with its impression.

Per arm (the response's ``arm``) it counts requests, served ads, clicks and conversions (when produced) and
the oracle: the mean true ``p_click`` / ``p_conversion`` of what the arm served. About once a second these go
out as ``ServiceStats(component="audience")`` (``requests.<arm>``, ``served.<arm>``, ``clicks.<arm>``,
``conversions.<arm>``, ``true_p_click.<arm>``, ``true_p_conversion.<arm>``, ``model_version.<arm>``, totals,
errors per status, latency); a table is printed at the end (:func:`table`).

Crash safety: at-least-once. Every second the driver writes its counters and the feedback not yet due to
``--state`` (atomically, after flushing the producer); a restarted driver resumes them. Feedback produced
after the last snapshot is produced again: the labels join drops a second click or conversion with the same
event id (``clk-<impression id>``; its dead letter says "duplicate event_id"), and one of an impression
already labelled ("late click"), so a redelivery never counts twice. Requests of the last second before a
crash may lose their feedback (their impressions are then labelled negative).
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from config import NO_BROKER, Config
from streams import schema
from streams.bus import kafka_io
from streams.bus.partition import partition_for
from streams.names import Component, Stat
from streams.sources import scenarios
from streams.sources.audience import Audience, Outcome, Request
from streams.sources.generate import GeneratorConfig, START_TS_MS

log = logging.getLogger("streamrec.audience")


@dataclass
class ArmStats:
    """One arm's counters: the online outcome and the oracle's view of what it served."""

    requests: int = 0
    served: int = 0
    clicks: int = 0  # produced (due), the online CTR's numerator
    conversions: int = 0
    decided_clicks: int = 0  # decided at serve time, produced or still pending
    decided_conversions: int = 0
    p_click_sum: float = 0.0
    p_conversion_sum: float = 0.0

    @property
    def ctr(self) -> float:
        return self.clicks / self.served if self.served else float("nan")

    @property
    def cvr(self) -> float:
        return self.conversions / self.clicks if self.clicks else float("nan")

    @property
    def true_p_click(self) -> float:
        return self.p_click_sum / self.served if self.served else float("nan")

    @property
    def true_p_conversion(self) -> float:
        return self.p_conversion_sum / self.served if self.served else float("nan")

    def ctr_ci(self, z: float = 1.96) -> float:
        """Half width of the normal-approximation confidence interval of the online CTR."""
        if not self.served:
            return float("nan")
        p = self.ctr
        return z * (p * (1 - p) / self.served) ** 0.5


@dataclass
class DriverStats:
    arms: dict[str, ArmStats] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # HTTP status (or "conn") -> count
    unknown_ads: int = 0  # served ads the audience's world does not have (the service retrieved them)
    model_version: dict[str, int] = field(default_factory=dict)  # per arm: the newest version that served it
    latencies_ms: list[float] = field(default_factory=list)  # since the last report

    def arm(self, name: str) -> ArmStats:
        return self.arms.setdefault(name, ArmStats())

    def values(self, pending: int) -> dict[str, float]:
        """The ``ServiceStats`` values (see the module docstring)."""
        out: dict[str, float] = {}
        tot = ArmStats()
        for name, a in self.arms.items():
            out[f"{Stat.REQUESTS}.{name}"] = float(a.requests)
            out[f"{Stat.SERVED}.{name}"] = float(a.served)
            out[f"{Stat.CLICKS}.{name}"] = float(a.clicks)
            out[f"{Stat.CONVERSIONS}.{name}"] = float(a.conversions)
            if a.served:
                out[f"{Stat.TRUE_P_CLICK}.{name}"] = a.true_p_click
                out[f"{Stat.TRUE_P_CONVERSION}.{name}"] = a.true_p_conversion
            for f in ("requests", "served", "clicks", "conversions", "p_click_sum", "p_conversion_sum"):
                setattr(tot, f, getattr(tot, f) + getattr(a, f))
        out.update({Stat.REQUESTS: float(tot.requests), Stat.SERVED: float(tot.served),
                    Stat.CLICKS: float(tot.clicks), Stat.CONVERSIONS: float(tot.conversions),
                    Stat.PENDING_FEEDBACK: float(pending),
                    Stat.REQUEST_ERRORS: float(sum(self.errors.values()))})
        for status, n in self.errors.items():
            out[f"{Stat.REQUEST_ERRORS}.{status}"] = float(n)
        for name, v in self.model_version.items():
            out[f"{Stat.MODEL_VERSION}.{name}"] = float(v)
        if self.latencies_ms:
            lat = sorted(self.latencies_ms)
            out[Stat.LATENCY_P50_MS] = lat[len(lat) // 2]
            out[Stat.LATENCY_P99_MS] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return out


def arms_from_values(values: dict[str, float]) -> dict[str, ArmStats]:
    """Per-arm stats from an ``audience`` ``ServiceStats`` report (what ``streamrec up --serve`` prints)."""
    arms: dict[str, ArmStats] = {}
    for key, v in values.items():
        stat, dot, arm = key.partition(".")
        if not dot or stat not in (Stat.REQUESTS, Stat.SERVED, Stat.CLICKS, Stat.CONVERSIONS, Stat.TRUE_P_CLICK,
                                   Stat.TRUE_P_CONVERSION):
            continue
        a = arms.setdefault(arm, ArmStats())
        if stat == Stat.TRUE_P_CLICK:
            a.p_click_sum = v  # a mean until multiplied by served below
        elif stat == Stat.TRUE_P_CONVERSION:
            a.p_conversion_sum = v
        else:
            setattr(a, str(stat), int(v))
    for a in arms.values():
        a.p_click_sum *= a.served
        a.p_conversion_sum *= a.served
    return arms


def table(arms: dict[str, ArmStats]) -> str:
    """Per arm: requests, served ads, online CTR (95% CI) and CVR, the oracle's mean true p_click and
    p_conversion; then which arm the oracle prefers and which the online CTR prefers."""
    lines = ["arm            requests    served   clicks  conv   online CTR (95% CI)     CVR    "
             "oracle p_click  p_conv"]
    for name, a in sorted(arms.items()):
        lines.append(f"{name:<12} {a.requests:>10,} {a.served:>9,} {a.clicks:>8,} {a.conversions:>5,}   "
                     f"{a.ctr:6.4f} +- {a.ctr_ci():6.4f}    {a.cvr:6.4f}   {a.true_p_click:6.4f}          "
                     f"{a.true_p_conversion:6.4f}")
    lines.append(verdict(arms))
    return "\n".join(lines)


def verdict(arms: dict[str, ArmStats]) -> str:
    """Which arm the oracle prefers (highest mean true p_click served) and which the online CTR prefers."""
    live = {n: a for n, a in arms.items() if a.served}
    if len(live) < 2:
        return "one arm served: nothing to compare" if live else "nothing served"
    oracle = max(live, key=lambda n: live[n].true_p_click)
    online = max(live, key=lambda n: live[n].ctr)
    agree = "agree" if oracle == online else "DISAGREE"
    return f"oracle prefers {oracle}; online CTR prefers {online} ({agree})"


class Driver:
    """Sends the audience's requests to the ranking service and produces the feedback (module docstring).

    ``until_ms``: wall-clock end (None: until :meth:`stop`). ``candidates``: per request (0: the service
    retrieves its own). ``state``: the snapshot file of crash safety (None: none).
    """

    def __init__(self, cfg: Config, audience: Audience, url: str, *, rate: float = 20.0, concurrency: int = 4,
                 k: int = 10, candidates: int = 100, until_ms: int | None = None, state: Path | None = None,
                 report_every_s: float = 1.0, timeout_s: float = 10.0):
        if not rate > 0 or concurrency < 1 or k < 1 or candidates < 0:
            raise ValueError(f"audience: bad rate {rate}, concurrency {concurrency}, k {k} or candidates "
                             f"{candidates}")
        self.cfg, self.audience, self.rate, self.concurrency = cfg, audience, rate, concurrency
        self.k, self.n_candidates, self.until_ms, self.state_path = k, candidates, until_ms, state
        self.report_every_s, self.timeout_s = report_every_s, timeout_s
        u = urlsplit(url if "//" in url else f"http://{url}")
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.stats = DriverStats()
        self.lock = threading.Lock()
        # heap of (due ts, seq, arm, topic kind "click" | "conversion", user key, encoded event)
        self.pending: list[tuple[int, int, str, str, bytes, bytes]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=concurrency)
        self.producer = kafka_io.make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.client)
        self._restore()

    # -- HTTP -------------------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def ready(self) -> bool:
        """Whether ``GET /readyz`` answers 200 (every non-shadow arm has a model)."""
        conn = self._connect()
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.ready():
                return True
            self._stop.wait(0.5)
        return False

    def _worker(self) -> None:
        conn = self._connect()
        while True:
            req = self._queue.get()
            if req is None:
                conn.close()
                return
            body = req.body(self.audience.candidates(req, self.n_candidates) if self.n_candidates else None, self.k)
            t0 = time.monotonic()
            try:
                conn.request("POST", "/rank", body=json.dumps(body), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                log.debug("request %s: %s", req.request_id, e)
                conn.close()
                conn = self._connect()
                with self.lock:
                    self.stats.errors["conn"] = self.stats.errors.get("conn", 0) + 1
                continue
            latency = (time.monotonic() - t0) * 1000
            if status != 200:
                with self.lock:
                    self.stats.errors[str(status)] = self.stats.errors.get(str(status), 0) + 1
                if status >= 500 or status == 413:
                    log.debug("request %s: %s %s", req.request_id, status, data[:200])
                else:  # a 4xx is the audience's bug (or the service's): say it once in a while
                    log.warning("request %s: %s %s", req.request_id, status, data[:200])
                continue
            try:
                self._served(req, json.loads(data), latency)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("request %s: unexpected response %s: %s", req.request_id, data[:200], e)
                with self.lock:
                    self.stats.errors["bad_response"] = self.stats.errors.get("bad_response", 0) + 1

    def _served(self, req: Request, resp: dict, latency_ms: float) -> None:
        arm = str(resp["arm"])
        served = [(int(a["ad_id"]), int(a["position"])) for a in resp["ads"]]
        known = [(a, p) for a, p in served if self.audience.knows(a)]
        outcomes = self.audience.respond(req, known)
        with self.lock:
            st = self.stats.arm(arm)
            st.requests += 1
            st.served += len(known)
            version = int(resp.get("model_version", 0))
            self.stats.model_version[arm] = max(version, self.stats.model_version.get(arm, 0))
            self.stats.unknown_ads += len(served) - len(known)
            self.stats.latencies_ms.append(latency_ms)
            for o in outcomes:
                st.p_click_sum += o.p_click
                st.p_conversion_sum += o.p_conversion
                self._schedule(arm, o)

    def _schedule(self, arm: str, o: Outcome) -> None:
        st = self.stats.arm(arm)
        for ev in o.events():
            kind = "click" if isinstance(ev, schema.Click) else "conversion"
            if kind == "click":
                st.decided_clicks += 1
            else:
                st.decided_conversions += 1
            self._seq += 1
            heapq.heappush(self.pending, (ev.ts, self._seq, arm, kind, schema.user_key(ev), schema.encode(ev)))

    # -- feedback and reports ---------------------------------------------------------------------------

    def _produce_due(self, now_ms: int) -> int:
        """Produce the feedback due by ``now_ms``; returns how many."""
        due = []
        with self.lock:
            while self.pending and self.pending[0][0] <= now_ms:
                due.append(heapq.heappop(self.pending))
        parts, topics = self.cfg.topics.partitions, self.cfg.topics
        for _, _, arm, kind, key, raw in due:
            topic = topics.clicks if kind == "click" else topics.conversions
            kafka_io.produce(self.producer, topic, raw, key=key, partition=partition_for(key, parts))
        if due:
            with self.lock:
                for _, _, arm, kind, _, _ in due:
                    st = self.stats.arm(arm)
                    if kind == "click":
                        st.clicks += 1
                    else:
                        st.conversions += 1
        self.producer.poll(0)
        return len(due)

    def report(self) -> None:
        """Publish the stats and (with ``state``) snapshot counters and pending feedback, after a flush: the
        snapshot never claims feedback that was not delivered."""
        kafka_io.flush_all(self.producer, "audience feedback", log)
        with self.lock:
            values = self.stats.values(len(self.pending))
            self.stats.latencies_ms = []
            snap = None
            if self.state_path is not None:
                snap = {"arms": {n: {f: getattr(a, f) for f in ArmStats.__dataclass_fields__}
                                 for n, a in self.stats.arms.items()},
                        "errors": dict(self.stats.errors), "until_ms": self.until_ms,
                        "pending": [[ts, arm, kind, key.decode(), raw.decode()]
                                    for ts, _, arm, kind, key, raw in self.pending]}
        st = schema.ServiceStats(component=Component.AUDIENCE, ts=int(time.time() * 1000), values=values)
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st))
        self.producer.poll(0)
        if snap is not None:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, self.state_path)

    def _restore(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            snap = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("audience state %s unreadable (%s): starting afresh", self.state_path, e)
            return
        for name, fields in snap.get("arms", {}).items():
            self.stats.arms[name] = ArmStats(**fields)
        self.stats.errors = dict(snap.get("errors", {}))
        for ts, arm, kind, key, raw in snap.get("pending", []):
            self._seq += 1
            heapq.heappush(self.pending, (int(ts), self._seq, arm, kind, key.encode(), raw.encode()))
        log.info("audience: resumed %d arms' counters and %d pending feedback events from %s", len(self.stats.arms),
                 len(self.pending), self.state_path)

    def _feedback_loop(self) -> None:
        next_report = time.monotonic() + self.report_every_s
        while not self._stop.wait(0.02):
            self._produce_due(int(time.time() * 1000))
            if time.monotonic() >= next_report:
                next_report += self.report_every_s
                self.report()

    # -- the loop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, drain_s: float | None = None) -> dict[str, ArmStats]:
        """Send requests until ``until_ms`` (or :meth:`stop`), then wait up to ``drain_s`` (default: the
        longest compressed click delay) for the feedback still pending, produce it, report, and return the
        per-arm stats."""
        workers = [threading.Thread(target=self._worker, name=f"audience-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for t in workers:
            t.start()
        feedback = threading.Thread(target=self._feedback_loop, name="audience-feedback", daemon=True)
        feedback.start()
        interval, next_t = 1.0 / self.rate, time.monotonic()
        try:
            while not self._stop.is_set():
                now_ms = int(time.time() * 1000)
                if self.until_ms is not None and now_ms >= self.until_ms:
                    break
                req = self.audience.requests(1, ts=now_ms)[0]
                while not self._stop.is_set():  # a slow service slows the audience (never an unbounded queue)
                    try:
                        self._queue.put(req, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                next_t += interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -1.0:  # more than a second behind: do not burst to catch up
                    next_t = time.monotonic()
        finally:
            for _ in workers:
                self._queue.put(None)
            for t in workers:
                t.join(self.timeout_s + 1)
            self._stop.set()
            feedback.join()
        drain_s = self.audience.max_feedback_delay_ms()[0] / 1000 + 0.5 if drain_s is None else drain_s
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            self._produce_due(int(time.time() * 1000))
            with self.lock:
                if not self.pending:
                    break
            time.sleep(0.02)
        self.report()
        with self.lock:
            return {n: ArmStats(**vars(a)) for n, a in self.stats.arms.items()}


# -- CLI ----------------------------------------------------------------------------------------------------

def add_cli(sub: argparse._SubParsersAction) -> None:
    g0 = GeneratorConfig()
    p = sub.add_parser("audience", help="simulated users sending requests to `streamrec serve` and clicking",
                       description="Drive the ranking service with the generator's users: requests with candidate "
                                   "ads alive now, at --rate per second; the hidden tastes decide clicks and "
                                   "conversions on what was served, produced to the clicks/conversions topics when "
                                   "their (compressed) delay is due. Prints per arm the online CTR and CVR and the "
                                   "oracle's mean true p_click of what each arm served. `streamrec up --serve` "
                                   "runs it for you.")
    p.add_argument("--url", default=None, help="the service (default http://serving.host:serving.port)")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default %(default)s)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run; 0: until stopped (default 60)")
    p.add_argument("--until-ms", type=int, default=None, help="run until this wall-clock time (ms); wins over "
                                                              "--seconds (a restarted driver keeps the end)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default %(default)s)")
    p.add_argument("-k", type=int, default=10, help="ads served per request (default %(default)s)")
    p.add_argument("--candidates", type=int, default=100,
                   help="candidate ads per request, alive now, by popularity; 0: the service retrieves (default "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed: the one of the generated warm-up log "
                                                       "(default 0)")
    p.add_argument("--scenario", default="none", choices=scenarios.SCENARIOS, help="the world's drift scenario")
    p.add_argument("--scenario-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--start-ts", type=int, default=START_TS_MS,
                   help="the warm-up log's first event time, ms (the seasonal cycle's origin)")
    p.add_argument("--drift-seconds", type=float, default=None,
                   help="play the scenario over this many seconds of serving (default: the world stays as the "
                        "warm-up log left it)")
    p.add_argument("--time-scale", type=float, default=60.0,
                   help="feedback delays divided by this (default %(default)s: a minute of delay passes in a second)")
    p.add_argument("--users", type=int, default=g0.n_users, help="users in the world (default %(default)s)")
    p.add_argument("--ads", type=int, default=g0.n_ads, help="ads in the world (default %(default)s)")
    p.add_argument("--state", metavar="FILE", default=None,
                   help="snapshot file: a restarted driver resumes its counters and pending feedback")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="wait this long for the service's /readyz before giving up (default %(default)s s)")
    p.set_defaults(func=run)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec audience: {NO_BROKER}", file=sys.stderr)
        return 2
    try:
        g = GeneratorConfig(seed=args.seed, n_users=args.users, n_ads=args.ads, start_ts=args.start_ts,
                            scenario=scenarios.parse_params(args.scenario, args.scenario_param))
        aud = Audience(g, time_scale=args.time_scale, run_s=args.drift_seconds)
        until = args.until_ms if args.until_ms is not None else (
            int(time.time() * 1000 + args.seconds * 1000) if args.seconds > 0 else None)
        url = args.url or f"http://{cfg.serving.host}:{cfg.serving.port}"
        driver = Driver(cfg, aud, url, rate=args.rate, concurrency=args.concurrency, k=args.k,
                        candidates=args.candidates, until_ms=until, state=Path(args.state) if args.state else None)
    except ValueError as e:
        print(f"streamrec audience: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"audience: waiting for {url}/readyz", file=sys.stderr)
        if not driver.wait_ready(args.ready_timeout):
            print(f"streamrec audience: {url} not ready within {args.ready_timeout:.0f}s (is `streamrec serve` "
                  "running, with a published model for every arm?)", file=sys.stderr)
            return 1
        print(f"audience: {args.rate:g} requests/s to {url}"
              + (f" until {time.strftime('%H:%M:%S', time.localtime(until / 1000))}" if until else ""),
              file=sys.stderr)
        arms = driver.run()
    except KeyboardInterrupt:
        driver.stop()
        driver.report()
        arms = driver.stats.arms
    print(table(arms))
    return 0
