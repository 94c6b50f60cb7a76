#!/usr/bin/env bash
# The α-balance study (results/fashion-mnist/balance/): NAMID at the paper's α = 5 with the MI
# gradient capped by --mi-grad-clip ρ ∈ {0.1, 0.5}, against Standard AT, on the committed
# Fashion-MNIST preset, for ARCH=smallcnn or resnet20 and SEED=0, 1, 2 (README.md says which have run).
# Needs the Debian Fashion-MNIST files: apt-get install -y dataset-fashion-mnist
# Each command ran with OMP_NUM_THREADS=1, in two lanes (logs/ has each run's output).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/balance}
ARCH=${ARCH:-smallcnn}
SEED=${SEED:-0}
DATA="--dataset fashion-mnist --data-dir data --arch $ARCH --epsilon 0.1 --train-limit 6500 --val-size 500
      --channels-last --seed $SEED --no-progress"
TRAIN="--epochs 6 --warm-up-epochs 1 --batch-size 100 --lr 0.05 --lr-milestones 5 --num-steps 10 --eval-steps 10"
EVAL="--dataset fashion-mnist --data-dir data --arch $ARCH --epsilon 0.1 --channels-last --no-progress"

# Standard AT (for SmallCNN the same command as results/fashion-mnist/standard), and its estimators.
python train_standard.py $DATA $TRAIN --model-dir $OUT/${ARCH}_standard_s$SEED
python train_MI_estimator.py $DATA --va-hsize 512 --epochs 4 --batch-size 200 --num-steps 10 --lr-milestones 3 \
    --pre-target $OUT/${ARCH}_standard_s$SEED/best_model.pth --model-dir $OUT/${ARCH}_mi_estimator_s$SEED

# NAMID at α = 5 with the cap at two settings.
for rho in 0.1 0.5; do
  python train_MIAT.py $DATA --va-hsize 512 $TRAIN --alpha 5 --mi-grad-clip $rho \
      --mi-dir $OUT/${ARCH}_mi_estimator_s$SEED --model-dir $OUT/${ARCH}_namid_a5_clip${rho}_s$SEED
done

# PGD-40 on all 10,000 test images: the selected model (target_model.pth / best_model.pth).
for run in ${ARCH}_standard_s$SEED ${ARCH}_namid_a5_clip0.1_s$SEED ${ARCH}_namid_a5_clip0.5_s$SEED; do
  python test_comparison.py $EVAL --attacks pgd40 --batch-size 500 --model-dir $OUT/$run --name $run \
      --out $OUT/eval/$run.json
done

# The last checkpoint (last.pth) under PGD-40, where the selected epoch is not the last one.
for run in ${ARCH}_standard_s$SEED ${ARCH}_namid_a5_clip0.1_s$SEED ${ARCH}_namid_a5_clip0.5_s$SEED; do
  if ! python -c "import json,sys; r=[json.loads(l) for l in open('$OUT/$run/metrics.jsonl')]; sys.exit(r[-1].get('best') is True)"; then
    python test_comparison.py $EVAL --attacks pgd40 --batch-size 500 --checkpoint $OUT/$run/last.pth \
        --name ${run}_last --out $OUT/eval/${run}_last.json
  fi
done

# AutoAttack (standard version, the official code) on the first 200 test images, seed 0.
if [ "$SEED" = 0 ]; then
  for run in ${ARCH}_standard_s0 ${ARCH}_namid_a5_clip0.1_s0 ${ARCH}_namid_a5_clip0.5_s0; do
    python test_comparison.py $EVAL --attacks aa --n-examples 200 --batch-size 200 --model-dir $OUT/$run \
        --name $run --out $OUT/eval/${run}_aa200.json
  done
fi

# The size of W: NAMID at α = 0.3, batch 100 against batch 400, SmallCNN seed 0 (no cap).
if [ "$ARCH" = smallcnn ] && [ "$SEED" = 0 ]; then
  for b in 100 400; do
    python train_MIAT.py $DATA --va-hsize 512 $TRAIN --batch-size $b --alpha 0.3 \
        --mi-dir $OUT/smallcnn_mi_estimator_s0 --model-dir $OUT/smallcnn_namid_a0.3_b${b}_s0
  done
fi

