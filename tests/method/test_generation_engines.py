"""The engines beside `HFEngine` as far as they run without vLLM (`t3s.generation`): the
server engine's protocol against an OpenAI-compatible stand-in server, the weights the
colocated engine would be given (`live_weights`), the training-accuracy callback's
engine (synced before every evaluation, built once, closed at the end), the eval stage
through a server, and the settings (`--engine`, `--vllm-server`, `--vllm-gpu-memory`).

The vLLM engines themselves run in tests/integration/test_vllm.py, where vLLM is installed.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tiny import cli_error_line, make_tokenizer, tiny_llama, write_run_assets

from t3s.generation import (GenerationEngine, HFEngine, SamplingParams, VLLMEngine,
                            VLLMServerEngine, vllm_available)
from t3s.generation.vllm import live_weights, saved_weights

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
HAVE_VLLM = vllm_available()[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_run_assets(tmp_path_factory.mktemp("assets"), n_train=4, n_heldout=6)
    # a second model of the same architecture: what a trained arm's directory holds
    tiny_llama(make_tokenizer(), seed=11).save_pretrained(root / "other")
    make_tokenizer().save_pretrained(root / "other")
    return root


# --------------------------------------------------------------------------------------
# An OpenAI-compatible stand-in for `vllm serve`: the completions route (token ids in and
# out, n answers per prompt, choices indexed prompt·n + j), the model list, and the
# development routes that reload weights from a directory
# --------------------------------------------------------------------------------------

class StandIn:
    def __init__(self, model_dir: Path, name: str = "served"):
        from transformers import AutoModelForCausalLM
        self.tok, self.name, self.calls, self.answer_rpc = make_tokenizer(), name, [], True
        self.engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_dir), self.tok)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stand_in.calls.append(("GET", self.path, None))
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": stand_in.name}]})
                self._send(404, {"error": "no route"})

            def do_POST(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"{}")
                stand_in.calls.append(("POST", self.path, body))
                code, out = stand_in.answer(self.path, body)
                self._send(code, out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path, body):
        from transformers import AutoModelForCausalLM
        if path == "/collective_rpc" and not self.answer_rpc:   # vLLM: no such method
            return 500, {"error": "AttributeError: 'CPUWorker' has no 't3s_load_weights'"}
        if path == "/collective_rpc" and body["method"] == "t3s_load_weights":
            model = AutoModelForCausalLM.from_pretrained(body["kwargs"]["model_dir"])
            self.engine.sync_weights(model)
            return 200, {"results": [None]}
        if path == "/reset_prefix_cache":
            return 200, {}
        if path != "/v1/completions":
            return 404, {"error": "no route"}
        if body["model"] != self.name:
            return 404, {"error": f"model {body['model']} does not exist"}
        n = body.get("n", 1)
        params = SamplingParams(max_new_tokens=body["max_tokens"],
                                temperature=body.get("temperature", 1.0), samples=n,
                                top_p=body.get("top_p", 1.0), seed=body.get("seed", 0),
                                stop=tuple(body.get("stop", ())))
        answers = self.engine.generate(body["prompt"], params)
        choices = [{"index": i * n + j, "text": "", "token_ids": ids}
                   for i, per in enumerate(answers) for j, ids in enumerate(per)]
        return 200, {"choices": choices[::-1]}   # any order: the engine sorts by index

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in(assets):
    s = StandIn(assets / "model")
    yield s
    s.close()


def _prompts(tok):
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
            for t in ["1+2=", "13+4=", "7+70=", "a", "99+99=9"]]


def test_server_engine_speaks_the_completions_protocol(assets, stand_in):
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer()
    prompts = _prompts(tok)
    local = HFEngine(AutoModelForCausalLM.from_pretrained(assets / "model"), tok)
    server = VLLMServerEngine(stand_in.url, batch_size=2)
    assert server.model == "served"
    greedy = SamplingParams(max_new_tokens=6)
    assert server.generate(prompts, greedy) == local.generate(prompts, greedy)
    bodies = [b for m, p, b in stand_in.calls if p == "/v1/completions"]
    assert [len(b["prompt"]) for b in bodies] == [2, 2, 1]          # batches of batch_size
    assert all(b["return_token_ids"] and b["temperature"] == 0.0 for b in bodies)
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0, samples=3, seed=4, stop="=")
    out = server.generate(prompts, sampled)
    assert [len(a) for a in out] == [3] * len(prompts)
    body = [b for m, p, b in stand_in.calls if p == "/v1/completions"][-1]
    assert (body["n"], body["seed"], body["top_p"], body["stop"]) == (3, 4, 1.0, ["="])
    assert body["include_stop_str_in_output"] is True
    assert server.generate([], greedy) == []


def test_server_engine_reloads_weights_from_a_directory_and_refuses_a_live_model(
        assets, stand_in):
    tok = make_tokenizer()
    prompts, greedy = _prompts(tok), SamplingParams(max_new_tokens=6)
    server = VLLMServerEngine(stand_in.url)
    before = server.generate(prompts, greedy)
    server.sync_weights(str(assets / "other"))
    rpc = [b for m, p, b in stand_in.calls if p == "/collective_rpc"]
    assert rpc == [{"method": "t3s_load_weights",
                    "kwargs": {"model_dir": str((assets / "other").resolve())}}]
    after = server.generate(prompts, greedy)
    from transformers import AutoModelForCausalLM
    other = HFEngine(AutoModelForCausalLM.from_pretrained(assets / "other"), tok)
    assert after == other.generate(prompts, greedy) and after != before
    with pytest.raises(TypeError, match="cannot take a live model's weights"):
        server.sync_weights(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not a model directory"):
        server.sync_weights(str(assets))


def test_a_server_without_the_extension_is_named(assets, stand_in):
    stand_in.answer_rpc = False
    with pytest.raises(RuntimeError, match="--worker-extension-cls "
                                           "t3s.generation.vllm.VLLMWorkerExtension"):
        VLLMServerEngine(stand_in.url).sync_weights(str(assets / "other"))


def test_server_engine_fails_early_and_clearly(stand_in):
    with pytest.raises(ValueError, match="must be an http"):
        VLLMServerEngine("127.0.0.1:8000")
    with pytest.raises(ValueError, match=r"serves \['served'\], not 'other'"):
        VLLMServerEngine(stand_in.url, model="other")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        VLLMServerEngine(stand_in.url, batch_size=0)
    port = stand_in.server.server_address[1]
    stand_in.close()
    with pytest.raises(ConnectionError, match=f"vLLM server at http://127.0.0.1:{port}"):
        VLLMServerEngine(f"http://127.0.0.1:{port}")


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here (tests/integration/test_vllm.py runs it)")
def test_vllm_engine_without_vllm_says_how_to_install_it(assets):
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'.*No module named"):
        VLLMEngine(str(assets / "model"))


# --------------------------------------------------------------------------------------
# The weights the colocated engine is given
# --------------------------------------------------------------------------------------

def test_live_weights_are_the_saved_names_and_values_unwrapped(assets, tmp_path):
    from safetensors.torch import load_file
    tok = make_tokenizer()
    model = tiny_llama(tok, seed=5)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")

    class Wrapper(torch.nn.Module):   # as DDP / accelerate wrap a model: .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    for m in (model, Wrapper(model)):
        live = dict(live_weights(m))
        assert set(saved) <= set(live)
        for name, value in saved.items():
            assert torch.equal(live[name], value), name
            assert not live[name].requires_grad


@pytest.mark.parametrize("tied", [True, False])
def test_saved_weights_are_the_live_state_dict_tied_head_included(tmp_path, tied):
    """What `VLLMEngine.load_weights_from` streams: every saved tensor, and a tied head
    (saved as the embedding alone) as its own entry, as a live state dict has it."""
    tok = make_tokenizer()
    model = tiny_llama(tok, seed=6, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    streamed = dict(saved_weights(sorted(tmp_path.glob("*.safetensors"))))
    live = model.state_dict()
    assert set(streamed) == set(live)
    for name, value in live.items():
        assert torch.equal(streamed[name], value), name
    if tied:
        assert torch.equal(streamed["lm_head.weight"], streamed["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------
# The training-accuracy callback's engine
# --------------------------------------------------------------------------------------

class CountingEngine(GenerationEngine):
    """An HF engine that records what the callback asks of it."""

    def __init__(self, model, tok, log):
        self.inner, self.log = HFEngine(model, tok), log
        log.append("built")

    def generate(self, prompts, params):
        self.log.append("generate")
        return self.inner.generate(prompts, params)

    def sync_weights(self, model):
        self.log.append(("sync", float(next(model.parameters()).detach().sum())))
        self.inner.sync_weights(model)

    def close(self):
        self.log.append("closed")


def test_accuracy_callback_syncs_the_engine_before_every_evaluation(tmp_path):
    from transformers import TrainingArguments
    from t3s import T3STrainer, TraceDataset
    from t3s.trainer import AccuracyCallback
    from tiny import arithmetic_records, jsonl_lines
    tok = make_tokenizer()
    model = tiny_llama(tok, seed=2)
    data = TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(6, seed=1)), tok)
    log = []
    cb = AccuracyCallback(tok, list(data), eval_steps=2, subset_size=3, max_new_tokens=4,
                          verifier="exact", engine=lambda m: CountingEngine(m, tok, log))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_steps=100, disable_tqdm=True)
    T3STrainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert sorted(cb.tracker.history) == [0, 2, 4]
    assert log.count("built") == 1 and log[-1] == "closed"
    syncs = [e for e in log if isinstance(e, tuple)]
    assert len(syncs) == 3                               # steps 0, 2 and 4
    assert len({s[1] for s in syncs}) == 3               # each time the weights had changed
    # a sync comes before every evaluation's generation
    assert all(isinstance(log[i - 1], tuple) or log[i - 1] == "generate"
               for i, e in enumerate(log) if e == "generate")
    with pytest.raises(TypeError, match="engine must be a GenerationEngine"):
        AccuracyCallback(tok, list(data), engine=42)


def test_diffusion_callback_refuses_an_engine():
    from t3s.dllm import DiffusionAccuracyCallback
    with pytest.raises(ValueError, match="no generation engine implements"):
        DiffusionAccuracyCallback(make_tokenizer(), [{"input_ids": [1]}],
                                  engine=lambda m: None)


# --------------------------------------------------------------------------------------
# The settings and the eval stage through a server
# --------------------------------------------------------------------------------------

def test_engine_settings_are_checked_before_any_work(assets, tmp_path, capsys):
    from t3s.cli import main
    base = ["--model", str(assets / "model"), "--train", str(assets / "train.jsonl"),
            "--heldout", str(assets / "heldout.jsonl")]
    run_dir = tmp_path / "run"
    bad = [(["--vllm-server", "localhost:8000"], "vllm_server must be an http(s) address"),
           (["--vllm-gpu-memory", "0"], "vllm_gpu_memory must be in (0, 1]"),
           (["--engine", "gpu"], None),
           (["--objective", "diffusion", "--rule", "none", "--engine", "vllm"],
            "objective diffusion generates by iterative unmasking")]
    if not HAVE_VLLM:
        bad.append((["--engine", "vllm"], "--engine vllm needs vLLM (pip install -e '.[vllm]'"))
    for extra, message in bad:
        code = None
        try:
            code = main(["run", *base, "--run-dir", str(run_dir), *extra])
        except SystemExit as e:   # argparse refuses an unknown choice itself
            code = e.code
        assert code == 2, extra
        if message:
            assert message in cli_error_line(capsys), extra
        else:
            assert "invalid choice: 'gpu'" in capsys.readouterr().err
        assert not run_dir.exists()


def test_eval_stage_generates_through_a_vllm_server(assets, stand_in, tmp_path, capsys):
    from t3s.cli import main
    common = ["eval", "--model", str(assets / "model"), "--heldout", str(assets / "heldout.jsonl"),
              "--max-new-tokens", "6", "--verifier", "exact", "--no-progress"]
    assert main([*common, "--run-dir", str(tmp_path / "hf")]) == 0
    assert main([*common, "--run-dir", str(tmp_path / "server"), "--vllm-server",
                 stand_in.url]) == 0
    rows = {name: (tmp_path / name / "eval" / "base.jsonl").read_text() for name in ("hf", "server")}
    assert rows["hf"] == rows["server"]                 # the same answers, the same verdicts
    rpc = [b for m, p, b in stand_in.calls if p == "/collective_rpc"]
    assert [b["kwargs"]["model_dir"] for b in rpc] == [str((assets / "model").resolve())]
