"""Every `t3s` command shown in the README and the docs parses with the real parser.

Which text counts as a command:
- the files: README.md, docs/*.md and the shipped runs' write-ups docs/*/README.md (not
  the generated reports below them);
- the code in them: fenced blocks marked ```bash, ```sh, ```shell or ```console, and
  blocks indented by four spaces after a blank line (outside any fenced block);
- the commands: backslash continuations are joined, `#` comments dropped, and each line
  is cut at `&&`, `||`, `;` and `|`.

A command is a t3s command when it starts with `t3s`, or when it runs `-m t3s` (under
`torchrun`, `accelerate launch` or `python`); its argv is what follows `t3s`. It must
parse: `t3s.cli.build_parser().parse_args(argv)` raises no error and names a subcommand.
Skipped, and only these: a command with a shell variable or substitution (`$`, a
backtick) and one that writes optional parts in brackets (`[--out DIR]`), since neither
is meant to be pasted as it is. Placeholders in capitals (`DIR`, `RUN_DIR`) stay: they
are values to the parser, which reads no file.

Besides, every file of the repository that a code line names (a word starting with
`examples/`, `scripts/`, `tests/` or `benchmarks/`) must exist.

The cheap commands are also run: those that act on an existing run directory (`runs/x`,
no `--model`, `--train` or `--overwrite`: resuming, `t3s analyze`), on a copy of the
session's quick demo, where each must exit 0. `t3s demo --quick` itself is the session's
quick demo (tests/conftest.py), so the test checks that the docs show it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELL_FENCES = {"bash", "sh", "shell", "console"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|scripts|tests|benchmarks)/[\w./-]*\w)")


def doc_files():
    docs = ROOT / "docs"
    return [ROOT / "README.md"] + sorted(docs.glob("*.md")) + sorted(docs.glob("*/README.md"))


def code_lines(text: str):
    """The shell lines of one Markdown text: fenced shell blocks and indented blocks."""
    lines, fence, previous_blank, in_indented = [], None, True, False
    for line in text.splitlines():
        match = FENCE.match(line)
        if match:
            fence = None if fence is not None else match.group(1).lower()
            in_indented = False
        elif fence is not None:
            if fence in SHELL_FENCES:
                lines.append(line.strip())
        elif line.startswith("    ") and line.strip() and (previous_blank or in_indented):
            lines.append(line.strip())
            in_indented = True
        elif line.strip():
            in_indented = False
        previous_blank = not line.strip()
    return lines


def commands(lines):
    """Join continuations, drop comments, cut at && || ; | into word lists."""
    joined, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    out = []
    for line in joined:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = []
        for word in list(lexer) + [";"]:
            if word and set(word) <= set(";&|"):
                if words:
                    out.append((line, words))
                words = []
            else:
                words.append(word)
    return out


def t3s_argv(words):
    """What follows `t3s` in a t3s command, else None."""
    if words[0] == "t3s":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "t3s":
            return words[i + 2:]
    return None


def shown_commands():
    found = []
    for path in doc_files():
        for line, words in commands(code_lines(path.read_text(encoding="utf-8"))):
            argv = t3s_argv(words)
            if argv is None or "$" in line or "`" in line or re.search(r"\[-", line):
                continue
            found.append((str(path.relative_to(ROOT)), line, argv))
    return found


def parse_error(argv):
    """The parser's complaint about argv, or None when it parses."""
    from t3s.cli import build_parser

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            return stderr.getvalue().strip().splitlines()[-1]
    return None if getattr(args, "command", None) else "no subcommand"


def test_every_t3s_command_in_the_docs_parses():
    shown = shown_commands()
    assert len(shown) >= 10, shown
    assert {file for file, _, _ in shown} >= {"README.md", "docs/cli.md", "docs/distributed.md"}
    bad = [f"{file}: {line}\n    {error}" for file, line, argv in shown
           if (error := parse_error(argv))]
    assert not bad, "\n".join(bad)


