#!/usr/bin/env bash
# Every GPU check and measurement of the project in one go, on one CUDA machine, within DEADLINE
# seconds (420 by default, so that a second try fits in a 10-minute command):
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh
#
#   0. the wheels in .whl/ (benchmarks/fetch_wheels.sh; pyautoattack) installed into a temporary
#      folder put on PYTHONPATH, if there are any
#   1. tests/test_cuda.py (JUnit XML with each test's peak GPU memory)
#   2. benchmark.py, every case, ours against the release-style reference (fp32)
#   3. CIFAR-shaped synthetic data, 10,000 training / 1,000 test images (data/make_npy.py)
#   4. Standard AT, ResNet-18, 2 epochs
#   5. the two MI estimators, 1 epoch on 5,000 images (stage 3 needs them)
#   6. NAMID, ResNet-18, 2 epochs
#   7. benchmark.py --options amp,channels_last (each alone against all off)
#   8. Standard AT again, 2 epochs, with --amp --channels-last
#   9. benchmark.py --options compile, one case (last: its cold compiles may not fit what is left)
#
# Steps run in order of importance, each under its own time limit or what is left of the deadline,
# whichever is less; a step with under 20 s left is skipped. Everything a step writes goes into one
# archive, $OUT/gpu_session.tar.gz (a folder gpu_session/: env.txt, steps.txt, each step's log, the
# benchmark JSON/Markdown, each run's config, metrics and curves, training_seconds.md; never a
# checkpoint), re-packed after every step, so that a command stopped from outside still returns
# what was done; $OUT/summary.txt repeats the steps and the training table. Nothing else goes in $OUT.
#
# Without CUDA it stops at once. SMALL=1 is the rehearsal on a CPU: every step shrunk (SmallCNN,
# a few hundred images, --device cpu) and the compile step left out, in about a minute.
# SKIP="2_benchmark 9_compile" leaves steps out (e.g. on a rerun after a timeout); DEVICE overrides
# --device; WHEELS names another folder of wheels.
set -u
cd "$(dirname "$0")/.."
SMALL=${SMALL:-0}
if [ "$SMALL" != 1 ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_session.sh: no CUDA device here (python3's torch.cuda.is_available() is False); SMALL=1 rehearses it on the CPU" >&2
    exit 1
fi

DEADLINE=${DEADLINE:-420}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-$(mktemp -d -t gpu_session_out.XXXXXX)}
mkdir -p "$OUT"
TMP=$(mktemp -d -t gpu_session.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
WORK=$TMP/gpu_session  # what the archive holds
DATA=$TMP/data
mkdir -p "$WORK"
ARCHIVE=gpu_session.tar.gz
# A returned file may have 16 MiB: a file over 4 MiB (a runaway log) is left out of the archive.
MAX_FILE_KB=4096
export PYTHONUNBUFFERED=1

if [ "$SMALL" = 1 ]; then
    DEVICE=${DEVICE:-cpu}; ARCH=smallcnn; SIZE="300 100"; EPOCHS=1
    TRAIN="--batch-size 50 --test-limit 50 --num-steps 1 --eval-steps 1"
    MI_SIZE="--train-limit 100 --test-limit 50 --batch-size 50 --num-steps 1 --eval-steps 1"; MI_H=16
    BENCH="--quick --only train-step --arch smallcnn --batch-size 8 --iters 1 --warmup 0 --threads 1 --ref-workers 0"
    OPTS="--only train-step --arch smallcnn --batch-size 8 --iters 1 --warmup 0 --threads 1"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=${DEVICE:-cuda}; ARCH=resnet18; SIZE="10000 1000"; EPOCHS=2
    TRAIN=""
    MI_SIZE="--train-limit 5000 --test-limit 500"; MI_H=2048
    BENCH="--iters 5 --warmup 2"
    OPTS="--only train-step,namid-step,pgd40-eval --arch resnet18 --repeats 2"
fi

# Per epoch of each training run: train_seconds is the training pass alone, seconds adds the
# per-epoch evaluation on the held-out split.
training_table() {
    python3 - "$WORK" <<'PY'
import json, pathlib, sys
print("| run | epoch | train_seconds | seconds | train_acc | clean_acc | pgd_acc |")
print("|---|---:|---:|---:|---:|---:|---:|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.jsonl")):
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut off by a stopped run
            continue
        cells = [r.get(k) for k in ("train_seconds", "seconds", "train_acc", "clean_acc", "pgd_acc")]
        print(f"| {f.parent.name} | {r['epoch']} | "
              + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
PY
}

# The archive and the summary, replaced whole (written beside, then renamed) after every step.
pack() {
    training_table >"$WORK/training_seconds.md" 2>/dev/null
    (cd "$TMP" && find gpu_session -type f -size +${MAX_FILE_KB}k ! -name '*.pth') >"$TMP/too_big.txt"
    if [ -s "$TMP/too_big.txt" ]; then
        sed 's/^/left out of the archive, over 4 MiB: /' "$TMP/too_big.txt" >"$WORK/left_out.txt"
    fi
    tar -czf "$OUT/$ARCHIVE.part" -C "$TMP" --exclude='*.pth' -X "$TMP/too_big.txt" gpu_session \
        && mv -f "$OUT/$ARCHIVE.part" "$OUT/$ARCHIVE"
    { cat "$WORK/env.txt" 2>/dev/null; echo; cat "$WORK/steps.txt" 2>/dev/null; echo
      cat "$WORK/training_seconds.md"; } >"$OUT/summary.txt.part" && mv -f "$OUT/summary.txt.part" "$OUT/summary.txt"
}

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to NAME.log, pack; returns its status.
step() {
    local name=$1 limit=$2; shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "== $name skipped (SKIP)" | tee -a "$WORK/steps.txt"
        pack
        return 1
    fi
    local left=$(( DEADLINE - 20 - SECONDS ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name skipped: ${left}s left of the ${DEADLINE}s deadline" | tee -a "$WORK/steps.txt"
        pack
        return 1
    fi
    local began=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/steps.txt"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $(( SECONDS - began ))s" | tee -a "$WORK/steps.txt"
    tail -n 15 "$WORK/$name.log"
    pack
    return $rc
}

: >"$WORK/steps.txt"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step 0_wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TMP/site" "$WHEELS"/*.whl && export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    echo "gpu_session.sh: $( [ "$SMALL" = 1 ] && echo "SMALL=1 rehearsal" || echo "GPU session" ), --device $DEVICE, deadline ${DEADLINE}s"
    date -u
    if commit=$(git rev-parse HEAD 2>/dev/null); then
        echo "commit: $commit$(git diff --quiet HEAD 2>/dev/null || echo ' (+changes)')"
    else
        echo "commit: unknown (no git here)"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 - <<'PY'
import platform, re, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
    print("results folder: benchmarks/results/" + re.sub(r"[^A-Za-z0-9]+", "_", p.name).strip("_"))
else:
    print("device cpu")
for name in ("numpy", "scipy", "pytest", "tqdm", "matplotlib", "torchvision", "pyautoattack"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "(no version)"), module.__file__)
    except ImportError:
        print(name, "missing")
PY
    [ -d "$TMP/site" ] && echo "installed from $WHEELS: $(ls "$TMP/site" | grep -v '^bin$' | tr '\n' ' ')"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
pack

step 1_test_cuda 240 python3 -m pytest tests/test_cuda.py -rs -q -p no:cacheprovider --durations=15 \
    -o junit_logging=system-out --junitxml="$WORK/test_cuda.xml"

step 2_benchmark 90 python3 benchmarks/benchmark.py --device "$DEVICE" $BENCH --out "$WORK/benchmark.json"

step 3_data 30 python3 data/make_npy.py --dataset synthetic --synthetic-size $SIZE --out "$DATA"
COMMON="--dataset npy --data-dir $DATA --arch $ARCH --epochs $EPOCHS --no-progress --overwrite --device $DEVICE $TRAIN"
step 4_standard 60 python3 train_standard.py $COMMON --model-dir "$WORK/standard"
step 5_mi_estimator 45 python3 train_MI_estimator.py --dataset npy --data-dir "$DATA" --arch $ARCH $MI_SIZE \
    --va-hsize $MI_H --epochs 1 --no-progress --overwrite --device "$DEVICE" --pre-target "$WORK/standard/best_model.pth" \
    --model-dir "$WORK/mi_estimator"
step 6_namid 60 python3 train_MIAT.py $COMMON --va-hsize $MI_H --mi-dir "$WORK/mi_estimator" \
    --model-dir "$WORK/namid"

step 7_options 60 python3 benchmarks/benchmark.py --device "$DEVICE" --options amp,channels_last $OPTS \
    --out "$WORK/options.json"
step 8_standard_fast 50 python3 train_standard.py $COMMON --amp --channels-last --model-dir "$WORK/standard_fast"
if [ "$SMALL" = 1 ]; then
    echo "== 9_compile skipped (SMALL=1: compiling takes minutes on a CPU)" | tee -a "$WORK/steps.txt"
else
    # One case, one repeat: each case compiles afresh, and --options writes its JSON once every repeat is done.
    step 9_compile 100 python3 benchmarks/benchmark.py --device "$DEVICE" --options compile --only train-step \
        --arch resnet18 --repeats 1 --warmup 2 --out "$WORK/compile.json"
fi

echo "== done in ${SECONDS}s" >>"$WORK/steps.txt"
pack
echo "== done in ${SECONDS}s: $OUT/$ARCHIVE ($(du -h "$OUT/$ARCHIVE" | cut -f1)), $OUT/summary.txt"
cat "$OUT/summary.txt"
