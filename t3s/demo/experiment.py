"""The demo pipeline as a library function: pilot SFT, bottleneck, Δc, T3S retraining.

`run_experiment(DemoConfig())` runs, on the shipped base student θ0
(`t3s.demo.model.load_base`) and the rule-based teacher's traces
(`t3s.demo.task`):

1. **Exact c(θ0).** One forward-only pass over the traces with
   `t3s.target_logprobs` on the last hidden state and the tied lm_head weight.
2. **Pilot SFT** from θ0 (AdamW, constant lr, no warmup *(choice)*). Every
   step's loss is `t3s.masked_ce(..., return_stats=True)`, whose
   ``TokenStats.target_logprob`` is recorded for each trained token at no
   extra cost (online trajectory, in memory). Every ``eval_every`` steps:
   greedy training accuracy on a fixed subset of the training prompts (the
   boxed-answer verifier, `t3s.verify`), plus held-out accuracy on
   2/3-term and on 4-term sums. The parameters at the running argmin of
   training accuracy are kept in memory (one copy: only a strictly lower
   accuracy replaces it).
3. **Bottleneck** b = argmin of training accuracy over the evaluated steps
   (`t3s.bottleneck.find_bottleneck`; step 0, θ0 itself, is not a candidate).
4. **Δc = c(θb) − c(θ0)** (`t3s.selection.confidence_change`), online (c(θb)
   from each token's recorded visit nearest b, ties to the earlier step) and
   exact (a forward pass at the kept θb). ``delta_source`` picks which one
   drives the mask; the agreement of the two anchor masks is reported.
5. **Masks**: T3S anchors (Δc > 0) get ``loss_mask = 0``
   (`t3s.selection.anchor_mask`); the random baseline keeps the same number of
   tokens (`t3s.selection.random_mask(like=...)`).
6. **Retraining** from θ0 with each mask, with the pilot's data order,
   optimizer and evaluation schedule. Plain SFT *is* the pilot run (same
   data, order and settings, all tokens kept), so it is not run twice.

Step convention (shared with `t3s.store`): a recorded value's ``step`` is the
number of optimizer updates applied to the parameters that produced it (0 =
θ0); the evaluation "at step s" evaluates the parameters after s updates.
Token keys are ``(example_id, position)``, position = index of the target
token in ``input_ids`` (`t3s.data`).

Everything is deterministic given ``seed`` up to floating-point
non-determinism of the CPU kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import masked_ce, target_logprobs
from ..bottleneck import find_bottleneck
from ..data import IGNORE_INDEX, PaddedCollator, TokenTable, TraceDataset, read_traces
from ..selection import anchor_mask, confidence_change, random_mask
from ..verify import get_verifier
from . import model as demo_model
from . import task

__all__ = [
    "DemoConfig",
    "DemoResult",
    "run_experiment",
    "Evaluator",
    "exact_logprobs",
    "OnlineTrajectory",
    "train_arm",
    "batch_schedule",
    "max_new_tokens_for",
]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

@dataclass
class DemoConfig:
    """Settings of `run_experiment`. `DemoConfig.quick()` is the fast variant.

    Defaults follow the toy of DESIGN §9: 200 teacher traces, batch 64, AdamW
    at a constant lr 1e-3 (no warmup; gradients clipped at ``grad_clip``),
    90 steps, an evaluation every 5 steps.

    trace_counts: number of teacher traces per number of terms (drawn from the
        training pool; 4-term traces are the part the base has never seen). eval_* sizes: the fixed evaluation sets (training
        prompts subset; held-out 2/3-term problems, half each; held-out 4-term
        problems). delta_source: ``"online"`` (checkpoint-free) or ``"exact"``.
    """

    seed: int = 0
    trace_counts: Dict[int, int] = field(default_factory=lambda: {2: 67, 3: 67, 4: 66})
    steps: int = 90
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: Optional[float] = 1.0
    eval_every: int = 5
    eval_train_size: int = 64
    eval_heldout_size: int = 200
    eval_heldout4_size: int = 100
    verifier: str = "math"
    delta_source: str = "online"
    random_seed: int = 0
    gen_batch_size: int = 256
    n_samples: int = 8
    base_dir: Optional[str] = None
    num_threads: Optional[int] = None  # torch intra-op threads for the run (None: leave as is)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A smaller run (fewer steps and evaluations, smaller evaluation sets)."""
        kw = dict(steps=60, eval_every=10, eval_train_size=32, eval_heldout_size=100,
                  eval_heldout4_size=50)
        kw.update(overrides)
        return cls(**kw)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, batch_size and eval_every must be >= 1")
        if self.delta_source not in ("online", "exact"):
            raise ValueError(f"delta_source must be 'online' or 'exact', got {self.delta_source!r}")
        if not self.trace_counts or any(int(k) < 2 or int(v) < 0 for k, v in self.trace_counts.items()):
            raise ValueError(f"bad trace_counts {self.trace_counts!r}")
        if sum(int(v) for v in self.trace_counts.values()) < 1:
            raise ValueError("trace_counts asks for no traces")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def max_new_tokens_for(n_terms: int, style: str = "teacher") -> int:
    """An upper bound on the tokens of a response to an ``n_terms`` sum, plus room for EOS."""
    worst = task.Problem(tuple([99] * n_terms))
    return len(demo_model.encode(worst.response(style))) + 4


