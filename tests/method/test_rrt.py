"""t3s.weights (t3s.rrt): theta_RRT = theta_0 + (theta_final - theta_b), on state dicts and safetensors."""

import json
import os

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from t3s.weights import load_state_dict, rrt, save_rrt  # noqa: E402

DTYPES = {"w32": torch.float32, "w16": torch.float16, "wbf": torch.bfloat16,
          "w64": torch.float64}


def random_state(seed_shift=0.0):
    state = {f"layer.{name}": (torch.randn(7, 5) + seed_shift).to(dtype)
             for name, dtype in DTYPES.items()}
    state["layer.bias"] = torch.randn(5)
    state["buffer.steps"] = torch.randint(0, 1000, (3,))
    state["buffer.flag"] = torch.tensor([True, False])
    return state


def expected_rrt(t0, tb, tf):
    out = {}
    for k in tf:
        if tf[k].dtype == torch.bool:
            out[k] = t0[k]
        elif tf[k].dtype.is_floating_point:
            cd = torch.promote_types(tf[k].dtype, torch.float32)
            out[k] = (t0[k].to(cd) + (tf[k].to(cd) - tb[k].to(cd))).to(tf[k].dtype)
        else:
            out[k] = t0[k] + (tf[k] - tb[k])
    return out


def three_states():
    t0 = random_state()
    tb = {k: v.clone() for k, v in random_state(0.5).items()}
    tf = {k: v.clone() for k, v in random_state(-0.5).items()}
    tb["buffer.flag"] = tf["buffer.flag"] = t0["buffer.flag"].clone()
    return t0, tb, tf


def assert_state_equal(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_rrt_on_state_dicts():
    t0, tb, tf = three_states()
    out = rrt(t0, tb, tf)
    assert_state_equal(out, expected_rrt(t0, tb, tf))
    # sanity of the formula: theta_b == theta_final gives theta_0 exactly,
    # theta_b == theta_0 gives theta_final up to one rounding
    assert_state_equal(rrt(t0, tf, tf), t0)
    back = rrt(t0, t0, tf)
    for k in tf:
        torch.testing.assert_close(back[k], tf[k], msg=k)
    # low-precision tensors are combined in float32: in bfloat16, 1 - 2**-9 would round
    # to 1 and the result would be 0 instead of -2**-9
    bf = lambda x: {"w": torch.tensor([x], dtype=torch.bfloat16)}  # noqa: E731
    assert rrt(bf(-1.0), bf(2.0 ** -9), bf(1.0))["w"].item() == -(2.0 ** -9)
    # inputs untouched
    assert_state_equal(rrt(t0, tb, tf), out)


def test_key_shape_dtype_mismatch_errors():
    t0, tb, tf = three_states()
    missing = {k: v for k, v in tb.items() if k != "layer.w32"}
    with pytest.raises(ValueError, match=r"missing from theta_b \(e\.g\. \['layer\.w32'\]\)"):
        rrt(t0, missing, tf)
    extra = dict(t0, **{"extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError,
                       match=r"theta0 not in theta_final \(e\.g\. \['extra\.weight'\]\)"):
        rrt(extra, tb, tf)
    with pytest.raises(ValueError, match="'layer.w32' has shape"):
        rrt(t0, dict(tb, **{"layer.w32": torch.zeros(5, 7)}), tf)
    with pytest.raises(ValueError, match="'layer.w32' has dtype torch.float16 in theta_b"):
        rrt(t0, dict(tb, **{"layer.w32": tb["layer.w32"].half()}), tf)
    with pytest.raises(ValueError, match="boolean tensors differ"):
        rrt(t0, dict(tb, **{"buffer.flag": ~tb["buffer.flag"]}), tf)
    with pytest.raises(TypeError, match="must be a state dict or a path"):
        rrt(t0, tb, 3)
    with pytest.raises(TypeError, match="not a tensor"):
        rrt(t0, tb, dict(tf, junk=1.0))


def test_safetensors_single_files_and_mixed_inputs(tmp_path):
    t0, tb, tf = three_states()
    paths = []
    for name, state in (("t0", t0), ("tb", tb), ("tf", tf)):
        path = tmp_path / f"{name}.safetensors"
        safetensors_torch.save_file(state, str(path))
        paths.append(str(path))
    want = expected_rrt(t0, tb, tf)
    got = rrt(*paths)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a mix of paths and in-memory dicts
    mixed = rrt(paths[0], tb, paths[2])
    for k in want:
        assert torch.equal(mixed[k], want[k]), k
    # save: a .safetensors target is one file, with format metadata for from_pretrained
    out = save_rrt(*paths, tmp_path / "out" / "rrt.safetensors")
    assert out.endswith("rrt.safetensors")
    loaded = load_state_dict(out)
    for k in want:
        assert torch.equal(loaded[k], want[k]), k
    from safetensors import safe_open
    with safe_open(out, framework="pt") as fh:
        assert fh.metadata()["format"] == "pt"
    # any other target is a directory receiving model.safetensors
    out_dir = save_rrt(t0, tb, tf, tmp_path / "out_dir")
    assert out_dir == str(tmp_path / "out_dir")
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))


