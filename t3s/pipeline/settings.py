"""The settings of a T3S run: the options, YAML files, and the run's identity.

`OPTIONS` lists every setting (a YAML key and a ``--flag``); `normalize_config`
turns values from flags, a YAML file (`load_yaml`) or a stored ``config.json``
into the full, checked settings. `identity` is the part of the settings that
names a run: the hashed options, with each path replaced by the fingerprint of
what it names (`fingerprint_path`: data files by content; model and tokenizer
directories by their files' names and sizes plus the content of those under
64 MiB), so a changed data file counts as a changed setting.

Size: over 550 lines because each setting's checks (`normalize_config`, the rule,
baseline and arm parameters) sit next to `OPTIONS`, which names them; elsewhere they
would have to import this module's private helpers back.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .._util import one_line, sha256_file

__all__ = [
    "UsageError",
    "params_over_defaults",
    "Option",
    "OPTIONS",
    "DEFAULTS",
    "HASHED_ONLY_OFF_DEFAULT",
    "RULE_ALIASES",
    "BASELINE_OBJECTIVES",
    "baseline_loss_options",
    "mask_rule",
    "PATH_KEYS",
    "canonical_rule",
    "check_keys",
    "settings_from",
    "normalize_config",
    "rule_params",
    "arm_params",
    "check_rule_params",
    "fingerprint_path",
    "path_fingerprints",
    "identity",
    "describe_change",
    "load_yaml",
    "dump_yaml",
]

_HASH_CONTENT_LIMIT = 64 << 20


class UsageError(ValueError):
    """Bad settings or inputs: the CLI prints the message on one line and exits with 2."""


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One setting: a YAML key ``name`` and a flag ``--name-with-dashes``.

    kind: "str", "path", "int", "float", "bool", "choice", "params" (a mapping,
    given on the command line as repeated ``--flag key=value``).
    hashed: part of the run's identity (a changed value makes a run directory
    "from a different config"); the others (device, progress, ...) may change
    between invocations.
    """

    name: str
    kind: str
    default: Any
    help: str
    hashed: bool = True
    choices: Tuple[str, ...] = ()
    metavar: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


RULE_ALIASES = {"inverse": "inverse_anchor", "prob": "prob_threshold"}
# Baselines that are an objective rather than a mask: (the mask rule they train with, the
# `t3s.patch` loss options). dft: every trace token, each loss times stopgrad p(y_t).
BASELINE_OBJECTIVES = {"dft": ("sft", {"token_scaling": True})}

