"""The decode kernels (kernels/lla_decode, kernels/parallax_decode) against the full forward.

Decoding position t of a problem must give row t of the causal forward on the same
inputs, within that row's budget: LLA by the forward kernels' own rule
(``budget.forward.check_forward``: the derived model with its CG-tolerance term, and the
same-precision dense rule), Parallax by the Parallax forward's rule
(``budget.parallax.check_parallax_decode``: ``check_parallax_forward``'s budget on the decoded
rows). Cache positions a sequence does not use are NaN-poisoned throughout. Runs on CPU
through the Triton interpreter at small sizes (S <= 48, D = 16), compiled on a CUDA device.
Split sizes, and the sequence and cache lengths that place positions in splits, are written
for the interpreter's tile of 16 and scaled by ``_n`` to the packages' active tile (64
compiled), so each case keeps its split pattern (e.g. three splits, the last one partial)
on both.

The planted bugs at the end (an off-by-one length, a combine that forgets to rescale, a
stale length for one sequence of a batch) must each fail the same checks; an uncentred
Parallax decode must fail the exact key-shift test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lla_contract import LLAInputError, check_scale
from lla_verify.budget.forward import MODEL_SAFETY, check_forward, forward_budget
from lla_verify.budget.parallax import check_parallax_decode
from lla_verify.budget.verdict import THRESHOLD, assert_within_budget
from lla_verify.oracles.decode import lla_decode_reference, parallax_decode_reference
from lla_verify.oracles.float64 import lla_forward
from lla_verify.oracles.parallax import parallax_forward
from lla_verify.registry.cases import Case, Problem
from lla_verify.registry.impls import triton_impl
from lla_verify.registry.precision import unit_roundoff
from lla_verify.testing.decode import (decode_lla_every_position, decode_parallax_every_position, every_position,
                                       poison_past)
from lla_verify.testing.kernel_device import kernel_device, needs_kernel_device

DEVICE = kernel_device()

pytestmark = [
    pytest.mark.interp,
    needs_kernel_device,
]

if DEVICE is not None:
    import lla_decode as _lla_pkg
    import parallax_decode as _px_pkg
    from lla_decode import DEFAULT_CG_TOL, lla_decode, lla_decode_stages
    from parallax_decode import parallax_decode, parallax_decode_combine, parallax_decode_partials

    # the budget record: fp32 compute, its solver term at the CG tolerance lla_decode stops at
    IMPL = replace(triton_impl(), name="lla_decode", solver_tol=DEFAULT_CG_TOL)
    # a split both packages accept: a multiple of each one's tile
    TILE = math.lcm(_lla_pkg.tile_size(), _px_pkg.tile_size())
else:
    TILE = 16
U_C = unit_roundoff(torch.float32)


def _n(size: int) -> int:
    """A split, sequence or cache length written for a tile of 16, at the active tile."""
    return size * TILE // 16


def _problem(family, params, S, dtype="float32", *, B=1, H=2, D=16, seed=0) -> Problem:
    return Case(family, params, B=B, H=H, S=S, D=D, dtype=dtype, seed=seed).build(DEVICE)


def _probe(p: Problem, seed=3, size=1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (size * torch.randn(p.q.shape, generator=gen, dtype=torch.float64)).to(p.q.dtype).to(DEVICE)


def _judge_lla(p: Problem, fn=None, *, planted: str | None = None, **kw):
    o, st = decode_lla_every_position(p, fn or lla_decode, **kw)
    # a planted bug is recorded under its own name, so the closing ledger keeps it apart
    impl = IMPL if planted is None else replace(IMPL, name=f"planted:{planted}")
    return check_forward(p, impl, o, stats=st or None)


def _parallax_verdict(p: Problem, r, fn=None, *, planted: str | None = None, **kw):
    o = decode_parallax_every_position(p, r, fn or parallax_decode, **kw)
    impl = "parallax_decode" if planted is None else f"planted:{planted}"
    return check_parallax_decode(p.q, p.k, p.v, r, o, impl=impl, case=p.describe(), qk_scale=p.qk_scale)


def _judge_parallax(p: Problem, r, fn=None, **kw):
    """(ratio, message) of the same verdict, for tests that assert on that pair."""
    v = _parallax_verdict(p, r, fn, **kw)
    return v.ratio, v.message


# ------------------------------------------------------------------------- every position
# S = 45 with split 16: three splits, the last one partial; split 48: one split; D = 16 but for one case at D = 32
# (S and split through _n: the same pattern at the active tile)
LLA_CASES = [
    pytest.param("gaussian", {"lam": 0.1}, _n(45), "float32", _n(16), 16, id="fp32-lam0.1-S45-split16"),
    pytest.param("gaussian", {"lam": 0.1}, _n(45), "float32", _n(48), 16, id="fp32-lam0.1-S45-split48"),
    pytest.param("gaussian", {"lam": 1e-3}, _n(40), "float32", _n(32), 16, id="fp32-lam1e-3-S40-split32"),
    pytest.param("gaussian", {"lam": 0.1}, _n(33), "bfloat16", _n(16), 16, id="bf16-lam0.1-S33"),
    pytest.param("gaussian", {"lam": 1.0}, _n(30), "float16", _n(16), 16, id="fp16-lam1-S30"),
    pytest.param("offset", {"offset": 100.0, "lam": 0.1}, _n(40), "float32", _n(16), 16, id="fp32-offset100"),
    # spectrum kappa 1e3 (fp32, S = 40, split 16) is judged by test_lla_decode_statistics, on
    # the decode it reads the statistics of
    pytest.param("lambda_decades", {"decades": 3.0}, _n(40), "float16", _n(16), 16, id="fp16-per-query-lambda"),
    pytest.param("early", {"lam": 1e-6}, _n(30), "float32", _n(16), 16, id="fp32-early-lam1e-6"),
    pytest.param("bandwidth", {"scale": 0.0}, _n(20), "float32", _n(16), 16, id="fp32-scale0"),
    pytest.param("gaussian", {"lam": 0.1}, _n(17), "bfloat16", _n(16), 32, id="bf16-S17-D32"),
    # found by properties/test_decode.py: kappa 2.6e8, where CG on an fp32 Sigma stalled (ratio 4.6);
    # S stays the problem found (one split, one partial tile at either tile)
    pytest.param("subspace", {"lam": 1e-8, "noise": 1e-4, "rank": 2}, 9, "float32", _n(16), 16,
                 id="fp32-subspace-lam1e-8-kappa3e8"),
]


@pytest.mark.parametrize("family, params, S, dtype, split, D", LLA_CASES)
def test_lla_decode_every_position_is_the_forward_row(family, params, S, dtype, split, D):
    p = _problem(family, params, S, dtype, D=D)
    assert_within_budget(_judge_lla(p, split=split))


def test_keyed_solve_hands_a_call_past_its_cap_to_the_sigma_solve(monkeypatch):
    """Heads still iterating at KEYED_MAX_ITERS are solved by the Sigma path (here every head:
    each needs more than 2 iterations): the output and statistics are the Sigma solve's, bit
    for bit; under the cap they are the keyed solve's own (fewer iterations on these heads, a
    different rounding)."""
    from lla_decode import keyed

    q, k, v, lens = _args()
    sigma_o, sigma_st = lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True)
    assert int(sigma_st["cg_iters"].min()) > 2
    keyed_o, keyed_st = lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True, solver="keyed")
    assert not torch.equal(keyed_o, sigma_o) and not torch.equal(keyed_st["cg_iters"], sigma_st["cg_iters"])
    monkeypatch.setattr(keyed, "KEYED_MAX_ITERS", 2)
    capped_o, capped_st = lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True, solver="keyed")
    assert torch.equal(capped_o, sigma_o)
    for name, val in sigma_st.items():
        assert torch.equal(capped_st[name], val), name
    # a cap at or above cg_max_iters is no cap: the keyed solve reports its own stop
    few_o, few_st = lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True, solver="keyed", cg_max_iters=2)
    assert int(few_st["cg_iters"].max()) == 2 and not torch.equal(few_o, sigma_o)


def test_keyed_hand_over_is_per_head_and_a_plan_runs_it_on_the_device(monkeypatch):
    """Heads still iterating at KEYED_MAX_ITERS are handed to the Sigma solve one by one: a
    head that converged keeps the keyed output and statistics, one that did not gets the
    Sigma solve's, bit for bit. A keyed plan's run (every launch made, gated on the device, no
    host read: what a CUDA graph captures) gives the same, capped or not."""
    from lla_decode import keyed, lla_decode_plan

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, *shape, generator=gen).to(DEVICE) for shape in ((16,), (24, 16), (24, 16)))
    lens = torch.tensor([24, 17])
    # lambda 10 converges in 6 keyed iterations, 1e-4 in 18-20
    lam = torch.tensor([[10.0, 1e-4], [1e-4, 10.0]], device=DEVICE)
    keyed_o, keyed_st = lla_decode(q, k, v, lens, ridge_lambda=lam, return_stats=True, solver="keyed")
    sigma_o, sigma_st = lla_decode(q, k, v, lens, ridge_lambda=lam, return_stats=True, solver="sigma")
    plan = lla_decode_plan(k, v, lens, ridge_lambda=lam, solver="keyed")
    plan_o, plan_st = plan.run(q, return_stats=True)
    assert torch.equal(plan_o, keyed_o)
    for name, val in keyed_st.items():
        assert torch.equal(plan_st[name], val), name

    cap = 8
    kept = keyed_st["cg_iters"] <= cap
    assert bool(kept.any()) and not bool(kept.all()), keyed_st["cg_iters"]
    monkeypatch.setattr(keyed, "KEYED_MAX_ITERS", cap)
    for o, st in (lla_decode(q, k, v, lens, ridge_lambda=lam, return_stats=True, solver="keyed"),
                  plan.run(q, return_stats=True)):
        assert torch.equal(o[kept], keyed_o[kept]) and torch.equal(o[~kept], sigma_o[~kept])
        for name in keyed_st:
            assert torch.equal(st[name][kept], keyed_st[name][kept]), name
            assert torch.equal(st[name][~kept], sigma_st[name][~kept]), name


def _cg64(sig, mu, steps):
    """``steps`` iterations of plain CG from rho = 0 on float64 (..., D, D) systems."""
    rho = torch.zeros_like(mu)
    res, p = mu.clone(), mu.clone()
    for _ in range(steps):
        ap = (sig @ p[..., None])[..., 0]
        rr = (res * res).sum(-1, keepdim=True)
        alpha = rr / (p * ap).sum(-1, keepdim=True)
        rho, res = rho + alpha * p, res - alpha * ap
        p = res + (res * res).sum(-1, keepdim=True) / rr * p
    return rho


def test_keyed_residual_is_the_true_residual_of_its_iterations():
    """The keyed solve's cg_residual, which the output pass and the finish form from the keys'
    product with the solve's rho (no pass of its own), is |mu - Sigma rho| / |mu| for rho after
    its iterations: float64 CG on the oracle's Sigma and mu, run as many steps, has the same
    residual to the fp32 factors' rounding. A product that drops or doubles a factor is off
    by O(1)."""
    from lla_verify.oracles.float64 import lla_forward_details, sigma_matrices

    gen = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 24, 16
    q, k, v = (torch.randn(B, H, *shape, generator=gen) for shape in ((D,), (T, D), (T, D)))
    lens = torch.tensor([24, 17])
    lam = 0.05
    sig, mu = [], []
    for b in range(B):
        L = int(lens[b])
        qb = q[b:b + 1, :, None, :].expand(1, H, L, D)
        kb = k[b:b + 1, :, :L]
        sig.append(sigma_matrices(qb, kb, ridge_lambda=lam)[0, :, L - 1])
        mu.append(lla_forward_details(qb, kb, v[b:b + 1, :, :L], ridge_lambda=lam).mu[0, :, L - 1])
    sig, mu = torch.stack(sig), torch.stack(mu)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    compared = 0
    for steps in (1, 2, 3):
        _, st = lla_decode(q, k, v, lens, ridge_lambda=lam, return_stats=True, solver="keyed", cg_max_iters=steps)
        assert bool((st["cg_iters"] == steps).all()), st["cg_iters"]
        rho = _cg64(sig, mu, steps)
        want = (mu - (sig @ rho[..., None])[..., 0]).norm(dim=-1) / mu.norm(dim=-1)
        got = st["cg_residual"].double().cpu()
        assert bool((want > 1e-3).all()), want
        # the fp32 factors round each term at a few u32 (6e-8), which the steps grow by about
        # kappa a step: the residuals agree within 7e-7 here (1 to 3 steps), against 1e-3 for
        # a product 0.1% off
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0, msg=lambda m: f"{steps} CG steps: {m}")
        compared += want.numel()
    assert compared == 3 * B * H


def test_auto_solver_takes_the_keyed_solve_from_its_threshold(monkeypatch):
    """solver="auto" is the keyed solve where the call reads at least KEYED_MIN_POSITIONS[D]
    positions over its query heads (H x the sum of the lengths), else the Sigma solve: bit
    for bit the chosen solver's output and statistics, in a call and in a plan (which
    chooses once, by its planning lengths)."""
    import lla_decode as package
    from lla_decode import lla_decode_plan

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, *shape, generator=gen).to(DEVICE) for shape in ((16,), (24, 16), (24, 16)))
    lens = torch.tensor([24, 17])
    positions = 2 * (24 + 17)
    runs = {s: lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True, solver=s) for s in ("sigma", "keyed")}
    assert not torch.equal(runs["sigma"][1]["cg_iters"], runs["keyed"][1]["cg_iters"]) or \
        not torch.equal(runs["sigma"][0], runs["keyed"][0])
    for threshold, expected in ((positions, "keyed"), (positions + 1, "sigma")):
        monkeypatch.setattr(package, "KEYED_MIN_POSITIONS", {16: threshold, 32: 1, 64: 1, 128: 1})
        plan = lla_decode_plan(k, v, lens, ridge_lambda=0.1, solver="auto")
        assert plan.solver == expected
        for o, st in (lla_decode(q, k, v, lens, ridge_lambda=0.1, return_stats=True, solver="auto"),
                      plan.run(q, return_stats=True)):
            assert torch.equal(o, runs[expected][0]), expected
            for name, val in runs[expected][1].items():
                assert torch.equal(st[name], val), (expected, name)


# the keyed solve runs a launch pair an iteration, each over every (split, head) program, which
# under the interpreter costs 45-65 s a case of S = 40-45: there it takes the cases that are
# small or hard (the kappa 2.6e8 subspace, the first tokens, s = 0, per-query lambda, D = 32),
# on the GPU every case
KEYED_INTERPRETED = {"fp32-subspace-lam1e-8-kappa3e8", "fp32-early-lam1e-6", "fp32-scale0",
                     "fp16-per-query-lambda", "bf16-S17-D32"}
KEYED_CASES = [c for c in LLA_CASES if DEVICE == "cuda" or c.id in KEYED_INTERPRETED]


def _keyed_alone(monkeypatch):
    """Make a hand-over from the keyed solve to the Sigma solve an error: these cases converge
    within KEYED_MAX_ITERS, and a wrong product, which keeps CG from converging, would
    otherwise be solved again by the Sigma path and pass."""
    import lla_decode as package

    def no_hand_over(*args, **kwargs):
        raise AssertionError("the keyed solve handed the call to the Sigma solve")

    monkeypatch.setattr(package, "_launch", no_hand_over)


@pytest.mark.parametrize("family, params, S, dtype, split, D", KEYED_CASES)
def test_lla_decode_keyed_solve_is_the_forward_row(monkeypatch, family, params, S, dtype, split, D):
    """lla_decode(solver="keyed"): CG's products as passes over the keys in fp64, no Sigma
    formed; the same rows, judged by the same budget as the Sigma solve, with no hand-over."""
    _keyed_alone(monkeypatch)
    p = _problem(family, params, S, dtype, D=D)
    assert_within_budget(_judge_lla(p, split=split, solver="keyed"))


# the key passes' layouts (tile, warps, the product's (positions, D) accumulator); the
# interpreter takes its own tile and 4 warps, so there only the accumulator is new (the
# default layout is the other keyed tests')
KEY_PASS_LAYOUTS = [(64, 4, False), (64, 4, True), (16, 4, True), (32, 8, True), (16, 1, False)]


@pytest.mark.parametrize("block_n, warps, acc2d", KEY_PASS_LAYOUTS if DEVICE == "cuda" else KEY_PASS_LAYOUTS[1:2],
                         ids=lambda x: str(x))
def test_keyed_solve_in_every_key_pass_layout(monkeypatch, block_n, warps, acc2d):
    """Every layout of the key passes (scripts/profile_decode_kernels.py --variant times them)
    solves, within budget, the kappa 2.6e8 subspace case (the one fp32 products fail) and a
    well-conditioned fp32 case (whose budget a product 1e-3 off in every layout exceeds)."""
    from lla_decode import keyed

    _keyed_alone(monkeypatch)
    for name, val in (("KEY_PASS_BLOCK_N", block_n), ("KEY_PASS_WARPS", warps), ("KEY_PASS_ACC2D", acc2d)):
        monkeypatch.setattr(keyed, name, val)
    for case in [c for c in LLA_CASES if c.id in ("fp32-subspace-lam1e-8-kappa3e8", "fp32-lam0.1-S45-split16")]:
        family, params, S, dtype, split, D = case.values
        assert_within_budget(_judge_lla(_problem(family, params, S, dtype, D=D), split=split, solver="keyed"))


def _split_case():
    """The split tests' problem, its D, and the every-position call's heads, cache length and
    prepared launch sizes (B * S sequences of the S-position cache) at the package's settings."""
    import lla_decode as package

    (case,) = [c for c in LLA_CASES if c.id == "fp32-lam0.1-S45-split16"]
    family, params, S, dtype, _, D = case.values
    p = _problem(family, params, S, dtype, D=D)
    qd, kc, vc, lens, _ = every_position(p.q, p.k, p.v)
    prep = package._prepare(qd, kc, vc, lens, 0.1, None, package.DEFAULT_CG_TOL, None, package.DEFAULT_DELTA_EPS,
                            None, True)
    return p, D, qd.shape[0] * qd.shape[1], kc.shape[2], prep


