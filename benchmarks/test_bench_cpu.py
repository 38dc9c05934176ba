"""pytest-benchmark microbenchmarks of the CPU comparison (`cpu_compare.py`), at a small size.

    pytest benchmarks/test_bench_cpu.py --benchmark-only           # ~1 min on 2 cores

The callables and inputs are the ones of cpu_compare.py, so both agree on what is
measured. Each first runs once and is checked against torch eager on the same inputs
(a loose bound that catches a wrong wrapper, not a precision test: tests/ does that).
Peak memory is cpu_compare.py's business (it needs one process per implementation).
"""

import argparse

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (extra 'bench')")

from benchmarks import cpu_compare  # noqa: E402  (after the importorskip)

CASE = dict(n=1024, h=256, v=8192, mask_frac=0.5, threads=torch.get_num_threads())
# Relative; loose on purpose: torch's chunked bf16 loss is 0.5% off eager's. A sign or
# row mix-up in a wrapper is off by whole units.
SANITY_TOL = 2e-2
OPS = [(task, impl, dtype) for dtype in ("fp32", "bf16") for task in cpu_compare.IMPLS
       for impl in cpu_compare.IMPLS[task] if impl not in ("dense_gemms", "t3s_gemms")]


def _args(dtype):
    return argparse.Namespace(dtype=dtype, **CASE)


@pytest.fixture(scope="module")
def eager_values():
    values = {}
    for dtype in ("fp32", "bf16"):
        for task in cpu_compare.IMPLS:
            run, _, result = cpu_compare.build(task, "torch_eager", _args(dtype))
            run()
            values[task, dtype] = result()
    return values


@pytest.mark.parametrize("task,impl,dtype", OPS, ids=[f"{t}-{i}-{d}" for t, i, d in OPS])
def test_cpu_op(benchmark, task, impl, dtype, eager_values):
    run, clear, result = cpu_compare.build(task, impl, _args(dtype))
    if run is None:
        pytest.skip(result)
    run()  # warm-up (the C++ build on a first run) and the sanity check
    expected = eager_values[task, dtype]
    assert abs(result() - expected) <= SANITY_TOL * max(1.0, abs(expected)), (
        f"{task}/{impl}: {result()} vs torch eager {expected}")
    benchmark.group = f"{task}-{dtype}"
    benchmark.extra_info.update(CASE)
    benchmark.pedantic(run, setup=clear, rounds=3, iterations=1)