OPTIONS: Tuple[Option, ...] = (
    # model and data
    Option("model", "path", None, "θ0: a local Hugging Face model directory", metavar="DIR"),
    Option("tokenizer", "path", None, "tokenizer directory (default: the model's)", metavar="DIR"),
    Option("trust_remote_code", "bool", False,
           "allow the model's own Python code (config.json 'auto_map'); off by default",
           hashed=False),
    Option("train", "path", None, "training traces, JSONL (prompt/response/answer or messages)",
           metavar="JSONL"),
    Option("heldout", "path", None, "held-out problems, JSONL: accuracy during training",
           metavar="JSONL"),
    Option("test", "path", None, "test set for `t3s eval`, JSONL (default: --heldout)",
           metavar="JSONL"),
    Option("extra_test", "path", None,
           "a further set `t3s eval` scores and reports next to the test set, JSONL "
           "(e.g. harder problems)", metavar="JSONL"),
    Option("max_length", "int", None, "longest example in tokens (default: no limit)"),
    Option("truncation", "choice", "error", "examples longer than max_length",
           choices=("error", "truncate", "drop")),
    # hardware
    Option("device", "choice", "auto", "where to train and evaluate", hashed=False,
           choices=("auto", "cpu", "cuda")),
    Option("dtype", "choice", "fp32", "dtype the model is loaded and trained in",
           choices=("fp32", "bf16", "fp16")),
    Option("threads", "int", None, "CPU threads for torch (default: torch's choice)",
           hashed=False),
    # training (pilot and retraining share them)
    Option("seed", "int", 0, "seed of the data order, initialisation and subsets"),
    Option("batch_size", "int", 8, "examples per micro-batch"),
    Option("grad_accum", "int", 1, "micro-batches per optimizer step"),
    Option("lr", "float", 1e-5, "learning rate"),
    Option("steps", "int", 50, "optimizer steps of the pilot and of each retraining"),
    Option("lr_scheduler", "str", "constant", "Hugging Face lr_scheduler_type"),
    Option("warmup_steps", "int", 0, "warmup steps"),
    Option("weight_decay", "float", 0.0, "AdamW weight decay"),
    # accuracy
    Option("eval_steps", "int", 5, "evaluate training / held-out accuracy every N steps"),
    Option("eval_subset", "int", 64,
           "training / held-out prompts per evaluation during training (0: all)"),
    Option("max_new_tokens", "int", 512, "tokens generated per answer"),
    Option("verifier", "choice", "math", "answer checker (t3s.verify)", choices=("math", "exact")),
    # the eval stage's final scoring (and the sensitivity sweep's); the accuracy curve
    # during training stays greedy (`t3s.pipeline.training.accuracy_callback`)
    Option("samples", "int", 1,
           "answers sampled per eval problem: the eval accuracy is then avg@k over them, "
           "with its standard error and pass@k (needs --temperature > 0)"),
    Option("temperature", "float", 0.0, "eval sampling temperature (0: greedy decoding)"),
    Option("top_p", "float", 1.0,
           "eval nucleus sampling: top-p in (0, 1] (with --temperature > 0)"),
    Option("eval_batch_size", "int", 8, "prompts per generation / profiling batch", hashed=False),
    # what generates the answers (`t3s.pipeline.generators`)
    Option("engine", "choice", "hf",
           "what generates answers for training accuracy and eval: hf (the model's own "
           "generate) or vllm (vLLM in this process, weights synced in memory; the [vllm] "
           "extra, docs/generation.md)", choices=("hf", "vllm")),
    Option("vllm_server", "str", None,
           "a vLLM server's address: the eval and sensitivity stages generate with it, "
           "reloading each model from its directory (start it as docs/generation.md says)",
           hashed=False, metavar="URL"),
    Option("vllm_gpu_memory", "float", 0.3,
           "the share of accelerator memory the vllm engine may take while it generates",
           hashed=False),
    # resuming (not hashed: a resumed run equals an uninterrupted one)
    Option("checkpoint_steps", "int", None,
           "save a resumable checkpoint (model, optimizer, scheduler, RNG) every N steps of "
           "each training stage (default: eval_steps)", hashed=False),
    # selection
    Option("delta", "choice", "online",
           "Δc source: online (from the pilot's trajectory) or exact (forward passes)",
           choices=("online", "exact")),
    Option("agreement", "bool", True,
           "also compute the exact Δc to report online-vs-exact mask agreement"),
    Option("rule", "str", "anchor",
           "selection rule (a name in t3s.selection.RULES, 'inverse', 'prob'; 'none' = plain SFT)"),
    Option("rule_params", "params", None, "a rule parameter, KEY=VALUE (repeatable)",
           metavar="KEY=VALUE"),
    Option("baseline", "str", "none",
           "baseline rule retrained for comparison ('random' keeps the rule's budget; 'dft': "
           "every token, its loss times its stop-gradient probability; 'none')"),
    Option("baseline_params", "params", None, "a baseline parameter, KEY=VALUE (repeatable)",
           metavar="KEY=VALUE"),
    Option("arms", "list", None,
           "more arms retrained from θ0 like the baseline, comma-separated (rules of "
           "t3s.selection.RULES or 'dft'), each with its rule's default parameters, except that "
           "random, rho1, static and kl keep as many tokens as the rule's mask (static and kl "
           "drop the most confident at θ0 / the largest KL(θb‖θ0))", metavar="A,B,..."),
    # diffusion LMs (`t3s.pipeline.diffusion`): `model` is then the AR selector
    Option("objective", "choice", "ar",
           "what train / baseline / eval train and score: ar (the model itself) or diffusion "
           "(--diffusion-model with the masked-diffusion loss; the pilot and selection run "
           "on --model, the AR selector)", choices=("ar", "diffusion")),
    Option("diffusion_model", "path", None,
           "θ0 of the diffusion LM: a local bidirectional masked-LM directory sharing the "
           "selector's tokenizer (objective: diffusion)", metavar="DIR"),
    Option("sft_model", "path", None,
           "a plain diffusion-SFT model `t3s eval` scores as arm 'sft' (objective diffusion; "
           "e.g. train/model of a run with rule none)", metavar="DIR"),
    Option("forced_weight", "choice", "inv_t",
           "loss weight of forced tokens: inv_t (1/t like every masked token) or unit (1)",
           choices=("inv_t", "unit")),
    Option("mask_token_id", "int", None,
           "the diffusion model's mask token (default: its tokenizer's, else its config's)"),
    Option("block_length", "int", 32, "diffusion generation: block length (semi-autoregressive)"),
    Option("diffusion_steps", "int", None,
           "diffusion generation: unmasking steps (default: one per generated position)"),
    # diagnostics (`t3s analyze`); none of them changes another stage's results
    Option("analyze", "bool", False,
           "also run the analyze stage (the paper's diagnostics) under `t3s run`; `t3s analyze` "
           "runs it in any case", hashed=False),
    Option("keep_checkpoints", "bool", False,
           "keep the checkpoint of every evaluated step of the pilot and the retrainings (the "
           "gradient diagnostics of `t3s analyze` use them; default: only θb); applies when "
           "those stages next run", hashed=False),
    Option("analysis_params", "params", None,
           "an analysis parameter, KEY=VALUE (repeatable): examples, batch_size, last_layers, "
           "max_parameters, groups, transfer_lr, transfer_steps, transfer_at, seed "
           "(t3s.pipeline.analysis)",
           hashed=False, metavar="KEY=VALUE"),
    # the bottleneck-sensitivity sweep (`t3s sensitivity`): extra retrainings beside the run's
    Option("sensitivity", "bool", False,
           "also run the sensitivity stage (T3S retrained from the masks at other bottleneck "
           "choices) under `t3s run`; `t3s sensitivity` runs it in any case", hashed=False),
    Option("sensitivity_params", "params", None,
           "a sensitivity parameter, KEY=VALUE (repeatable): offsets, n_random, radius, "
           "choices, seed (t3s.pipeline.sensitivity)", hashed=False, metavar="KEY=VALUE"),
    # the directory
    Option("run_dir", "path", "runs/t3s", "the run directory", hashed=False, metavar="DIR"),
    # None: on when stderr is a terminal (`t3s.pipeline.console.show_progress`); it is
    # decided per invocation, so a run directory never stores it for the next one
    Option("progress", "bool", None,
           "progress bars (default: on when stderr is a terminal, off when it is redirected)",
           hashed=False),
)

