#!/usr/bin/env bash
# JSRT chest X-rays: train on 80% of JSRT (seeded split in configs/jsrt.yaml), test on the other 20%
# (right lung, left lung, heart) and on Montgomery (lungs: labels 1 and 2 merged into 255).
# Usage: bash benchmarks/jsrt_accuracy.sh [RUN_DIR] [EPOCHS]
set -euo pipefail
RUN=${1:-runs/jsrt}
EPOCHS=${2:-300}
atlasreg train configs/jsrt.yaml --out "$RUN" --epochs "$EPOCHS" --quiet
atlasreg segment --split validation --checkpoint "$RUN/model.ckpt" --out "$RUN/segment_validation" --quiet
atlasreg evaluate "$RUN/segment_validation" --split validation --checkpoint "$RUN/model.ckpt" \
  --out "$RUN/evaluation_validation" 2>/dev/null
MONT=../shared/data/chest-xray/montgomery
atlasreg segment "$MONT/images" --checkpoint "$RUN/model.ckpt" --out "$RUN/segment_montgomery" --quiet
atlasreg evaluate "$RUN/segment_montgomery" --references "$MONT/labels" --merge 255=1,2 \
  --checkpoint "$RUN/model.ckpt" --out "$RUN/evaluation_montgomery" 2>/dev/null
