"""The adapter for the public FlashLLA kernel (lla_verify/registry/impls.py), checked without it.

The public kernel needs a CUDA GPU. Here a stand-in package named ``flashlla``, written
to a temporary folder put on sys.path, has the public call: ``lla_attention(q, k, v, *,
ridge_lambda=0.01, qk_scale=None, delta_eps, cg_atol, cg_rtol, cg_max_iters,
cg_use_preconditioner)`` on (batch, seqlen, head_dim) tensors, a float lambda turned into
a tensor of q's dtype, a tensor lambda expanded to (batch, seqlen), q, k, v cast to bf16,
o returned in bf16, and an autograd backward giving dq, dk, dv in bf16 and None for
lambda. It computes with the float64 oracle, so anything these tests catch is the
adapter's or the budget's doing. The last test reads the real source (with ``ast``, no
import) and checks that these assumptions are the public code's.
"""

import ast
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests import repo_scripts
from lla_verify.audit.cell import backward_check
from lla_verify.budget.backward import check_backward
from lla_verify.budget.forward import check_forward, kernel_view
from lla_verify.registry.cases import Case, Problem
from lla_verify.registry.impls import get_impl, is_available, with_overrides
from lla_verify.oracles.float64 import lla_forward
from lla_contract import LLAInputError

REPO = Path(__file__).resolve().parents[1]

STAND_IN = textwrap.dedent('''
    """Stand-in for the public flashlla package: its call and dtype handling, the float64 oracle inside."""
    import torch

    from lla_verify.oracles.float64 import lla_forward

    CALLS = []          # (q shape, lambda as received, qk_scale) per call
    GRAD_PLANT = {}     # name -> factor put on that gradient (a planted backward bug)


    def _oracle(q, k, v, lam, scale):
        lam64 = lam.to(torch.float64).expand(q.shape[0], q.shape[1])
        o = lla_forward(q.to(torch.float64)[:, None], k.to(torch.float64)[:, None], v.to(torch.float64)[:, None],
                        ridge_lambda=lam64[:, None], qk_scale=scale)
        return o[:, 0]


    class LLAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, ridge_lambda, qk_scale, delta_eps, cg_atol, cg_rtol, cg_max_iters,
                    cg_use_preconditioner):
            qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
            ctx.save_for_backward(qb, kb, vb, ridge_lambda)
            ctx.scale = qk_scale
            o = _oracle(qb, kb, vb, ridge_lambda, qk_scale).to(torch.bfloat16)
            return o, torch.ones(q.shape[:-1], dtype=torch.float32, device=q.device)

        @staticmethod
        def backward(ctx, grad_o, grad_w):
            qb, kb, vb, lam = ctx.saved_tensors
            with torch.enable_grad():
                x = [t.to(torch.float64).requires_grad_(True) for t in (qb, kb, vb)]
                o = _oracle(*x, lam, ctx.scale)
                g = torch.autograd.grad(o, x, grad_o.to(torch.float64))
            g = [gi * GRAD_PLANT.get(n, 1.0) for gi, n in zip(g, ("dq", "dk", "dv"))]
            return (*(gi.to(torch.bfloat16) for gi in g), None, None, None, None, None, None, None)


    def lla_attention(q, k, v, *, ridge_lambda=0.01, qk_scale=None, delta_eps=1e-12, cg_atol=1e-12,
                      cg_rtol=1e-12, cg_max_iters=32, cg_use_preconditioner=False):
        assert q.dim() == 3, "flashlla takes (batch, seqlen, head_dim)"
        CALLS.append((tuple(q.shape), ridge_lambda, qk_scale))
        if qk_scale is None:
            qk_scale = q.shape[-1] ** -0.5
        if not isinstance(ridge_lambda, torch.Tensor):
            ridge_lambda = torch.tensor(ridge_lambda, device=q.device, dtype=q.dtype)
        o, _ = LLAFunction.apply(q, k, v, ridge_lambda, float(qk_scale), delta_eps, cg_atol, cg_rtol,
                                 cg_max_iters, cg_use_preconditioner)
        return o
''')


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    pkg = tmp_path / "flashlla"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flashlla", raising=False)
    import flashlla

    yield flashlla
    sys.modules.pop("flashlla", None)


