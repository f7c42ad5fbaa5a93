#!/usr/bin/env bash
# Create or update .venv with the pinned dependency set (requirements.lock) and the project itself.
# Idempotent: a stamp holding the hash of the lock and pyproject.toml skips the install when nothing changed.
#   scripts/bootstrap.sh          runtime + test dependencies
#   STREAMREC_VENV=DIR            put the environment elsewhere
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${STREAMREC_VENV:-$root/.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3

stamp="$venv/.streamrec-stamp"
want=$(cat "$root/requirements.lock" "$root/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/streamrec" ]; then
  exit 0
fi

echo "bootstrap: installing the pinned environment into $venv" >&2
t0=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
if [ ! -x "$venv/bin/uv" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check uv==0.13.8
fi
# The CPU build of torch comes from a local wheel directory when the machine provides one
# (PIP_FIND_LINKS); uv does not read pip's configuration, so pass it on explicitly.
if [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS="$PIP_FIND_LINKS"; fi
export UV_COMPILE_BYTECODE=1 VIRTUAL_ENV="$venv"
# torchrec declares the CUDA fbgemm-gpu; fbgemm-gpu-cpu provides the same module, so exclude the former.
"$venv/bin/uv" pip install -q --excludes "$root/scripts/uv-excludes.txt" -r "$root/requirements.lock"
"$venv/bin/uv" pip install -q --no-deps -e "$root"
# FIITED's C++ kernel, compiled with g++ into the user's cache (embedding_store/kernels); without a compiler the
# store uses its torch path, so a failed build is a warning, not an error
"$venv/bin/streamrec" build-kernels || echo "bootstrap: build-kernels failed; FIITED will use its torch path" >&2
echo "$want" > "$stamp"
echo "bootstrap: done in $(( $(date +%s) - t0 ))s" >&2
