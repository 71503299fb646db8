"""Parallax (docs/math.md §4.4) asked of the implementation chosen by --lla-parallax-impl.

Oracle: lla_verify/oracles/parallax.py (float64). Budget: lla_verify/budget/parallax.py.
Cases: every family of lla_verify/registry/cases.py with a probe family of
lla_verify/registry/parallax.py on top. Each identity's allowance is derived as in
properties/test_identities.py: MODEL_SAFETY (u_io + u_c sqrt(n)) times the magnitude
the identity involves, where the probe's reach max_j |<k_j - kbar_i, r_i>| multiplies
whatever rounding the covariance term sees; or the Parallax forward budget where the
identity compares two evaluations of the operator.
"""

import math

import pytest
import torch
from hypothesis import event, example, given, note, settings, target
from hypothesis import strategies as st

from lla_verify.budget.forward import MODEL_SAFETY, U64, forward_budget
from lla_verify.budget.parallax import check_parallax_forward, kernel_target, parallax_budget, rho_probe_budget
from lla_verify.budget.verdict import assert_within_budget
from lla_verify.oracles.float64 import lla_forward, softmax_attention
from lla_verify.oracles.parallax import lla_probe, parallax_forward
from lla_verify.registry.cases import FAMILIES, Case
from lla_verify.registry.impls import get_impl, is_available
from lla_verify.registry.parallax import PROBES, ParallaxCase, ParallaxProblem
from lla_verify.registry.precision import unit_roundoff
from lla_verify.testing import parallax as px
from lla_verify.testing import suite


def _u(dt):
    return U64 if dt == torch.float64 else unit_roundoff(dt)


def _root_n(p):
    S, D = p.q.shape[-2], p.q.shape[-1]
    return (torch.arange(1, S + 1, dtype=torch.float64, device=p.q.device) * D).sqrt()


def _allow(impl, p, magnitude):
    """MODEL_SAFETY (u_io + u_c sqrt((i+1) D)) * magnitude, per query (B, H, S)."""
    return MODEL_SAFETY * (_u(p.q.dtype) + impl.u * _root_n(p)) * magnitude


