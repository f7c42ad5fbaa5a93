"""The local stack: every process of streamrec under one supervisor, and where their state lives.

    storage (local S3 server: the broker's disk)     -- unless ephemeral or an external broker
      -> broker (embedded Tansu)                       -- unless kafka.bootstrap_servers is set
      -> dashboard (metrics sink, sole owner of the chDB store, and the live page)
      -> labels dataflow -> stats dataflow -> trainer
      -> with ``with_fm`` (``streamrec up --with-fm``), instead of the trainer: the foundation model's trainer
         (``trainer-fm``: role fm, arm "fm"), the teacher join (``distill``) and the vertical models' trainers
         (``trainer-vm``, or ``trainer-vm-<d1>-<d2>`` per ``vm_groups`` entry: role vm, arm "vm[-<d1>-<d2>...]"),
         each trainer with its own checkpoints under ``checkpoints/<arm>``
      -> with ``serve``: one trainer per arm of ``serving.arms`` (each publishing its model versions), the
         ranking service (``streamrec serve``) and, once started, the simulated audience (``streamrec audience``)

Durable by default. State that outlives a run is under ``<data_dir>/stack/`` (topics, dataflow recovery,
trainer checkpoints, the broker's cluster id and ports) and ``<data_dir>/chdb`` (metrics), so a second
``streamrec up`` continues where the first stopped, and any process killed with SIGKILL comes back where it
was (README, "What survives what"). ``ephemeral``: the broker keeps topics in memory and everything else lives
in the run's directory; a restarted broker then comes back empty (its topics are created again).
Logs of every run are in ``<data_dir>/runs/<time>/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import msgspec
import yaml

from deploy.supervisor import Child, Supervisor
from streams import schema
from streams.bus import kafka_io, storage
from streams.bus.broker import EmbeddedBroker, wait_ready
from streams.bus.processes import free_port
from config import Config, arm_trainer_config, replace
from trainer.roles import role_config
from streams.names import Component, Stat

log = logging.getLogger("streamrec.stack")

# the processes of a stack, in start order (stopped in reverse); the embedded ones only when used
PROCESSES = ("storage", "broker", "dashboard", "labels", "stats", "trainer")
# with serve (`streamrec up --serve`) "trainer" is one process per arm ("trainer-<arm>" when there are several),
# followed by the ranking service and, once the warm-up log is trained, the simulated audience
SERVE_PROCESSES = ("serve", "audience")

class StackState:
    """What ``<data_dir>/stack/state.json`` remembers between runs of a durable stack: the broker's cluster
    id (its folder in the storage: the topics are found again under it), its ports, and how many logs the
    generator made (each run draws a new seed, so event ids never repeat across runs)."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str, default):
        return self.data.get(key, default)

    def save(self, **values) -> None:
        self.data.update(values)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _port(preferred: int | None) -> int:
    """``preferred`` when it is free (a durable broker keeps its address across runs), else a free one."""
    import socket

    if preferred:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


