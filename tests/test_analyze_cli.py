"""`t3s analyze RUN_DIR` on a small demo run: every key and figure, the report's section,
resuming, and bad parameters (one run, shared by the module: about 25 s on 2 quiet cores)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from t3s.cli import main  # noqa: E402
from t3s.pipeline.analysis_report import SECTION_TITLE  # noqa: E402
from t3s.pipeline.rundir import ANALYSIS_FIGURES  # noqa: E402

#: a smaller-than-quick demo: 6 steps, every evaluated checkpoint kept
SMALL = dict(steps=6, eval_steps=3, eval_subset=4, batch_size=8,
             trace_counts={2: 8, 3: 8, 4: 4}, heldout_size=4, four_term_size=2,
             baseline="none", analyze=False, keep_checkpoints=True, progress=False)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    import t3s.demo as demo
    out = tmp_path_factory.mktemp("analyze") / "run"
    demo.main(quick=True, out=str(out), say=lambda s: None, **SMALL)
    assert not (out / "analyze").exists()            # analyze is off under these settings
    rc = main(["analyze", str(out), "--no-progress", "--analysis-param", "examples=8",
               "--analysis-param", "transfer_at=theta0,thetab,train:3"])
    return out, rc


def test_analyze_writes_every_key_and_figure(analysed):
    out, rc = analysed
    assert rc == 0
    res = json.loads((out / "analyze" / "analysis.json").read_text())
    for key in ("grad_norm_ratio", "grad_cosine", "transfer_matrix", "static_auc", "shock",
                "checkpoints", "parameters", "examples", "groups"):
        assert key in res, key
    assert res["groups"]["names"] == ["anchors", "rest"]
    assert res["examples"] == {"analysed": 8, "of": 20, "seed": 0}
    # θ0, the pilot's checkpoint at step 3 and its final model; T3S at 3 and its model
    assert sorted(res["grad_norm_ratio"]["pilot"], key=int) == ["0", "3", "6"]
    assert sorted(res["grad_cosine"]["t3s"], key=int) == ["0", "3", "6"]
    for series in res["grad_cosine"].values():
        assert all(-1.0 <= c <= 1.0 for c in series.values())
    for series in res["grad_norm_ratio"].values():
        assert all(r > 0 for r in series.values())
    assert set(res["transfer_matrix"]) == {"θ0", "θb", "T3S 3"}
    for t in res["transfer_matrix"].values():
        assert len(t["matrix"]) == 2 and all(len(r) == 2 for r in t["matrix"])
        assert t["matrix"][0][0] < 0 and t["matrix"][1][1] < 0     # a step lowers its own loss
        assert t["lr"] > 0 and t["steps"] == 1
    assert set(res["static_auc"]) == {"confidence", "entropy", "grad_norm"}
    assert all(0.0 <= v <= 1.0 for v in res["static_auc"].values())
    below = res["shock"]["below_theta0"]
    assert below["step"] == sorted(below["step"]) and len(below["step"]) >= 5
    assert all(0.0 <= f <= 1.0 for f in below["fraction_below"])
    for fname in ANALYSIS_FIGURES.values():
        for folder in ("analyze", "report"):
            data = (out / folder / fname).read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 1000, (folder, fname)
    # the report carries the section, with the subset stated and the figures linked
    text = (out / "report" / "report.md").read_text()
    section = text.split(SECTION_TITLE)[1]
    assert "Computed on 8 of the 20 training traces" in section
    assert "every parameter" in section and "Gradient-norm ratio" in section
    for fname in ANALYSIS_FIGURES.values():
        assert f"]({fname})" in section


def test_analyze_resumes_and_refuses_bad_parameters(analysed, capsys):
    out, _ = analysed
    capsys.readouterr()
    assert main(["analyze", str(out), "--no-progress", "--analysis-param", "examples=8",
                 "--analysis-param", "transfer_at=theta0,thetab,train:3"]) == 0
    assert "[analyze] already done" in capsys.readouterr().out
    for param, message in (("nope=1", "unknown analysis parameter"),
                           ("transfer_lr=-1", "transfer_lr"), ("last_layers=x", "last_layers")):
        assert main(["analyze", str(out), "--no-progress", "--analysis-param", param]) == 2
        assert message in capsys.readouterr().err
    # refused before any work: the finished analysis is still in place
    assert (out / "analyze" / "analysis.json").is_file()
    assert main(["analyze", str(out), "--no-progress", "--analysis-param", "transfer_at=pilot:2"]) == 2
    assert "not retained" in capsys.readouterr().err
