"""The table of operators (lla_verify/registry/operators.py) and ``lla-verify check --op``.

Each operator parses its case spec, resolves its implementations (built-ins and
MODULE:CALLABLE) and checks one across the trust boundary: a correct implementation
passes, each planted bug (lla_verify/testing/mutants.py) fails with the
implementation blamed, and an implementation that breaks the calling contract fails
its check rather than raising. CPU; the Triton built-ins run through the interpreter
(TRITON_INTERPRET=1), at S <= 24 and D = 16.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from lla_contract import LLAInputError
from lla_verify.cli import main
from lla_verify.registry.cases import Case
from lla_verify.registry.impls import Impl
from lla_verify.registry.operators import OPERATOR_NAMES, OPERATORS, get_operator

INTERP = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not INTERP, reason="the Triton built-ins need TRITON_INTERPRET=1 on CPU")

SHAPE = "B=1,H=1,S=24,D=16,dtype=float32,seed=0"
LLA_SPEC = f"gaussian:lam=1:{SHAPE}"
PX_SPEC = f"gaussian:lam=1:{SHAPE};probe=random:amp=1"
# a batch of two: the stale-length mutant is wrong on the batch's last sequence only
LLA_SPEC_B2 = "gaussian:lam=1:B=2,H=1,S=17,D=16,dtype=float32,seed=0"
PX_SPEC_B2 = LLA_SPEC_B2 + ";probe=random:amp=1"
PX_OFFSET = "offset:lam=1,offset=1000:B=1,H=1,S=24,D=16,dtype=float32,seed=0;probe=random:amp=1"
# large keys and a probe along the keys' flattest direction: where the uncentred expansion
# loses to cancellation more than the budget allows (docs/kill-list.md)
PX_LARGE_NORM = "large_norm:factor=100,lam=1:B=1,H=1,S=48,D=16,dtype=float32,seed=0;probe=small_eig:amp=1"
M = "lla_verify.testing.mutants:"


# ------------------------------------------------------------------ misbehaving implementations
# (module level, so that a worker process can import them by MODULE:CALLABLE)
def px_mutates_v(q, k, v, r, *, qk_scale=None):
    from lla_verify.oracles.parallax import parallax_dense

    o = parallax_dense(q, k, v, r, qk_scale=qk_scale)
    v.zero_()
    return o


def px_wrong_shape(q, k, v, r, *, qk_scale=None):
    return torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)


def px_exits(q, k, v, r, *, qk_scale=None):
    raise SystemExit(3)


def dec_mutates_lengths(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    from lla_verify.oracles.decode import lla_decode_reference

    o = lla_decode_reference(q, k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
    lengths.fill_(1)
    return o


def dec_returns_list(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    return [0.0]


def pxdec_raises(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    raise RuntimeError("kernel launch failed")


def pxdec_hangs(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    time.sleep(600)


def _check(op, spec, impl, backward=False):
    o = get_operator(op)
    return o.check(o.parse_case(spec), o.resolve(impl), "cpu", backward=backward)


# ------------------------------------------------------------------ the table
def test_the_table_has_the_four_operators():
    assert OPERATOR_NAMES == ("lla", "parallax", "lla-decode", "parallax-decode")
    for name, op in OPERATORS.items():
        assert op.name == name and op.default_impl in op.builtins
    assert OPERATORS["lla"].has_backward and OPERATORS["parallax"].has_backward
    assert not OPERATORS["lla-decode"].has_backward and not OPERATORS["parallax-decode"].has_backward


@pytest.mark.parametrize("op, spec", [("lla", LLA_SPEC), ("parallax", PX_SPEC), ("lla-decode", LLA_SPEC),
                                      ("parallax-decode", PX_SPEC)])
def test_case_specs_round_trip(op, spec):
    o = get_operator(op)
    case = o.parse_case(spec)
    assert o.spec(case) == spec
    assert isinstance(o.base_case(case), Case) and o.base_case(case).S == 24


@pytest.mark.parametrize("op, spec, match", [
    ("lla", "gaussian:lam=1", "expected"),
    ("parallax", LLA_SPEC, "probe="),  # a Parallax case needs its probe
    ("parallax", LLA_SPEC + ";probe=nosuch", "probe: unknown"),
    ("lla-decode", "nofamily::" + SHAPE, "family"),
    ("parallax-decode", PX_SPEC.replace("amp=1", "amp=1e9"), "amp"),
])
def test_bad_case_specs_are_refused_by_name(op, spec, match):
    with pytest.raises(LLAInputError, match=match):
        get_operator(op).parse_case(spec)


def test_unknown_operator_is_named():
    with pytest.raises(LLAInputError, match="--op: unknown operator 'nosuch'"):
        get_operator("nosuch")


@pytest.mark.parametrize("op", OPERATOR_NAMES)
def test_builtin_calls_pickle_into_the_audits_workers(op):
    """The audit sends an implementation's calls to worker processes by pickling them; one
    that does not pickle has its cells run in the audit's own process, unprotected against
    an exit or a hang (tests/test_trust.py). Every built-in's calls pickle by reference."""
    import pickle

    o = get_operator(op)
    for name in o.builtins:
        if name == "flashlla":  # resolves only where the public kernel is installed
            continue
        impl = o.resolve(name)
        for fn in (impl.forward, getattr(impl, "forward_with_stats", None)):
            if fn is not None:
                assert pickle.loads(pickle.dumps(fn)) is fn, (name, fn)


