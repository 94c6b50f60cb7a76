#!/usr/bin/env bash
# Downloads the wheels of the Python packages that a GPU machine without network access lacks into
# .whl/ (or $WHEELS), for benchmarks/gpu_session.sh to install there: CPython 3.12 (or
# $PYTHON_VERSION) on x86-64 Linux, each package alone (--no-deps). A machine with PyTorch, numpy,
# scipy, tqdm, matplotlib and pytest lacks only pyautoattack, the default; it needs nothing else.
# Each wheel's Requires-Dist is printed, so that a dependency it gains in a later version shows.
#
#   bash benchmarks/fetch_wheels.sh                      # pyautoattack==0.2.0
#   bash benchmarks/fetch_wheels.sh NAME==VERSION ...    # other packages
set -eu
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
[ $# -gt 0 ] || set -- pyautoattack==0.2.0
mkdir -p "$DEST"
for spec in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$DEST" "$spec"
done
python3 - "$DEST" <<'PY'
import collections, pathlib, sys, zipfile

wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode("utf-8", "replace").splitlines()
    needs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, requires {', '.join(needs) or 'nothing'}")
print(f"{len(wheels)} wheel(s), {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB in all")
# pip refuses to install two versions of one package side by side.
names = collections.Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
twice = [name for name, count in names.items() if count > 1]
if twice:
    sys.exit(f"more than one version of {', '.join(twice)} in {sys.argv[1]}: keep one")
PY