_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS: Dict[str, Any] = {o.name: o.default for o in OPTIONS}
#: settings added after run directories existed: at their defaults they stay out of a
#: stage's hash, so a run finished before them stays current (no eval or sweep redone)
HASHED_ONLY_OFF_DEFAULT = ("samples", "temperature", "top_p", "engine")
PATH_KEYS = ("model", "tokenizer", "train", "heldout", "test", "extra_test", "diffusion_model",
             "sft_model")


def canonical_rule(name: Optional[str], what: str = "rule") -> Optional[str]:
    """A rule name as `t3s.selection.RULES` spells it; None for 'none'."""
    from ..selection import RULES
    if name is None:
        return None
    name = str(name).strip()
    if name.lower() in ("none", "null", "off", ""):
        return None
    name = RULE_ALIASES.get(name, name)
    if name not in RULES:
        known = sorted(set(RULES) | set(RULE_ALIASES) | {"none"})
        raise UsageError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return name


def _coerce(opt: Option, value: Any, where: str) -> Any:
    if value is None:
        return None
    k = opt.kind
    try:
        if k in ("str", "path"):
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError
            return os.fspath(value)
        if k == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if k == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if k == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
                return False
            raise TypeError
        if k == "choice":
            value = str(value)
            if value not in opt.choices:
                raise UsageError(f"{where}{opt.name} must be one of {', '.join(opt.choices)}, "
                                 f"got {value!r}")
            return value
        if k == "list":   # a comma-separated string or a list of strings
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
                raise TypeError
            return [x.strip() for x in items if x.strip()]
        if k == "params":
            if not isinstance(value, Mapping):
                raise TypeError
            return {str(a): b for a, b in value.items()}
    except (TypeError, ValueError):
        raise UsageError(f"{where}{opt.name} must be {_KIND_WORDS[k]}, got {value!r}") from None
    raise AssertionError(k)


