"""Loading what a run names: the device, the tokenizer, models and JSONL data.

Errors a user can fix (a missing directory, a model that needs its own code, a
bad or empty JSONL file) are `t3s.pipeline.settings.UsageError` s with a
message on one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from .._util import one_line
from .rundir import read_json
from .settings import UsageError

__all__ = ["DATA_WHAT", "resolve_device", "check_model_dir", "check_jsonl", "load_tokenizer",
           "ensure_pad_token", "load_model", "load_data", "warnings_as_log",
           "attn_implementation", "check_attention"]

logger = logging.getLogger(__name__)

#: what each data setting holds, as messages name it
DATA_WHAT = {"train": "training data", "heldout": "held-out data", "test": "test data",
              "extra_test": "extra test data"}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_HALF = ("bf16", "fp16")


def resolve_device(cfg: Mapping[str, Any]) -> str:
    """"cpu" or "cuda" ("auto": CUDA when available)."""
    import torch
    device = cfg["device"]
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return device


def check_model_dir(path: Optional[str], *, trust_remote_code: bool, what: str = "model") -> None:
    """A local Hugging Face model (or tokenizer) directory that loads without
    custom code unless ``trust_remote_code``; UsageError otherwise."""
    if path is None:
        raise UsageError(f"no {what} given: pass --{what} /path/to/hf_model (a local Hugging Face "
                         f"directory) or set '{what}' in the config file")
    if not os.path.exists(path):
        raise UsageError(f"{what} path {path} does not exist (t3s loads models from a local "
                         "directory; download the model first)")
    if not os.path.isdir(path):
        raise UsageError(f"{what} path {path} is not a directory (expected a Hugging Face model "
                         "directory with config.json)")
    if what == "model" and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} has no config.json: not a Hugging Face model directory")
    if what == "model":
        names = os.listdir(path)
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles and not any(n.endswith(".safetensors") for n in names):
            raise UsageError(
                f"{path} holds pickle weights ({', '.join(pickles[:3])}), which t3s does not "
                "load (unpickling can run code); convert them once where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)")
    for fname in ("config.json", "tokenizer_config.json"):
        full = os.path.join(path, fname)
        if not os.path.isfile(full):
            continue
        try:
            data = read_json(Path(full))
        except ValueError as e:
            raise UsageError(f"{full} is not valid JSON ({e})") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map and not trust_remote_code:
            names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
            raise UsageError(f"{what} {path} needs its own Python code ({fname} has auto_map: "
                             f"{names}); pass --trust-remote-code if you trust that code")


def check_jsonl(path: str, key: str) -> None:
    """Parse (not tokenize) the traces file of setting ``key``: bad lines and empty
    files fail before any work."""
    from ..data import read_traces
    what = DATA_WHAT[key]
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} not found")
    with _bad_data(what, path):
        records = read_traces(path)
    if not records:
        raise UsageError(f"{what} {path} holds no examples")


def load_tokenizer(cfg: Mapping[str, Any]):
    """The run's tokenizer; a missing pad token is set to the eos token."""
    from transformers import AutoTokenizer
    path = cfg["tokenizer"] or cfg["model"]
    check_model_dir(path, trust_remote_code=cfg["trust_remote_code"],
                    what="tokenizer" if cfg["tokenizer"] else "model")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg["trust_remote_code"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None
    return ensure_pad_token(tok, path)


def ensure_pad_token(tok, path: str):
    """``tok`` with a pad token: its eos token when it has none (UsageError without
    either; ``path`` names it)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _whole_model_loads() -> None:
    """Make ``from_pretrained`` build whole models again after a ZeRO-3 training stage.

    Once a Trainer has seen a ZeRO-3 config, ``from_pretrained`` builds models partitioned
    under ``zero.Init``: empty weights outside a DeepSpeed engine. The inference passes
    (profiling, evaluation) run without an engine, so they need the whole model; a training
    load is partitioned by ``deepspeed.initialize`` either way."""
    try:
        from transformers.integrations.deepspeed import (is_deepspeed_zero3_enabled,
                                                         unset_hf_deepspeed_config)
    except ImportError:  # pragma: no cover - older transformers
        return
    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()


def load_model(path: str, cfg: Mapping[str, Any], *, device: Optional[str] = None):
    """A causal LM from a local directory in the run's dtype and attention implementation
    (``--attn-implementation``, `t3s.pipeline.batching`), moved to ``device`` if given:
    an inference load, whole even after a ZeRO-3 training stage."""
    import torch
    from transformers import AutoModelForCausalLM
    check_model_dir(path, trust_remote_code=cfg["trust_remote_code"])
    if device is not None:
        _whole_model_loads()
    attn = attn_implementation(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, _DTYPES[cfg["dtype"]]), use_safetensors=True,
            trust_remote_code=cfg["trust_remote_code"],
            **({} if attn is None else {"attn_implementation": attn}))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a causal LM from {path}: {one_line(e)}") from None
    if device is not None:
        model.to(device)
    return model


def _flash_importable() -> bool:
    from ..hf.packing import flash_attn_installed
    return flash_attn_installed()


def attn_implementation(cfg: Mapping[str, Any]) -> Optional[str]:
    """The ``attn_implementation`` models are loaded with (None: transformers' choice)."""
    want = cfg.get("attn_implementation") or "auto"
    if want != "auto":
        return want
    if (resolve_device(cfg) == "cuda" and cfg["dtype"] in _HALF and _flash_importable()):
        return "flash_attention_2"
    return None


def check_attention(cfg: Mapping[str, Any]) -> None:
    """UsageError, before any work, when ``flash_attention_2`` is asked for but cannot run
    here: flash-attn not importable, no CUDA device, or float32 weights."""
    if cfg.get("attn_implementation") != "flash_attention_2":
        return
    if not _flash_importable():
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package: "
                         "pip install 't3s[flash]' (or choose sdpa, eager or auto)")
    if resolve_device(cfg) != "cuda":
        raise UsageError("--attn-implementation flash_attention_2 runs on CUDA devices only; "
                         "this run is on the CPU (choose sdpa, eager or auto)")
    if cfg["dtype"] not in _HALF:
        raise UsageError(f"--attn-implementation flash_attention_2 needs --dtype bf16 or fp16, "
                         f"got {cfg['dtype']} (flash-attn has no float32 kernels)")


def load_data(cfg: Mapping[str, Any], key: str, tok, *, required: bool = True):
    """`t3s.TraceDataset` of the JSONL file in setting ``key``; None when unset and
    not required. Bad lines, a missing file and an empty file are UsageErrors."""
    from ..data import TraceDataset
    what = DATA_WHAT[key]
    path = cfg[key]
    if path is None:
        if required:
            raise UsageError(f"no {what} given: pass --{key} FILE.jsonl or set '{key}' in the "
                             "config file")
        return None
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} not found")
    with _bad_data(what, path), warnings_as_log():
        ds = TraceDataset.from_jsonl(path, tok, max_length=cfg["max_length"],
                                     truncation=cfg["truncation"])
    if len(ds) == 0:
        extra = (f" ({len(ds.dropped)} dropped as longer than max_length={cfg['max_length']})"
                 if ds.dropped else "")
        raise UsageError(f"{what} {path} holds no examples{extra}")
    return ds


@contextlib.contextmanager
def _bad_data(what: str, path: str):
    """A file that is not UTF-8 or has bad lines: UsageError naming ``what``."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UsageError(f"bad {what}: {path} is not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise UsageError(f"bad {what}: {one_line(e)}") from None


@contextlib.contextmanager
def warnings_as_log():
    """Warnings raised inside the block go to the log instead of stderr."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.warning("%s", w.message)
