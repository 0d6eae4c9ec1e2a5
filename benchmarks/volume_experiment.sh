#!/usr/bin/env bash
# Atlas-ISTN and the U-Net baseline (same network and budget) in 3D, on our validation split of a set:
# train both, segment the validation cases (ITN, 1-pass, refine; U-Net, U-Net_lcc), evaluate (Dice,
# HD95, ASD per structure, topology, Jacobian statistics of the transforms) and write the report.
# Run by hand from the repository root; steps already done are skipped.
# Usage: bash benchmarks/volume_experiment.sh SET [RUN_DIR] [THREADS]
#   SET: acdc | mouse_brain (configs/SET.yaml and configs/variants/SET_unet.yaml)
#   THREADS: torch threads per training (two trainings run side by side; default 1 each)
set -euo pipefail
SET=${1:?usage: volume_experiment.sh acdc|mouse_brain [RUN_DIR] [THREADS]}
RUN=${2:-runs/$SET}
THREADS=${3:-1}
mkdir -p "$RUN"
declare -A CONFIGS=([atlas_istn]=configs/$SET.yaml [unet]=configs/variants/${SET}_unet.yaml)
pids=()
for MODEL in atlas_istn unet; do
  if [ ! -f "$RUN/$MODEL/model.ckpt" ]; then
    atlasreg train "${CONFIGS[$MODEL]}" --out "$RUN/$MODEL" --set training.threads="$THREADS" --quiet \
      > "$RUN/$MODEL.log" 2>&1 &
    pids+=($!)
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
for MODEL in atlas_istn unet; do
  if [ ! -d "$RUN/eval_$MODEL" ]; then
    atlasreg segment --split validation --checkpoint "$RUN/$MODEL/model.ckpt" --out "$RUN/seg_$MODEL" --quiet
    atlasreg evaluate "$RUN/seg_$MODEL" --split validation --checkpoint "$RUN/$MODEL/model.ckpt" \
      --test-set "$SET validation" --out "$RUN/eval_$MODEL" > /dev/null
  fi
done
atlasreg report "$RUN"/eval_* --out "$RUN/report" --title "Atlas-ISTN in 3D: $SET (our validation split)"
