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
    assert {"kafka", "clickhouse", "grafana", "labels", "trainer", "dashboard"} <= set(services)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _k8s()}
    assert ("StatefulSet", "streamrec-trainer") in kinds and ("Service", "streamrec-dashboard") in kinds


@pytest.mark.parametrize("where,command,env", _streamrec_env_and_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_commands_and_env_are_valid(where, command, env):
    args = build_parser().parse_args(command)
    assert callable(args.func), where
    cfg = load_config(env={k: str(v) for k, v in env.items() if k.startswith("STREAMREC_")})
    assert cfg.kafka.bootstrap_servers, f"{where}: production manifests must name a Kafka cluster"
    assert cfg.clickhouse_url().startswith("http"), f"{where}: production manifests must name a ClickHouse server"
