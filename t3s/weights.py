"""Checkpoint weights: RRT, the weight-arithmetic baseline theta_RRT = theta_0 + (theta_final - theta_b).

(`t3s.rrt` and `t3s.save_rrt` are the functions of this module.)

theta_0 is the base model, theta_b the bottleneck checkpoint of the pilot SFT
run and theta_final its last checkpoint. Each argument may be an in-memory
state dict or a safetensors checkpoint: one ``.safetensors`` file, or a
directory holding ``model.safetensors`` or the shards of a Hugging Face
sharded checkpoint (``model.safetensors.index.json``). Pickle checkpoints
(``.bin``, ``.pt``) are refused: they can run code when loaded.

The arithmetic is done tensor by tensor in float32 (float64 stays float64)
and cast back to the tensor's dtype; integer tensors are combined exactly.
Files are read through ``safetensors.safe_open``, one tensor at a time, and
`save_rrt` writes one output shard at a time, so peak memory is about one
shard of the output.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

__all__ = ["rrt", "save_rrt", "load_state_dict"]

StateSource = Union[Mapping[str, torch.Tensor], str, os.PathLike]

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
# safetensors dtype strings (safe_open(...).get_slice(k).get_dtype()) -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def rrt(theta0: StateSource, theta_b: StateSource,
        theta_final: StateSource) -> Dict[str, torch.Tensor]:
    """theta_0 + (theta_final - theta_b), per tensor. Returns a new state dict on the CPU.

    Keys, shapes and dtypes must match exactly across the three inputs
    (`ValueError` otherwise, naming the differences). The result keeps
    theta_final's key order.
    """
    sources = _open_all(theta0, theta_b, theta_final)
    return {key: _combine(key, *(s.get(key) for s in sources)) for key in sources[2].keys()}


def save_rrt(theta0: StateSource, theta_b: StateSource, theta_final: StateSource,
             out_path: Union[str, os.PathLike], *, copy_extra_files: bool = True) -> str:
    """Compute `rrt` and write it as safetensors; returns ``out_path`` (file or directory).

    * theta_final a sharded checkpoint directory: ``out_path`` is a directory
      with the same shard files and a ``model.safetensors.index.json``; each
      shard is computed and written before the next is started.
    * otherwise: ``out_path`` ending in ``.safetensors`` is written as one
      file; any other ``out_path`` is a directory receiving ``model.safetensors``.

    With ``copy_extra_files`` and theta_final a directory, its other small
    files (``config.json``, tokenizer files, ...) are copied too, so the output
    loads with ``from_pretrained``. Never writes pickle.
    """
    from safetensors.torch import save_file

    out_path = os.fspath(out_path)
    for src in (theta0, theta_b, theta_final):
        if isinstance(src, (str, os.PathLike)) and \
                os.path.abspath(os.fspath(src)) == os.path.abspath(out_path):
            raise ValueError(f"out_path {out_path} is one of the inputs; write elsewhere")
    sources = _open_all(theta0, theta_b, theta_final)
    final = sources[2]
    metadata = {"format": "pt", "t3s": "rrt = theta0 + (theta_final - theta_b)"}
    shards = final.shards()
    if len(shards) > 1 or (final.directory is not None and not out_path.endswith(".safetensors")):
        os.makedirs(out_path, exist_ok=True)
        weight_map: Dict[str, str] = {}
        total = 0
        for shard_name, keys in shards:
            tensors = {k: _combine(k, *(s.get(k) for s in sources)) for k in keys}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, os.path.join(out_path, shard_name), metadata=metadata)
            weight_map.update({k: shard_name for k in keys})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(out_path, _INDEX_NAME), "w", encoding="utf-8") as fh:
                json.dump(index, fh, indent=2, sort_keys=True)
        if copy_extra_files and final.directory is not None:
            _copy_extra_files(final.directory, out_path)
        return out_path
    target = out_path
    if not out_path.endswith(".safetensors"):
        os.makedirs(out_path, exist_ok=True)
        target = os.path.join(out_path, _SINGLE_NAME)
    else:
        parent = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(parent, exist_ok=True)
    tensors = {k: _combine(k, *(s.get(k) for s in sources)) for k in final.keys()}
    save_file(tensors, target, metadata=metadata)
    return out_path


def load_state_dict(source: StateSource) -> Dict[str, torch.Tensor]:
    """Read a safetensors file or checkpoint directory (or copy a mapping) into a dict."""
    src = _Source.open(source, "source")
    return {k: src.get(k) for k in src.keys()}


# --------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------


def _combine(key: str, t0: torch.Tensor, tb: torch.Tensor, tf: torch.Tensor) -> torch.Tensor:
    dtype = tf.dtype
    if dtype == torch.bool:
        if not (torch.equal(t0, tb) and torch.equal(tb, tf)):
            raise ValueError(f"{key!r}: boolean tensors differ between checkpoints; RRT "
                             "arithmetic is undefined for them")
        return t0.clone()
    if dtype.is_floating_point or dtype.is_complex:
        compute = torch.promote_types(dtype, torch.float32)
        out = t0.to(compute) + (tf.to(compute) - tb.to(compute))
        return out.to(dtype).contiguous()
    # integers: exact in int64, and the result must fit the dtype
    out = t0.to(torch.int64) + (tf.to(torch.int64) - tb.to(torch.int64))
    info = torch.iinfo(dtype)
    if out.numel() and (out.min().item() < info.min or out.max().item() > info.max):
        raise ValueError(f"{key!r}: integer RRT result leaves the range of {dtype}")
    return out.to(dtype).contiguous()


def _open_all(theta0, theta_b, theta_final) -> Tuple["_Source", "_Source", "_Source"]:
    names = ("theta0", "theta_b", "theta_final")
    sources = tuple(_Source.open(s, n) for s, n in zip((theta0, theta_b, theta_final), names))
    final = sources[2]
    final_keys = set(final.keys())
    for src in sources[:2]:
        keys = set(src.keys())
        if keys != final_keys:
            missing = sorted(final_keys - keys)
            extra = sorted(keys - final_keys)
            parts = []
            if missing:
                parts.append(f"{len(missing)} key(s) of theta_final missing from {src.name} "
                             f"(e.g. {missing[:5]})")
            if extra:
                parts.append(f"{len(extra)} key(s) of {src.name} not in theta_final "
                             f"(e.g. {extra[:5]})")
            raise ValueError("RRT needs identical keys in all three checkpoints: " +
                             "; ".join(parts))
    for key in final.keys():
        shape_f, dtype_f = final.meta(key)
        for src in sources[:2]:
            shape, dtype = src.meta(key)
            if shape != shape_f:
                raise ValueError(f"{key!r} has shape {list(shape)} in {src.name} but "
                                 f"{list(shape_f)} in theta_final")
            if dtype != dtype_f:
                raise ValueError(f"{key!r} has dtype {dtype} in {src.name} but {dtype_f} in "
                                 "theta_final; convert the checkpoints to one dtype first")
    return sources


# --------------------------------------------------------------------------------------
# Sources: state dicts and safetensors checkpoints behind one interface
# --------------------------------------------------------------------------------------


class _Source(abc.ABC):
    """Lazy access to one checkpoint's tensors: the interface of a weight source.

    Attributes: ``name`` (the argument's name, e.g. ``"theta_b"``, used in error
    messages) and ``directory`` (the checkpoint directory, or None for a state
    dict or a single file). `open` picks the implementation: `_DictSource` for
    an in-memory state dict, `_SafetensorsSource` for a safetensors file or
    directory. Subclasses implement:

    - ``keys() -> List[str]``: every tensor name, in shard order (then file order);
    - ``shards() -> List[Tuple[str, List[str]]]``: ``(shard file name, its keys)``
      per shard, in order (one entry, ``model.safetensors``, unless sharded);
    - ``meta(key) -> (shape, dtype)``: the tensor's shape as a tuple of ints and
      its ``torch.dtype``, read without loading the tensor (only the header);
    - ``get(key) -> torch.Tensor``: the tensor itself, of that shape and dtype, on
      the CPU (loaded one at a time).
    """

    def __init__(self, name: str, directory: Optional[str]):
        self.name = name
        self.directory = directory

    @staticmethod
    def open(source: StateSource, name: str) -> "_Source":
        """The source for a state dict (a Mapping) or a path (file or directory)."""
        if isinstance(source, Mapping):
            return _DictSource(source, name)
        if isinstance(source, (str, os.PathLike)):
            return _SafetensorsSource(os.fspath(source), name)
        raise TypeError(f"{name} must be a state dict or a path to safetensors, got "
                        f"{type(source).__name__}")

    @abc.abstractmethod
    def keys(self) -> List[str]:
        """Every tensor name, in shard order."""

    @abc.abstractmethod
    def shards(self) -> List[Tuple[str, List[str]]]:
        """``(shard file name, keys of that shard)`` for each shard, in order."""

    @abc.abstractmethod
    def meta(self, key: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of tensor ``key``, without loading it."""

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` on the CPU, of the shape and dtype `meta` gives."""


class _DictSource(_Source):
    def __init__(self, state: Mapping[str, torch.Tensor], name: str):
        super().__init__(name, None)
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{k!r}] is a {type(v).__name__}, not a tensor")
        self.state = state

    def keys(self):
        return list(self.state.keys())

    def shards(self):
        return [(_SINGLE_NAME, self.keys())]

    def meta(self, key):
        t = self.state[key]
        return tuple(t.shape), t.dtype

    def get(self, key):
        return self.state[key].detach().cpu()


class _SafetensorsSource(_Source):
    def __init__(self, path: str, name: str):
        if path.endswith(_PICKLE_SUFFIXES):
            raise ValueError(f"{name}: {path} is a pickle checkpoint; t3s reads safetensors only "
                             "(convert it, e.g. with save_pretrained(safe_serialization=True))")
        if os.path.isdir(path):
            directory = path
            files = self._directory_files(path, name)
        elif os.path.isfile(path):
            directory = None
            files = {path: None}
        else:
            raise FileNotFoundError(f"{name}: no such file or directory: {path}")
        super().__init__(name, directory)
        from safetensors import safe_open

        self._handles = {f: safe_open(f, framework="pt", device="cpu") for f in files}
        self._where: Dict[str, str] = {}
        self._order: List[Tuple[str, List[str]]] = []
        for f, expected in files.items():
            keys = list(self._handles[f].keys())
            if expected is not None and set(keys) != expected:
                raise ValueError(f"{name}: {os.path.basename(f)} does not hold the keys its "
                                 f"index lists (index says {len(expected)}, file has {len(keys)})")
            for k in keys:
                if k in self._where:
                    raise ValueError(f"{name}: key {k!r} appears in two files "
                                     f"({self._where[k]} and {f})")
                self._where[k] = f
            self._order.append((os.path.basename(f), keys))

    @staticmethod
    def _directory_files(path: str, name: str) -> Dict[str, Optional[set]]:
        index_path = os.path.join(path, _INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{name}: {index_path} has no weight_map")
            files: Dict[str, set] = {}
            for key, shard in weight_map.items():
                files.setdefault(os.path.join(path, shard), set()).add(key)
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{name}: shard {f} listed in {_INDEX_NAME} is missing")
            return dict(sorted(files.items()))
        single = os.path.join(path, _SINGLE_NAME)
        if os.path.isfile(single):
            return {single: None}
        found = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
        if not found:
            pickles = [f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES)]
            hint = (f" (found pickle checkpoint(s) {pickles[:3]}; t3s reads safetensors only)"
                    if pickles else "")
            raise FileNotFoundError(f"{name}: no .safetensors file in {path}{hint}")
        return {f: None for f in found}

    def keys(self):
        return [k for _, keys in self._order for k in keys]

    def shards(self):
        return list(self._order)

    def meta(self, key):
        sl = self._handles[self._where[key]].get_slice(key)
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ValueError(f"{self.name}: {key!r} has unsupported dtype {sl.get_dtype()}")
        return tuple(sl.get_shape()), dtype

    def get(self, key):
        return self._handles[self._where[key]].get_tensor(key)


def _copy_extra_files(src_dir: str, out_dir: str) -> None:
    """Copy config / tokenizer / generation files; never weights or pickles."""
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if (not os.path.isfile(path) or name == _INDEX_NAME or name.endswith(".safetensors")
                or name.endswith(_PICKLE_SUFFIXES)):
            continue
        target = os.path.join(out_dir, name)
        if os.path.abspath(path) != os.path.abspath(target):
            shutil.copy2(path, target)

