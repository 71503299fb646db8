"""Exact identities of SPEC 3 asked of the implementation (docs/math.md §3).

Each comparison's allowance is derived: the rounding of the output dtype plus the
compute precision's accumulation error sqrt(n) u_c, times the budget's MODEL_SAFETY, on
the magnitude involved; bitwise where the identity is structural (causality,
determinism).
"""

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lla_verify.testing import suite
from lla_verify.budget.forward import MODEL_SAFETY, check_forward, forward_budget, io_roundoff, kernel_view
from lla_verify.oracles.float64 import lla_forward_details
from lla_verify.registry.cases import parse_case


def _allow(impl, problem, magnitude, sum_magnitude=None):
    """MODEL_SAFETY (u_out magnitude + u_c sqrt((i+1) D) sum_magnitude), per query (B, H, S).

    magnitude is the size of the output (its rounding), sum_magnitude that of the terms the
    compute precision sums into it (its accumulation); the same where the sum does not cancel.
    """
    S, D = problem.q.shape[-2], problem.q.shape[-1]
    n = torch.arange(1, S + 1, dtype=torch.float64, device=problem.q.device) * D
    summed = magnitude if sum_magnitude is None else sum_magnitude
    return MODEL_SAFETY * (io_roundoff(problem, impl) * magnitude + impl.u * n.sqrt() * summed)


def weight_l1(problem, impl):
    """||s_i||_1 = sum_j |s_ij| per query (B, H, S), from the float64 oracle's rho_i and delta_i
    on the inputs ``impl`` computes from; 1 where the oracle leaves the row undefined.

    s_ij = w_ij f_ij / delta_i, f_ij = 1 - <z_ij, rho_i> (math.md §2.5): the weights sum
    to 1, but f_ij < 0 once |rho_i| |z_ij| > 1, and then sum_j |s_ij| = sum_j |g_ij| / |den_i|
    exceeds 1 by as much as den_i cancels (delta_i << omega_i).
    """
    p = kernel_view(problem, impl)
    det = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                              solver_sensitivity=False)
    q, k, rho = p.q.double(), p.k.double(), det.rho
    S = q.shape[-2]
    a = det.scale * (q @ k.transpose(-1, -2))
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    w = torch.exp(a - det.m[..., None]).masked_fill(~causal, 0.0)
    # <z_ij, rho_i> = <k_j, rho_i> - <q_i, rho_i>, without forming z
    f = 1.0 + (q * rho).sum(-1, keepdim=True) - rho @ k.transpose(-1, -2)
    l1 = (w * f).abs().sum(-1) / det.delta
    return torch.where(det.undefined | ~torch.isfinite(l1), torch.ones_like(l1), l1)


def _describe_worst(err, allowed, case, what):
    err, allowed = torch.broadcast_tensors(err, allowed)
    r = err / allowed
    idx = tuple(int(x) for x in torch.unravel_index(torch.argmax(r), r.shape))
    return (f"{what}: ratio {float(r[idx]):.3g} at query {idx}: error {float(err[idx]):.3e} vs allowed "
            f"{float(allowed[idx]):.3e} on {case.spec()}")


def test_partition_of_unity(impl, device):
    """Constant values v_j = c are reproduced: sum_j s_ij = 1 for any lambda and any rho.

    Allowance: o_i = sum_j g_ij v_j / sum_j g_ij (g_ij = w_ij f_ij, den_i = sum_j g_ij); for
    v_j = c both sums add the same g_ij, so the rounding of g_ij cancels in the ratio and
    what remains is the two sums' accumulation, u_c sqrt(n_i) sum_j |g_ij| |c| each, over
    den_i: u_c sqrt(n_i) ||s_i||_1 |c| (``weight_l1``). ||s_i||_1 = 1 where every f_ij >= 0
    (|rho_i| small: the identity is held to the compute precision there); where den_i
    cancels it is large (early:lam=1e-06 seed 2867, query 16: delta_i / omega_i = 1.1e-5,
    ||s_i||_1 = 138), and so is the accumulation's error (error-model.md §3.6).
    """
    suite.require(impl, "partition_of_unity")

    @settings(max_examples=suite.examples(0.5))
    @given(case=suite.case_strategy(impl, device), c=st.floats(-10, 10).filter(lambda x: abs(x) > 1e-3))
    # den_i cancels at query 16 (delta_i / omega_i = 1.0e-6, ||s_i||_1 = 675): lla_triton's
    # error there is 2.0x the allowance without ||s_i||_1 through the interpreter (1.1x with
    # the GPU's products and exp emulated), 0.015x with it (error-model.md §3.6)
    @example(case=parse_case("early:lam=1e-06:B=1,H=1,S=24,D=16,dtype=float32,seed=203"), c=1.0)
    # the H200's gpu-profile failure (lla_triton, hypothesis seed 8): 2.86x the allowance
    # without ||s_i||_1 at query 16, where den_i cancels to delta_i / omega_i = 1.1e-5. On the
    # device where it was found only: the interpreter's arithmetic leaves it at 0.46x without
    # ||s_i||_1, so on CPU it pins nothing the S = 24 input above does not, at 14x the time
    @(example(case=parse_case("early:lam=1e-06:B=1,H=1,S=331,D=16,dtype=float32,seed=2867"), c=1.0)
      if device == "cuda" else (lambda f: f))
    def prop(case, c):
        p = case.build(device)
        suite.assume_supported(impl, p)
        lam = p.lam_tensor
        v = torch.full_like(p.v, c)
        o = suite.run(impl, p, v=v).to(torch.float64)
        err = (o - float(v.flatten()[0])).norm(dim=-1)
        scale = abs(c) * math.sqrt(p.v.shape[-1])
        allowed = _allow(impl, p, scale, scale * weight_l1(p, impl))
        defined = (lam > 0) | (torch.arange(p.q.shape[-2], device=p.q.device) >= p.q.shape[-1])
        err = torch.where(defined, err, torch.zeros_like(err))
        assert bool((err <= allowed).all()), _describe_worst(err, allowed, case, "partition of unity")

    prop()


