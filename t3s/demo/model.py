"""The demo's tiny student: a char-level tokenizer and a ~0.86M-parameter Llama.

Tokenizer. A `transformers.PreTrainedTokenizerFast` built in code over a fixed
vocabulary (`VOCAB`): the special tokens ``<pad> <bos> <eos> <unk>``, one token
per character in `CHARS` (digits, ``+ - * = ; \\ { } ( ) # `` space and
newline) and the word ``boxed`` as a single token. Every other character
maps to ``<unk>``. Encoding with special tokens prepends ``<bos>``; there is no
chat template, so `t3s.data.tokenize_trace` concatenates ``<bos> + prompt +
response + <eos>``.

Model. `LlamaForCausalLM` with `CONFIG`: 4 layers, hidden size 128, 4 heads,
MLP 384, tied embeddings, RoPE; `PARAM_COUNT` (856,704) parameters, about
3.4 MB of float32 safetensors.

The base student θ0 answers 2- and 3-term sums step by step in its own compact
style (``23+45=68;68+12=80;\\boxed{80}``, `t3s.demo.task`); it has never seen
the teacher's layout (one spaced step per line) nor a 4-term sum. It lives in
`BASE_DIR` (``t3s/demo/assets/base/``):
``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` and ``build_info.json`` (seed,
steps and accuracies of the build). ``scripts/build_demo_base.py`` rebuilds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "SPECIAL_TOKENS",
    "CHARS",
    "VOCAB",
    "CONFIG",
    "PARAM_COUNT",
    "BASE_DIR",
    "build_tokenizer",
    "SIZES",
    "build_config",
    "build_model",
    "count_parameters",
    "save_base",
    "load_base",
    "base_exists",
    "load_build_info",
    "greedy_generate",
    "encode",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: single characters in the vocabulary (in id order, after the special tokens)
CHARS = "0123456789+-*=;\\{}()# \n"
#: the full vocabulary in id order
VOCAB: Tuple[str, ...] = SPECIAL_TOKENS + tuple(CHARS) + ("boxed",)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

#: the model configuration (a `transformers.LlamaConfig`'s arguments)
CONFIG: Dict[str, Any] = dict(
    vocab_size=len(VOCAB),
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    attention_dropout=0.0,
    initializer_range=0.02,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
#: number of parameters of `build_model()` (tied embeddings counted once)
PARAM_COUNT = 856_704

BASE_DIR = Path(__file__).resolve().parent / "assets" / "base"
BUILD_INFO = "build_info.json"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the t3s demo needs transformers and tokenizers: pip install 't3s[hf]'") from e
    return transformers


def build_tokenizer():
    """The demo's char-level `PreTrainedTokenizerFast` (see the module docstring)."""
    transformers = _transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # "boxed" as one piece, every other character on its own
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"boxed|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right", model_max_length=CONFIG["max_position_embeddings"])


_IDS = {tok: i for i, tok in enumerate(VOCAB)}


def encode(text: str) -> List[int]:
    """Token ids of ``text`` without special tokens; the same as the tokenizer's
    ``tokenizer(text, add_special_tokens=False)["input_ids"]``, only faster
    (for the base build's hundreds of thousands of short examples)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("boxed", i):
            out.append(_IDS["boxed"])
            i += 5
        else:
            out.append(_IDS.get(text[i], UNK_ID))
            i += 1
    return out


#: the sizes `build_model` takes (`CONFIG` overrides): ``base``, the shipped student
#: (~0.86M parameters), and ``large``, its sibling with twice the width (~3.4M, about
#: 4x; the same tokenizer, depth and head size), for cross-model selection
SIZES: Dict[str, Dict[str, Any]] = {
    "base": {},
    "large": {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8,
              "num_key_value_heads": 8},
}


def build_config(**overrides):
    """A `transformers.LlamaConfig` from `CONFIG` with ``overrides`` applied."""
    transformers = _transformers()
    return transformers.LlamaConfig(**{**CONFIG, **overrides})


def build_model(seed: int = 0, **overrides):
    """A freshly initialised `LlamaForCausalLM` (float32), initialised under ``seed``."""
    transformers = _transformers()
    cfg = build_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
    return model


def count_parameters(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_base(model, tokenizer, path: Union[str, os.PathLike] = BASE_DIR, *,
              build_info: Optional[Mapping[str, Any]] = None) -> Path:
    """Save ``model`` (safetensors), its config and ``tokenizer`` to ``path``, plus
    ``build_info.json`` when given. Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if build_info is not None:
        (path / BUILD_INFO).write_text(json.dumps(dict(build_info), indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return path


def base_exists(path: Union[str, os.PathLike] = BASE_DIR) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file() \
        and (path / "tokenizer.json").is_file()


def load_base(path: Union[str, os.PathLike] = BASE_DIR, *, dtype: torch.dtype = torch.float32):
    """Load the base student: ``(model, tokenizer)`` from ``path`` (safetensors only,
    no remote code). Raises FileNotFoundError, saying how to build it, when absent."""
    transformers = _transformers()
    path = Path(path)
    if not base_exists(path):
        raise FileNotFoundError(f"no demo base model in {path}; build it with "
                                "`python scripts/build_demo_base.py`")
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    model.eval()
    return model, tokenizer


def load_build_info(path: Union[str, os.PathLike] = BASE_DIR) -> Dict[str, Any]:
    """The ``build_info.json`` written with the base ({} when absent)."""
    f = Path(path) / BUILD_INFO
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_id: int = EOS_ID, pad_token_id: int = PAD_ID,
                    batch_size: int = 256) -> List[List[int]]:
    """Greedy continuations of token-id ``prompts``: ``model.generate(do_sample=False)``
    over batches of prompts of one length.

    Grouping by length means no batch needs padding (the demo's prompts of one problem
    size all have the same length), so each continuation is the one the prompt gets
    alone. Each continuation stops after ``eos_token_id`` (which it does not include)
    or ``max_new_tokens`` tokens. Returns the new token ids per prompt, in the input
    order. The model is put in eval mode and restored afterwards.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: List[Optional[List[int]]] = [None] * len(prompts)
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        groups.setdefault(len(p), []).append(i)
    try:
        for length, idx_all in sorted(groups.items()):
            for s in range(0, len(idx_all), batch_size):
                idx = idx_all[s:s + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
                # every setting given, so that the model's generation_config.json (sampling
                # options, a length limit) cannot change what greedy decoding means here
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     do_sample=False, max_new_tokens=max_new_tokens,
                                     min_new_tokens=0, num_beams=1,
                                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
                for row, i in zip(gen[:, length:].tolist(), idx):
                    cut = row.index(eos_token_id) if eos_token_id in row else len(row)
                    out[i] = row[:cut]
    finally:
        if was_training:
            model.train()
    return out  # type: ignore[return-value]
