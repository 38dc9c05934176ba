#!/usr/bin/env bash
# Download the competitors' wheels for a GPU machine that has no internet.
#
#   bash benchmarks/fetch_wheels.sh            # into .whl/ at the repo root (git-ignored)
#   bash benchmarks/fetch_wheels.sh DIR        # elsewhere
#
# Then, on the GPU machine:  python benchmarks/compare.py --quick --wheels .whl
#
# Liger-Kernel and Cut Cross-Entropy are pure Python (their Triton kernels are
# compiled on the GPU at run time), so one py3-none-any wheel each serves any
# x86_64 Linux machine; --python-version pins the target interpreter (3.12 by
# default, T3S_WHEEL_PYTHON overrides it). --no-deps: torch and triton must
# already be on the GPU machine. The versions are pinned to the ones whose
# call signatures compare.py was written against; override with LIGER_SPEC /
# CCE_SPEC (e.g. LIGER_SPEC=liger-kernel for the newest release).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PYVER="${T3S_WHEEL_PYTHON:-3.12}"
LIGER_SPEC="${LIGER_SPEC:-liger-kernel==0.8.5}"
CCE_SPEC="${CCE_SPEC:-cut-cross-entropy==25.1.1}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DEST"
"$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform any \
    --dest "$DEST" "$LIGER_SPEC" "$CCE_SPEC"

echo
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl
for whl in "$DEST"/*.whl; do
    case "$whl" in
        *-none-any.whl) ;;
        *) echo "warning: $whl is not pure Python; check it matches the GPU machine" >&2 ;;
    esac
done
du -ch "$DEST"/*.whl | tail -1 | sed 's/total$/total (carry this folder to the GPU machine)/'