def test_linearity_in_v(impl, device):
    """o(a v1 + b v2) = a o(v1) + b o(v2)."""
    suite.require(impl, "linearity")

    @settings(max_examples=suite.examples(0.5))
    # a and b bounded away from 0: a zero coefficient leaves homogeneity, or nothing, to test
    @given(case=suite.case_strategy(impl, device), a=st.floats(0.25, 2), b=st.floats(-2, -0.25))
    def prop(case, a, b):
        p = case.build(device)
        suite.assume_supported(impl, p)
        gen = torch.Generator().manual_seed(case.seed + 1)
        v2 = torch.randn(p.v.shape, generator=gen).to(p.v.dtype).to(device)
        v12 = (a * p.v.double() + b * v2.double()).to(p.v.dtype)
        o1, o2, o12 = (suite.run(impl, p, v=t).double() for t in (p.v, v2, v12))
        lin = a * o1 + b * o2
        fb = forward_budget(p, impl, dense=False)
        scale = (abs(a) + abs(b) + 1) * fb.allowed
        # v12 is itself rounded to the dtype: its rounding enters through o's sensitivity to v
        vround = io_roundoff(p, impl) * (a * p.v.double() + b * v2.double()).norm(dim=-1).amax(-1, keepdim=True)
        allowed = scale + MODEL_SAFETY * vround * 2
        err = (o12 - lin).norm(dim=-1)
        ok = torch.isnan(fb.details.o).any(-1) | (err <= allowed)
        assert bool(ok.all()), _describe_worst(err, allowed, case, "linearity in v")

    prop()


def test_shift_invariance_of_scores(impl, device):
    """Adding a per-row constant to every score a_ij changes nothing (o is independent of m_i).

    Construction (suite.score_shift): keys with a constant last coordinate alpha, and q
    and k shifted by t e_D, exactly in the input dtype: z_ij = k_j - q_i is unchanged and
    row i's scores gain s t (q_iD + alpha + t) >= 100, a per-row constant, enough that an
    implementation without max subtraction overflows exp.
    """
    suite.require(impl, "shift_invariance")

    @settings(max_examples=suite.examples(0.5))
    @given(case=suite.case_strategy(impl, device, families=("gaussian", "spectrum", "lambda_decades")))
    def prop(case):
        p = case.build(device)
        suite.assume_supported(impl, p)
        q1, k1, q2, k2 = suite.score_shift(p.q, p.k, p.qk_scale)
        o1 = suite.run(impl, p, q=q1, k=k1)
        o2 = suite.run(impl, p, q=q2, k=k2)
        assert bool(torch.isfinite(o2).all()), f"shift invariance: non-finite output after a per-row score shift of ~200 on {case.spec()}"
        from lla_verify.registry.cases import Problem

        v1 = check_forward(Problem(case, q1, k1, p.v, p.ridge_lambda, p.qk_scale), impl, o1, dense=False)
        v2 = check_forward(Problem(case, q2, k2, p.v, p.ridge_lambda, p.qk_scale), impl, o2, dense=False)
        assert v1.passed and v2.passed, "shift invariance:\n" + v1.message + "\n" + v2.message

    prop()


def test_first_token_is_v0(impl, device):
    """o_0 = v_0 whenever lambda_0 > 0 (one key: the regression interpolates it)."""
    suite.require(impl, "first_token")

    @settings(max_examples=suite.examples(0.5))
    @given(case=suite.case_strategy(impl, device))
    def prop(case):
        p = case.build(device)
        suite.assume_supported(impl, p)
        if not bool((p.lam_tensor[..., 0] > 0).all()):
            suite.not_this_property("lambda_0 = 0: the first token's system is singular")
        o = suite.run(impl, p).double()
        err = (o[..., 0, :] - p.v[..., 0, :].double()).norm(dim=-1)
        allowed = MODEL_SAFETY * (io_roundoff(p, impl) + impl.u) * p.v[..., 0, :].double().norm(dim=-1)
        assert bool((err <= allowed).all()), (
            f"first token: |o_0 - v_0| = {float(err.max()):.3e} > allowed {float(allowed.max()):.3e} on {case.spec()}")

    prop()


