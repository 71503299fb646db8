"""The float64 oracle on CPU and on CUDA, and the extreme eigenvalues behind its kappa.

Off the CPU, kappa(Sigma_i) and ||Sigma_i|| come from ``certified_extremes`` (Lanczos
with an inertia certificate, eigvalsh for the rows it does not certify) instead of an
eigvalsh per query (lla_verify/oracles/extremes.py, docs/error-model.md "Extreme
eigenvalues on the device"). On CPU, in CI, the certified method is forced and checked
against eigvalsh on one case of every family; with CUDA, the whole oracle (output,
kappa, gradients) on the GPU is checked against the CPU.

Tolerances come from the method's guarantee and from float64 rounding times the
conditioning (``_rounding``: D (D + 1) u64 kappa, the backward error of a Cholesky
factorisation or of eigvalsh, relative to lambda_min); none is tuned to the data.
"""

from __future__ import annotations

import math

import pytest
import torch

from lla_verify.budget.backward import oracle_grads, row_kappa, cotangent_for
from lla_verify.budget.forward import accumulation_length, sensitivity
from lla_verify.oracles import extremes
from lla_verify.oracles.extremes import RTOL, certified_extremes, extreme_eigenvalues, symmetric_norm
from lla_verify.oracles.float64 import lla_forward_details, sigma_matrices
from lla_verify.registry.cases import FAMILIES, Case, Problem

U64 = 2.0**-53
# D > LANCZOS_STEPS: the Krylov space is a proper subspace, so the certificate has work to do
CASES = [Case(name, {}, B=1, H=2, S=48, D=24, dtype="float32", seed=0) for name in FAMILIES]
IDS = [c.family for c in CASES]
# lambda_max / (1 + rtol) <= theta and g <= lambda_min (1 + rtol)(1 + rtol / 10) (extremes.py)
HI_LOW = 1.0 / (1.0 + RTOL)
LO_HIGH = (1.0 + RTOL) * (1.0 + RTOL / 10)


def _rounding(D: int, kappa: torch.Tensor) -> torch.Tensor:
    """Relative float64 uncertainty of lambda_min: D (D + 1) u64 kappa (the backward error
    of a Cholesky factorisation, and a bound on eigvalsh's, over lambda_min)."""
    return D * (D + 1) * U64 * kappa


def _mismatch(what, bad, got, want, extra=""):
    idx = torch.nonzero(bad)[:3].tolist()
    return (f"{what}: {int(bad.sum())} of {bad.numel()} rows off; first {idx}: got "
            f"{got[bad][:3].tolist()}, eigvalsh {want[bad][:3].tolist()}{extra}")


def check_against_eigvalsh(A: torch.Tensor, ext, what: str) -> None:
    """Every row of ``ext`` (Extremes of A) within the certified bracket of eigvalsh's
    values, or equal to them where the iteration did not certify; rows past the
    resolvable kappa never certified."""
    __tracebackhide__ = True
    D = A.shape[-1]
    ev = torch.linalg.eigvalsh(A)
    e_lo, e_hi = ev[..., 0], ev[..., -1]
    kap = torch.where(e_lo > 0, e_hi / e_lo.clamp_min(1e-300), torch.full_like(e_hi, math.inf))
    cert = ext.certified
    # past a fifth of rtol in rounding no certificate may be issued (the method stops at a tenth)
    unresolvable = ~(_rounding(D, kap) <= RTOL / 5)
    assert not bool((cert & unresolvable).any()), _mismatch(
        f"{what}: certified where kappa D (D+1) u64 > rtol / 5", cert & unresolvable, ext.lo, e_lo)
    fb = ~cert
    assert torch.equal(ext.lo[fb], e_lo[fb]) and torch.equal(ext.hi[fb], e_hi[fb]), \
        f"{what}: uncertified rows must carry eigvalsh's values"
    r = _rounding(D, kap)[cert]
    hi_ratio, lo_ratio = ext.hi[cert] / e_hi[cert], ext.lo[cert] / e_lo[cert]
    d_hi = D * (D + 1) * U64
    bad_hi = (hi_ratio < HI_LOW - d_hi) | (hi_ratio > 1 + d_hi)
    bad_lo = (lo_ratio < 1 - r) | (lo_ratio > LO_HIGH + r)
    assert not bool(bad_hi.any()), _mismatch(f"{what}: lambda_max outside [{HI_LOW:.4f}, 1] x eigvalsh",
                                             bad_hi, ext.hi[cert], e_hi[cert])
    assert not bool(bad_lo.any()), _mismatch(f"{what}: lambda_min outside [1, {LO_HIGH:.4f}] x eigvalsh",
                                             bad_lo, ext.lo[cert], e_lo[cert])