@pytest.mark.parametrize("op", OPERATOR_NAMES)
def test_builtins_and_module_callables_resolve(op):
    o = get_operator(op)
    for name in o.builtins:
        if name != "flashlla":
            assert o.resolve(name).name == name
    ext = {"lla": M + "bias_01pct", "parallax": M + "px_dropped_nu", "lla-decode": M + "dec_stale_length",
           "parallax-decode": M + "pxdec_dropped_nu"}[op]
    assert o.resolve(ext).name == ext and o.resolve(ext).operator == op
    with pytest.raises(LLAInputError, match="--my-opt: unknown implementation 'nosuch'"):
        o.resolve("nosuch", "--my-opt")
    with pytest.raises(LLAInputError, match="--my-opt: cannot import module"):
        o.resolve("nosuchmod_xyz:fn", "--my-opt")


def _self_described(*a, **k):
    raise AssertionError("never called")


_self_described.lla_impl_record = Impl(name="px", forward=_self_described, description="x", operator="parallax")


def test_a_record_of_another_operator_is_refused():
    with pytest.raises(LLAInputError, match="parallax implementation, not lla-decode"):
        get_operator("lla-decode").resolve("tests.test_operators:_self_described")


# ------------------------------------------------------------------ correct implementations pass
PASSING = [
    pytest.param("lla", LLA_SPEC, "torch-fp32", True, id="lla-torch-fp32"),
    pytest.param("parallax", PX_SPEC, "parallax-dense", True, id="parallax-dense"),
    pytest.param("parallax", PX_OFFSET, M + "px_control", True, id="parallax-control-offset"),
    # one-hot rows of large-norm keys: a gradient row's error is the rounding of two scores,
    # which the backward budget models (docs/error-model.md §8); without that term this
    # honest computation was 1.02x over at dk row 13
    pytest.param("parallax", PX_LARGE_NORM, M + "px_control", True, id="parallax-control-large-norm"),
    pytest.param("parallax", PX_SPEC, "parallax-triton", True, id="parallax-triton", marks=needs_triton),
    pytest.param("parallax", PX_LARGE_NORM, "parallax-triton", False, id="parallax-triton-large-norm",
                 marks=needs_triton),
    pytest.param("lla-decode", LLA_SPEC_B2, "lla-decode-oracle", False, id="lla-decode-oracle"),
    pytest.param("lla-decode", LLA_SPEC_B2, "lla-decode-triton", False, id="lla-decode-triton", marks=needs_triton),
    pytest.param("lla-decode", LLA_SPEC_B2, "lla-decode-keyed", False, id="lla-decode-keyed", marks=needs_triton),
    pytest.param("parallax-decode", PX_SPEC_B2, "parallax-decode-oracle", False, id="parallax-decode-oracle"),
    pytest.param("parallax-decode", PX_SPEC_B2, "parallax-decode-triton", False, id="parallax-decode-triton",
                 marks=needs_triton),
]