def _write_sharded(state, directory, n_shards=3):
    os.makedirs(directory, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n_shards]}
        safetensors_torch.save_file(part, os.path.join(directory, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump({"note": "copied"}, fh)


def test_sharded_directories(tmp_path):
    t0, tb, tf = three_states()
    for name, state in (("t0", t0), ("tb", tb), ("tf", tf)):
        _write_sharded(state, tmp_path / name)
    want = expected_rrt(t0, tb, tf)
    got = rrt(tmp_path / "t0", tmp_path / "tb", tmp_path / "tf")
    for k in want:
        assert torch.equal(got[k], want[k]), k

    out = save_rrt(tmp_path / "t0", tmp_path / "tb", tmp_path / "tf", tmp_path / "out")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    source_index = json.load(open(tmp_path / "tf" / "model.safetensors.index.json"))
    assert index["weight_map"] == source_index["weight_map"]  # same shard layout
    assert json.load(open(os.path.join(out, "config.json"))) == {"note": "copied"}
    loaded = load_state_dict(out)
    for k in want:
        assert torch.equal(loaded[k], want[k]), k

    with pytest.raises(ValueError, match="is one of the inputs"):
        save_rrt(tmp_path / "t0", tmp_path / "tb", tmp_path / "tf", tmp_path / "tf")

    # a shard that disagrees with its index, and a missing shard, are errors
    bad = tmp_path / "bad"
    _write_sharded(tf, bad)
    safetensors_torch.save_file({"x": torch.zeros(1)},
                                str(bad / "model-00001-of-00003.safetensors"))
    with pytest.raises(ValueError, match="does not hold the keys its index lists"):
        rrt(t0, tb, bad)
    os.remove(bad / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        rrt(t0, tb, bad)


def test_refuses_pickle_and_missing_paths(tmp_path):
    t0, tb, tf = three_states()
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        rrt(t0, tb, str(pickled))
    only_pickle = tmp_path / "ckpt"
    only_pickle.mkdir()
    (only_pickle / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        rrt(t0, tb, only_pickle)
    with pytest.raises(FileNotFoundError, match="no such file"):
        rrt(t0, tb, tmp_path / "nowhere.safetensors")


def test_hf_sharded_checkpoint_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    models = [transformers.LlamaForCausalLM(config) for _ in range(3)]
    for model, name in zip(models, ("t0", "tb", "tf")):
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "tf" / "model.safetensors.index.json")
    out = save_rrt(tmp_path / "t0", tmp_path / "tb", tmp_path / "tf", tmp_path / "rrt")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    sd = [m.state_dict() for m in models]
    for k, v in loaded.state_dict().items():
        want = sd[0][k] + (sd[2][k] - sd[1][k])
        torch.testing.assert_close(v, want, rtol=0, atol=1e-6, msg=k)
