"""A long run of the whole stack under a steady live stream: does memory creep, does lag stay bounded, how do
disk use and fetch latency grow? (``streamrec bench soak``.)

A fresh durable :class:`deploy.stack.LocalStack` in a temporary data dir gets generated traffic at a fixed rate
(:class:`LiveStream`: chunk after chunk, each with a new seed so ids never repeat, every record sent when the
wall clock reaches its event time). Every few seconds a sample records, per process of the stack, resident
memory (``VmRSS`` from ``/proc/<pid>/status``, plus that of the process's descendants, if any) and CPU time;
per stage, the lag computed from what was produced and consumed, from the components' own counters on the
``service_stats`` topic (:class:`StatsFollower`; the broker's watermarks are not used: Tansu's are unreliable):

* ``replay -> labels``: replay ``events_produced + bad_records`` - labels ``events_in``;
* ``labels -> trainer``: labels ``examples_out`` - trainer ``examples_trained``;
* ``trainer -> store``: trainer ``examples_trained`` - prediction rows the metrics sink stored / 2 (its
  counters on the dashboard's ``/healthz``; the sink publishes no statistics).

It also records the disk use of the broker's storage directory (Tansu 0.6 writes one object per produced batch
and deletes nothing, and every fetch lists the objects of its partition), of chDB and of the other state, and
the delivery latency of ``service_stats`` messages (wall clock on receipt minus the report's own timestamp): a
fetch from a partition whose object count grows through the run, so it shows whether fetches get slower.

The stack's labels windows are short (5 s for clicks, 10 s for conversions: a ``--quick`` run needs examples
within seconds); the generator's delays are capped below them, so every example leaves 10 s after its
impression. Warm-up is the first third of the run, and lasts at least 15 s after the trainer's first example
(its first steps allocate what training needs: ~200 MB). Each generated chunk is a new world (users' and ads' hidden tastes drawn from its seed): the model's
quality is meaningless here, its resources are the point.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy.stack import LocalStack
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from config import Config, replace

log = logging.getLogger("streamrec.soak")
STAGES = ("replay -> labels", "labels -> trainer", "trainer -> store")
WARM_S = 15.0  # warm-up lasts at least this long after the trainer's first example
_TICK = os.sysconf("SC_CLK_TCK")


# ---- /proc ----------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "(comm) state"
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except OSError:
        return 0.0


def process_usage(pid: int, with_children: bool = True) -> tuple[float, float]:
    """(resident MB, CPU seconds) of ``pid`` plus, with ``with_children``, every descendant (their RSS summed:
    pages they share are counted once per process)."""
    pids = [pid, *(descendants(pid) if with_children else ())]
    return sum(_rss_kb(p) for p in pids) / 1024, sum(_cpu_s(p) for p in pids)


def dir_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path`` (0, 0 when it does not exist)."""
    size = files = 0
    stack = [str(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        size += e.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    return size, files


def slope(t_s, y, per_s: float = 600.0) -> float:
    """Least-squares slope of ``y`` over ``t_s`` (seconds), in units of y per ``per_s`` seconds (0 with fewer
    than two points).

    >>> round(slope([0, 60, 120, 180], [100, 101, 102, 103]), 6)  # 1 per minute
    10.0
    """
    t, v = np.asarray(t_s, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(t) < 2 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, v, 1)[0] * per_s)


# ---- the stream -----------------------------------------------------------------------------------------
class LiveStream(threading.Thread):
    """Generated traffic at ``rate`` impressions per second whose event times follow the wall clock.

    Chunks of ``chunk_s`` seconds are generated ahead, each with the next seed and starting where the last
    impression of the previous one was; their records (feedback of one chunk interleaves with the next one's
    impressions) wait in a heap by event time and each is produced once the wall clock reaches it, every
    ``tick_s``. ``stop()`` ends it and flushes. ``gen`` holds the generator's other settings (delays, bad rate).
    """

    def __init__(self, cfg: Config, rate: float, gen: dict, *, seed: int = 0, chunk_s: float = 20.0,
                 tick_s: float = 0.2):
        super().__init__(name="soak-stream", daemon=True)
        self.cfg, self.rate, self.gen, self.seed, self.chunk_s, self.tick_s = cfg, rate, gen, seed, chunk_s, tick_s
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self.chunks = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(120)

    def _chunk(self, start_ms: int) -> tuple[list[tuple[int, int, object]], int]:
        from streams.sources.generate import GeneratorConfig, simulate

        n = max(1, int(self.rate * self.chunk_s))
        g = GeneratorConfig(n_impressions=n, seed=self.seed + self.chunks, start_ts=start_ms,
                            impressions_per_s=self.rate, **self.gen)
        self.chunks += 1
        out, last, end = [], start_ms, start_ms
        for i, r in enumerate(simulate(g).records):
            last = getattr(r, "ts", last)  # a malformed record goes out with its neighbour
            out.append((last, i, r))
            if isinstance(r, schema.Impression):
                end = max(end, r.ts)
        return out, end + 1

    def run(self) -> None:
        from streams.sources.replay import Publisher

        try:
            with Publisher(self.cfg, progress=False, desc="soak") as pub:
                heap: list = []
                next_ms = int(time.time() * 1000)
                serial = 0
                while not self._halt.is_set():
                    now = int(time.time() * 1000)
                    while next_ms - now < self.chunk_s * 500:  # keep half a chunk generated ahead
                        records, next_ms = self._chunk(next_ms)
                        for ts, _, r in records:
                            heapq.heappush(heap, (ts, serial, r))
                            serial += 1
                    while heap and heap[0][0] <= now:
                        pub.send(heapq.heappop(heap)[2])
                    pub.heartbeat()
                    self._halt.wait(self.tick_s)
                pub.finish(watermark=False, timeout_s=120)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e


class StatsFollower(threading.Thread):
    """Follows ``service_stats``: each component's newest values (by report time) and, per message, the
    delivery latency (wall clock on receipt - the report's timestamp), taken with :meth:`take_latencies`."""

    def __init__(self, cfg: Config):
        super().__init__(name="soak-stats", daemon=True)
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "streamrec-soak", cfg.kafka.client)
        self.consumer.assign(kafka_io.topic_partitions([cfg.topics.service_stats], cfg.topics.partitions))
        self.latest: dict[str, dict[str, float]] = {}
        self._ts: dict[str, int] = {}
        self._lat: list[float] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            msg = self.consumer.poll(0.2)  # one at a time: a message is timed when it arrives, not in a batch
            if msg is None or msg.error() is not None:
                continue
            recv_ms = time.time() * 1000
            st = schema.decode(msg.value(), schema.ServiceStats)
            if not isinstance(st, schema.ServiceStats):
                continue
            with self._lock:
                self._lat.append(recv_ms - st.ts)
                if st.ts >= self._ts.get(st.component, 0):
                    self._ts[st.component] = st.ts
                    self.latest.setdefault(st.component, {}).update(st.values)

    def value(self, component: str, name: str) -> float:
        with self._lock:
            return self.latest.get(component, {}).get(name, 0.0)

    def take_latencies(self) -> list[float]:
        with self._lock:
            out, self._lat = self._lat, []
        return out

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.consumer.close()


# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    minutes: float
    rate: float
    t_s: list[float] = field(default_factory=list)  # sample times, seconds since the stream started
    rss_mb: dict[str, list[float]] = field(default_factory=dict)  # per process, per sample
    cpu_s: dict[str, list[float]] = field(default_factory=dict)
    lag: dict[str, list[float]] = field(default_factory=dict)  # per stage, per sample
    disk: dict[str, list[float]] = field(default_factory=dict)  # storage / chdb / state: bytes; objects: files
    delivery_p50_ms: list[float] = field(default_factory=list)
    trainer_p50_ms: list[float] = field(default_factory=list)  # labelled -> trained, as the trainer reports it
    trained: list[float] = field(default_factory=list)  # the trainer's examples_trained, per sample
    totals: dict[str, float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def warm(self) -> int:
        """Index of the first sample after warm-up: the first third of the run, and at least :data:`WARM_S`
        after the trainer's first example (its first steps allocate what training needs)."""
        if not self.t_s:
            return 0
        first = next((t for t, n in zip(self.t_s, self.trained) if n > 0), self.t_s[-1])
        start = max(self.t_s[-1] / 3, first + WARM_S)
        return next((i for i, t in enumerate(self.t_s) if t >= start), len(self.t_s) - 1)


def _sink_rows(url: str) -> float:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as r:
            return float(json.load(r)["counters"].get("rows_predictions", 0))
    except (OSError, ValueError, KeyError):
        return float("nan")


def run_soak(cfg: Config, data_dir: Path, *, minutes: float, rate: float, sample_s: float = 5.0,
             tick_s: float = 1.0, progress=print) -> SoakResult:
    """One soak run in a fresh durable stack under ``data_dir`` (see the module docstring)."""
    cfg = replace(cfg, data_dir=str(data_dir), kafka={"bootstrap_servers": ""},
                  labels={"click_window_s": 5, "conversion_window_s": 10})
    gen = {"max_click_delay_s": 4.0, "max_conversion_delay_s": 9.0, "bad_rate": 0.001}
    stack = LocalStack(cfg, data_dir / "runs" / "soak", fresh=True, port=free_port())
    res = SoakResult(minutes=minutes, rate=rate)
    stream = follower = None
    try:
        cfg = stack.start()
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        follower = StatsFollower(cfg)
        follower.start()
        _wait_ready(stack, follower)  # the clock starts with a running stack, not with torch's import
        stream = LiveStream(cfg, rate, gen, seed=1000, tick_s=tick_s)
        stream.start()
        t0 = time.monotonic()
        end = t0 + minutes * 60
        state_dirs = [stack.dirs[k] for k in ("labels", "stats", "checkpoints")]
        next_t = t0
        while True:
            next_t += sample_s
            time.sleep(max(0.0, next_t - time.monotonic()))
            if stream.error is not None:
                raise RuntimeError(f"soak: the stream failed: {stream.error}") from stream.error
            _sample(res, stack, follower, url, data_dir, state_dirs, time.monotonic() - t0)
            if len(res.t_s) % max(1, int(60 / sample_s)) == 0:
                progress(_progress_line(res))
            if time.monotonic() >= end:
                break
        f = follower
        res.totals = {"impressions": f.value("replay", "impressions"), "events": f.value("replay", "events_produced"),
                      "examples_out": f.value("labels", "examples_out"),
                      "trained": f.value("trainer", "examples_trained"), "stored_rows": _sink_rows(url)}
    finally:
        if stream is not None:
            stream.stop()
        if follower is not None:
            follower.stop()
        stack.stop()
        res.restarts = {c.name: c.restarts for c in stack.sup.children} if stack.sup else {}
    return res


def _wait_ready(stack: LocalStack, follower: StatsFollower, timeout: float = 180.0) -> None:
    """Until the labels dataflow and the trainer have each published statistics (they are running)."""
    deadline = time.monotonic() + timeout
    while not all(follower.latest.get(c) for c in ("labels", "trainer")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak: the stack did not start within {timeout:.0f}s (logs in {stack.run_dir})")
        stack.sup.check()
        time.sleep(0.2)


def _sample(res: SoakResult, stack: LocalStack, follower: StatsFollower, url: str, data_dir: Path,
            state_dirs: list[Path], t: float) -> None:
    res.t_s.append(t)
    for child in stack.sup.children:
        rss, cpu = process_usage(child.proc.pid) if child.alive() else (float("nan"), float("nan"))
        res.rss_mb.setdefault(child.name, []).append(rss)
        res.cpu_s.setdefault(child.name, []).append(cpu)
    rss, cpu = process_usage(os.getpid(), with_children=False)  # this process: stream + sampler, not the stack
    res.rss_mb.setdefault("(soak driver)", []).append(rss)
    res.cpu_s.setdefault("(soak driver)", []).append(cpu)
    v = follower.value
    stored = _sink_rows(url) / 2
    lags = (v("replay", "events_produced") + v("replay", "bad_records") - v("labels", "events_in"),
            v("labels", "examples_out") - v("trainer", "examples_trained"),
            v("trainer", "examples_trained") - stored)
    for stage, lag in zip(STAGES, lags):
        res.lag.setdefault(stage, []).append(max(lag, 0.0))  # reports of a moment apart: a few can cross
    size, files = dir_usage(stack.dirs["topics"])
    res.disk.setdefault("storage", []).append(size)
    res.disk.setdefault("objects", []).append(files)
    res.disk.setdefault("chdb", []).append(dir_usage(data_dir / "chdb")[0])
    res.disk.setdefault("state", []).append(sum(dir_usage(d)[0] for d in state_dirs))
    lat = follower.take_latencies()
    res.delivery_p50_ms.append(float(np.median(lat)) if lat else float("nan"))
    res.trainer_p50_ms.append(v("trainer", "emitted_to_trained_p50_ms") or float("nan"))
    res.trained.append(v("trainer", "examples_trained"))


def _progress_line(res: SoakResult) -> str:
    rss = ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.rss_mb.items())
    lag = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in res.lag.items())
    return (f"{res.t_s[-1] / 60:5.1f} min: RSS MB {rss}; lag {lag}; storage {res.disk['storage'][-1] / 2**20:.0f} MB "
            f"in {res.disk['objects'][-1]:,.0f} objects; service_stats delivery p50 {res.delivery_p50_ms[-1]:.0f} ms")