def _impl():
    # the record says CUDA only; the stand-in runs anywhere
    return with_overrides(get_impl("flashlla"), devices=("cpu", "cuda"))


def _bf16_oracle(p: Problem, lam) -> torch.Tensor:
    """The stand-in's own result for one (B, H) slice layout: oracle of the bf16 inputs, rounded to bf16."""
    q, k, v = (t.to(torch.bfloat16).to(torch.float64) for t in (p.q, p.k, p.v))
    return lla_forward(q, k, v, ridge_lambda=lam, qk_scale=p.qk_scale).to(torch.bfloat16)


def test_the_record_names_what_it_computes_and_checks():
    impl = get_impl("flashlla")
    assert impl.input_dtype is torch.bfloat16 and impl.output_dtype is torch.bfloat16
    assert impl.lambda_dtype == "input"
    assert impl.supports_grad and impl.grads == ("dq", "dk", "dv")
    assert "None for ridge_lambda" in impl.skip_reason("dlambda")
    assert impl.skip_reason("grad") is None and impl.per_query_lambda
    assert impl.head_dims == (16, 32, 64, 128)
    assert impl.supports(dtype=torch.float32, head_dim=64) is None
    assert impl.supports(dtype=torch.bfloat16, head_dim=128) is None
    assert "head_dim 48" in impl.supports(head_dim=48)  # not a power of two: no Triton block shape
    assert impl.supports(dtype=torch.float16)  # a float lambda would be rounded to fp16
    assert is_available(impl, "cpu")  # CUDA only, even where importable


def test_heads_fold_into_its_batch_and_come_back_in_place(stand_in):
    p = Case("gaussian", {"lam": 0.5}, B=2, H=3, S=13, D=16, dtype="bfloat16", seed=4).build()
    o = _impl().forward(p.q, p.k, p.v, ridge_lambda=0.5, qk_scale=p.qk_scale)
    assert o.shape == p.v.shape and o.dtype == p.q.dtype
    assert stand_in.CALLS == [((6, 13, 16), 0.5, p.qk_scale)]
    for b in range(2):
        for h in range(3):
            sl = lambda t: t[b:b + 1, h:h + 1]  # noqa: E731
            one = Problem(p.case, sl(p.q), sl(p.k), sl(p.v), 0.5, p.qk_scale)
            want = _bf16_oracle(one, torch.tensor(0.5, dtype=torch.bfloat16).double())
            torch.testing.assert_close(o[b, h], want[0, 0], rtol=0, atol=0)


def test_per_query_lambda_reaches_each_head_in_q_dtype(stand_in):
    p = Case("lambda_decades", {"lam_lo": 1e-3, "decades": 4.0}, B=2, H=2, S=11, D=16, dtype="bfloat16",
             seed=3).build()
    assert isinstance(p.ridge_lambda, torch.Tensor) and p.ridge_lambda.unique().numel() > 4
    o = _impl().forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=None)
    got = stand_in.CALLS[-1][1]
    assert isinstance(got, torch.Tensor) and got.shape == (4, 11) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, p.lam_tensor.reshape(4, 11).to(torch.bfloat16), rtol=0, atol=0)
    assert check_forward(p, _impl(), o).passed


def test_a_float_lambda_is_left_for_the_kernel_to_round(stand_in):
    p = Case("gaussian", {}, B=1, H=1, S=5, D=16, dtype="float32", seed=1).build()
    _impl().forward(p.q, p.k, p.v, ridge_lambda=0.3, qk_scale=None)
    assert stand_in.CALLS[-1][1] == 0.3 and isinstance(stand_in.CALLS[-1][1], float)