@pytest.mark.parametrize("solver", ["sigma", "keyed"])
def test_output_pass_on_a_split_of_its_own(monkeypatch, solver):
    """With 8 output-pass programs an SM (OUT_RESIDENT_PER_SM, pinned here as the package
    sets it), the output pass takes a finer split than the Sigma pass's (whose D x D partials
    keep it long): the rows are the forward's all the same."""
    import lla_decode as package

    monkeypatch.setattr(package, "OUT_RESIDENT_PER_SM", {16: 8, 32: 8, 64: 8, 128: 8})
    p, D, N, T, prep = _split_case()
    tile = prep.bn if prep.interp else package.OUT_BLOCK_N
    assert prep.out_own and prep.out_split < prep.split and prep.out_split % tile == 0, prep
    if solver == "keyed":
        _keyed_alone(monkeypatch)
    assert_within_budget(_judge_lla(p, split=None, solver=solver))


def test_keyed_passes_on_splits_of_their_own(monkeypatch):
    """With KEY_PRODUCT_RESIDENT_PER_SM and KEY_STATS_RESIDENT_PER_SM set, the keyed solve's
    product and statistics passes split the cache apart from each other and from the Sigma
    pass (the start sums the statistics' partials, each update the products'): the rows are
    the forward's all the same."""
    import lla_decode as package
    from lla_decode import keyed

    p, D, N, T, prep = _split_case()
    # programs an SM that give the two passes splits apart from each other and from the Sigma
    # pass's, at this machine's tiles and SMs
    tile = (lambda t: prep.bn if prep.interp else t)
    own = {}
    for r in (1, 2, 4, 8, 16, 32, 64):
        for name, t in (("product", keyed.KEY_PASS_BLOCK_N), ("stats", keyed.KEY_STATS_BLOCK_N)):
            sp = package.pass_split(T, N, tile(t), prep.sms, {D: r}, D, prep.split)
            if sp is not None and sp != prep.split:
                own.setdefault(name, {}).setdefault(sp, r)
    pairs = [(a, b) for a in own.get("product", {}) for b in own.get("stats", {}) if a != b]
    assert pairs, own
    product, stats = pairs[0]
    monkeypatch.setattr(keyed, "KEY_PRODUCT_RESIDENT_PER_SM", {D: own["product"][product]})
    monkeypatch.setattr(keyed, "KEY_STATS_RESIDENT_PER_SM", {D: own["stats"][stats]})
    assert len({product, stats, prep.split}) == 3, (product, stats, prep.split)
    _keyed_alone(monkeypatch)
    assert_within_budget(_judge_lla(p, split=None, solver="keyed"))


