"""The report's section of the analyze stage (``analysis.md``), from ``analysis.json``.

`render_section` states what was analysed (examples, parameter subset, groups),
then the numbers: tokens still below θ0, the gradient ratio and cosine and each
group's loss per checkpoint, the transfer matrices, the static-signal AUCs, and
plain statements read off them (`statements`), with the figures.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["render_section", "statements", "SECTION_TITLE"]

SECTION_TITLE = "## Diagnostics (`t3s analyze`)"


def _f(x: Optional[float], spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def _at(series: Mapping[str, Any], step: int) -> Optional[float]:
    v = (series or {}).get(str(step))
    return None if v is None else float(v)


def _below(result: Mapping[str, Any], step: Optional[int]) -> Optional[Tuple[int, float]]:
    """(recorded step, fraction below θ0) at the last recorded step ≤ ``step`` (None: the end)."""
    b = (result.get("shock") or {}).get("below_theta0")
    if not b or not b["step"]:
        return None
    idx = [i for i, s in enumerate(b["step"]) if step is None or s <= step]
    if not idx:
        return None
    i = idx[-1]
    return int(b["step"][i]), float(b["fraction_below"][i])


def statements(result: Mapping[str, Any]) -> List[str]:
    """Plain sentences read off the numbers (nothing is asserted that they do not show)."""
    names = result["groups"]["names"]
    a, r = names[0], names[1]
    out = []
    shock = result.get("shock") or {}
    bstep = shock.get("bottleneck_step")
    at_b, at_end = _below(result, bstep), _below(result, None)
    if at_b and at_end:
        out.append(f"Tokens still below θ0: {100 * at_b[1]:.1f}% of the visited trace tokens "
                   f"were less confident than at θ0 at step {at_b[0]} (the last recorded step "
                   f"up to the bottleneck), {100 * at_end[1]:.1f}% at the last recorded step "
                   f"({at_end[0]}).")
    pilot = [c for c in result["checkpoints"] if c["series"] == "pilot"]
    first = pilot[0]
    bott = next((c for c in pilot if c["step"] == bstep), None)
    out.append(f"Gradient-norm ratio ‖∇L {a}‖/‖∇L {r}‖: {_f(first['grad_norm_ratio'], '.2f')} at "
               f"θ0" + (f", {_f(bott['grad_norm_ratio'], '.2f')} at the bottleneck (step "
                        f"{bstep})" if bott else "")
               + f"; cosine {_f(first['grad_cosine'], '+.3f')} at θ0"
               + (f", {_f(bott['grad_cosine'], '+.3f')} at the bottleneck" if bott else "") + ".")
    if len(pilot) > 2:
        worst = min(pilot, key=lambda c: c["grad_cosine"] if not math.isnan(c["grad_cosine"])
                    else 2.0)
        out.append(f"Lowest cosine over the pilot's retained checkpoints: "
                   f"{_f(worst['grad_cosine'], '+.3f')} ({worst['label']}, step {worst['step']}).")
    for label, t in (result.get("transfer_matrix") or {}).items():
        m = t["matrix"]
        i, j = names.index(a), names.index(r)
        out.append(f"Transfer at {label}: a step on the {a} changes L({r}) by "
                   f"{_f(m[i][j], '+.4f')} (L({a}) by {_f(m[i][i], '+.4f')}); a step on the {r} "
                   f"changes L({a}) by {_f(m[j][i], '+.4f')} (L({r}) by {_f(m[j][j], '+.4f')}). "
                   + ("Training on one group lowers the other's loss both ways (transfer)."
                      if m[i][j] < 0 and m[j][i] < 0 else
                      "Training on one group raises the other's loss both ways (interference)."
                      if m[i][j] > 0 and m[j][i] > 0 else
                      "The two directions differ in sign."))
    auc = result.get("static_auc") or {}
    if auc:
        best = max(auc, key=lambda k: abs(auc[k] - 0.5))
        out.append(f"Static signals at θ0 against the {a}: AUC "
                   + ", ".join(f"{k} {_f(v)}" for k, v in auc.items())
                   + f" (0.5 is chance); the most separating is {best} "
                   f"(separability {_f(max(auc[best], 1 - auc[best]))}).")
    t3s = [c for c in result["checkpoints"] if c["series"] == "t3s"]
    acc = ((result.get("accuracy") or {}).get("t3s") or {}).get("heldout_acc") or {}
    if len(t3s) > 1:
        # from T3S's best held-out accuracy after θ0 (ties: the latest) to its end
        later = [int(k) for k in acc if int(k) > 0]
        peak = max(later, key=lambda k: (acc[str(k)], k)) if later else None
        start = next((c for c in t3s if peak is not None and c["step"] >= peak), t3s[0])
        end = t3s[-1]
        if start is not end:
            since = (f"from step {start['step']} (its best held-out accuracy after θ0)"
                     if peak is not None else "from θ0 (no held-out accuracy)")
            text = (f"T3S retraining {since} to step {end['step']}: L({a}) (left out of its loss) "
                    f"{_f(start['loss'][a])} → {_f(end['loss'][a])} (θ0: "
                    f"{_f(t3s[0]['loss'][a])}), L({r}) {_f(start['loss'][r])} → "
                    f"{_f(end['loss'][r])}; ratio {_f(start['grad_norm_ratio'], '.2f')} → "
                    f"{_f(end['grad_norm_ratio'], '.2f')}, cosine "
                    f"{_f(start['grad_cosine'], '+.3f')} → {_f(end['grad_cosine'], '+.3f')}")
            if acc:
                text += (f"; held-out accuracy during training {_f(_at(acc, start['step']))} → "
                         f"{_f(_at(acc, end['step']))}")
            out.append(text + ".")
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _cost(result: Mapping[str, Any]) -> str:
    """What the subset cost: the gradient buffer per checkpoint and the seconds taken."""
    par, sec = result["parameters"], result.get("seconds") or {}
    out = ""
    if "gradient_bytes" in par:
        out += (f" The {len(result['groups']['names'])} gradients take "
                f"{_bytes(par['gradient_bytes'])} (float32) per checkpoint")
    if "total" in sec:
        out += (("; the" if out else " The") + f" analysis took {sec['total']:.0f} s "
                f"({len(sec.get('checkpoints') or {})} checkpoint(s)"
                + (f", {sum(sec['transfer'].values()):.0f} s of them for the transfer matrices"
                   if sec.get("transfer") else "") + ")")
    return out + "." if out else ""


def render_section(result: Mapping[str, Any], figures: Sequence[Tuple[str, str]]) -> str:
    """The Markdown section (starting with `SECTION_TITLE`)."""
    names = result["groups"]["names"]
    ex, par = result["examples"], result["parameters"]
    subset = ("every parameter" if par.get("all") else
              f"the last {par['last_layers']} decoder layer(s), the output head and the final norm")
    lines = [SECTION_TITLE, "",
             f"Computed on {ex['analysed']} of the {ex['of']} training traces (a fixed random "
             f"subset, seed {ex['seed']}) and over {subset} ({par['parameters']:,} parameters, "
             f"{100 * par['fraction_of_trainable']:.1f}% of the trainable ones). Groups: "
             + ", ".join(f"**{n}** ({result['groups']['tokens'][n]} tokens)" for n in names)
             + f", from the selection artifact (rule `{result['groups']['rule']}`). Losses are "
             "each group's mean token cross-entropy on these traces; gradients are those of "
             "these losses (the fused masked loss, one backward per group)." + _cost(result), ""]
    lines += [f"- {s}" for s in statements(result)]
    a, r = names[0], names[1]
    lines += ["", f"Per retained checkpoint (ratio = ‖∇L {a}‖ / ‖∇L {r}‖):", ""]
    lines += _table(["run", "step", "checkpoint", f"loss {a}", f"loss {r}", "ratio", "cosine"],
                    [[c["series"], str(c["step"]), c["label"], _f(c["loss"][a]),
                      _f(c["loss"][r]), _f(c["grad_norm_ratio"], ".2f"),
                      _f(c["grad_cosine"], "+.3f")] for c in result["checkpoints"]])
    if not result.get("transfer_matrix"):
        lines += ["", "No loss-transfer matrix: `transfer_at` named no checkpoint."]
    for label, t in (result.get("transfer_matrix") or {}).items():
        lines += ["", f"Loss-transfer matrix at {label} (step {t['step']}): {t['steps']} SGD "
                      f"step(s) of lr {t['lr']:.3g} ({t['lr_rule']}) on the row's group; each "
                      "entry is the column's loss after minus before (negative: lowered).", ""]
        lines += _table(["trained on"] + [f"Δ loss {n}" for n in t["names"]],
                        [[n] + [_f(v, "+.4f") for v in row]
                         for n, row in zip(t["names"], t["matrix"])])
    if result.get("static_auc"):
        lines += ["", f"Static signals at θ0 against the {result['static_auc_set']} (ROC AUC: "
                      "the chance that a member scores higher than a non-member):", ""]
        lines += _table(["signal", "AUC", "separability max(AUC, 1 − AUC)"],
                        [[k, _f(v), _f(result["static_separability"][k])]
                         for k, v in result["static_auc"].items()])
    if result.get("trajectory_signals"):
        lines += ["", f"How each token's prediction changed from θ0 to θb, against the "
                      f"{result['trajectory_signals_set']} (Δc > 0): ROC AUC, and the overlap "
                      "(Jaccard) of the set with as many tokens ranked first by the signal "
                      "in its better direction:", ""]
        lines += _table(["signal", "AUC", "separability", "overlap", "direction"],
                        [[k, _f(v["auc"]), _f(v["separability"]), _f(v["overlap"]),
                          v["direction"]] for k, v in result["trajectory_signals"].items()])
    if result.get("anchor_profile"):
        lines += ["", "What anchors are: the share of trace tokens with Δc > 0 (confidence "
                      "rose from θ0 to the bottleneck), by token class, position in the trace "
                      "and θ0 confidence p_θ0(y_t), over every trace token:", ""]
        lines += _table(["by", "group", "tokens", "anchors", "anchor fraction"],
                        [[r["by"], r["group"], str(r["tokens"]), str(r["anchors"]),
                          _f(r["anchor_fraction"])] for r in result["anchor_profile"]])
    lines.append("")
    for title, fname in figures:
        lines += [f"**{title}**", "", f"![{title}]({fname})", ""]
    return "\n".join(lines)