def summary(res: SoakResult) -> dict:
    """Per process and stage, the figures the table and the JSON line report (see benchmarks/soak.py)."""
    w = res.warm()
    t = np.asarray(res.t_s[w:])
    procs = {}
    for name, series in res.rss_mb.items():
        y = np.asarray(series[w:], dtype=np.float64)
        ok = np.isfinite(y)
        s = slope(t[ok], y[ok])
        base = float(y[ok][0]) if ok.any() else float("nan")
        cpu = np.asarray(res.cpu_s[name], dtype=np.float64)
        cores = (cpu[-1] - cpu[w]) / max(res.t_s[-1] - res.t_s[w], 1e-9) if len(cpu) > w else float("nan")
        procs[name] = {"rss_warm_mb": round(base, 1), "rss_end_mb": round(float(y[ok][-1]), 1) if ok.any() else None,
                       "rss_peak_mb": round(float(np.nanmax(series)), 1),
                       "slope_mb_per_10min": round(s, 2), "slope_pct_per_10min": round(100 * s / base, 2) if base else None,
                       "cpu_cores": round(float(cores), 2)}
    stages = {}
    for k, v in res.lag.items():  # NaN: the dashboard did not answer that sample
        a = np.asarray(v, dtype=np.float64)
        fin = a[np.isfinite(a)]
        behind = a > res.rate * 60  # more than a minute of input behind
        tail = len(a) - int(np.argmin(behind[::-1])) if behind[-1] else None  # first sample of the final run
        stages[k] = {"max": float(fin.max()) if fin.size else float("nan"),
                     "final": float(fin[-1]) if fin.size else float("nan"),
                     "p50_after_warmup": float(np.nanmedian(a[w:])) if np.isfinite(a[w:]).any() else float("nan"),
                     "behind_since_s": None if tail is None else (res.t_s[tail] if tail < len(a) else res.t_s[0])}
    disk = {k: {"warm": float(v[w]), "end": float(v[-1]), "per_10min": slope(t, v[w:])} for k, v in res.disk.items()}
    lat = np.asarray(res.delivery_p50_ms[w:], dtype=np.float64)
    tr = np.asarray(res.trainer_p50_ms[w:], dtype=np.float64)
    k = max(1, len(lat) // 10)  # first and last tenth after warm-up
    latency = {"delivery_p50_ms": (_median(lat[:k]), _median(lat[-k:])),
               "delivery_slope_ms_per_10min": slope(t[np.isfinite(lat)], lat[np.isfinite(lat)]),
               "trainer_p50_ms": (_median(tr[:k]), _median(tr[-k:]))}
    return {"processes": procs, "stages": stages, "disk": disk, "latency": latency}


def _median(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")