def test_a_pass_of_its_own_caps_its_splits_a_head():
    """A pass on a split of its own takes at most PASS_MAX_SPLITS splits a head, whatever the
    SMs, and one wave of them otherwise; it keeps the shared split (None) where its own would
    be longer, or with no programs an SM given."""
    import lla_decode as package

    cap, bn, T = package.PASS_MAX_SPLITS, 64, 1 << 17
    for heads, sms in ((1, 132), (1, 10_000), (4, 132), (64, 132)):
        split = package.pass_split(T, heads, bn, sms, {64: 8}, 64, T)
        n = -(-T // split)
        assert split % bn == 0 and n <= cap and n * heads <= max(heads, sms * 8), (heads, sms, split)
        assert package.pass_split(T, heads, bn, sms, {64: 8}, 64, split - bn) is None
        assert package.pass_split(T, heads, bn, sms, {64: 8}, 64, split) == split
    assert package.pass_split(T, 1, bn, 132, None, 64, 4096) is None


def _wide_values(p: Problem, Dv: int) -> Problem:
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(*p.v.shape[:-1], Dv, generator=gen, dtype=torch.float64).to(p.v.dtype).to(DEVICE)
    return Problem(p.case, p.q, p.k, v, p.ridge_lambda, p.qk_scale)


def test_value_width_other_than_the_key_width():
    """Dv = 32 over D = 16 keys: both kernels, every position."""
    p = _wide_values(_problem("gaussian", {"lam": 0.1}, _n(20)), 32)
    assert_within_budget(_judge_lla(p, split=_n(16)))
    assert_within_budget(_parallax_verdict(p, _probe(p), split=_n(16)))


PARALLAX_CASES = [
    pytest.param("gaussian", {}, _n(45), "float32", _n(16), 1.0, id="fp32-S45-split16"),
    pytest.param("gaussian", {}, _n(45), "float32", _n(48), 1.0, id="fp32-S45-split48"),
    pytest.param("gaussian", {}, _n(33), "bfloat16", _n(16), 1.0, id="bf16-S33"),
    pytest.param("gaussian", {}, _n(30), "float16", _n(32), 1.0, id="fp16-S30-split32"),
    pytest.param("gaussian", {}, _n(30), "float32", _n(16), 0.0, id="fp32-r0-softmax"),
    pytest.param("offset", {"offset": 100.0}, _n(40), "float32", _n(16), 1.0, id="fp32-offset100"),
    pytest.param("large_norm", {"factor": 30.0}, _n(30), "float32", _n(16), 1.0, id="fp32-large-norm30"),
]


@pytest.mark.parametrize("family, params, S, dtype, split, rsize", PARALLAX_CASES)
def test_parallax_decode_every_position_is_the_forward_row(family, params, S, dtype, split, rsize):
    p = _problem(family, params, S, dtype)
    assert_within_budget(_parallax_verdict(p, _probe(p, size=rsize), split=split))


# the fused combine (parallax_decode.FUSED_MAX_SPLITS): every call fuses
FUSE_ALL = 1 << 30
FUSED_CASES = [c for c in PARALLAX_CASES if c.id in ("fp32-S45-split16", "bf16-S33", "fp32-large-norm30")]


def _fused_only(monkeypatch):
    """Fuse every call, and make a launch of the separate combine an error."""
    import parallax_decode as package

    def no_combine(*args, **kwargs):
        raise AssertionError("the separate combine ran: the call did not fuse")

    monkeypatch.setattr(package, "FUSED_MAX_SPLITS", FUSE_ALL)
    monkeypatch.setattr(package, "_combine", no_combine)


@pytest.mark.parametrize("family, params, S, dtype, split, rsize", FUSED_CASES)
def test_parallax_fused_combine_is_the_forward_row(monkeypatch, family, params, S, dtype, split, rsize):
    """The last split program of each head combines the head's splits (FUSED_CHUNK at a
    time, so several chunks at split 16 and S = 45): every position is the forward's row."""
    _fused_only(monkeypatch)
    p = _problem(family, params, S, dtype)
    assert_within_budget(_parallax_verdict(p, _probe(p, size=rsize), split=split))


def test_parallax_fused_plan_leaves_its_count_zero(monkeypatch):
    """A fused plan's count a head is zero after every run, so each replay combines again: a
    second run into a NaN-filled output is the first, bit for bit."""
    _fused_only(monkeypatch)
    q, r, kc, vc, lens = _plan_inputs()
    plan = _plan_for("parallax", kc, vc, lens, num_heads=4, split=_n(16))
    first = plan.run(q, r)
    assert plan.count is not None and int(plan.count.abs().sum()) == 0
    again = torch.full_like(first, float("nan"))
    plan.run(q, r, out=again)
    assert torch.equal(again, first) and int(plan.count.abs().sum()) == 0


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_parallax_decode_under_a_large_common_key_offset(offset):
    """k + offset c: the moments cancel the offset before any product (docs/decode.md)."""
    p = _problem("gaussian", {}, _n(40), "float32", seed=2)
    gen = torch.Generator().manual_seed(4)
    c = torch.randn(p.q.shape[-1], generator=gen, dtype=torch.float64).to(p.k.device)
    k = (p.k.double() + offset * c / c.norm()).to(p.k.dtype)
    p2 = Problem(p.case, p.q, k, p.v, p.ridge_lambda, p.qk_scale)
    assert_within_budget(_parallax_verdict(p2, _probe(p2, size=2.0), split=_n(16)))


# The forward's budget grows with a common key offset (the sensitivity to relative
# perturbations of keys of size |c| is the uncentred expansion's cancellation,
# docs/error-model.md §8), so at offset 1e3 and 1e4 it passes an uncentred decode (ratio
# 0.19, 0.17). As for the forward kernel (tests/test_kernel_parallax.py), the centring is
# checked by an exact key shift judged against the unshifted problem's budget.
SHIFT = 1024.0


def _exactly_shiftable(S):
    """fp32 keys on a 2^-13 grid (the fp32 spacing at 1024), so keys + SHIFT are exact and the
    shifted problem is the unshifted one; queries of scale 1e-2 keep the shift's rounding
    out of the scores s <q, k_j>, which no centring removes."""
    p = _problem("gaussian", {}, S, "float32", seed=2)
    q = (p.q.double() * 1e-2).float()
    k = (torch.round(p.k.double() * 2.0**13) / 2.0**13).float()
    base = Problem(p.case, q, k, p.v, p.ridge_lambda, p.qk_scale)
    shifted = Problem(p.case, q, k + SHIFT, p.v, p.ridge_lambda, p.qk_scale)
    assert torch.equal(shifted.k - SHIFT, k)  # the shift is exact
    return base, shifted


def _judge_shifted(fn, *, planted: str | None = None):
    base, shifted = _exactly_shiftable(_n(40))
    r = _probe(base, size=10.0)
    o = decode_parallax_every_position(shifted, r, fn, split=_n(16))
    impl = "parallax_decode" if planted is None else f"planted:{planted}"
    return check_parallax_decode(base.q, base.k, base.v, r, o, impl=impl, case=f"{base.describe()} keys + {SHIFT:g}, "
                                 "judged unshifted", qk_scale=base.qk_scale)


def test_parallax_decode_key_shift_meets_the_unshifted_budget():
    assert_within_budget(_judge_shifted(parallax_decode))


def _chunked(chunk):
    """parallax_decode with its combine merging ``chunk`` splits at a time."""
    def fn(q, r, k, v, lengths, **kw):
        return parallax_decode_combine(parallax_decode_partials(q, r, k, v, lengths, **kw), q, v, chunk=chunk)
    return fn


@pytest.mark.parametrize("chunk", [None, 1, 2, 4], ids=["default-chunk", "chunk1", "chunk2", "chunk4"])
@pytest.mark.parametrize("slope", [15.0, 8.0], ids=["zero-weights", "subnormal-weights"])
@pytest.mark.parametrize("split", [_n(16), _n(48)], ids=["three-splits", "one-split-three-tiles"])
def test_parallax_decode_scores_far_apart(split, slope, chunk):
    """Scores slope |j - 20| below key 20's (in units of the interpreter's tile of 16), so
    the last tile (and split) starts 12 slope below the maximum of an earlier one. At 15
    its weights all underflow to 0 in fp32 (e^-180 < 2^-149); at 8 they are subnormal
    (e^-96 < 2^-126), and the reciprocal of their sum overflows. Either group must add
    (almost) nothing: a mean divided by such a sum is 0/0 or a sum times inf, a NaN output.
    The combine's chunks of 1, 2 and 4 splits put the far split in a chunk of its own, in a
    partial chunk after a full one, and in one chunk with the maximum's split."""
    if chunk is not None and split == _n(48):
        pytest.skip("one split: the combine has one chunk whatever its size")
    S, D = _n(48), 16
    gen = torch.Generator().manual_seed(5)
    j = torch.arange(S, dtype=torch.float64)
    k = 0.1 * torch.randn(1, 1, S, D, generator=gen, dtype=torch.float64)
    q = torch.zeros(1, 1, S, D, dtype=torch.float64)
    q[..., 0] = 4.0  # qk_scale 1/4 at D = 16: a_j = k_j[0] (up to the small coordinates)
    k[..., 0] = -slope * (j * 16 / TILE - 20).abs()
    v = torch.randn(1, 1, S, D, generator=gen, dtype=torch.float64)
    p = Problem(Case("gaussian", {}, B=1, H=1, S=S, D=D), *(t.float().to(DEVICE) for t in (q, k, v)),
                0.1, 0.25)
    ratio, msg = _judge_parallax(p, _probe(p, size=1.0), _chunked(chunk), split=split)
    assert ratio <= THRESHOLD, msg


# many splits of one tile: 14, 4 (a whole number of chunks of 2 and 4), 1 and 8 of them
CHUNK_LENGTHS = [_n(16) * 13 + 5, _n(16) * 4, 1, _n(16) * 7 + 3]


@pytest.mark.parametrize("chunk", [1, 2, 4, 16], ids=["chunk1", "chunk2", "chunk4", "one-chunk"])
def test_parallax_decode_combines_many_splits_in_chunks(chunk):
    """A ragged batch over splits of one tile (up to 14 splits a sequence), combined 1, 2, 4
    and 16 splits at a time: whole and partial chunks, one chunk holding every split, and a
    first token (one split) are each the forward's row."""
    S = max(CHUNK_LENGTHS)
    p = _problem("gaussian", {}, S, B=len(CHUNK_LENGTHS), seed=2)
    lens = torch.tensor(CHUNK_LENGTHS, device=DEVICE)
    b, t = torch.arange(len(CHUNK_LENGTHS), device=DEVICE), lens - 1
    r = _probe(p, size=2.0)
    o = _chunked(chunk)(p.q[b, :, t], r[b, :, t], poison_past(p.k, lens), poison_past(p.v, lens), lens,
                        qk_scale=p.qk_scale, split=_n(16))
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o, impl=f"parallax_decode chunk {chunk}",
                                               case=f"{p.describe()} lengths {CHUNK_LENGTHS}", qk_scale=p.qk_scale,
                                               lengths=lens))


