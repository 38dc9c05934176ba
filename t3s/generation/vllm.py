"""`VLLMEngine`: generation with vLLM, colocated in the training process.

The engine is a ``vllm.LLM`` built in this process (the ``[vllm]`` extra; on a CPU
machine vLLM's CPU build, see docs/generation.md). What makes it usable inside a
training run:

* **In-memory weight sync.** `VLLMEngine.sync_weights` streams the live model's
  parameters (gathered whole from FSDP2 DTensors or ZeRO-3 shards, one at a time)
  into vLLM's model through its in-place reload, as TRL's GRPO colocate mode does:
  no checkpoint is written or read.
* **Sleep mode.** Between generations the engine sleeps (``LLM.sleep``: weights
  offloaded, KV cache released) so training gets the accelerator's memory back;
  it wakes before the next sync or generation. vLLM implements sleep on CUDA only:
  elsewhere the engine says so once and keeps its memory.
* **Launchers.** Under torchrun or accelerate (a process group of more than one
  rank) every rank builds its own engine with vLLM's ``external_launcher``
  executor and generates its own share of the prompts (`t3s.training_accuracy`
  splits them); the process group stays the caller's.

vLLM's engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here
unless the environment sets it), which the weight sync needs; the entry script
must still guard its work with ``if __name__ == "__main__":`` (vLLM may spawn).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .base import GenerationEngine, SamplingParams, prompt_list

__all__ = ["VLLMEngine", "VLLMWorkerExtension", "vllm_available", "live_weights",
           "saved_weights"]

logger = logging.getLogger(__name__)

# wrapper prefixes that FSDP / activation checkpointing / DDP put in parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def vllm_available() -> Tuple[bool, str]:
    """(True, version) when vLLM imports here, else (False, the import error's line)."""
    try:
        import vllm
    except Exception as e:   # vLLM's import can fail with any error (missing ops, CUDA libs)
        return False, f"{type(e).__name__}: {e}".splitlines()[0]
    return True, str(getattr(vllm, "__version__", "unknown"))


def _unwrapped(model):
    """The model inside DDP / DeepSpeed engine / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def live_weights(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of ``model``'s state dict, in its names as
    saved by ``save_pretrained`` (wrapper prefixes removed). FSDP2 DTensors are gathered
    whole (``full_tensor``, a collective: every rank must iterate together); ZeRO-3
    parameters are gathered one at a time. Tensors are detached; only one gathered
    parameter is alive at a time beyond what the consumer keeps."""
    model = _unwrapped(model)
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if zero3:
        import deepspeed
        saved = set(model.state_dict().keys())   # persistent entries only, as save_pretrained
        # remove_duplicate=False: a tied head is its own entry, as in a state dict
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in saved:
                with deepspeed.zero.GatheredParameters([param]):
                    yield _clean(name), param.detach().clone()
        for name, buf in model.named_buffers():
            if name in saved:
                yield _clean(name), buf.detach()
        return
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):   # a DTensor (FSDP2)
            tensor = tensor.full_tensor()
        yield _clean(name), tensor.detach()


