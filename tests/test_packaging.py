"""The installed project and its image carry every top-level package: ``streamrec serve`` or ``bench`` run from
any directory (an editable install maps only the packages pyproject lists), and the Dockerfile copies each."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _top_level_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests",)}


def test_pyproject_and_dockerfile_list_every_package():
    pkgs = _top_level_packages()
    assert {"config", "streams", "trainer", "embedding_store", "dashboards", "deploy", "serving"} <= pkgs
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in listed} >= pkgs, f"pyproject packages miss {pkgs - {p.rstrip('*') for p in listed}}"
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", (ROOT / "deploy" / "Dockerfile").read_text(), re.M))
    assert copied >= pkgs, f"deploy/Dockerfile does not copy {pkgs - copied}"


def test_every_package_imports_outside_the_repository(tmp_path):
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    r = subprocess.run([sys.executable, "-c", code, *sorted(_top_level_packages())], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