def test_split_rule_keeps_a_small_cache_in_one_combine_chunk():
    """The wave rule's split count (slots over heads, at most a split a tile), except that a
    head whose cache fits in one chunk of splits of at most ONE_LEVEL_MAX_TILES tiles takes
    the chunk's count, so that its combine is one launch; a cache too long for that keeps the
    wave's count and the combine's two levels. On the host alone: the rule, not the kernels."""
    choose, most = _px_pkg.choose_split, _px_pkg.ONE_LEVEL_MAX_TILES
    slots, bn, chunk = 1056, 16, 64
    # batch 1, 4k: 256 one-tile splits by the wave rule; 64 of 4 tiles fit one chunk
    assert 4096 // choose(4096, 1, bn, slots) == 256
    assert choose(4096, 1, bn, slots, chunk) == 4 * bn
    # the longest cache one chunk takes, and one tile more
    assert choose(chunk * most * bn, 1, bn, slots, chunk) == most * bn
    longer = choose(chunk * most * bn + bn, 1, bn, slots, chunk)
    assert longer == choose(chunk * most * bn + bn, 1, bn, slots) and longer < most * bn
    # heads that fill the wave: the chunk changes nothing
    assert choose(131072, 64, bn, slots, chunk) == choose(131072, 64, bn, slots) == 131072 // (slots // 64)
    # fewer tiles than a chunk: a split a tile, as before
    assert choose(100, 1, bn, slots, chunk) == bn


