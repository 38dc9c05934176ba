"""`HFEngine`: generation with a Hugging Face model's own ``generate`` (left-padded
batches), the default engine of `t3s.training_accuracy`, the training-accuracy callback
and the pipeline's eval stage."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .base import GenerationEngine, SamplingParams, prompt_list

__all__ = ["HFEngine"]


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _id_set(value: Any) -> set:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


class HFEngine(GenerationEngine):
    """Generation with the model's own Hugging Face ``generate``.

    model: a model with ``generate`` (a ``*ForCausalLM``); tokenizer: its tokenizer
    (the pad id, `t3s.data.collate.pad_token_id`, and the stop strings).
    batch_size: prompts per ``generate`` call, left-padded with the pad id
        (``samples`` answers each: the call returns batch_size·samples rows).
    lockstep: every rank calls `generate` together and runs as many ``generate``
        calls as the rank with the most batches (a rank with fewer runs filler
        batches and discards them), with ``synced_gpus=True``: what a sharded model
        (FSDP, ZeRO-3), whose every forward is a collective, needs.
    progress: a progress bar (``desc``) over the prompts.
    generation_kwargs: more keyword arguments of ``generate``, over the ones set
        here (``num_return_sequences`` is refused: set ``SamplingParams.samples``).

    Greedy: ``do_sample=False``. Sampled: ``do_sample=True``, ``temperature``,
    ``top_p``, ``top_k=0``, ``num_return_sequences=samples``, with torch's RNG seeded
    with ``params.seed`` inside `torch.random.fork_rng`, so the caller's RNG state
    is left as it was. The same prompts, batch size and seed give the same answers;
    a prompt's samples depend on the batch it is in (the batch is sampled as one).
    Stop strings go to ``generate`` as ``stop_strings`` (with ``tokenizer``).

    The answers are the new tokens as generated, up to and including the first eos
    token; the pad ids ``generate`` fills a finished row with are removed (after a
    stop string they are trailing pad ids).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, lockstep: bool = False,
                 progress: bool = False, desc: str = "generation",
                 generation_kwargs: Optional[Mapping[str, Any]] = None):
        from ..data.collate import pad_token_id
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.generation_kwargs = dict(generation_kwargs or {})
        if "num_return_sequences" in self.generation_kwargs:
            raise ValueError("generation_kwargs must not set num_return_sequences: set "
                             "SamplingParams.samples (the answers per prompt) instead")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.lockstep = int(batch_size), bool(lockstep)
        self.progress, self.desc = bool(progress), desc
        self.pad_id = int(pad_token_id(tokenizer))

    def sync_weights(self, model) -> None:
        """Make the engine generate with ``model``'s current weights.

        The HF engine generates with the live model object, so whatever its
        parameters hold at the time of `generate` is what generates: for the model
        the engine holds this is a no-op on purpose (nothing is copied, nothing is
        reloaded). Given another model object, the engine generates with that one
        from now on."""
        self.model = model

    def _eos_ids(self) -> set:
        if "eos_token_id" in self.generation_kwargs:
            return _id_set(self.generation_kwargs["eos_token_id"])
        config = getattr(self.model, "generation_config", None)
        ids = _id_set(getattr(config, "eos_token_id", None))
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        return ids or _id_set(getattr(tok, "eos_token_id", None))

    def _kwargs(self, params: SamplingParams) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = dict(max_new_tokens=params.max_new_tokens)
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=0, num_return_sequences=params.samples)
        kwargs["pad_token_id"] = self.pad_id
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.lockstep:
            kwargs["synced_gpus"] = True
        kwargs.update(self.generation_kwargs)
        return kwargs

    def _trim(self, row: List[int], eos: set, stop: bool) -> List[int]:
        """The tokens up to and including the first eos; after a stop string, without
        the trailing pad ids that fill the finished row."""
        end = next((j + 1 for j, t in enumerate(row) if t in eos), None)
        if end is not None:
            return row[:end]
        if stop:
            while row and row[-1] == self.pad_id:
                row = row[:-1]
        return row

    def _batch(self, prompts: List[List[int]], kwargs: Mapping[str, Any],
               device: torch.device) -> torch.Tensor:
        """The new tokens [B·samples, T_new] of one ``generate`` call on ``prompts``
        [B][T_p], left-padded to [B, max T_p]."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        out = self.model.generate(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device), **kwargs)
        if not isinstance(out, torch.Tensor):
            out = out.sequences
        return out[:, width:].cpu()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> List[List[List[int]]]:
        """See `GenerationEngine.generate`. The model is put in eval mode and restored."""
        from .. import dist
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = prompt_list(prompts)
        bs, k = self.batch_size, params.samples
        n_batches = -(-len(prompts) // bs)
        if self.lockstep:   # every rank runs as many generate calls as the rank with the most
            n_batches = max(dist.gather_objects(n_batches))
        if not n_batches:
            return []
        kwargs, eos, device = self._kwargs(params), self._eos_ids(), _model_device(self.model)
        model = self.model
        was_training = bool(getattr(model, "training", False))
        if hasattr(model, "eval"):
            model.eval()
        out: List[List[List[int]]] = []
        try:
            from tqdm.auto import tqdm
            with tqdm(total=len(prompts), desc=self.desc, leave=False,
                      disable=not self.progress) as bar, self._rng(params):
                for b in range(n_batches):
                    chunk = prompts[b * bs:(b + 1) * bs]
                    # a lockstep filler (discarded): any prompt will do
                    rows = self._batch(chunk or [prompts[0] if prompts else [self.pad_id]],
                                       kwargs, device).tolist()
                    for i in range(len(chunk)):
                        out.append([self._trim(r, eos, bool(params.stop))
                                    for r in rows[i * k:(i + 1) * k]])
                    bar.update(len(chunk))
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        return out

    @staticmethod
    def _rng(params: SamplingParams):
        """Greedy: nothing. Sampled: torch's RNG seeded with ``params.seed`` inside
        `torch.random.fork_rng` (the CUDA devices' states too once CUDA is in use)."""
        import contextlib
        if params.greedy:
            return contextlib.nullcontext()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if cuda else []

        @contextlib.contextmanager
        def seeded():
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed)
                yield
        return seeded()
