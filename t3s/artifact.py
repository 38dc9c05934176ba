"""The selection artifact: Δc, the chosen mask and their provenance, in one Parquet file.

Layout: one row per response token, columns ``example_id`` int64, ``position``
int32 (see `t3s.data` for the key convention), ``delta`` float32, the rule's
output column (``loss_mask`` bool, or ``forced`` bool for the diffusion-LM
rule), and optionally ``c0``/``cb`` float32 (which some rules need when
re-applied). The schema's key-value metadata holds, under the key ``t3s``, a
JSON object:

    format, version      "t3s.selection", 1
    rule, params, tau    the rule that produced the mask and its parameters
    mask_column          "loss_mask" or "forced"
    selector             name of the model whose confidences gave Δc
    theta0, thetab       checkpoint ids of θ_0 and θ_b
    created              ISO-8601 UTC time
    tokenizer            `tokenizer_signature` (fingerprint, class, vocab size, hashes)
    dataset              `dataset_signature` (fingerprint, per-example token counts
                         and content hashes)
    extra                anything the caller adds

Loading with ``tokenizer=`` or ``examples=`` checks them against the stored
signatures and raises ValueError saying what differs. `SelectionArtifact.reapply`
changes the rule or its thresholds without recomputing Δc.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ._util import sha256_json, to_numpy
from .data.table import IGNORE_INDEX, TokenTable
from .selection import SelectionSummary, apply_rule, summarize

__all__ = [
    "SelectionArtifact",
    "tokenizer_fingerprint",
    "tokenizer_signature",
    "legacy_tokenizer_fingerprint",
    "PROBE_TEXT",
    "dataset_fingerprint",
    "dataset_signature",
    "save_artifact",
    "load_artifact",
]

FORMAT = "t3s.selection"
VERSION = 1
_META_KEY = b"t3s"
_MASK_COLUMNS = ("loss_mask", "forced")


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------

# A fixed text whose token ids join the tokenizer fingerprint: digits, spacing, newlines,
# LaTeX, code, accents, CJK and an emoji exercise the normalizer and the pre-tokenizer,
# which the vocabulary alone does not describe.
PROBE_TEXT = ("Hello, world!  12+345=357;\\boxed{357}\n\tdef f(x):\n    return x**2  "
              "naïve café — 数学 🙂 <|end|>")


def tokenizer_signature(tokenizer) -> Dict[str, Any]:
    """The parts of a tokenizer that decide token ids, hashed separately so that a
    mismatch can be explained: class name, vocab (sorted token -> id, added
    tokens included), special tokens (name -> token, token -> id), the full
    serialized pipeline of a fast tokenizer (normalizer, pre-tokenizer, model,
    post-processor, decoder; runtime truncation / padding settings left out) and
    the token ids of `PROBE_TEXT`. ``fingerprint`` hashes all of them."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"expected a Hugging Face tokenizer with get_vocab(), got {type(tokenizer).__name__}")
    vocab = sorted((str(k), int(v)) for k, v in tokenizer.get_vocab().items())
    special_map = {str(k): v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", []) or []))
    special_ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in specials}
    probe_ids = [int(i) for i in tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]]
    parts = {
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha": sha256_json(vocab),
        "special_tokens": {"map": special_map, "ids": special_ids},
        "config_sha": sha256_json(_pipeline_config(tokenizer)),
        "probe_ids": probe_ids,
    }
    parts["special_sha"] = sha256_json(parts["special_tokens"])
    parts["fingerprint"] = sha256_json([parts["class"], parts["vocab_sha"], parts["special_sha"],
                                        parts["config_sha"], probe_ids])
    return parts


def _pipeline_config(tokenizer) -> Any:
    """A fast tokenizer's serialized pipeline without its runtime settings, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    config = json.loads(backend.to_str())
    config.pop("truncation", None)  # set and reset by calls with truncation= / padding=
    config.pop("padding", None)
    return config


def legacy_tokenizer_fingerprint(parts: Mapping[str, Any]) -> str:
    """The fingerprint of signatures written before the pipeline and probe were hashed."""
    return sha256_json([parts.get("class"), parts.get("vocab_sha"), parts.get("special_sha")])


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash (sha256 hex) of everything that decides the tokenizer's ids
    (see `tokenizer_signature`)."""
    return tokenizer_signature(tokenizer)["fingerprint"]


def _example_arrays(ex: Mapping[str, Any]):
    """(input_ids [L] int64, labels [L]) of one example dict, as numpy."""
    return to_numpy(ex["input_ids"], np.int64).reshape(-1), to_numpy(ex["labels"]).reshape(-1)