@pytest.mark.parametrize("chunk", [0, 3, 2.0, True])
def test_bad_combine_chunk_is_named(chunk):
    p = _problem("gaussian", {}, _n(16))
    parts = parallax_decode_partials(p.q[:, :, -1], p.q[:, :, -1], p.k, p.v, torch.tensor([_n(16)]))
    with pytest.raises(LLAInputError, match="chunk: expected None or a power of two"):
        parallax_decode_combine(parts, p.q[:, :, -1], p.v, chunk=chunk)


# ------------------------------------------------------------------------- ragged batches
LENGTHS = [_n(45), 1, _n(20)]  # none a multiple of the split (_n(16)), one a first token


def _ragged(dtype="float32"):
    p = _problem("gaussian", {"lam": 0.1}, _n(48), dtype, B=len(LENGTHS))
    lens = torch.tensor(LENGTHS, device=DEVICE)
    t = lens - 1
    b = torch.arange(len(LENGTHS), device=DEVICE)
    return p, lens, b, t


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lla_decode_ragged_batch(dtype):
    p, lens, b, t = _ragged(dtype)
    q = p.q[b, :, t]
    lam = p.lam_tensor[b, :, t].to(torch.float32)
    o = lla_decode(q, poison_past(p.k, lens), poison_past(p.v, lens), lens, ridge_lambda=lam, qk_scale=p.qk_scale,
                   split=_n(16))
    fb = forward_budget(p, IMPL)
    err = (o.double() - fb.details.o[b, :, t]).norm(dim=-1)
    ratio = err / fb.allowed[b, :, t]
    assert bool((ratio <= THRESHOLD).all()), f"ragged LLA decode: ratios {ratio.tolist()} (lengths {LENGTHS})"


@pytest.mark.parametrize("D, S", [(32, _n(40)), (64, _n(20))], ids=["D32-3-splits", "D64-2-splits"])
def test_lla_decode_sigma_in_blocks(D, S):
    """Head dims of two and four block rows of the split kernel's Sigma blocks (16 under the
    interpreter, 64 compiled: D = 128 there): the blocks above the diagonal and their
    transposes make the whole Sigma_s, and the diagonal blocks all of mu_s."""
    p = _problem("gaussian", {"lam": 1e-2}, S, D=D, seed=4)
    assert_within_budget(_judge_lla(p, split=_n(16)))


# 13, 4, 1 and 8 splits of one tile: the solve and finish kernels' chunks of 2 splits (under
# the interpreter) whole and partial
LLA_CHUNK_LENGTHS = [_n(16) * 12 + 5, _n(16) * 4, 1, _n(16) * 7 + 3]


def test_lla_decode_combines_many_splits():
    S = max(LLA_CHUNK_LENGTHS)
    p = _problem("gaussian", {"lam": 0.1}, S, B=len(LLA_CHUNK_LENGTHS), seed=6)
    lens = torch.tensor(LLA_CHUNK_LENGTHS, device=DEVICE)
    b, t = torch.arange(len(LLA_CHUNK_LENGTHS), device=DEVICE), lens - 1
    o = lla_decode(p.q[b, :, t], poison_past(p.k, lens), poison_past(p.v, lens), lens,
                   ridge_lambda=p.lam_tensor[b, :, t].to(torch.float32), qk_scale=p.qk_scale, split=_n(16))
    fb = forward_budget(p, IMPL)
    ratio = (o.double() - fb.details.o[b, :, t]).norm(dim=-1) / fb.allowed[b, :, t]
    assert bool((ratio <= THRESHOLD).all()), f"many-split LLA decode: ratios {ratio.tolist()} " \
                                              f"(lengths {LLA_CHUNK_LENGTHS})"


# ------------------------------------------------------------------------- the plan
def _plan_inputs():
    """Two sequences of lengths that are not multiples of the split (one a first token) in a
    cache with room to append; 4 query heads over 2 key-value heads; the unused cache
    positions poisoned."""
    kv = _problem("gaussian", {"lam": 0.1}, _n(40), B=2, H=2, seed=6)
    gen = torch.Generator().manual_seed(11)
    lens = torch.tensor([_n(37), 1])
    q, r = (torch.randn(2, 4, 16, generator=gen).to(DEVICE) for _ in range(2))
    return q, r, poison_past(kv.k, lens).contiguous(), poison_past(kv.v, lens).contiguous(), lens


PLAN_LAMBDA = 0.1


def _plan_for(kernel, kc, vc, lens, **kw):
    from lla_decode import lla_decode_plan
    from parallax_decode import parallax_decode_plan

    if kernel == "parallax":
        return parallax_decode_plan(kc, vc, lens, **kw)
    return lla_decode_plan(kc, vc, lens, ridge_lambda=PLAN_LAMBDA, **kw)


def _planned(kernel, kc, vc, lens):
    """(plan, run(q, r, lengths, **kw), plain(q, r, lengths)): the package's plan for
    ``kernel`` (4 query heads) and the plain call its run must equal."""
    plan = _plan_for(kernel, kc, vc, lens, num_heads=4, split=_n(16))
    if kernel == "parallax":
        return plan, (lambda q, r, n, **kw: plan.run(q, r, **kw)), \
            (lambda q, r, n: parallax_decode(q, r, kc, vc, n, split=_n(16)))
    return plan, (lambda q, r, n, **kw: plan.run(q, **kw)), \
        (lambda q, r, n: lla_decode(q, kc, vc, n, ridge_lambda=PLAN_LAMBDA, split=_n(16)))


@pytest.mark.parametrize("kernel", ["parallax", "lla"])
def test_plan_run_is_the_decode_call(kernel):
    """A plan's run is the same launches as the plain call: equal bit for bit, for the plan's
    lengths, after set_lengths, and into an ``out`` tensor."""
    q, r, kc, vc, lens = _plan_inputs()
    plan, run, plain = _planned(kernel, kc, vc, lens)
    assert torch.equal(run(q, r, lens), plain(q, r, lens))
    new = torch.ones_like(lens)
    plan.set_lengths(new)
    want = plain(q, r, new)
    out = torch.full_like(want, float("nan"))
    assert run(q, r, new, out=out) is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("kernel", ["parallax", "lla"])
def test_plan_reads_the_cache_in_place(kernel):
    """A decode step writes the next key and value into the cache and lengths + 1 into the
    plan; the run sees both, as a CUDA graph replay would."""
    q, r, kc, vc, lens = _plan_inputs()
    plan, run, plain = _planned(kernel, kc, vc, lens)
    gen = torch.Generator().manual_seed(12)
    b = torch.arange(kc.shape[0])
    kc[b, :, lens] = torch.randn(kc[b, :, lens].shape, generator=gen).to(DEVICE)
    vc[b, :, lens] = torch.randn(vc[b, :, lens].shape, generator=gen).to(DEVICE)
    plan.set_lengths(lens + 1)
    assert torch.equal(run(q, r, lens + 1), plain(q, r, lens + 1))


