"""The generation interface (`t3s.generation`): sampling settings, avg@k, the Hugging Face
engine on a tiny model (greedy as before, seeded sampling, k answers, stop strings, the
live weights), `training_accuracy` over it, and the `--samples` / `--temperature` /
`--top-p` settings of the command line and the eval stage.
"""

import dataclasses
import json
import math

import pytest
import torch

from tiny import arithmetic_records, cli_error_line, make_tokenizer, tiny_llama, write_run_assets

from t3s.bottleneck import training_accuracy
from t3s.data import TraceDataset
from t3s.generation import GenerationEngine, HFEngine, SamplingParams, avg_at_k

MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_llama(tok, seed=3)


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of different lengths (the batches are left-padded)."""
    texts = ["1+2=", "13+4=", "7+70=", "a", "99+99=9"]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# --------------------------------------------------------------------------------------
# SamplingParams and avg@k
# --------------------------------------------------------------------------------------

def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.samples, p.stop, p.seed) == \
        (512, 0.0, 1.0, 1, (), 0) and p.greedy
    q = SamplingParams(max_new_tokens=4.0, temperature=1, samples=3, stop="}", seed=7)
    assert q.max_new_tokens == 4 and q.temperature == 1.0 and q.stop == ("}",) and not q.greedy
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.samples = 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens="8"), "max_new_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=-0.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=math.nan), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, samples=0), "samples must be >= 1"),
    (dict(temperature=1.0, samples=2.5), "samples must be an integer"),
    (dict(samples=3), "greedy decoding gives 3 identical answers; set temperature > 0"),
    (dict(temperature=0.0, samples=2), "greedy decoding gives 2 identical answers"),
    (dict(stop=[""]), "stop must be a sequence of non-empty strings"),
    (dict(stop=[1]), "stop must be a sequence of non-empty strings"),
    (dict(stop=5), "stop must be a sequence of non-empty strings"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_sampling_params_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_avg_at_k_by_hand():
    T, F = True, False
    s = avg_at_k([[T, F], [F, F], [T, T]])
    # per-problem fractions 0.5, 0, 1: mean 0.5; sample variance (0 + .25 + .25) / 2 = .25
    assert s["avg"] == 0.5 and s["k"] == 2 and s["n"] == 3
    assert s["se"] == pytest.approx(0.5 / math.sqrt(3))
    assert s["pass_at_k"] == pytest.approx(2 / 3)
    one = avg_at_k([[T], [F], [T], [T]])          # k = 1: the plain accuracy
    assert one["avg"] == 3 / 4 and one["pass_at_k"] == 3 / 4 and one["k"] == 1
    assert one["se"] == pytest.approx(math.sqrt(0.25) / 2)
    single = avg_at_k([[T, F, F]])
    assert single["se"] is None and single["avg"] == pytest.approx(1 / 3) and single["n"] == 1
    assert avg_at_k(([1, 0, 0, 0], (0, 0, 0, 0)))["avg"] == 0.125     # any truthy values
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 0 has no answers"):
        avg_at_k([[], []])
    with pytest.raises(ValueError, match="problem 1 has 1 answers but problem 0 has 2"):
        avg_at_k([[T, F], [T]])


# --------------------------------------------------------------------------------------
# The Hugging Face engine on a tiny model
# --------------------------------------------------------------------------------------

def old_path(model, tok, prompts, max_new_tokens):
    """What `training_accuracy` ran before the engine: one greedy ``generate`` on the
    left-padded prompts; the new tokens [B, max_new_tokens]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, width:].tolist()


def test_engine_is_abstract():
    with pytest.raises(TypeError):
        GenerationEngine()
    with pytest.raises(TypeError, match="SamplingParams"):
        HFEngine(tiny_llama(make_tokenizer()), make_tokenizer()).generate([[1, 5]], {"samples": 1})
    with pytest.raises(ValueError, match="num_return_sequences"):
        HFEngine(None, make_tokenizer(), generation_kwargs={"num_return_sequences": 2})


