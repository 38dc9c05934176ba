"""The 'cpp' backend: the C++ CPU kernels of ``csrc/linear_ce.cpp``.

The automatic choice on CPU for float16 / bfloat16 / float32 inputs (float64
stays on the 'torch' reference). The extension is compiled on first use with
`torch.utils.cpp_extension.load` (ninja and the system C++ compiler) into a
cache directory shared by every process of this user:
``$T3S_KERNELS_CACHE`` or ``~/.cache/t3s_kernels``, one subdirectory per
source / flags / torch version. Compiling prints one line; a cached build is
loaded silently. Without a compiler or ninja, or when the build fails, the
backend reports why through `unavailable_reason`, and dispatch falls back to
the reference with one warning.

Each kernel works on tiles of (kept rows x vocabulary chunk), merges the
chunks with an online log-sum-exp and never holds more than one
``[block_rows, V]`` slab of logits. Every product is oneDNN's GEMM
micro-kernel (through ATen's ``cpublas::brgemm``): float32 operands, or, for
bfloat16 inputs on a CPU that runs the bf16 micro-kernel
(`bf16_operands`), bfloat16 operands with float32 accumulation and float32
logits (G rounded to bf16 for the two backward products, as in the Triton
kernels). Float16 inputs, and bfloat16 ones elsewhere, are computed from a
float32 copy. `loss_forward_backward` computes the gradients in the forward
pass (three GEMMs, no recompute); `loss_backward` recomputes the logits from
the saved lse (the deferred backward).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from typing import Optional, Tuple

import torch

from .. import reference
from ..debug import OVERRIDES, empty
from ..prepare import DEFAULT_BUFFER_BYTES, KERNEL_DTYPES, RowLosses, kernel_logit_map
from .registry import Backend, register_backend

SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = ("linear_ce.cpp",)
# -march=native: the build is local to this machine (the cache key names its CPU).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)
# Tile shape: vocabulary columns per tile, and the cap on kept rows per block (measured
# best on a 2-core Zen 5 among 128-512 of each, at H=512 and H=2048, bf16 and fp32).
BLOCK_VOCAB = 256
MAX_BLOCK_ROWS = 256


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """A hash of everything the compiled module depends on."""
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(SOURCE_DIR, name), "rb") as f:
            h.update(f.read())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version, platform.machine(),
                   _cpu_model())).encode())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    root = os.environ.get("T3S_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "t3s_kernels")
    return os.path.join(root, f"cpp-{build_key()}")


def toolchain_problem() -> Optional[str]:
    """Why the extension cannot be built here (None: a compiler and ninja are present)."""
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # it needs setuptools
        return f"torch.utils.cpp_extension cannot be imported ({exc})"

    try:  # the `ninja` pip package ships the binary outside PATH when its bin is not on it
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r}) on PATH"
    return None


def _compile():
    """Build (or load the cached build of) the extension module."""
    from torch.utils import cpp_extension

    build_dir = cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    name = "t3s_kernels_cpu_" + os.path.basename(build_dir)[4:]
    cached = os.path.exists(os.path.join(build_dir, name + ".so"))
    if not cached:
        print(f"t3s_kernels: compiling the C++ CPU kernels (once; cached in {build_dir})",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = cpp_extension.load(
        name=name, sources=[os.path.join(SOURCE_DIR, s) for s in SOURCES],
        extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=build_dir,
        verbose=False)
    LOAD_INFO.update(compiled=not cached, seconds=time.perf_counter() - start, path=build_dir)
    return module


LOAD_INFO: dict = {}
_STATE: dict = {"module": None, "problem": None, "tried": False}


def load_extension(loader=None):
    """The compiled module, or None with the reason in `load_problem()`. Tried once per
    process; ``loader`` replaces the build (tests)."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            problem = toolchain_problem() if loader is None else None
            if problem is None:
                _STATE["module"] = (loader or _compile)()
        except Exception as exc:  # a failed build (or an unwritable cache) must not break
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            # The first line, and the compiler's first error when the output holds one.
            detail = next((ln.strip() for ln in lines[1:] if "error:" in ln), None)
            problem = (f"building the C++ extension failed: {lines[0]}"
                       + (f" ({detail})" if detail else ""))
        _STATE["problem"] = problem
    return _STATE["module"]


def load_problem() -> Optional[str]:
    load_extension()
    return _STATE["problem"]


def reset_extension() -> None:
    """Forget the load attempt, so that the next use tries again (tests)."""
    _STATE.update(module=None, problem=None, tried=False)