@pytest.mark.parametrize("op, spec, impl, backward", PASSING)
def test_a_correct_implementation_passes(op, spec, impl, backward):
    verdicts = _check(op, spec, impl, backward)
    assert len(verdicts) == (2 if backward else 1)
    for v in verdicts:
        assert v.passed and v.cause == "ok" and 0 <= v.ratio <= 1, v.message
    v = verdicts[0]
    S = get_operator(op).base_case(get_operator(op).parse_case(spec)).S
    assert v.worst is not None and v.per_query["ratio"].shape[-1] == S  # a ratio per query (per position)
    assert v.summary["n_nan"] == 0 and v.summary["time_s"] > 0
    if op == "lla-decode":  # judged by the forward's budget, kappa included
        assert "kappa_max" in v.summary and v.check == "lla-decode"
        assert "against the forward's row" in v.message


# ------------------------------------------------------------------ planted bugs fail
KILLED = [
    pytest.param("lla", LLA_SPEC, M + "lambda_not_scaled_by_omega", "forward", id="lla-omega"),
    pytest.param("parallax", PX_SPEC, M + "px_dropped_nu", "parallax-forward", id="px-dropped-nu"),
    pytest.param("parallax", PX_SPEC, M + "px_unmasked_correction", "parallax-forward", id="px-unmasked"),
    pytest.param("parallax", PX_SPEC, M + "px_unnormalised_probe", "parallax-forward", id="px-unnormalised"),
    pytest.param("parallax", PX_LARGE_NORM, M + "px_uncentred", "parallax-forward", id="px-uncentred"),
    pytest.param("lla-decode", LLA_SPEC_B2, M + "dec_off_by_one_length", "lla-decode", id="dec-off-by-one"),
    pytest.param("lla-decode", LLA_SPEC_B2, M + "dec_stale_length", "lla-decode", id="dec-stale-length"),
    pytest.param("parallax-decode", PX_SPEC_B2, M + "pxdec_off_by_one_length", "parallax-decode",
                 id="pxdec-off-by-one"),
    pytest.param("parallax-decode", PX_SPEC_B2, M + "pxdec_stale_length", "parallax-decode", id="pxdec-stale"),
    pytest.param("parallax-decode", PX_SPEC_B2, M + "pxdec_dropped_nu", "parallax-decode", id="pxdec-dropped-nu"),
]


@pytest.mark.parametrize("op, spec, impl, check", KILLED)
def test_a_planted_bug_fails_blaming_the_implementation(op, spec, impl, check):
    v = _check(op, spec, impl)[0]
    assert not v.passed and v.ratio > 1 and v.cause == "implementation", v.message
    assert v.check == check


def test_stale_length_is_wrong_on_the_last_sequence_only():
    v = _check("lla-decode", LLA_SPEC_B2, M + "dec_stale_length")[0]
    # the worst row is problem b = 1's last position: the batch's last decoded sequence
    assert v.worst == (1, 0, 16), v.message
    bad = v.per_query["ratio"] > 1
    assert int(bad.sum()) == 1


def test_parallax_backward_catches_a_gradient_only_bug():
    # forward right, backward wrong: dr of every row doubled through a custom autograd function
    verdicts = _check("parallax", PX_SPEC, "tests.test_operators:px_dr_doubled", backward=True)
    assert verdicts[0].passed, verdicts[0].message
    assert not verdicts[1].passed and verdicts[1].check == "parallax-backward", verdicts[1].message
    assert "worst row dr" in verdicts[1].message


class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r):
        return r.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def px_dr_doubled(q, k, v, r, *, qk_scale=None):
    from lla_verify.oracles.parallax import parallax_dense

    return parallax_dense(q, k, v, _DoubleGrad.apply(r), qk_scale=qk_scale)


