"""The C++ CPU backend ('cpp') against the float64 reference, and its build / fallback.

The public-API option matrix runs on it in test_linear_cross_entropy.py (forward, then the
deferred backward); here: the one-pass `loss_forward_backward` called directly, tiles small
enough that every shape spans several row blocks and vocabulary chunks, thread counts,
gradient-tile skipping, the every-row-masked case, dispatch, the fallback when the build is
impossible, and the compile cache shared by processes.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS
from kernel_helpers import TOL, UNIT_ROUNDOFF, assert_close64, make_case

from t3s_kernels import debug, linear_cross_entropy, reference, target_logprobs
from t3s_kernels.backends import cpp, get_backend, resolve_backend
from t3s_kernels.prepare import LossOptions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, H, V = 37, 48, 1000
CPU = torch.device("cpu")
# 8 rows x 96 columns: 4 row blocks (the last of 5 rows) and 11 chunks (the last 40 wide).
SMALL = (8, 96)

needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS,
                               reason=f"C++ backend unavailable: {cpp.load_problem()}")

CASES = {
    "plain": {},
    "bias": {"bias": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "everything": {"bias": True, "label_smoothing": 0.05, "softcap": 5.0, "z_loss": 1e-3},
}


def test_extension_builds_where_a_toolchain_exists():
    """CI has a compiler and ninja, so a build failure fails here instead of skipping."""
    if cpp.toolchain_problem() is not None:
        pytest.skip(cpp.toolchain_problem())
    assert cpp.load_problem() is None
    assert "cpp" in BACKENDS


def _rows(n, frac=0.3):
    rows = torch.nonzero(torch.rand(n) >= frac).squeeze(1)
    return rows if rows.numel() else torch.arange(n)


def _expected(hidden, weight, bias, rows, targets, grad_scale, opts, need):
    """float64 reference forward + backward, and the |terms| sums of each GEMM element."""
    ref = get_backend("torch")
    h64, w64 = hidden.detach().double(), weight.detach().double()
    b64 = bias.detach().double() if bias is not None else None
    fwd = ref.loss_forward(h64, w64, b64, rows, targets, opts, True)
    grads = ref.loss_backward(h64, w64, b64, rows, targets, fwd.lse, grad_scale.double(), opts,
                              need)
    z = reference.logits_ref(h64[rows], w64, b64, opts.softcap)
    g = reference.logit_grad(z, fwd.lse, targets, weight.shape[0], opts.label_smoothing,
                             opts.z_loss, opts.softcap).abs() * grad_scale.double()[:, None]
    scale_h = torch.zeros_like(h64)
    scale_h[rows] = g @ w64.abs()
    return fwd, grads, (scale_h, g.T @ h64[rows].abs())


def _check(got, got_grads, exp, exp_grads, scales, dtype, targets, bias):
    assert_close64(got.loss, exp.loss, torch.float32, "loss")
    assert_close64(got.lse, exp.lse, torch.float32, "lse")
    assert_close64(got.target_logprob, exp.target_logprob, torch.float32, "target_logprob")
    assert_close64(got.entropy, exp.entropy, torch.float32, "entropy")
    assert torch.equal(got.argmax_correct, exp.argmax_correct)
    assert_close64(got_grads[0], exp_grads[0], dtype, "grad_hidden", term_scale=scales[0])
    assert_close64(got_grads[1], exp_grads[1], dtype, "grad_weight", term_scale=scales[1])
    if bias is not None:
        assert_close64(got_grads[2], exp_grads[2], dtype, "grad_bias")


@needs_cpp
@pytest.mark.parametrize("block", [None, SMALL], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_matches_float64(case, dtype, block):
    """The one-pass forward + gradient of sum_m grad_scale[m] * loss[m]."""
    debug.OVERRIDES["cpu_block"] = block
    o = CASES[case]
    # Peaked rows only at bf16 tolerance: in fp32 the p_y - 1 of a near one-hot row cancels
    # to the rounding of lse (~1e-6), a bound of any fp32 implementation, not of this one.
    hidden, weight, targets, bias = make_case(N, H, V, dtype, CPU, bias=o.get("bias", False),
                                              peaked=dtype == torch.bfloat16,
                                              requires_grad=False)
    rows = _rows(N)
    t = targets[rows].contiguous()
    opts = LossOptions(label_smoothing=o.get("label_smoothing", 0.0), z_loss=o.get("z_loss", 0.0),
                       softcap=o.get("softcap"))
    grad_scale = torch.rand(rows.numel()) + 0.5
    need = (True, True, bias is not None)
    got, got_grads = get_backend("cpp").loss_forward_backward(
        hidden, weight, bias, rows, t, grad_scale, opts, True, need)
    exp, exp_grads, scales = _expected(hidden, weight, bias, rows, t, grad_scale, opts, need)
    _check(got, got_grads, exp, exp_grads, scales, dtype, t, bias)
    assert got_grads[0].dtype == dtype and got_grads[1].dtype == dtype
    dropped = torch.ones(N, dtype=torch.bool)
    dropped[rows] = False
    assert (got_grads[0][dropped] == 0).all()


@needs_cpp
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_forward_backward_partial_needs_and_accum_dtype(which):
    debug.OVERRIDES["cpu_block"] = SMALL
    hidden, weight, targets, bias = make_case(N, H, V, torch.bfloat16, CPU, bias=True,
                                              requires_grad=False)
    rows = _rows(N)
    t = targets[rows].contiguous()
    opts = LossOptions(accum_dtype=torch.bfloat16, label_smoothing=0.1)
    need = (which == "hidden", which == "weight", False)
    grad_scale = torch.rand(rows.numel())
    _, grads = get_backend("cpp").loss_forward_backward(hidden, weight, bias, rows, t,
                                                        grad_scale, opts, False, need)
    _, exp, scales = _expected(hidden, weight, bias, rows, t, grad_scale, opts, need)
    k = 0 if which == "hidden" else 1
    assert grads[1 - k] is None and grads[2] is None
    # bf16 accumulation of grad_weight: one bf16 rounding per row block on top of the GEMM.
    assert_close64(grads[k], exp[k], torch.bfloat16, f"grad_{which}",
                   term_scale=scales[k] * (1 if k == 0 else 1 + N / SMALL[0]))


@needs_cpp
@pytest.mark.parametrize("block", [None, SMALL], ids=["default_blocks", "small_blocks"])
def test_public_api_small_tiles(block):
    """Forward + deferred backward and the stats through `linear_cross_entropy`."""
    debug.OVERRIDES["cpu_block"] = block
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, CPU, bias=True, peaked=True,
                                              ignore_frac=0.3)
    kw = dict(bias=bias, label_smoothing=0.05, softcap=5.0, z_loss=1e-3, filter_eps=None)
    loss, stats = linear_cross_entropy(hidden, weight, targets, backend="cpp", return_stats=True,
                                       **kw)
    loss.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    ref_loss, ref_stats = linear_cross_entropy(hidden, weight, targets, backend="torch",
                                               return_stats=True, **kw)
    ref_loss.backward()
    assert_close64(loss, ref_loss, torch.float32, "loss")
    for got, t, name in zip(grads, (hidden, weight, bias), ("hidden", "weight", "bias")):
        assert_close64(got, t.grad, torch.float32, f"grad_{name}")
    kept = targets != -100
    for name in ("target_logprob", "entropy", "lse"):
        assert_close64(getattr(stats, name)[kept], getattr(ref_stats, name)[kept], torch.float32,
                       name)
        assert getattr(stats, name)[~kept].isnan().all()
    assert torch.equal(stats.argmax_correct, ref_stats.argmax_correct)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_target_logprobs_small_tiles(dtype):
    debug.OVERRIDES["cpu_block"] = SMALL
    hidden, weight, targets, bias = make_case(N, H, V, dtype, CPU, bias=True, peaked=True,
                                              ignore_frac=0.2, requires_grad=False)
    out = target_logprobs(hidden, weight, targets, bias=bias, softcap=4.0, return_entropy=True,
                          return_argmax=True, backend="cpp")
    z = reference.logits_ref(hidden.double(), weight.double(), bias.double(), 4.0)
    logp = torch.log_softmax(z, dim=1)
    kept = targets != -100
    exp_lp = logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    assert_close64(out.logprobs[kept], exp_lp[kept], torch.float32, "logprobs")
    assert_close64(out.entropy[kept], -(logp.exp() * logp).sum(1)[kept], torch.float32, "entropy")
    assert torch.equal(out.argmax[kept], z.argmax(1)[kept])
    assert out.logprobs[~kept].isnan().all() and (out.argmax[~kept] == -1).all()


@needs_cpp
def test_one_and_two_threads_agree():
    debug.OVERRIDES["cpu_block"] = SMALL
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, CPU, bias=True,
                                              requires_grad=False)
    rows = _rows(N)
    t = targets[rows].contiguous()
    opts = LossOptions(label_smoothing=0.1, z_loss=1e-3)
    grad_scale = torch.rand(rows.numel())
    backend = get_backend("cpp")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(backend.loss_forward_backward(hidden, weight, bias, rows, t, grad_scale,
                                                         opts, True, (True, True, True)))
    finally:
        torch.set_num_threads(before)
    (l1, g1), (l2, g2) = results
    _, atol, rtol = TOL[torch.float32]
    for a, b in zip(list(l1[:4]) + list(g1), list(l2[:4]) + list(g2)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert torch.equal(l1.argmax_correct, l2.argmax_correct)


@needs_cpp
def test_filter_eps_skips_whole_tiles():
    """Skipped tiles contribute nothing (GEMMs included); the result stays close to exact."""
    debug.OVERRIDES["cpu_block"] = SMALL
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, CPU, requires_grad=False)
    # The first two row blocks are one-hot (target logit ~100 above the rest): every
    # gradient entry of their tiles is ~exp(-50); the other rows are O(1) logits.
    w_t = weight[targets[:16]]
    hidden[:16] = 100.0 * w_t / (w_t * w_t).sum(1, keepdim=True)
    rows = torch.arange(N)
    t = targets.contiguous()
    grad_scale = torch.rand(rows.numel()) + 0.5
    backend = get_backend("cpp")

    def run(eps):
        _, grads = backend.loss_forward_backward(hidden, weight, None, rows, t, grad_scale,
                                                 LossOptions(filter_eps=eps), False,
                                                 (True, True, False))
        return grads, backend.last_tiles

    exact, (skipped, tiles) = run(None)
    assert skipped == 0 and tiles == 11 * 5
    eps = 1e-4
    filtered, (skipped, tiles) = run(eps)
    assert 2 * 11 <= skipped < tiles
    # A skipped tile drops entries below eps (times grad_scale <= 1.5): bound per element.
    bound_h = eps * 1.5 * weight.abs().sum(0).max() + 1e-5
    bound_w = eps * 1.5 * hidden.abs().sum(0).max() + 1e-5
    assert (filtered[0] - exact[0]).abs().max() <= bound_h
    assert (filtered[1] - exact[1]).abs().max() <= bound_w
    none, (skipped, tiles) = run(1e9)
    assert skipped == tiles and (none[0] == 0).all() and (none[1] == 0).all()
    # A tile holding a non-finite value is never skipped.
    bad = hidden.clone()
    bad[rows[0], 0] = float("nan")
    _, grads = backend.loss_forward_backward(bad, weight, None, rows, t, grad_scale,
                                             LossOptions(filter_eps=1e9), False,
                                             (True, True, False))
    assert grads[0][rows[0]].isnan().all() and grads[1].isnan().any()
    assert backend.last_tiles[0] == backend.last_tiles[1] - 11  # the NaN row's block counts


@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_masked(reduction):
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, CPU, bias=True)
    mask = torch.zeros(N, dtype=torch.bool)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                reduction=reduction, backend="cpp")
    assert (loss == 0).all()
    loss.sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and (t.grad == 0).all()
    empty = torch.empty(0, dtype=torch.int64)
    out, grads = get_backend("cpp").loss_forward_backward(
        hidden, weight, bias, empty, empty, torch.empty(0), LossOptions(), True,
        (True, True, True))
    assert out.loss.shape == (0,) and all((g == 0).all() for g in grads)
    logp = target_logprobs(hidden, weight, torch.full_like(targets, -100), backend="cpp")
    assert logp.isnan().all()


@needs_cpp
def test_dispatch_picks_cpp_on_cpu_and_leaves_float64_to_the_reference():
    h = torch.randn(3, 8)
    assert resolve_backend(None, h) == "cpp"
    with pytest.warns(UserWarning, match="not using the 'cpp' backend .*float64"):
        assert resolve_backend(None, h.double()) == "torch"
    with pytest.raises(TypeError, match="backend='cpp' cannot run here: .*float64"):
        resolve_backend("cpp", h.double())


@needs_cpp
def test_bad_input_is_refused_before_any_cpp_runs(monkeypatch):
    class Forbidden:  # stands in for the compiled module
        def __getattr__(self, name):
            raise AssertionError(f"the extension's {name} ran on bad input")

    monkeypatch.setitem(cpp._STATE, "module", Forbidden())
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, CPU)
    bad = targets.clone()
    bad[3] = V
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(hidden, weight, bad, backend="cpp")
    with pytest.raises(ValueError, match="loss_mask"):
        linear_cross_entropy(hidden, weight, targets, backend="cpp",
                             loss_mask=torch.full((N,), -1.0))
    with pytest.raises(ValueError, match="weight"):
        target_logprobs(hidden, weight[:, :5], targets, backend="cpp")


@pytest.fixture
def fresh_load_state(monkeypatch):
    """Run with a forgotten load attempt; the real state comes back afterwards."""
    saved = dict(cpp._STATE)
    cpp.reset_extension()
    yield
    cpp._STATE.clear()
    cpp._STATE.update(saved)


def test_failed_build_falls_back_with_one_warning(fresh_load_state):
    token = os.urandom(4).hex()  # a message not yet warned about in this process

    def failing_build():
        raise RuntimeError(f"Error building extension ({token})\n[1/2] c++ ...\n"
                           "linear_ce.cpp:7:1: error: boom\nninja: build stopped")

    assert cpp.load_extension(loader=failing_build) is None
    assert cpp.load_problem() == (f"building the C++ extension failed: Error building extension "
                                  f"({token}) (linear_ce.cpp:7:1: error: boom)")
    # above dense.DENSE_MACS: the automatic choice streams, through dispatch
    hidden, weight, targets, _ = make_case(100, H, V, torch.float32, CPU)
    with pytest.warns(UserWarning, match=f"not using the 'cpp' backend .*{token}") as record:
        loss = linear_cross_entropy(hidden, weight, targets)
    assert len([w for w in record if token in str(w.message)]) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        ref = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, linear_cross_entropy(hidden, weight, targets,
                                                          backend="torch"))
    with pytest.raises(ValueError, match="backend='cpp' is unavailable: building"):
        linear_cross_entropy(hidden, weight, targets, backend="cpp")


@pytest.mark.parametrize("missing", ["compiler", "ninja"])
def test_missing_toolchain_is_a_reason_not_a_crash(fresh_load_state, monkeypatch, missing):
    from torch.utils import cpp_extension

    if missing == "compiler":
        monkeypatch.setattr(cpp.shutil, "which", lambda name: None)
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    else:
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpp, "_compile", lambda: pytest.fail("tried to compile"))
    assert cpp.load_extension() is None
    assert ("C++ compiler" if missing == "compiler" else "ninja") in cpp.load_problem()
    assert "cpp" not in __import__("t3s_kernels").available_backends()


def _import_in_subprocess(env):
    code = ("from t3s_kernels.backends import cpp; import sys; "
            "sys.exit(0 if cpp.load_problem() is None else 1)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@needs_cpp
def test_another_process_reuses_the_compiled_build():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = _import_in_subprocess(env)
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr


@pytest.mark.slow
def test_first_use_compiles_once_and_says_so_in_one_line(tmp_path):
    """A fresh cache directory: the first process compiles (one line), the second loads."""
    if cpp.toolchain_problem() is not None:
        pytest.skip(cpp.toolchain_problem())
    env = {**os.environ, "T3S_KERNELS_CACHE": str(tmp_path),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = _import_in_subprocess(env)
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stderr.splitlines() if "compiling" in line]
    assert len(lines) == 1 and str(tmp_path) in lines[0]
    second = _import_in_subprocess(env)
    assert second.returncode == 0 and "compiling" not in second.stderr


# ---------------------------------------------------------------------------------------
# Odd shapes, operand types and dispatch of the oneDNN micro-kernel path
# ---------------------------------------------------------------------------------------

# Odd N, odd H (an odd K for the bf16 operand pairs of the logits product), odd V (an odd
# last vocabulary chunk); (7, 95): odd row blocks and odd chunk widths.
ODD = (29, 47, 997)
ODD_BLOCK = (7, 95)
OPTS_ALL = dict(label_smoothing=0.05, z_loss=1e-3, softcap=5.0)


def _every_path(hidden, weight, bias, rows, t, grad_scale, opts):
    """The one-pass forward + backward, and the forward then the deferred backward."""
    backend = get_backend("cpp")
    need = (True, True, bias is not None)
    one_pass = backend.loss_forward_backward(hidden, weight, bias, rows, t, grad_scale, opts,
                                             True, need)
    fwd = backend.loss_forward(hidden, weight, bias, rows, t, opts, True)
    grads = backend.loss_backward(hidden, weight, bias, rows, t, fwd.lse, grad_scale, opts, need)
    return {"one_pass": one_pass, "deferred": (fwd, grads)}


def _check_odd_case(dtype):
    N_, H_, V_ = ODD
    hidden, weight, targets, bias = make_case(N_, H_, V_, dtype, CPU, bias=True,
                                              peaked=dtype != torch.float32,
                                              ignore_frac=0.2, requires_grad=False)
    rows = _rows(N_)
    t = targets[rows].clamp_min(0).contiguous()
    opts = LossOptions(**OPTS_ALL)
    grad_scale = torch.rand(rows.numel()) + 0.5
    need = (True, True, True)
    exp, exp_grads, scales = _expected(hidden, weight, bias, rows, t, grad_scale, opts, need)
    for name, (got, got_grads) in _every_path(hidden, weight, bias, rows, t, grad_scale,
                                              opts).items():
        try:
            _check(got, got_grads, exp, exp_grads, scales, dtype, t, bias)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        assert got_grads[0].dtype == dtype and got_grads[1].dtype == dtype
    # forward only, every row that is not ignored
    out = target_logprobs(hidden, weight, targets, bias=bias, softcap=OPTS_ALL["softcap"],
                          return_entropy=True, return_argmax=True, backend="cpp")
    z = reference.logits_ref(hidden.double(), weight.double(), bias.double(), OPTS_ALL["softcap"])
    logp = torch.log_softmax(z, dim=1)
    kept = targets != -100
    assert_close64(out.logprobs[kept], logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)[kept],
                   torch.float32, "logprobs")
    assert_close64(out.entropy[kept], -(logp.exp() * logp).sum(1)[kept], torch.float32, "entropy")
    assert torch.equal(out.argmax[kept], z.argmax(1)[kept])
    assert out.logprobs[~kept].isnan().all() and (out.argmax[~kept] == -1).all()


@needs_cpp
@pytest.mark.parametrize("block", [None, ODD_BLOCK], ids=["default_blocks", "odd_blocks"])
@pytest.mark.parametrize("dtype,pack", [
    (torch.float32, None), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, None),
], ids=["fp32", "bf16-W_packed_once", "bf16-W_packed_per_tile", "fp16"])
def test_odd_shapes_every_path_matches_float64(dtype, pack, block):
    """Loss, stats and gradients of the one-pass and the deferred backward, and the
    forward-only log-probs, against float64 on the same (rounded) inputs; bf16 with W
    VNNI-packed once or tile by tile (the memory budget picks)."""
    debug.OVERRIDES["cpu_block"] = block
    debug.OVERRIDES["cpu_pack_weight"] = pack
    _check_odd_case(dtype)


@needs_cpp
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_onednn_every_path_still_matches(dtype):
    """With oneDNN disabled the micro-kernels are unavailable: bf16 inputs are computed
    from float32 copies and the float32 products fall back to the BLAS."""
    debug.OVERRIDES["cpu_block"] = ODD_BLOCK
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpp.bf16_operands()
        assert "float32" in get_backend("cpp").describe(torch.ones(2, 2, dtype=dtype))
        _check_odd_case(dtype)


@needs_cpp
def test_bf16_operands_where_the_cpu_runs_the_micro_kernel():
    """On an AVX-512 CPU (CI's) bf16 inputs run as bf16 GEMM operands, and say so."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    if "avx512f" not in flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no AVX-512 here: bf16 inputs are computed in float32")
    assert cpp.bf16_operands()
    assert cpp._operand(torch.ones(3, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "bfloat16 GEMM operands" in get_backend("cpp").describe(torch.ones(2, 2).bfloat16())


@needs_cpp
@pytest.mark.parametrize("dtype,expected,how", [
    (torch.float32, "cpp", "float32 GEMM operands"),
    (torch.bfloat16, "cpp", "GEMM operands"),
    (torch.float16, "cpp", "float32 copies"),
    (torch.float64, "torch", None),
], ids=["fp32", "bf16", "fp16", "fp64"])
def test_dispatch_choice_is_logged(dtype, expected, how, caplog):
    """Each automatic choice is stated on the t3s_kernels logger at DEBUG level, with how
    the chosen backend computes."""
    import logging
    import warnings

    # above dense.DENSE_MACS: small problems take the dense path (test_dense_path.py)
    hidden, weight, targets, _ = make_case(64, 512, 1024, dtype, CPU, requires_grad=False)
    with caplog.at_level(logging.DEBUG, logger="t3s_kernels"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target_logprobs(hidden, weight, targets)
    lines = [r.getMessage() for r in caplog.records if r.name == "t3s_kernels"]
    assert any(f"backend '{expected}' for cpu" in line for line in lines), lines
    if how is not None:
        assert any(how in line for line in lines), lines


@needs_cpp
def test_a_unit_backward_hands_over_the_saved_gradients_safely():
    """loss.backward() (grad_output 1 on the CPU) gives the saved gradients to .grad without
    a copy; a retained graph still backpropagates the same gradients again, accumulation
    into an existing .grad adds, and a scaled backward scales."""
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, CPU, bias=True)
    mask = torch.rand(N) > 0.3

    def loss_fn():
        return linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                    backend="cpp")

    ref = torch.autograd.grad(loss_fn(), [hidden, weight, bias])
    loss = loss_fn()
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, bias)]
    loss.backward()  # the retained graph again: accumulates the same gradients
    for t, g, r in zip((hidden, weight, bias), first, ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(t.grad, 2 * r, rtol=1e-6, atol=1e-7)
    for t in (hidden, weight, bias):
        t.grad = None
    (loss_fn() * 0.5).backward()
    loss_fn().backward()  # into the existing .grad
    for t, r in zip((hidden, weight, bias), ref):
        torch.testing.assert_close(t.grad, 1.5 * r, rtol=1e-6, atol=1e-7)
