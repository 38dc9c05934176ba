"""Test setup: run the real Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before `triton.jit` runs, i.e. before
t3s_kernels is imported, so it is decided here, at collection time. On a CUDA
machine the kernels run natively unless TRITON_INTERPRET=1 is set by hand.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import t3s_kernels  # noqa: E402  (after TRITON_INTERPRET)
from t3s_kernels import debug  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = list(t3s_kernels.available_backends())


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output buffer starts as NaN; unwritten elements fail the comparisons."""
    debug.OVERRIDES["poison"] = True
    yield
    debug.OVERRIDES.update(poison=False, block=None, splits=None, backward=None, cpu_block=None,
                           cpu_pack_weight=None)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): the intra-op pool costs more than their
    matmuls, and the machine is shared."""
    from t3s._util import torch_threads
    with torch_threads(1):
        yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs on every run; the seed is printed (shown on failure).

    Set T3S_TEST_SEED to replay a failing run.
    """
    seed = int(os.environ.get("T3S_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"T3S_TEST_SEED={seed}")
    yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (or set T3S_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: opt-in tests, outside the default run "
                                       "(--run-slow or T3S_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("T3S_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or T3S_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `python -m t3s demo --quick` for the whole test run, its output captured (not
    a terminal), as a log redirected to a file is: (directory, exit status, seconds, the
    output). Tests may rerun stages in it but must not change its settings."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("demo") / "quick"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "t3s", "demo", "--quick", "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root,
                          timeout=1200)
    return out, proc.returncode, time.perf_counter() - t, proc.stdout.decode("utf-8", "replace")