@pytest.fixture
def forced_certified(monkeypatch):
    """The device method on CPU: extreme_eigenvalues and symmetric_norm skip eigvalsh."""
    monkeypatch.setattr(extremes, "_use_eigvalsh", lambda A: False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_certified_extremes_agree_with_eigvalsh(case):
    p = case.build()
    D = case.D
    for lam, what in ((p.lam_tensor, "family lambda"), (0.0, "lambda = 0")):
        A = sigma_matrices(p.q, p.k, ridge_lambda=lam, qk_scale=p.qk_scale)
        ext = certified_extremes(A)
        check_against_eigvalsh(A, ext, f"{case.spec()} ({what})")
        # the iteration, not the fallback, answers the rows it can resolve: a broken or
        # truncated iteration is correct only through eigvalsh, and as slow as before
        ev = torch.linalg.eigvalsh(A)
        resolvable = (ev[..., 0] > 0) & (_rounding(D, ev[..., -1] / ev[..., 0].clamp_min(1e-300)) <= RTOL / 20)
        n_res, n_cert = int(resolvable.sum()), int((ext.certified & resolvable).sum())
        assert n_cert >= 0.75 * n_res, (f"{case.spec()} ({what}): the iteration certified {n_cert} of "
                                        f"{n_res} resolvable rows; eigvalsh answered the rest")
    # lambda = 0: the early rows are singular, so the fallback is exercised on every family
    assert not bool(ext.certified[..., : D - 1].any())


@pytest.mark.parametrize("missed", ["largest", "smallest"])
def test_certificate_rejects_a_krylov_space_that_misses_an_extreme(missed):
    # The fixed start vector lies in the span of two eigenvectors: its Krylov space is
    # that plane, which holds one end of the spectrum and a middle eigenvalue, so the
    # Ritz value at the other end is that middle eigenvalue. Only the certificate of the
    # missed end can reject it; the row must then carry eigvalsh's values.
    D = 24
    x0 = extremes._start(D, "cpu")
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.cat([x0[:, None], torch.randn(D, D - 1, generator=gen, dtype=torch.float64)], 1))
    basis = torch.cat([((Q[:, 0] + Q[:, 1]) / 2**0.5)[:, None], ((Q[:, 0] - Q[:, 1]) / 2**0.5)[:, None], Q[:, 2:]], 1)
    # kappa 100: the solves' rounding (u64 kappa) stays far below the breakdown cut, so
    # no component outside the plane grows back (at kappa 1e6 one does, along the
    # smallest eigenvector, and the iteration then finds it and certifies it rightly)
    spec = torch.logspace(-1, 1, D, dtype=torch.float64)
    found = 0 if missed == "largest" else D - 1  # the end the plane holds
    order = [found, D // 2] + [i for i in range(D) if i not in (found, D // 2)]
    A = (basis * spec[order]) @ basis.T
    A = 0.5 * (A + A.T)[None]
    ext = certified_extremes(A)
    assert not bool(ext.certified.any())
    check_against_eigvalsh(A, ext, f"start vector in a plane without the {missed} eigenvalue")
    assert float(ext.hi[0]) == pytest.approx(10.0, rel=1e-12) and float(ext.lo[0]) == pytest.approx(0.1, rel=1e-12)
    # what the iteration alone answers at the missed end: the middle eigenvalue
    L = torch.linalg.cholesky(A)
    ops = {"largest": lambda x: (A @ x[..., None])[..., 0],
           "smallest": lambda x: torch.cholesky_solve(x[..., None], L)[..., 0]}
    ritz = float(extremes._top_ritz(ops[missed], 1, D, extremes.LANCZOS_STEPS, "cpu")[0])
    mid = float(spec[D // 2])
    assert ritz == pytest.approx(mid if missed == "largest" else 1 / mid, rel=1e-10)


def test_symmetric_norm_certified(forced_certified):
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(64, 24, 24, generator=gen, dtype=torch.float64)
    E = g + g.transpose(-1, -2)
    exact = torch.linalg.eigvalsh(E).abs().amax(-1)
    got = symmetric_norm(E)
    ratio = got / exact
    # sqrt of lambda_max(E^2) bracketed to [1 / (1 + rtol), 1]
    assert bool(((ratio >= HI_LOW**0.5 - 1e-12) & (ratio <= 1 + 1e-12)).all()), ratio


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_details_kappa_with_the_device_method(case, forced_certified):
    """lla_forward_details wired to the certified extremes: kappa, ||Sigma_i|| and the
    undefined rows as with eigvalsh, within the guarantee; the output untouched."""
    p = case.build()
    D = case.D
    for lam in (p.lam_tensor, 0.0):
        A = sigma_matrices(p.q, p.k, ridge_lambda=lam, qk_scale=p.qk_scale)
        ev = torch.linalg.eigvalsh(A)
        got = lla_forward_details(p.q, p.k, p.v, ridge_lambda=lam, qk_scale=p.qk_scale)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(extremes, "_use_eigvalsh", lambda A: True)
            ref = lla_forward_details(p.q, p.k, p.v, ridge_lambda=lam, qk_scale=p.qk_scale)
        assert torch.equal(got.undefined, ref.undefined)
        assert torch.equal(torch.nan_to_num(got.o), torch.nan_to_num(ref.o))
        assert torch.equal(ref.sigma_norm, ev[..., -1])
        hi_ratio = got.sigma_norm / ref.sigma_norm
        assert bool(((hi_ratio >= HI_LOW - D * (D + 1) * U64) & (hi_ratio <= 1 + D * (D + 1) * U64)).all())
        finite = torch.isfinite(ref.kappa) & (_rounding(D, ref.kappa) <= RTOL / 5)
        k_ratio = got.kappa[finite] / ref.kappa[finite]
        slack = _rounding(D, ref.kappa[finite])
        low = 1.0 / LO_HIGH * HI_LOW - slack
        bad = (k_ratio < low) | (k_ratio > 1 + slack + D * (D + 1) * U64)
        assert not bool(bad.any()), _mismatch(f"{case.spec()}: kappa", bad, got.kappa[finite], ref.kappa[finite])
        # rows eigvalsh finds beyond resolution: the same values (eigvalsh answered them)
        rest = ~finite
        assert torch.equal(got.kappa[rest], ref.kappa[rest])


@pytest.mark.parametrize("certified", [False, True], ids=["eigvalsh", "certified"])
def test_details_kappa_in_order_whatever_the_chunking(certified, monkeypatch):
    """kappa and ||Sigma_i|| are computed in batches of several chunks: each row still gets
    its own Sigma_i's values, whether one batch holds the whole sequence or several do
    (chunk_bytes of one query's pairwise tensors: chunks of one query, a batch every
    twelve of them)."""
    monkeypatch.setattr(extremes, "_use_eigvalsh", lambda A: not certified)
    p = Case("lambda_decades", {"decades": 4.0}, B=2, H=1, S=40, D=8, dtype="float32", seed=1).build()
    A = sigma_matrices(p.q, p.k, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    want = extreme_eigenvalues(A)
    for chunk_bytes in (1 << 30, 8 * 40 * (3 * 8 + 8 + 4)):
        d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                                chunk_bytes=chunk_bytes)
        torch.testing.assert_close(d.sigma_norm, want.hi, rtol=1e-13, atol=0)
        torch.testing.assert_close(d.kappa, want.hi / want.lo, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ CPU against CUDA
def _output_tolerance(p, d) -> torch.Tensor:
    """Per query: twice the worst-case float64 error of the oracle's output, u64 times
    (n_i sens_i + D kappa_i solv_i + ||o_i||): the inputs' rounding through the
    sensitivity (n_i = (i + 1) D terms, deterministic bound), the Cholesky solve's
    backward error D u64 ||Sigma_i|| through kappa_i and solv_i, and the output's own."""
    n = accumulation_length(p)
    kap = torch.nan_to_num(d.kappa, posinf=0.0)
    return 2 * U64 * (n * sensitivity(p) + p.q.shape[-1] * kap * torch.nan_to_num(d.solv, nan=0.0)
                      + d.o.norm(dim=-1))


def _conditioning(d) -> torch.Tensor:
    """kappa_i max(1, omega_i / |delta_i|) per query: the digits float64 loses on row i
    (the mpmath oracle's own model, oracles/mp.py): Sigma_i's solve, and the
    normalisation by delta_i, which is tiny where the augmented system is nearly
    singular though Sigma_i is not (an early row i = D - 1 at lambda 1e-8: kappa 2e4,
    delta / omega 2e-9)."""
    ratio = torch.nan_to_num(d.omega / d.delta.abs(), nan=math.inf, posinf=math.inf).clamp_min(1.0)
    return torch.nan_to_num(d.kappa * ratio, nan=math.inf)


def _grad_tolerance(p, g, cond, defined, name) -> torch.Tensor:
    """Per row: twice S D u64 (cond_row + 1) max_rows ||g||: float64 rounding over the
    S D terms of a gradient row (deterministic bound), through the conditioning of the
    solves that feed it (row_kappa: the query's, or the worst query a key feeds), on
    the gradient's scale. Rows with no float64 digit left get an infinite tolerance."""
    S, D = p.q.shape[-2], p.q.shape[-1]
    rows = g.abs() if name == "dlambda" else g.norm(dim=-1)
    c = row_kappa(cond, defined, name)
    return 2 * S * D * U64 * (c + 1) * rows.amax(-1, keepdim=True)


def oracle_run(p):
    """lla_forward_details and the float64 gradients (budget.backward.oracle_grads) of
    ``p`` for its fixed cotangent, on p's device."""
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    return d, oracle_grads(p, cotangent_for(p))


def compare_runs(p, run_a, run_b, what: str) -> None:
    """Two oracle runs of the same problem ``p`` (CPU tensors, b's arithmetic done
    elsewhere): undefined rows equal; kappa within the certified bracket (eigvalsh on one
    side, either method on the other); o and the float64 gradients within float64
    rounding times the conditioning."""
    __tracebackhide__ = True
    (da, ga), (db, gb) = run_a, run_b
    D = p.q.shape[-1]
    assert torch.equal(da.undefined, db.undefined), f"{what}: undefined rows differ"
    defined = ~da.undefined
    ka, kb = da.kappa, db.kappa
    resolved = defined & torch.isfinite(ka) & (_rounding(D, ka) <= RTOL / 5)
    slack = _rounding(D, ka[resolved])
    ratio = kb[resolved] / ka[resolved]
    bad = (ratio < HI_LOW / LO_HIGH - 2 * slack) | (ratio > 1 + 2 * slack + 2 * D * (D + 1) * U64)
    assert not bool(bad.any()), _mismatch(f"{what}: kappa", bad, kb[resolved], ka[resolved])
    # rows float64 does not resolve on one side are not resolved on the other either
    rest = defined & ~resolved
    assert bool((~(_rounding(D, kb[rest]) <= RTOL / 50)).all()), f"{what}: kappa resolved on one side only"

    tol = _output_tolerance(p, da)
    err = (db.o - da.o).norm(dim=-1)
    bad = defined & ~(err <= tol)
    assert not bool(bad.any()), _mismatch(f"{what}: output", bad, err, tol, " (error, tolerance)")
    cond = _conditioning(da)
    for name in ("dq", "dk", "dv", "dlambda"):
        a, b = ga[name], gb[name]
        diff = (b - a).abs() if name == "dlambda" else (b - a).norm(dim=-1)
        tol = _grad_tolerance(p, a, cond, defined, name)
        bad = ~(diff <= tol)
        assert not bool(bad.any()), _mismatch(f"{what}: {name}", bad, diff, tol, " (difference, tolerance)")


def _to_cpu(run):
    d, g = run
    for f in ("o", "kappa", "undefined", "solv", "sigma_norm", "omega", "delta"):
        setattr(d, f, getattr(d, f).cpu())
    return d, {k: v.cpu() for k, v in g.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU oracle against the CPU one")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_and_cuda_oracles_agree(case):
    p = case.build()
    compare_runs(p, oracle_run(p), _to_cpu(oracle_run(p.to("cuda"))), f"{case.spec()}, CPU against CUDA")


def _permuted_run(p, *, round_to=None):
    """The oracle on p with the coordinates of q, k (one permutation) and of v (another)
    permuted, results permuted back: the same mathematics in another order of every
    sum and of the Cholesky pivots, i.e. a rounding-only change as a second device
    makes. round_to: that run's o and gradients rounded to a lower precision."""
    D = p.q.shape[-1]
    P = torch.randperm(D, generator=torch.Generator().manual_seed(1))
    Pv = torch.randperm(D, generator=torch.Generator().manual_seed(2))
    pb = Problem(p.case, p.q[..., P], p.k[..., P], p.v[..., Pv], p.ridge_lambda, p.qk_scale)
    d = lla_forward_details(pb.q, pb.k, pb.v, ridge_lambda=pb.ridge_lambda, qk_scale=pb.qk_scale)
    g = oracle_grads(pb, cotangent_for(p)[..., Pv])
    back, back_v = torch.argsort(P), torch.argsort(Pv)
    d.o = d.o[..., back_v]
    g = {"dq": g["dq"][..., back], "dk": g["dk"][..., back], "dv": g["dv"][..., back_v], "dlambda": g["dlambda"]}
    if round_to is not None:
        d.o = d.o.to(round_to).to(torch.float64)
        g = {k: v.to(round_to).to(torch.float64) for k, v in g.items()}
    return d, g


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_device_tolerances_hold_for_a_rounding_only_change(case):
    """The CPU/CUDA comparison's tolerances are not tighter than float64 rounding: the
    oracle against itself with permuted coordinates passes them on every family."""
    p = case.build()
    compare_runs(p, oracle_run(p), _permuted_run(p), f"{case.spec()}, permuted coordinates")


@pytest.mark.parametrize("case", [c for c in CASES if c.family in ("gaussian", "spectrum", "offset")],
                         ids=["gaussian", "spectrum", "offset"])
def test_device_tolerances_fail_a_float32_result(case):
    """... and not so loose that a side computing in float32 would pass."""
    p = case.build()
    with pytest.raises(AssertionError, match="output|dq|dk|dv|dlambda"):
        compare_runs(p, oracle_run(p), _permuted_run(p, round_to=torch.float32), f"{case.spec()}, float32")


def test_study_script_runs_at_a_tiny_size(capsys):
    """scripts/study_oracle_device.py --smoke: every method times every item, and the
    verdicts do not depend on how the extremes were found."""
    from tests import repo_scripts

    rows = repo_scripts.load("study_oracle_device").main(["--smoke"])
    assert [r[3] for r in rows] == ["lla_forward_details", "forward budget", "backward budget"]
    for *_, res, _fallback in rows:
        assert set(res) == {"old", "new", "certified"}
        assert all(t > 0 for t, _ in res.values())
    for *_, res, _fallback in rows[1:]:
        ratios = {m: float(v.ratio) for m, (_, v) in res.items()}
        assert ratios["old"] == ratios["new"]  # on CPU both are eigvalsh
        # a budget moves at most in proportion to kappa and ||Sigma_i||, which move within the guarantee
        assert ratios["certified"] == pytest.approx(ratios["old"], rel=(1 + RTOL) ** 3 - 1), ratios
    out = capsys.readouterr().out
    assert "| 12 | 8 | cpu | backward budget |" in out and "old / certified" in out


# ---- the float64 gradients and probes where a Cholesky factorisation fails

# The H200's false alarm (issue 21): early rows at kappa 1e9 make the Sigma probe's
# perturbed Sigma_i indefinite; on CUDA their failed factors poisoned every key's probe,
# and key 16 (fed only by query 16, kappa 2.2e4) was judged without its sensitivity.
REPLAY = "subspace:lam=1e-09,noise=0.1,rank=2:B=1,H=2,S=17,D=16,dtype=bfloat16,seed=108"


@pytest.fixture
def cuda_cholesky(monkeypatch):
    """torch.linalg.cholesky_ex as on CUDA: a factorisation that fails comes back NaN
    (cuSOLVER; pytorch/pytorch#121009), where LAPACK leaves a partial, finite factor.
    Yields the list of failure counts, one per call that failed."""
    real = torch.linalg.cholesky_ex
    failures = []

    def nan_on_failure(A, *args, **kw):
        L, info = real(A, *args, **kw)
        bad = info != 0
        if bool(bad.any()):
            failures.append(int(bad.sum()))
        return torch.where(bad[..., None, None], torch.full_like(L, math.nan), L), info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", nan_on_failure)
    return failures


def test_failed_cholesky_stays_out_of_the_gradients(cuda_cholesky, forced_certified):
    # h = 1e-6 moves Sigma_i by about 100x the smallest eigenvalue of the kappa ~1e9 rows:
    # their Cholesky fails and LU answers; no gradient may come out NaN for that
    from lla_verify.registry.cases import parse_case

    p = parse_case(REPLAY).build("cpu")
    cot = cotangent_for(p).to(p.q.dtype).to(torch.float64)
    g = oracle_grads(p, cot, sigma_probe=(1e-6, 0))
    assert cuda_cholesky, "no Cholesky failed: the test no longer exercises the failed-factor path"
    for name, t in g.items():
        bad = ~torch.isfinite(t) if name == "dlambda" else ~torch.isfinite(t).all(-1)
        assert not bool(bad.any()), f"{name}: non-finite rows {bad.nonzero().tolist()[:6]}"


class _NanAdjoint(torch.autograd.Function):
    """Identity forward; the backward turns the adjoint of one query row into NaN."""

    @staticmethod
    def forward(ctx, rho, row):
        ctx.row = row
        return rho.view_as(rho)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[:, ctx.row] = math.nan
        return g, None


def test_a_nan_adjoint_reaches_no_key_after_its_query(monkeypatch):
    # Key j feeds queries i >= j only: whatever query i's backward carries (NaN from a
    # solve that failed there), keys j > i take none of it, exactly
    from lla_verify.oracles import float64

    p = Case("gaussian", {"lam": 0.1}, B=1, H=1, S=9, D=4, dtype="float32", seed=0).build()
    cot = cotangent_for(p)
    clean = oracle_grads(p, cot)
    real, row = float64._solve_rho, 4

    def poisoned(sig, rhs, eye):
        rho, L, bad = real(sig, rhs, eye)
        return _NanAdjoint.apply(rho, row), L, bad

    monkeypatch.setattr(float64, "_solve_rho", poisoned)
    g = oracle_grads(p, cot)
    assert bool(torch.isnan(g["dk"][..., :row + 1, :]).any()), "the planted NaN did not arrive"
    for name in ("dk", "dv"):
        assert torch.equal(g[name][..., row + 1:, :], clean[name][..., row + 1:, :]), (
            f"{name}: keys after query {row} changed: non-finite rows "
            f"{(~torch.isfinite(g[name]).all(-1)).nonzero()[:, -1].tolist()}")
    others = [i for i in range(p.q.shape[-2]) if i != row]
    assert torch.equal(g["dq"][..., others, :], clean["dq"][..., others, :])


def test_gradient_budget_the_same_with_the_device_linear_algebra(cuda_cholesky, forced_certified, monkeypatch):
    # Every judged row gets its sensitivity terms with CUDA's failed factors and the
    # certified extremes, and the same budget as on CPU to the method's tolerances:
    # kappa within 2.2% (the probe's step 1e-2 / kappa_max with it, second-order terms
    # ~1%), ||E_i|| within 0.5%: 5% in all. The bug took dk row 16 of head 1 84x down.
    from lla_verify.budget.backward import GRAD_NAMES, backward_budget, oracle_pass, reference_grads
    from lla_verify.registry.cases import parse_case
    from lla_verify.registry.impls import get_impl

    impl = get_impl("torch-fp32")
    p = parse_case(REPLAY).build("cpu")
    cot = cotangent_for(p).to(p.q.dtype).to(torch.float64)

    def budget():
        op = oracle_pass(p)
        ref, jac = reference_grads(op, cot, dlambda_residual=True)
        return backward_budget(p, impl, cot, GRAD_NAMES, details=op.details, ref=ref, rho_jac=jac)

    device = budget()
    assert cuda_cholesky, "no Cholesky failed: the test no longer exercises the failed-factor path"
    monkeypatch.undo()  # LAPACK's factors and eigvalsh: the CPU's budget
    cpu = budget()
    for name in GRAD_NAMES:
        gd, gc = device.grads[name], cpu.grads[name]
        assert gd.n_unmeasured == 0, f"{name}: {gd.n_unmeasured} rows without their sensitivity"
        assert torch.equal(gd.judged, gc.judged), name
        r = gd.allowed[gc.judged] / gc.allowed[gc.judged]
        assert bool(((r > 1 / 1.05) & (r < 1.05)).all()), f"{name}: device / CPU allowed {r.tolist()}"


def test_a_row_no_solver_answers_is_undefined_and_stays_out_of_the_keys(monkeypatch):
    # A Sigma_i that neither Cholesky nor LU solves in float64 (singular as stored, at
    # lambda_i > 0) has no value: the row is undefined, and the identity system stands in
    # before the solve, or its backward (0 x Inf) would reach the keys it would feed
    from lla_verify.oracles import float64

    p = Case("gaussian", {"lam": 0.1}, B=1, H=1, S=9, D=4, dtype="float32", seed=0).build()
    row = 5
    real_chol, real_lu = torch.linalg.cholesky_ex, torch.linalg.solve_ex

    def is_row(A):  # the chunk's Sigma (1, S, D, D) that is not the identity at ``row``
        return A.dim() == 4 and A.shape[1] == 9 and not torch.equal(A[0, row], torch.eye(4, dtype=A.dtype))

    def chol(A, *args, **kw):
        L, info = real_chol(A, *args, **kw)
        if is_row(A):
            info = info.clone()
            info[0, row] = 1
            L = L.clone()
            L[0, row] = math.nan
        return L, info

    def lu(A, B, *args, **kw):
        X, info = real_lu(A, B, *args, **kw)
        if is_row(A):
            X = X.clone()
            X[0, row] = math.inf
        return X, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", chol)
    monkeypatch.setattr(torch.linalg, "solve_ex", lu)
    d = float64.lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    assert d.undefined[0, 0].tolist() == [i == row for i in range(9)]
    g = oracle_grads(p, cotangent_for(p))
    for name, t in g.items():
        bad = ~torch.isfinite(t) if name == "dlambda" else ~torch.isfinite(t).all(-1)
        assert not bool(bad.any()), f"{name}: non-finite rows {bad.nonzero()[:, -1].tolist()}"
