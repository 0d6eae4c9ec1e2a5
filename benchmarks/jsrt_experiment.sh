#!/usr/bin/env bash
# Chest X-ray across sites, the analogue of the paper's brain MRI study (Table 7): Atlas-ISTN, U-Net
# (and U-Net_lcc), VML and Fixed (a fixed training-case atlas, paper Table 4) trained on JSRT (80%,
# seeded split in configs/jsrt.yaml), tested on the JSRT validation split (right lung, left lung,
# heart) and on Montgomery (lungs: labels 1 and 2 merged).
# Run by hand from the repository root; steps already done are skipped.
# Usage: [MODELS="atlas_istn unet ..."] bash benchmarks/jsrt_experiment.sh [RUN_DIR] [EPOCHS] [MAIN_RUN]
#   MODELS: the models to train and evaluate in this call (default: all); the report covers every
#   model evaluated so far.
set -euo pipefail
RUN=${1:-runs/jsrt_experiment}
EPOCHS=${2:-300}
MAIN=${3:-$RUN/atlas_istn}
MONT=../shared/data/chest-xray/montgomery
mkdir -p "$RUN"
declare -A CONFIGS=([atlas_istn]=configs/jsrt.yaml [unet]=configs/variants/jsrt_unet.yaml
  [vml]=configs/variants/jsrt_vml.yaml [fixed]=configs/variants/jsrt_fixed.yaml)
for MODEL in ${MODELS:-atlas_istn unet vml fixed}; do
  [ -n "${CONFIGS[$MODEL]:-}" ] || { echo "unknown model '$MODEL' in MODELS" >&2; exit 2; }
  DIR=$RUN/$MODEL
  [ "$MODEL" = atlas_istn ] && DIR=$MAIN
  [ -f "$DIR/model.ckpt" ] || atlasreg train "${CONFIGS[$MODEL]}" --out "$DIR" --epochs "$EPOCHS" --quiet
  if [ ! -d "$RUN/eval_${MODEL}_jsrt" ]; then
    atlasreg segment --split validation --checkpoint "$DIR/model.ckpt" --out "$RUN/seg_${MODEL}_jsrt" --quiet
    atlasreg evaluate "$RUN/seg_${MODEL}_jsrt" --split validation --checkpoint "$DIR/model.ckpt" \
      --test-set "JSRT validation" --out "$RUN/eval_${MODEL}_jsrt" > /dev/null
  fi
  if [ ! -d "$RUN/eval_${MODEL}_montgomery" ]; then
    atlasreg segment "$MONT/images" --checkpoint "$DIR/model.ckpt" --out "$RUN/seg_${MODEL}_montgomery" --quiet
    atlasreg evaluate "$RUN/seg_${MODEL}_montgomery" --references "$MONT/labels" --merge 255=1,2 \
      --checkpoint "$DIR/model.ckpt" --test-set "Montgomery (lungs)" --out "$RUN/eval_${MODEL}_montgomery" > /dev/null
  fi
done
atlasreg report "$RUN"/eval_*_jsrt "$RUN"/eval_*_montgomery --out "$RUN/report" \
  --title "Atlas-ISTN on chest X-rays across sites (analogue of paper Table 7)"
