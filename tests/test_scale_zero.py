"""qk_scale = 0: a point of the operator (uniform weights, the MesaNet form of docs/math.md §4.2).

Accepted by the argument check every oracle and implementation shares, computed by
the oracles, the dense reference and the Triton kernel (forward and backward, through
the interpreter on CPU), and produced by the registry (the bandwidth family's scale).
Negative and non-finite scales stay refused.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import find, settings

from lla_verify.budget.backward import check_backward

from lla_verify.budget.forward import MODEL_SAFETY, check_forward, forward_budget
from lla_verify.registry.cases import Case, Problem, get_family, parse_case
from lla_verify.registry.impls import get_impl, is_available
from lla_verify.oracles.dense import dense_torch_lla
from lla_verify.oracles.float64 import (lla_forward, lla_forward_details, lla_forward_wls, mesanet_attention,
                               softmax_attention)
from lla_verify.testing.strategies import cases
from lla_contract import LLAInputError, check_scale

F64 = torch.float64


def _qkv(S, D, *, lead=(1, 2), dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*lead, S, D, generator=g, dtype=F64).to(dtype) for _ in range(3))


def _problem(S, D, dtype, lam, seed=0) -> Problem:
    """The registry's scale-0 case (bandwidth, scale=0); lambda = 0 is below the family's range, so set here."""
    p = Case("bandwidth", {"scale": 0.0, "lam": max(lam, 1e-3)}, 1, 2, S, D, dtype, seed).build()
    assert p.qk_scale == 0.0
    return p if lam > 0 else Problem(p.case, p.q, p.k, p.v, lam, 0.0)


def _within(name, err, allowed):
    ratio = float((err / allowed).max())
    assert ratio <= 1.0, f"{name}: error {float(err.max()):.3e}, ratio {ratio:.3g} to its derived allowance"


# ------------------------------------------------------------------ the argument check
def test_check_scale_takes_zero_and_refuses_negative_and_nonfinite():
    assert check_scale(0.0, 16) == 0.0 and check_scale(0, 16) == 0.0
    assert math.copysign(1.0, check_scale(-0.0, 16)) == 1.0  # -0.0 is the point 0, read as +0.0
    assert check_scale(None, 16) == 0.25  # only None asks for the default
    for bad in (-1e-30, -2.0, float("-inf"), float("inf"), float("nan")):
        with pytest.raises(LLAInputError, match=r"^qk_scale: expected a finite value >= 0, got "):
            check_scale(bad, 16)
    with pytest.raises(LLAInputError, match=r"^qk_scale: expected a float >= 0 or None, got 'x'"):
        check_scale("x", 16)


# ------------------------------------------------------------------ oracles and the dense reference
def test_oracles_at_scale_zero_are_the_mesanet_form():
    q, k, v = _qkv(20, 4)
    lam = 0.3
    mesa, rounding = mesanet_attention(q, k, v, ridge_lambda=lam, return_rounding=True)
    p = Problem(Case("gaussian", {}, 1, 2, 20, 4, "float64", 0), q, k, v, lam, 0.0)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=0.0)
    # uniform weights, exactly: a_ij = 0, m_i = 0, omega_i = i + 1
    assert torch.equal(d.omega, torch.arange(1, 21, dtype=F64).expand(1, 2, 20))
    assert torch.equal(d.m, torch.zeros_like(d.m))
    # each float64 formulation against the MesaNet formula: the oracle's own budget
    # (budget.forward_budget of the float64 oracle) plus the formula's estimated rounding
    fb = forward_budget(p, get_impl("oracle-f64"), details=d, dense=False)
    allowed = fb.allowed + MODEL_SAFETY * rounding
    for name, o in (("details", d.o), ("schur", lla_forward(q, k, v, ridge_lambda=lam, qk_scale=0.0)),
                    ("wls", lla_forward_wls(q, k, v, ridge_lambda=lam, qk_scale=0.0))):
        _within(name, (o - mesa).norm(dim=-1), allowed)
    # the mpmath oracle at 30 digits: exact to float64 output rounding, so only the
    # MesaNet formula's own rounding separates them
    from lla_verify.oracles.mp import lla_forward_mp

    o_mp = lla_forward_mp(q[:, :1, :8], k[:, :1, :8], v[:, :1, :8], ridge_lambda=lam, qk_scale=0.0, dps=30)
    mp_err = (o_mp - mesa[:, :1, :8]).norm(dim=-1)
    _within("mpmath", mp_err, MODEL_SAFETY * rounding[:, :1, :8] + 2.0**-53 * o_mp.norm(dim=-1))
    # the dense fp32 reference: within the fp32 model (the same budget at u_c = 2^-24)
    fb32 = forward_budget(p, get_impl("torch-fp32"), details=d, dense=False)
    o32 = dense_torch_lla(q, k, v, ridge_lambda=lam, qk_scale=0.0).double()
    _within("dense fp32", (o32 - mesa).norm(dim=-1), fb32.allowed + MODEL_SAFETY * rounding)
    # and softmax attention at scale 0 is the running mean of the values
    mean = v.cumsum(-2) / torch.arange(1, 21, dtype=F64)[:, None]
    _within("softmax", (softmax_attention(q, k, v, qk_scale=0.0) - mean).norm(dim=-1),
            8 * 2.0**-53 * math.sqrt(20) * v.norm(dim=-1).amax(-1, keepdim=True))


def test_oracle_at_scale_zero_and_lambda_zero_is_least_squares():
    """lambda = 0, scale 0: o_i is the OLS fit of v_j ~ b + W k_j over j <= i, at q_i.

    Rows i < D have fewer than D + 1 keys (0/0: undefined); the others come from
    torch.linalg.lstsq, a solver that shares nothing with the oracle.
    """
    S, D = 24, 4
    q, k, v = _qkv(S, D, lead=(1, 1), seed=3)
    d = lla_forward_details(q, k, v, ridge_lambda=0.0, qk_scale=0.0)
    assert bool(d.undefined[0, 0, :D].all()) and not bool(d.undefined[0, 0, D:].any())
    one = torch.ones(S, 1, dtype=F64)
    ka, qa = torch.cat([k[0, 0], one], -1), torch.cat([q[0, 0], one], -1)
    for i in range(D, S):
        coef = torch.linalg.lstsq(ka[: i + 1], v[0, 0, : i + 1]).solution
        ols = qa[i] @ coef
        cond = float(torch.linalg.cond(ka[: i + 1]))
        # lstsq's and the oracle's rounding: u64 times the design matrix's condition squared
        # (normal equations) times the output's scale, with the budget's safety factor
        tol = MODEL_SAFETY * 2.0**-53 * (i + 1 + D + 1) * cond**2 * float(v[0, 0, : i + 1].norm(dim=-1).max())
        assert float((d.o[0, 0, i] - ols).norm()) <= tol, (i, float((d.o[0, 0, i] - ols).norm()), tol)


def test_oracles_refuse_negative_and_nonfinite_scales():
    q, k, v = _qkv(6, 4)
    for fn in (lla_forward, lla_forward_details, lla_forward_wls):
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(LLAInputError, match="^qk_scale: expected a finite value >= 0"):
                fn(q, k, v, ridge_lambda=1.0, qk_scale=bad)
    with pytest.raises(LLAInputError, match="^qk_scale: expected a finite value >= 0"):
        dense_torch_lla(q, k, v, ridge_lambda=1.0, qk_scale=-0.5)


# ------------------------------------------------------------------ the registry
def test_registry_produces_scale_zero():
    fam = get_family("bandwidth")
    assert fam.param("scale").clip(0.0) == 0.0 and fam.param("scale").clip(1e-9) == 1e-4
    c = Case("bandwidth", {"scale": 0.0, "lam": 0.5}, S=12, D=8, seed=1)
    assert c.spec() == "bandwidth:lam=0.5,scale=0:B=1,H=1,S=12,D=8,dtype=float32,seed=1"
    assert parse_case(c.spec()) == c
    p = parse_case(c.spec()).build()
    assert p.qk_scale == 0.0
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    assert torch.equal(d.omega, torch.arange(1, 13, dtype=F64).expand(1, 1, 12))
    # the property suite's strategies reach it (not only a spec typed by hand)
    found = find(cases(families=("bandwidth",)), lambda case: case.params["scale"] == 0.0,
                 settings=settings(database=None, max_examples=500))
    assert found.build().qk_scale == 0.0


# ------------------------------------------------------------------ the Triton kernel
TRITON = get_impl("triton")
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = is_available(TRITON, _DEVICE) if (_DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") \
    else "needs a CUDA device or TRITON_INTERPRET=1 (CPU interpreter)"


@pytest.mark.interp
@pytest.mark.skipif(bool(_REASON), reason=str(_REASON))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_at_scale_zero_forward_and_backward(dtype):
    """S = 40 spans several key tiles; the budgets are lla_verify/budget's, against the float64 oracle."""
    p = _problem(40, 16, dtype, 0.5, seed=4).to(_DEVICE)
    o = TRITON.forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=0.0)
    fb = forward_budget(p, TRITON, out_dtype=o.dtype)
    v = check_forward(p, TRITON, o, fb=fb)
    assert v.passed, v.message
    # and the MesaNet formula, independent of the oracle, within the same budget
    mesa, rounding = mesanet_attention(p.q, p.k, p.v, ridge_lambda=0.5, return_rounding=True)
    _within("kernel vs MesaNet", (o.double() - mesa).norm(dim=-1), fb.allowed + MODEL_SAFETY * rounding)
    vb = check_backward(p, TRITON)
    assert vb.passed, vb.message


@pytest.mark.interp
@pytest.mark.skipif(bool(_REASON), reason=str(_REASON))
def test_kernel_at_scale_zero_and_lambda_zero_forward():
    """lambda = 0 too: the OLS form on defined rows (i >= D); undefined rows are not judged."""
    p = _problem(40, 16, "float32", 0.0, seed=5).to(_DEVICE)
    o = TRITON.forward(p.q, p.k, p.v, ridge_lambda=0.0, qk_scale=0.0)
    v = check_forward(p, TRITON, o)
    assert v.passed and v.n_defined == 2 * (40 - 16), "at lambda = 0: " + v.message


@pytest.mark.interp
@pytest.mark.skipif(bool(_REASON), reason=str(_REASON))
def test_kernel_refuses_negative_and_nonfinite_scales():
    import lla_triton

    p = _problem(8, 16, "float32", 0.5).to(_DEVICE)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LLAInputError, match="^qk_scale: expected a finite value >= 0"):
            lla_triton.lla_attention(p.q, p.k, p.v, ridge_lambda=0.5, qk_scale=bad)