def test_every_repository_file_a_command_names_exists():
    named = [(path, word) for path in doc_files()
             for line in code_lines(path.read_text(encoding="utf-8"))
             for word in REPO_PATH.findall(line)]
    assert named
    missing = [f"{path.relative_to(ROOT)}: {word}" for path, word in named
               if not (ROOT / word).exists()]
    assert not missing, missing


#: the run directory the docs' cheap commands act on
RUN_DIR_WORD = "runs/x"
#: what makes a command expensive: a new run, or a run started afresh
EXPENSIVE = {"--model", "--train", "--overwrite", "--redo"}


def cheap_commands(shown):
    """The shown commands that act on the existing run directory ``runs/x`` alone."""
    return [(file, line, argv) for file, line, argv in shown
            if argv and argv[0] in ("run", "analyze") and RUN_DIR_WORD in argv
            and not EXPENSIVE & set(argv)]


def test_the_cheap_commands_in_the_docs_run(quick_demo, tmp_path):
    import shutil

    from t3s.cli import main

    out, rc, _, log = quick_demo
    assert rc == 0, log[-3000:]
    shown = shown_commands()
    assert any(argv == ["demo", "--quick"] for _, _, argv in shown)  # the session's demo
    cheap = cheap_commands(shown)
    assert {argv[0] for _, _, argv in cheap} == {"run", "analyze"}, cheap
    run = tmp_path / "x"
    shutil.copytree(out, run)
    for file, line, argv in cheap:
        argv = [str(run) if word == RUN_DIR_WORD else word for word in argv]
        assert main([*argv, "--no-progress"]) == 0, f"{file}: {line}"


def test_the_command_check_can_fail():
    text = ("Run:\n\n```bash\nt3s run --model m --no-such-flag 1   # a comment\n"
            "t3s demo --quick && t3s demo --seeds 0,1 --out runs/d\n"
            "torchrun --nproc_per_node 2 -m t3s demo \\\n    --quick\n```\n\n"
            "    t3s analyze RUN_DIR --analysis-param examples=4\n\n"
            "    PYTHONPATH=$PWD t3s demo [--quick]\n")
    found = [(line, t3s_argv(words)) for line, words in commands(code_lines(text))
             if t3s_argv(words) is not None]
    argvs = [argv for _, argv in found]
    assert argvs[:4] == [["run", "--model", "m", "--no-such-flag", "1"], ["demo", "--quick"],
                         ["demo", "--seeds", "0,1", "--out", "runs/d"], ["demo", "--quick"]]
    assert argvs[4] == ["analyze", "RUN_DIR", "--analysis-param", "examples=4"]
    assert "unrecognized arguments: --no-such-flag 1" in parse_error(argvs[0])
    assert [parse_error(a) for a in argvs[1:5]] == [None] * 4
    assert parse_error([]) == "no subcommand"
    assert parse_error(["run", "--steps", "many"]) is not None
    assert REPO_PATH.findall("python examples/quickstart.py --x runs/tests/a") == [
        "examples/quickstart.py"]
    assert cheap_commands([("f", "l", ["run", "--run-dir", "runs/x"]),
                           ("f", "l", ["analyze", "runs/x", "--analysis-param", "examples=0"]),
                           ("f", "l", ["run", "--model", "m", "--run-dir", "runs/x"]),
                           ("f", "l", ["run", "--run-dir", "runs/x", "--redo", "eval"]),
                           ("f", "l", ["sensitivity", "runs/x"])]) == [
        ("f", "l", ["run", "--run-dir", "runs/x"]),
        ("f", "l", ["analyze", "runs/x", "--analysis-param", "examples=0"])]


@pytest.mark.parametrize("line", ["t3s run --run-dir $DIR", "t3s demo `echo --quick`",
                                  "t3s demo [--quick]"])
def test_commands_not_meant_to_be_pasted_are_skipped(line, tmp_path, monkeypatch):
    page = tmp_path / "README.md"
    page.write_text(f"```bash\n{line}\n```\n", encoding="utf-8")
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "doc_files", lambda: [page])
    assert shown_commands() == []
