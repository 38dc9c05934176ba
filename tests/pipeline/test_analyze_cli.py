"""`t3s analyze RUN_DIR` on a small demo run: every key and figure, the report's section,
resuming, and bad parameters refused up front or at the stage start (one run, shared by
the module: about 25 s on 2 quiet cores, 4 minutes on a busy machine)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from t3s.cli import main  # noqa: E402
from t3s.pipeline.report.diagnostics import SECTION_TITLE  # noqa: E402
from t3s.pipeline.rundir import ANALYSIS_FIGURES  # noqa: E402

#: a smaller-than-quick demo: 6 steps, every evaluated checkpoint kept
SMALL = dict(steps=6, eval_steps=3, eval_subset=4, batch_size=8,
             trace_counts={2: 8, 3: 8, 4: 4}, heldout_size=4, four_term_size=2,
             baseline="none", arms=[], analyze=False, keep_checkpoints=True, progress=False)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    import t3s.demo as demo
    out = tmp_path_factory.mktemp("analyze") / "run"
    # the style task's gentler budget: its bottleneck is not the checkpoint removed below
    demo.main(quick=True, out=str(out), task="style", say=lambda s: None, **SMALL)
    assert not (out / "analyze").exists()            # analyze is off under these settings
    rc = main(["analyze", str(out), "--no-progress", "--analysis-param", "examples=8",
               "--analysis-param", "transfer_at=theta0,thetab,train:3"])
    return out, rc


def test_analyze_writes_every_key_and_figure(analysed):
    out, rc = analysed
    assert rc == 0
    res = json.loads((out / "analyze" / "analysis.json").read_text())
    for key in ("grad_norm_ratio", "grad_cosine", "transfer_matrix", "static_auc", "shock",
                "checkpoints", "parameters", "examples", "groups", "anchor_profile",
                "trajectory_signals"):
        assert key in res, key
    # the signals besides Δc, scored against the anchors (Δc > 0 of the recorded, online
    # trajectory): the exact Δc at the saved θb agrees closely, not to the token
    traj = res["trajectory_signals"]
    assert set(traj) == {"delta_conf", "delta_entropy", "delta_logit_grad", "kl"}
    assert traj["delta_conf"]["auc"] > 0.75 and traj["delta_conf"]["direction"] == "high"
    assert all(0.0 <= v["auc"] <= 1.0 for v in traj.values())
    # what anchors are: every trace token counted once per cut, with θ0's confidence
    profile = res["anchor_profile"]
    cuts = {r["by"] for r in profile}
    assert cuts == {"token class", "position in trace", "θ0 confidence"}
    totals = {by: sum(r["tokens"] for r in profile if r["by"] == by) for by in cuts}
    anchors = {by: sum(r["anchors"] for r in profile if r["by"] == by) for by in cuts}
    assert len(set(totals.values())) == 1 and len(set(anchors.values())) == 1, (totals, anchors)
    assert 0 < anchors["token class"] < totals["token class"]
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
    assert "What anchors are" in section and "formatting and punctuation" in section
    assert "changed from θ0 to θb" in section and "delta_entropy" in section
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
    for param, message in (("transfer_at=pilot:2", "pilot:2 is never saved"),
                           ("transfer_at=pilot:7", "pilot:7 is past the last step"),
                           ("examples=21", "examples=21 but the training data"),
                           ("groups=anchors,other", "unknown group(s) other"),
                           ("last_layers=5", "has 4 decoder layers")):
        assert main(["analyze", str(out), "--no-progress", "--analysis-param", param]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (param, err)
    assert json.loads((out / "analyze" / "analysis.json").read_text())["examples"]["analysed"] == 8


def test_what_only_the_pilot_tells_fails_at_the_stage_start(analysed, tmp_path, capsys):
    """A checkpoint the settings would save but the run does not hold (removed here):
    refused when the stage starts, naming the retained ones, before any gradient."""
    import shutil
    out, _ = analysed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "pilot" / "checkpoint-3")
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress", "--analysis-param", "examples=8",
                 "--analysis-param", "transfer_at=pilot:3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "pilot:3 not retained in this run (retained: " in err[0], err
    assert "theta0, thetab, final, t3s_final, pilot:0, pilot:6, train:0, train:3" in err[0]
    assert "‖∇" not in captured.out and "traces; groups" not in captured.out
    # refused before the stage replaces anything: the finished analysis is still there
    assert json.loads((run / "analyze" / "analysis.json").read_text())["examples"]["analysed"] == 8
    assert "[analyze] running" not in captured.out
    # over max_parameters: refused once θ0's subset is known, before its gradients
    assert main(["analyze", str(run), "--no-progress", "--analysis-param", "examples=8",
                 "--analysis-param", "max_parameters=1000"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "(> max_parameters=1,000; their 2 gradients would take" in err[0]
    assert "last_layers=K" in err[0] and "‖∇" not in captured.out
    assert not (run / "analyze" / "analysis.json").exists() or \
        json.loads((run / "analyze" / "analysis.json").read_text())["params"]["max_parameters"] != 1000


def test_run_refuses_bad_analysis_parameters_before_any_stage(analysed, tmp_path, capsys):
    out, _ = analysed
    cfg = json.loads((out / "config.json").read_text())["config"]
    base = ["run", "--model", cfg["model"], "--train", cfg["train"], "--run-dir",
            str(tmp_path / "fresh"), "--steps", "4", "--eval-steps", "2", "--no-progress",
            "--analyze"]
    capsys.readouterr()
    for param, message in (("transfer_at=pilot:5", "pilot:5 is past the last step"),
                           ("transfer_at=train:3", "train:3 is never saved"),
                           ("groups=anchors,selected", "unknown group(s) selected")):
        assert main(base + ["--analysis-param", param]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (param, err)
        assert not (tmp_path / "fresh" / "pilot").exists()


# ----------------------------------------------------------------------------- refused up front
def _cfg(tmp_path, **over):
    """Settings as `t3s run` resolves them, with a 5-trace training file and a 4-layer
    model directory (config.json only: analysis_settings reads nothing else)."""
    from t3s.pipeline.settings import DEFAULTS
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (tmp_path / "train.jsonl").write_text("".join('{"prompt": "p", "response": "r"}\n\n'
                                                  for _ in range(5)))
    cfg = dict(DEFAULTS, model=str(tmp_path / "model"), train=str(tmp_path / "train.jsonl"),
               steps=10, eval_steps=5)
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("params, message", [
    ({"transfer_at": "pilot:15"}, "pilot:15 is past the last step of the pilot (steps: 10)"),
    ({"transfer_at": "train:11"}, "train:11 is past the last step of the T3S retraining"),
    ({"transfer_at": "pilot:3"}, "pilot:3 is never saved (the pilot saves a checkpoint every 5"),
    ({"transfer_at": "theta0,bottleneck"}, "unknown checkpoint 'bottleneck'"),
    ({"transfer_at": "pilot:x"}, "unknown checkpoint 'pilot:x'"),
    ({"groups": "anchors,others"}, "unknown group(s) others (this run's rule 'anchor' gives "
                                   "anchors, rest)"),
    ({"groups": "anchors"}, "must name each of anchors, rest once"),
    ({"groups": "rest,rest"}, "must name each of anchors, rest once"),
    ({"examples": 6}, "examples=6 but the training data"),
    ({"examples": -1}, "examples must be an integer >= 0"),
    ({"last_layers": 5}, "last_layers=5 but the model"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"max_parameters": 1.5}, "max_parameters must be an integer"),
    ({"transfer_steps": 0}, "transfer_steps must be an integer >= 1"),
])
def test_bad_analysis_parameters_are_refused_up_front(tmp_path, params, message):
    from t3s.pipeline.diagnostics import analysis_settings
    from t3s.pipeline.settings import UsageError
    with pytest.raises(UsageError) as info:
        analysis_settings(_cfg(tmp_path, analysis_params=params))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_analysis_parameters_the_settings_allow(tmp_path):
    from t3s.pipeline.diagnostics import analysis_settings
    from t3s.pipeline.settings import UsageError
    p = analysis_settings(_cfg(tmp_path, analysis_params={
        "transfer_at": "theta0, pilot:5,pilot:10,train:0,final,theta0", "groups": "rest,anchors",
        "examples": 5, "last_layers": 4}))
    assert p["transfer_at"] == ["theta0", "pilot:5", "pilot:10", "train:0", "final"]  # deduplicated
    assert p["groups"] == ["rest", "anchors"] and p["examples"] == 5 and p["last_layers"] == 4
    assert analysis_settings(_cfg(tmp_path, analysis_params={"transfer_at": ""}))["transfer_at"] == []
    # checkpoint_steps 2 with eval_steps 5: the pilot saves every gcd = 1 step
    assert analysis_settings(_cfg(tmp_path, checkpoint_steps=2,
                                  analysis_params={"transfer_at": "pilot:3"}))
    # other rules name their group "selected"; rule none analyses the anchors
    assert analysis_settings(_cfg(tmp_path, rule="random",
                                  analysis_params={"groups": "rest,selected"}))["groups"]
    assert analysis_settings(_cfg(tmp_path, rule="none",
                                  analysis_params={"groups": "anchors,rest"}))["groups"]
    # a diffusion run's retraining trains the diffusion LM: not analysed
    with pytest.raises(UsageError, match="t3s_final is a checkpoint of the diffusion LM"):
        analysis_settings(_cfg(tmp_path, objective="diffusion", rule="forced",
                               analysis_params={"transfer_at": "t3s_final"}))
    # with the stages about to run known: a step only keep_checkpoints would keep
    for at, pending, message in (("pilot:5", ["pilot", "select", "analyze"], "keeps only θb"),
                                 ("train:5", ["train", "analyze"], "only its final model")):
        with pytest.raises(UsageError, match="needs --keep-checkpoints") as info:
            analysis_settings(_cfg(tmp_path, analysis_params={"transfer_at": at}), pending)
        assert message in str(info.value)
        assert analysis_settings(_cfg(tmp_path, keep_checkpoints=True,
                                      analysis_params={"transfer_at": at}), pending)
        assert analysis_settings(_cfg(tmp_path, analysis_params={"transfer_at": at}), ["analyze"])


def test_rule_none_analyses_the_anchor_groups_of_the_same_delta(analysed, tmp_path, capsys):
    """Rule none (plain SFT) leaves no token out: `t3s analyze` groups the tokens as the
    anchor rule does on the same Δc, and says so. The retraining is then the pilot itself,
    so the T3S series equals the pilot's at the same steps."""
    import shutil
    out, _ = analysed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run), "--rule", "none", "--analyze", "--force",
                 "--no-progress", "--analysis-param", "examples=8",
                 "--analysis-param", "transfer_at=theta0,thetab"]) == 0
    said = capsys.readouterr().out
    assert "[analyze] rule none leaves every token in the loss: the groups are the anchor " \
           "rule's (Δc > 0) on the same Δc" in said
    assert "rule none: 0 of" in said
    res = json.loads((run / "analyze" / "analysis.json").read_text())
    anchor = json.loads((out / "analyze" / "analysis.json").read_text())
    assert res["groups"]["rule"] == "anchor" and res["groups"]["names"] == ["anchors", "rest"]
    assert res["groups"]["tokens"] == anchor["groups"]["tokens"]
    for stat in ("grad_norm_ratio", "grad_cosine"):
        pilot, t3s = res[stat]["pilot"], res[stat]["t3s"]
        assert set(t3s) == {"0", "3", "6"} and set(t3s) <= set(pilot)
        for step in t3s:
            assert t3s[step] == pytest.approx(pilot[step], rel=1e-4, abs=1e-6), (stat, step)
