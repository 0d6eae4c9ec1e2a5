#!/usr/bin/env bash
# Letter-B accuracy with the paper's settings (Sec. 3.1): train on clean B1-B900, test on clean and
# corrupt B901-B1000. Run by hand from the repository root; about 65 minutes on 2 CPU cores.
# Usage: bash benchmarks/letter_b_accuracy.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/letter_b}
DATA=../shared/data/letter-b
atlasreg train configs/letter_b.yaml --out "$RUN" --quiet          # resumes if interrupted
for SPLIT in clean corrupt; do
  mkdir -p "$RUN/test_$SPLIT"
  # B901-B1000 only: the clean folder also holds the training cases.
  atlasreg segment $(for i in $(seq 901 1000); do echo "$DATA/$SPLIT/B${i}_img.png"; done) \
    --image-suffix _img --checkpoint "$RUN/model.ckpt" --out "$RUN/segment_$SPLIT" --quiet
  atlasreg evaluate "$RUN/segment_$SPLIT" --references "$DATA/$SPLIT" --reference-suffix _seg \
    --checkpoint "$RUN/model.ckpt" --out "$RUN/evaluation_$SPLIT" 2>/dev/null
done
