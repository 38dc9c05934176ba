"""The demo's diffusion student: a ~0.70M-parameter bidirectional masked LM.

Model. `transformers.BertForMaskedLM` with `DLM_CONFIG`: 4 layers, hidden size
128, 4 heads, MLP 384, learned absolute positions, no dropout. (A ModernBERT of
the same size, with rotary positions like the AR student, learned the sums more
slowly under the same build: 0.03 / 0.01 held-out accuracy on 2- / 3-term sums
after 1000 steps, against the BERT's 0.07 / 0.09 after 1000 of 1500.) Its vocabulary
is the AR demo's (`t3s.demo.model.VOCAB`, the same char-level tokenizer, so the
shipped AR student can act as its T3S selector: the tokenizer fingerprints
match) plus one id, `MASK_ID` = ``len(VOCAB)``, the mask token, named in the
config (``mask_token_id``); the tokenizer itself stays the AR one.

The diffusion base θ0 answers 2- and 3-term sums in the student's compact style by
iterative unmasking (`t3s.dllm.diffusion_generate`), like the AR base: held-out accuracy
1.00 / 0.98 on 100 2- / 3-term sums, 0.00 on 4-term ones, which it has never seen. It
lives in `DLM_DIR` (``t3s/demo/assets/diffusion_base/``, 2.8 MB of float32
safetensors), built by ``scripts/build_demo_diffusion_base.py`` (6000 steps; seed,
steps and accuracies in its ``build_info.json``).

Demo layer: its vocabulary is the AR demo's (`t3s.demo.model`); the model files stay
with the demo's other assets, in ``t3s/demo/assets/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..demo.model import BASE_DIR, BOS_ID, EOS_ID, PAD_ID, VOCAB

__all__ = ["MASK_ID", "DLM_CONFIG", "DLM_DIR", "DLM_BLOCK_LENGTH", "build_dlm", "load_dlm",
           "dlm_exists", "load_dlm_build_info"]

#: the mask token: one id after the char vocabulary
MASK_ID = len(VOCAB)
#: generation block length of the demo's diffusion runs (answers are 21-55 tokens)
DLM_BLOCK_LENGTH = 8

DLM_CONFIG: Dict[str, Any] = dict(
    vocab_size=len(VOCAB) + 1, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=160, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, initializer_range=0.02, pad_token_id=PAD_ID,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, mask_token_id=MASK_ID, type_vocab_size=1,
)

#: the shipped diffusion base, next to the AR base in the demo's assets
DLM_DIR = BASE_DIR.parent / "diffusion_base"


def build_dlm(seed: int = 0, **overrides):
    """A freshly initialised `BertForMaskedLM` (float32) under ``seed``."""
    from transformers import BertConfig, BertForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(BertConfig(**{**DLM_CONFIG, **overrides}))


def dlm_exists(path: Union[str, os.PathLike] = DLM_DIR) -> bool:
    path = Path(path)
    return all((path / n).is_file() for n in ("model.safetensors", "config.json", "tokenizer.json"))


def load_dlm(path: Union[str, os.PathLike] = DLM_DIR):
    """``(model, tokenizer)`` of the diffusion base (safetensors only, no remote code);
    FileNotFoundError saying how to build it when absent."""
    from transformers import BertForMaskedLM, PreTrainedTokenizerFast
    path = Path(path)
    if not dlm_exists(path):
        raise FileNotFoundError(f"no demo diffusion model in {path}; build it with "
                                "`python scripts/build_demo_diffusion_base.py`")
    model = BertForMaskedLM.from_pretrained(path, use_safetensors=True).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def load_dlm_build_info(path: Union[str, os.PathLike] = DLM_DIR) -> Dict[str, Any]:
    f = Path(path) / "build_info.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

