"""The run's identity sees every byte of a model: fingerprints of model directories with
the same file names and sizes but other content differ (also past the 64 MiB that
earlier versions hashed), `t3s` reruns the stages built from a re-saved model, and the
per-file digest cache is used, survives corruption and never trusts a changed file."""

import hashlib
import json
import os

import pytest

from t3s.pipeline.settings import digests, fingerprint_path


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    """A cache of the test's own, and every digest recordable at once (files written by
    the test are younger than `SETTLE_NS`)."""
    path = tmp_path / "cache" / "fingerprints.json"
    monkeypatch.setenv("T3S_FINGERPRINT_CACHE", str(path))
    monkeypatch.setattr(digests, "SETTLE_NS", -10**12)
    return path


@pytest.fixture
def hashed(monkeypatch):
    """The paths whose content is read, in order."""
    calls = []
    real = digests._hash

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(digests, "_hash", counting)
    return calls


def model_dir(root, weights: bytes, *, mtime_ns=1_700_000_000_000_000_000):
    """A model-like directory: weights, a config, a hidden file; fixed mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / ".hidden").write_text("not part of the model")
    for name in ("model.safetensors", "config.json"):
        os.utime(root / name, ns=(mtime_ns, mtime_ns))
    return root


def test_same_names_sizes_and_mtimes_but_other_content_differ(tmp_path):
    a = model_dir(tmp_path / "a", b"\x01" * 4096)
    b = model_dir(tmp_path / "b", b"\x02" * 4096)
    assert fingerprint_path(str(a)) != fingerprint_path(str(b))
    c = model_dir(tmp_path / "c", b"\x01" * 4096)   # the same content elsewhere: the same
    assert fingerprint_path(str(a)) == fingerprint_path(str(c))
    (c / ".hidden").write_text("other")                # hidden files are not read
    assert fingerprint_path(str(a)) == fingerprint_path(str(c))


def test_content_past_64_mib_counts(tmp_path):
    """Earlier versions hashed only files up to 64 MiB; sparse files keep this cheap."""
    size = (64 << 20) + 4096
    fps = []
    for i, byte in enumerate((b"\x00", b"\x07")):
        d = tmp_path / f"m{i}"
        d.mkdir()
        with open(d / "model.safetensors", "wb") as f:
            f.truncate(size)
            f.seek(size - 10)
            f.write(byte)
        fps.append(fingerprint_path(str(d)))
    assert fps[0] != fps[1]


def test_small_files_keep_the_earlier_fingerprint(tmp_path):
    """A data file, and a directory of files under 64 MiB, fingerprint as before, so the
    run directories made before stay the same runs."""
    d = model_dir(tmp_path / "m", b"weights" * 100)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        data = (d / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + hashlib.sha256(data).hexdigest().encode())
    assert fingerprint_path(str(d)) == h.hexdigest()
    f = d / "config.json"
    assert fingerprint_path(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert fingerprint_path(None) is None and fingerprint_path(str(tmp_path / "no")) is None


def test_repeat_runs_read_nothing_and_a_change_is_read_again(tmp_path, cache_file, hashed):
    d = model_dir(tmp_path / "m", b"\x01" * 4096)
    first = fingerprint_path(str(d))
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert json.loads(cache_file.read_text())["files"]
    hashed.clear()
    assert fingerprint_path(str(d)) == first and hashed == []
    # re-saved in place: same name, size and mtime (set back), other bytes. The ctime,
    # which no program can set, moves, so the cached digest is not used
    weights = d / "model.safetensors"
    before = os.stat(weights)
    weights.write_bytes(b"\x02" * 4096)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_size == before.st_size
    assert fingerprint_path(str(d)) != first and hashed == ["model.safetensors"]


def test_a_corrupt_or_foreign_cache_is_ignored_and_rebuilt(tmp_path, cache_file, hashed):
    d = model_dir(tmp_path / "m", b"\x01" * 4096)
    expected = fingerprint_path(str(d))
    for junk in (b"\x00\xffnot json", b"[1, 2]", b'{"format": "other", "files": {}}',
                 b'{"format": "t3s-file-digests-1", "files": {"x": 3}}'):
        cache_file.write_bytes(junk)
        hashed.clear()
        assert fingerprint_path(str(d)) == expected
        assert hashed
        assert json.loads(cache_file.read_text())["format"] == "t3s-file-digests-1"
    # an entry whose digest was tampered with but whose key no longer matches is not used
    data = json.loads(cache_file.read_text())
    for entry in data["files"].values():
        entry["sha256"] = "0" * 64
        entry["key"][1] += 1   # another mtime
    cache_file.write_text(json.dumps(data))
    assert fingerprint_path(str(d)) == expected
    assert not list(cache_file.parent.glob(".fingerprints-*"))   # no temporary file left


def test_unrecordable_digests_are_not_cached(tmp_path, cache_file, hashed, monkeypatch):
    """A file written moments ago (a write could still come in the same timestamp
    tick), an unwritable cache and a cache turned off: right digests, nothing trusted."""
    d = model_dir(tmp_path / "m", b"\x01" * 4096)
    fingerprint_path(str(d))                                   # both recorded
    (d / "config.json").write_text('{"model_type": "qwen"}')   # just now
    monkeypatch.setattr(digests, "SETTLE_NS", 2_000_000_000)
    expected = fingerprint_path(str(d))
    hashed.clear()
    assert fingerprint_path(str(d)) == expected and hashed == ["config.json"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("T3S_FINGERPRINT_CACHE", str(blocker / "cache.json"))  # cannot exist
    assert fingerprint_path(str(d)) == expected
    monkeypatch.setenv("T3S_FINGERPRINT_CACHE", "off")
    assert digests.cache_path() is None
    hashed.clear()
    assert fingerprint_path(str(d)) == expected and len(hashed) == 2


def test_a_re_saved_model_reruns_the_stages_built_from_it(tmp_path, capsys, monkeypatch):
    """`t3s pilot` on a model, the model re-saved at the same path with other weights
    of the same names and sizes and its old mtimes: the run directory is refused as
    another model, and --force trains the pilot again."""
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file, save_file
    from tiny import cli_error_line, write_run_assets

    from t3s._util import torch_threads
    from t3s.cli import main

    assets = write_run_assets(tmp_path / "assets", n_train=8, n_heldout=4)
    args = ["pilot", "--model", str(assets / "model"), "--train", str(assets / "train.jsonl"),
            "--heldout", str(assets / "heldout.jsonl"), "--steps", "2", "--eval-steps", "2",
            "--eval-subset", "2", "--batch-size", "4", "--max-new-tokens", "4",
            "--no-progress", "--run-dir", str(tmp_path / "run")]
    ledger = tmp_path / "run" / "stages.json"
    with torch_threads(1):
        assert main(args) == 0
        first = json.loads(ledger.read_text())["stages"]["pilot"]["run_id"]
        weights = assets / "model" / "model.safetensors"
        before = os.stat(weights)
        tensors = load_file(weights)
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()},
                  weights, metadata={"format": "pt"})
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(weights).st_size == before.st_size
        assert not torch.equal(load_file(weights)[next(iter(tensors))], next(iter(tensors.values())))
        capsys.readouterr()
        assert main(args) == 2
        assert "model (contents differ)" in cli_error_line(capsys)
        assert main(args + ["--force"]) == 0
    assert json.loads(ledger.read_text())["stages"]["pilot"]["run_id"] != first
