"""The options of a T3S run: `OPTIONS` lists every setting (a YAML key and a
``--flag``) with its kind, default and help; `DEFAULTS`, `PATH_KEYS` and
`HASHED_ONLY_OFF_DEFAULT` are read off it. `UsageError` is the error of bad settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["UsageError", "Option", "OPTIONS", "OPTION_BY_NAME", "DEFAULTS",
           "HASHED_ONLY_OFF_DEFAULT", "PATH_KEYS"]


class UsageError(ValueError):
    """Bad settings or inputs: the CLI prints the message on one line and exits with 2."""


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


OPTIONS: Tuple[Option, ...] = (
    # model and data
    Option("model", "path", None, "θ0: a local Hugging Face model directory", metavar="DIR"),
    Option("tokenizer", "path", None, "tokenizer directory (default: the model's)", metavar="DIR"),
    Option("student", "path", None,
           "the model the retraining arms and the eval train and score, each from its own θ0; "
           "--model is then the selector that runs the pilot and the selection (its tokenizer "
           "must give the student's token ids; default: --model itself)", metavar="DIR"),
    Option("artifact", "path", None,
           "reuse a finished selection instead of a pilot and a selection: its "
           "selection.parquet or the run directory that holds it (with --student)",
           metavar="PATH"),
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
    # batching and attention (`t3s.pipeline.batching`); hashed although neither changes a
    # number beyond floating-point rounding: that rounding differs from the padded path's
    Option("attn_implementation", "choice", "auto",
           "the attention models run: auto (flash_attention_2 where flash-attn imports, on "
           "CUDA in bf16 / fp16; else transformers' choice, sdpa or eager), "
           "flash_attention_2, sdpa or eager",
           choices=("auto", "flash_attention_2", "sdpa", "eager")),
    Option("packing", "choice", "auto",
           "padding-free batches in the training and profiling passes: auto (on under "
           "flash attention, whose varlen kernels take them; docs/cli.md), on (also with "
           "sdpa / eager, through transformers' packed-sequence masks), off",
           choices=("auto", "on", "off")),
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
    # diffusion LMs (`t3s.dllm.pipeline`): `model` is then the AR selector
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
           "(t3s.pipeline.diagnostics)",
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

#: every `Option` by its name
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS: Dict[str, Any] = {o.name: o.default for o in OPTIONS}
#: settings added after run directories existed: at their defaults they stay out of a
#: stage's hash, so a run finished before them stays current (no eval or sweep redone)
HASHED_ONLY_OFF_DEFAULT = ("samples", "temperature", "top_p", "engine", "student", "artifact",
                           "attn_implementation", "packing")
PATH_KEYS = ("model", "tokenizer", "train", "heldout", "test", "extra_test", "diffusion_model",
             "sft_model", "student", "artifact")
