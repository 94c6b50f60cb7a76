#!/usr/bin/env bash
# The exact commands behind results/fashion-mnist-small (2 CPU cores, torch 2.14.1, seed 0).
# Checkpoints (*.pth) are not committed; rerunning these recreates them.
set -euo pipefail
R=runs/fmnist

# Stage 1: Standard AT
python train_standard.py --dataset fashion-mnist --arch smallcnn --train-limit 3000 --test-limit 1000 --epochs 5 \
  --warm-up-epochs 1 --batch-size 100 --lr 0.05 --epsilon 0.1 --num-steps 10 --eval-steps 20 --lr-milestones 4 \
  --model-dir $R/standard --no-progress

# Stage 2: both estimator objectives on the Standard AT model
COMMON="--pre-target $R/standard/best_model.pth --dataset fashion-mnist --arch smallcnn --train-limit 3000 \
  --test-limit 1000 --epsilon 0.1 --num-steps 10 --epochs 4 --batch-size 200 --lr-milestones 3 --va-hsize 512 --no-progress"
python train_MI_estimator.py $COMMON --model-dir $R/mi_estimator
python train_MI_estimator_only_max.py $COMMON --model-dir $R/mi_estimator_only_max

# Stage 3: NAMID with the paper's alpha = 5 (diverged; stopped after epoch 3) and with alpha = 0.1
S3="--mi-dir $R/mi_estimator --dataset fashion-mnist --arch smallcnn --train-limit 3000 --test-limit 1000 --epochs 5 \
  --warm-up-epochs 1 --batch-size 100 --lr 0.05 --epsilon 0.1 --num-steps 10 --eval-steps 20 --lr-milestones 4 \
  --va-hsize 512 --select-by pgd_acc --no-progress"
python train_MIAT.py $S3 --model-dir $R/namid
python train_MIAT.py $S3 --alpha 0.1 --model-dir $R/namid_alpha0.1

# Evaluation
M="--model-dir $R/standard --name Standard-AT --arch smallcnn --model-dir $R/namid_alpha0.1 --name NAMID-alpha0.1 \
  --arch smallcnn --dataset fashion-mnist --no-progress"
python test_comparison.py $M --epsilon 0.1 --n-examples 1000 --attacks pgd40,fwa40,tidim,mifgsm \
  --out $R/eval_linf.json --md $R/eval_linf.md
python test_comparison.py $M --n-examples 1000 --attacks all-l2 --out $R/eval_l2.json --md $R/eval_l2.md
python test_comparison.py --model-dir $R/standard --name Standard-AT --arch smallcnn --dataset fashion-mnist \
  --epsilon 0.1 --n-examples 200 --attacks aa --out $R/eval_aa_standard.json --md $R/eval_aa_standard.md
python test_comparison.py --model-dir $R/namid_alpha0.1 --name NAMID-alpha0.1 --arch smallcnn --dataset fashion-mnist \
  --epsilon 0.1 --n-examples 200 --attacks aa --out $R/eval_aa_namid.json --md $R/eval_aa_namid.md