def batch_schedule(n_examples: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """Example indices for each step 1..steps: epochs of a seeded shuffle,
    consumed ``batch_size`` at a time (a batch may span two epochs)."""
    if n_examples < 1:
        raise ValueError("no examples")
    rng = random.Random(f"t3s-demo/order/{seed}")
    order: List[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n_examples))
            rng.shuffle(perm)
            order.extend(perm)
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


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


# --------------------------------------------------------------------------------------
# Log-probs: exact pass and online trajectory
# --------------------------------------------------------------------------------------

def _forward_hidden(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state


@torch.no_grad()
def exact_logprobs(model, examples: Sequence[Mapping[str, Any]], *, pad_token_id: int,
                   batch_size: int = 256, column: str = "c") -> TokenTable:
    """c_t = log p(y_t | y_<t, x) of every response token, forward-only
    (`t3s.target_logprobs` on the last hidden state). Returns a `TokenTable`
    with one float32 column ``column``."""
    was_training = model.training
    model.eval()
    collate = PaddedCollator(pad_token_id)
    eids, poss, vals = [], [], []
    try:
        for s in range(0, len(examples), batch_size):
            batch = collate(list(examples[s:s + batch_size]))
            h = _forward_hidden(model, batch)
            labels = batch["labels"][:, 1:]
            lp = target_logprobs(h[:, :-1], model.lm_head.weight, labels)
            rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
            eids.append(batch["example_id"][rows].numpy())
            poss.append((cols + 1).numpy().astype(np.int32))
            vals.append(lp[rows, cols].numpy().astype(np.float32))
    finally:
        if was_training:
            model.train()
    return TokenTable(np.concatenate(eids), np.concatenate(poss), {column: np.concatenate(vals)})


class OnlineTrajectory:
    """In-memory per-token log-probs recorded from the training loss.

    `record` takes one step's ``TokenStats.target_logprob`` [B, T-1] (hidden
    index i predicts ``labels[:, i + 1]``) and stores the finite values under
    their keys. `nearest` returns, per token, the visit nearest a step.
    """

    def __init__(self):
        self._steps: List[np.ndarray] = []
        self._eids: List[np.ndarray] = []
        self._pos: List[np.ndarray] = []
        self._vals: List[np.ndarray] = []

    def record(self, step: int, target_logprob: torch.Tensor, labels: torch.Tensor,
               example_ids: torch.Tensor) -> None:
        lp = target_logprob.detach()
        keep = (labels[:, 1:] != IGNORE_INDEX) & torch.isfinite(lp)
        rows, cols = torch.nonzero(keep, as_tuple=True)
        n = rows.numel()
        self._steps.append(np.full(n, int(step), np.int32))
        self._eids.append(example_ids[rows].cpu().numpy().astype(np.int64))
        self._pos.append((cols + 1).cpu().numpy().astype(np.int32))
        self._vals.append(lp[rows, cols].float().cpu().numpy())

    def __len__(self) -> int:
        return int(sum(a.size for a in self._steps))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(step, example_id, position, logprob) of every recorded visit."""
        if not self._steps:
            return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                    np.zeros(0, np.float32))
        return (np.concatenate(self._steps), np.concatenate(self._eids), np.concatenate(self._pos),
                np.concatenate(self._vals))

    def nearest(self, step: int, column: str = "c") -> TokenTable:
        """Per token, the logprob of its visit nearest ``step`` (ties: the earlier
        step), with the visit's step in column ``step``."""
        st, eid, pos, val = self.arrays()
        dist = np.abs(st.astype(np.int64) - int(step))
        order = np.lexsort((st, dist, pos, eid))
        eid_o, pos_o = eid[order], pos[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = (eid_o[1:] != eid_o[:-1]) | (pos_o[1:] != pos_o[:-1])
        sel = order[first]
        return TokenTable(eid[sel], pos[sel], {column: val[sel], "step": st[sel]}, _validated=True)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

@dataclass
class ArmResult:
    """One training run: per-step losses and per-evaluation accuracies."""

    name: str
    losses: List[float] = field(default_factory=list)            # index s-1: loss of step s
    evals: List[Dict[str, float]] = field(default_factory=list)   # {"step", set: acc, "loss"}
    wall_s: float = 0.0
    eval_s: float = 0.0


def train_arm(name: str, model0, examples: Sequence[Mapping[str, Any]], schedule: Sequence[Sequence[int]],
              config: DemoConfig, evaluator: Evaluator, *, pad_token_id: int,
              loss_masks: Optional[Mapping[int, torch.Tensor]] = None,
              trajectory: Optional[OnlineTrajectory] = None,
              on_eval: Optional[Callable[[int, Dict[str, float], Any], None]] = None,
              base_eval: Optional[Dict[str, float]] = None,
              log: Optional[Callable[[str], None]] = None) -> Tuple[Any, ArmResult]:
    """Train a copy of ``model0`` for ``len(schedule)`` steps; returns (model, `ArmResult`).

    loss_masks: example_id -> [L] bool mask aligned with labels (None: plain
    SFT). trajectory: record every step's target log-probs into it. on_eval:
    called as ``on_eval(step, accuracies, model)`` after each evaluation.
    base_eval: the step-0 accuracies (evaluated here when None).
    """
    model = copy.deepcopy(model0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                            weight_decay=config.weight_decay)
    collate = PaddedCollator(pad_token_id, loss_masks=loss_masks)
    res = ArmResult(name)
    t_start = time.perf_counter()
    if base_eval is None:
        te = time.perf_counter()
        base_eval = evaluator(model)
        res.eval_s += time.perf_counter() - te
    res.evals.append({"step": 0, **base_eval, "loss": float("nan")})
    window: List[float] = []
    for step, idx in enumerate(schedule, start=1):
        batch = collate([examples[i] for i in idx])
        h = _forward_hidden(model, batch)
        labels = batch["labels"][:, 1:]
        mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else None
        loss, stats = masked_ce(h[:, :-1], model.lm_head.weight, labels, mask, return_stats=True)
        if trajectory is not None:
            trajectory.record(step - 1, stats.target_logprob, batch["labels"], batch["example_id"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        res.losses.append(float(loss.detach()))
        window.append(res.losses[-1])
        if step % config.eval_every == 0 or step == len(schedule):
            te = time.perf_counter()
            accs = evaluator(model)
            res.eval_s += time.perf_counter() - te
            res.evals.append({"step": step, **accs, "loss": float(np.mean(window))})
            window = []
            if log is not None:
                log(f"[{name}] step {step:3d}  loss {res.evals[-1]['loss']:.3f}  "
                    + "  ".join(f"{k} {v:.2f}" for k, v in accs.items()))
            if on_eval is not None:
                on_eval(step, accs, model)
    res.wall_s = time.perf_counter() - t_start
    return model, res


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------

@dataclass
class DemoResult:
    """What `run_experiment` returns.

    metrics: JSON-able numbers (see `run_experiment`); curves: arm -> list of
    per-evaluation dicts ``{"step", "loss", "train", "heldout", "heldout4"}``;
    losses: arm -> per-step training loss; delta: Δc table (columns ``delta``,
    ``c0``, ``cb`` from the chosen source, plus ``delta_online`` /
    ``delta_exact``); masks: arm -> loss-mask `TokenTable`; examples: the
    tokenized teacher traces; problems: the traces' problems by example id;
    samples: arm -> eval set -> the first ``n_samples`` final predictions
    (``{"prompt", "prediction", "answer", "correct"}``).
    """

    metrics: Dict[str, Any]
    curves: Dict[str, List[Dict[str, float]]]
    losses: Dict[str, List[float]]
    delta: TokenTable
    masks: Dict[str, TokenTable]
    examples: List[Dict[str, Any]]
    problems: Dict[int, task.Problem]
    tokenizer: Any = None
    samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = field(default_factory=dict)


def _samples(evaluator: Evaluator, n: int) -> Dict[str, List[Dict[str, Any]]]:
    return {k: [dict(d) for d in v[:n]] for k, v in evaluator.last_details.items()}


def _mask_agreement(a: TokenTable, b: TokenTable) -> float:
    ma = np.asarray(a["loss_mask"], bool)
    mb = np.asarray(a.align(b)["loss_mask"], bool)
    return float((ma == mb).mean()) if ma.size else float("nan")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def run_experiment(config: Optional[DemoConfig] = None, *, model=None, tokenizer=None,
                   log: Optional[Callable[[str], None]] = None) -> DemoResult:
    """Run the whole demo pipeline (see the module docstring); returns a `DemoResult`.

    ``model``/``tokenizer`` default to the shipped base (`load_base`). The
    metrics hold, for ``base``, ``sft``, ``t3s`` and ``random``, the final
    accuracies ``{"train", "heldout", "heldout4"}`` (training-prompt subset,
    held-out 2/3-term sums, held-out 4-term sums), and ``bottleneck_step``,
    ``bottleneck_train_acc``, ``masked_fraction`` (share of trace tokens with
    loss_mask 0 under T3S), ``mask_agreement`` (online vs exact anchor masks:
    share of tokens with the same decision), ``delta_pearson`` (online vs exact
    Δc), ``anchor_fraction_online`` / ``anchor_fraction_exact``, the sizes of
    the data and evaluation sets, and wall times in seconds.
    """
    config = config or DemoConfig()
    config.validate()
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        return _run(config, model, tokenizer, log)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, model, tokenizer, log) -> DemoResult:
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    torch.manual_seed(config.seed)
    if model is None or tokenizer is None:
        model, tokenizer = demo_model.load_base(config.base_dir or demo_model.BASE_DIR)
    model.eval()
    pad_id = int(tokenizer.pad_token_id)

    # -- data ---------------------------------------------------------------------------
    problems = task.make_mixed_problems({int(k): int(v) for k, v in config.trace_counts.items()},
                                        "train", seed=config.seed)
    records = task.to_records(problems, "teacher")
    dataset = TraceDataset.from_records(read_traces(records), tokenizer)
    examples = list(dataset)
    by_id = {int(r["id"]): p for r, p in zip(records, problems)}
    train_eval_ids = sorted(random.Random(f"t3s-demo/train-eval/{config.seed}").sample(
        range(len(problems)), min(config.eval_train_size, len(problems))))
    half = config.eval_heldout_size // 2
    heldout = (task.make_problems(half, 2, "held_out", seed=config.seed)
               + task.make_problems(config.eval_heldout_size - half, 3, "held_out", seed=config.seed))
    heldout4 = task.make_problems(config.eval_heldout4_size, 4, "held_out", seed=config.seed)
    sets = {"train": [problems[i] for i in train_eval_ids], "heldout": heldout, "heldout4": heldout4}
    evaluator = Evaluator(tokenizer, {k: v for k, v in sets.items() if v}, verifier=config.verifier,
                          batch_size=config.gen_batch_size)
    schedule = batch_schedule(len(examples), config.steps, config.batch_size, config.seed)
    n_tokens = dataset.num_response_tokens()
    say(f"{len(examples)} teacher traces ({n_tokens} trace tokens), {config.steps} steps of "
        f"{config.batch_size}; eval sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))

    # -- c(θ0), base accuracy ---------------------------------------------------------------
    t = time.perf_counter()
    c0 = exact_logprobs(model, examples, pad_token_id=pad_id)
    t_c0 = time.perf_counter() - t
    t = time.perf_counter()
    base_eval = evaluator(model)
    t_base_eval = time.perf_counter() - t
    say("[base] " + "  ".join(f"{k} {v:.2f}" for k, v in base_eval.items()))
    samples = {"base": _samples(evaluator, config.n_samples)}

    # -- pilot (= plain SFT) -------------------------------------------------------------------
    traj = OnlineTrajectory()
    kept: Dict[str, Any] = {"step": None, "acc": math.inf, "state": None}

    def keep_argmin(step: int, accs: Dict[str, float], m) -> None:
        acc = accs.get("train", math.nan)
        if acc < kept["acc"]:  # strict: ties stay with the earliest step, as find_bottleneck
            kept.update(step=step, acc=acc,
                        state={k: v.detach().clone() for k, v in m.state_dict().items()})

    _, pilot = train_arm("sft", model, examples, schedule, config, evaluator, pad_token_id=pad_id,
                         trajectory=traj, on_eval=keep_argmin, base_eval=base_eval, log=say)
    samples["sft"] = _samples(evaluator, config.n_samples)
    history = {e["step"]: e["train"] for e in pilot.evals if e["step"] > 0}
    b = find_bottleneck(history)
    if b != kept["step"]:  # internal invariant: the kept state is the argmin
        raise AssertionError(f"kept checkpoint {kept['step']} is not the bottleneck {b}")

    # -- Δc: online and exact -------------------------------------------------------------------
    t = time.perf_counter()
    # a visit recorded at step s used the parameters after s updates, so θb's
    # visits are those recorded at step b
    cb_online = traj.nearest(b, column="cb")
    d_online = confidence_change(c0, cb_online.select("cb"), column="c", column_b="cb")
    theta_b = copy.deepcopy(model)
    theta_b.load_state_dict(kept["state"])
    cb_exact = exact_logprobs(theta_b, examples, pad_token_id=pad_id, column="cb")
    del theta_b
    d_exact = confidence_change(c0, cb_exact, column="c", column_b="cb")
    m_online = anchor_mask(d_online)
    m_exact = anchor_mask(d_exact)
    agreement = _mask_agreement(m_online, m_exact)
    chosen = d_online if config.delta_source == "online" else d_exact
    t3s_mask = m_online if config.delta_source == "online" else m_exact
    rand_mask = random_mask(t3s_mask, like=t3s_mask, seed=config.random_seed)
    dist = np.abs(d_online.align(cb_online)["step"].astype(np.int64) - b)
    delta = chosen.with_columns(delta_online=d_online["delta"],
                                delta_exact=d_online.align(d_exact)["delta"])
    t_select = time.perf_counter() - t
    masked_fraction = float(1.0 - np.asarray(t3s_mask["loss_mask"]).mean())
    say(f"bottleneck step {b} (train acc {kept['acc']:.2f}); anchors {100 * masked_fraction:.1f}% of "
        f"trace tokens masked; online-vs-exact mask agreement {agreement:.3f}")

    # -- retraining from θ0 -------------------------------------------------------------------
    arms = {"sft": pilot}
    masks = {"t3s": t3s_mask, "random": rand_mask}
    for name in ("t3s", "random"):
        lm = masks[name].to_loss_masks(examples)
        _, arms[name] = train_arm(name, model, examples, schedule, config, evaluator,
                                  pad_token_id=pad_id, loss_masks=lm, base_eval=base_eval, log=say)
        samples[name] = _samples(evaluator, config.n_samples)

    # -- results ------------------------------------------------------------------------------
    def final(arm: ArmResult) -> Dict[str, float]:
        last = arm.evals[-1]
        return {k: float(last[k]) for k in evaluator.sets}

    def worst(arm: ArmResult, key: str) -> Dict[str, float]:
        ev = [e for e in arm.evals if e["step"] > 0]
        e = min(ev, key=lambda e: e[key])
        return {"step": int(e["step"]), "acc": float(e[key])}

    wall = time.perf_counter() - t0
    metrics: Dict[str, Any] = {
        "base": {k: float(v) for k, v in base_eval.items()},
        "sft": final(pilot),
        "t3s": final(arms["t3s"]),
        "random": final(arms["random"]),
        "min_train": {k: worst(a, "train") for k, a in arms.items()},
        "min_heldout": {k: worst(a, "heldout") for k, a in arms.items()},
        "bottleneck_step": int(b),
        "bottleneck_train_acc": float(kept["acc"]),
        "masked_fraction": masked_fraction,
        "anchor_fraction_online": float(1.0 - np.asarray(m_online["loss_mask"]).mean()),
        "anchor_fraction_exact": float(1.0 - np.asarray(m_exact["loss_mask"]).mean()),
        "mask_agreement": agreement,
        "delta_pearson": _pearson(np.asarray(d_online["delta"], np.float64),
                                  np.asarray(d_online.align(d_exact)["delta"], np.float64)),
        "online_visit_distance_mean": float(dist.mean()) if dist.size else float("nan"),
        "online_visit_distance_max": int(dist.max()) if dist.size else 0,
        "delta_source": config.delta_source,
        "n_traces": len(examples),
        "n_trace_tokens": int(n_tokens),
        "eval_sizes": {k: len(v) for k, v in evaluator.sets.items()},
        "time_s": {"total": wall, "c0": t_c0, "base_eval": t_base_eval, "select": t_select,
                   **{f"arm_{k}": a.wall_s for k, a in arms.items()},
                   **{f"arm_{k}_eval": a.eval_s for k, a in arms.items()}},
        "config": dataclasses.asdict(config),
    }
    curves = {k: [dict(e) for e in a.evals] for k, a in arms.items()}
    say(f"done in {wall:.0f}s")
    return DemoResult(metrics=metrics, curves=curves, losses={k: list(a.losses) for k, a in arms.items()},
                      delta=delta, masks={"t3s": t3s_mask, "random": rand_mask,
                                          "t3s_exact": m_exact, "t3s_online": m_online},
                      examples=examples, problems=by_id, tokenizer=tokenizer, samples=samples)
