"""Traces, tokenization, token keys and batching.

Legend::

    L   tokens in one example          N   tokens in a packed batch
    B   examples in a batch            T   rows of a `TokenTable`

The token key
-------------
Every trace token is named by a key ``(example_id: int64, position: int32)``:
``position`` is the index in the example's ``input_ids`` of the *target* token
y_t, so a causal LM predicts ``input_ids[position]`` from the hidden state at
``position - 1``. ``labels`` follow the Hugging Face convention (aligned with
``input_ids``, the model shifts), so the keyed tokens of an example are exactly
the positions where ``labels != -100``: the response (trace) tokens.

Per-token values (confidences, Δc, masks) live in a `TokenTable`: key columns
plus named value columns. `TokenTable.to_loss_masks` turns one column back into
per-example tensors aligned with ``labels``.

Keys of a batch: `token_keys` maps the targets of any batch layout (padded,
left-padded, packed) to keys, with the index of the hidden state that predicts
each; use it for values computed from a batch. `packed_keys` maps every
position of a `PackedCollator` batch, targets or not. Both share one parser,
`batch_positions`.

Modules, in the order data flows:

- `t3s.data.traces`: JSONL records -> `TraceRecord` -> tokenized example dicts
  (`read_traces`, `tokenize_trace`, `TraceDataset`);
- `t3s.data.table`: `TokenTable`, the one per-token representation;
- `t3s.data.keys`: token keys of examples and batches;
- `t3s.data.collate`: `PaddedCollator`, `PackedCollator`, `pack_indices`.
"""

from .collate import PackedCollator, PaddedCollator, pack_indices, pad_token_id
from .keys import (batch_positions, dataset_keys, example_keys, packed_keys, packed_token_table,
                   token_keys)
from .table import IGNORE_INDEX, TokenTable, response_positions
from .traces import (TRUNCATION_MODES, TraceDataset, TraceRecord, example_id_from, read_traces,
                     tokenize_trace)

__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "TokenTable",
    "TraceRecord",
    "TraceDataset",
    "read_traces",
    "tokenize_trace",
    "example_id_from",
    "example_keys",
    "dataset_keys",
    "response_positions",
    "PaddedCollator",
    "PackedCollator",
    "pack_indices",
    "pad_token_id",
    "batch_positions",
    "token_keys",
    "packed_keys",
    "packed_token_table",
]