def test_lla_plan_statistics_are_lla_decode_s():
    """A plan planned with a per-head lambda tensor (held from planning) gives lla_decode's
    output and every one of its statistics, bit for bit."""
    from lla_decode import lla_decode_plan

    q, _, kc, vc, lens = _plan_inputs()
    plan = lla_decode_plan(kc, vc, lens, ridge_lambda=torch.full((2, 4), PLAN_LAMBDA, device=DEVICE), num_heads=4)
    o, st = plan.run(q, return_stats=True)
    o2, st2 = lla_decode(q, kc, vc, lens, ridge_lambda=PLAN_LAMBDA, return_stats=True)
    assert torch.equal(o, o2) and st.keys() == st2.keys()
    for key in st:
        assert torch.equal(st[key], st2[key]), key


@pytest.mark.parametrize("kernel", ["parallax", "lla"])
@pytest.mark.parametrize("what, match", [
    ("q shape", r"^q: expected shape \(2, 4, 16\)"),
    ("q dtype", r"^q: expected shape .*float32.*got .*float64"),
    ("out shape", r"^out: expected a contiguous tensor of shape \(2, 4, 16\)"),
    ("q nan", r"^q: expected finite values"),
    ("lengths", r"^lengths: expected 1 <= lengths\[b\] <= T_max"),
    ("strided cache", r"^k_cache: a plan reads the cache in place"),
    ("num_heads", r"^num_heads: expected None"),
])
def test_plan_bad_input_is_named(kernel, what, match):
    q, r, kc, vc, lens = _plan_inputs()
    plan, run, _ = _planned(kernel, kc, vc, lens)
    calls = {
        "q shape": lambda: run(q[:, :2], r[:, :2], lens),
        "q dtype": lambda: run(q.double(), r, lens),
        "out shape": lambda: run(q, r, lens, out=torch.empty(2, 4, 8, device=DEVICE)),
        "q nan": lambda: run(q.index_fill(2, torch.tensor([3], device=DEVICE), float("nan")), r, lens),
        "lengths": lambda: plan.set_lengths(lens * 0),
        "strided cache": lambda: _plan_for(kernel, kc.transpose(2, 3), vc, lens),
        "num_heads": lambda: _plan_for(kernel, kc, vc, lens, num_heads=0),
    }
    with pytest.raises(LLAInputError, match=match):
        calls[what]()


def test_lla_plan_checks_its_solver():
    _, _, kc, vc, lens = _plan_inputs()
    with pytest.raises(LLAInputError, match=r"^solver: expected one of 'sigma', 'keyed', 'auto', got 'cholesky'"):
        _plan_for("lla", kc, vc, lens, solver="cholesky")


def test_parallax_plan_checks_its_probe():
    q, r, kc, vc, lens = _plan_inputs()
    _, run, _ = _planned("parallax", kc, vc, lens)
    with pytest.raises(LLAInputError, match=r"^r: expected shape .*float32.*got .*float64"):
        run(q, r.double(), lens)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parallax_decode_ragged_batch(dtype):
    p, lens, b, t = _ragged(dtype)
    r = _probe(p)
    o = parallax_decode(p.q[b, :, t], r[b, :, t], poison_past(p.k, lens), poison_past(p.v, lens), lens,
                        qk_scale=p.qk_scale, split=_n(16))
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o, impl="parallax_decode",
                                               case=f"{p.describe()} lengths {LENGTHS}", qk_scale=p.qk_scale,
                                               lengths=lens))


def test_decode_oracles_are_the_forward_rows():
    """The decode oracles slice the forward oracles: ragged prefixes, grouped heads."""
    gen = torch.Generator().manual_seed(0)
    B, H, Hk, T, D = 3, 4, 2, 12, 8
    q, r = (torch.randn(B, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hk, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor([12, 1, 7])
    lam = torch.rand(B, H, generator=gen, dtype=torch.float64) + 0.05
    o_l = lla_decode_reference(q, poison_past(k, lens), poison_past(v, lens), lens, ridge_lambda=lam)
    o_p = parallax_decode_reference(q, r, poison_past(k, lens), poison_past(v, lens), lens)
    for b, L in enumerate(lens.tolist()):
        kb, vb = (t[b:b + 1, :, :L].repeat_interleave(H // Hk, 1) for t in (k, v))
        qb, rb = (t[b:b + 1, :, None, :].expand(1, H, L, D) for t in (q, r))
        want_l = lla_forward(qb, kb, vb, ridge_lambda=lam[b][None, :, None].expand(1, H, L))[0, :, L - 1]
        want_p = parallax_forward(qb, kb, vb, rb)[0, :, L - 1]
        assert torch.equal(o_l[b], want_l) and torch.equal(o_p[b], want_p)
    assert torch.allclose(o_l[1], v[1, :, 0].repeat_interleave(2, 0), rtol=0, atol=1e-14)  # first token


# ------------------------------------------------------------------------- first token
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_first_token_is_v0(dtype):
    """lengths = 1: LLA returns v_0 to rounding (one key: the regression interpolates it);
    Parallax returns v_0 exactly (every centred moment is 0)."""
    p = _problem("gaussian", {"lam": 0.1}, _n(16), dtype, B=2)
    lens = torch.ones(2, dtype=torch.int64, device=DEVICE)
    kc, vc = poison_past(p.k, lens), poison_past(p.v, lens)
    v0 = p.v[:, :, 0].double()
    o = lla_decode(p.q[:, :, 0], kc, vc, lens, ridge_lambda=0.1, qk_scale=p.qk_scale).double()
    allowed = MODEL_SAFETY * (unit_roundoff(p.q.dtype) + U_C) * v0.norm(dim=-1)
    assert bool(((o - v0).norm(dim=-1) <= allowed).all()), f"|o_0 - v_0| = {(o - v0).norm(dim=-1).max():.3e}"
    o_p = parallax_decode(p.q[:, :, 0], _probe(p)[:, :, 0], kc, vc, lens, qk_scale=p.qk_scale)
    assert torch.equal(o_p, p.v[:, :, 0])


# ------------------------------------------------------------------------- token by token
def _step(p: Problem, T_max: int, call):
    """Decode a problem token by token, appending k_t, v_t to a NaN-filled cache of T_max."""
    B, H, S, D = p.q.shape
    kc = torch.full((B, H, T_max, D), float("nan"), dtype=p.k.dtype, device=DEVICE)
    vc = torch.full((B, H, T_max, p.v.shape[-1]), float("nan"), dtype=p.v.dtype, device=DEVICE)
    outs = []
    for t in range(S):
        kc[:, :, t] = p.k[:, :, t]
        vc[:, :, t] = p.v[:, :, t]
        outs.append(call(t, kc, vc, torch.full((B,), t + 1, dtype=torch.int32, device=DEVICE)))
    return torch.stack(outs, 2)


def test_lla_token_by_token_reproduces_the_forward():
    p = _problem("gaussian", {"lam": 0.1}, _n(20), B=2, seed=5)
    lam = p.lam_tensor.to(torch.float32)
    o = _step(p, _n(24), lambda t, kc, vc, lens: lla_decode(p.q[:, :, t], kc, vc, lens, ridge_lambda=lam[:, :, t],
                                                            qk_scale=p.qk_scale, split=_n(16)))
    assert_within_budget(check_forward(p, IMPL, o))


def test_parallax_token_by_token_reproduces_the_forward():
    p = _problem("gaussian", {}, _n(20), "bfloat16", B=2, seed=5)
    r = _probe(p)
    o = _step(p, _n(24), lambda t, kc, vc, lens: parallax_decode(p.q[:, :, t], r[:, :, t], kc, vc, lens,
                                                                 qk_scale=p.qk_scale, split=_n(16)))
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o, impl="parallax_decode token by token",
                                               case=p.describe(), qk_scale=p.qk_scale))


# ------------------------------------------------------------------------- grouped heads
def _grouped(dtype="float32"):
    """H = 4 query heads over H_kv = 2 key-value heads; the forward sees the kv heads repeated."""
    kv = _problem("gaussian", {"lam": 0.1}, _n(40), dtype, H=2, seed=6)
    qs = _problem("gaussian", {"lam": 0.1}, _n(40), dtype, H=4, seed=7)
    full = Problem(qs.case, qs.q, kv.k.repeat_interleave(2, 1), kv.v.repeat_interleave(2, 1), 0.1, qs.qk_scale)
    return full, kv.k, kv.v


def _every_position_grouped(p, k, v):
    return every_position(p.q, k, v)


def test_lla_decode_grouped_query_heads():
    p, k, v = _grouped()
    qd, kc, vc, lens, _ = _every_position_grouped(p, k, v)
    o = lla_decode(qd, kc, vc, lens, ridge_lambda=0.1, qk_scale=p.qk_scale, split=_n(16))
    B, H, S, _ = p.q.shape
    assert_within_budget(check_forward(p, IMPL, o.reshape(B, S, H, -1).transpose(1, 2)))


def test_parallax_decode_grouped_query_heads():
    p, k, v = _grouped("bfloat16")
    r = _probe(p)
    qd, kc, vc, lens, _ = _every_position_grouped(p, k, v)
    rd = r.transpose(1, 2).reshape(qd.shape)
    o = parallax_decode(qd, rd, kc, vc, lens, qk_scale=p.qk_scale, split=_n(16))
    B, H, S, _ = p.q.shape
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o.reshape(B, S, H, -1).transpose(1, 2),
                                               impl="parallax_decode grouped", case=p.describe(),
                                               qk_scale=p.qk_scale))


