"""Ahead-of-time compile of the kernel variants the host code launches, for a GPU target.

No GPU or driver is needed: `triton.compile` with a `GPUTarget` gives the PTX, the
cubin, shared memory, and (through ptxas) registers and spills. The variants are
not listed by hand: `capture_launches` runs the real host code (`loss_forward`,
`loss_backward`, the forward of `target_logprobs`) on meta tensors with the kernels
replaced by recorders (and, for the cases that ask for it, the one-pass loss +
gradient of `forward_backward`), so what is compiled is exactly what would be
launched for that shape, dtype and option set (block shapes, warps and stages from
`pick_config`; Triton's own specialisation of 1-valued and 16-divisible integers
and 16-aligned pointers is reproduced).

    python -m t3s_kernels.triton.aot            # every variant, a table
    python -m t3s_kernels.triton.aot --cases core   # the few that CI compiles
    python -m t3s_kernels.triton.aot --json F   # also the records as JSON

Each record: shared memory, registers and spills (ptxas --verbose), wgmma count
(PTX), TMA loads (cp.async.bulk.tensor in the PTX), and GPU-scope fences
(MEMBAR.*.GPU, CCTL.IVALL) and atomics from the SASS (Triton's bundled cuobjdump).

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import triton

from ..prepare import LossOptions
from . import backward, config, forward, forward_backward

__all__ = ["Launch", "Case", "Compiled", "capture_launches", "launches_for", "compile_launch",
           "default_cases", "core_cases", "one_pass_cases", "SHARED_MEMORY_LIMIT", "GPU_FENCE"]

# sm_90's largest shared memory per block (227 KiB): a kernel above it cannot launch.
SHARED_MEMORY_LIMIT = 227 * 1024
# What an acq_rel atomic costs in SASS: a GPU-wide MEMBAR before it and an L1
# invalidation (CCTL.IVALL) after it. Relaxed atomics have neither; the MEMBAR.ALL.CTA
# + FENCE.VIEW.ASYNC pairs around wgmma's shared-memory operands are not counted.
GPU_FENCE = r"\bMEMBAR\.\S*GPU\b|\bCCTL\.IVALL\b"
_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                  torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32",
                  torch.bool: "*i1", torch.int8: "*i8"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton would specialise it."""

    kernel: str
    signature: Tuple[Tuple[str, str], ...]  # (argument, type or 'constexpr')
    constexprs: Tuple[Tuple[str, object], ...]
    divisible: Tuple[str, ...]  # arguments known to be multiples of 16 (tt.divisibility)
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        cx = dict(self.constexprs)
        flags = [k.lower() for k in ("HAS_BIAS", "HAS_SOFTCAP", "HAS_MUL", "HAS_CW", "WANT_ENT",
                                     "WANT_ARGMAX",
                                     "WANT_SUMZ", "STORE_Z", "COMPUTE_DH", "COMPUTE_DW",
                                     "COMPUTE_DB", "STORE_G", "ACCUMULATE", "USE_TMA")
                 if cx.get(k)]
        sig = dict(self.signature)
        dtype = (sig.get("H") or sig.get("G", "?")).lstrip("*")
        if cx.get("COMPUTE_DW") or self.kernel == "grad_weight_kernel":
            flags.append(f"dw_{sig.get('DW', '?').lstrip('*')}")
        return (f"{self.kernel}[{dtype},{cx.get('PRECISION')},"
                f"{cx.get('BLOCK_M')}x{cx.get('BLOCK_N')}x{cx.get('BLOCK_K')},"
                f"w{self.num_warps}s{self.num_stages}]" + ("+" + "+".join(flags) if flags else ""))


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records a `Launch`."""

    def __init__(self, kernel, sink: List[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        names = self.kernel.arg_names
        warps = int(kwargs.pop("num_warps", 4))
        stages = int(kwargs.pop("num_stages", 3))
        values = dict(zip(names, args))
        values.update(kwargs)
        constexpr_names = {p.name for p in self.kernel.params if p.is_constexpr}
        signature, constexprs, divisible = [], [], []
        for name in names:
            v = values[name]
            if name in constexpr_names:
                signature.append((name, "constexpr"))
                constexprs.append((name, v))
            elif config.TensorDescriptor is not None and isinstance(v, config.TensorDescriptor):
                dims = ", ".join(str(b) for b in v.block_shape)
                signature.append((name, f"tensordesc<{_POINTER_TYPES[v.base.dtype][1:]}[{dims}]>"))
            elif isinstance(v, torch.Tensor):
                signature.append((name, _POINTER_TYPES[v.dtype]))
                if (v.storage_offset() * v.element_size()) % 16 == 0:
                    divisible.append(name)
            elif isinstance(v, bool) or v is None:
                signature.append((name, "constexpr"))
                constexprs.append((name, v))
            elif isinstance(v, int):
                if v == 1:  # Triton specialises 1-valued integers to constants
                    signature.append((name, "constexpr"))
                    constexprs.append((name, 1))
                else:
                    signature.append((name, "i32" if -2**31 <= v < 2**31 else "i64"))
                    if v % 16 == 0:
                        divisible.append(name)
            elif isinstance(v, float):
                signature.append((name, "fp32"))
            else:
                raise TypeError(f"cannot specialise argument {name}={v!r}")
        self.sink.append(Launch(self.kernel.fn.__name__, tuple(signature), tuple(constexprs),
                                tuple(divisible), warps, stages))


@contextlib.contextmanager
def capture_launches():
    """Within the block, kernel launches are recorded (in the yielded list), not run."""
    if config.KERNELS_INTERPRETED:
        raise RuntimeError("the AOT compile needs the real kernels: unset TRITON_INTERPRET "
                           "before t3s_kernels is imported")
    sink: List[Launch] = []
    saved = {(module, name): getattr(module, name) for module, name in _KERNELS}
    for (module, name), kernel in saved.items():
        setattr(module, name, _Recorder(kernel, sink))
    try:
        yield sink
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


# Every kernel the host code launches, by the module whose global the host code reads.
_KERNELS = ((forward, "lse_partials_kernel"), (backward, "lce_backward_kernel"),
            (forward_backward, "grad_tile_kernel"), (forward_backward, "grad_hidden_kernel"),
            (forward_backward, "grad_weight_kernel"))


@dataclasses.dataclass(frozen=True)
class Case:
    """A shape, dtype and option set; `launches_for` runs the host code for it."""

    M: int = 4093
    V: int = 151936
    H: int = 4096
    dtype: torch.dtype = torch.bfloat16
    tf32: bool = False
    bias: bool = False
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    stats: bool = False
    filter_eps: Optional[float] = 1e-3  # None: the exact (dense) backward
    accum_dtype: Optional[torch.dtype] = None  # None: float32
    buffer_bytes: int = 256 * 2**20
    one_pass: bool = False  # also the gradient-in-forward launches ('mean' / 'sum')
    temperature: float = 1.0  # != 1: the logit-map multiply (HAS_MUL)
    class_weight: bool = False  # per-class weights (HAS_CW)


def launches_for(case: Case) -> List[Launch]:
    """The launches of one loss forward + backward and one `target_logprobs` forward, and
    with ``case.one_pass`` those of the one-pass loss + gradient (when its plan fits
    ``case.buffer_bytes``; otherwise it runs the launches above)."""
    meta = dict(device="meta", dtype=case.dtype)
    hidden = torch.empty(case.M, case.H, **meta)
    weight = torch.empty(case.V, case.H, **meta)
    bias = torch.empty(case.V, **meta) if case.bias else None
    rows = torch.empty(case.M, dtype=torch.int64, device="meta")
    targets = torch.empty(case.M, dtype=torch.int64, device="meta")
    opts = LossOptions(label_smoothing=case.label_smoothing, softcap=case.softcap,
                       filter_eps=case.filter_eps,
                       accum_dtype=case.accum_dtype or torch.float32,
                       buffer_bytes=case.buffer_bytes, temperature=case.temperature,
                       class_weight=(torch.empty(case.V, device="meta")
                                     if case.class_weight else None))
    need = (True, True, case.bias)
    plan = forward_backward.plan_forward_backward(
        case.M, case.V, case.H, hidden.element_size(), True,
        opts.accum_dtype == torch.float32 and case.dtype != torch.float32, case.buffer_bytes)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    try:
        with capture_launches() as sink:
            out = backward.loss_forward(hidden, weight, bias, rows, targets, opts, case.stats)
            backward.loss_backward(hidden, weight, bias, rows, targets, out.lse,
                                   torch.empty(case.M, device="meta"), opts,
                                   (True, True, case.bias))
            forward.lse_partials(hidden, weight, bias, rows, targets, softcap=case.softcap,
                                 want_entropy=case.stats, want_argmax=case.stats)
            if case.one_pass and plan is not None:
                forward_backward.loss_forward_backward(
                    hidden, weight, bias, rows, targets, torch.empty(case.M, device="meta"),
                    opts, case.stats, need, plan)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    unique: Dict[Launch, None] = dict.fromkeys(sink)
    return list(unique)


@dataclasses.dataclass
class Compiled:
    launch: Launch
    shared_bytes: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    wgmma: int  # wgmma instructions in the PTX (Hopper tensor cores)
    seconds: float
    gpu_fences: Optional[int] = None  # GPU-scope fences in the SASS (None: no cuobjdump)
    tma_loads: int = 0  # cp.async.bulk.tensor instructions in the PTX
    atomics: Optional[int] = None  # RED / ATOM instructions in the SASS

    def row(self) -> dict:
        return {"variant": self.launch.name, "shared_bytes": self.shared_bytes,
                "registers": self.registers, "spill_bytes": self.spill_bytes,
                "wgmma": self.wgmma, "gpu_fences": self.gpu_fences, "atomics": self.atomics,
                "tma_loads": self.tma_loads,
                "seconds": round(self.seconds, 2)}


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """Compile one launch for ``sm_<arch>`` and read its resources."""
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = {name: getattr(module, name) for module, name in _KERNELS}[launch.kernel]
    index = {n: i for i, n in enumerate(kernel.arg_names)}
    src = ASTSource(fn=kernel, signature=dict(launch.signature),
                    constexprs={(index[n],): v for n, v in launch.constexprs},
                    attrs={(index[n],): [["tt.divisibility", 16]] for n in launch.divisible})
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_resources(ptx, arch)
    sass = _sass(compiled.asm.get("cubin"))
    return Compiled(launch, int(compiled.metadata.shared), registers, spills,
                    len(re.findall(r"wgmma\.mma_async", ptx)), seconds,
                    gpu_fences=None if sass is None else len(re.findall(GPU_FENCE, sass)),
                    atomics=None if sass is None else len(re.findall(r"\b(?:RED|ATOM)G?\.",
                                                                     sass)),
                    tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)))


def _sass(cubin: Optional[bytes]) -> Optional[str]:
    """The SASS of a cubin (Triton's bundled ``cuobjdump -sass``), or None without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _ptxas_resources(ptx: str, arch: int):
    """(registers, spill store bytes) from ``ptxas --verbose``, or (None, None).

    Triton ships two ptxas builds; the first one that accepts the PTX version wins.
    """
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            ptxas = os.path.join(bin_dir, name)
            if not os.path.exists(ptxas):
                continue
            proc = subprocess.run([ptxas, f"-arch=sm_{arch}a", "--verbose", src, "-o",
                                   os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if proc.returncode == 0:
                text = proc.stdout + proc.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores", text)
                return (int(regs.group(1)) if regs else None,
                        int(spill.group(1)) if spill else None)
    return None, None


def default_cases() -> List[Case]:
    """The dtypes, precisions, options and backward modes the host code can pick, at two
    row counts (``pick_config`` uses BLOCK_M 64 up to 4096 rows, 128 above)."""
    cases = []
    for M in (4093, 8191):
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False),
                            (torch.float32, False), (torch.float32, True)):
            cases += [Case(M=M, dtype=dtype, tf32=tf32),
                      Case(M=M, dtype=dtype, tf32=tf32, stats=True, bias=True, softcap=30.0,
                           label_smoothing=0.1),
                      Case(M=M, dtype=dtype, tf32=tf32, filter_eps=None)]
            if dtype != torch.float32:
                cases.append(Case(M=M, dtype=dtype, accum_dtype=dtype))
            cases += one_pass_cases(M, dtype, tf32)
    return cases + options_cases()


def options_cases() -> List[Case]:
    """Temperature (the logit-map multiply) and class weights on, softcap and smoothing
    too, deferred and one-pass, filtered and exact, in bf16."""
    opts = dict(dtype=torch.bfloat16, bias=True, softcap=30.0, label_smoothing=0.1,
                temperature=0.7, class_weight=True)
    return [Case(M=8191, one_pass=True, accum_dtype=torch.bfloat16, **opts),
            Case(M=4093, filter_eps=None, one_pass=True, accum_dtype=torch.bfloat16, **opts)]


def one_pass_cases(M: int, dtype: torch.dtype, tf32: bool) -> List[Case]:
    """The gradient-in-forward launches: filtered (tile kernels) with and without bias /
    softcap / stats, and exact (the logits and G kernels; the GEMMs are the library's).
    Low-precision weights sum grad_weight in their own dtype here: a float32 [V, H]
    accumulator of this head exceeds the default buffer (the plan would fall back)."""
    accum = None if dtype == torch.float32 else dtype
    return [Case(M=M, dtype=dtype, tf32=tf32, one_pass=True, accum_dtype=accum),
            Case(M=M, dtype=dtype, tf32=tf32, one_pass=True, accum_dtype=accum, bias=True,
                 softcap=30.0, label_smoothing=0.1, stats=True),
            Case(M=M, dtype=dtype, tf32=tf32, one_pass=True, accum_dtype=accum,
                 filter_eps=None)]


def core_cases() -> List[Case]:
    """The few variants CI compiles by default: the bf16 and fp32 + TF32 loss forward and
    fused backward at both block heights (the fp32 backward is the one nearest the
    shared-memory limit), and the one-pass kernels in bf16 and fp32 + TF32."""
    return ([Case(M=M, dtype=dtype, tf32=tf32) for M in (4093, 8191)
             for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True))]
            + [Case(M=8191, dtype=torch.bfloat16, one_pass=True, accum_dtype=torch.bfloat16,
                    bias=True),
               Case(M=4093, dtype=torch.float32, tf32=True, one_pass=True)])


def compile_all(cases: Iterable[Case], arch: int = 90) -> List[Compiled]:
    launches: Dict[Launch, None] = {}
    for case in cases:
        launches.update(dict.fromkeys(launches_for(case)))
    return [compile_launch(launch, arch) for launch in launches]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cases", choices=("all", "core"), default="all",
                        help="every dtype / option / mode (default), or the CI core")
    parser.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    args = parser.parse_args(argv)
    cases = default_cases() if args.cases == "all" else core_cases()
    results = compile_all(cases, args.arch)
    print(f"triton {triton.__version__}, target sm_{args.arch}; shared limit "
          f"{SHARED_MEMORY_LIMIT} bytes")
    for r in results:
        flag = "" if r.shared_bytes <= SHARED_MEMORY_LIMIT else "  OVER SHARED LIMIT"
        print(f"{r.launch.name:100s} shared {r.shared_bytes:7d}  regs {r.registers}  "
              f"spill {r.spill_bytes}  wgmma {r.wgmma}  gpu_fences {r.gpu_fences}  "
              f"atomics {r.atomics}  tma {r.tma_loads}  {r.seconds:5.1f}s{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch,
                       "results": [r.row() for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