def saved_weights(files) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the safetensors ``files``, one at a time."""
    from safetensors import safe_open
    names, embedding = set(), None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                tensor = st.get_tensor(name)
                names.add(name)
                if name.endswith("embed_tokens.weight"):
                    embedding = tensor
                yield name, tensor
    # A tied head is saved as the embedding alone, but vLLM's CPU build keeps its own
    # copy of the head (repacked for its GEMM): it must be given, as a live state dict does.
    if "lm_head.weight" not in names and embedding is not None:
        yield "lm_head.weight", embedding


def _safetensors_files(model_dir) -> List[Path]:
    path = Path(model_dir).resolve()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    return files


class VLLMWorkerExtension:
    """Methods a vLLM server's workers gain when it starts with ``--worker-extension-cls
    t3s.generation.vllm.VLLMWorkerExtension`` (called through ``/collective_rpc``, which
    needs ``VLLM_SERVER_DEV_MODE=1``; `t3s.generation.VLLMServerEngine` uses them)."""

    def t3s_load_weights(self, model_dir: str) -> None:
        """Read the weights saved in ``model_dir`` into the served model in place
        (`saved_weights`: a tied head included, which vLLM's own reload from a path
        leaves stale)."""
        self.model_runner.reload_weights(weights_iterator=saved_weights(
            _safetensors_files(model_dir)))


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _model_path(model) -> str:
    if isinstance(model, (str, Path)):
        path = Path(model)
    else:
        path = Path(str(getattr(_unwrapped(model), "name_or_path", "") or ""))
    if not (path / "config.json").is_file():
        raise ValueError(f"vLLM builds its engine from a model directory with a config.json; "
                         f"{str(path) or 'the model'} is not one (pass model_path=)")
    return str(path)


class VLLMEngine(GenerationEngine):
    """Generation with vLLM in this process (colocated), with in-memory weight sync.

    model: the model directory vLLM loads its architecture (and first weights) from,
        or a Hugging Face model (its ``name_or_path`` is that directory, and its live
        weights are pushed into the engine at once, so the engine starts from what
        the model holds, not from the files).
    tokenizer: a tokenizer directory for vLLM (default: the model directory's);
        answers are token ids, so the caller's tokenizer decodes them.
    dtype: vLLM's dtype (default: the live model's dtype, else ``"auto"``).
    sleep: put the engine to sleep between generations (default: on CUDA; vLLM has
        no sleep mode elsewhere, and asking for it there is said once).
    gpu_memory_utilization: the share of accelerator memory vLLM may take (weights
        and KV cache) while awake.
    max_model_len: the longest prompt + answer (default: the model config's).
    progress: vLLM's progress bar over the prompts.
    llm_kwargs: more keyword arguments for ``vllm.LLM`` (over the ones set here).

    Sampling (`SamplingParams`): greedy is vLLM's temperature 0; sampled runs give
    each prompt its own seed (``params.seed`` + its position in the call) and ``n =
    samples`` answers, with top-k off. Stop strings end an answer with the token
    that completes them, kept (as `t3s.generation.HFEngine` does).
    """

    def __init__(self, model, tokenizer=None, *, dtype: Optional[str] = None,
                 sleep: Optional[bool] = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: Optional[int] = None, seed: int = 0, progress: bool = False,
                 llm_kwargs: Optional[Mapping[str, Any]] = None):
        ok, why = vllm_available()
        if not ok:
            raise ImportError(f"the vllm engine needs vLLM (pip install -e '.[vllm]', see "
                              f"docs/generation.md); importing it failed: {why}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{gpu_memory_utilization!r}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        cuda = torch.cuda.is_available()
        if not cuda:   # vLLM's CPU build otherwise reserves 4 GiB of KV cache per engine
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.sleeps = cuda if sleep is None else bool(sleep)
        if self.sleeps and not cuda:
            logger.warning("t3s: vLLM's sleep mode needs CUDA; the engine keeps its memory "
                           "between generations")
            self.sleeps = False
        path = _model_path(model)
        if dtype is None:
            live = getattr(_unwrapped(model), "dtype", None) if not isinstance(model, (str, Path)) \
                else None
            dtype = str(live).replace("torch.", "") if isinstance(live, torch.dtype) else "auto"
        kwargs: Dict[str, Any] = dict(model=path, dtype=dtype, seed=int(seed),
                                      gpu_memory_utilization=float(gpu_memory_utilization),
                                      enable_sleep_mode=self.sleeps)
        tok_dir = tokenizer if isinstance(tokenizer, (str, Path)) else \
            getattr(tokenizer, "name_or_path", None)
        if tok_dir and (Path(str(tok_dir)) / "tokenizer_config.json").is_file():
            kwargs["tokenizer"] = str(tok_dir)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        from .. import dist
        if dist.world_size() > 1:   # one engine per rank, inside the caller's process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs or {})
        from vllm import LLM
        self.llm = LLM(**kwargs)
        self.progress, self.asleep = bool(progress), False
        if not isinstance(model, (str, Path)):
            self.sync_weights(model)
        self._sleep()

    # -- sleep ---------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self, tags: Optional[List[str]] = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    # -- the interface -------------------------------------------------------------------
    def _runner(self):
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        runner = getattr(worker, "model_runner", None)
        if runner is None or not hasattr(runner, "reload_weights"):
            raise RuntimeError(
                "this vLLM engine runs its model in another process, so weights cannot be "
                "synced in memory: keep VLLM_ENABLE_V1_MULTIPROCESSING=0 and no multi-process "
                "executor (tensor parallelism within a rank is not supported by sync_weights)")
        return runner

    def sync_weights(self, model) -> None:
        """Push ``model``'s current weights into the engine in memory (no files).

        Every rank of a sharded model must call it together (the parameters are
        gathered whole). The prefix cache is reset, since cached prompts were
        computed with the old weights."""
        if isinstance(model, (str, Path)):
            raise TypeError("sync_weights takes the live model; to load a saved model "
                            "directory, build an engine on it")
        self._wake(["weights"])
        self._runner().reload_weights(weights_iterator=live_weights(model))
        self.llm.reset_prefix_cache()

    def load_weights_from(self, model_dir) -> None:
        """Make the engine generate with the weights saved in ``model_dir`` (a model of the
        engine's architecture), read in place by vLLM: no new engine, and no Hugging Face
        copy of the model in this process."""
        files = _safetensors_files(_model_path(model_dir))
        self._wake(["weights"])
        # streamed through the same in-place reload as `sync_weights`, the head included
        # (`saved_weights`): vLLM's own reload from a path left a tied head stale (0.32, CPU)
        self._runner().reload_weights(weights_iterator=saved_weights(files))
        self.llm.reset_prefix_cache()

    def _vllm_params(self, params: SamplingParams, index: int):
        from vllm import SamplingParams as VSampling
        kwargs: Dict[str, Any] = dict(max_tokens=params.max_new_tokens, n=params.samples,
                                      detokenize=bool(params.stop))
        if params.greedy:
            kwargs["temperature"] = 0.0
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          seed=params.seed + index)
        if params.stop:
            kwargs.update(stop=list(params.stop), include_stop_str_in_output=True)
        return VSampling(**kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> List[List[List[int]]]:
        """See `GenerationEngine.generate`."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = prompt_list(prompts)
        if not prompts:
            return []
        self._wake()
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                     [self._vllm_params(params, i) for i in range(len(prompts))],
                                     use_tqdm=self.progress)
        finally:
            self._sleep()
        return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)]
                for o in outs]

    def close(self) -> None:
        """Free the engine (its model and KV cache)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
        import gc
        gc.collect()