# ------------------------------------------------------------------------- statistics
def test_lla_decode_statistics():
    p = _problem("spectrum", {"kappa": 1e3}, _n(40))
    o, st = decode_lla_every_position(p, lla_decode, split=_n(16))
    # every position within its forward row's budget, as test_lla_decode_every_position_is_the_forward_row
    assert_within_budget(check_forward(p, IMPL, o, stats=st or None))
    D = p.q.shape[-1]
    assert set(st) == {"cg_iters", "cg_residual", "omega", "delta", "fallback"}
    assert st["cg_iters"].dtype == torch.int32 and st["cg_iters"].shape == p.q.shape[:-1]
    assert bool((st["cg_iters"] >= 1).all()) and bool((st["cg_iters"] <= 16 * D).all())
    assert float(st["cg_residual"].max()) <= 1e-5, float(st["cg_residual"].max())
    assert not bool(st["fallback"].any())
    d = forward_budget(p, IMPL, dense=False).details
    # omega and delta are the forward's, up to fp32 rounding of sums of S terms
    assert torch.allclose(st["omega"].double(), d.omega, rtol=1e-5, atol=0)
    assert torch.allclose(st["delta"].double() / st["omega"].double(), d.delta / d.omega, rtol=1e-3, atol=1e-6)
    # no iteration: rho = 0, the true residual is ||mu|| / ||mu|| = 1
    _, st0 = decode_lla_every_position(p, lla_decode, split=_n(16), cg_max_iters=0)
    assert bool((st0["cg_iters"] == 0).all()) and bool((st0["cg_residual"] == 1.0).all())


