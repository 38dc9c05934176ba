"""Settings from a YAML mapping, flags or a stored ``config.json``: keys checked
(`check_keys`), values typed and paths made absolute (`settings_from`), and the full,
checked settings over `DEFAULTS` (`normalize_config`) with the checks that involve
several settings (diffusion, sampling and the generation engine, arms).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional

from ..._util import one_line
from .options import DEFAULTS, OPTION_BY_NAME, PATH_KEYS, Option, UsageError
from .rules import BASELINE_OBJECTIVES, RULE_ALIASES, canonical_rule

__all__ = ["check_keys", "settings_from", "normalize_config"]


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
    except UsageError:
        raise   # a message of its own (a choice names the choices)
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
        if name not in OPTION_BY_NAME:
            close = difflib.get_close_matches(name, list(OPTION_BY_NAME), n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        out[name] = value
    if unknown:
        raise UsageError(f"{where}unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; known: {', '.join(sorted(OPTION_BY_NAME))}")
    return out


def settings_from(values: Mapping[str, Any], *, base_dir: Optional[str] = None,
                  where: str = "") -> Dict[str, Any]:
    """The settings in ``values`` (a YAML mapping, flags or a stored config), typed and
    checked, paths made absolute (relative ones against ``base_dir``, default the
    working directory). Unknown keys and bad values raise UsageError; ``where``
    prefixes the messages (e.g. the YAML file's name)."""
    out = {}
    for name, value in check_keys(values, where).items():
        value = _coerce(OPTION_BY_NAME[name], value, where)
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
    _check_student(cfg, where)
    _check_sampling(cfg, where)
    cfg["arms"] = _check_arms(cfg, where)
    cfg["rule_params"] = dict(cfg["rule_params"] or {})
    cfg["baseline_params"] = dict(cfg["baseline_params"] or {})
    cfg["analysis_params"] = dict(cfg["analysis_params"] or {})
    cfg["sensitivity_params"] = dict(cfg["sensitivity_params"] or {})
    return cfg


def _check_diffusion(cfg: Dict[str, Any], where: str) -> None:
    """The settings of ``objective: diffusion`` (`t3s.dllm.pipeline`)."""
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


#: where a finished run directory keeps its selection (`t3s.pipeline.rundir`'s stage
#: directory and SELECTION_FILE; rundir imports this package, hence the literal)
RUN_SELECTION = os.path.join("select", "selection.parquet")


def _check_student(cfg: Dict[str, Any], where: str) -> None:
    """``student`` and ``artifact`` (`t3s.pipeline.student`); a run directory given as
    ``artifact`` becomes its selection file, so that the file is what the run's
    identity fingerprints."""
    if cfg["artifact"] is not None:
        if cfg["student"] is None:
            raise UsageError(f"{where}artifact needs student: the model that the reused "
                             "selection trains (--student DIR)")
        inside = os.path.join(cfg["artifact"], RUN_SELECTION)
        if os.path.isdir(cfg["artifact"]) and os.path.isfile(inside):
            cfg["artifact"] = inside
    if cfg["student"] is not None and cfg["objective"] == "diffusion":
        raise UsageError(f"{where}student: objective diffusion trains --diffusion-model, which "
                         "is its student already; leave student unset")


def _check_sampling(cfg: Mapping[str, Any], where: str) -> None:
    """``samples``, ``temperature`` and ``top_p``: valid `t3s.generation.SamplingParams`,
    top_p only with sampling, greedy scoring and the hf engine alone with objective
    diffusion; ``vllm_server`` an http(s) address, ``vllm_gpu_memory`` in (0, 1]."""
    from ...generation import SamplingParams
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
    from ...selection import RULES
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
        if name == "sft" and cfg["student"] is None:
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
    if cfg["student"] is not None and "sft" not in out:
        # the pilot's SFT is the selector's: the student's own is an arm (the 'sft' row)
        out.insert(0, "sft")
    if out and cfg["objective"] == "diffusion":
        raise UsageError(f"{where}arms are not supported with objective diffusion (only the "
                         "baseline stage trains a comparison there)")
    if out and cfg["rule"] == "forced":
        raise UsageError(f"{where}arms keep as many tokens as the rule's loss mask, but rule "
                         "'forced' is not a loss mask; choose a loss-mask rule")
    return out
