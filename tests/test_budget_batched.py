"""The budgets evaluate several oracle points in one batched pass (check_backward: the
details, reference gradients and the solve residual's double backward from one forward;
the +/-h points and the two Sigma probes stacked; the forward sensitivity's directions
stacked). Each leading index is computed apart, so on CPU the numbers must be exactly
those of one call per point: these tests compare them bit for bit."""

import pytest
import torch
from torch.func import jvp

from lla_verify.budget.backward import (_stacked_oracle_grads, cotangent_for, oracle_grads, oracle_pass,
                                        reference_grads, rho_residual_dlambda)
from lla_verify.budget.forward import lam_on_device, sensitivity
from lla_verify.oracles.float64 import LLADetails, lla_forward, lla_forward_details, lla_forward_sigma_probe
from lla_verify.registry.cases import Case, Problem


class _ZeroLambdaEarly:
    """An 'early' case with lambda 0 on every query: its first D rows are undefined (NaN)."""
    family = "early, lambda 0"

    def build(self, device="cpu"):
        p = Case("early", {}, B=1, H=2, S=11, D=8, dtype="bfloat16", seed=4).build(device)
        return Problem(p.case, p.q, p.k, p.v, torch.zeros(p.q.shape[:-1], dtype=torch.float64), p.qk_scale)


CASES = [
    Case("gaussian", {}, B=2, H=1, S=13, D=8, dtype="float32", seed=3),
    _ZeroLambdaEarly(),
    Case("spectrum", {"kappa": 1e6}, B=1, H=1, S=17, D=8, dtype="float32", seed=5),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit for bit holds with one CPU thread: with more, the CPU kernels may split a stacked
    batch's work differently from a single call's (1e-16 to 1e-15 apart on the spectrum
    case with two threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _same(a, b, what):
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan()), what


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.family)
def test_one_oracle_pass_equals_the_separate_calls(case):
    p = case.build()
    op = oracle_pass(p)
    d_ref = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    assert bool(d_ref.undefined.any()) == isinstance(case, _ZeroLambdaEarly)
    for f in LLADetails.__dataclass_fields__:
        a, b = getattr(op.details, f), getattr(d_ref, f)
        if f == "solv":
            assert a is None  # left out: the backward budget never reads it
        elif isinstance(b, torch.Tensor):
            assert not a.requires_grad, f
            _same(a, b, f)
    cot = cotangent_for(p)  # not zeroed on undefined rows: reference_grads must zero them as oracle_grads does
    ref, jac = reference_grads(op, cot, dlambda_residual=True)
    for name, g in oracle_grads(p, cot).items():
        _same(ref[name], g, name)
    _same(jac, rho_residual_dlambda(p, cot), "rho_residual_dlambda")
    assert op.o is None and op.leaves == ()  # the graph is released


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.family)
def test_stacked_points_and_probes_equal_one_call_each(case):
    p = case.build()
    cot = cotangent_for(p)
    base = tuple(t.to(torch.float64) for t in (p.q, p.k, p.v)) + (lam_on_device(p),)
    shifted = [tuple(t * (1 + s * 1e-6) for t in base) for s in (1.0, -1.0)]
    stacked = _stacked_oracle_grads(p, cot, shifted)
    for pt, got in zip(shifted, stacked):
        want = oracle_grads(p, cot, q=pt[0], k=pt[1], v=pt[2], lam=pt[3])
        for name in want:
            _same(got[name], want[name], name)
    probes = _stacked_oracle_grads(p, cot, [base, base], sigma_probe=(1e-7, (0, 1)))
    for seed, got in zip((0, 1), probes):
        want = oracle_grads(p, cot, sigma_probe=(1e-7, seed))
        for name in want:
            _same(got[name], want[name], f"{name}, seed {seed}")
    assert not torch.equal(probes[0]["dq"], probes[1]["dq"])  # the two seeds probe differently


def test_sigma_probe_seed_tuple_is_one_block_per_seed():
    p = CASES[0].build()
    q, k, v = (torch.stack([t, t]) for t in (p.q, p.k, p.v))
    both = lla_forward_sigma_probe(q, k, v, ridge_lambda=p.ridge_lambda, h=1e-3, seed=(5, 9))
    for i, s in enumerate((5, 9)):
        _same(both[i], lla_forward_sigma_probe(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, h=1e-3, seed=s), s)
    with pytest.raises(ValueError, match="seed: expected an int, or one seed per slice"):
        lla_forward_sigma_probe(q, k, v, ridge_lambda=p.ridge_lambda, h=1e-3, seed=(5, 9, 11))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.family)
def test_stacked_sensitivity_equals_one_jvp_per_direction(case):
    p = case.build()
    q, k, v = (t.to(torch.float64) for t in (p.q, p.k, p.v))
    lam = lam_on_device(p).clone()
    gen = torch.Generator().manual_seed(0)
    best = None
    for _ in range(2):
        xs = [torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1 for t in (q, k, v, lam)]
        _, do = jvp(lambda *a: lla_forward(*a[:3], ridge_lambda=a[3], qk_scale=p.qk_scale), (q, k, v, lam),
                    tuple(x * t for x, t in zip(xs, (q, k, v, lam))))
        best = do.norm(dim=-1) if best is None else torch.maximum(best, do.norm(dim=-1))
    _same(sensitivity(p), best, "sensitivity")
