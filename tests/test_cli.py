import subprocess
import sys

import pytest

from deploy.cli import build_parser

REQUIRED = ["up", "generate", "replay", "labels", "train", "score", "serve", "dashboard", "dashboards", "bench"]


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [c for c in REQUIRED if c not in sub.choices]
    assert not missing, f"subcommands missing from `streamrec`: {missing}"


@pytest.mark.parametrize("command", REQUIRED)
def test_help_explains_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"streamrec {command}" in out and len(out) > 150


def test_console_script_runs_and_reports_bad_config(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("trainer: {batch_size: lots}\n")
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "--config", str(bad), "labels"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_bench_lists_unknown_names():
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", "no-such-bench"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "available" in r.stderr


@pytest.mark.parametrize("name", __import__("deploy.bench", fromlist=["available"]).available())
def test_every_benchmark_imports_as_run_by_streamrec_bench(name):
    # `streamrec bench` runs `python -m benchmarks.<name>` from the project root: a script named like a
    # package (trainer.py, faiss.py) must not shadow it.
    code = (f"import importlib, faiss, trainer.model; m = importlib.import_module('benchmarks.{name.replace('-', '_')}'); "
            "assert callable(m.main), 'no main()'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=__import__("deploy.bench", fromlist=["BENCH_DIR"]).BENCH_DIR.parent)
    assert r.returncode == 0, r.stderr[-2000:]