def test_causality_bitwise(impl, device):
    """Changing tokens after position t leaves outputs 0..t bitwise unchanged."""
    suite.require(impl, "causality")

    @settings(max_examples=suite.examples(0.5))
    @given(case=suite.case_strategy(impl, device, seq=(2, 40)), frac=st.floats(0, 1))
    def prop(case, frac):
        p = case.build(device)
        suite.assume_supported(impl, p)
        S = p.q.shape[-2]
        t = min(S - 2, int(frac * (S - 1)))
        gen = torch.Generator().manual_seed(case.seed + 7)
        noise = lambda x: torch.randn(x[..., t + 1:, :].shape, generator=gen).to(x.dtype).to(device)  # noqa: E731
        q2, k2, v2 = p.q.clone(), p.k.clone(), p.v.clone()
        q2[..., t + 1:, :] = noise(q2)
        k2[..., t + 1:, :] = noise(k2)
        v2[..., t + 1:, :] = noise(v2)
        lam2 = p.ridge_lambda
        if isinstance(lam2, torch.Tensor):
            lam2 = lam2.clone().broadcast_to(p.q.shape[:-1]).contiguous()
            lam2[..., t + 1:] = lam2[..., t + 1:] * 3.0
        o1 = suite.run(impl, p)
        o2 = suite.run(impl, p, q=q2, k=k2, v=v2, ridge_lambda=lam2)
        a, b = o1[..., : t + 1, :], o2[..., : t + 1, :]
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        assert bool(same.all()), (
            f"causality: outputs at positions <= {t} changed when only tokens > {t} changed "
            f"(max change {float((a.double() - b.double()).abs().nan_to_num(0).max()):.3e}) on {case.spec()}")

    prop()


def test_batch_and_head_independence(impl, device):
    """Each (batch, head) is computed as if alone: slicing one out gives the same output."""
    suite.require(impl, "independence")

    @settings(max_examples=suite.examples(0.4))
    @given(case=suite.case_strategy(impl, device, batch=(2, 3), heads=(2, 3)))
    def prop(case):
        p = case.build(device)
        suite.assume_supported(impl, p)
        o = suite.run(impl, p)
        b, h = case.B - 1, case.H - 1
        lam = p.ridge_lambda
        lam1 = lam.broadcast_to(p.q.shape[:-1])[b:b + 1, h:h + 1] if isinstance(lam, torch.Tensor) else lam
        sl = lambda x: x[b:b + 1, h:h + 1].contiguous()  # noqa: E731
        o1 = suite.run(impl, p, q=sl(p.q), k=sl(p.k), v=sl(p.v), ridge_lambda=lam1)
        from lla_verify.registry.cases import Problem

        p1 = Problem(case, sl(p.q), sl(p.k), sl(p.v), lam1, p.qk_scale)
        fb = forward_budget(p1, impl, dense=False)
        err = (o[b:b + 1, h:h + 1].double() - o1.double()).norm(dim=-1)
        ok = torch.isnan(fb.details.o).any(-1) | (err <= fb.allowed)
        assert bool(ok.all()), _describe_worst(err, fb.allowed, case, f"batch/head independence (b={b}, h={h})")

    prop()


def test_determinism_bitwise(impl, device):
    """Two calls on the same inputs give bitwise identical outputs."""
    suite.require(impl, "determinism")

    @settings(max_examples=suite.examples(0.3))
    @given(case=suite.case_strategy(impl, device))
    def prop(case):
        p = case.build(device)
        suite.assume_supported(impl, p)
        o1, o2 = suite.run(impl, p), suite.run(impl, p)
        same = (o1 == o2) | (torch.isnan(o1) & torch.isnan(o2))
        assert bool(same.all()), f"determinism: two runs differ at {int((~same).sum())} elements on {case.spec()}"

    prop()


def test_linear_values_reproduced_at_lambda_zero(impl, device):
    """v_j = A k_j + b gives o_i = A q_i + b at lambda = 0 once i >= D (the oracle's value
    there is A q_i + b: tests/test_oracle.py); rows i < D are a 0/0 and are skipped."""
    suite.require(impl, "linear_reproduction")

    @settings(max_examples=suite.examples(0.4))
    @given(case=suite.case_strategy(impl, device, families=("linear_values",)))
    def prop(case):
        # the family's range stops at 1e-8 (a Case holds no lambda outside it); lambda = 0
        # is set on the built problem
        p = case.build(device)
        suite.assume_supported(impl, p)
        from lla_verify.registry.cases import Problem

        p0 = Problem(case, p.q, p.k, p.v, 0.0, p.qk_scale)
        o = suite.run(impl, p0)
        verdict = check_forward(p0, impl, o, dense=False)
        suite.set_aside_unless_judged(verdict)  # S <= D: every row is a 0/0
        assert verdict.passed, verdict.message

    prop()
