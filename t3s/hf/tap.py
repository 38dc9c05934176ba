"""Capturing what a causal LM's output embedding receives: the head tap.

`HeadTap` is installed once on the output embedding (``model.get_output_embeddings()``)
as its ``forward``; while recording it keeps the hidden states the head receives and can
skip the projection, replace its output (`t3s.hf.heads.lm_head`'s probe) or compute a
loss inside the head's own call (`t3s.hf.patch`). `head_tap` lends the installed tap or
installs one for a block; `single_hidden` checks that one forward fed the head once.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional

import torch
from torch import nn

__all__ = ["HeadTap", "TAP_ATTR", "head_tap", "single_hidden"]

TAP_ATTR = "_t3s_head_tap"


class HeadTap:
    """A recorder installed once on the output embedding, not swapped in per call.

    `install` sets the module's ``forward`` (an instance attribute) to the tap
    itself, a callable object holding the module: ``copy.deepcopy`` rebinds it to
    the copy and pickle restores it (no closures, no bound methods).
    While idle the tap calls the module's own forward; between `begin` and
    `end` it records the hidden states the module receives and, with
    ``compute_logits=False``, returns an empty [..., 0] tensor instead of
    projecting, so no logits are computed (element-wise post-processing, scale
    and softcap, then costs nothing). A ``replacement`` callable makes it
    return ``replacement(hidden)`` and keep the real output in ``logits``
    (the probe). `torch.compile` traces all of it: installing once is what
    keeps the head's attributes unchanged inside a compiled forward.
    """

    def __init__(self, module: nn.Module, previous_forward=None):
        self.module = module
        self.previous_forward = previous_forward  # an instance forward set before ours
        self.active = False
        self.compute_logits = True
        self.replacement = None
        self.hidden: List[torch.Tensor] = []
        self.logits: Optional[torch.Tensor] = None
        self.loss_fn = None
        self.loss_result = None

    @staticmethod
    def of(module: nn.Module) -> Optional["HeadTap"]:
        """The tap installed on ``module``, or None."""
        return module.__dict__.get(TAP_ATTR)

    @staticmethod
    def install(module: nn.Module) -> "HeadTap":
        """Install a tap on ``module`` (idempotent) and return it."""
        tap = HeadTap.of(module)
        if tap is None:
            tap = HeadTap(module, module.__dict__.get("forward"))
            module.__dict__[TAP_ATTR] = tap
            module.forward = tap
        return tap

    @staticmethod
    def uninstall(module: nn.Module) -> None:
        """Remove the tap and restore the forward that was there before."""
        tap = module.__dict__.pop(TAP_ATTR, None)
        if tap is None:
            return
        if tap.previous_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = tap.previous_forward

    def begin(self, *, compute_logits: bool, replacement=None, loss_fn=None) -> None:
        """Start recording (the calls of one forward of the model).

        ``loss_fn(hidden)``: computed inside the head's own call (where an engine that
        gathers parameters in module hooks has the whole weight), kept in
        ``loss_result``; the call then returns an empty [..., 0] tensor that depends
        on it, so the engine's backward hooks on the head's output run first.
        """
        self.active = True
        self.compute_logits = compute_logits
        self.replacement = replacement
        self.loss_fn = loss_fn
        self.loss_result = None
        self.hidden = []
        self.logits = None

    def end(self) -> List[torch.Tensor]:
        """Stop recording; returns the recorded hidden states and drops the references."""
        hidden, self.hidden = self.hidden, []
        self.active = False
        self.replacement = None
        self.loss_fn = None
        self.loss_result = None
        return hidden

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        """The output embedding's forward while the tap is installed."""
        if self.previous_forward is not None:
            original = self.previous_forward
        else:
            original = functools.partial(type(self.module).forward, self.module)
        if not self.active:
            return original(hidden, *args, **kwargs)
        self.hidden.append(hidden)
        if self.loss_fn is not None:
            self.loss_result = self.loss_fn(hidden)
            loss = self.loss_result
            if isinstance(loss, tuple):  # (loss, token stats)
                loss = loss[0]
            elif isinstance(loss, dict):  # TRL's fields (`t3s.hf.trl_head.fused_outputs`)
                loss = loss["loss"]
            empty = hidden.new_empty(hidden.shape[:-1] + (0,))
            return empty + loss.reshape(()).to(empty.dtype)
        if self.replacement is not None:
            self.logits = original(hidden, *args, **kwargs)
            return self.replacement(hidden)
        if self.compute_logits:
            return original(hidden, *args, **kwargs)
        return hidden.new_empty(hidden.shape[:-1] + (0,))

    @contextlib.contextmanager
    def recording(self, *, compute_logits: bool, replacement=None):
        """`begin` ... `end` as a context manager (eager code: the probe, profiling)."""
        self.begin(compute_logits=compute_logits, replacement=replacement)
        try:
            yield self
        finally:
            self.end()


def single_hidden(hidden: List[torch.Tensor], model_name: str) -> torch.Tensor:
    """The one hidden-state tensor a forward fed to the head (`NotImplementedError` otherwise)."""
    if len(hidden) != 1:
        raise NotImplementedError(
            f"{model_name} called its output embedding {len(hidden)} times in one forward "
            "(expected once); t3s supports models whose logits are one projection of the "
            "final hidden states")
    return hidden[0]


@contextlib.contextmanager
def head_tap(module: nn.Module):
    """The module's installed tap, or one installed for the block and removed after it."""
    tap = HeadTap.of(module)
    if tap is not None:
        yield tap
        return
    tap = HeadTap.install(module)
    try:
        yield tap
    finally:
        HeadTap.uninstall(module)