def test_greedy_equals_the_old_path(model, tok, prompts):
    old = old_path(model, tok, prompts, MAX_NEW)
    model.train()
    engine = HFEngine(model, tok, batch_size=len(prompts))
    new = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    assert model.training                              # restored after generating
    assert [len(a) for a in new] == [1] * len(prompts)
    for row, (answer,) in zip(old, new):
        # as generated, up to the first eos; after it only the pad ids of a finished row
        assert row[:len(answer)] == answer
        assert len(answer) == MAX_NEW or answer[-1] == tok.eos_token_id
        assert all(t == tok.pad_token_id for t in row[len(answer):])
    # other batch sizes: the same answers (one prompt per batch: no padding at all)
    assert HFEngine(model, tok, batch_size=2).generate(prompts, SamplingParams(
        max_new_tokens=MAX_NEW)) == new
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())


def test_sampling_is_seeded_gives_k_answers_and_leaves_the_rng_alone(model, tok, prompts):
    engine = HFEngine(model, tok, batch_size=2)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, samples=3, seed=11)
    state = torch.get_rng_state()
    a = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's RNG is untouched
    b = engine.generate(prompts, params)
    assert a == b                                      # same seed, same answers
    assert len(a) == len(prompts) and all(len(answers) == 3 for answers in a)
    assert all(1 <= len(x) <= MAX_NEW for answers in a for x in answers)
    # a random tiny model at temperature 1: the draws differ between samples and seeds
    assert any(len({tuple(x) for x in answers}) > 1 for answers in a)
    other = engine.generate(prompts, dataclasses.replace(params, seed=12))
    assert other != a
    # top-p near 0 keeps only the most likely token: sampling becomes greedy
    narrow = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0,
                                                     top_p=1e-6, samples=2))
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    assert narrow == [[g[0], g[0]] for g in greedy]


def test_stop_strings_cut_the_answers(model, tok, prompts):
    engine = HFEngine(model, tok, batch_size=len(prompts))
    full = [a[0] for a in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))]
    plain = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"}
    # a character the first answer writes after its first token: a stop string there
    stop_id = next(t for t in full[0][1:] if t in plain)
    stop = tok.convert_ids_to_tokens(stop_id)
    cut = [a[0] for a in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW,
                                                                 stop=(stop,)))]
    for before, after in zip(full, cut):
        end = before.index(stop_id) + 1 if stop_id in before else len(before)
        assert after == before[:end]                     # the stop string is kept
    assert len(cut[0]) < len(full[0]) or full[0][-1] == stop_id
    assert tok.decode(cut[0], skip_special_tokens=True).endswith(stop)


def test_the_engine_generates_with_the_live_weights(model, tok, prompts):
    """Weight sync: after the weights change in memory, the answers change, with nothing
    reloaded; `sync_weights` of the engine's own model is a no-op."""
    engine = HFEngine(model, tok, batch_size=3)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    before = engine.generate(prompts, params)
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.zero_()          # every logit 0: the argmax is token 0 (pad)
    engine.sync_weights(model)
    assert engine.model is model
    after = engine.generate(prompts, params)
    assert after == [[[tok.pad_token_id] * MAX_NEW]] * len(prompts) != before
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)
    assert engine.generate(prompts, params) == before
    other = tiny_llama(tok, seed=4)
    engine.sync_weights(other)                # another model object: the engine follows it
    assert engine.model is other
    assert engine.generate(prompts, params) == HFEngine(other, tok).generate(prompts, params)


class EchoModel:
    """generate(): appends each prompt's last token ``max_new_tokens`` times; records the
    calls (a stand-in for a sharded model, whose every call is a collective)."""

    training = False

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids.shape[0], kw))
        new = input_ids[:, -1:].repeat(1, kw["max_new_tokens"])
        return torch.cat([input_ids, new], dim=1)


