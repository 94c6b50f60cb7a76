#!/usr/bin/env bash
# The α study (results/fashion-mnist/alpha/): NAMID on the committed Fashion-MNIST preset with
# α ∈ {0.03, 0.1, 0.3, 1, 5}, with the corrected defaults and with --release-compat, seed 0.
# Needs the Debian Fashion-MNIST files: apt-get install -y dataset-fashion-mnist
# Each command ran with OMP_NUM_THREADS=1, in two lanes (logs/ has each run's output).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/alpha}
DATA="--dataset fashion-mnist --data-dir data --arch smallcnn --epsilon 0.1 --train-limit 6500 --val-size 500
      --channels-last --seed 0 --no-progress"
TRAIN="--epochs 6 --warm-up-epochs 1 --batch-size 100 --lr 0.05 --lr-milestones 5 --num-steps 10 --eval-steps 10"

# Standard AT, seed 0: the same command as results/fashion-mnist/standard (its numbers are identical).
python train_standard.py $DATA $TRAIN --model-dir $OUT/standard

# The estimators: the committed preset's (H = 512, 4 epochs), and the same with --release-compat.
python train_MI_estimator.py $DATA --va-hsize 512 --epochs 4 --batch-size 200 --num-steps 10 --lr-milestones 3 \
    --pre-target $OUT/standard/best_model.pth --model-dir $OUT/mi_estimator
python train_MI_estimator.py $DATA --va-hsize 512 --epochs 4 --batch-size 200 --num-steps 10 --lr-milestones 3 \
    --release-compat --pre-target $OUT/standard/best_model.pth --model-dir $OUT/mi_estimator_release

# NAMID at each α, then PGD-40 on all 10,000 test images.
for alpha in 0.03 0.1 0.3 1 5; do
  for mode in corrected release; do
    if [ $mode = corrected ]; then name=namid_a$alpha; extra=""; mi=$OUT/mi_estimator
    else name=namid_a${alpha}_rc; extra="--release-compat"; mi=$OUT/mi_estimator_release; fi
    python train_MIAT.py $DATA --va-hsize 512 $TRAIN --alpha $alpha --adv-loss ce $extra --mi-dir $mi \
        --model-dir $OUT/$name
    python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn --epsilon 0.1 --channels-last \
        --attacks pgd40 --batch-size 500 --model-dir $OUT/$name --name $name --out $OUT/eval/$name.json --no-progress
  done
done

# α = 1 with one change each against the corrected run: a stage-3 quirk, or the --release-compat estimators.
for change in selection dv_mask estimators; do
  case $change in
    selection) extra="--release-selection"; mi=$OUT/mi_estimator ;;
    dv_mask) extra="--release-dv-mask"; mi=$OUT/mi_estimator ;;
    estimators) extra=""; mi=$OUT/mi_estimator_release ;;
  esac
  name=namid_a1_quirk_$change
  python train_MIAT.py $DATA --va-hsize 512 $TRAIN --alpha 1 --adv-loss ce $extra --mi-dir $mi --model-dir $OUT/$name
  python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn --epsilon 0.1 --channels-last \
      --attacks pgd40 --batch-size 500 --model-dir $OUT/$name --name $name --out $OUT/eval/$name.json --no-progress
done

# Stronger estimators for Fig. 4 (results/fashion-mnist/mi_estimator_h2048): the paper's H = 2048, 3× the epochs.
python train_MI_estimator.py $DATA --va-hsize 2048 --epochs 12 --batch-size 200 --num-steps 10 --lr-milestones 9 \
    --pre-target $OUT/standard/best_model.pth --model-dir $OUT/mi_estimator_h2048
