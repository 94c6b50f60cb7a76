#!/usr/bin/env bash
# The GPU checks of issue #6, prepared as one device call (a session is lent ~15 minutes):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#
# Steps run in order of importance, each under its own time limit, so a slow step cannot
# take the later ones down with it; every step's output is kept even if a later one fails.
# Everything goes under $OUT (the device tool's return folder; benchmarks/results/gpu_session
# elsewhere). Copy that folder to benchmarks/results/<device>/ and commit it.
#
#   1. benchmark.py, every case, ours against the release-style reference (fp32)
#   2. Standard AT, ResNet-18, 2 epochs on CIFAR-shaped synthetic data (50,000 / 10,000)
#   3. the two MI estimators, 1 epoch on 10,000 images (stage 3 needs them)
#   4. NAMID, ResNet-18, 2 epochs on the same data
#   5. benchmark.py --options amp,channels_last (each alone against all off)
#   6. Standard AT again, 2 epochs, with --amp --channels-last
#   7. benchmark.py --options compile (last: two cold compiles may not fit what is left)
#
# SMALL=1 shrinks every step so the plumbing can be checked on a CPU in a few minutes.
# SKIP="1_benchmark 7_compile" leaves those steps out (e.g. on a rerun after a timeout).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
DATA=$(mktemp -d)
export PYTHONUNBUFFERED=1

if [ "${SMALL:-0}" = 1 ]; then
    SIZE="600 200"; BENCH="--batch-size 16 --iters 1 --warmup 1 --quick --threads 2"; EPOCHS=1
    TRAIN="--batch-size 50 --test-limit 100 --num-steps 2 --eval-steps 2"; MI_LIMIT=200; MI_TEST=100; MI_H=64
    SCALE=10; DEADLINE=${DEADLINE:-3000}
else
    SIZE="50000 10000"; BENCH="--repeats 2"; EPOCHS=2
    TRAIN=""; MI_LIMIT=10000; MI_TEST=500; MI_H=2048
    SCALE=1
fi

# The whole script stops by DEADLINE seconds, keeping 20 s to tidy up; a step gets its own
# limit or what is left, whichever is less, and is skipped when under 20 s are left.
DEADLINE=${DEADLINE:-540}

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log, keep going
step() {
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "== $name skipped (SKIP)" | tee -a "$OUT/steps.txt"
        return
    fi
    local left=$(( DEADLINE - 20 - SECONDS ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name skipped: ${left}s left of the ${DEADLINE}s deadline" | tee -a "$OUT/steps.txt"
        return
    fi
    local began=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $(( SECONDS - began ))s" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step 1_benchmark 150 python benchmarks/benchmark.py $BENCH --out "$OUT/benchmark.json"

step 2_data 40 python data/make_npy.py --dataset synthetic --synthetic-size $SIZE --out "$DATA"
COMMON="--dataset npy --data-dir $DATA --arch resnet18 --epochs $EPOCHS --no-progress --overwrite $TRAIN"
step 2_standard 100 python train_standard.py $COMMON --model-dir "$OUT/standard"
step 3_mi_estimator 60 python train_MI_estimator.py --dataset npy --data-dir "$DATA" --train-limit $MI_LIMIT \
    --test-limit $MI_TEST --epochs 1 --va-hsize $MI_H --no-progress --overwrite --pre-target "$OUT/standard/best_model.pth" \
    --model-dir "$OUT/mi_estimator"
step 4_namid 120 python train_MIAT.py $COMMON --va-hsize $MI_H --mi-dir "$OUT/mi_estimator" \
    --model-dir "$OUT/namid"

OPTS="--only train-step,namid-step,pgd40-eval --arch resnet18 --repeats 2"
# one repeat: --options writes its JSON only once every repeat is done
COMPILE_OPTS="--only train-step --arch resnet18 --repeats 1"
[ "${SMALL:-0}" = 1 ] && OPTS="--only train-step --arch smallcnn --batch-size 16 --iters 1 --threads 2" && COMPILE_OPTS="$OPTS --repeats 1"
step 5_options 90 python benchmarks/benchmark.py --options amp,channels_last $OPTS --out "$OUT/options.json"
step 6_standard_fast 80 python train_standard.py $COMMON --amp --channels-last --model-dir "$OUT/standard_fast"
# compile: one case only; each case compiles afresh, and three would not fit the deadline
step 7_compile 120 python benchmarks/benchmark.py --options compile $COMPILE_OPTS --warmup 2 \
    --out "$OUT/compile.json"

# model checkpoints are not results: drop them so that the folder can be committed as it is
find "$OUT" -name "*.pth" -delete
# Seconds per epoch of each training run: train_seconds is the training pass alone, seconds adds
# the per-epoch evaluation on the held-out split.
python - "$OUT" <<'PY' | tee "$OUT/training_seconds.md"
import json, pathlib, sys
print("| run | epoch | train_seconds | seconds | train_acc | clean_acc | pgd_acc |")
print("|---|---:|---:|---:|---:|---:|---:|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.jsonl")):
    for line in f.read_text().splitlines():
        r = json.loads(line)
        cells = [r.get(k) for k in ("train_seconds", "seconds", "train_acc", "clean_acc", "pgd_acc")]
        print(f"| {f.parent.name} | {r['epoch']} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
PY
rm -rf "$DATA"
echo "== done"; cat "$OUT/steps.txt"
