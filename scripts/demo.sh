#!/usr/bin/env bash
# The main job end to end on the embedded default, everything made locally and labelled SYNTHETIC:
#   1. a SYNTHETIC H&E-like slide with two known tumour regions (not patient data) + its ASAP XML,
#   2. a SYNTHETIC colour-rule "model" package (WSInfer format; not a trained classifier),
#   3. wsi-inspect (preflight + QC picture), then wsi-infer (heatmap, overlay, regions, tables).
# Output folder: $1 or ./demo_out
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${1:-$PWD/demo_out}"
mkdir -p "$OUT"
SLIDE="$OUT/synthetic_slide.tif"
MODEL="$OUT/synthetic_colour_rule_model"
if [ ! -f "$SLIDE" ]; then
  echo "[demo] writing a SYNTHETIC slide (4 mm^2 of tissue, 0.243 um/px) to $SLIDE" >&2
  wsi-synth "$SLIDE" --mpp 0.243 --tissue-mm2 4 --seed 0 >/dev/null
fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "[demo] writing a SYNTHETIC colour-rule model package to $MODEL" >&2
  python -c "import sys; from wsi_toolkit.synthetic_model import make_colour_rule_package as m; m(sys.argv[1])" "$MODEL"
fi
wsi-inspect "$SLIDE" --qc "$OUT"
wsi-infer "$SLIDE" --model "$MODEL" --out "$OUT/results" --overwrite
echo "[demo] SYNTHETIC results, not clinical:" >&2
echo "[demo]   overlay    $OUT/results/synthetic_slide/overlay.png" >&2
echo "[demo]   regions    $OUT/results/synthetic_slide/tumor.geojson (QuPath), tumor.xml (ASAP)" >&2
echo "[demo]   truth      $OUT/synthetic_slide.xml (ASAP XML of the drawn tumours)" >&2
echo "[demo]   QC picture $OUT/synthetic_slide_qc.png" >&2
