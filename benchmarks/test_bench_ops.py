"""pytest-benchmark microbenchmarks of the ops that compare.py times, at small sizes.

    TRITON_INTERPRET=1 pytest benchmarks/ --benchmark-only     # CPU (interpreter), < 2 min
    pytest benchmarks/ --benchmark-only                        # CUDA, native kernels

Each benchmark first checks its op once against the float64 reference (a
loose bound that catches a wrong wrapper, not a precision test: tests/ does
that), then times it. The callables, inputs and reference are the ones of
compare.py, so both agree on what is measured. Liger, CCE and torch.compile
run on CUDA only and are skipped, with the reason, elsewhere.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (extra 'bench')")

from benchmarks import compare  # noqa: E402  (after the importorskip)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Small on purpose: the CPU interpreter runs one Triton program at a time.
CASE = (compare.Case(N=2048, H=1024, V=32768, mask_frac=0.5, dist="peaked") if CUDA else
        compare.Case(N=64, H=64, V=1000, mask_frac=0.5, dist="peaked"))
ROUNDS = 20 if CUDA else 2
# Loose on purpose (bf16 logits cost torch eager ~0.05 in entropy); a sign or
# row mix-up in a wrapper is off by whole units.
SANITY_TOL = 0.1

OPS = [(task, impl) for task in compare.TASKS for impl in compare.IMPLS_BY_TASK[task]]


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    weight = compare.make_weight(CASE.V, CASE.H, torch.bfloat16, DEVICE, gen)
    return compare.make_inputs(CASE, weight, gen)


@pytest.fixture(scope="module")
def reference(inputs):
    return compare.fp64_reference(inputs, want_grads=True, chunk_bytes=64 * compare.MiB)


@pytest.fixture(scope="module")
def builder():
    from t3s_kernels.triton.config import KERNELS_INTERPRETED
    backend = "triton" if (CUDA or KERNELS_INTERPRETED) else "torch"
    return compare.Builder(compare.load_competitors(), backend, compiled={})


@pytest.mark.parametrize("task,impl", OPS, ids=[f"{t}-{i}" for t, i in OPS])
def test_op(benchmark, task, impl, inputs, reference, builder):
    reason = builder.skip_reason(task, impl, DEVICE, try_cpu=False)
    if reason:
        pytest.skip(reason)
    fn = builder.build(task, impl, inputs)
    out = fn()  # warm-up (compile / autotune) and the sanity check
    for part, err in compare.errors(task, out, reference, inputs.kept).items():
        if part != "argmax_mismatch_frac":
            assert err <= SANITY_TOL, f"{task}/{impl}: {part} error {err:.3g} vs float64"
    del out

    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = task
    flops, nbytes = compare.work(task, impl, CASE.N, inputs.kept.numel(), CASE.H, CASE.V,
                                 inputs.hidden.element_size())
    benchmark.extra_info.update(N=CASE.N, H=CASE.H, V=CASE.V, mask_frac=CASE.mask_frac,
                                dist=CASE.dist, flops=flops, bytes=nbytes,
                                interpreted=not CUDA)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if CUDA else 0)
