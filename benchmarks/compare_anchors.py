"""The anchors of `compare.py`: the implementations t3s is timed against, and t3s's own.

Which tasks and implementations exist (`TASKS`, `IMPLS_BY_TASK`, `ALL_IMPLS`), the
optional peers (Liger-Kernel's FLCE and its SM90 CuTe DSL variant, quack-kernels,
Cut Cross-Entropy, TRL's fused LM head), imported when present with the reason when
not (`load_competitors`, after `install_wheels` for a machine without internet), and
`Builder`, which turns (task, impl, inputs) into one callable: torch eager,
torch.compile, each peer as it is called in practice, the t3s variants and the bare
GEMMs. The measurement of those callables is `compare_harness.py`'s.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
import torch.nn.functional as F

# The Triton interpreter is chosen when @triton.jit runs, i.e. when t3s_kernels
# is imported: decide before any Triton code is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import t3s_kernels  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.compare_harness import Inputs

IGNORE_INDEX = -100

TASKS = ("loss", "logprob", "logprob_stats", "floor")
IMPLS_BY_TASK = {
    "loss": ("torch_eager", "torch_compile", "liger", "liger_sm90", "quack", "cce", "cce_exact",
             "trl", "t3s", "t3s_exact", "t3s_1pass", "t3s_1pass_exact"),
    "logprob": ("torch_eager", "liger", "cce", "trl", "t3s"),
    "logprob_stats": ("torch_eager", "t3s"),
    "floor": ("gemm_all", "gemm_kept"),
}
ALL_IMPLS = ("torch_eager", "torch_compile", "liger", "liger_sm90", "quack", "cce", "cce_exact",
             "trl", "t3s", "t3s_exact", "t3s_1pass", "t3s_1pass_exact",
             "gemm_all", "gemm_kept")
# Implementations that need CUDA (or are not worth timing elsewhere); on CPU they are
# recorded as skipped unless --try-cpu is given.
CUDA_ONLY = {"torch_compile", "liger", "liger_sm90", "quack", "cce", "cce_exact"}
# The t3s loss variants: (filter_eps, accum_dtype=bf16?)
T3S_LOSS = {"t3s": ("auto", False), "t3s_exact": (None, False), "t3s_1pass": ("auto", True),
            "t3s_1pass_exact": (None, True)}


# ----------------------------------------------------------------------------
# Competitors: optional, imported inside try/except (after --wheels is applied)
# ----------------------------------------------------------------------------

@dataclass
class Competitors:
    """Optional third-party implementations; `reasons[name]` says why one is missing."""

    liger_loss_cls: Optional[type] = None
    liger_sm90_fn: Optional[type] = None  # LigerFusedLinearCrossEntropySM90Function
    quack_fn: Optional[Callable] = None  # quack.linear_cross_entropy.chunked_linear_cross_entropy
    cce_fn: Optional[Callable] = None
    # TRL's fused LM head (trl.kernels.ChunkedLogProbFunction, what trl.SFTTrainer installs by
    # default; its Triton kernels on CUDA) and the vocabulary chunk TRL calls it with
    trl_fn: Optional[type] = None
    trl_chunk: int = 32768
    reasons: Dict[str, str] = field(default_factory=dict)
    versions: Dict[str, Optional[str]] = field(default_factory=dict)


def install_wheels(wheel_dir: str) -> Optional[str]:
    """`pip install --no-index --no-deps` every wheel in wheel_dir into a temp dir on sys.path.

    For GPU machines without internet: the wheels are fetched elsewhere by
    benchmarks/fetch_wheels.sh. Without a working pip the (pure-Python) wheels
    are unpacked there instead. Returns the temp dir (removed at exit) or None.
    """
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        print(f"[wheels] no *.whl in {wheel_dir!r}; competitors import from the environment")
        return None
    target = tempfile.mkdtemp(prefix="t3s_bench_wheels_")
    atexit.register(shutil.rmtree, target, True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
           "--disable-pip-version-check", "--target", target, *wheels]
    print(f"[wheels] installing {len(wheels)} wheel(s) into {target}: "
          + ", ".join(os.path.basename(w) for w in wheels))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        failure = None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr}"
    except OSError as e:
        failure = str(e)
    if failure is not None:
        # A pure-Python wheel is a zip of the files an install would place: unpack it instead.
        print(f"[wheels] pip failed ({failure.strip()}); unpacking the wheels instead")
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(target)
    sys.path.insert(0, target)
    return target


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - a version string is informative only
        return None


def load_competitors() -> Competitors:
    """Import Liger-Kernel and Cut Cross-Entropy if present; record why not otherwise."""
    comps = Competitors()
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        comps.liger_loss_cls = LigerFusedLinearCrossEntropyLoss
        comps.versions["liger-kernel"] = _dist_version("liger-kernel")
    except Exception as e:  # noqa: BLE001 - any import failure means "skip, with reason"
        comps.reasons["liger"] = f"liger-kernel not importable: {type(e).__name__}: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
        comps.cce_fn = cce_linear_cross_entropy
        comps.versions["cut-cross-entropy"] = _dist_version("cut-cross-entropy")
    except Exception as e:  # noqa: BLE001
        comps.reasons["cce"] = f"cut-cross-entropy not importable: {type(e).__name__}: {e}"
    try:
        from trl.kernels import ChunkedLogProbFunction
        comps.trl_fn = ChunkedLogProbFunction
        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
            comps.trl_chunk = int(_CHUNKED_LOGPROB_CHUNK_SIZE)
        except Exception:  # noqa: BLE001 - the trainer needs transformers; keep TRL 1.16's value
            pass
        comps.versions["trl"] = _dist_version("trl")
    except Exception as e:  # noqa: BLE001
        comps.reasons["trl"] = f"trl.kernels not importable: {type(e).__name__}: {e}"
    # The Hopper CuTe DSL anchors. Liger has the SM90 FLCE from liger-kernel 0.8.5 on
    # (liger_kernel/ops/cutedsl/ops/fused_linear_cross_entropy_sm90.py, extra "cutedsl");
    # quack-kernels has chunked_linear_cross_entropy (0.6.5 checked). Both import
    # nvidia-cutlass-dsl (and apache-tvm-ffi), which benchmarks/fetch_wheels.sh fetches
    # only with T3S_WHEELS_CUTE=1 (the CUDA 12 libs wheel alone is ~90 MB).
    try:
        from liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90 import (
            LigerFusedLinearCrossEntropySM90Function)
        comps.liger_sm90_fn = LigerFusedLinearCrossEntropySM90Function
    except Exception as e:  # noqa: BLE001
        comps.reasons["liger_sm90"] = (
            "Liger's SM90 CuTe DSL FLCE not importable (liger-kernel >= 0.8.5 with "
            f"nvidia-cutlass-dsl >= 4.6 and apache-tvm-ffi): {type(e).__name__}: {e}")
    try:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy
        comps.quack_fn = chunked_linear_cross_entropy
        comps.versions["quack-kernels"] = _dist_version("quack-kernels")
    except Exception as e:  # noqa: BLE001
        comps.reasons["quack"] = (
            "quack-kernels' chunked_linear_cross_entropy not importable (quack-kernels 0.6.5 "
            "with nvidia-cutlass-dsl >= 4.7, apache-tvm-ffi, torch-c-dlpack-ext, einops): "
            f"{type(e).__name__}: {e}")
    return comps



# ----------------------------------------------------------------------------
# Implementations: each builder returns fn() -> dict of output tensors
# ----------------------------------------------------------------------------

def torch_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The drop-in definition: materialised logits, fp32 cross-entropy."""
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX)


