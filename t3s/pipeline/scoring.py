"""A model's final accuracy on the run's eval sets, as the eval stage and the
sensitivity sweep score it: answers generated under the run's sampling settings
(greedy by default; ``samples``, ``temperature``, ``top_p``), checked by the run's
verifier (`t3s.training_accuracy`), every prediction written to a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

from .. import dist
from . import rundir
from .console import show_progress

__all__ = ["score_on_sets"]


def score_on_sets(model, tok, data: Mapping[str, Any], sets: Sequence[Tuple[str, str]],
                  cfg: Mapping[str, Any], out_dir: Path, arm: str, engine=None
                  ) -> Dict[str, Dict[str, Any]]:
    """{set key: {"accuracy", "n", "n_correct"}} of ``model`` on every eval set (``sets``:
    (key, path), the headline one first; ``data``: key -> its problems). The predictions go
    to ``out_dir`` / `rundir.predictions_file` (``arm``; the set's key after the first), written
    by rank 0: under a launcher the generation is split across the ranks and gathered.
    ``engine``: what generates (`t3s.pipeline.generators.EvalEngine`; None: ``model``'s
    own ``generate``; with an engine ``model`` may be None).

    With ``samples`` k > 1 the accuracy is avg@k (`t3s.generation.avg_at_k`), ``n_correct``
    counts the correct answers of all n·k, and the entry also has ``se`` (avg@k's standard
    error over problems), ``pass_at_k`` and ``k``."""
    from ..bottleneck import answer_marks, training_accuracy
    from ..generation import avg_at_k
    samples = int(cfg.get("samples", 1))
    scores: Dict[str, Dict[str, Any]] = {}
    for i, (key, _) in enumerate(sets):
        acc, details = training_accuracy(
            model, tok, data[key], verifier=cfg["verifier"], subset_size=None,
            max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["eval_batch_size"],
            seed=cfg["seed"], progress=show_progress(cfg["progress"]), return_details=True,
            samples=samples, temperature=cfg.get("temperature", 0.0),
            top_p=cfg.get("top_p", 1.0), engine=engine)
        if dist.is_main():   # every rank has the gathered answers; rank 0 writes them
            with open(Path(out_dir) / rundir.predictions_file(arm, None if i == 0 else key), "w",
                      encoding="utf-8") as f:
                f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in details)
        marks = answer_marks(details)
        scores[key] = {"accuracy": acc, "n": len(details),
                       "n_correct": int(sum(sum(m) for m in marks))}
        if samples > 1:
            stats = avg_at_k(marks)
            scores[key].update(se=stats["se"], pass_at_k=stats["pass_at_k"], k=stats["k"])
    return scores
