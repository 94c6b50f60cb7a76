#!/usr/bin/env bash
# The committed CPU-scale reproduction (results/fashion-mnist/), on 2 CPU cores.
# Needs the Debian Fashion-MNIST files: apt-get install -y dataset-fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/../.."

# One command runs every stage, evaluates and writes report.md:
python run_pipeline.py --preset fashion-mnist --method all --seeds 0,1,2 --ablations \
    --out-dir results/fashion-mnist --no-progress

# How it was actually run, to use both cores: the stage commands that
#   python run_pipeline.py --preset fashion-mnist --method all --seeds 0,1,2 --ablations \
#       --out-dir results/fashion-mnist --no-progress --dry-run
# prints were run in two parallel lanes of one thread each (OMP_NUM_THREADS=1; a stage
# started once the stages it needs were done), then the fourteen per-model evaluations
# it prints in two more lanes, and finally the command above, which found every stage and evaluation complete, ran
# the ε sweep and wrote results.json, results.md and report.md.

# AutoAttack (standard version) on the first 500 test images, Standard AT and NAMID of seed 0
# (about 24 minutes each on one core; the full test set would take about 8 core-hours per model):
for pair in "standard|Standard AT" "namid|NAMID"; do
    dir=${pair%%|*}; name=${pair#*|}
    OMP_NUM_THREADS=1 python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn \
        --epsilon 0.1 --channels-last --attacks aa --n-examples 500 --batch-size 500 \
        --model-dir results/fashion-mnist/$dir --name "$name" \
        --out results/fashion-mnist/eval/aa500_$dir.json --md results/fashion-mnist/eval/aa500_$dir.md --no-progress
done

# PGD-40 on the same 500 images, to compare with AutoAttack:
OMP_NUM_THREADS=1 python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn --epsilon 0.1 \
    --channels-last --attacks pgd40 --n-examples 500 --batch-size 500 \
    --model-dir results/fashion-mnist/standard --name 'Standard AT' --model-dir results/fashion-mnist/namid --name NAMID \
    --out results/fashion-mnist/eval/pgd40_500.json --md results/fashion-mnist/eval/pgd40_500.md --no-progress

# AutoAttack and PGD-40 on the first 500 test images, seed 1:
for pair in "standard_seed1|Standard AT (seed 1)" "namid_seed1|NAMID (seed 1)"; do
    dir=${pair%%|*}; name=${pair#*|}
    OMP_NUM_THREADS=1 python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn \
        --epsilon 0.1 --channels-last --attacks pgd40,aa --n-examples 500 --batch-size 500 \
        --model-dir results/fashion-mnist/$dir --name "$name" \
        --out results/fashion-mnist/eval/aa500_$dir.json --md results/fashion-mnist/eval/aa500_$dir.md --no-progress
done

# L2 attacks (PGD-40, CW, DDN at epsilon 0.5) on all 10,000 test images, seed 0 (about 28 minutes on one core):
OMP_NUM_THREADS=1 python test_comparison.py --dataset fashion-mnist --data-dir data --arch smallcnn \
    --channels-last --attacks all-l2 --batch-size 500 \
    --model-dir results/fashion-mnist/standard --name 'Standard AT' --model-dir results/fashion-mnist/namid --name NAMID \
    --out results/fashion-mnist/eval/l2.json --md results/fashion-mnist/eval/l2.md --no-progress
