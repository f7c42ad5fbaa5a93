"""``streamrec up``: the whole local stack as one supervised command, fed by the generator or a replayed log.

With ``--serve`` the loop closes: one trainer per arm of ``serving.arms`` publishes model versions, ``streamrec
serve`` ranks with them, and after the warm-up log is trained the simulated audience (:mod:`deploy.audience`)
sends the generator's users to the service for ``--serve-seconds``; what it served is labelled from the
audience's clicks and trained on. The summary compares the arms: online CTR and CVR, and the oracle's mean
true p_click of what each served.

With ``--with-fm`` the stack trains a foundation model and its students (docs/transfer.md): the FM's trainer
publishes its predictions as teacher predictions, the ``distill`` dataflow joins them to the examples, and one
vertical model (or one per ``--vm-domains`` group) trains on the distilled examples. The summary gives each
model's examples trained and the join's teacher coverage and teacher age.

Progress comes from the ``service_stats`` topic every component publishes to. Ctrl-C (or the end of the work
when not attached to a terminal) stops producers first, then the trainer, the dataflows, the dashboard, the
broker and its storage. Run again, a durable stack (the default) continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from deploy.stack import LocalStack, StatsWatcher
from deploy.supervisor import Supervisor
from config import Config, replace
from streams.sources import scenarios

log = logging.getLogger("streamrec.up")
SETTLE_S = 5.0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def warmup_config(events: int, seed: int, bad_rate: float, scenario: scenarios.ScenarioConfig,
                  now_ms: int | None = None):
    """The generator's configuration of the warm-up log (see :func:`generated_log`); the simulated audience
    draws its world from the same one."""
    from streams.sources.generate import GeneratorConfig

    g = GeneratorConfig()
    span_ms = int(events / g.impressions_per_s * 1000) + int(g.max_conversion_delay_s * 1000)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return GeneratorConfig(n_impressions=events, seed=seed, bad_rate=bad_rate, start_ts=now_ms - span_ms,
                           scenario=scenario)


def generated_log(events: int, seed: int, bad_rate: float, scenario: scenarios.ScenarioConfig,
                  now_ms: int | None = None) -> list:
    """A generated log whose every event, feedback included, lies in the past: its impressions end one
    longest feedback delay ago and its last conversions now (events stamped after the wall clock would be the
    stack's future)."""
    from streams.sources.generate import simulate

    return simulate(warmup_config(events, seed, bad_rate, scenario, now_ms)).records


def _produce(cfg: Config, args, seed: int) -> tuple[int, int, int]:
    """Generate or replay into the input topics. Returns (good impressions, bad records, the generator's
    start ts: the seasonal cycle's origin for the audience)."""
    from streams.sources.generate import START_TS_MS

    if args.replay:
        from streams.sources.replay import replay_file

        stats = replay_file(cfg, args.replay, speed=args.speed, progress=True)
        return stats.impressions, stats.dead_letters + stats.bad_records, START_TS_MS
    from streams.sources.generate import simulate
    from streams.sources.replay import produce

    g = warmup_config(args.events, seed, args.bad_rate, scenarios.parse_params(args.scenario, args.scenario_param))
    stats = produce(cfg, simulate(g).records, progress=True)
    return args.events, stats.bad_records, g.start_ts


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
    try:
        scenarios.parse_params(args.scenario, args.scenario_param)
    except ValueError as e:
        print(f"streamrec up: {e}", file=sys.stderr)
        return 2
    if args.serve:
        if args.serve_port:
            cfg = replace(cfg, serving={"port": args.serve_port})
        if not _port_free(cfg.serving.host, cfg.serving.port):
            print(f"streamrec up: {cfg.serving.host}:{cfg.serving.port} (the ranking service) is in use; stop what "
                  "holds it, or pass --serve-port", file=sys.stderr)
            return 2
        if not args.serve_rate > 0 or args.serve_seconds < 0 or not args.serve_time_scale > 0 \
                or args.serve_label_after < 0:
            print("streamrec up: --serve-rate and --serve-time-scale must be > 0, --serve-seconds and "
                  "--serve-label-after >= 0", file=sys.stderr)
            return 2
        if args.serve_label_after > 0:  # served traffic is labelled (and trained on) while the audience runs
            cfg = replace(cfg, labels={"policy": "elapsed", "elapsed_s": int(math.ceil(args.serve_label_after))})
            print(f"labels: policy elapsed, {cfg.labels.elapsed_s}s after each impression (late clicks and "
                  "conversions follow as corrections), so served traffic is trained on during the run "
                  "(--serve-label-after 0 keeps the configured policy)", file=sys.stderr)
    try:
        groups = vm_groups(args.vm_domains)
    except ValueError as e:
        print(f"streamrec up: {e}", file=sys.stderr)
        return 2
    if (groups != ((),) or args.with_fm) and (args.serve or not args.with_fm):
        print("streamrec up: " + ("--with-fm and --serve do not combine yet" if args.serve
                                  else "--vm-domains needs --with-fm"), file=sys.stderr)
        return 2
    run_dir = Path(cfg.data_dir, "runs", time.strftime("%Y%m%d-%H%M%S")).resolve()
    stack = LocalStack(cfg, run_dir, ephemeral=args.ephemeral, fresh=args.fresh, port=port, serve=args.serve,
                       with_fm=args.with_fm, vm_groups=groups)
    watcher = None
    started_ms = int(time.time() * 1000)
    # SIGTERM behaves like Ctrl-C so `kill` of the supervisor also stops everything in order. SIGINT gets the
    # same explicit handler: a shell starts background jobs with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt (`streamrec up --stay &` ignored `kill -INT`).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        cfg = stack.start()
        print(stack.describe(), file=sys.stderr)
        sup = stack.sup
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        print(f"dashboard: {url}   (logs: {run_dir})", file=sys.stderr)
        watcher = StatsWatcher(cfg, since_ms=started_ms, expect_arms=stack.trainer_arms)
        seed = args.seed if args.seed is not None else stack.next_seed()
        if not args.replay:
            print(f"generating {args.events:,} impressions (seed {seed}, scenario {args.scenario})", file=sys.stderr)
        t0 = time.monotonic()
        expected, bad, start_ts = _produce(cfg, args, seed)
        trained = _follow(sup, watcher, expected, args.timeout)
        ok = trained is not None and _ingested(sup, url, 2 * trained, started_ms)
        elapsed = time.monotonic() - t0
        _summary(watcher, sup, bad, elapsed, ok)
        if args.with_fm:
            print(fm_summary(watcher), file=sys.stderr)
        if args.serve and trained is not None:
            ok = _serve(stack, watcher, cfg, args, seed, start_ts, run_dir) and ok
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
        stack.stop()
        print("stopped: no process left running" + ("" if not stack.durable else
              "; `streamrec up` again continues from here"), file=sys.stderr)


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
        labelled, trained = watcher.value("labels", "examples_out"), watcher.trained()
        for name, n in (("labelled", labelled), ("trained", trained)):
            bar = bars[name]
            n = max(0, int(n))  # a restored counter can trail the last report until it has re-counted
            if n != bar.n and not bar.disable:
                bar.n = n
                bar.refresh()
                if bar.n >= expected:
                    bar.close()  # frozen at its own finish: later redraws would divide by a longer time
        if trained >= expected:
            return True
        if not (labelled > 0 and trained >= labelled and watcher.gauge("labels", "pending_impressions") == 0):
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
    trained = int(watcher.trained())
    if trained < expected:
        log.warning("%d of %d impressions became no example: the labels dataflow dead-lettered them "
                    "(see the dashboard's dead letters)", expected - trained, expected)
    return trained


def _serve(stack: LocalStack, watcher: StatsWatcher, cfg: Config, args, seed: int, start_ts: int,
           run_dir: Path) -> bool:
    """The closed loop's serving phase: the simulated audience drives the ranking service for
    ``--serve-seconds`` (0: until Ctrl-C); then the per-arm table. True when something was served."""
    from deploy.audience import arms_from_values, table

    until = int(time.time() * 1000 + args.serve_seconds * 1000) if args.serve_seconds > 0 else None
    aud_args = ["--seed", str(seed), "--scenario", args.scenario, "--start-ts", str(start_ts),
                "--rate", f"{args.serve_rate:g}", "--time-scale", f"{args.serve_time_scale:g}",
                "--state", str(run_dir / "audience-state.json"),
                "--url", f"http://{cfg.serving.host}:{cfg.serving.port}"]
    aud_args += [a for p in args.scenario_param for a in ("--scenario-param", p)]
    aud_args += ["--until-ms", str(until)] if until is not None else ["--seconds", "0"]
    arms = [a.name + (" (shadow)" if a.shadow else f" {a.share:.0%}") for a in cfg.serving.arms]
    print(f"serving on {cfg.serving.host}:{cfg.serving.port}, arms {', '.join(arms)}; the audience sends "
          f"{args.serve_rate:g} requests/s " + (f"for {args.serve_seconds:g}s" if until else "until Ctrl-C"),
          file=sys.stderr)
    watcher.poll()
    trained0 = watcher.trained()
    child = stack.start_audience(aud_args)
    last_line = time.monotonic()

    def finished() -> bool:
        nonlocal last_line
        values = watcher.poll().get("audience", {})
        if time.monotonic() - last_line >= 10 and values:
            last_line = time.monotonic()
            per_arm = arms_from_values(values)
            print("audience: " + "; ".join(f"{n} {a.requests:,} requests, {a.served:,} served, {a.clicks:,} clicks"
                                            for n, a in sorted(per_arm.items())), file=sys.stderr)
        return child.finished

    # the audience first waits (up to its --ready-timeout, 300 s) for every arm's first published model
    timeout = (args.serve_seconds if until else 10 ** 9) + 360
    try:
        done = stack.sup.wait_until(finished, timeout)
    except KeyboardInterrupt:
        child.stop()  # SIGTERM: it reports its counters and exits
        done = True
    if not done:
        log.warning("the audience did not finish within %.0fs (see %s)", timeout, child.log_path)
    served: dict = {}
    deadline = time.monotonic() + 5.0  # wait for its last report (after the drain)
    while time.monotonic() < deadline:
        served = arms_from_values(watcher.poll().get("audience", {}))
        if child.proc.poll() is not None and watcher.gauge("audience", "pending_feedback") == 0 and served:
            break
        time.sleep(0.25)
    print(table(served), file=sys.stderr)
    trained = watcher.trained() - trained0
    print(f"closed loop: {int(trained):,} examples trained while the audience ran (the served impressions, "
          f"labelled from its clicks; {sum(a.served for a in served.values()):,} served)", file=sys.stderr)
    if not served:
        print(f"the audience served nothing: see {child.log_path}", file=sys.stderr)
    return bool(sum(a.served for a in served.values()))


def stored_predictions(url: str, since_ms: int) -> int:
    """Prediction rows in the store trained since ``since_ms``, counted by the dashboard's store (so rows a
    sink stored before it was restarted count too); 0 while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}healthz?since_ms={since_ms}", timeout=10) as r:
            return int(json.load(r).get("stored_predictions", 0))
    except (OSError, ValueError, KeyError):
        return 0


def _ingested(sup: Supervisor, url: str, rows: int, since_ms: int, timeout: float = 60.0) -> bool:
    """Wait until the store holds ``rows`` prediction rows (click + conversion per example)."""
    if sup.wait_until(lambda: stored_predictions(url, since_ms) >= rows, timeout):
        return True
    log.warning("the metrics sink stored %d of %d prediction rows within %.0fs", stored_predictions(url, since_ms),
                rows, timeout)
    return False


def _summary(watcher: StatsWatcher, sup: Supervisor, bad: int, elapsed: float, ok: bool) -> None:
    trained = watcher.trained()
    events = watcher.gauge("replay", "events_produced")  # the replay's counters are its own run's
    dead = {"replay": int(watcher.gauge("replay", "dead_letters")),
            **{step: int(watcher.value(step, "dead_letters")) for step in ("labels", "trainer")}}
    print(f"{'done' if ok else 'INCOMPLETE'}: {int(events):,} events produced ({bad:,} malformed), "
          f"{int(watcher.value('labels', 'examples_out')):,} examples labelled, {int(trained):,} trained, "
          f"{sum(dead.values()):,} dead letters ({', '.join(f'{k} {v:,}' for k, v in dead.items())}), "
          f"in {elapsed:.1f}s ({events / elapsed:,.0f} events/s, {trained / elapsed:,.0f} examples/s end to end)",
          file=sys.stderr)
    restarts = {c.name: c.restarts for c in sup.children if c.restarts}
    if restarts:
        print("restarted: " + ", ".join(f"{k} {v}x" for k, v in restarts.items())
              + f" (logs in {sup.log_dir})", file=sys.stderr)
    if sup.config_path.exists():  # the user model trails the ranker: its count is the latest report's
        print(f"user vectors: {int(watcher.gauge('trainer', 'user_vectors')):,} users so far, index written at "
              "each trainer checkpoint; try `streamrec users info` or `streamrec users similar USER_ID -k 10`",
              file=sys.stderr)


def vm_groups(specs: list[str]) -> tuple[tuple[str, ...], ...]:
    """``--vm-domains`` values (comma-separated domains, one vertical model each) -> domain groups; none given:
    one VM of every domain. A domain may belong to one group only."""
    from streams.schema import DOMAINS

    groups, seen = [], set()
    for spec in specs:
        group = tuple(d.strip() for d in spec.split(",") if d.strip())
        unknown = [d for d in group if d not in DOMAINS]
        if not group or unknown:
            raise ValueError(f"--vm-domains {spec!r}: expected comma-separated domains of {', '.join(DOMAINS)}")
        if seen & set(group):
            raise ValueError(f"--vm-domains: {', '.join(sorted(seen & set(group)))} in two groups")
        seen.update(group)
        groups.append(group)
    return tuple(groups) or ((),)


def fm_summary(watcher: StatsWatcher) -> str:
    """Per model (arm) the examples trained (a VM also those outside its domains), and the teacher join's
    coverage, teacher age and wait."""
    watcher.poll()
    lines = []
    for arm in sorted(watcher.arms, key=lambda a: (a != "fm", a)):
        other = watcher.arm_value(arm, "examples_other_domain")
        lines.append(f"  {arm}: {int(watcher.arm_value(arm, 'examples_trained')):,} examples trained"
                     + (f" ({int(other):,} of other domains skipped)" if other else "")
                     + (f", {int(watcher.arm_value(arm, 'teachers_published')):,} teacher predictions published"
                        if arm == "fm" else ""))
    out = watcher.value("distill", "examples_out")
    with_t = watcher.value("distill", "examples_with_teacher")
    lines.append(f"  teacher join: {int(out):,} examples out, {int(with_t):,} with a teacher "
                 f"({with_t / out if out else 0:.1%} coverage), {int(watcher.value('distill', 'teachers_late')):,} "
                 f"late teachers dropped, teacher age p50 {watcher.gauge('distill', 'teacher_age_p50_ms') / 1000:.1f}s,"
                 f" wait p50 {watcher.gauge('distill', 'teacher_wait_p50_ms') / 1000:.2f}s")
    return "models:\n" + "\n".join(lines)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole local stack: broker, dataflows, trainer, dashboard",
                       description="Start the embedded broker and its storage (unless kafka.bootstrap_servers is "
                                   "set), the metrics sink and live dashboard, the labels and stats dataflows and "
                                   "the trainer; then generate N events (or replay a log) through them. Every "
                                   "process is restarted if it dies. Durable by default: run again, it continues "
                                   "where it stopped. Ctrl-C stops everything cleanly.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--events", type=int, default=100_000, help="impressions to generate (default 100000)")
    src.add_argument("--replay", metavar="LOG", help="replay this log instead of generating")
    p.add_argument("--speed", type=float, default=None, help="replay speed (x real time); default: as fast as possible")
    p.add_argument("--seed", type=int, default=None,
                   help="generator seed (default: a new one per run of a durable stack, so ids never repeat)")
    p.add_argument("--scenario", default="none", choices=scenarios.SCENARIOS,
                   help="generator drift scenario (default: none; see docs/generator.md)")
    p.add_argument("--scenario-param", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario parameter, repeatable (see `streamrec generate --help`)")
    p.add_argument("--bad-rate", type=float, default=0.01, help="fraction of malformed events to inject (default 0.01)")
    p.add_argument("--port", type=int, default=None, help="dashboard port (default from config: 8050)")
    p.add_argument("--timeout", type=float, default=1800, help="give up waiting for training after this many seconds")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--ephemeral", action="store_true",
                       help="keep topics in memory and state in the run's directory: nothing carries over")
    state.add_argument("--fresh", action="store_true",
                       help="delete the durable stack's state (topics, dataflow recovery, checkpoints) first")
    serve = p.add_argument_group("closed loop (--serve)")
    serve.add_argument("--serve", action="store_true",
                       help="also run a trainer per arm of serving.arms publishing model versions, the ranking "
                            "service (streamrec serve) and, after the warm-up log, the simulated audience; the "
                            "summary compares the arms online and by the oracle")
    serve.add_argument("--serve-seconds", type=float, default=60.0,
                       help="how long the audience sends requests; 0: until Ctrl-C (default %(default)s)")
    serve.add_argument("--serve-rate", type=float, default=20.0, help="requests per second (default %(default)s)")
    serve.add_argument("--serve-time-scale", type=float, default=60.0,
                       help="the audience's feedback delays are divided by this (default %(default)s)")
    serve.add_argument("--serve-label-after", type=float, default=10.0, metavar="SECONDS",
                       help="label impressions this long after they were served (labels.policy=elapsed), so the "
                            "loop closes within the run; 0: keep the configured labels policy (the default window "
                            "policy labels an impression after its 24 h conversion window) (default %(default)s)")
    serve.add_argument("--serve-port", type=int, default=None,
                       help="the ranking service's port (default from config: serving.port)")
    fm = p.add_argument_group("foundation model and its students (--with-fm, docs/transfer.md)")
    fm.add_argument("--with-fm", action="store_true",
                    help="instead of the single trainer: a foundation model's trainer (role fm) publishing teacher "
                         "predictions, the teacher-join dataflow (streamrec distill) and vertical models' trainers "
                         "(role vm) learning from the distilled examples; the summary gives each model's examples "
                         "trained and the teacher coverage")
    fm.add_argument("--vm-domains", action="append", default=[], metavar="D1,D2",
                    help="one vertical model for these domains, repeatable (default: one VM of every domain)")
    stay = p.add_mutually_exclusive_group()
    stay.add_argument("--stay", dest="stay", action="store_true", default=None,
                      help="keep running after the work is done until Ctrl-C (default when attached to a terminal)")
    stay.add_argument("--exit-when-done", dest="stay", action="store_false",
                      help="stop everything once every example is trained (default when not on a terminal)")
    p.set_defaults(func=up)
