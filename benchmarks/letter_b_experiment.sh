#!/usr/bin/env bash
# The paper's Letter-B evaluation (Sec. 3.1-3.2): Atlas-ISTN and its baselines and ablations (U-Net,
# U-Net_lcc, Independent, VML, Atlas-ISTN without L_s, Fixed, SVF), trained on clean B1-B900 and tested
# on clean and corrupt B901-B1000; refinement with six regularisation weights; one report.
# Run by hand from the repository root. Full schedule (EPOCHS=300): about 65 min of training per
# model on 2 CPU cores, so about 6.5 h in all; every step resumes or is skipped when already done.
# Usage: [MODELS="atlas_istn unet ..."] bash benchmarks/letter_b_experiment.sh [RUN_DIR] [EPOCHS] [MAIN_RUN]
#   MAIN_RUN: an existing Atlas-ISTN run folder (with model.ckpt) to reuse instead of training one.
#   MODELS: the models to train and evaluate in this call (default: all); the report covers every
#   model evaluated so far.
set -euo pipefail
RUN=${1:-runs/letter_b_experiment}
EPOCHS=${2:-300}
MAIN=${3:-$RUN/atlas_istn}
DATA=../shared/data/letter-b
mkdir -p "$RUN"
declare -A CONFIGS=([atlas_istn]=configs/letter_b.yaml [unet]=configs/variants/letter_b_unet.yaml
  [vml]=configs/variants/letter_b_vml.yaml [no_seg_loss]=configs/variants/letter_b_no_seg_loss.yaml
  [fixed]=configs/variants/letter_b_fixed.yaml [svf]=configs/variants/letter_b_svf.yaml)
test_images() { for i in $(seq 901 1000); do echo "$DATA/$1/B${i}_img.png"; done; }

for MODEL in ${MODELS:-atlas_istn unet vml fixed no_seg_loss svf}; do
  [ -n "${CONFIGS[$MODEL]:-}" ] || { echo "unknown model '$MODEL' in MODELS" >&2; exit 2; }
  DIR=$RUN/$MODEL
  [ "$MODEL" = atlas_istn ] && DIR=$MAIN
  [ -f "$DIR/model.ckpt" ] || atlasreg train "${CONFIGS[$MODEL]}" --out "$DIR" --epochs "$EPOCHS" --quiet
  for SPLIT in clean corrupt; do
    [ -d "$RUN/eval_${MODEL}_$SPLIT" ] && continue
    atlasreg segment $(test_images "$SPLIT") --image-suffix _img --checkpoint "$DIR/model.ckpt" \
      --out "$RUN/seg_${MODEL}_$SPLIT" --quiet
    atlasreg evaluate "$RUN/seg_${MODEL}_$SPLIT" --references "$DATA/$SPLIT" --reference-suffix _seg \
      --test-set "$SPLIT" --out "$RUN/eval_${MODEL}_$SPLIT" > /dev/null
  done
done

# Sensitivity of refinement to its regularisation weight lambda* (world units; 0.126 = reference 500).
SENS=()
for LAM in 0.0126 0.04 0.126 0.4 1.26 4.0; do
  for SPLIT in clean corrupt; do
    OUT=$RUN/sens_${LAM}_$SPLIT
    if [ ! -d "$OUT/eval" ]; then
      atlasreg segment $(test_images "$SPLIT") --image-suffix _img --checkpoint "$MAIN/model.ckpt" \
        --lambda "$LAM" --out "$OUT/seg" --quiet
      atlasreg evaluate "$OUT/seg" --references "$DATA/$SPLIT" --reference-suffix _seg --test-set "$SPLIT" \
        --out "$OUT/eval" > /dev/null
    fi
    SENS+=("$OUT/eval")
  done
done

atlasreg report "$RUN"/eval_*_clean "$RUN"/eval_*_corrupt --sensitivity "${SENS[@]}" --out "$RUN/report" \
  --title "Atlas-ISTN on Letter-B: baselines, ablations and regularisation (paper Sec. 3.1-3.2)"