def test_lockstep_runs_as_many_calls_as_the_busiest_rank(tok, monkeypatch):
    """Under a launcher, a rank with fewer prompts runs filler batches (discarded) until
    the rank with the most batches is done; every call has synced_gpus."""
    from t3s import dist
    monkeypatch.setattr(dist, "gather_objects", lambda n: [n, n + 2])   # the other rank
    model = EchoModel()
    engine = HFEngine(model, tok, batch_size=2, lockstep=True)
    answers = engine.generate([[5, 6], [7], [8, 9, 10]], SamplingParams(max_new_tokens=2))
    assert answers == [[[6, 6]], [[7, 7]], [[10, 10]]]
    assert [n for n, _ in model.calls] == [2, 1, 1, 1]       # 2 batches + 2 fillers
    assert all(kw["synced_gpus"] is True for _, kw in model.calls)
    model.calls.clear()
    assert engine.generate([], SamplingParams(max_new_tokens=2)) == []   # fillers only
    assert len(model.calls) == 2
    monkeypatch.setattr(dist, "gather_objects", lambda n: [n])
    assert HFEngine(model, tok, batch_size=2).generate([[5]], SamplingParams(max_new_tokens=1)) \
        == [[[5]]]
    assert "synced_gpus" not in model.calls[-1][1]


# --------------------------------------------------------------------------------------
# training_accuracy over the interface
# --------------------------------------------------------------------------------------

def _dataset(tok, n=6):
    return TraceDataset.from_jsonl(arithmetic_records(n, seed=1), tok)


def test_training_accuracy_with_samples_is_the_avg_at_k_of_its_details(model, tok):
    data = _dataset(tok)
    verifier = lambda pred, gold: len(pred) % 2 == 0          # noqa: E731  (mixed verdicts)
    kw = dict(verifier=verifier, subset_size=None, max_new_tokens=MAX_NEW, batch_size=4,
              progress=False, return_details=True, samples=3, temperature=1.0, seed=2)
    acc, details = training_accuracy(model, tok, data, **kw)
    assert len(details) == len(data)
    for d in details:
        assert set(d) == {"example_id", "prediction", "answer", "correct", "samples", "score"}
        assert len(d["samples"]) == 3
        assert (d["prediction"], d["correct"]) == (d["samples"][0]["prediction"],
                                                   d["samples"][0]["correct"])
        assert d["score"] == sum(s["correct"] for s in d["samples"]) / 3
    assert acc == avg_at_k([[s["correct"] for s in d["samples"]] for d in details])["avg"]
    assert 0 < acc < 1
    assert training_accuracy(model, tok, data, **kw) == (acc, details)   # seeded
    with pytest.raises(ValueError, match="identical answers"):
        training_accuracy(model, tok, data, samples=2, progress=False)


