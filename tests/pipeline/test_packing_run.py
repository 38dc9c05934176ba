"""`--packing` and `--attn-implementation` through `t3s`: a tiny pilot, selection and
retraining with packed batches select the same tokens as with padded ones (Δc and the
training losses within fp32 rounding), the settings enter the stages' identity, and bad
values are refused before any work.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tiny import cli_error_line as error_line, write_run_assets  # noqa: E402

from t3s.cli import main  # noqa: E402
from t3s.data import collate  # noqa: E402
from t3s.pipeline.settings import DEFAULTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_run_assets(tmp_path_factory.mktemp("assets"), n_train=8, n_heldout=2)


def settings(assets, run_dir):
    return ["--model", str(assets / "model"), "--train", str(assets / "train.jsonl"),
            "--steps", "4", "--eval-steps", "2", "--eval-subset", "4", "--batch-size", "4",
            "--max-new-tokens", "4", "--lr", "1e-2", "--baseline", "none", "--no-progress",
            "--no-agreement",
            "--run-dir", str(run_dir)]


def test_packing_on_and_off_select_the_same_tokens(assets, tmp_path, monkeypatch):
    packed_batches = []
    call = collate.PackedCollator.__call__
    monkeypatch.setattr(collate.PackedCollator, "__call__",
                        lambda self, exs: packed_batches.append(len(exs)) or call(self, exs))
    runs = {}
    for packing in ("off", "on"):
        runs[packing] = tmp_path / packing
        for command in ("pilot", "select", "train"):
            assert main([command, *settings(assets, runs[packing]), "--packing", packing]) == 0
        if packing == "off":
            assert packed_batches == []
    assert len(packed_batches) >= 8   # the pilot's and the retraining's batches packed
    off, on = runs["off"], runs["on"]
    a = pq.read_table(off / "select" / "selection.parquet")
    b = pq.read_table(on / "select" / "selection.parquet")
    for col in ("example_id", "position", "loss_mask"):
        assert a[col].to_pylist() == b[col].to_pylist()
    np.testing.assert_allclose(b["delta"].to_numpy(), a["delta"].to_numpy(), atol=1e-4)
    for stage in ("pilot", "train"):
        la = [r["loss"] for r in json.loads((off / stage / "log_history.json").read_text())
              if "loss" in r]
        lb = [r["loss"] for r in json.loads((on / stage / "log_history.json").read_text())
              if "loss" in r]
        np.testing.assert_allclose(lb, la, rtol=1e-4)
    ident = json.loads((on / "config.json").read_text())["identity"]
    assert ident["packing"] == "on" and ident["attn_implementation"] == "auto"


def test_attention_settings_enter_the_training_and_profiling_stages_hashes():
    """Off their defaults they change the hashes of the stages that train or profile; at
    them, the hashes are those of runs made before the settings existed."""
    from t3s._util import sha256_json
    from t3s.pipeline.engine import stage_hash
    from t3s.pipeline.settings import identity, normalize_config
    from t3s.pipeline.stages import STAGES
    cfg = normalize_config({})
    ident = identity(cfg, {})
    for stage in STAGES:
        old = sha256_json({k: ident.get(k, cfg.get(k)) for k in stage.keys
                           if k not in ("attn_implementation", "packing")
                           and k not in ("samples", "temperature", "top_p", "engine", "student",
                                         "artifact")})
        assert stage_hash(stage, cfg, {}) == old, stage.name
        for change in ({"packing": "on"}, {"attn_implementation": "eager"}):
            moved = stage_hash(stage, normalize_config(change), {}) != stage_hash(stage, cfg, {})
            trains = stage.name in ("pilot", "select", "train", "baseline", "arms", "analyze",
                                    "sensitivity")
            assert moved == (trains or (stage.name == "eval" and "attn" in str(change))), \
                (stage.name, change)


def test_attention_settings_are_checked_before_any_work(assets, tmp_path, capsys):
    assert DEFAULTS["packing"] == "auto" and DEFAULTS["attn_implementation"] == "auto"
    run_dir = tmp_path / "bad"
    assert main(["pilot", *settings(assets, run_dir), "--packing", "sometimes"]) == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("packing: maybe\n")
    assert main(["pilot", *settings(assets, run_dir), "--config", str(yaml_file)]) == 2
    assert "packing must be one of auto, on, off, got 'maybe'" in error_line(capsys)
    assert main(["pilot", *settings(assets, run_dir), "--attn-implementation",
                 "flash_attention_2"]) == 2
    line = error_line(capsys)
    assert "flash_attention_2" in line
    assert not (run_dir / "pilot").exists()
