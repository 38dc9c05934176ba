#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine with a few minutes of budget.
#
#   bash benchmarks/fetch_wheels.sh                 # first, where there is internet
#   OUT=/some/dir bash benchmarks/device_check.sh   # then on the GPU machine (.whl/ carried)
#
# Steps, each under its own time limit so that one hang does not eat the budget
# (all together under 10 minutes):
#   1. the machine: GPU, driver, torch, triton, CUDA (env.txt);
#   2. the kernel tests run natively, without TRITON_INTERPRET, the gradient-in-forward
#      ones first (kernel_tests.txt);
#   3. compare.py --quick: t3s against torch, torch.compile, Liger (Triton FLCE and,
#      where importable, the SM90 CuTe DSL one), quack and CCE; the t3s variants
#      "t3s" / "t3s_exact" (defaults: at this head the gradient is deferred to the
#      backward) and "t3s_1pass" / "t3s_1pass_exact" (accum_dtype=bf16: the gradient
#      computed in the forward, the design the targets are judged on);
#      JSON + RESULTS.md section under $OUT/bench.
# Limits (seconds) come from T3S_TEST_LIMIT (default 150) and T3S_BENCH_LIMIT
# (default 330). The exit status is that of the first step that failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/t3s_device_check}"
mkdir -p "$OUT/bench"
PYTHON="${PYTHON:-python}"
status=0

echo "== 1. machine"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PYTHON" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== 2. kernel tests, native"
env -u TRITON_INTERPRET timeout "${T3S_TEST_LIMIT:-150}" "$PYTHON" -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_forward_backward.py tests/kernels/test_linear_cross_entropy.py \
    tests/kernels/test_target_logprobs.py tests/kernels/test_masked_ce.py \
    2>&1 | tee "$OUT/kernel_tests.txt" | tail -n 15
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc

echo "== 3. compare.py --quick"
wheels=()
[ -d .whl ] && wheels=(--wheels .whl)
timeout "${T3S_BENCH_LIMIT:-330}" "$PYTHON" benchmarks/compare.py --quick "${wheels[@]}" \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench/compare.txt" | tail -n 40
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc

echo "== done (status $status); files in $OUT"
exit "$status"
