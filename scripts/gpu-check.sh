#!/usr/bin/env bash
# The GPU run ready to go (issue 20; docs/gpu.md): on a lent machine (one H100/H200, Python 3.12, torch with CUDA,
# no package registries) run from the repository root:
#
#     scripts/gpu-check.sh [--dry-run]          # DEVICE=cuda by default; PYTHON=python3 by default
#     ONLY=fiited,search scripts/gpu-check.sh   # some steps only (names below)
#
# Five steps, each under its own time limit (8 minutes in all), each printing its JSON line; a failing step is
# reported and the next one runs. What each step runs is unit-tested on CPU (tests/test_precision.py).
#   trainer-torch   bench trainer on the device, torch backend
#   trainer-fbgemm  the same, fbgemm backend (falls back to torch where fbgemm-gpu does not import)
#   fiited          FIITED on the device (torch kernel path), checked against a CPU twin, then its examples/s
#   search          user-vector search on the device (faiss-gpu if importable, else exact search in torch)
#   fp8             bench fp8: the LoKA probe, dispatch table, NE change and step speed against bf16 and fp32
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

steps=(
  "trainer-torch|120|$PY -m benchmarks.trainer --quick --device $DEVICE --backend torch"
  "trainer-fbgemm|90|$PY -m benchmarks.trainer --quick --device $DEVICE --backend fbgemm"
  "fiited|50|$PY -m benchmarks._gpu fiited --device $DEVICE"
  "search|90|$PY -m benchmarks._gpu search --device $DEVICE"
  "fp8|130|$PY -m benchmarks.fp8 --device $DEVICE --n 40000 --batch 2048"
)

if [[ $DRY == 1 ]]; then
  for s in "${steps[@]}"; do IFS='|' read -r name limit cmd <<<"$s"; echo "step $name (${limit}s): $cmd"; done
  exit 0
fi

$PY - <<'PY'
import json, platform, torch
info = {"check": "gpu-env", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)))
print(json.dumps(info))
PY

failed=0
for s in "${steps[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]] && continue
  echo "== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  timeout "$limit" $cmd 2>&1 | tail -n 25
  rc=${PIPESTATUS[0]}
  echo "{\"check\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}"
  [[ $rc != 0 ]] && failed=$((failed + 1))
done
echo "{\"check\": \"gpu-check\", \"failed_steps\": $failed}"
exit 0
