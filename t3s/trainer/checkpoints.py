"""Which step a Trainer checkpoint resumes at.

`checkpoint_step` reads a checkpoint's ``trainer_state.json`` (the Trainer
writes it into every ``checkpoint-N/``), so that the trajectory store can drop
what a killed run recorded past it before the resumed run records it again.
"""

from __future__ import annotations

import json
import os
from typing import Union

__all__ = ["checkpoint_step", "TRAINER_STATE_FILE"]

#: the file ``transformers.Trainer`` writes into every checkpoint
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_step(checkpoint: Union[bool, str, os.PathLike], output_dir: str) -> int:
    """The ``global_step`` a ``Trainer.train(resume_from_checkpoint=checkpoint)`` starts at.

    checkpoint: a checkpoint directory, or True for the last one in ``output_dir``
    (as the Trainer takes it). Raises ValueError when there is none or its state
    file is missing or unreadable.
    """
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint
        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise ValueError(f"resume_from_checkpoint=True, but {output_dir} holds no checkpoint")
        checkpoint = found
    path = os.path.join(os.fspath(checkpoint), TRAINER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume from {checkpoint}: {path} is missing or unreadable "
                         f"({type(exc).__name__}: {exc})") from None