def _content_hash(ids: np.ndarray, labels: np.ndarray, ignore_index: int) -> str:
    """Short hash of an example's token ids and of which of them enter the loss."""
    trained = (labels != ignore_index).astype(np.uint8)
    return hashlib.blake2b(ids.tobytes() + b"|" + trained.tobytes(), digest_size=8).hexdigest()


def dataset_signature(examples: Iterable[Mapping[str, Any]], *,
                      ignore_index: int = IGNORE_INDEX) -> Dict[str, Any]:
    """Per-example token counts (all tokens and response tokens), a short hash of
    each example's ``input_ids`` and trained positions, and ``fingerprint``: the
    hash of the sorted (example_id, num_tokens, num_response_tokens, content)
    rows, so one changed token id changes it."""
    rows = []
    for ex in examples:
        ids, labels = _example_arrays(ex)
        rows.append((int(ex["example_id"]), int(ids.size), int((labels != ignore_index).sum()),
                     _content_hash(ids, labels, ignore_index)))
    rows.sort()
    return {
        "fingerprint": sha256_json([list(r) for r in rows]),
        "example_id": [r[0] for r in rows],
        "num_tokens": [r[1] for r in rows],
        "num_response_tokens": [r[2] for r in rows],
        "content": [r[3] for r in rows],
    }


def dataset_fingerprint(examples: Iterable[Mapping[str, Any]], *, ignore_index: int = IGNORE_INDEX) -> str:
    """Hash of every example's id, token counts, token ids and trained positions (see
    `dataset_signature`)."""
    return dataset_signature(examples, ignore_index=ignore_index)["fingerprint"]


def _tokenizer_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    diffs = []
    if stored.get("class") != current.get("class"):
        diffs.append(f"class {stored.get('class')} vs {current.get('class')}")
    if stored.get("vocab_sha") != current.get("vocab_sha"):
        diffs.append(f"vocab differs ({stored.get('vocab_size')} vs {current.get('vocab_size')} tokens)")
    if stored.get("config_sha") and stored.get("config_sha") != current.get("config_sha"):
        diffs.append("the tokenizer pipeline differs (normalizer, pre-tokenizer, model, "
                     "post-processor or decoder)")
    if stored.get("probe_ids") and stored.get("probe_ids") != current.get("probe_ids"):
        diffs.append("the same probe text gives other token ids")
    if stored.get("special_sha") != current.get("special_sha"):
        a = stored.get("special_tokens", {}).get("ids", {})
        b = current.get("special_tokens", {}).get("ids", {})
        changed = sorted(set(a.items()) ^ set(b.items()))[:6]
        diffs.append(f"special tokens differ ({changed})")
    return "; ".join(diffs) or "fingerprints differ"


def _dataset_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    a = {e: (n, r, h) for e, n, r, h in zip(stored["example_id"], stored["num_tokens"],
                                            stored["num_response_tokens"], stored["content"])}
    b = {e: (n, r, h) for e, n, r, h in zip(current["example_id"], current["num_tokens"],
                                            current["num_response_tokens"], current["content"])}
    parts = []
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing:
        parts.append(f"{len(missing)} examples of the artifact are not in the data (ids {missing[:5]})")
    if extra:
        parts.append(f"{len(extra)} examples of the data are not in the artifact (ids {extra[:5]})")
    counts = [e for e in sorted(set(a) & set(b)) if a[e][:2] != b[e][:2]]
    if counts:
        shown = ", ".join(f"example {e}: {a[e][0]} tokens ({a[e][1]} response) in the artifact, "
                          f"{b[e][0]} ({b[e][1]}) in the data" for e in counts[:3])
        parts.append(f"token counts differ for {len(counts)} examples ({shown})")
    content = [e for e in sorted(set(a) & set(b)) if a[e][:2] == b[e][:2] and a[e][2] != b[e][2]]
    if content:
        parts.append(f"token ids differ, or which tokens are trained (same counts), for "
                     f"{len(content)} examples (ids {content[:5]})")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------

