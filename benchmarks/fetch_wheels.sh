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
#
# quack-kernels (QUACK_SPEC, pure Python) is fetched too. It and Liger's SM90 FLCE
# (liger-kernel >= 0.8.5, liger_kernel/ops/cutedsl) run on NVIDIA's CuTe DSL, whose
# wheels are binary and large: nvidia-cutlass-dsl-libs-cu12 4.8.1 alone is ~90 MB
# (over the 64 MiB that a device run carries). They are fetched only with
# T3S_WHEELS_CUTE=1, for the target's CUDA major (T3S_CUTE_CUDA=cu12 or cu13,
# default cu12) and Python; without them compare.py records quack and liger_sm90
# as skipped, with the reason, unless the GPU image has nvidia-cutlass-dsl.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PYVER="${T3S_WHEEL_PYTHON:-3.12}"
LIGER_SPEC="${LIGER_SPEC:-liger-kernel==0.8.5}"
CCE_SPEC="${CCE_SPEC:-cut-cross-entropy==25.1.1}"
QUACK_SPEC="${QUACK_SPEC:-quack-kernels==0.6.5}"
# TRL's fused LM head (trl.kernels, the anchor that trl.SFTTrainer installs by default)
TRL_SPEC="${TRL_SPEC:-trl==1.16.0}"
CUTE_CUDA="${T3S_CUTE_CUDA:-cu12}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DEST"
"$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform any \
    --dest "$DEST" "$LIGER_SPEC" "$CCE_SPEC" "$QUACK_SPEC" "$TRL_SPEC"
if [ "${T3S_WHEELS_CUTE:-0}" = "1" ]; then
    # the CuTe DSL stack of quack and liger_sm90 (binary wheels for this Python / glibc)
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        --dest "$DEST" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" \
        "nvidia-cutlass-dsl-libs-$CUTE_CUDA==4.8.1" "apache-tvm-ffi<0.2,>=0.1.6" \
        "torch-c-dlpack-ext" "einops"
fi

echo
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl
for whl in "$DEST"/*.whl; do
    case "$whl" in
        *-none-any.whl) ;;
        *nvidia_cutlass_dsl*|*apache_tvm_ffi*|*torch_c_dlpack_ext*) ;;  # asked for: binary
        *) echo "warning: $whl is not pure Python; check it matches the GPU machine" >&2 ;;
    esac
done
du -ch "$DEST"/*.whl | tail -1 | sed 's/total$/total (carry this folder to the GPU machine)/'
