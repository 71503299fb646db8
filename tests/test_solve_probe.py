"""The gradient budget's solve probe (docs/error-model.md §6): a 2-norm perturbation of
Sigma_i, probed at a step inside its linear regime."""

import math

import torch

from lla_verify.budget.backward import (BEYOND_PRECISION, SOLVE_PROBE_LINEAR, SOLVE_PROBE_MIN_STEP, cotangent_for,
                                        oracle_grads, solve_probe_step)
from lla_verify.registry.cases import parse_case
from lla_verify.oracles.float64 import _sym_probe, lla_forward_details

U32 = 2.0**-24


def test_probe_matrices_are_symmetric_with_unit_spectral_norm():
    e = _sym_probe((3, 5, 16, 16), seed=1, i0=0, device="cpu")
    torch.testing.assert_close(e, e.transpose(-1, -2), rtol=0, atol=0)
    top = torch.linalg.eigvalsh(e).abs().amax(-1)
    torch.testing.assert_close(top, torch.ones_like(top), rtol=1e-12, atol=0)
    # a unit-Frobenius E would be ~2 / sqrt(D) in the 2-norm: the size the old probe had
    assert float(e.flatten(-2).norm(dim=-1).min()) > 1.5


def test_probe_step_follows_the_largest_judged_kappa():
    kappa = torch.tensor([[10.0, 4e5, 5e6, math.nan, 1e9]])
    defined = torch.tensor([[True, True, True, True, False]])
    # nan (unmeasured) counts as beyond; 1e9 is undefined here; 5e6 u32 < 1 is judged
    assert solve_probe_step(kappa, defined, U32) == SOLVE_PROBE_LINEAR / 5e6
    assert solve_probe_step(torch.tensor([[3.0, 50.0]]), torch.ones(1, 2, dtype=torch.bool), U32) == 1e-6
    # rows beyond the compute precision set no step
    beyond = BEYOND_PRECISION / U32 * 2
    assert solve_probe_step(torch.tensor([[beyond, 100.0]]), torch.ones(1, 2, dtype=torch.bool), U32) == 1e-6
    # float64 implementations: the floor
    assert solve_probe_step(torch.tensor([[1e15]]), torch.ones(1, 1, dtype=torch.bool), 2.0**-53) == SOLVE_PROBE_MIN_STEP


def test_probe_response_is_a_derivative_at_its_step():
    """On early rows of an ill-conditioned case (kappa up to 1.2e6), the one-sided
    difference at the chosen step and at a tenth of it agree: the step is linear. At a
    fixed 1e-6 the kappa 1.2e6 row came out 400x its derivative (the old probe)."""
    p = parse_case("spectrum:kappa=100000,rotate=0:B=1,H=1,S=8,D=16,dtype=float32,seed=0").build()
    cot = cotangent_for(p).to(p.q.dtype).double()
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    assert float(d.kappa.max()) > 1e6  # the case still has the row that needs the rule
    ref = oracle_grads(p, cot)
    h = solve_probe_step(d.kappa, ~d.undefined, U32)

    def response(step):
        g = oracle_grads(p, cot, sigma_probe=(step, 0))
        dq = ((g["dq"] - ref["dq"]) / step).norm(dim=-1).flatten()
        dlam = ((g["dlambda"] - ref["dlambda"]) / step).abs().flatten()
        return torch.stack([dq, dlam])

    at_h, at_tenth = response(h), response(h / 10)
    # rows whose response is float64 noise (the first token's, whose gradient is 0) aside
    live = at_tenth > 1e-6 * at_tenth.amax(-1, keepdim=True)
    rel = ((at_h - at_tenth).abs() / at_tenth.clamp_min(1e-300))[live]
    assert float(rel.max()) < 0.1, f"probe not linear at h={h:.2e}: relative change {float(rel.max()):.3f}"
    old = response(1e-6)
    assert float((old / at_tenth.clamp_min(1e-300))[live].max()) > 10  # what the fixed step did