class ScriptedEngine(GenerationEngine):
    """Answers given in advance: prompt (as a tuple) -> [answer ids per sample]."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, params):
        self.calls.append(params)
        return [self.answers[tuple(p)][:params.samples] for p in prompts]

    def sync_weights(self, model):
        pass


def test_training_accuracy_takes_any_engine(tok):
    data = _dataset(tok, 4)
    right = [tok(ex["answer"], add_special_tokens=False)["input_ids"] for ex in data]
    wrong = tok("x", add_special_tokens=False)["input_ids"]
    # problem i answers right in the first i of its 3 samples: 0, 1/3, 2/3, 1
    answers = {tuple(ex["input_ids"][:ex["prompt_length"]].tolist()): [r] * i + [wrong] * (3 - i)
               for i, (ex, r) in enumerate(zip(data, right))}
    engine = ScriptedEngine(answers)
    acc, details = training_accuracy(None, tok, data, engine=engine, verifier="exact",
                                     subset_size=None, samples=3, temperature=0.5, top_p=0.9,
                                     stop="}", max_new_tokens=5, return_details=True,
                                     progress=False)
    assert acc == pytest.approx(0.5)
    assert [d["score"] for d in details] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert engine.calls == [SamplingParams(max_new_tokens=5, temperature=0.5, top_p=0.9,
                                           samples=3, stop=("}",), seed=0)]
    engine.answers = {k: v[:2] for k, v in answers.items()}      # too few answers
    with pytest.raises(ValueError, match="the engine returned"):
        training_accuracy(None, tok, data, engine=engine, subset_size=None, samples=3,
                          temperature=0.5, progress=False)


# --------------------------------------------------------------------------------------
# The command line and the eval stage
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_run_assets(tmp_path_factory.mktemp("assets"), n_train=4, n_heldout=6)


def test_sampling_flags_reach_the_config_and_bad_ones_are_refused(assets, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from t3s.cli import main
    base = ["--model", str(assets / "model"), "--train", str(assets / "train.jsonl")]
    for command in ("run", "pilot", "eval"):
        assert main([command, *base, "--samples", "2", "--temperature", "0.7", "--top-p", "0.9",
                     "--print-config"]) == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert (cfg["samples"], cfg["temperature"], cfg["top_p"]) == (2, 0.7, 0.9)
    assert main(["run", *base, "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["samples"], cfg["temperature"], cfg["top_p"]) == (1, 0.0, 1.0)
    run_dir = tmp_path / "run"
    bad = [(["--samples", "2"], "samples 2 with temperature 0: greedy decoding gives 2 "
                                "identical answers; set --temperature > 0"),
           (["--samples", "0", "--temperature", "1"], "samples must be >= 1"),
           (["--temperature", "-1"], "temperature must be a finite number >= 0"),
           (["--temperature", "nan"], "temperature must be a finite number >= 0"),
           (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
           (["--top-p", "0.5"], "top_p 0.5 applies to sampling, but temperature 0 is greedy"),
           (["--objective", "diffusion", "--rule", "none", "--temperature", "1"],
            "objective diffusion scores greedily")]
    for extra, message in bad:
        assert main(["run", *base, "--run-dir", str(run_dir), *extra]) == 2
        assert message in cli_error_line(capsys), extra
        assert not run_dir.exists()                 # refused before any work


def test_eval_stage_records_avg_at_k(assets, tmp_path, capsys):
    from t3s.cli import main
    run_dir = tmp_path / "run"
    args = ["eval", "--model", str(assets / "model"), "--heldout", str(assets / "heldout.jsonl"),
            "--max-new-tokens", "6", "--verifier", "exact", "--run-dir", str(run_dir),
            "--no-progress"]
    assert main(args) == 0                          # greedy: the results as before
    base = json.loads((run_dir / "eval" / "results.json").read_text())["arms"]["base"]
    assert set(base) == {"accuracy", "n", "n_correct", "model"}
    assert "sampling" not in json.loads((run_dir / "eval" / "results.json").read_text())
    capsys.readouterr()
    # other sampling settings make the eval stage's settings change: refused without --force
    assert main([*args, "--samples", "3", "--temperature", "0.8"]) == 2
    assert "samples (1 -> 3)" in cli_error_line(capsys)
    assert main([*args, "--samples", "3", "--temperature", "0.8", "--force"]) == 0
    assert "avg@3" in capsys.readouterr().out
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["sampling"] == {"samples": 3, "temperature": 0.8, "top_p": 1.0}
    for entry in (results["arms"]["base"], results["sets"]["heldout"]["arms"]["base"]):
        assert entry["k"] == 3 and entry["n"] == 6
        rows = [json.loads(line) for line in (run_dir / "eval" / "base.jsonl").open()]
        stats = avg_at_k([[s["correct"] for s in r["samples"]] for r in rows])
        assert entry["accuracy"] == stats["avg"]
        assert entry["se"] == stats["se"] and entry["pass_at_k"] == stats["pass_at_k"]
        assert entry["n_correct"] == sum(s["correct"] for r in rows for s in r["samples"])
    # the report shows avg@k ± its standard error, and pass@k
    from t3s.pipeline.report import collect_metrics, render_markdown
    m = collect_metrics(run_dir)
    entry = results["arms"]["base"]
    assert m["eval_sampling"] == results["sampling"]
    assert m["accuracy_se_by_set"] == {"heldout": {"base": entry["se"]}}
    assert m["pass_at_k_by_set"] == {"heldout": {"base": entry["pass_at_k"]}}
    text = render_markdown(m, run_dir=str(run_dir))
    assert f"| {entry['accuracy']:.3f} ± {entry['se']:.3f} |" in text
    assert "Accuracy is avg@3: 3 answer(s) per problem sampled at temperature 0.8" in text
    assert f"pass@3 (some answer correct): base (θ0) {entry['pass_at_k']:.3f}" in text


def test_a_run_made_before_the_sampling_settings_is_not_a_different_config(assets, tmp_path):
    """config.json written before samples / temperature / top_p existed: the defaults
    count as its values, so opening it again is not refused."""
    from t3s.pipeline import rundir
    from t3s.pipeline.settings import normalize_config, path_fingerprints
    cfg = normalize_config({"model": str(assets / "model"), "run_dir": str(tmp_path)})
    fps = path_fingerprints(cfg)
    run = rundir.RunDir(tmp_path)
    run.write_config(cfg, fps)
    stored = json.loads(run.config_path.read_text())
    for key in ("samples", "temperature", "top_p"):
        del stored["identity"][key], stored["config"][key]
    for key in ("engine", "vllm_server", "vllm_gpu_memory"):   # added later still
        stored["identity"].pop(key, None), stored["config"].pop(key, None)
    run.config_path.write_text(json.dumps(stored))
    assert run.config_diff(cfg, fps) == []
    assert run.config_diff({**cfg, "samples": 2, "temperature": 1.0}, fps) == [
        "samples (1 -> 2)", "temperature (0.0 -> 1.0)"]
    assert run.config_diff({**cfg, "engine": "vllm"}, fps) == ["engine ('hf' -> 'vllm')"]


def test_sampling_settings_at_their_defaults_leave_stage_hashes_as_before():
    """A run finished before the sampling settings existed stays current: at their
    defaults they are not part of the eval stage's hash; off them, they are."""
    from t3s._util import sha256_json
    from t3s.pipeline.engine import stage_hash
    from t3s.pipeline.settings import HASHED_ONLY_OFF_DEFAULT, identity, normalize_config
    from t3s.pipeline.stages import STAGES
    eval_stage = next(s for s in STAGES if s.name == "eval")
    assert {"samples", "temperature", "top_p", "engine", "student"} <= set(eval_stage.keys)
    cfg = normalize_config({})
    # the cross-model settings likewise (`--student`, `--artifact`)
    for stage in STAGES:
        ident = identity(cfg, {})
        plain = sha256_json({k: ident.get(k, cfg.get(k)) for k in stage.keys
                             if k not in HASHED_ONLY_OFF_DEFAULT})
        assert stage_hash(stage, cfg, {}) == plain, stage.name
    train_stage = next(s for s in STAGES if s.name == "train")
    assert stage_hash(train_stage, normalize_config({"student": "big"}), {}) != \
        stage_hash(train_stage, cfg, {})
    ident = identity(cfg, {})
    before = sha256_json({k: ident.get(k, cfg.get(k)) for k in eval_stage.keys
                          if k not in HASHED_ONLY_OFF_DEFAULT})
    assert stage_hash(eval_stage, cfg, {}) == before
    sampled = normalize_config({"samples": 4, "temperature": 0.7})
    assert stage_hash(eval_stage, sampled, {}) != before