def _blocks(M: int, weight: torch.Tensor, buffer_bytes: int, slab: bool) -> Tuple[int, int]:
    """(block_rows, block_vocab): a slab of block_rows x V float32 logits (fused pass) or
    one block_rows x block_vocab tile per thread, and the threads' float32 [block_rows, H]
    grad_hidden parts, take at most half of buffer_bytes."""
    if OVERRIDES.get("cpu_block") is not None:
        rows, vocab = OVERRIDES["cpu_block"]
        return int(rows), int(vocab)
    (V, H), threads = weight.shape, torch.get_num_threads()
    vocab = min(V, BLOCK_VOCAB)
    per_row = 4 * ((V if slab else vocab * threads) + H * threads)
    rows = max(1, min(MAX_BLOCK_ROWS, (buffer_bytes // 2) // per_row, max(M, 1)))
    return rows, vocab


def _pack_weight(weight: torch.Tensor, buffer_bytes: int) -> bool:
    """Whether the bf16 kernels VNNI-pack W once (a [V, H] bf16 copy) rather than tile by
    tile ((M / block_rows) passes over W): when the copy fits half of buffer_bytes."""
    if OVERRIDES.get("cpu_pack_weight") is not None:
        return bool(OVERRIDES["cpu_pack_weight"])
    return weight.numel() * 2 <= buffer_bytes // 2


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().float().contiguous()


_BF16: dict = {}


def bf16_operands() -> bool:
    """Whether bfloat16 inputs run as bfloat16 GEMM operands here (oneDNN's bf16
    micro-kernel: AVX-512 or AMX, and oneDNN enabled); otherwise they are computed
    from float32 copies."""
    key = torch.backends.mkldnn.enabled
    if key not in _BF16:
        _BF16[key] = bool(load_extension().bf16_supported())
    return _BF16[key]


def _bf16_path(dtype: torch.dtype) -> bool:
    """Whether inputs of this dtype run as bfloat16 GEMM operands (else float32 ones)."""
    return dtype == torch.bfloat16 and bf16_operands()


def _operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the GEMM operand dtype (contiguous): bfloat16 on the `_bf16_path`,
    float32 otherwise."""
    return weight.detach().contiguous() if _bf16_path(weight.dtype) else _f32(weight)


def _grad_buffers(hidden, weight, bias, rows, opts, need):
    """Accumulators: grad_hidden [N, H] in hidden's dtype (zeros on the rows not kept),
    grad_weight [V, H] in accum_dtype and grad_bias [V] float32, both uninitialised (the
    kernels write every row); None where not needed."""
    need_h, need_w, need_b = need
    grad_h = None
    if need_h:
        if OVERRIDES["poison"]:  # kept rows must be written by the kernel; the rest are 0
            grad_h = empty(*hidden.shape, dtype=hidden.dtype, device=hidden.device)
            dropped = torch.ones(hidden.shape[0], dtype=torch.bool)
            dropped[rows] = False
            grad_h[dropped] = 0
        else:
            grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype)
    grad_w = empty(*weight.shape, dtype=opts.accum_dtype, device=weight.device) if need_w else None
    grad_b = (empty(weight.shape[0], dtype=torch.float32, device=weight.device)
              if need_b and bias is not None else None)
    return grad_h, grad_w, grad_b


def _finish_grads(grads, weight, bias):
    grad_h, grad_w, grad_b = grads
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def _row_losses(stats, targets, V, opts, want_stats) -> RowLosses:
    """`RowLosses` from the kernels' (lse, target logit, sum logits, entropy, argmax); the
    target log-prob also without stats under token_scaling (the ops' token scale)."""
    lse, tz, sz, entropy, argmax = stats
    cw = _class_weight(opts)
    loss = reference.per_token_loss(lse, tz, sz, V, opts.label_smoothing, opts.z_loss,
                                    *(() if cw is None else (cw[targets], cw.sum())))
    if not want_stats:
        none = lse.new_empty(0)
        logprob = tz - lse if opts.token_scaling else none
        return RowLosses(loss, lse, logprob, none, torch.empty(0, dtype=torch.bool))
    return RowLosses(loss, lse, tz - lse, entropy, argmax == targets)


def _class_weight(opts) -> Optional[torch.Tensor]:
    return None if opts.class_weight is None else _f32(opts.class_weight)


def _kernel_options(opts, targets: torch.Tensor, V: int):
    """(softcap, logit_mul, class_weight, pbase, ontgt) for the kernels: the logit map of
    `prepare.kernel_logit_map`, and under class weights the per-row gradient
    coefficients of `reference.class_weight_coefs` (float32 [M])."""
    cap, mul = opts.logit_map()
    cw = _class_weight(opts)
    if cw is None:
        return cap, mul, None, None, None
    pbase, ontgt = reference.class_weight_coefs(cw, targets, opts.label_smoothing, V)
    return cap, mul, cw, pbase.contiguous(), ontgt.contiguous()


def _with_mul(gcoef: torch.Tensor, mul: float) -> torch.Tensor:
    """The gradient coefficients [M] float32 times dz/dr's factor mul (no copy at 1)."""
    gcoef = gcoef.float().contiguous()
    return gcoef if mul == 1.0 else gcoef * mul


class CppBackend(Backend):
    name = "cpp"
    priority = 5
    auto_devices = ("cpu",)

    def __init__(self):
        # (tiles skipped by filter_eps, gradient tiles) of the last backward.
        self.last_tiles: Tuple[int, int] = (0, 0)

    def unavailable_reason(self):
        return load_problem()  # compiles on first use

    def check_inputs(self, hidden):
        if hidden.device.type != "cpu":
            raise ValueError(f"the C++ kernels run on CPU tensors, not {hidden.device.type}")
        if hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the C++ kernels take float16, bfloat16 and float32 inputs, not "
                            f"dtype {hidden.dtype} (the 'torch' reference takes it)")

    def describe(self, hidden):
        if _bf16_path(hidden.dtype):
            return "bfloat16 GEMM operands, float32 accumulation (oneDNN micro-kernel)"
        if hidden.dtype == torch.float32:
            return "float32 GEMM operands (oneDNN micro-kernel)"
        return (f"{str(hidden.dtype).replace('torch.', '')} inputs computed from float32 "
                "copies (no low-precision micro-kernel for them on this CPU)")

    def loss_forward(self, hidden, weight, bias, rows, targets, opts, want_stats):
        bm, bv = _blocks(rows.numel(), weight, opts.buffer_bytes, slab=False)
        cap, mul = opts.logit_map()
        stats = load_extension().lce_forward(
            hidden.detach(), _operand(weight), _f32(bias), rows, targets, cap, mul,
            _class_weight(opts), want_stats, want_stats, bm, bv)
        return _row_losses(stats, targets, weight.shape[0], opts, want_stats)

    def loss_backward(self, hidden, weight, bias, rows, targets, lse, grad_loss, opts, need):
        grads = _grad_buffers(hidden, weight, bias, rows, opts, need)
        bm, bv = _blocks(rows.numel(), weight, opts.buffer_bytes, slab=False)
        eps = -1.0 if opts.filter_eps is None else opts.filter_eps
        cap, mul, *cw = _kernel_options(opts, targets, weight.shape[0])
        self.last_tiles = tuple(load_extension().lce_backward(
            hidden.detach(), _operand(weight), _f32(bias), rows, targets, lse.float().contiguous(),
            _with_mul(grad_loss, mul), cap, mul, *cw, opts.label_smoothing, opts.z_loss, eps,
            *grads, _pack_weight(weight, opts.buffer_bytes), bm, bv))
        return _finish_grads(grads, weight, bias)

    def loss_forward_backward(self, hidden, weight, bias, rows, targets, grad_scale, opts,
                              want_stats, need):
        """The forward on the M kept rows and, in the same pass, the gradients of
        sum_m grad_scale[m] * loss[m] (grad_scale [M]; under ``opts.token_scaling``
        grad_scale[m] * p[m], the kernel scaling each row block's coefficients by
        p = exp(target logit - lse) once the block's lse is known): (`RowLosses`,
        (grad_hidden [N, H], grad_weight [V, H], grad_bias [V])), None where ``need`` is
        False."""
        need = (need[0], need[1], need[2] and bias is not None)
        if not any(need):
            return (self.loss_forward(hidden, weight, bias, rows, targets, opts, want_stats),
                    (None, None, None))
        grads = _grad_buffers(hidden, weight, bias, rows, opts, need)
        bm, bv = _blocks(rows.numel(), weight, opts.buffer_bytes, slab=True)
        eps = -1.0 if opts.filter_eps is None else opts.filter_eps
        cap, mul, *cw = _kernel_options(opts, targets, weight.shape[0])
        *stats, counts = load_extension().lce_forward_backward(
            hidden.detach(), _operand(weight), _f32(bias), rows, targets,
            _with_mul(grad_scale, mul), cap, mul, *cw, opts.label_smoothing, opts.z_loss,
            eps, want_stats, want_stats, opts.token_scaling, *grads,
            _pack_weight(weight, opts.buffer_bytes), bm, bv)
        self.last_tiles = tuple(counts.tolist())
        losses = _row_losses(stats, targets, weight.shape[0], opts, want_stats)
        return losses, _finish_grads(grads, weight, bias)

    def gemms_only(self, hidden, weight, rows, backward: bool, slab: bool = True) -> float:
        """The kernels' GEMMs alone on the kept rows [M] (the logits product; with
        ``backward`` also the two gradient products), same blocking and packing, no
        elementwise work: the GEMM share of a call, for benchmarks. Returns a checksum."""
        bm, bv = _blocks(rows.numel(), weight, DEFAULT_BUFFER_BYTES, slab=slab)
        return load_extension().lce_gemms(hidden.detach(), _operand(weight), rows, backward,
                                          _pack_weight(weight, DEFAULT_BUFFER_BYTES), bm, bv)

    def target_logprobs(self, hidden, weight, bias, rows, targets, *, softcap, want_entropy,
                        want_argmax, buffer_bytes, logit_scale=1.0, temperature=1.0):
        bm, bv = _blocks(rows.numel(), weight, buffer_bytes, slab=False)
        cap, mul = kernel_logit_map(softcap, logit_scale, temperature)
        lse, tz, _, entropy, argmax = load_extension().lce_forward(
            hidden.detach(), _operand(weight), _f32(bias), rows, targets, cap, mul, None,
            want_entropy, want_argmax, bm, bv)
        return tz - lse, entropy if want_entropy else None, argmax if want_argmax else None


register_backend(CppBackend())