@dataclass
class SelectionArtifact:
    """Δc, a mask and metadata for every response token of a dataset.

    table: `TokenTable` with ``delta`` and the mask column (``metadata["mask_column"]``),
    optionally ``c0``/``cb``. metadata: see the module docstring.
    """

    table: TokenTable
    metadata: Dict[str, Any] = field(default_factory=dict)

    # -- creation ----------------------------------------------------------------------
    @classmethod
    def create(cls, delta: TokenTable, *, examples: Iterable[Mapping[str, Any]], tokenizer,
               rule: str = "anchor", params: Optional[Mapping[str, Any]] = None,
               mask: Optional[TokenTable] = None, selector: Optional[str] = None,
               theta0: Optional[str] = None, thetab: Optional[str] = None,
               extra: Optional[Mapping[str, Any]] = None) -> "SelectionArtifact":
        """Build an artifact from a Δc table (e.g. `confidence_change`'s output).

        delta: keys of every response token of ``examples`` (exactly; else
        ValueError) with a ``delta`` column and optionally ``c0``, ``cb`` and
        other per-token columns rules need (``loss_theta``, ``loss_ref``).
        The mask is ``apply_rule(rule, delta, **params)``, or ``mask`` (a table
        with ``loss_mask`` or ``forced``) when given, recorded under ``rule``.
        """
        examples = list(examples)
        keys = TokenTable.from_examples(examples)
        if "delta" not in delta:
            raise ValueError(f"the Δc table needs a 'delta' column; columns: {delta.names}")
        try:
            base = keys.align(delta)
        except ValueError as e:
            raise ValueError(f"the Δc table does not cover exactly the response tokens of the data: {e}") \
                from None
        base = base.with_columns({k: np.asarray(v, dtype=np.float32) if np.issubdtype(v.dtype, np.floating)
                                  else v for k, v in base.columns.items()})
        base = base.select(*[c for c in base.names if c not in _MASK_COLUMNS])
        params = dict(params or {})
        out = apply_rule(rule, base, **params) if mask is None else base.keys_only().align(mask)
        mask_col = _mask_column_of(out)
        table = base.with_columns({mask_col: np.asarray(out[mask_col]).astype(bool)})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "rule": rule,
            "params": _jsonable(params),
            "tau": params.get("tau", 0.2 if rule == "forced" else None),
            "mask_column": mask_col,
            "selector": selector,
            "theta0": theta0,
            "thetab": thetab,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer": tokenizer_signature(tokenizer),
            "dataset": dataset_signature(examples),
            "extra": _jsonable(dict(extra or {})),
        }
        return cls(table, meta)

    # -- accessors ---------------------------------------------------------------------
    @property
    def rule(self) -> str:
        return self.metadata["rule"]

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self.metadata.get("params", {}))

    @property
    def mask_column(self) -> str:
        return self.metadata["mask_column"]

    @property
    def delta(self) -> TokenTable:
        """Keys and the ``delta`` column."""
        return self.table.select("delta")

    @property
    def mask(self) -> TokenTable:
        """Keys and the mask column (``loss_mask`` or ``forced``)."""
        return self.table.select(self.mask_column)

    def summary(self, bins: int = 20) -> SelectionSummary:
        return summarize(self.delta, self.mask, bins=bins)

    def __repr__(self) -> str:
        m = self.metadata
        return (f"SelectionArtifact(rule={m.get('rule')!r}, params={m.get('params')}, "
                f"{len(self.table)} tokens, {len(m.get('dataset', {}).get('example_id', []))} examples, "
                f"selector={m.get('selector')!r}, theta0={m.get('theta0')!r}, thetab={m.get('thetab')!r})")

    # -- checks ------------------------------------------------------------------------
    def check(self, *, tokenizer=None, examples: Optional[Iterable[Mapping[str, Any]]] = None) -> None:
        """Raise ValueError unless ``tokenizer`` and ``examples`` (when given) match
        the ones the artifact was built with; the message says what differs."""
        if tokenizer is not None:
            stored = self.metadata.get("tokenizer") or {}
            current = tokenizer_signature(tokenizer)
            if "config_sha" not in stored:  # written before the pipeline was hashed
                current = dict(current, fingerprint=legacy_tokenizer_fingerprint(current))
            if stored.get("fingerprint") != current["fingerprint"]:
                raise ValueError("the selection artifact was made with a different tokenizer: "
                                 + _tokenizer_diff(stored, current))
        if examples is not None:
            stored = self.metadata.get("dataset") or {}
            current = dataset_signature(examples)
            diff = _dataset_diff(stored, current) if stored else "the artifact has no dataset signature"
            if diff:
                raise ValueError("the selection artifact does not match this data: " + diff)

    # -- thresholds --------------------------------------------------------------------
    def reapply(self, rule: Optional[str] = None, **params) -> "SelectionArtifact":
        """A new artifact with the mask recomputed from the stored columns.

        ``rule`` defaults to the current rule; ``params`` replace the stored ones
        when the rule changes and update them otherwise, e.g.
        ``art.reapply(threshold=0.1)`` or ``art.reapply("forced", tau=0.3)``.
        """
        same = rule is None or rule == self.rule
        rule = self.rule if rule is None else rule
        new_params = {**self.params, **params} if same else dict(params)
        base = self.table.select(*[c for c in self.table.names if c not in _MASK_COLUMNS])
        out = apply_rule(rule, base, **new_params)
        mask_col = _mask_column_of(out)
        meta = dict(self.metadata)
        meta.update(rule=rule, params=_jsonable(new_params), mask_column=mask_col,
                    tau=new_params.get("tau", 0.2 if rule == "forced" else None),
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    derived_from={"rule": self.rule, "params": self.params,
                                  "created": self.metadata.get("created")})
        return SelectionArtifact(base.with_columns({mask_col: np.asarray(out[mask_col]).astype(bool)}), meta)

    # -- per-example masks -------------------------------------------------------------
    def masks(self, examples: Iterable[Mapping[str, Any]], *, dtype: torch.dtype = torch.bool,
              check: bool = True) -> Dict[int, torch.Tensor]:
        """example_id -> mask [L] aligned with that example's ``labels`` (0 on prompt
        tokens), from the artifact's mask column. ``check`` first verifies the data
        (`check`)."""
        examples = list(examples)
        if check:
            self.check(examples=examples)
        return self.table.to_loss_masks(examples, self.mask_column, dtype=dtype)

    def loss_masks(self, examples: Iterable[Mapping[str, Any]], *, dtype: torch.dtype = torch.bool,
                   check: bool = True) -> Dict[int, torch.Tensor]:
        """Like `masks`, for loss-mask rules only (1 keeps a token in the loss); feed
        the result to `PaddedCollator`/`PackedCollator` as ``loss_masks``."""
        if self.mask_column != "loss_mask":
            raise ValueError(f"rule {self.rule!r} gives a {self.mask_column!r} mask, not a loss mask; "
                             "use masks()")
        return self.masks(examples, dtype=dtype, check=check)

    # -- io ----------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the artifact as Parquet (written to a temporary file, then renamed)."""
        import pyarrow.parquet as pq
        tbl = self.table.sorted().to_arrow()
        meta = dict(tbl.schema.metadata or {})
        meta[_META_KEY] = json.dumps(_jsonable(self.metadata), ensure_ascii=False).encode("utf-8")
        tbl = tbl.replace_schema_metadata(meta)
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(tbl, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, tokenizer=None,
             examples: Optional[Iterable[Mapping[str, Any]]] = None,
             columns: Optional[Sequence[str]] = None) -> "SelectionArtifact":
        """Read an artifact; with ``tokenizer``/``examples`` also `check` them.

        ``columns``: read only these value columns besides the keys (``example_id``,
        ``position``) and the mask, e.g. ``()`` for a process that only trains: at
        scale the Δc and signal columns are most of the file, and each rank of a
        retraining holds what it reads."""
        import pyarrow.parquet as pq
        if columns is None:
            tbl = pq.read_table(os.fspath(path))
        else:
            keep = {"example_id", "position", *_MASK_COLUMNS, *columns}
            names = pq.read_schema(os.fspath(path)).names
            tbl = pq.read_table(os.fspath(path), columns=[c for c in names if c in keep])
        raw = (tbl.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{os.fspath(path)} is not a t3s selection artifact (no 't3s' metadata)")
        meta = json.loads(raw.decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)}: unknown format {meta.get('format')!r}")
        if int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{os.fspath(path)}: artifact version {meta.get('version')} is newer than "
                             f"this library's ({VERSION})")
        art = cls(TokenTable.from_arrow(tbl.replace_schema_metadata(None)), meta)
        if examples is not None:
            examples = list(examples)
        art.check(tokenizer=tokenizer, examples=examples)
        return art


def _mask_column_of(table: TokenTable) -> str:
    for c in _MASK_COLUMNS:
        if c in table:
            return c
    raise ValueError(f"a mask table needs a 'loss_mask' or 'forced' column; columns: {table.names}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, TokenTable):
        raise ValueError("a TokenTable cannot be stored as a rule parameter; pass a rule name "
                         "(e.g. like='anchor') instead")
    return str(obj)


def save_artifact(artifact: SelectionArtifact, path: Union[str, os.PathLike]) -> None:
    """`SelectionArtifact.save` as a function."""
    artifact.save(path)


def load_artifact(path: Union[str, os.PathLike], *, tokenizer=None,
                  examples: Optional[Iterable[Mapping[str, Any]]] = None) -> SelectionArtifact:
    """`SelectionArtifact.load` as a function."""
    return SelectionArtifact.load(path, tokenizer=tokenizer, examples=examples)
