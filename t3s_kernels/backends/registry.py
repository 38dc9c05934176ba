"""The backend registry: one op contract, one implementation per backend.

A backend is a `Backend` subclass registered under a name with `register_backend`.
Dispatch (`resolve_backend`), `available_backends()` and every ``backend=``
argument read this registry; nothing else in the package names a backend.

The contract works on *compacted* rows: the custom ops in `t3s_kernels.ops`
validate the inputs, drop the tokens that leave the loss and hand a backend
only the M kept rows (``rows`` [M] int64 indices into ``hidden`` [N, H], and
their ``targets`` [M] int64). Outputs are [M]-shaped; the ops scatter them
back to [N].

Automatic choice (``backend=None``): among the registered backends whose
`auto_devices` contain the input's device type, the highest `priority` that
is usable for the input (`unavailable_reason`, `check_inputs`); a
passed-over backend is reported once with a warning. The torch reference
(priority 0, every device) is the last resort. Each automatic choice, and how
the chosen backend will compute (`Backend.describe`), is logged at DEBUG level
on the ``t3s_kernels`` logger (``T3S_KERNELS_DEBUG=1`` turns that on).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from ..prepare import Grads, LossOptions, RowLosses

LOG = logging.getLogger("t3s_kernels")
if os.environ.get("T3S_KERNELS_DEBUG", "").lower() in ("1", "true", "yes"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(_handler)
    LOG.setLevel(logging.DEBUG)

__all__ = ["Backend", "register_backend", "unregister_backend", "get_backend", "registered_backends",
           "available_backends", "resolve_backend", "check_backend_name"]


class Backend:
    """One implementation of the kernels' contract. Subclasses set `name` and override
    the three compute methods (`loss_forward`, `loss_backward`, `target_logprobs`);
    `loss_forward_backward` and the eligibility hooks have working defaults.

    name: the ``backend=`` value that selects it.
    priority: rank in automatic dispatch (higher wins).
    auto_devices: device types on which automatic dispatch considers it ("*":
        every device; empty: only when asked for by name).
    """

    name: str = ""
    priority: int = 0
    auto_devices: Tuple[str, ...] = ()

    # ---- eligibility -------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run in this process at all (None: it can)."""
        return None

    def check_inputs(self, hidden: torch.Tensor) -> None:
        """Raise `TypeError` (dtype) or `ValueError` (device, ...) when it cannot run on
        these inputs; the message says why."""

    def describe(self, hidden: torch.Tensor) -> str:
        """How it will compute on these inputs (operand dtype, engine), for the debug log."""
        return ""

    # ---- the contract ------------------------------------------------------------------
    def loss_forward(self, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], rows: torch.Tensor, targets: torch.Tensor,
                     opts: LossOptions, want_stats: bool) -> RowLosses:
        """Per-kept-row loss and lse (+ stats): hidden [N, H], weight [V, H], bias [V] or
        None, rows / targets [M] -> `RowLosses` of [M] tensors. The loss is unscaled;
        under ``opts.token_scaling`` target_logprob is filled without ``want_stats`` too."""
        raise NotImplementedError

    def loss_backward(self, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], rows: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, grad_loss: torch.Tensor, opts: LossOptions,
                      need: Tuple[bool, bool, bool]) -> Grads:
        """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) from grad_loss [M];
        None where ``need`` is False. Rows of hidden that are not kept get zeros."""
        raise NotImplementedError

    def loss_forward_backward(self, hidden: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], rows: torch.Tensor,
                              targets: torch.Tensor, grad_scale: torch.Tensor, opts: LossOptions,
                              want_stats: bool, need: Tuple[bool, bool, bool]
                              ) -> Tuple[RowLosses, Grads]:
        """The forward on the M kept rows and, in the same call, the gradients of
        sum_m grad_scale[m] * loss[m] (the scalar reductions 'mean' and 'sum').

        grad_scale: [M] in the loss dtype (token weight / denominator). Returns
        (`RowLosses` of [M] tensors, (grad_hidden [N, H] with zeros on rows not kept,
        grad_weight [V, H], grad_bias [V])), None where ``need`` is False. Under
        ``opts.token_scaling`` the gradients are those of sum_m grad_scale[m] p[m]
        loss[m] with the stop-gradient p = exp(target_logprob) of the same forward,
        and target_logprob is returned ([M]) with or without ``want_stats``.

        The default runs `loss_forward` then `loss_backward` (grad_scale times p from
        the forward's target_logprob), so every backend has it; a backend overrides it
        to share work between the two (e.g. the logits).
        """
        out = self.loss_forward(hidden, weight, bias, rows, targets, opts, want_stats)
        if not any(need):
            return out, (None, None, None)
        if opts.token_scaling:
            grad_scale = grad_scale * torch.exp(out.target_logprob.to(grad_scale.dtype))
        return out, self.loss_backward(hidden, weight, bias, rows, targets, out.lse,
                                       grad_scale, opts, need)

    def target_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], rows: torch.Tensor,
                        targets: torch.Tensor, *, softcap: Optional[float], want_entropy: bool,
                        want_argmax: bool, buffer_bytes: int, logit_scale: float = 1.0,
                        temperature: float = 1.0):
        """Forward-only (log p(target) [M] float32, entropy [M] float32 or None,
        argmax [M] int64 or None) for the rows ``rows``. The ops pass ``logit_scale`` and
        ``temperature`` only when one is not 1 (a backend without them still serves the
        default calls). The loss methods read them, and the class weights, from
        `LossOptions` (`prepare.kernel_logit_map`, `reference.class_weight_coefs`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<t3s_kernels backend {self.name!r}>"


_REGISTRY: Dict[str, Backend] = {}
_WARNED: set = set()


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` under ``backend.name``. Returns it.

    Raises `ValueError` when the name is empty or already taken (unless ``replace``).
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a t3s_kernels Backend, got {type(backend).__name__}")
    name = backend.name
    if not name or not isinstance(name, str):
        raise ValueError("a backend needs a non-empty string name")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a backend named {name!r} is already registered (replace=True "
                         "to swap it)")
    _REGISTRY[name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove and return the backend called ``name`` (`ValueError` if none is)."""
    check_backend_name(name)
    return _REGISTRY.pop(name)


