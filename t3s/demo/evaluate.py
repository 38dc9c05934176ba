"""Greedy-generation accuracy on fixed problem sets, for the demo's base build.

`Evaluator` scores a model on lists of `t3s.demo.task.Problem` with the demo's
fast batched greedy decoding (`t3s.demo.model.greedy_generate`) and a
verifier; ``scripts/build_demo_base.py`` uses it to check the base student
while building it. The demo's runs (`t3s.demo.main`) use the `t3s run`
stages instead, which evaluate with `t3s.bottleneck.training_accuracy`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

from ..verify import get_verifier
from . import model as demo_model
from . import task

__all__ = ["Evaluator", "max_new_tokens_for"]


def max_new_tokens_for(n_terms: int, style: str = "teacher") -> int:
    """An upper bound on the tokens of a response to an ``n_terms`` sum, plus room for EOS."""
    worst = task.Problem(tuple([99] * n_terms))
    return len(demo_model.encode(worst.response(style))) + 4


def _prompt_ids(tokenizer, prompt: str) -> List[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

class Evaluator:
    """Greedy-generation accuracy on fixed problem sets, checked by a verifier.

    sets: name -> list of `task.Problem`. Verifier results are cached by
    (prediction, answer), so repeated predictions cost nothing.
    """

    def __init__(self, tokenizer, sets: Mapping[str, Sequence[task.Problem]], *,
                 verifier: Union[str, Callable[[str, str], bool]] = "math", batch_size: int = 256):
        self.tokenizer = tokenizer
        self.sets = {k: list(v) for k, v in sets.items()}
        self.verify = get_verifier(verifier)
        self.batch_size = batch_size
        self._prompts = {k: [_prompt_ids(tokenizer, p.prompt) for p in v] for k, v in self.sets.items()}
        self._max_new = {k: max(max_new_tokens_for(p.n_terms) for p in v) if v else 1
                         for k, v in self.sets.items()}
        self._cache: Dict[Tuple[str, str], bool] = {}
        self.last_details: Dict[str, List[Dict[str, Any]]] = {}
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    def _check(self, pred: str, gold: str) -> bool:
        key = (pred, gold)
        if key not in self._cache:
            self._cache[key] = bool(self.verify(pred, gold))
        return self._cache[key]

    def predictions(self, model, name: str) -> List[str]:
        gen = demo_model.greedy_generate(model, self._prompts[name], max_new_tokens=self._max_new[name],
                                         eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                         batch_size=self.batch_size)
        return [self.tokenizer.decode(g, skip_special_tokens=True) for g in gen]

    def accuracy(self, model, name: str, *, return_details: bool = False):
        """Accuracy on set ``name``; with ``return_details``, also the list of
        ``{"prompt", "prediction", "answer", "correct"}``. The details of the
        latest call per set are kept in ``last_details``."""
        preds = self.predictions(model, name)
        ok = [self._check(p, prob.answer) for p, prob in zip(preds, self.sets[name])]
        acc = sum(ok) / len(ok) if ok else float("nan")
        details = [{"prompt": prob.prompt, "prediction": p, "answer": prob.answer, "correct": c}
                   for prob, p, c in zip(self.sets[name], preds, ok)]
        self.last_details[name] = details
        return (acc, details) if return_details else acc

    def __call__(self, model) -> Dict[str, float]:
        """Accuracy on every set: {set name: accuracy}."""
        return {k: self.accuracy(model, k) for k in self.sets}