def _reach(p):
    """max_j<=i |<k_j - kbar_i, r_i>| per query in float64: how far the probe multiplies a
    rounding error of v_j - nu_i into the output."""
    q, k, r = (t.double() for t in (p.q, p.k, p.r))
    S = q.shape[-2]
    a = p.qk_scale * (q @ k.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    w = torch.softmax(a.masked_fill(~mask, -math.inf), -1)
    kbar = w @ k
    proj = ((k[..., None, :, :] - kbar[..., :, None, :]) * r[..., :, None, :]).sum(-1)
    return proj.abs().masked_fill(~mask, 0.0).amax(-1)


def _worst(err, allowed, pc, what):
    err, allowed = torch.broadcast_tensors(err, allowed)
    ratio = err / allowed
    idx = tuple(int(x) for x in torch.unravel_index(torch.argmax(torch.nan_to_num(ratio, nan=math.inf)), ratio.shape))
    return (f"{what}: ratio {float(ratio[idx]):.3g} at query {idx}: error {float(err[idx]):.3e} vs allowed "
            f"{float(allowed[idx]):.3e} on {pc.spec()}")


def _problem(p, **kw):
    d = dict(q=p.q, k=p.k, v=p.v, r=p.r, qk_scale=p.qk_scale)
    d.update(kw)
    return ParallaxProblem(p.case, **d)


def _check(impl, p, o):
    return check_parallax_forward(p.q, p.k, p.v, p.r, o, impl=impl.name, case=p.case.spec(), qk_scale=p.qk_scale,
                                  compute_dtype=impl.compute_dtype)


# ---------------------------------------------------------------- accuracy
@pytest.mark.parametrize("probe", list(PROBES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallax_within_budget(parallax_impl, device, family, probe):
    """The implementation against the float64 oracle within the Parallax budget, on every
    case family x probe family."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.2))
    @given(pc=px.parallax_case_strategy(impl, device, families=(family,), probes=(probe,)))
    def prop(pc):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        verdict = _check(impl, p, px.run(impl, p))
        target(min(verdict.ratio, 1e6), label=f"parallax ratio {family}/{probe}")
        assert_within_budget(verdict)

    prop()


def test_parallax_meets_the_same_precision_target(parallax_impl, device):
    """Issue 22's kernel target (budget.parallax.kernel_target): every query's error at most
    4x the dense centred fp32 computation's worst (its median over coordinate orderings),
    or 2 ulp of its output, on families whose keys share an offset or a large norm: where
    an uncentred expansion cancels."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.6))
    @given(pc=px.parallax_case_strategy(impl, device, families=("offset", "large_norm", "gaussian"),
                                        probes=("random", "large", "small_eig", "lla"), dtypes=("float32",)),
           offset=st.sampled_from([1e2, 1e3, 1e4]))
    def prop(pc, offset):
        if pc.case.family == "offset":
            c = pc.case
            pc = ParallaxCase(Case(c.family, dict(c.params, offset=offset), c.B, c.H, c.S, c.D, c.dtype, c.seed),
                              pc.probe, pc.probe_params)
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        o = px.run(impl, p).double()
        allowed, _ = kernel_target(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, o64=o64)
        err = (o - o64).norm(dim=-1)
        assert bool((err <= allowed).all()), _worst(err, allowed, pc, "same-precision target")

    prop()


# ---------------------------------------------------------------- exact identities
def test_zero_probe_is_softmax_attention(parallax_impl, device):
    """r = 0: o = softmax attention, within the budget of the problem at r = 0."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device, probes=("zero",)))
    def prop(pc):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        o = px.run(impl, p).double()
        sm = softmax_attention(p.q, p.k, p.v, qk_scale=p.qk_scale)
        pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype, dense=True)
        err = (o - sm).norm(dim=-1)
        assert bool((err <= pb.allowed).all()), _worst(err, pb.allowed, pc, "r = 0 is softmax attention")

    prop()


def test_constant_values_are_reproduced(parallax_impl, device):
    """v_j = c gives o_i = c for every probe: nu_i = c and v_j - nu_i = 0. A computation
    leaves v_j - nu_i at rounding size, which the probe's reach multiplies."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device), c=st.floats(-10, 10).filter(lambda x: abs(x) > 1e-3))
    def prop(pc, c):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        v = torch.full_like(p.v, c)
        cval = float(v.flatten()[0])
        o = px.run(impl, p, v=v).double()
        err = (o - cval).norm(dim=-1)
        allowed = _allow(impl, p, abs(cval) * math.sqrt(p.v.shape[-1]) * (1.0 + _reach(p)))
        assert bool((err <= allowed).all()), _worst(err, allowed, pc, "constant values")

    prop()


def test_linearity_in_v(parallax_impl, device):
    """o(a v1 + b v2) = a o(v1) + b o(v2), within the three evaluations' budgets plus the
    rounding of a v1 + b v2 to the dtype, carried by the probe's reach."""
    impl = parallax_impl

    # a and b bounded away from 0 (of fixed signs, which linearity does not care about):
    # at a = b = 0 every term vanishes and a nonlinearity cannot show
    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device), a=st.floats(0.25, 2), b=st.floats(-2, -0.25))
    def prop(pc, a, b):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        gen = torch.Generator().manual_seed(pc.case.seed + 1)
        v2 = torch.randn(p.v.shape, generator=gen).to(p.v.dtype).to(device)
        v12 = (a * p.v.double() + b * v2.double()).to(p.v.dtype)
        o1, o2, o12 = (px.run(impl, p, v=t).double() for t in (p.v, v2, v12))
        allowed = 0
        for coef, vv in ((abs(a), p.v), (abs(b), v2), (1.0, v12)):
            pb = parallax_budget(p.q, p.k, vv, p.r, qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype, dense=True)
            allowed = allowed + coef * pb.allowed
        vmag = (a * p.v.double() + b * v2.double()).norm(dim=-1).amax(-1, keepdim=True)
        allowed = allowed + MODEL_SAFETY * _u(p.q.dtype) * vmag * (1.0 + _reach(p))
        err = (o12 - (a * o1 + b * o2)).norm(dim=-1)
        assert bool((err <= allowed).all()), _worst(err, allowed, pc, "linearity in v")

    prop()


def test_score_shift_invariance(parallax_impl, device):
    """A per-row constant added to the scores changes nothing. Construction (as for LLA,
    suite.score_shift): keys with a constant last coordinate alpha, q and k shifted by
    t e_D exactly in the input dtype: k_j - kbar_i is unchanged and row i's scores move by
    s t (q_iD + alpha + t) >= 100, enough to overflow exp without max subtraction. The
    float64 oracle gives the same value at both (to its own rounding), and each output is held to
    the budget of its own inputs: scores of ~200 round at u |a_ij| ~ 200 u, which a
    computation at the shifted inputs carries and the unshifted budget does not model."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device, families=("gaussian", "spectrum", "clusters")))
    # the H200's dense fp32 output at the shifted inputs was 1.26x the unshifted budget here
    @example(pc=ParallaxCase(Case("gaussian", {"lam": 1.0, "scale_mult": 1.0}, B=1, H=1, S=119, D=64,
                                  dtype="float32", seed=1), "random", {"amp": 1.0}))
    def prop(pc):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        q1, k1, q2, k2 = suite.score_shift(p.q, p.k, p.qk_scale)
        p1 = _problem(p, q=q1, k=k1)
        o1 = px.run(impl, p1)
        o2 = px.run(impl, p1, q=q2, k=k2)
        assert bool(torch.isfinite(o2).all()), f"score shift: non-finite output after a row shift of ~200 on {pc.spec()}"
        p2 = _problem(p1, q=q2, k=k2)
        v1, v2 = _check(impl, p1, o1), _check(impl, p2, o2)
        assert v1.passed, v1.message
        assert v2.passed, f"score shift invariance (shifted inputs): {v2.message}"
        # the identity itself, in the oracle: the same value at both inputs, to float64
        # rounding of the shifted problem. That rounding is the scores' (u |a_ij|, a_ij of
        # several hundred), which moves o through the differences between keys; two random
        # sign patterns give a two-key row's keys the same sign with probability 1/4, and
        # the estimate then misses it (row 1 of the S = 119 example below: 8.9e-14 allowed
        # from two patterns, 1.5e-11 from four or more, error 1.7e-13). Eight patterns
        # leave that chance at 2^-8.
        pb64 = parallax_budget(q2, k2, p1.v, p1.r, qk_scale=p1.qk_scale, compute_dtype=torch.float64,
                               out_dtype=torch.float64, dense=False, directions=8)
        err = (pb64.o - parallax_forward(p1.q, p1.k, p1.v, p1.r, qk_scale=p1.qk_scale)).norm(dim=-1)
        assert bool((err <= pb64.allowed).all()), _worst(err, pb64.allowed, pc, "score shift invariance (oracle)")

    prop()


def test_key_shift_invariance(parallax_impl, device):
    """k_j -> k_j + c for every key: the scores move by the row constant s <q_i, c> and
    k_j - kbar_i is unchanged, so o is unchanged. c is a vector of small integers on keys
    rounded to multiples of 2^-8 (float32: k + c exact); the shifted output is held to
    the budget of the shifted problem, against the unshifted oracle value."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device, dtypes=("float32",)), R=st.sampled_from([1, 4, 64]))
    def prop(pc, R):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        k = (p.k.double() * 256).round() / 256
        gen = torch.Generator().manual_seed(pc.case.seed + 3)
        c = torch.randint(-R, R + 1, (p.q.shape[-1],), generator=gen).double().to(device)
        k1, k2 = k.to(p.k.dtype), (k + c).to(p.k.dtype)
        assert torch.equal(k2.double() - k1.double(), c.expand_as(k).clone())
        p1, p2 = _problem(p, k=k1), _problem(p, k=k2)
        o1, o2 = px.run(impl, p1).double(), px.run(impl, p2).double()
        o_exact = parallax_forward(p1.q, p1.k, p1.v, p1.r, qk_scale=p.qk_scale)
        for pp, o in ((p1, o1), (p2, o2)):
            pb = parallax_budget(pp.q, pp.k, pp.v, pp.r, qk_scale=pp.qk_scale, compute_dtype=impl.compute_dtype,
                                 dense=True)
            err = (o - o_exact).norm(dim=-1)
            assert bool((err <= pb.allowed).all()), _worst(err, pb.allowed, pc, f"key shift by c (|c|_inf <= {R})")

    prop()


def test_causality_bitwise(parallax_impl, device):
    """Changing q, k, v, r after position t leaves outputs 0..t bitwise unchanged."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device, seq=(2, 40)), frac=st.floats(0, 1))
    def prop(pc, frac):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        S = p.q.shape[-2]
        t = min(S - 2, int(frac * (S - 1)))
        gen = torch.Generator().manual_seed(pc.case.seed + 7)
        new = []
        for x in (p.q, p.k, p.v, p.r):
            y = x.clone()
            y[..., t + 1:, :] = torch.randn(y[..., t + 1:, :].shape, generator=gen).to(y.dtype).to(device)
            new.append(y)
        o1 = px.run(impl, p)
        o2 = px.run(impl, p, q=new[0], k=new[1], v=new[2], r=new[3])
        a, b = o1[..., : t + 1, :], o2[..., : t + 1, :]
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        assert bool(same.all()), (
            f"causality: outputs at positions <= {t} changed when only tokens > {t} changed "
            f"(max change {float((a.double() - b.double()).abs().nan_to_num(0).max()):.3e}) on {pc.spec()}")

    prop()


def test_batch_and_head_independence(parallax_impl, device):
    """Each (batch, head) computed alone gives the same output within its budget."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.4))
    @given(pc=px.parallax_case_strategy(impl, device, batch=(2, 3), heads=(2, 3)))
    def prop(pc):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        o = px.run(impl, p).double()
        b, h = pc.case.B - 1, pc.case.H - 1
        sl = lambda x: x[b:b + 1, h:h + 1].contiguous()  # noqa: E731
        p1 = _problem(p, q=sl(p.q), k=sl(p.k), v=sl(p.v), r=sl(p.r))
        o1 = px.run(impl, p1).double()
        pb = parallax_budget(p1.q, p1.k, p1.v, p1.r, qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype, dense=True)
        err = (o[b:b + 1, h:h + 1] - o1).norm(dim=-1)
        assert bool((err <= pb.allowed).all()), _worst(err, pb.allowed, pc, f"batch/head independence (b={b}, h={h})")

    prop()


# ---------------------------------------------------------------- reduction to LLA
def test_lla_probe_reduces_to_lla(parallax_impl, device):
    """With r_i = rho_i / (1 - <mubar_i, rho_i>) (the 'lla' probe family) Parallax is LLA:
    the implementation is held to the Parallax budget against the float64 LLA oracle,
    and the two float64 oracles agree within float64 rounding of the probe's reach.

    The probe here comes from the float64 LLA oracle; test_lla_probe_from_lla_triton_rho
    builds it from lla_triton's own rho."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.5))
    @given(pc=px.parallax_case_strategy(impl, device, probes=("lla",),
                                        families=("gaussian", "spectrum", "offset", "clusters", "lambda_decades")))
    def prop(pc):
        p = px.build(pc, device)
        px.assume_supported(impl, p)
        base = pc.case.build(device)
        # the probe as the implementation receives it (rounded to the dtype), and LLA at
        # the unrounded probe: the budget's sensitivity in r covers the difference
        lla = lla_forward(p.q, p.k, p.v, ridge_lambda=base.ridge_lambda, qk_scale=p.qk_scale)
        r64 = lla_probe(p.q, p.k, p.v, ridge_lambda=base.ridge_lambda, qk_scale=p.qk_scale)
        px64 = parallax_forward(p.q, p.k, p.v, r64, qk_scale=p.qk_scale)
        ok_rows = torch.isfinite(lla).all(-1)
        gap = (px64 - lla).norm(dim=-1)
        # both oracles are float64 evaluations, each within its own budget at u64
        lla_b = forward_budget(base, get_impl("oracle-f64"), dense=False, out_dtype=torch.float64).allowed
        px_b = parallax_budget(p.q, p.k, p.v, r64, qk_scale=p.qk_scale, compute_dtype=torch.float64,
                               out_dtype=torch.float64, dense=False).allowed
        oracle_allowed = lla_b + px_b
        assert bool(((gap <= oracle_allowed) | ~ok_rows).all()), _worst(gap, oracle_allowed, pc, "Parallax oracle vs LLA oracle")
        o = px.run(impl, p).double()
        pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype, dense=True)
        # the probe's rounding to the dtype is input to the implementation: o is affine in
        # r, so the oracle at the rounded probe differs from LLA by exactly C_i (r64 - r_i)
        err = (o - lla).norm(dim=-1)
        rdiff = (pb.o - px64).norm(dim=-1)
        allowed = pb.allowed + rdiff + oracle_allowed
        assert bool(((err <= allowed) | ~ok_rows).all()), _worst(err, allowed, pc, "Parallax(lla probe) vs LLA")

    prop()


def test_lla_probe_from_lla_triton_rho(parallax_impl, device):
    """The reduction with lla_triton's own rho (lla_attention(..., return_rho=True)): the
    probe r^_i = rho^_i / (1 - <mubar_i, rho^_i>), formed in float64 from the kernel's rho
    and the float64 oracle's mubar_i, makes Parallax equal LLA up to rho's own error.

    That error is derived, not tuned (budget.parallax.rho_probe_budget, error-model.md
    §8): the true residual the forward model allows the kernel's solve (tol and u_c
    attainable_i) and its weights' rounding (budget.backward.weight_residual), x
    MODEL_SAFETY, carried through Sigma_i^-1 and the map rho -> r -> o.
    The float64 Parallax oracle at r^ is held to it plus the two float64 oracles' own
    budgets against the LLA oracle; the Parallax implementation at r^ rounded to the
    dtype also to its Parallax budget there, the probe's rounding carried exactly (o is
    affine in r). Rows where the allowed residual could flip 1 - <mubar_i, rho_i> and
    rows LLA leaves undefined are not judged."""
    triton = get_impl("triton")
    why = is_available(triton, device)
    if why:
        pytest.skip(f"lla_triton unavailable: {why}")
    import lla_triton

    oracle = get_impl("oracle-f64")

    @settings(max_examples=suite.examples(0.5))
    @given(case=suite.case_strategy(triton, device, families=("gaussian", "spectrum", "offset", "clusters",
                                                              "lambda_decades")))
    # the H200's gpu-profile failure (1.21 of the budget without the weights' term): scores
    # ~31 of 32 same-signed products, which the GPU's FMA chain rounds at a few u |a_ij|
    @example(case=Case("clusters", {"clusters": 1, "lam": 1.0, "spread": 0.01}, B=1, H=1, S=2, D=32,
                       dtype="float32", seed=1))
    def prop(case):
        p = case.build(device)
        suite.assume_supported(triton, p)
        _, rho = lla_triton.lla_attention(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                                          return_rho=True)
        assert rho.shape == p.q.shape and rho.dtype == torch.float32, (rho.shape, rho.dtype)
        rb = rho_probe_budget(p.q, p.k, p.v, rho, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, impl=triton)
        judged = rb.judged
        note(f"{int(judged.sum())} of {judged.numel()} rows judged")
        event(f"judged all rows: {bool(judged.all())}")
        px64 = parallax_forward(p.q, p.k, p.v, rb.probe, qk_scale=p.qk_scale)
        # the oracle-f64 record rounds nothing (kernel_view is p itself): rb's details are
        # the ones forward_budget would compute afresh
        oracle_allowed = (forward_budget(p, oracle, dense=False, out_dtype=torch.float64, details=rb.details).allowed
                          + parallax_budget(p.q, p.k, p.v, rb.probe, qk_scale=p.qk_scale, compute_dtype=torch.float64,
                                            out_dtype=torch.float64, dense=False).allowed)
        allowed64 = torch.where(judged, rb.allowed + oracle_allowed, math.inf)
        err64 = torch.where(judged, (px64 - rb.lla).norm(dim=-1), 0.0)
        target(float((err64 / allowed64).max()), label="lla_triton rho reduction ratio")
        assert bool((err64 <= allowed64).all()), _worst(err64, allowed64, case, "Parallax oracle at lla_triton's rho vs LLA")

        # the Parallax implementation at the probe as it receives it
        r_in = rb.probe.to(p.q.dtype)
        if not bool(torch.isfinite(r_in).all()):
            event("Parallax implementation leg skipped: the probe is beyond the dtype's range")
            return
        pp = ParallaxProblem(ParallaxCase(case, "lla"), p.q, p.k, p.v, r_in, p.qk_scale)
        why = px.unsupported(parallax_impl, pp)
        if why:
            event(f"Parallax implementation leg skipped: {why}")
            return
        o = px.run(parallax_impl, pp).double()
        pb = parallax_budget(p.q, p.k, p.v, r_in, qk_scale=p.qk_scale, compute_dtype=parallax_impl.compute_dtype,
                             dense=True)
        allowed = torch.where(judged, pb.allowed + (pb.o - px64).norm(dim=-1) + rb.allowed + oracle_allowed, math.inf)
        err = torch.where(judged, (o - rb.lla).norm(dim=-1), 0.0)
        assert bool((err <= allowed).all()), _worst(err, allowed, case, "Parallax implementation at lla_triton's rho vs LLA")

    prop()


# ---------------------------------------------------------------- scale limits
def test_zero_scale_is_uniform_average_minus_covariance(parallax_impl, device):
    """s = 0: p_ij = 1/(i+1), o_i = mean_j v_j - Cov_i r_i with the uniform covariance
    (exactly, docs/math.md §4.4); s -> 0 approaches it at rate O(s)."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.3))
    @given(pc=px.parallax_case_strategy(impl, device, families=("gaussian",), probes=("random", "large"), seq=(2, 40)))
    def prop(pc):
        p0 = px.build(pc, device)
        px.assume_supported(impl, p0)
        q, k, v, r = (t.double() for t in (p0.q, p0.k, p0.v, p0.r))
        S = q.shape[-2]
        n = torch.arange(1, S + 1, dtype=torch.float64, device=q.device)[:, None]
        mask = torch.ones(S, S, dtype=torch.float64, device=q.device).tril()
        vbar, kbar = (mask @ v) / n, (mask @ k) / n
        proj = ((k[..., None, :, :] - kbar[..., :, None, :]) * r[..., :, None, :]).sum(-1) * mask / n
        uniform = vbar - (proj[..., None] * (v[..., None, :, :] - vbar[..., :, None, :])).sum(-2)
        gaps = []
        for s in (0.0, 1e-2, 1e-3, 1e-4):
            p = _problem(p0, qk_scale=s)
            o = px.run(impl, p).double()
            pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=s, compute_dtype=impl.compute_dtype, dense=True)
            oracle_gap = (pb.o - uniform).norm(dim=-1)
            err = (o - uniform).norm(dim=-1)
            allowed = oracle_gap + pb.allowed + MODEL_SAFETY * U64 * _root_n(p) ** 2 * v.norm(dim=-1).amax(-1, keepdim=True) * (1 + _reach(p))
            assert bool((err <= allowed).all()), _worst(err, allowed, pc, f"scale {s:g}: uniform-weight limit")
            # the gap is the oracle's (float64 at both ends): its noise is the float64 budget,
            # not the implementation's, which at bf16 hid the rate on most draws
            t64 = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=s, compute_dtype=torch.float64,
                                  out_dtype=torch.float64, dense=False).allowed
            gaps.append((s, float(oracle_gap.max()), float(t64.max())))
        # The rate is O(s) only in the linear regime: p_ij moves from 1/(i+1) by about
        # s |a_ij - mean_j a_ij| (unit-scale scores), and the covariance term multiplies that
        # move by up to 1 + |<k_j - kbar_i, r_i>| (_reach) a second time, so the s^2 term
        # relative to the s term is about curvature(s) = s spread (1 + reach). At 0.1 the
        # ratio of gaps a decade apart is 10 (1 +- 0.1): the [5, 20] window has room.
        a1 = q @ k.transpose(-1, -2)
        mean = (a1 * mask).sum(-1, keepdim=True) / n
        spread = float(((a1 - mean).abs() * mask).amax())
        judged = 0
        for (s1, g1, _), (s2, g2, t2) in zip(gaps[1:], gaps[2:]):
            curvature = s1 * spread * (1 + float(_reach(_problem(p0, qk_scale=s1)).max()))
            if g2 > 10 * t2 and curvature <= 0.1:
                judged += 1
                assert 5.0 <= g1 / g2 <= 20.0, (f"uniform limit rate: gap ratio {g1 / g2:.3g} between scale {s1:g} "
                                                f"and {s2:g} (curvature {curvature:.2g}) on {pc.spec()}")
        if not judged:
            # the limit itself was judged above; a draw counts only with its rate judged too
            suite.not_this_property("uniform limit rate: no pair in the linear regime clear of float64's error")

    prop()