# ------------------------------------------------------------------------- bad input
def _args(B=2, H=2, T=8, D=16, Dv=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(B, H, T, D, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(B, H, T, Dv, generator=gen).to(dtype).to(DEVICE)
    return q, k, v, torch.tensor([T, 3], device=DEVICE)


def _bad(name):
    q, k, v, lens = _args()
    if name == "q-rank":
        return (q[:, :, None], k, v, lens), "q: expected shape"
    if name == "k-heads":
        return (q, torch.zeros(2, 3, 8, 16, device=DEVICE), v, lens), "k_cache: expected shape.*H_kv dividing H"
    if name == "k-D":
        return (q, k[..., :8], v, lens), "k_cache"
    if name == "v-T":
        return (q, k, v[:, :, :4], lens), "v_cache"
    if name == "dtype-mix":
        return (q, k.half(), v, lens), "k_cache|one dtype"
    if name == "float64":
        return (q.double(), k.double(), v.double(), lens), "q: expected a floating dtype"
    if name == "D-24":
        q, k, v, lens = _args(D=24)
        return (q, k, v, lens), "head dimension 24"
    if name == "len-0":
        return (q, k, v, torch.tensor([0, 3], device=DEVICE)), "lengths"
    if name == "len-past":
        return (q, k, v, torch.tensor([9, 3], device=DEVICE)), "lengths.*T_max = 8"
    if name == "len-float":
        return (q, k, v, lens.float()), "lengths: expected an integer tensor"
    if name == "len-shape":
        return (q, k, v, lens[:1]), "lengths: expected an integer tensor of shape"
    if name == "nan-used":
        k = k.clone()
        k[1, 0, 2, 0] = float("nan")
        return (q, k, v, lens), "k_cache: expected finite values"
    raise AssertionError(name)


BAD = ["q-rank", "k-heads", "k-D", "v-T", "dtype-mix", "float64", "D-24", "len-0", "len-past", "len-float",
       "len-shape", "nan-used"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_named(name):
    (q, k, v, lens), match = _bad(name)
    with pytest.raises(LLAInputError, match=match):
        lla_decode(q, k, v, lens, ridge_lambda=0.1)
    r = q.clone() if q.dim() == 3 else torch.zeros_like(q)
    with pytest.raises(LLAInputError, match=match):
        parallax_decode(q, r, k, v, lens)


def test_nan_past_the_length_is_not_an_error():
    q, k, v, lens = _args()
    k, v = poison_past(k, lens), poison_past(v, lens)
    assert torch.isfinite(lla_decode(q, k, v, lens, ridge_lambda=0.1)).all()
    assert torch.isfinite(lla_decode(q, k, v, lens, ridge_lambda=0.1, solver="keyed")).all()
    assert torch.isfinite(parallax_decode(q, q, k, v, lens)).all()


@pytest.mark.parametrize("kw, match", [
    ({"ridge_lambda": -1.0}, "ridge_lambda"), ({"ridge_lambda": 0.1, "cg_tol": -1}, "cg_tol"),
    ({"ridge_lambda": 0.1, "cg_max_iters": 1.5}, "cg_max_iters"), ({"ridge_lambda": 0.1, "split": 20}, "split"),
    ({"ridge_lambda": 0.1, "qk_scale": float("nan")}, "qk_scale"), ({"ridge_lambda": torch.ones(3)}, "ridge_lambda"),
    ({"ridge_lambda": 0.1, "solver": "cholesky"}, "^solver: expected one of 'sigma', 'keyed', 'auto', got 'cholesky'"),
    # the keyed solve takes the same checks
    ({"ridge_lambda": -1.0, "solver": "keyed"}, "ridge_lambda"),
    ({"ridge_lambda": 0.1, "split": 20, "solver": "keyed"}, "split"),
])
def test_bad_option_is_named(kw, match):
    q, k, v, lens = _args()
    with pytest.raises(LLAInputError, match=match):
        lla_decode(q, k, v, lens, **kw)


@pytest.mark.parametrize("pkg", ["lla_decode", "parallax_decode"])
def test_tile_size_is_the_split_granule(pkg):
    """tile_size() names the splits the package accepts: one tile runs, half a tile and a
    tile and a half are refused."""
    q, k, v, lens = _args(T=_n(40))
    mod = _lla_pkg if pkg == "lla_decode" else _px_pkg
    tile = mod.tile_size()
    call = ((lambda split: lla_decode(q, k, v, lens, ridge_lambda=0.1, split=split)) if pkg == "lla_decode"
            else (lambda split: parallax_decode(q, q, k, v, lens, split=split)))
    assert torch.isfinite(call(tile)).all()
    for bad in (tile // 2, tile + tile // 2):
        with pytest.raises(LLAInputError, match=f"split: expected None or a positive multiple of the tile {tile}"):
            call(bad)


def test_bad_probe_is_named():
    q, k, v, lens = _args()
    with pytest.raises(LLAInputError, match="r: expected the shape of q"):
        parallax_decode(q, q[:, :1], k, v, lens)
    with pytest.raises(LLAInputError, match="r: expected q's dtype"):
        parallax_decode(q, q.half(), k, v, lens)


def test_nonfinite_probe_is_named():
    """r's finiteness is checked in the cache's reduction (one device read): a NaN in r is
    still named, and a finite call past it is not refused."""
    q, k, v, lens = _args()
    r = q.clone()
    r[1, 0, 3] = float("nan")
    with pytest.raises(LLAInputError, match=r"^r: expected finite values, found 1 non-finite \(first at index \(1, 0, 3\)"):
        parallax_decode(q, r, k, v, lens)
    assert torch.isfinite(parallax_decode(q, q, k, v, lens)).all()


# ------------------------------------------------------------------------- planted bugs
def _shorter(lengths):
    return torch.clamp(lengths - 1, min=1)


def lla_off_by_one(q, k, v, lengths, **kw):
    """Attends to one position too few: the query's own key is dropped."""
    return lla_decode(q, k, v, _shorter(lengths), **kw)


def lla_stale_length(q, k, v, lengths, **kw):
    """The last sequence of the batch keeps the length it had before its last append."""
    lengths = lengths.clone()
    lengths[-1:] = _shorter(lengths[-1:])
    return lla_decode(q, k, v, lengths, **kw)


def _sum_without_rescale(parts):
    """The splits' sums added as they are, each against its own max: the missing exp(m_s - M)."""
    return (parts["m"].amax(1), parts["omega"].sum(1), parts["mu"].sum(1), parts["sigma"].sum(1))


def lla_no_rescale(q, k, v, lengths, *, return_stats=False, **kw):
    o, st, _ = lla_decode_stages(q, k, v, lengths, combine=_sum_without_rescale, **kw)
    return (o, st._asdict()) if return_stats else o


def parallax_off_by_one(q, r, k, v, lengths, **kw):
    return parallax_decode(q, r, k, v, _shorter(lengths), **kw)


def parallax_stale_length(q, r, k, v, lengths, **kw):
    lengths = lengths.clone()
    lengths[-1:] = _shorter(lengths[-1:])
    return parallax_decode(q, r, k, v, lengths, **kw)


def parallax_no_rescale(q, r, k, v, lengths, **kw):
    """The splits' centred moments merged (in torch) without the exp(m_s - M) rescale."""
    parts = parallax_decode_partials(q, r, k, v, lengths, **kw)
    B, H, _ = q.shape
    om, nu, db, x = parts["omega"][:, 0], parts["nu"][:, 0], parts["dbar"][:, 0], parts["x"][:, 0]
    used = -(-parts["lengths"].long().repeat_interleave(H) // parts["split"])
    for s in range(1, parts["m"].shape[1]):
        live = (s < used)[:, None]
        om_b, nu_b, db_b, x_b = parts["omega"][:, s], parts["nu"][:, s], parts["dbar"][:, s], parts["x"][:, s]
        tot = om + torch.where(live[:, 0], om_b, 0)
        fb = torch.where(live[:, 0], om_b / tot, 0)
        x = torch.where(live, x + x_b + (om * fb * (db_b - db))[:, None] * (nu_b - nu), x)
        nu = nu + fb[:, None] * (nu_b - nu)
        db = db + fb * (db_b - db)
        om = tot
    o = v[:, :, 0].reshape(B * H, -1).float() + nu - x / om[:, None]
    return o.reshape(B, H, -1).to(q.dtype)


def parallax_uncentred(q, r, k, v, lengths, *, qk_scale=None, split=None):
    """The trap the decode's centring avoids, in fp32 torch over each sequence's cache:
    C r as sum_j p_j v_j <k_j, r> - nu <kbar, r>."""
    s = check_scale(qk_scale, q.shape[-1])
    out = []
    for b in range(q.shape[0]):
        L = int(lengths[b])
        kb, vb, qb, rb = k[b, :, :L].float(), v[b, :, :L].float(), q[b].float(), r[b].float()
        p = torch.softmax(s * (kb @ qb[..., None])[..., 0], -1)
        nu = (p[..., None] * vb).sum(-2)
        ph = p * (kb @ rb[..., None])[..., 0]
        out.append(nu - ((ph[..., None] * vb).sum(-2) - nu * ph.sum(-1, keepdim=True)))
    return torch.stack(out).to(q.dtype)


def test_uncentred_decode_fails_the_key_shift_test():
    # the key-shift test can fail: the uncentred expansion passes unshifted keys and misses
    # the unshifted budget by ~77x on the shifted ones
    base, _ = _exactly_shiftable(_n(40))
    r = _probe(base, size=10.0)
    plain = check_parallax_decode(base.q, base.k, base.v, r,
                                  decode_parallax_every_position(base, r, parallax_uncentred, split=_n(16)),
                                  impl="uncentred decode, unshifted", case="unshifted", qk_scale=base.qk_scale)
    assert plain.passed, plain.message
    shifted = _judge_shifted(parallax_uncentred, planted="parallax_decode uncentred")
    assert shifted.ratio > 10.0, shifted.message


LLA_MUTANTS = {"off-by-one-length": lla_off_by_one, "stale-length": lla_stale_length,
               "combine-without-rescale": lla_no_rescale}
PARALLAX_MUTANTS = {"off-by-one-length": parallax_off_by_one, "stale-length": parallax_stale_length,
                    "combine-without-rescale": parallax_no_rescale}


@pytest.mark.parametrize("name", list(LLA_MUTANTS))
def test_lla_planted_bug_is_caught(name):
    p = _problem("gaussian", {"lam": 0.1}, _n(40))
    v = _judge_lla(p, LLA_MUTANTS[name], planted=f"lla_decode {name}", split=_n(16))
    assert not v.passed, f"planted bug {name} passed the decode check: {v.message}"


@pytest.mark.parametrize("name", list(PARALLAX_MUTANTS))
def test_parallax_planted_bug_is_caught(name):
    p = _problem("gaussian", {}, _n(40))
    v = _parallax_verdict(p, _probe(p), PARALLAX_MUTANTS[name], planted=f"parallax_decode {name}", split=_n(16))
    assert not v.passed, f"planted bug {name} passed the decode check: {v.message}"


def test_the_interface_names_of_issue_23():
    # lla_triton.lla_decode and parallax_triton.parallax_decode are the issue's names; each is the
    # decode package's own function, with the issue's arguments
    import inspect

    import lla_decode
    import lla_triton
    import parallax_decode
    import parallax_triton

    assert lla_triton.lla_decode is lla_decode.lla_decode
    assert parallax_triton.parallax_decode is parallax_decode.parallax_decode
    lla_params = inspect.signature(lla_triton.lla_decode).parameters
    assert list(lla_params)[:4] == ["q", "k_cache", "v_cache", "lengths"]
    assert lla_params["ridge_lambda"].kind is inspect.Parameter.KEYWORD_ONLY
    assert lla_params["qk_scale"].default is None
    px_params = inspect.signature(parallax_triton.parallax_decode).parameters
    assert list(px_params)[:5] == ["q", "r", "k_cache", "v_cache", "lengths"]
    assert px_params["qk_scale"].default is None
    with pytest.raises(AttributeError, match="no attribute 'decode'"):
        lla_triton.decode


def test_the_speed_study_variants_compute_parallax_decode(capsys):
    """scripts/study_decode_variants.py times variants of the split kernel on the GPU; each
    must compute the same function, checked here against the float64 reference under the
    interpreter or on the GPU (its --check: relative error below 1e-5 for every variant)."""
    from tests import repo_scripts

    study = repo_scripts.load("study_decode_variants")
    assert study.check(DEVICE) == 0, capsys.readouterr().out
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(study.VARIANTS), lines
