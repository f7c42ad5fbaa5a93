"""Deployment manifests stay valid: they parse, their commands are real subcommands, their environment
variables are real configuration fields."""

from pathlib import Path

import pytest
import yaml

from deploy.cli import build_parser
from config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _compose():
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


def _k8s():
    return list(yaml.safe_load_all((DEPLOY / "k8s" / "streamrec.yaml").read_text()))


def _streamrec_env_and_commands():
    found = []
    for name, svc in _compose()["services"].items():
        if "command" in svc:
            found.append((f"compose:{name}", svc["command"], svc.get("environment", {})))
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")["data"]
    for doc in _k8s():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                env = {**cm, **{e["name"]: e["value"] for e in c.get("env", [])}}
                found.append((f"k8s:{doc['metadata']['name']}", c["args"], env))
    return found


def test_manifests_parse_and_cover_the_components():
    services = _compose()["services"]
    assert {"kafka", "clickhouse", "grafana", "labels", "stats", "trainer", "dashboard"} <= set(services)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _k8s()}
    assert {("StatefulSet", "streamrec-labels"), ("StatefulSet", "streamrec-stats"),
            ("StatefulSet", "streamrec-trainer"), ("Service", "streamrec-dashboard"),
            ("Service", "streamrec-serve")} <= kinds
    assert "serve" in services


def test_every_process_of_the_local_stack_runs_in_compose_and_k8s():
    # `streamrec up` supervises these (deploy/stack.py); the manifests must run the same commands, so panels
    # fed by one of them (feature drift and label delay by the stats flow) have data in every deployment
    from deploy.stack import PROCESSES, SERVE_PROCESSES

    commands = {where.split(":")[0]: set() for where, _, _ in _streamrec_env_and_commands()}
    for where, command, _ in _streamrec_env_and_commands():
        commands[where.split(":")[0]].add(command[0])
    # the ranking service too (`up --serve`); the simulated audience is a demo, not a deployment
    wanted = ({"train" if p == "trainer" else p for p in PROCESSES} | set(SERVE_PROCESSES)) - {"storage", "broker",
                                                                                               "audience"}
    assert commands == {"compose": wanted | {"dashboards"}, "k8s": wanted}


def test_the_stats_flow_keeps_its_recovery_on_the_volume():
    compose = {w: c for w, c, _ in _streamrec_env_and_commands()}
    for where in ("compose:stats", "k8s:streamrec-stats"):
        args = build_parser().parse_args(compose[where])
        assert args.recovery_dir and args.recovery_dir.startswith("/data/"), where


@pytest.mark.parametrize("where,command,env", _streamrec_env_and_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_commands_and_env_are_valid(where, command, env):
    args = build_parser().parse_args(command)
    assert callable(args.func), where
    cfg = load_config(env={k: str(v) for k, v in env.items() if k.startswith("STREAMREC_")})
    assert cfg.kafka.bootstrap_servers, f"{where}: production manifests must name a Kafka cluster"
    assert cfg.clickhouse_url().startswith("http"), f"{where}: production manifests must name a ClickHouse server"


def test_the_service_reads_what_the_trainer_publishes():
    # one volume, one directory: the trainer publishes to <models_dir>/main, the service reads <models_dir>/<arm>
    from pathlib import PurePosixPath

    def cfg(env):
        return load_config(env={k: str(v) for k, v in env.items() if k.startswith("STREAMREC_")})

    services = _compose()["services"]
    pairs = [({**services["trainer"]["environment"]}, {**services["serve"]["environment"]})]
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")["data"]
    sts = next(d for d in _k8s() if d["metadata"]["name"] == "streamrec-trainer")
    containers = {c["name"]: {**cm, **{e["name"]: e["value"] for e in c.get("env", [])}}
                  for c in sts["spec"]["template"]["spec"]["containers"]}
    pairs.append((containers["trainer"], containers["serve"]))
    for trainer_env, serve_env in pairs:
        t, s = cfg(trainer_env), cfg(serve_env)
        assert PurePosixPath(t.trainer.publish_dir) == PurePosixPath(s.models_dir(), "main")
