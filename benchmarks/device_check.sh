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
#      JSON + RESULTS.md section under $OUT/bench;
#   4. where flash-attn imports: one packed training step with flash_attention_2
#      (t3s.PackedCollator with its cu_seq_lens keywords) against the padded sdpa step of
#      the same bf16 model: loss and gradients (flash_packed.txt).
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

echo "== 4. packed step with flash_attention_2"
timeout "${T3S_TEST_LIMIT:-150}" "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/flash_packed.txt" | tail -n 5
import copy, importlib.util, sys
import torch
if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
    print("skipped: flash-attn is not importable here (or no CUDA)")
    sys.exit(0)
from transformers import LlamaConfig, LlamaForCausalLM
import t3s
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
exs = []
for i, n in enumerate((300, 1, 77, 512)):
    ids = torch.randint(3, 512, (n,)).tolist()
    exs.append({"example_id": i, "input_ids": ids, "labels": ids})
out = {}
for name, attn, collate in (("padded sdpa", "sdpa", t3s.PaddedCollator(0)),
                            ("packed flash", "flash_attention_2",
                             t3s.PackedCollator(return_flash_attn_kwargs=True))):
    model = t3s.patch(copy.deepcopy(base))
    model.config._attn_implementation = attn
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in collate(exs).items()}
    batch.pop("example_id")
    loss = model(**batch).loss
    loss.backward()
    out[name] = (loss.float().item(), torch.cat([p.grad.float().flatten()
                                                 for p in model.parameters()]))
(la, ga), (lb, gb) = out["padded sdpa"], out["packed flash"]
rel = float((ga - gb).norm() / ga.norm())
print(f"loss padded sdpa {la:.5f}, packed flash {lb:.5f}; gradient relative difference {rel:.2e}")
ok = abs(la - lb) <= 2e-2 * abs(la) and rel < 5e-2
print("ok" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc

echo "== done (status $status); files in $OUT"
exit "$status"
