"""Shared test fixtures: a char-level tokenizer, tiny causal LMs built from configs, and
small arithmetic trace datasets. Nothing is downloaded.

    tok = make_tokenizer()                       # PreTrainedTokenizerFast, chat template
    model = tiny_llama(tok)                      # LlamaForCausalLM, ~30k parameters
    recs = arithmetic_records(8, seed=0)         # [{"prompt", "response", "answer"}]
    ds = TraceDataset.from_jsonl(recs_as_jsonl_lines(recs), tok)
"""

from __future__ import annotations

import json
import random
from typing import Dict, List, Sequence

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789+=;# \n:.{}\\")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat_template: bool = False, chars: Sequence[str] = CHARS,
                   special: Sequence[str] = SPECIAL) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` plus ``special`` (pad, bos, eos, unk first).

    Without a chat template, `t3s.tokenize_trace` builds ``<s> prompt response </s>``.
    """
    vocab = {t: i for i, t in enumerate(list(special) + list(chars))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = TEMPLATE
    return tok


def tiny_llama_config(tok, **overrides) -> LlamaConfig:
    """LlamaConfig(vocab 64, hidden 32, MLP 64, 2 layers, 4 heads, 2 KV heads) for ``tok``."""
    cfg = dict(vocab_size=max(64, len(tok)), hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(tok, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (deterministic given ``seed``), in train mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tok, **overrides))
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.train()


MASK = "<mask>"


def diffusion_tokenizer():
    """`make_tokenizer` with a mask token, for the diffusion models."""
    tok = make_tokenizer(special=SPECIAL + [MASK])
    tok.mask_token = MASK
    return tok


def tiny_bert(tok, seed=0, **overrides):
    """A tiny ``BertForMaskedLM`` (bidirectional, for t3s.dllm) built from a config."""
    from transformers import BertConfig, BertForMaskedLM
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertForMaskedLM(BertConfig(**cfg)).eval()


def arithmetic_records(n: int, seed: int = 0, *, max_term: int = 9,
                       style: str = "trace") -> List[Dict[str, str]]:
    """``n`` distinct sums ``a+b`` with boxed answers.

    style="trace": ``a+b=c;\\boxed{c}``; style="direct": ``\\boxed{c}``.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_term + 1) for b in range(max_term + 1)]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems with max_term={max_term}")
    out = []
    for a, b in pairs[:n]:
        c = a + b
        resp = f"{a}+{b}={c};\\boxed{{{c}}}" if style == "trace" else f"\\boxed{{{c}}}"
        out.append({"prompt": f"{a}+{b}=", "response": resp, "answer": str(c)})
    return out


def jsonl_lines(records: Sequence[Dict]) -> List[str]:
    return [json.dumps(r) for r in records]


def write_jsonl(path, records: Sequence[Dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


class ScriptedVerifier:
    """A verifier whose k-th evaluation (a block of ``per_eval`` calls) accepts the first
    ``round(accs[k] * per_eval)`` answers: scripted training-accuracy curves."""

    def __init__(self, accs: Sequence[float], per_eval: int):
        self.accs, self.per_eval, self.calls = list(accs), int(per_eval), 0

    def __call__(self, prediction: str, gold: str) -> bool:
        k, i = divmod(self.calls, self.per_eval)
        self.calls += 1
        acc = self.accs[min(k, len(self.accs) - 1)]
        return i < round(acc * self.per_eval)


def write_run_assets(root, *, n_train: int = 16, n_heldout: int = 8, seed: int = 0):
    """A tiny θ0 (``root/model``: model and tokenizer) and ``root/train.jsonl`` /
    ``root/heldout.jsonl`` of arithmetic records, for `t3s run` tests; returns ``root``."""
    from pathlib import Path
    root = Path(root)
    tok = make_tokenizer()
    tiny_llama(tok, seed=seed).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    records = arithmetic_records(n_train + n_heldout, seed=seed)
    write_jsonl(root / "train.jsonl", records[:n_train])
    write_jsonl(root / "heldout.jsonl", records[n_train:])
    return root


def cli_error_line(capsys) -> str:
    """The one line `t3s` wrote to stderr for a refused command: no traceback, and it
    starts with ``t3s: error: ``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("t3s: error: ")
    return err[0]


def load_example(name: str):
    """``examples/<name>.py`` as a module (examples/ is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"t3s_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