class LocalStack:
    """Starts the stack's processes (:data:`PROCESSES`) under a :class:`Supervisor` and says where their state
    is. ``start()`` returns the configuration every process runs with (the broker's address filled in)."""

    def __init__(self, cfg: Config, run_dir: Path, *, ephemeral: bool = False, fresh: bool = False,
                 port: int | None = None, trainer_args: tuple[str, ...] = (), labels_args: tuple[str, ...] = (),
                 serve: bool = False, with_fm: bool = False, vm_groups: tuple[tuple[str, ...], ...] = ((),)):
        if with_fm and serve:
            raise ValueError("--with-fm and --serve do not combine yet: serving arms of vertical models is to come")
        self.cfg, self.run_dir, self.ephemeral, self.serve = cfg, run_dir, ephemeral, serve
        self.with_fm, self.vm_groups = with_fm, tuple(vm_groups) or ((),)
        self.trainer_args, self.labels_args = list(trainer_args), list(labels_args)
        self.external = bool(cfg.kafka.bootstrap_servers)
        self.state_dir = Path(cfg.data_dir, "stack").resolve()
        if fresh and self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            log.warning("--fresh: deleted the stack's state in %s", self.state_dir)
        home = run_dir if ephemeral else self.state_dir
        self.dirs = {"topics": self.state_dir / "topics", "labels": home / "labels-recovery",
                     "stats": home / "stats-recovery", "checkpoints": home / "checkpoints",
                     "distill": home / "distill-recovery",
                     "models": home / "models"}
        self.state = StackState(self.state_dir)
        self.port = port or cfg.dashboard.port
        self.broker: EmbeddedBroker | None = None
        self.storage_port: int | None = None
        self.sup: Supervisor | None = None
        self.status: StatusPublisher | None = None
        # the arms (ServiceStats instances) of the trainers start() runs: a run is done when every one has taken
        # every example (StatsWatcher.trained), not only those that reported so far
        self.trainer_arms: tuple[str, ...] = (cfg.trainer.arm,)

    @property
    def durable(self) -> bool:
        """Whether topics survive the broker (always true of an external cluster)."""
        return self.external or not self.ephemeral

    def describe(self) -> str:
        if self.external:
            return f"broker: {self.cfg.kafka.bootstrap_servers} (external)"
        where = "in memory (--ephemeral: lost when it stops)" if self.ephemeral else f"on disk in {self.dirs['topics']}"
        return f"broker: embedded Tansu on {self.broker.bootstrap_servers}, topics {where}"

    def start(self) -> Config:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        children: list[Child] = []
        if not self.external:
            if not self.ephemeral:
                self.storage_port = _port(self.state.get("storage_port", None))
                children.append(Child("storage", [], program=storage.command(self.dirs["topics"], self.storage_port)))
            self.broker = EmbeddedBroker(_port(self.state.get("broker_port", None) if not self.ephemeral else None),
                                         storage_port=self.storage_port,
                                         cluster_id=None if self.ephemeral else self.state.get("cluster_id", None))
            if not self.ephemeral:
                self.state.save(cluster_id=self.broker.cluster_id, broker_port=self.broker.port,
                                storage_port=self.storage_port)
            children.append(Child("broker", [], program=self.broker.command(), env=self.broker.env(),
                                  on_restart=self._broker_restarted))
            cfg = replace(cfg, kafka={"bootstrap_servers": self.broker.bootstrap_servers})
        cfg = replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()),
                      trainer={"checkpoint_dir": str(self.dirs["checkpoints"])},
                      labels={"recovery_dir": str(self.dirs["labels"])}, dashboard={"port": self.port},
                      distill={"recovery_dir": str(self.dirs["distill"])})
        if self.serve and not cfg.serving.models_dir:  # published versions live with the checkpoints they follow
            cfg = replace(cfg, serving={"models_dir": str(self.dirs["models"])})
        self.cfg = cfg
        config_path = self.run_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False))
        self.sup = Supervisor(config_path, self.run_dir)
        for child in children:  # storage, then the broker: each ready before the next starts
            self.sup.start(child)
            if child.name == "storage":
                storage.wait_ready(self.storage_port, child.proc)
            else:
                wait_ready(self.broker.port, child.proc)
        kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions, cfg.kafka.client)
        # the trainer resumes a durable stack's checkpoint; an ephemeral one starts over (its topics are new)
        train = ["train", "--resume"] if self.durable else ["train", "--fresh"]
        self.sup.start(Child("dashboard", ["dashboard"]))
        self.sup.start(Child("labels", ["labels", *self.labels_args]))  # recovery: labels.recovery_dir, set above
        self.sup.start(Child("stats", ["stats", "--recovery-dir", str(self.dirs["stats"])]))
        if self.with_fm:
            self.sup.start(Child("distill", ["distill"]))  # recovery: distill.recovery_dir, set above
            fm = self._fm_configs(cfg)
            self.trainer_arms = tuple(name.removeprefix("trainer-") for name, _ in fm)
            for name, path in fm:
                self.sup.start(Child(name, train + self.trainer_args, program=self._program(path),
                                     restart_args=["train", "--resume", *self.trainer_args]))
        elif not self.serve:
            self.sup.start(Child("trainer", train + self.trainer_args,
                                 restart_args=["train", "--resume", *self.trainer_args]))
        else:
            self.trainer_arms = tuple(a.name for a in cfg.serving.arms)
            for name, path in self._arm_configs(cfg):
                self.sup.start(Child(name, train + self.trainer_args, program=self._program(path),
                                     restart_args=["train", "--resume", *self.trainer_args]))
            self.sup.start(Child("serve", ["serve"]))
        self.status = StatusPublisher(cfg, self.sup)
        self.sup.watch(on_tick=self.status.maybe_publish)  # restarts whatever dies, from now on
        return cfg

    def _arm_configs(self, cfg: Config) -> list[tuple[str, Path]]:
        """(child name, config file) of each arm's trainer: ``trainer`` for a single arm, else
        ``trainer-<arm>``; each config is :func:`arm_trainer_config` (its overrides, its checkpoints, its
        published versions)."""
        arms = cfg.serving.arms
        out = []
        for arm in arms:
            path = self.run_dir / f"config-{arm.name}.yaml"
            acfg = arm_trainer_config(cfg, arm)
            path.write_text(yaml.safe_dump(msgspec.to_builtins(acfg), sort_keys=False))
            out.append(("trainer" if len(arms) == 1 else f"trainer-{arm.name}", path))
        return out

    def _fm_configs(self, cfg: Config) -> list[tuple[str, Path]]:
        """(child name, config file) of the FM's trainer and each vertical model's: role, arm (their metrics
        and stats apart) and checkpoints of their own; a VM per ``vm_groups`` entry (its domains; empty: all)."""
        roles = [("fm", {"role": "fm", "arm": "fm", "vm_domains": []})]
        for group in self.vm_groups:
            arm = "vm" if not group else "vm-" + "-".join(group)
            roles.append((arm, {"role": "vm", "arm": arm, "vm_domains": list(group)}))
        out = []
        for arm, trainer in roles:
            path = self.run_dir / f"config-{arm}.yaml"
            rcfg = replace(cfg, trainer={**trainer, "checkpoint_dir": str(self.dirs["checkpoints"] / arm)})
            # the role's preset (an FM's larger tables, a VM's smaller ones with distillation), written out
            rcfg = replace(rcfg, trainer=msgspec.to_builtins(role_config(rcfg.trainer)))
            path.write_text(yaml.safe_dump(msgspec.to_builtins(rcfg), sort_keys=False))
            out.append((f"trainer-{arm}", path))
        return out

    @staticmethod
    def _program(config_path: Path) -> list[str]:
        return [sys.executable, "-m", "deploy.cli", "--config", str(config_path)]

    def start_audience(self, args: list[str]) -> Child:
        """Start the simulated audience (``streamrec audience ARGS``): done when it exits with code 0, restarted
        (resuming its state) if it crashes."""
        return self.sup.start(Child("audience", ["audience", *args], once=True))

    def _broker_restarted(self, child: Child) -> None:
        """An ephemeral broker comes back empty: create the topics again (what they held is lost)."""
        wait_ready(self.broker.port, child.proc)
        if self.ephemeral:
            log.error("the ephemeral broker restarted empty: what it held and no one had consumed is lost "
                      "(the default, durable broker keeps it)")
            kafka_io.ensure_topics(self.cfg.kafka.bootstrap_servers, self.cfg.topics.all(),
                                   self.cfg.topics.partitions, self.cfg.kafka.client)

    def next_seed(self) -> int:
        """A generator seed no earlier run of this stack used (0 for an ephemeral stack)."""
        if not self.durable or self.external:
            return 0
        seed = int(self.state.get("generated_runs", 0))
        self.state.save(generated_runs=seed + 1)
        return seed

    def child(self, name: str) -> Child:
        return next(c for c in self.sup.children if c.name == name)

    def stop(self) -> None:
        """Stop every process in reverse order (the status publisher's client first, while the broker is up)."""
        if self.sup is not None:
            self.sup.stop_watching()
            if self.status is not None:
                self.status.close()
            self.sup.stop_all()


