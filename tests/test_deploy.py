"""Deployment manifests stay valid: they pass their published schemas (Kubernetes' API schemas bundled with
kubernetes-validate, the compose-spec schema bundled with check-jsonschema: both offline), their commands are
real subcommands (under torchrun too: its own parser reads its flags), their environment variables are real
configuration fields, and their scale-out holds together (Bytewax clusters' process ids and addresses, the
trainer's ranks and rendezvous, GPUs requested per rank)."""

import re
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from config import load_config
from deploy.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.32"  # the oldest Kubernetes the manifests target (the pod-index label is on by default from 1.28)
TORCHRUN = ["python", "-m", "torch.distributed.run"]
FLOWS = ("labels", "stats")


def _compose():
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


def _k8s(name: str = "streamrec.yaml"):
    return list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))


def _k8s_files():
    return sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml"))


def _torchrun(argv: list[str]):
    """torchrun's own parse of ``argv`` (its flags after ``python -m torch.distributed.run``)."""
    from torch.distributed.run import get_args_parser

    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:  # argparse printed why; say which manifest line it was
        raise ValueError(f"torchrun refuses the arguments {argv}") from None


def _streamrec_argv(command: list[str] | None, args: list[str]) -> list[str]:
    """The ``streamrec`` arguments of a container: the image's entrypoint is ``streamrec``; under torchrun,
    the arguments after ``-m deploy.cli``."""
    if not command:
        return list(args)
    assert list(command)[:3] == TORCHRUN, command
    run = _torchrun(list(command)[3:] + list(args))
    assert run.module and run.training_script == "deploy.cli", run
    return list(run.training_script_args)


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of container arguments."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _pod_env(doc: dict, c: dict, cm: dict, ordinal: int) -> dict[str, str]:
    """The container's environment in pod ``ordinal``: the ConfigMap, its values, the downward API's pod index."""
    env = dict(cm)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']", e
            assert doc["kind"] == "StatefulSet", f"{doc['metadata']['name']}: only a StatefulSet pod has an index"
            env[e["name"]] = str(ordinal)
    return env


def _containers():
    """(where, document, container name, pod ordinal, streamrec argv, env) of every streamrec container."""
    found = []
    for name, svc in _compose()["services"].items():
        if "command" in svc:
            found.append((f"compose:{name}", svc, name, 0, _streamrec_argv(svc.get("entrypoint"), svc["command"]),
                          {k: str(v) for k, v in svc.get("environment", {}).items()}))
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")["data"]
    for file in _k8s_files():
        for doc in _k8s(file):
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for ordinal in range(doc["spec"]["replicas"] if doc["kind"] == "StatefulSet" else 1):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    env = _pod_env(doc, c, cm, ordinal)
                    argv = _expand(_streamrec_argv(c.get("command"), c["args"]), env)
                    found.append((f"k8s:{file}:{doc['metadata']['name']}-{ordinal}", doc, c["name"], ordinal, argv,
                                  env))
    return found


def _streamrec_env_and_commands():
    return [(where, argv, env) for where, _, _, _, argv, env in _containers()]


def test_manifests_parse_and_cover_the_components():
    services = _compose()["services"]
    assert {"kafka", "clickhouse", "grafana", "labels-0", "stats-0", "trainer", "dashboard"} <= set(services)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _k8s()}
    assert {("StatefulSet", "streamrec-labels"), ("StatefulSet", "streamrec-stats"),
            ("StatefulSet", "streamrec-trainer"), ("Service", "streamrec-dashboard"),
            ("Service", "streamrec-serve"), ("Deployment", "streamrec-serve")} <= kinds
    assert "serve" in services


@pytest.mark.parametrize("file", _k8s_files())
def test_kubernetes_manifests_pass_the_api_schemas(file):
    for doc in _k8s(file):  # strict: an unknown or misspelt field fails too
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, doc["metadata"]["name"]


def test_the_compose_file_passes_the_compose_spec_schema():
    validator = jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    assert [e.message for e in validator.iter_errors(_compose())] == []


