"""The float64 Parallax oracle against the mpmath one (lla_verify/oracles/mp_parallax.py).

The float64 oracle is the reference of every Parallax check, so it is held to its own
budget: the Parallax forward budget at u = 2^-53 (sensitivity in q, k, v and r, output
rounding, floor; lla_verify/budget/parallax.py) against mpmath at 50 digits, on the
families that stress it (offset keys, clusters, near-singular subspaces, a spread
spectrum) under every probe family. Its gradients (autograd through the float64 oracle)
are held to the same model per row (the gradient's own sensitivity, its scores' rounding,
its rounding, and a floor at the largest gradient row), against central differences in
mpmath, on tiny problems.
"""

import pytest
import torch
from hypothesis import example, given, settings

from lla_verify.budget.forward import MODEL_SAFETY, U64
from lla_verify.budget.parallax import parallax_budget, score_rounding_sensitivity
from lla_verify.oracles.mp_parallax import parallax_forward_mp, parallax_grad_mp
from lla_verify.oracles.parallax import parallax_forward
from lla_verify.testing import suite
from lla_verify.testing import parallax as px
from lla_verify.registry.parallax import parse_parallax_case
from lla_verify.testing.parallax import parallax_cases
from lla_verify.testing.strategies import cases

pytestmark = pytest.mark.mp

HARD = ("gaussian", "offset", "clusters", "subspace", "spectrum", "large_norm")


def _worst(err, allowed, spec, what):
    r = torch.where(allowed > 0, err / allowed, torch.where(err > 0, torch.inf, 0.0))
    idx = tuple(int(x) for x in torch.unravel_index(torch.argmax(r), r.shape))
    return (f"{what}: ratio {float(r[idx]):.3g} at {idx}: error {float(err[idx]):.3e} vs allowed "
            f"{float(allowed[idx]):.3e} on {spec}")


@settings(max_examples=suite.examples(0.8))
@given(pc=parallax_cases(cases(HARD, dtypes=("float32",), seq=(1, 12), head_dims=(3, 4), batch=(1, 1),
                               heads=(1, 2))))
@example(pc=parse_parallax_case("offset:lam=1,offset=100,scale_mult=1:B=1,H=2,S=8,D=3,dtype=float32,seed=15622;"
                                "probe=lla"))
def test_float64_parallax_oracle_agrees_with_mpmath_within_its_budget(pc):
    p = px.build(pc, "cpu")
    # no dense same-precision rule here (the oracle is the float64 computation), so the
    # model alone decides: its sensitivity estimate gets 32 sign patterns instead of 2 (the
    # problems are tiny), enough for rows whose conditioning sits in a few key components
    # (offset keys at a two-key row: 2 patterns gave 1.5 against ||J diag(x)||_F = 28)
    pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, compute_dtype=torch.float64,
                         out_dtype=torch.float64, dense=False, directions=32)
    mp = parallax_forward_mp(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, dps=50)
    err = (pb.o - mp).norm(dim=-1)
    assert bool((err <= pb.allowed).all()), _worst(err, pb.allowed, pc.spec(), "float64 Parallax vs mpmath")


def _grads(xs, cot, scale):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    o = parallax_forward(*xs, qk_scale=scale)
    return torch.autograd.grad((o * cot).sum(), xs)


def _grad_sensitivity(xs, cot, scale, g0, *, eps=1e-7, directions=2, seed=0):
    """Per gradient tensor, max over random sign directions xi of |g(x (1 + eps xi)) - g(x)| / eps:
    the change of the float64 gradient per unit componentwise relative perturbation of
    q, k, v, r (a finite difference in float64; its own rounding, ~u64 |g| / eps, only
    makes the estimate larger)."""
    gen = torch.Generator().manual_seed(seed)
    best = [torch.zeros_like(g) for g in g0]
    for _ in range(directions):
        moved = [x * (1 + eps * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)) for x in xs]
        g1 = _grads(moved, cot, scale)
        best = [torch.maximum(b, (a - g).abs() / eps) for b, a, g in zip(best, g1, g0)]
    return best


@settings(max_examples=suite.examples(0.3))
@given(pc=parallax_cases(cases(("gaussian", "offset", "clusters"), dtypes=("float32",), seq=(1, 5), head_dims=(2, 3),
                               batch=(1, 1), heads=(1, 1)), probes=("zero", "random", "large", "small_eig")))
# two-key rows on offset keys: the scores' rounding, which the sampled input sensitivity missed
@example(pc=parse_parallax_case("offset:lam=1,offset=100,scale_mult=3.1622776601683795:B=1,H=1,S=3,D=2,"
                                "dtype=float32,seed=0;probe=zero"))
def test_float64_parallax_gradients_agree_with_mpmath_differences(pc):
    p = px.build(pc, "cpu")
    xs = [t.to(torch.float64) for t in (p.q, p.k, p.v, p.r)]
    gen = torch.Generator().manual_seed(pc.case.seed + 11)
    cot = torch.randn(p.v.shape, generator=gen, dtype=torch.float64)
    g64 = _grads(xs, cot, p.qk_scale)
    sens = _grad_sensitivity(xs, cot, p.qk_scale, g64)
    mp = parallax_grad_mp(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, cotangent=cot)
    S, D = p.q.shape[-2], p.q.shape[-1]
    n = S * (2 * D + p.v.shape[-1])  # terms a gradient entry sums, at most
    refs = (mp.dq, mp.dk, mp.dv, mp.dr)
    # the floor: the largest gradient row of the four. A row of dq sums terms
    # s p_ij (...) (k_j - kbar_i) of the size of dk's rows, and cancels to far less on
    # offset keys, so its own size is no floor
    gmax = max(float(t.norm(dim=-1).max()) for t in refs)
    # the scores' rounding. The oracle forms a_ij = s <q_i, k_j> as a D-term dot product
    # times s: below sqrt(D) u64 b_ij for the dot product (the probabilistic bound the
    # backward budget puts on a kernel's scores, docs/error-model.md section 8), plus
    # u64 |a_ij| <= u64 b_ij for the product with s, independent: sqrt(D + 1) u64 b_ij,
    # b_ij = |s| |q_i| |k_j|. Each row of a gradient moves by T_x per scores moved by up to
    # b_ij (score_rounding_sensitivity: the heaviest key against the rest, and random
    # signs). The input sensitivity above contains this conditioning only where its random
    # signs move a row's significant keys apart: on offset keys a pattern giving them the
    # same sign in the offset's direction moves every score of the row alike, which the
    # softmax does not see
    tsc = score_rounding_sensitivity(*xs, cot, qk_scale=p.qk_scale)
    for name, g, s, t, ref in zip(("dq", "dk", "dv", "dr"), g64, sens, tsc, refs):
        # per row, as the forward budget: rounding (sensitivity), the scores' rounding, the
        # value's own rounding, floor
        allowed = MODEL_SAFETY * U64 * (n ** 0.5 * (s.norm(dim=-1) + gmax) + (D + 1) ** 0.5 * t
                                        + ref.norm(dim=-1))
        err = (g - ref).norm(dim=-1)
        assert bool((err <= allowed).all()), _worst(err, allowed, pc.spec(), f"float64 {name} vs mpmath")