def registered_backends() -> Tuple[str, ...]:
    """Every registered backend's name, usable here or not."""
    return tuple(_REGISTRY)


def available_backends() -> Tuple[str, ...]:
    """The backends usable in this process (always including 'torch')."""
    return tuple(n for n, b in _REGISTRY.items() if b.unavailable_reason() is None)


def check_backend_name(backend: Optional[str]) -> None:
    """`ValueError` unless ``backend`` is None or a registered name (no device checks)."""
    if backend is not None and backend not in _REGISTRY:
        raise ValueError(f"backend must be one of {registered_backends()} or None, "
                         f"got {backend!r}")


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (`ValueError` if none is)."""
    check_backend_name(name)
    return _REGISTRY[name]


def resolve_backend(backend: Optional[str], hidden: torch.Tensor) -> str:
    """The name of the backend that runs on ``hidden``.

    A named backend must be usable here and for these inputs (else `ValueError`
    or `TypeError` saying why); None picks one automatically (module docstring).
    """
    if backend is not None:
        impl = get_backend(backend)
        reason = impl.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend={backend!r} is unavailable: {reason}")
        try:
            impl.check_inputs(hidden)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"backend={backend!r} cannot run here: {exc}") from None
        return backend
    device = hidden.device.type
    candidates = sorted((b for b in _REGISTRY.values() if {device, "*"} & set(b.auto_devices)),
                        key=lambda b: -b.priority)
    for impl in candidates:
        reason = impl.unavailable_reason()
        if reason is None:
            try:
                impl.check_inputs(hidden)
            except (TypeError, ValueError) as exc:
                reason = str(exc)
        if reason is None:
            # not while tracing: dynamo cannot trace a logger (nothing runs then anyway)
            if not torch.compiler.is_compiling() and LOG.isEnabledFor(logging.DEBUG):
                how = impl.describe(hidden)
                LOG.debug("t3s_kernels: backend %r for %s %s inputs%s", impl.name, device,
                          str(hidden.dtype).replace("torch.", ""), f" ({how})" if how else "")
            return impl.name
        _warn_once(f"t3s_kernels: not using the {impl.name!r} backend ({reason})")
    raise RuntimeError(f"no registered t3s_kernels backend runs on {device} tensors")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)
