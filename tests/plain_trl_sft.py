"""A plain `trl.SFTTrainer` run for the distributed tests, started by their launchers.

    python plain_trl_sft.py OUT PATCHED ENGINE [DS_CONFIG]

PATCHED: 1 patches the model with `t3s.patch` before the trainer is built, 0 does not.
ENGINE: ``deepspeed`` (ZeRO-3 from DS_CONFIG, DeepSpeed's CPU accelerator) or ``fsdp2``
(under ``accelerate launch`` with an FSDP2 config; `fsdp2_on_cpu` turns accelerate's FSDP
branch on for CPU processes). 3 SGD steps on the shipped demo student; each rank writes
``OUT/result.RANK.json``: the engine, whether the parameters are sharded, how many calls
reached t3s's kernels through TRL's head, and the logged loss, entropy and accuracy.
Test use only.
"""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
out, patched, engine = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
if engine == "fsdp2":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fsdp2_on_cpu  # noqa: F401
else:
    import deepspeed.comm.torch  # noqa: F401
    # The CPU accelerator JIT-compiles a shared-memory all-reduce when its comm backend
    # starts (tens of seconds); ZeRO does not use it.
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

import t3s  # noqa: E402
from t3s.demo import BASE_DIR  # noqa: E402
from t3s.hf import trl_head  # noqa: E402

calls = []
kernel = trl_head.linear_cross_entropy
trl_head.linear_cross_entropy = lambda *a, **k: calls.append(1) or kernel(*a, **k)
tok = transformers.AutoTokenizer.from_pretrained(str(BASE_DIR))
rows = [{"prompt": f"{a}+{b}=", "completion": f"{a}+{b}={a + b};\\boxed{{{a + b}}}"}
        for a in range(10, 22) for b in range(30, 32)]
model = transformers.AutoModelForCausalLM.from_pretrained(str(BASE_DIR))
if patched:
    t3s.patch(model)
# SGD: Adam would amplify the two heads' rounding differences in tiny gradients
args = trl.SFTConfig(output_dir=out, max_steps=3, report_to=[], use_cpu=True,
                     per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                     learning_rate=0.1, optim="sgd", logging_steps=1, seed=0, bf16=False,
                     gradient_checkpointing=False,
                     deepspeed=sys.argv[4] if engine == "deepspeed" else None)
trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows))
trainer.train()
rank = int(os.environ.get("RANK", "0"))
params = list(trainer.model_wrapped.parameters())
result = {"engine": str(trainer.accelerator.distributed_type), "world_size": args.world_size,
          "sharded": (all(hasattr(p, "ds_id") for p in params) if engine == "deepspeed"
                      else any(type(p).__name__ == "DTensor" for p in params)),
          "t3s_calls": len(calls),
          "logs": [{k: e[k] for k in ("loss", "entropy", "mean_token_accuracy")}
                   for e in trainer.state.log_history if "loss" in e]}
with open(os.path.join(out, f"result.{rank}.json"), "w") as f:
    json.dump(result, f)
sys.stdout.flush()
os._exit(0)  # gloo's threads can abort a normal interpreter exit
