#!/usr/bin/env bash
# The main job: installs what it needs (pinned, idempotent), then runs the whole local stack:
# embedded broker -> generator -> Bytewax labels dataflow -> trainer -> chDB -> live dashboard.
#   scripts/demo.sh                       100k generated events
#   scripts/demo.sh --events 20000 --stay extra arguments go to `streamrec up` (see --help)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/streamrec" up "$@"
