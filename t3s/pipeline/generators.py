"""The run's generation engine (``engine``, ``vllm_server``; `t3s.generation`) for the stages
that generate answers: the pilot's training-accuracy evaluations and the final scoring
of the eval and sensitivity stages.

* ``engine: hf`` (the default): the model's own ``generate``.
* ``engine: vllm``: vLLM in this process. The pilot's engine gets the training
  weights in memory before every evaluation (`t3s.generation.VLLMEngine.sync_weights`);
  the eval stages build one engine on θ0 and read each further model's weights into it
  from its directory (`VLLMEngine.load_weights_from`), with no Hugging Face copy loaded.
* ``vllm_server: URL``: the eval stages generate with that server instead
  (`t3s.generation.VLLMServerEngine`), which reloads each model from its directory
  (it must read the run's directories and start as
  `t3s.generation.server.SERVER_FLAGS` says).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from .. import dist
from ..generation import GenerationEngine, vllm_available
from .settings import UsageError

__all__ = ["check_engine", "accuracy_engine", "EvalEngine", "GENERATING_STAGES"]

#: the stages that generate answers (`t3s.pipeline.commands.check_inputs` checks the engine
#: before any of them runs)
GENERATING_STAGES = ("pilot", "eval", "sensitivity")
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_engine(cfg: Mapping[str, Any], pending: Sequence[str]) -> None:
    """UsageError, before any work, when the pending stages would generate with vLLM and
    vLLM does not import here (the import error in the message)."""
    if cfg["engine"] != "vllm" or not any(s in GENERATING_STAGES for s in pending):
        return
    ok, why = vllm_available()
    if not ok:
        raise UsageError(f"--engine vllm needs vLLM (pip install -e '.[vllm]'; on a CPU machine "
                         f"see docs/generation.md), but importing it failed: {why}")


def _vllm_engine(cfg: Mapping[str, Any], model, tok):
    from ..generation import VLLMEngine
    from .console import show_progress
    return VLLMEngine(model, cfg["tokenizer"] or getattr(tok, "name_or_path", None),
                      dtype=_VLLM_DTYPES[cfg["dtype"]],
                      gpu_memory_utilization=cfg["vllm_gpu_memory"], seed=cfg["seed"],
                      progress=show_progress(cfg["progress"]) and dist.is_main())


def accuracy_engine(cfg: Mapping[str, Any], tok) -> Optional[Callable[[Any], GenerationEngine]]:
    """The pilot's engine for `t3s.trainer.AccuracyCallback` (``engine=``): None for hf,
    else a function that builds the colocated vLLM engine on the training model."""
    if cfg["engine"] != "vllm":
        return None
    return lambda model: _vllm_engine(cfg, model, tok)


class EvalEngine:
    """The eval stages' engine across the models they score, one after another.

    ``for_model(path)`` returns None for the hf engine (score the loaded model), else an
    engine that holds the weights saved at ``path``. Use it as a context manager: the
    engine it built is closed at the end."""

    def __init__(self, cfg: Mapping[str, Any], tok):
        self.cfg, self.tok = cfg, tok
        self.engine: Optional[GenerationEngine] = None

    def for_model(self, path: str) -> Optional[GenerationEngine]:
        cfg = self.cfg
        if cfg["vllm_server"]:
            from ..generation import VLLMServerEngine
            if self.engine is None:
                self.engine = VLLMServerEngine(cfg["vllm_server"],
                                               batch_size=cfg["eval_batch_size"])
            if dist.is_main():   # one reload serves every rank
                self.engine.sync_weights(path)
            dist.barrier()
            return self.engine
        if cfg["engine"] != "vllm":
            return None
        if self.engine is None:
            self.engine = _vllm_engine(cfg, path, self.tok)
        else:
            self.engine.load_weights_from(path)
        return self.engine

    def __enter__(self) -> "EvalEngine":
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