def test_the_schemas_catch_a_misspelt_field():
    sts = next(d for d in _k8s() if d["kind"] == "StatefulSet")
    bad = {**sts, "spec": {**sts["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    compose = _compose()
    compose["services"]["trainer"]["comand"] = compose["services"]["trainer"].pop("command")
    errors = list(jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec")).iter_errors(compose))
    assert errors and "comand" in errors[0].message


def test_every_process_of_the_local_stack_runs_in_compose_and_k8s():
    # `streamrec up` supervises these (deploy/stack.py); the manifests must run the same commands, so panels
    # fed by one of them (feature drift and label delay by the stats flow) have data in every deployment
    from deploy.stack import PROCESSES, SERVE_PROCESSES

    commands = {"compose": set(), "k8s": set()}
    for where, command, _ in _streamrec_env_and_commands():
        if ":trainer-gpu.yaml:" not in where and ":trainer-multirank.yaml:" not in where:  # replace the trainer only
            commands[where.split(":")[0]].add(command[0])
    # the ranking service too (`up --serve`); the simulated audience is a demo, not a deployment
    wanted = ({"train" if p == "trainer" else p for p in PROCESSES} | set(SERVE_PROCESSES)) - {"storage", "broker",
                                                                                               "audience"}
    assert commands == {"compose": wanted | {"dashboards"}, "k8s": wanted}


def test_the_dataflows_keep_their_recovery_on_the_volume():
    for where, command, _ in _streamrec_env_and_commands():
        if command[0] in FLOWS:
            args = build_parser().parse_args(command)
            assert args.recovery_dir and args.recovery_dir.startswith("/data/"), where


@pytest.mark.parametrize("where,command,env", _streamrec_env_and_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_commands_and_env_are_valid(where, command, env):
    args = build_parser().parse_args(command)
    assert callable(args.func), where
    cfg = load_config(env={k: str(v) for k, v in env.items() if k.startswith("STREAMREC_")})
    assert cfg.kafka.bootstrap_servers, f"{where}: production manifests must name a Kafka cluster"
    assert cfg.clickhouse_url().startswith("http"), f"{where}: production manifests must name a ClickHouse server"


@pytest.mark.parametrize("flow", FLOWS)
def test_compose_runs_each_dataflow_as_one_bytewax_cluster(flow):
    procs = {}
    for where, svc, name, _, argv, _ in _containers():
        if where.startswith("compose:") and argv[0] == flow:
            procs[name] = build_parser().parse_args(argv)
    assert len(procs) >= 2, f"{flow}: a cluster of one process"
    addresses = {a.addresses for a in procs.values()}
    assert len(addresses) == 1, f"{flow}: the processes disagree on the cluster's addresses"
    hosts = [h.split(":")[0] for h in addresses.pop().split(",")]
    assert sorted(procs) == sorted(hosts)  # each address is a service of this cluster (compose's DNS name)
    for name, a in procs.items():
        assert a.processes == len(hosts) and hosts[a.process_id] == name and a.workers >= 2, name
    assert len({a.recovery_dir for a in procs.values()}) == len(procs)  # a recovery directory per process


@pytest.mark.parametrize("flow", FLOWS)
def test_kubernetes_runs_each_dataflow_as_a_statefulset_cluster(flow):
    docs = _k8s()
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == f"streamrec-{flow}")
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]  # stable pod addresses
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    n = sts["spec"]["replicas"]
    assert n >= 2
    ports = {p["port"] for p in svc["spec"]["ports"]}
    pods = [build_parser().parse_args(argv) for where, doc, _, _, argv, _ in _containers()
            if where.startswith("k8s:streamrec.yaml:") and doc.get("metadata") == sts["metadata"]]
    assert [a.process_id for a in pods] == list(range(n))  # the pod index is the process id
    for a in pods:
        assert a.processes == n and a.workers >= 2
        assert a.addresses.split(",") == [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:"
                                          f"{a.addresses.split(',')[i].rsplit(':', 1)[1]}" for i in range(n)]
        assert {int(h.rsplit(":", 1)[1]) for h in a.addresses.split(",")} <= ports
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert any(pods[0].recovery_dir.startswith(mounts[v] + "/") for v in claims)  # on the pod's own volume


def _trainers():
    out = {"compose": _compose()["services"]["trainer"]}
    for file in _k8s_files():
        for doc in _k8s(file):
            if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "streamrec-trainer":
                out[file] = doc
    return out


def _world(run) -> int:
    return int(run.nnodes) * int(run.nproc_per_node)


def test_the_trainer_is_a_torchrun_job_with_rendezvous():
    trainers = _trainers()
    assert set(trainers) == {"compose", "streamrec.yaml", "trainer-gpu.yaml", "trainer-multirank.yaml"}
    svc = trainers.pop("compose")
    run = _torchrun(svc["command"])
    assert svc["entrypoint"] == TORCHRUN and run.standalone and run.max_restarts >= 1
    docs = [d for f in _k8s_files() for d in _k8s(f)]
    for file, sts in trainers.items():
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert c["command"] == TORCHRUN, file
        run = _torchrun(c["args"])
        assert run.nnodes == str(sts["spec"]["replicas"]), file
        assert run.rdzv_backend == "c10d" and run.rdzv_id and run.max_restarts >= 1, file
        host, port = run.rdzv_endpoint.rsplit(":", 1)
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == sts["spec"]["serviceName"])
        assert host == f"{sts['metadata']['name']}-0.{svc['metadata']['name']}", file  # pod 0 hosts the rendezvous
        assert svc["spec"]["clusterIP"] == "None" and int(port) in {p["port"] for p in svc["spec"]["ports"]}, file
        assert sts["spec"]["podManagementPolicy"] == "Parallel", file
        # every rank writes the same checkpoint directory: one ReadWriteMany claim, not a volume per pod
        (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim"
                   and d["metadata"]["name"] == vol["persistentVolumeClaim"]["claimName"])
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and "volumeClaimTemplates" not in sts["spec"], file
    assert _world(_torchrun(trainers["trainer-multirank.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"])) >= 2


def test_every_trainer_manifest_asks_only_for_what_its_rank_count_supports():
    """The settings a group of ranks refuses at start (trainer/distributed.py) are absent wherever a manifest
    runs several ranks: the manifest would crash-loop otherwise."""
    from trainer.distributed import unsupported

    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")["data"]
    svc = _compose()["services"]["trainer"]
    runs = [("compose", _torchrun(svc["command"]), {k: str(v) for k, v in svc["environment"].items()})]
    for file, sts in _trainers().items():
        if file != "compose":
            (c,) = sts["spec"]["template"]["spec"]["containers"]
            runs.append((file, _torchrun(c["args"]), _pod_env(sts, c, cm, 0)))
    worlds = {}
    for where, run, env in runs:
        cfg = load_config(env={k: v for k, v in env.items() if k.startswith("STREAMREC_")})
        worlds[where] = _world(run)
        if _world(run) > 1:
            assert unsupported(cfg, _world(run)) == [], where
        else:  # one rank: the plain trainer, which publishes what the ranking service serves
            assert cfg.trainer.publish_dir, where
    assert max(worlds.values()) >= 2 and worlds["streamrec.yaml"] == worlds["compose"] == 1


def test_the_gpu_trainer_requests_a_gpu_per_rank_and_trains_on_cuda():
    sts = _trainers()["trainer-gpu.yaml"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    run = _torchrun(c["args"])
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(run.nproc_per_node) == gpus
    env = {e["name"]: e["value"] for e in c["env"]}
    assert load_config(env=env).trainer.device == "cuda"
    cpu = _trainers()["streamrec.yaml"]
    assert "nvidia.com/gpu" not in str(cpu)  # the default trainer runs anywhere


def test_the_service_reads_what_the_trainer_publishes():
    # one volume, one directory: the trainer publishes to <models_dir>/main, the service reads <models_dir>/<arm>
    def cfg(env):
        return load_config(env={k: str(v) for k, v in env.items() if k.startswith("STREAMREC_")})

    services = _compose()["services"]
    pairs = [({**services["trainer"]["environment"]}, {**services["serve"]["environment"]})]
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")["data"]
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s()}
    trainer, serve = docs[("StatefulSet", "streamrec-trainer")], docs[("Deployment", "streamrec-serve")]

    def claim(doc):
        spec = doc["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        (m,) = c["volumeMounts"]
        vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
        return vol["persistentVolumeClaim"]["claimName"], m["mountPath"], _pod_env(doc, c, cm, 0)

    (t_claim, t_path, t_env), (s_claim, s_path, s_env) = claim(trainer), claim(serve)
    assert t_claim == s_claim and t_path == s_path
    pairs.append((t_env, s_env))
    for trainer_env, serve_env in pairs:
        t, s = cfg(trainer_env), cfg(serve_env)
        assert PurePosixPath(t.trainer.publish_dir) == PurePosixPath(s.models_dir(), "main")
