"""Launch configuration of the Triton kernels: block shapes, vocabulary splits, precision.

`KERNELS_INTERPRETED` is True when the kernels run in the Triton CPU interpreter
(TRITON_INTERPRET=1 set before this package was imported), which is how CI runs
them. `OVERRIDES` in `t3s_kernels.debug` lets tests force blocks and splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..debug import OVERRIDES

try:  # host-side tensor descriptors (TMA on sm_90); Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None


@triton.jit
def _interpreter_probe():
    pass


# The interpreter is chosen when @triton.jit runs, i.e. when this module is imported.
KERNELS_INTERPRETED = type(_interpreter_probe).__name__ == "InterpretedFunction"


@dataclass
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def pick_config(M: int, V: int, K: int, element_size: int = 2,
                backward: bool = False) -> LaunchConfig:
    """Block shapes, warps and pipeline stages. GPU defaults follow Hopper leads
    (128x256x64 class tiles need autotuning per (H, V) bucket; that is tuned
    separately).

    element_size: bytes per operand element (2 for bf16/fp16, 4 for fp32).
    backward: the backward kernel, which holds more tiles in shared memory: with
    4-byte operands it pipelines 2 stages, not 3, to stay within sm_90's 227 KiB
    (3 stages of the fp32 + TF32 backward need 240 KiB at BLOCK_M 64;
    `t3s_kernels.triton.aot` measures this without a GPU).
    """
    if OVERRIDES["block"] is not None:
        bm, bn, bk = OVERRIDES["block"]
        return LaunchConfig(bm, bn, bk, 4, 1)
    if KERNELS_INTERPRETED:
        # Large numpy blocks run fastest in the interpreter; keep them odd-shape friendly.
        return LaunchConfig(16, 128, 32, 4, 1)
    # 4-byte operands stay at BLOCK_M 64: at 128 the fp32 kernels spill heavily
    # (ptxas: ~43 KB per thread in the IEEE backward, 96 B in the TF32 one).
    bm = 64 if M <= 4096 or element_size >= 4 else 128
    stages = 2 if backward and element_size >= 4 else 3
    return LaunchConfig(bm, 128, 64, 8, stages)


def pick_splits(M: int, V: int, cfg: LaunchConfig, device: torch.device) -> int:
    if OVERRIDES["splits"] is not None:
        return max(1, min(int(OVERRIDES["splits"]), triton.cdiv(V, cfg.block_n)))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(M, cfg.block_m)
    want = triton.cdiv(4 * sms, row_blocks)
    return max(1, min(want, triton.cdiv(V, cfg.block_n), 64))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: match torch's default fp32 matmul (no TF32) unless the user allowed TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"



def tma_problem(t: torch.Tensor, precision: str = "tf32") -> Optional[str]:
    """Why the tiles of ``t`` [rows, cols] cannot come through a tensor descriptor
    (None: they can). TMA needs Triton's descriptors, an sm_90+ GPU (or the
    interpreter, or meta tensors for the ahead-of-time compile), a unit column stride,
    16-byte aligned base and row stride, and tensor-core dots: with IEEE fp32 dots
    (``precision='ieee'``) the descriptor tiles spill 5-10 KB per thread on sm_90
    (`t3s_kernels.triton.aot`), pointer loads none. ``OVERRIDES["tma"] = False``
    turns it off."""
    if TensorDescriptor is None:
        return "this Triton has no triton.tools.tensor_descriptor"
    if precision == "ieee":
        return "IEEE fp32 dots (no tensor cores) spill with descriptor tiles"
    if OVERRIDES.get("tma", True) is False:
        return "turned off by OVERRIDES['tma']"
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
        return "TMA needs compute capability 9.0 or newer"
    if t.device.type not in ("cuda", "meta") and not KERNELS_INTERPRETED:
        return f"tensors on {t.device}"
    if t.stride(1) != 1:
        return "weight's last dimension is not contiguous"
    if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        return "weight's base or row stride is not 16-byte aligned"
    return None


def device_problem(t: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot run on ``t``'s device (None: they can).

    They need CUDA tensors, or CPU tensors with the interpreter on.
    """
    if t.device.type == "cuda" or (t.device.type == "cpu" and KERNELS_INTERPRETED):
        return None
    return (f"got tensors on {t.device}: Triton kernels need CUDA tensors, or CPU tensors "
            "with TRITON_INTERPRET=1 set before t3s_kernels is imported")