@pytest.mark.parametrize("bad, match", [
    (dict(ridge_lambda=torch.ones(3)), "ridge_lambda: shape"),
    (dict(ridge_lambda=-1.0), "ridge_lambda: expected values >= 0"),
    (dict(qk_scale=-2.0), "qk_scale"),
    (dict(q3=True), r"q: expected shape \(B, H, S, D\)"),
])
def test_bad_arguments_are_refused_by_name(stand_in, bad, match):
    p = Case("gaussian", {}, B=1, H=2, S=5, D=16, seed=1).build()
    kw = {"ridge_lambda": 0.1, "qk_scale": None, **bad}
    qkv = (p.q[0], p.k[0], p.v[0]) if kw.pop("q3", False) else (p.q, p.k, p.v)
    with pytest.raises(LLAInputError, match=match):
        _impl().forward(*qkv, **kw)
    assert not stand_in.CALLS


def test_kernel_view_rounds_as_the_record_says():
    p = Case("lambda_decades", {}, B=1, H=2, S=7, D=16, dtype="float32", seed=2).build()
    seen = kernel_view(p, get_impl("flashlla"))
    for n in ("q", "k", "v"):
        assert getattr(seen, n).dtype == torch.bfloat16
        torch.testing.assert_close(getattr(seen, n), getattr(p, n).to(torch.bfloat16), rtol=0, atol=0)
    # lambda follows q's dtype as given: float32 here, so unchanged
    torch.testing.assert_close(seen.ridge_lambda, p.ridge_lambda, rtol=0, atol=0)
    pb = Case("gaussian", {"lam": 0.3}, B=1, H=1, S=7, D=16, dtype="bfloat16", seed=2).build()
    assert kernel_view(pb, get_impl("flashlla")).ridge_lambda == float(torch.tensor(0.3, dtype=torch.bfloat16))
    assert kernel_view(pb, get_impl("triton")) is pb


# an offset of norm 30 on q and k: o is very sensitive to rounding q and k, so bf16
# input rounding is far outside an fp32-input budget
SENSITIVE = Case("offset", {"offset": 30.0, "lam": 0.01}, B=1, H=2, S=24, D=16, dtype="float32", seed=5)


def test_fp32_inputs_are_judged_on_their_bf16_rounding(stand_in):
    p = SENSITIVE.build()
    impl = _impl()
    o = impl.forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    assert o.dtype == torch.float32
    verdict = check_forward(p, impl, o)
    assert verdict.passed, verdict.message
    assert "q, k, v rounded to bfloat16" in verdict.message
    # the rounding matters on this case: judged as if computed from the fp32 inputs, the
    # same output fails (what the budget would do without kernel_view)
    blind = with_overrides(impl, input_dtype=None, lambda_dtype=None)
    assert not check_forward(p, blind, o).passed


def test_a_bf16_lambda_is_judged_as_rounded(stand_in):
    """bf16 inputs: the kernel holds lambda in bf16 (0.3 becomes 0.30078125), and so does the budget.

    The end-to-end verdict alone does not show it: on every family tried (early, spectrum,
    lambda_decades, bandwidth, subspace at small lambda) moving lambda by its bf16
    rounding stays inside the bf16 output rounding; the view is what is asserted.
    """
    p = Case("spectrum", {"kappa": 1e3, "lam_rel": 1e-3}, B=1, H=1, S=24, D=16, dtype="bfloat16", seed=1).build()
    lam = torch.full((1, 1, 24), 0.3)
    lam[..., 1::2] = 0.7
    p = Problem(p.case, p.q, p.k, p.v, lam, p.qk_scale)
    impl = _impl()
    seen = kernel_view(p, impl)
    torch.testing.assert_close(seen.lam_tensor, lam.to(torch.bfloat16).double(), rtol=0, atol=0)
    assert not torch.equal(seen.lam_tensor, p.lam_tensor)
    o = impl.forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    v = check_forward(p, impl, o)
    assert v.passed and "lambda to bfloat16" in v.message, v.message