class StatsWatcher:
    """Each component's newest ``ServiceStats`` values, read from the service_stats topic.

    Reports from before ``since_ms`` (earlier runs of a durable stack) are the baseline: :meth:`value` counts
    from there, so progress is this run's. Reports land on any partition: per component the newest by its
    timestamp wins, not the last read. Trainers are also kept per instance (their arm): :meth:`trained` is the
    slowest arm's progress.
    """

    def __init__(self, cfg: Config, since_ms: int = 0, expect_arms: tuple[str, ...] = ()):
        self.cfg, self.since_ms, self.expect_arms = cfg, since_ms, tuple(expect_arms)
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "streamrec-up", cfg.kafka.client)
        self.consumer.assign(kafka_io.topic_partitions([cfg.topics.service_stats], cfg.topics.partitions))
        self.latest: dict[str, dict[str, float]] = {}
        self.base: dict[str, dict[str, float]] = {}
        self._ts: dict[tuple[str, bool], int] = {}
        # trainers per instance (= arm): (latest, base) values and the newest report's ts
        self.arms: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        self._arm_ts: dict[tuple[str, bool], int] = {}

    def poll(self) -> dict[str, dict[str, float]]:
        for msg in self.consumer.consume(num_messages=10_000, timeout=0.05):
            if msg.error():
                continue
            st = schema.decode(msg.value(), schema.ServiceStats)
            if not isinstance(st, schema.ServiceStats):
                continue
            old = st.ts < self.since_ms
            if st.ts >= self._ts.get((st.component, old), 0):
                self._ts[(st.component, old)] = st.ts
                (self.base if old else self.latest).setdefault(st.component, {}).update(st.values)
            if st.component == Component.TRAINER and st.ts >= self._arm_ts.get((st.instance, old), 0):
                self._arm_ts[(st.instance, old)] = st.ts
                self.arms.setdefault(st.instance, ({}, {}))[1 if old else 0].update(st.values)
        return self.latest

    def trained(self) -> float:
        """This run's examples taken by the slowest trainer (arm): trained, plus those it only scored because
        another arm served them (``learn_from: own``) and those outside a vertical model's domains: every
        example has then reached every arm. 0 while an arm of ``expect_arms`` has not reported yet (a slow
        trainer that has not started is not done)."""
        if any(not self.arms.get(a, ({}, {}))[0] for a in self.expect_arms):
            return 0.0
        done = []
        for latest, base in self.arms.values():
            if not latest:
                continue
            done.append(sum(latest.get(k, base.get(k, 0.0)) - base.get(k, 0.0)
                            for k in (Stat.EXAMPLES_TRAINED, Stat.EXAMPLES_OTHER_ARM, Stat.EXAMPLES_OTHER_DOMAIN)))
        return min(done) if done else 0.0

    def arm_value(self, arm: str, name: str) -> float:
        """This run's value of one trainer (arm), like :meth:`value`."""
        latest, base = self.arms.get(arm, ({}, {}))
        return latest.get(name, base.get(name, 0.0)) - base.get(name, 0.0)

    def value(self, component: str, name: str) -> float:
        """This run's value: the newest report minus the baseline (gauges, e.g. a lag, are not counters: see
        :meth:`gauge`)."""
        base = self.base.get(component, {}).get(name, 0.0)
        return self.latest.get(component, {}).get(name, base) - base

    def gauge(self, component: str, name: str) -> float:
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
        st = schema.ServiceStats(component=Component.SUPERVISOR, ts=int(time.time() * 1000), values=self.sup.status())
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st))
        self.producer.poll(0)

    def close(self) -> None:
        """Deliver what is pending (5 s at most), then close the producer: the broker stops only once its
        clients are gone (Tansu waits ~5 s for an open connection), and a producer's delivery callback keeps it
        alive until the garbage collector runs."""
        self.producer.flush(5)
        self.producer.close()
