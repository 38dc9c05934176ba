"""The shape of the code, read from the import graph (ast; nothing is imported).

- Imports point one way: kernels (t3s_kernels) <- method (t3s's library) <- pipeline
  (t3s.pipeline and its old-path shims) <- cli / demo. Lazy imports inside functions
  count.
- No cycles between modules. An import names one module: ``from a.b import c`` is an
  edge to ``a.b.c`` when that is a module, else to ``a.b``; loading the parents of a
  package is not counted.
- No private name (leading underscore) is imported from another module.
- A module over 550 lines says why in its docstring (a line starting with "Size:").
"""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("t3s_kernels", "t3s")
MAX_LINES = 550

# layer of a module: the first matching prefix wins (longest prefixes first)
LAYERS = [
    ("t3s_kernels", 0),
    ("t3s.pipeline", 2),
    # the diffusion side lives in t3s.dllm, whose other modules are the method
    ("t3s.dllm.pipeline", 2), ("t3s.dllm.report", 2),
    ("t3s.dllm.demo", 3), ("t3s.dllm.demo_model", 3),
    ("t3s.cli", 3), ("t3s.__main__", 3), ("t3s.demo", 3),
    ("t3s", 1),
]
LAYER_NAMES = {0: "kernels", 1: "method", 2: "pipeline", 3: "cli/demo"}


def _modules():
    """module name -> (path, is_package) for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def layer(module: str) -> int:
    for prefix, lay in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return lay
    raise AssertionError(f"no layer for {module}")


def _imports(module: str):
    """(target module, imported names, line) for every internal import of ``module``."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    yield sub, [], node.lineno
                else:
                    plain.append(alias.name)
            if plain:
                yield source, plain, node.lineno


GRAPH = {m: list(_imports(m)) for m in MODULES}


def test_every_import_resolves():
    missing = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items()
               for t, _, line in edges if t not in MODULES]
    assert not missing, "\n".join(missing)


