#!/usr/bin/env bash
# The main job end to end on the embedded default: a SYNTHETIC slide made locally (not patient
# data), preflighted with wsi-inspect (format, mpp, tissue, patch grid, QC picture).
# Output folder: $1 or ./demo_out
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${1:-$PWD/demo_out}"
mkdir -p "$OUT"
SLIDE="$OUT/synthetic_slide.tif"
if [ ! -f "$SLIDE" ]; then
  echo "[demo] writing a SYNTHETIC slide (4 mm^2 of tissue, 0.243 um/px) to $SLIDE" >&2
  wsi-synth "$SLIDE" --mpp 0.243 --tissue-mm2 4 --seed 0 >/dev/null
fi
wsi-inspect "$SLIDE" --qc "$OUT"
echo "[demo] QC picture (SYNTHETIC slide): $OUT/synthetic_slide_qc.png" >&2