def _grads(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           h: torch.Tensor, w: torch.Tensor) -> Callable[[], Dict[str, torch.Tensor]]:
    def fn():
        loss = loss_of(h, w)
        gh, gw = torch.autograd.grad(loss, (h, w))
        return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}
    return fn


class Builder:
    """Builds the callable of (task, impl) for one set of inputs."""

    def __init__(self, comps: Competitors, t3s_backend: str, compiled: Dict[str, Callable]):
        self.comps = comps
        self.t3s_backend = t3s_backend
        self.compiled = compiled  # torch.compile'd functions, reused across cases

    def skip_reason(self, task: str, impl: str, device: torch.device,
                    try_cpu: bool) -> Optional[str]:
        """Why (task, impl) cannot run here, or None."""
        if impl == "liger" and self.comps.liger_loss_cls is None:
            return self.comps.reasons["liger"]
        if impl == "liger_sm90" and self.comps.liger_sm90_fn is None:
            return self.comps.reasons["liger_sm90"]
        if impl == "quack" and self.comps.quack_fn is None:
            return self.comps.reasons["quack"]
        if impl in ("cce", "cce_exact") and self.comps.cce_fn is None:
            return self.comps.reasons["cce"]
        if impl == "trl" and self.comps.trl_fn is None:
            return self.comps.reasons["trl"]
        if impl in CUDA_ONLY and device.type != "cuda" and not try_cpu:
            return (f"timed on CUDA only (device is {device.type}; the Triton CPU interpreter or "
                    "an inductor CPU compile would dominate the run; --try-cpu forces it)")
        return None

    def build(self, task: str, impl: str, inp: Inputs) -> Callable[[], Dict[str, torch.Tensor]]:
        t = inp.targets
        if task == "loss":
            h = inp.hidden.detach().requires_grad_()
            w = inp.weight.detach().requires_grad_()
            return _grads(self._loss_fn(impl, t), h, w)
        h, w = inp.hidden.detach(), inp.weight.detach()
        if task == "floor":
            hk = inp.hidden_kept
            if impl == "gemm_all":
                return lambda: {"logits": h @ w.T}
            if impl == "gemm_kept":
                return lambda: {"logits": hk @ w.T}
        if task == "logprob":
            return self._logprob_fn(impl, h, w, t)
        if task == "logprob_stats":
            return self._stats_fn(impl, h, w, t)
        raise ValueError(f"no implementation {impl!r} for task {task!r}")

    def _loss_fn(self, impl: str, t: torch.Tensor) -> Callable:
        be = self.t3s_backend
        if impl == "torch_eager":
            return lambda h, w: torch_loss(h, w, t)
        if impl == "torch_compile":
            if "loss" not in self.compiled:
                self.compiled["loss"] = torch.compile(torch_loss, dynamic=False)
            compiled = self.compiled["loss"]
            return lambda h, w: compiled(h, w, t)
        if impl == "liger":
            liger = self.comps.liger_loss_cls(ignore_index=IGNORE_INDEX, reduction="mean")
            return lambda h, w: liger(w, h, t)
        if impl == "cce":
            cce = self.comps.cce_fn
            return lambda h, w: cce(h, w, t, ignore_index=IGNORE_INDEX)  # its default filtering
        if impl == "cce_exact":
            cce = self.comps.cce_fn
            return lambda h, w: cce(h, w, t, ignore_index=IGNORE_INDEX, filter_eps=None)
        if impl == "liger_sm90":
            fn = self.comps.liger_sm90_fn
            return lambda h, w: fn.apply(h, w, t, IGNORE_INDEX, "mean")
        if impl == "quack":
            fn = self.comps.quack_fn
            return lambda h, w: fn(h, w, t, ignore_index=IGNORE_INDEX, reduction="mean")
        if impl == "trl":  # as TRL's fused head calls it on CUDA: the labelled rows only
            fn, chunk, keep = self.comps.trl_fn, self.comps.trl_chunk, t != IGNORE_INDEX

            def trl_loss(h, w):
                logp = fn.apply(h[keep], w, None, t[keep], 1.0, chunk, None, 1.0, ())[0]
                return -logp.sum() / keep.sum().clamp(min=1)
            return trl_loss
        if impl in T3S_LOSS:
            eps, low_accum = T3S_LOSS[impl]
            return lambda h, w: t3s_kernels.linear_cross_entropy(
                h, w, t, ignore_index=IGNORE_INDEX, filter_eps=eps, backend=be,
                accum_dtype=w.dtype if low_accum else torch.float32)
        raise ValueError(f"no loss implementation {impl!r}")

    def _logprob_fn(self, impl, h, w, t) -> Callable:
        if impl == "torch_eager":
            safe_t = t.clamp_min(0)[:, None]  # masked rows: any valid index, ignored later

            @torch.no_grad()
            def fn():
                logits = F.linear(h, w).float()
                return {"logprob": logits.log_softmax(-1).gather(1, safe_t).squeeze(1)}
            return fn
        if impl == "liger":
            liger = self.comps.liger_loss_cls(ignore_index=IGNORE_INDEX, reduction="none")
            return torch.no_grad()(lambda: {"logprob": -liger(w, h, t)})
        if impl == "cce":
            cce = self.comps.cce_fn
            return torch.no_grad()(
                lambda: {"logprob": -cce(h, w, t, ignore_index=IGNORE_INDEX, reduction="none")})
        if impl == "trl":
            fn, chunk, safe_t = self.comps.trl_fn, self.comps.trl_chunk, t.clamp_min(0)
            return torch.no_grad()(lambda: {"logprob": fn.apply(h, w, None, safe_t, 1.0, chunk,
                                                                None, 1.0, ())[0]})
        if impl == "t3s":
            be = self.t3s_backend
            return lambda: {"logprob": t3s_kernels.target_logprobs(
                h, w, t, ignore_index=IGNORE_INDEX, backend=be)}
        raise ValueError(f"no logprob implementation {impl!r}")

    def _stats_fn(self, impl, h, w, t) -> Callable:
        if impl == "torch_eager":
            safe_t = t.clamp_min(0)[:, None]

            @torch.no_grad()
            def fn():
                logits = F.linear(h, w).float()
                logp = logits.log_softmax(-1)
                return {"logprob": logp.gather(1, safe_t).squeeze(1),
                        "entropy": -(logp.exp() * logp).sum(-1),
                        "argmax": logits.argmax(-1)}
            return fn
        if impl == "t3s":
            be = self.t3s_backend

            def fn():
                r = t3s_kernels.target_logprobs(h, w, t, ignore_index=IGNORE_INDEX,
                                                return_entropy=True, return_argmax=True,
                                                backend=be)
                return {"logprob": r.logprobs, "entropy": r.entropy, "argmax": r.argmax}
            return fn
        raise ValueError(f"no logprob_stats implementation {impl!r}")