def test_dq_dk_dv_are_checked_and_dlambda_is_reported_not_checked(stand_in):
    p = Case("gaussian", {"lam": 0.1}, B=1, H=2, S=12, D=16, dtype="float32", seed=0).build()
    impl = _impl()
    v = check_backward(p, impl)
    assert v.passed, v.message
    assert v.summary["grads_checked"] == ["dq", "dk", "dv"] and v.summary["grads_not_checked"] == ["dlambda"]
    assert "dlambda  not checked: flashlla's LLAFunction.backward returns None" in v.message
    assert "(dq, dk, dv only)" in v.message
    rec = backward_check(p, impl)
    assert rec["status"] == "checked" and rec["grads_not_checked"] == ["dlambda"]


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_a_wrong_gradient_fails_by_name(stand_in, name):
    stand_in.GRAD_PLANT[name] = 1.05
    p = Case("gaussian", {"lam": 0.1}, B=1, H=1, S=12, D=16, dtype="bfloat16", seed=0).build()
    v = check_backward(p, _impl())
    assert not v.passed and v.summary["worst_tensor"] == name, v.message


def test_a_record_naming_dlambda_without_returning_it_fails(stand_in):
    # the capability is the record's word: claiming dlambda when the kernel returns None
    # is a missing gradient, never a pass
    p = Case("gaussian", {"lam": 0.1}, B=1, H=1, S=6, D=16, dtype="float32", seed=0).build()
    v = check_backward(p, with_overrides(_impl(), grads=("dq", "dk", "dv", "dlambda")))
    assert not v.passed and "dlambda  missing" in v.message


# ------------------------------------------------------------------ the real source
def _public_source() -> Path | None:
    env = os.environ.get("FLASHLLA_SRC")
    for root in ([Path(env)] if env else []) + [REPO.parent / "shared" / "third_party" / "FlashLLA"]:
        if (root / "flashlla" / "ops" / "__init__.py").is_file():
            return root
    return None


def _const(node):
    return ast.literal_eval(node)


