"""The Triton kernels compile for Hopper (sm_90) without a GPU, and fit it.

`t3s_kernels.triton.aot` runs the host code on meta tensors to record exactly the
launches it would make, then compiles each with `triton.compile(..., target=
GPUTarget("cuda", 90, 32))`, and reads shared memory, registers and spills (ptxas),
wgmma count (PTX) and GPU-scope fences and atomics (SASS, Triton's cuobjdump). It
runs in a subprocess: the kernels must not be the
interpreter's (conftest sets TRITON_INTERPRET=1 for this process). The default run
compiles the core variants; ``--run-slow`` compiles every dtype, option and mode.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# fp32 (IEEE, no tensor cores) variants may spill at most this much (bytes of spill
# stores per thread); bf16 / fp16 and TF32 ones must not spill at all.
FP32_SPILL_LIMIT = 512
SHARED_LIMIT = 227 * 1024


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _has_cuda_backend(),
                                reason="this Triton install has no CUDA backend to compile with")


def _compile(tmp_path, which):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "t3s_kernels.triton.aot", "--cases", which,
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["results"]


# Kernels without a matrix product (elementwise over a stored tile): no wgmma expected.
NO_DOT = ("grad_tile_kernel",)
KERNELS = {"lse_partials_kernel", "lce_backward_kernel", "grad_tile_kernel",
           "grad_hidden_kernel", "grad_weight_kernel"}


def _check(results):
    assert results
    problems = []
    for r in results:
        name, shared = r["variant"], r["shared_bytes"]
        if shared > SHARED_LIMIT:
            problems.append(f"{name}: {shared} bytes of shared memory > {SHARED_LIMIT}")
        ieee = ",ieee," in name
        if not ieee and r["wgmma"] == 0 and not name.startswith(NO_DOT):
            problems.append(f"{name}: no wgmma (Hopper tensor-core) instruction")
        # relaxed atomics: no GPU-wide MEMBAR / CCTL.IVALL (acq_rel put one around each add)
        if r["gpu_fences"]:
            problems.append(f"{name}: {r['gpu_fences']} GPU-scope fences in the SASS")
        spill = r["spill_bytes"]
        if spill is not None and spill > (FP32_SPILL_LIMIT if ieee else 0):
            problems.append(f"{name}: {spill} bytes of register spills")
    assert not problems, "\n".join(problems)


def test_core_variants_compile_for_sm90_and_fit(tmp_path):
    results = _compile(tmp_path, "core")
    names = {r["variant"].split("[")[0] for r in results}
    assert names == KERNELS
    # the fence count is read from the SASS (Triton's cuobjdump): it must have been read
    assert all(r["gpu_fences"] is not None for r in results)
    atomics = {r["variant"].split("[")[0]: r["atomics"] for r in results}
    # the one-pass gradient kernels own their output tiles: no atomics at all
    assert atomics["grad_hidden_kernel"] == atomics["grad_weight_kernel"] == 0
    assert atomics["lce_backward_kernel"] > 0  # the deferred fused backward still adds
    # W (and the one-pass kernels' G) tiles come through tensor descriptors: TMA loads
    tma = [r for r in results if "+use_tma" in r["variant"]]
    assert {r["variant"].split("[")[0] for r in tma} == {
        "lse_partials_kernel", "grad_hidden_kernel", "grad_weight_kernel"}
    assert all(r["tma_loads"] > 0 for r in tma), [r["variant"] for r in tma if not r["tma_loads"]]
    _check(results)


@pytest.mark.slow
def test_every_launched_variant_compiles_for_sm90_and_fits(tmp_path):
    _check(_compile(tmp_path, "all"))