def test_imports_point_one_way():
    upward = [f"{m}:{line} ({LAYER_NAMES[layer(m)]}) imports {t} ({LAYER_NAMES[layer(t)]})"
              for m, edges in GRAPH.items() for t, _, line in edges
              if t in MODULES and layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_private_names_across_modules():
    private = [f"{m}:{line} imports {name} from {t}" for m, edges in GRAPH.items()
               for t, names, line in edges if t != m
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_long_modules_say_why():
    long = []
    for m, (path, _) in MODULES.items():
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not any(line.startswith("Size:") for line in doc.splitlines()):
                long.append(f"{m}: {n} lines and no 'Size:' line in its docstring")
    assert not long, "\n".join(long)


def _targets(module):
    return {t for t, _, _ in GRAPH[module]}


def test_the_pipeline_keeps_its_inner_order():
    """The engine does not know the stages (they register themselves) and the package
    module imports nothing."""
    assert "t3s.pipeline.stages" not in _targets("t3s.pipeline.engine")
    assert not GRAPH["t3s.pipeline"]
    demo = [m for m in MODULES if m.startswith(("t3s.demo", "t3s.dllm.demo"))]
    assert "t3s.cli" not in {t for m in demo for t in _targets(m)}


def test_the_method_package_of_dllm_imports_only_the_method():
    """`import t3s.dllm` loads the method only: its package module imports no module of
    the pipeline or demo layers, and those modules of t3s/dllm have their own layer."""
    assert {layer(t) for t in _targets("t3s.dllm")} <= {0, 1}
    assert [layer(f"t3s.dllm.{m}") for m in ("pipeline", "report", "demo", "demo_model")] == \
        [2, 2, 3, 3]
    assert layer("t3s.dllm.trainer") == layer("t3s.dllm") == 1


@pytest.mark.parametrize("source,expect", [
    ("from t3s.cli import main\n", "upward"),
    ("from .hf import _secret\n", "private"),
])
def test_the_checks_can_fail(tmp_path, monkeypatch, source, expect):
    """A planted upward import and a planted private import are caught."""
    fake = "t3s.selection_fake"
    path = tmp_path / "selection_fake.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, fake, (path, False))
    monkeypatch.setitem(GRAPH, fake, list(_imports(fake)))
    check = test_imports_point_one_way if expect == "upward" else test_no_private_names_across_modules
    with pytest.raises(AssertionError, match=expect == "upward" and "cli/demo" or "_secret"):
        check()


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import cyc_b\n")
    b.write_text("from . import cyc_a\n")
    for name, path in (("t3s.cyc_a", a), ("t3s.cyc_b", b)):
        monkeypatch.setitem(MODULES, name, (path, False))
    for name in ("t3s.cyc_a", "t3s.cyc_b"):
        monkeypatch.setitem(GRAPH, name, list(_imports(name)))
    with pytest.raises(AssertionError, match="cyc_a <-> t3s.cyc_b"):
        test_no_import_cycles()


def test_layout_table_matches_the_tree():
    """Every path the layout table of docs/layout.md names exists, and every subpackage is
    named."""
    import re

    section = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    paths = [p for line in section.splitlines() if line.startswith("| `")
             for p in re.findall(r"`([^`]+)`", line.split("|")[1])]
    assert paths
    missing = [p for p in paths if not os.path.exists(ROOT / p)]
    assert not missing, missing
    packages = {f"{m.replace('.', '/')}/" for m, (_, is_pkg) in MODULES.items()
                if is_pkg and m not in PACKAGES}
    assert not packages - set(paths), f"not in the layout table: {sorted(packages - set(paths))}"


def test_readme_links_every_docs_page():
    """The README is the front door: it links every page of docs/ (docs/*.md) and every
    shipped run's write-up (docs/*/README.md)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / link).resolve() for link in re.findall(r"\]\(([^)#\s]+)", readme)}
    pages = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs").glob("*/README.md"))
    assert len(pages) > 5
    unlinked = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not unlinked, f"not linked from README.md: {unlinked}"


#: a machine's own folders, as an absolute path in a committed text would name them
MACHINE_PATH = r"(?<![\w.~-])/(?:tmp|root|home|work|Users|private|var/folders)/"


def committed_docs():
    """The text files of docs/ and the README (generated reports, metrics, write-ups)."""
    return [ROOT / "README.md"] + sorted(
        p for p in (ROOT / "docs").rglob("*") if p.suffix in {".md", ".json", ".txt", ".yaml"})


def test_committed_docs_name_no_machine_paths_and_no_links_out_of_the_repository():
    """Every committed report and write-up is portable: no absolute path of the machine
    that generated it, and every relative link leads to a file of the repository."""
    import re

    found, outside, broken = [], [], []
    for path in committed_docs():
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(MACHINE_PATH, text)]
        if path.suffix == ".md":
            for link in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" in link or link.startswith("mailto:"):
                    continue
                target = (path.parent / link).resolve()
                if not target.is_relative_to(ROOT):
                    outside.append(f"{path.relative_to(ROOT)}: {link}")
                elif not target.exists():
                    broken.append(f"{path.relative_to(ROOT)}: {link}")
    assert len(committed_docs()) > 10
    assert not found, found
    assert not outside, outside
    assert not broken, broken


def test_the_docs_check_can_fail(tmp_path):
    import re

    assert re.search(MACHINE_PATH, '"test_set": "/tmp/pytest-1/heldout.jsonl"')
    assert re.search(MACHINE_PATH, "see `/work/main/runs/demo`")
    assert not re.search(MACHINE_PATH, "data/heldout.jsonl, ./tmp/x, t3s/work/y")


def test_no_module_shares_a_name_with_a_public_function():
    """`import t3s.x; t3s.x.y` must mean the module: no submodule of t3s is shadowed by a
    public name of the package (t3s.profile and t3s.rrt are functions; their modules are
    t3s.profiling and t3s.weights)."""
    import t3s

    shadowed = [name for name in t3s.__all__ if f"t3s.{name}" in MODULES]
    assert not shadowed, shadowed
    import t3s.profiling
    import t3s.weights
    assert t3s.profiling.profile is t3s.profile and t3s.weights.rrt is t3s.rrt