# ------------------------------------------------------------------ the trust boundary
@pytest.mark.parametrize("op, spec, impl, why", [
    ("parallax", PX_SPEC, "px_mutates_v", "modified its inputs: v"),
    ("parallax", PX_SPEC, "px_wrong_shape", "returned the output o of shape (1, 1, 24)"),
    ("parallax", PX_SPEC, "px_exits", "raised SystemExit(3)"),
    ("lla-decode", LLA_SPEC, "dec_mutates_lengths", "modified its inputs: lengths"),
    ("lla-decode", LLA_SPEC, "dec_returns_list", "returned list of length 1 as the output o"),
    ("parallax-decode", PX_SPEC, "pxdec_raises", "raised RuntimeError: kernel launch failed"),
])
def test_a_misbehaving_implementation_fails_its_check(op, spec, impl, why):
    (v,) = _check(op, spec, "tests.test_operators:" + impl)
    assert not v.passed and v.cause == "implementation" and v.ratio == float("inf")
    assert why in v.message, v.message


def test_a_backward_check_of_a_decode_is_refused():
    o = get_operator("lla-decode")
    with pytest.raises(LLAInputError, match="--backward: the lla-decode operator has no gradients"):
        o.check(o.parse_case(LLA_SPEC), o.resolve("lla-decode-oracle"), "cpu", backward=True)


# ------------------------------------------------------------------ lla-verify check --op
def _cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, rc, needle", [
    (["--op", "parallax", "--case", PX_SPEC, "--impl", "parallax-oracle", "--backward"], 0, "parallax backward PASS"),
    (["--op", "parallax", "--case", PX_SPEC, "--impl", M + "px_dropped_nu"], 1, "parallax forward FAIL"),
    (["--op", "lla-decode", "--case", LLA_SPEC_B2, "--impl", "lla-decode-oracle"], 0, "decode, every position"),
    (["--op", "lla-decode", "--case", LLA_SPEC_B2, "--impl", M + "dec_stale_length"], 1, "FAIL"),
    (["--op", "parallax-decode", "--case", PX_SPEC_B2, "--impl", "parallax-decode-oracle"], 0, "PASS"),
    (["--op", "parallax-decode", "--case", PX_SPEC_B2, "--impl", M + "pxdec_off_by_one_length"], 1, "FAIL"),
], ids=["px-pass", "px-fail", "dec-pass", "dec-fail", "pxdec-pass", "pxdec-fail"])
def test_check_op_exit_status(argv, rc, needle, capsys):
    got, out, err = _cli(["check", *argv], capsys)
    assert got == rc, out + err
    assert needle in out


@pytest.mark.parametrize("argv, needle", [
    (["--op", "nosuch", "--case", LLA_SPEC], "--op: unknown operator"),
    (["--op", "parallax", "--case", LLA_SPEC, "--impl", "parallax-oracle"], "--case: expected 'CASE_SPEC;probe="),
    (["--op", "parallax", "--case", PX_SPEC, "--impl", "nosuch"], "--impl: unknown implementation"),
    (["--op", "parallax", "--case", PX_SPEC, "--impl", "triton"], "--impl: unknown implementation 'triton'"),
    (["--op", "lla-decode", "--case", LLA_SPEC, "--impl", "lla-decode-oracle", "--backward"], "--backward"),
    (["--op", "parallax-decode", "--case", PX_SPEC.replace("D=16", "D=8"), "--impl", "parallax-decode-triton"],
     "--case: parallax-decode-triton does not accept head_dim 8"),
    (["--op", "lla-decode", "--case", LLA_SPEC, "--impl", "lla-decode-oracle", "--device", "tpu"], "--device"),
])
def test_check_op_usage_errors(argv, needle, capsys):
    rc, out, err = _cli(["check", *argv], capsys)
    assert rc == 2, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_check_op_hang_is_a_failed_check(capsys):
    # the check runs in a worker process: a hang ends with the cell's time limit, exit 1
    rc, out, err = _cli(["check", "--op", "parallax-decode", "--case", PX_SPEC.replace("S=24", "S=4"),
                         "--impl", "tests.test_operators:pxdec_hangs", "--cell-timeout", "2"], capsys)
    assert rc == 1, out + err
    assert "timed out after 2 s" in out
