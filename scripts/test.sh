#!/usr/bin/env bash
# The test command: installs what the tests need (pinned, idempotent), then runs the whole suite.
#   scripts/test.sh                 all tests
#   scripts/test.sh -k labels -x    extra arguments go to pytest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
# The dashboard test renders the live page in a real headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing Chromium (Debian package) for the dashboard rendering test" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
cd "$root"
# torch's OpenMP threads sleep instead of spinning when they wait (the trainer's own setting, trainer/service.py
# runtime_env): on a machine whose cores other work shares, spinning made torch tests 4-5x slower
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$root/.venv/bin/python" -m pytest --durations=25 --doctest-modules config streams trainer embedding_store dashboards deploy tests "$@"