_KIND_WORDS = {"str": "a string", "path": "a path", "int": "an integer", "float": "a number",
               "bool": "true or false", "choice": "one of the choices",
               "params": "a mapping of parameter names to values",
               "list": "a comma-separated string or a list of names"}


def check_keys(mapping: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Keys normalised (dashes to underscores); unknown keys raise UsageError."""
    import difflib
    out, unknown = {}, []
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        out[name] = value
    if unknown:
        raise UsageError(f"{where}unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; known: {', '.join(sorted(_BY_NAME))}")
    return out


def settings_from(values: Mapping[str, Any], *, base_dir: Optional[str] = None,
                  where: str = "") -> Dict[str, Any]:
    """The settings in ``values`` (a YAML mapping, flags or a stored config), typed and
    checked, paths made absolute (relative ones against ``base_dir``, default the
    working directory). Unknown keys and bad values raise UsageError; ``where``
    prefixes the messages (e.g. the YAML file's name)."""
    out = {}
    for name, value in check_keys(values, where).items():
        value = _coerce(_BY_NAME[name], value, where)
        if name in PATH_KEYS + ("run_dir",) and value is not None:
            value = os.path.expanduser(value)
            if not os.path.isabs(value):
                value = os.path.join(base_dir or os.getcwd(), value)
            value = os.path.normpath(value)
        out[name] = value
    return out


def normalize_config(values: Mapping[str, Any], *, base_dir: Optional[str] = None,
                     where: str = "") -> Dict[str, Any]:
    """Every setting: `DEFAULTS` updated with `settings_from` ``values``, with the
    checks that involve several settings; rule names made canonical.

    Raises UsageError on a bad value.
    """
    cfg = dict(DEFAULTS)
    cfg.update(settings_from(values, base_dir=base_dir, where=where))
    for name in ("run_dir",):
        if cfg[name] is not None and not os.path.isabs(cfg[name]):
            cfg[name] = os.path.normpath(os.path.join(base_dir or os.getcwd(), cfg[name]))
    for name in ("batch_size", "grad_accum", "steps", "eval_steps", "max_new_tokens",
                 "eval_batch_size"):
        if cfg[name] < 1:
            raise UsageError(f"{where}{name} must be >= 1, got {cfg[name]}")
    if cfg["checkpoint_steps"] is not None and cfg["checkpoint_steps"] < 1:
        raise UsageError(f"{where}checkpoint_steps must be >= 1, got {cfg['checkpoint_steps']}")
    for name in ("eval_subset", "warmup_steps"):
        if cfg[name] < 0:
            raise UsageError(f"{where}{name} must be >= 0, got {cfg[name]}")
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise UsageError(f"{where}threads must be >= 1, got {cfg['threads']}")
    if cfg["max_length"] is not None and cfg["max_length"] < 2:
        raise UsageError(f"{where}max_length must be >= 2, got {cfg['max_length']}")
    if not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise UsageError(f"{where}lr must be a positive number, got {cfg['lr']}")
    if cfg["weight_decay"] < 0:
        raise UsageError(f"{where}weight_decay must be >= 0, got {cfg['weight_decay']}")
    cfg["rule"] = canonical_rule(cfg["rule"]) or "none"
    baseline = str(cfg["baseline"]).strip().lower() if cfg["baseline"] is not None else None
    cfg["baseline"] = (baseline if baseline in BASELINE_OBJECTIVES
                       else canonical_rule(cfg["baseline"], "baseline rule") or "none")
    if cfg["baseline"] == "forced":
        raise UsageError(f"{where}baseline 'forced' marks tokens for diffusion-LM training, not a "
                         "loss mask; choose a loss-mask rule")
    _check_diffusion(cfg, where)
    _check_sampling(cfg, where)
    cfg["arms"] = _check_arms(cfg, where)
    cfg["rule_params"] = dict(cfg["rule_params"] or {})
    cfg["baseline_params"] = dict(cfg["baseline_params"] or {})
    cfg["analysis_params"] = dict(cfg["analysis_params"] or {})
    cfg["sensitivity_params"] = dict(cfg["sensitivity_params"] or {})
    return cfg


def _check_diffusion(cfg: Dict[str, Any], where: str) -> None:
    """The settings of ``objective: diffusion`` (`t3s.pipeline.diffusion`)."""
    if cfg["block_length"] < 1:
        raise UsageError(f"{where}block_length must be >= 1, got {cfg['block_length']}")
    if cfg["diffusion_steps"] is not None and cfg["diffusion_steps"] < 1:
        raise UsageError(f"{where}diffusion_steps must be >= 1, got {cfg['diffusion_steps']}")
    if cfg["objective"] != "diffusion":
        return
    if cfg["rule"] not in ("forced", "none"):
        raise UsageError(f"{where}objective diffusion trains with rule 'forced' (T3S's forced set "
                         f"from the AR selector) or 'none' (plain diffusion SFT), got {cfg['rule']!r}")
    if cfg["baseline"] not in ("random", "sft", "none"):
        raise UsageError(f"{where}objective diffusion takes baseline 'random' (a random forced set "
                         "of the same size), 'sft' (plain diffusion SFT) or 'none', got "
                         f"{cfg['baseline']!r}")
    if cfg["baseline"] == "random" and cfg["rule"] != "forced":
        raise UsageError(f"{where}baseline 'random' draws as many forced tokens as rule 'forced' "
                         "has; set rule: forced")


def _check_sampling(cfg: Mapping[str, Any], where: str) -> None:
    """``samples``, ``temperature`` and ``top_p``: valid `t3s.generation.SamplingParams`,
    top_p only with sampling, greedy scoring and the hf engine alone with objective
    diffusion; ``vllm_server`` an http(s) address, ``vllm_gpu_memory`` in (0, 1]."""
    from ..generation import SamplingParams
    if cfg["samples"] > 1 and cfg["temperature"] == 0:
        raise UsageError(f"{where}samples {cfg['samples']} with temperature 0: greedy decoding "
                         f"gives {cfg['samples']} identical answers; set --temperature > 0")
    try:
        SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                       top_p=cfg["top_p"], samples=cfg["samples"])
    except ValueError as e:
        raise UsageError(f"{where}{one_line(e)}") from None
    if cfg["temperature"] == 0 and cfg["top_p"] != 1:
        raise UsageError(f"{where}top_p {cfg['top_p']} applies to sampling, but temperature 0 "
                         "is greedy decoding; set --temperature > 0 or leave top_p at 1")
    if cfg["objective"] == "diffusion" and (cfg["engine"] != "hf" or cfg["vllm_server"]):
        raise UsageError(f"{where}objective diffusion generates by iterative unmasking, which no "
                         "generation engine implements; leave engine at hf and vllm_server unset")
    server = cfg["vllm_server"]
    if server is not None and not str(server).startswith(("http://", "https://")):
        raise UsageError(f"{where}vllm_server must be an http(s) address, got {server!r}")
    if not 0 < cfg["vllm_gpu_memory"] <= 1:
        raise UsageError(f"{where}vllm_gpu_memory must be in (0, 1], got {cfg['vllm_gpu_memory']}")
    if cfg["objective"] == "diffusion" and cfg["temperature"] != 0:
        raise UsageError(f"{where}objective diffusion scores greedily (diffusion generation); "
                         "samples, temperature and top_p apply to autoregressive models")


def _check_arms(cfg: Mapping[str, Any], where: str) -> list:
    """``arms`` made canonical, each refused unless it is a new loss-mask arm."""
    from ..selection import RULES
    out = []
    for given in cfg["arms"] or ():
        low = given.lower()
        name = low if low in BASELINE_OBJECTIVES else RULE_ALIASES.get(given, given)
        if low in ("none", "null", "off"):
            raise UsageError(f"{where}arm {given!r} is no arm; leave it out of arms")
        if name not in RULES and name not in BASELINE_OBJECTIVES:
            known = sorted((set(RULES) | set(RULE_ALIASES) | set(BASELINE_OBJECTIVES))
                           - {"forced", "sft"})
            raise UsageError(f"{where}unknown arm {given!r}; known: {', '.join(known)}")
        if name == "sft":
            raise UsageError(f"{where}arm 'sft' is plain SFT, which the pilot already is (the "
                             "report's 'sft' row); leave it out of arms")
        if name == "forced":
            raise UsageError(f"{where}arm 'forced' marks tokens for diffusion-LM training, not a "
                             "loss mask; choose loss-mask rules")
        if name in out:
            raise UsageError(f"{where}arm {name!r} is given twice in arms")
        if name == cfg["baseline"]:
            raise UsageError(f"{where}arm {name!r} is the baseline, which the baseline stage "
                             "already trains; leave it out of arms")
        if name == cfg["rule"]:
            raise UsageError(f"{where}arm {name!r} is the rule, which the train stage already "
                             "trains (T3S); leave it out of arms")
        out.append(name)
    if out and cfg["objective"] == "diffusion":
        raise UsageError(f"{where}arms are not supported with objective diffusion (only the "
                         "baseline stage trains a comparison there)")
    if out and cfg["rule"] == "forced":
        raise UsageError(f"{where}arms keep as many tokens as the rule's loss mask, but rule "
                         "'forced' is not a loss mask; choose a loss-mask rule")
    return out


def params_over_defaults(given: Optional[Mapping[str, Any]], defaults: Mapping[str, Any],
                         what: str) -> Dict[str, Any]:
    """A stage's ``*_params`` setting over its ``defaults``; UsageError naming the unknown
    keys (``what``: "analysis", "sensitivity") and the known ones."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(f"unknown {what} parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(defaults)}")
    return {**defaults, **given}


def mask_rule(rule: str) -> str:
    """The mask rule a baseline trains with (`BASELINE_OBJECTIVES`; else the rule itself)."""
    return BASELINE_OBJECTIVES[rule][0] if rule in BASELINE_OBJECTIVES else rule


def baseline_loss_options(rule: str) -> Dict[str, Any]:
    """The `t3s.patch` loss options of a baseline ({} for a mask rule)."""
    return dict(BASELINE_OBJECTIVES[rule][1]) if rule in BASELINE_OBJECTIVES else {}


def rule_params(cfg: Mapping[str, Any], which: str = "rule",
                budget: Optional[int] = None) -> Dict[str, Any]:
    """The parameters `t3s.selection.apply_rule` gets for ``cfg[which]``.

    ``random`` draws with ``seed`` = the run's seed, and keeps by default as
    many tokens as the main rule keeps (``budget``) *(choice)*. A rule name in
    ``like=`` is made canonical (`canonical_rule`).
    """
    rule = cfg[which]
    params = dict(cfg["rule_params"] if which == "rule" else cfg["baseline_params"])
    if rule == "random":
        params.setdefault("seed", cfg["seed"])
    if rule in _BUDGET_PARAMS and not any(k in params for k in _BUDGET_PARAMS[rule]):
        if budget is not None:
            params["budget"] = int(budget)
        elif which == "rule" and rule == "random":
            params["keep_fraction"] = 0.5
    if isinstance(params.get("like"), str):
        params["like"] = canonical_rule(params["like"], "rule in like=")
    return params


#: the rules that take a token budget, and the parameters that set one instead
_BUDGET_PARAMS = {"random": ("keep_fraction", "budget", "like"), "kl": ("fraction", "budget")}


def arm_params(cfg: Mapping[str, Any], arm: str, kept: int, n_tokens: int) -> Dict[str, Any]:
    """The parameters `t3s.selection.apply_rule` gets for ``arm`` (a name of ``arms``):
    its rule's defaults, except the budget of the budgeted rules.

    *(choice)* random, rho1, static and kl keep exactly ``kept`` of the ``n_tokens``
    trace tokens, as many as the rule's mask keeps, so that they differ from T3S only in
    which tokens they leave out: rho1 keeps the top kept/n_tokens by excess loss, static
    drops the 1 − kept/n_tokens most confident at θ0, kl drops the n_tokens − kept with
    the largest KL(θb‖θ0); random draws with the run's seed.
    """
    share = kept / n_tokens if n_tokens else 1.0
    return {"random": {"seed": cfg["seed"], "budget": int(kept)}, "kl": {"budget": int(kept)},
            "rho1": {"keep_fraction": share},
            "static": {"fraction": 1.0 - share, "which": "top"}}.get(arm, {})


def check_rule_params(cfg: Mapping[str, Any]) -> None:
    """Apply the rule, the baseline and every arm to a small made-up table, so that bad
    parameters fail before hours of training rather than after."""
    import numpy as np

    from ..data import TokenTable
    from ..selection import apply_rule
    n = 8
    t = TokenTable(np.zeros(n, np.int64), np.arange(1, n + 1, dtype=np.int32),
                   delta=np.linspace(-1, 1, n, dtype=np.float32),
                   c0=np.linspace(-3, -0.1, n, dtype=np.float32),
                   cb=np.linspace(-2, -0.2, n, dtype=np.float32),
                   loss_theta=np.linspace(0.1, 3, n, dtype=np.float32),
                   loss_ref=np.linspace(0.2, 2, n, dtype=np.float32),
                   delta_entropy=np.linspace(-1, 1, n, dtype=np.float32),
                   delta_logit_grad=np.linspace(1, -1, n, dtype=np.float32),
                   kl=np.linspace(0, 2, n, dtype=np.float32))
    for which in ("rule", "baseline"):
        rule = cfg[which]
        if rule == "none":
            if which == "rule" and cfg["rule_params"]:
                raise UsageError("rule_params given but rule is 'none'")
            if which == "baseline" and cfg["baseline_params"]:
                raise UsageError("baseline_params given but baseline is 'none'")
            continue
        params = rule_params(cfg, which, budget=n // 2)
        try:
            apply_rule(mask_rule(rule), t, **params)
        except UsageError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            flag = "--rule-param" if which == "rule" else "--baseline-param"
            raise UsageError(f"{one_line(e)} (given: {params}; set parameters with "
                             f"{flag} KEY=VALUE)") from None
    for arm in cfg.get("arms") or ():
        params = arm_params(cfg, arm, n // 2, n)
        try:
            apply_rule(mask_rule(arm), t, **params)
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"arm {arm!r}: {one_line(e)} (its parameters: {params})") from None


# --------------------------------------------------------------------------------------
# Fingerprints and hashes
# --------------------------------------------------------------------------------------

def fingerprint_path(path: Optional[str]) -> Optional[str]:
    """sha256 identifying a data file (its content) or a model directory (its
    top-level files' names and sizes, and the content of those under 64 MiB).
    None for None or a path that does not exist."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        if size <= _HASH_CONTENT_LIMIT:
            h.update(sha256_file(full).encode())
    return h.hexdigest()


def identity(cfg: Mapping[str, Any], fingerprints: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """The hashed settings: paths replaced by the fingerprints of what they name
    (a tokenizer left at the model's counts as the model)."""
    out = {}
    for o in OPTIONS:
        if not o.hashed:
            continue
        if o.kind == "path":
            out[o.name] = None if cfg.get(o.name) is None else {"sha256": fingerprints.get(o.name)}
        else:
            out[o.name] = cfg.get(o.name)
    return out


def describe_change(key: str, old: Any, new: Any) -> str:
    """One changed identity entry, as error messages show it."""
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        return f"{key} (contents differ)"
    return f"{key} ({old!r} -> {new!r})"


def path_fingerprints(cfg: Mapping[str, Any],
                      stored: Optional[Mapping[str, Any]] = None) -> Dict[str, Optional[str]]:
    """`fingerprint_path` of every path setting (`PATH_KEYS`). A path that is gone
    but unchanged since ``stored`` (a run's ``config.json``) keeps its stored
    fingerprint; the stages that need the file will say it is missing."""
    old_cfg = (stored or {}).get("config") or {}
    old_fp = (stored or {}).get("fingerprints") or {}
    out = {}
    for key in PATH_KEYS:
        fp = fingerprint_path(cfg[key])
        if fp is None and cfg[key] is not None and old_cfg.get(key) == cfg[key]:
            fp = old_fp.get(key)
        out[key] = fp
    return out


# --------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------

def load_yaml(path: str) -> Dict[str, Any]:
    """The settings in a YAML file (a mapping; unknown keys are errors)."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path}{where}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings, got "
                         f"{type(data).__name__}")
    return data


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    """The settings as YAML, in the order of `OPTIONS`."""
    import yaml
    ordered = {o.name: cfg[o.name] for o in OPTIONS}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