def test_large_scale_is_the_argmax_value(parallax_impl, device):
    """s -> infinity with a unique argmax key j*: |o_i - v_j*| <= e_i M_i (1 + 2 R_i) with
    e_i = sum_{j != j*} exp(-s (a_ij* - a_ij)) (docs/math.md §4.4), M_i = max_j |v_j - v_j*|
    and R_i = max_j |<k_j - k_j*, r_i>|: exponential in s times the score gap."""
    impl = parallax_impl

    @settings(max_examples=suite.examples(0.3))
    @given(pc=px.parallax_case_strategy(impl, device, families=("gaussian",), probes=("random",), seq=(2, 40)))
    def prop(pc):
        p0 = px.build(pc, device)
        px.assume_supported(impl, p0)
        q, k, v, r = (t.double() for t in (p0.q, p0.k, p0.v, p0.r))
        S = q.shape[-2]
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        a = (q @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf)
        top2 = a.topk(min(2, S), dim=-1).values
        gapmin = float((top2[..., 0] - top2[..., 1])[..., 1:].min()) if S > 1 else math.inf
        if gapmin < 1e-2:
            suite.not_this_property("a near-tie of the top two scores (the limit is slow there)")
        jstar = a.argmax(-1)
        take = lambda x: torch.gather(x, -2, jstar[..., None].expand(*jstar.shape, x.shape[-1]))  # noqa: E731
        vstar, kstar = take(v), take(k)
        M = (v[..., None, :, :] - vstar[..., :, None, :]).norm(dim=-1).masked_fill(~mask, 0).amax(-1)
        R = ((k[..., None, :, :] - kstar[..., :, None, :]) * r[..., :, None, :]).sum(-1).abs().masked_fill(~mask, 0).amax(-1)
        bounds = []
        for s in (4.0 / gapmin, 8.0 / gapmin, 16.0 / gapmin):
            p = _problem(p0, qk_scale=s)
            e = torch.exp(s * (a - a.amax(-1, keepdim=True))).masked_fill(~mask, 0).sum(-1) - 1.0
            bound = e * M * (1 + 2 * R)
            o = px.run(impl, p).double()
            pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=s, compute_dtype=impl.compute_dtype, dense=True)
            oracle_gap = (pb.o - vstar).norm(dim=-1)
            slack = MODEL_SAFETY * U64 * _root_n(p) * v.norm(dim=-1).amax(-1, keepdim=True) * (1 + R)
            assert bool((oracle_gap <= bound + slack).all()), _worst(oracle_gap, bound + slack, pc, f"scale {s:.3g}: oracle vs the argmax bound")
            err = (o - vstar).norm(dim=-1)
            allowed = bound + slack + pb.allowed
            assert bool((err <= allowed).all()), _worst(err, allowed, pc, f"scale {s:.3g}: argmax-value limit")
            bounds.append(float(bound.max()))
        # the bound's own rate: doubling s squares e (at least), a factor >= exp(4) here
        assert bounds[1] <= bounds[0] * math.exp(-4.0) * 1.0001 and bounds[2] <= bounds[1] * math.exp(-8.0) * 1.0001

    prop()