def test_assumed_api_matches_the_public_source():
    """What _flashlla_forward and the record assume, read from the public code."""
    root = _public_source()
    if root is None:
        pytest.skip("public FlashLLA source not found: set FLASHLLA_SRC or place it at "
                    f"{REPO.parent / 'shared' / 'third_party' / 'FlashLLA'}")
    tree = ast.parse((root / "flashlla" / "ops" / "__init__.py").read_text())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    # lla_attention(q, k, v, *, ridge_lambda=0.01, qk_scale=None, ...): keyword-only lambda and scale
    la = funcs["lla_attention"].args
    assert [a.arg for a in la.args] == ["q", "k", "v"]
    kw = {a.arg: _const(d) for a, d in zip(la.kwonlyargs, la.kw_defaults)}
    assert kw == {"ridge_lambda": 0.01, "qk_scale": None, "delta_eps": 1e-12, "cg_atol": 1e-12,
                  "cg_rtol": 1e-12, "cg_max_iters": 32, "cg_use_preconditioner": False}
    body = ast.unparse(funcs["lla_attention"])
    # a float lambda becomes a tensor of q's dtype (Impl.lambda_dtype "input"); a tensor passes
    assert "torch.tensor(ridge_lambda, device=q.device, dtype=q.dtype)" in body
    assert "not isinstance(ridge_lambda, torch.Tensor)" in body
    call = next(n for n in ast.walk(funcs["lla_attention"]) if isinstance(n, ast.Call)
                and ast.unparse(n.func) == "LLAFunction.apply")
    assert [ast.unparse(a) for a in call.args] == ["q", "k", "v", "ridge_lambda", "float(qk_scale)", "delta_eps",
                                                   "cg_atol", "cg_rtol", "cg_max_iters", "cg_use_preconditioner"]
    assert "return o" in body  # o alone, not (o, omega)

    fn = classes["LLAFunction"]
    fwd = next(n for n in fn.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    bwd = next(n for n in fn.body if isinstance(n, ast.FunctionDef) and n.name == "backward")
    assert [a.arg for a in fwd.args.args] == ["ctx", "q", "k", "v", "ridge_lambda", "qk_scale", "delta_eps",
                                              "cg_atol", "cg_rtol", "cg_max_iters", "cg_use_preconditioner"]
    # q, k, v cast to bf16 before the kernel (Impl.input_dtype)
    assert "lla_forward(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)" in ast.unparse(fwd)
    # backward: dq, dk, dv, then None for ridge_lambda (Impl.grads, skips["dlambda"])
    ret = [n for n in ast.walk(bwd) if isinstance(n, ast.Return)][-1]
    outs = [ast.unparse(e) for e in ret.value.elts]
    assert outs[:4] == ["grad_q", "grad_k", "grad_v", "None"] and len(outs) == 10

    # the output is bf16 (Impl.output_dtype): stored from fp32 through .to(tl.bfloat16)
    fwd_src = (root / "flashlla" / "ops" / "forward.py").read_text()
    assert "tl.store(o_block_ptr, Or.to(tl.bfloat16)" in fwd_src
    # HEAD_DIM is a constexpr block dimension (Impl.head_dims: powers of two, >= 16 for tl.dot)
    assert "HEAD_DIM: tl.constexpr" in fwd_src and "block_shape=(ROW_TILE_SIZE, HEAD_DIM)" in fwd_src
    # lambda expands to (batch, seqlen): the adapter passes (B H, S)
    assert "ridge_lambda.expand(BATCH_SIZE, N_QUERIES)" in fwd_src


# ------------------------------------------------------------------ the GPU job's checker
SYNTHETIC_SUITE = textwrap.dedent('''
    import pytest
    from hypothesis import given, settings, strategies as st

    from lla_verify.registry.impls import get_impl
    from lla_contract import LLAInputError

    MODE = {mode!r}

    def test_forward_accuracy():
        assert False, "[flashlla] forward FAIL ratio 267 on gaussian:lam=1:B=1,H=1,S=4,D=16"

    def test_gradients():
        if MODE == "grads_pass":
            return
        raise AssertionError("[flashlla] backward FAIL ratio 66 (dq, dk, dv only) on gaussian:lam=1")

    @settings(max_examples=50, database=None, derandomize=True)
    @given(st.integers(0, 10))
    def test_two_distinct_assertions(x):
        if x > 5:
            assert False, "identity off"
        if x > 2:
            raise AssertionError("another identity off")

    def test_adapter():
        if MODE == "adapter_error":
            raise LLAInputError("flashlla: ridge_lambda must be one value")

    def test_skips():
        if MODE == "foreign_skip":
            pytest.skip("flashlla does not accept head_dim 32")
        pytest.skip(get_impl("flashlla").skip_reason("dlambda"))
''')


def _checker():
    return repo_scripts.load("flashlla_suite_check")


@pytest.mark.parametrize("mode, problem", [
    ("as_expected", None),
    ("adapter_error", "harness errors"),
    ("foreign_skip", "skips the record does not name"),
    ("grads_pass", "no gradient failure"),
])
def test_the_gpu_jobs_checker_accepts_only_the_documented_failures(tmp_path, mode, problem):
    import subprocess

    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC_SUITE.format(mode=mode))
    xml = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                          "-c", os.devnull, f"--junitxml={xml}", str(tmp_path / "test_synthetic.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stdout[-2000:]
    res = _checker().judge(xml.read_text(), get_impl("flashlla").skips, pytest_rc=run.returncode)
    assert len(res["forward_failures"]) == 1 and res["record_skips"] == (0 if mode == "foreign_skip" else 1)
    assert any("test_two_distinct_assertions" in f for f in res["other_failures"]), res
    if problem is None:
        assert res["problems"] == [], res
    else:
        assert any(problem in p for p in res["problems"]), res
    if mode == "adapter_error":
        assert any("LLAInputError" in e for e in res["harness_errors"]), res


def test_goldens_compare_judges_the_rounded_inputs_and_says_so(stand_in):
    """An fp32 golden: the stand-in computes from its bf16 rounding; the verdict is taken on
    that rounding, the stored-reference check (of the unrounded inputs) is left out and named."""
    from lla_verify.goldens.compare import compare
    from lla_verify.goldens.store import DEFAULT_DIR

    _, results = compare(DEFAULT_DIR, _impl(), device="cpu", only=["duplicates-pool4-f32-S64-D16"])
    (res,) = results
    assert res.skipped is None and "stored" not in res.checks, res
    assert res.checks["forward"] <= 1.0 and res.checks["oracle"] <= 1.0, res
    assert "flashlla rounds these inputs (q, k, v)" in res.notes, res.notes


def test_identities_allow_the_rounding_the_kernel_applies():
    """properties/test_identities.py and the dv-sum property allow io_roundoff: bf16 for the
    public kernel even on fp32 inputs (with the problem's fp32 roundoff, the exact stand-in
    failed partition of unity at ratio 2.9e3 and the first token at 3.4e3 on fp32 draws)."""
    from lla_verify.budget.forward import io_roundoff

    p32 = Case("gaussian", {}, B=1, H=1, S=4, D=16, dtype="float32").build()
    pbf = Case("gaussian", {}, B=1, H=1, S=4, D=16, dtype="bfloat16").build()
    assert io_roundoff(p32, get_impl("flashlla")) == 2.0 ** -8
    assert io_roundoff(pbf, get_impl("flashlla")) == 2.0 ** -8
    assert io_roundoff(p32, get_impl("triton")) == 2.0 ** -24
    assert io_roundoff(pbf, get_impl("triton")) == 2.0 ** -8


def test_the_checker_holds_failures_outside_the_implementation_against_the_harness():
    xml = ('<testsuites><testsuite>'
           '<testcase classname="properties.test_forward_accuracy" name="f"><failure message="AssertionError: '
           '[flashlla] forward FAIL ratio 9">E   AssertionError: [flashlla] forward FAIL</failure></testcase>'
           '<testcase classname="properties.test_gradients" name="g"><failure message="AssertionError: '
           '[flashlla] backward FAIL ratio 9 (dq, dk, dv only)">E   AssertionError: x</failure></testcase>'
           '<testcase classname="properties.test_cg_convergence" name="c"><failure message="AssertionError: '
           'Torch not compiled with CUDA enabled">E   AssertionError: Torch not compiled</failure></testcase>'
           '</testsuite></testsuites>')
    res = _checker().judge(xml, get_impl("flashlla").skips, pytest_rc=1)
    assert len(res["harness_errors"]) == 1 and "does not call flashlla" in res["harness_errors"][0], res
    assert any("harness errors" in p for p in res["problems"]), res


def test_the_checker_does_not_count_unnamed_entries_as_passes():
    # an interrupted xdist run leaves <testcase time="..."/> entries with no name and no result
    xml = ('<testsuites><testsuite>'
           '<testcase classname="properties.test_forward_accuracy" name="f"><failure message="AssertionError: '
           '[flashlla] forward FAIL ratio 9">E   AssertionError: [flashlla] forward FAIL</failure></testcase>'
           '<testcase classname="properties.test_identities" name="p" time="1.0"/>'
           '<testcase time="0.5"/><testcase time="0.0"/>'
           '</testsuite></testsuites>')
    res = _checker().judge(xml, get_impl("flashlla").skips, pytest_rc=1)
    assert (res["tests"], res["passed"], res["unnamed"]) == (2, 1, 2), res
    assert any("2 testcase entries without a name" in p for p in res["problems"]), res


def _xml(*cases: str) -> str:
    return "<testsuites><testsuite>" + "".join(cases) + "</testsuite></testsuites>"


_FWD_FAIL = ('<testcase classname="properties.test_forward_accuracy" name="f"><failure message="AssertionError: '
             '[flashlla] forward FAIL ratio 9">E   AssertionError: [flashlla] forward FAIL</failure></testcase>')
_GRAD_FAIL = ('<testcase classname="properties.test_gradients" name="g"><failure message="AssertionError: '
              '[flashlla] backward FAIL ratio 9 (dq, dk, dv only)">E   AssertionError: x</failure></testcase>')


def _skip(name: str, msg: str) -> str:
    from xml.sax.saxutils import quoteattr

    return f'<testcase classname="properties.test_forward_accuracy" name="{name}"><skipped message={quoteattr(msg)}/></testcase>'


def test_a_refused_dtype_is_skipped_with_the_records_reason_and_counted_as_declared():
    """The float16 pins are skipped for flashlla: the skip names the record's reason, and the
    checker counts it as declared; the same refusal without a reason is not."""
    impl = get_impl("flashlla")
    msg = impl.supports(dtype=torch.float16)
    assert msg and impl.refusals["dtype:torch.float16"] in msg, msg
    assert impl.supports(dtype=torch.bfloat16) is None
    bare = f"flashlla does not accept dtype torch.float16 (accepts {[str(d) for d in impl.dtypes]})"
    res = _checker().judge(_xml(_FWD_FAIL, _GRAD_FAIL, _skip("a", msg), _skip("b", bare)),
                           impl.declared_skips(), pytest_rc=1)
    assert res["record_skips"] == 1 and len(res["bad_skips"]) == 1 and "b:" in res["bad_skips"][0], res
    assert any("1 skips the record does not name" in p for p in res["problems"]), res


def test_the_parts_of_a_split_run_are_judged_together():
    chk, skips = _checker(), get_impl("flashlla").declared_skips()
    a, b = _xml(_FWD_FAIL), _xml(_GRAD_FAIL)
    whole = chk.judge([a, b], skips, pytest_rc=[1, 1])
    assert whole["problems"] == [] and whole["tests"] == 2, whole
    # a part alone lacks the other's failure: judged as the whole run it is a problem, as a part it is not
    alone = chk.judge(a, skips, pytest_rc=1)
    assert any("no gradient failure" in p for p in alone["problems"]), alone
    assert chk.judge(a, skips, pytest_rc=1, part=True)["problems"] == []
    # one interrupted part leaves the whole incomplete; every part passing is a detection lost
    assert chk.judge([a, b], skips, pytest_rc=[1, 2])["incomplete"]
    assert any("pytest passed" in p for p in chk.judge([a, b], skips, pytest_rc=[0, 0])["problems"])
    with pytest.raises(ValueError, match="pytest_rc"):
        chk.judge([a, b], skips, pytest_rc=[1])


def test_a_whole_run_must_cover_every_lla_property_file_and_hold_each_test_once():
    chk, skips = _checker(), get_impl("flashlla").declared_skips()
    expected = chk.expected_modules(REPO / "properties")
    assert {"test_forward_accuracy", "test_gradients", "test_identities"} <= expected
    assert not expected & {"test_parallax", "test_decode"}, expected
    cover = "".join(f'<testcase classname="properties.{m}" name="t"/>' for m in sorted(expected))
    whole = chk.judge([_xml(_FWD_FAIL, cover), _xml(_GRAD_FAIL)], skips, pytest_rc=[1, 1], expect_modules=expected)
    assert whole["problems"] == [], whole
    # a part left out (here: the identities) is named, for the whole run; a part alone is not asked
    short = "".join(f'<testcase classname="properties.{m}" name="t"/>' for m in sorted(expected - {"test_identities"}))
    res = chk.judge([_xml(_FWD_FAIL, short), _xml(_GRAD_FAIL)], skips, pytest_rc=[1, 1], expect_modules=expected)
    assert any("test_identities" in p and "does not cover" in p for p in res["problems"]), res
    assert chk.judge(_xml(_FWD_FAIL, short), skips, pytest_rc=1, part=True, expect_modules=expected)["problems"] == []
    # the same part given twice
    twice = chk.judge([_xml(_FWD_FAIL, _GRAD_FAIL), _xml(_GRAD_FAIL)], skips, pytest_rc=[1, 1])
    assert any("ran more than once" in p for p in twice["problems"]), twice


def test_a_split_run_is_complete_when_every_collected_test_has_a_result():
    """A part cut short (rc 2) is made whole by the part that ran what it left: judged
    against the suite's collected tests, not the parts' exit statuses."""
    chk, skips = _checker(), get_impl("flashlla").declared_skips()
    collected = {"properties.test_forward_accuracy::f", "properties.test_gradients::g"}
    cut = _xml(_FWD_FAIL, '<testcase time="0.5"/>')  # g was still running when the part was stopped
    res = chk.judge([cut, _xml(_GRAD_FAIL)], skips, pytest_rc=[2, 1], collected=collected)
    assert not res["incomplete"] and res["problems"] == [], res
    assert any("cut short" in n for n in res["notes"]) and any("without a name" in n for n in res["notes"]), res
    # without the part that ran g: g is named as missing and the run is incomplete
    res = chk.judge([cut], skips, pytest_rc=[2], collected=collected)
    assert res["incomplete"] and any("1 of the 2 collected tests have no result" in p and "test_gradients::g" in p
                                     for p in res["problems"]), res
    assert any("without a name" in p for p in res["problems"]), res
    # a result for a test the suite does not hold: another version of the suite
    res = chk.judge([_xml(_FWD_FAIL, _GRAD_FAIL)], skips, pytest_rc=[1], collected={"properties.test_gradients::g"})
    assert any("does not collect" in p and "test_forward_accuracy::f" in p for p in res["problems"]), res
    # without the collected list an interrupted part still leaves the run incomplete
    assert chk.judge([cut, _xml(_GRAD_FAIL)], skips, pytest_rc=[2, 1])["incomplete"]


def test_the_checker_collects_the_lla_suite_as_the_gpu_job_runs_it():
    chk = _checker()
    assert chk.read_collected("properties/test_limits.py::test_a[x:y=1]\n\n3 tests collected in 0.1s\n") == {
        "properties.test_limits::test_a[x:y=1]"}
    ids = chk.collect_suite("flashlla")
    modules = {i.split("::")[0].rsplit(".", 1)[-1] for i in ids}
    assert modules == chk.expected_modules(REPO / "properties"), modules
    assert "properties.test_gradients::test_dv_sums_to_total_cotangent" in ids
    assert any(i.startswith("properties.test_forward_accuracy::test_forward_within_budget[") for i in ids)


STAND_IN_RECORD = textwrap.dedent('''
    from dataclasses import replace

    from lla_verify.registry.impls import get_impl

    _rec = replace(get_impl("flashlla"), name="flashlla-stand-in", devices=("cpu", "cuda"))


    def fwd(q, k, v, *, ridge_lambda, qk_scale=None):
        return _rec.forward(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


    fwd.lla_impl_record = _rec
''')


def test_an_exact_kernel_that_rounds_its_inputs_passes_the_limits(tmp_path):
    """The stand-in (the float64 oracle on bf16-rounded inputs, bf16 output) is right, so
    every limit property passes it: the limits are taken on the inputs it computes from.
    Taken on the unrounded inputs, the softmax limit's gap stops shrinking at the
    rounding's effect (a rate of 1.3 per decade instead of 10) and the property fails."""
    import subprocess

    (tmp_path / "flashlla").mkdir()
    (tmp_path / "flashlla" / "__init__.py").write_text(STAND_IN)
    (tmp_path / "standin_record.py").write_text(STAND_IN_RECORD)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--hypothesis-profile", "ci",
                          "--lla-impl", "standin_record:fwd", "--lla-device", "cpu", "properties/test_limits.py"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
