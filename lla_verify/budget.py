"""Derived error budgets (docs/error-model.md) and the verdicts built on them.

Every comparison in lla-verify goes through here and reduces to one number,
ratio = max_i error_i / allowed_i, failing above 1 (THRESHOLD). For query i:

    model_i   = THRESH * ( u_c sqrt(n_i) sens_i           rounding in the compute precision
                         + (tol + u_c) solv_i           the inner solve (stopping at tol)
                         + u_out ||o_i||                  rounding of the output
                         + u_c sqrt(n_i) vscale )         floor for outputs near zero
    allowed_i = max(model_i max(1, FA_FACTOR c), FA_FACTOR * dense_err_i)
    c = max_j dense_err_j / model_j                       (same_precision_allowed)

sens_i is the first-order change of o_i under componentwise relative perturbations
of q, k, v, lambda of unit size along random sign patterns (Jacobian-vector
products of the float64 oracle); n_i = (i + 1) D is the accumulation length
feeding o_i (probabilistic rounding model: sqrt(n) u); solv_i is the oracle's
||(do_i/drho_i) Sigma_i^{-1}|| ||mu_i||; dense_err_i is the error of the same dense
computation carried out in the compute precision on the same rounded inputs
(FlashAttention's rule). solv_i = ||(do_i/drho_i) Sigma_i^{-1}|| ||mu_i||. The oracle always runs on the rounded inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.func import jvp

from lla_verify.registry.cases import DTYPE_NAMES, Problem
from lla_verify.registry.impls import Impl
from lla_verify.oracles.dense import dense_torch_lla
from lla_verify.registry.precision import unit_roundoff
from lla_verify.oracles.float64 import LLADetails, lla_forward, lla_forward_details, lla_forward_mu_shift, lla_forward_sigma_probe

THRESHOLD = 1.0  # a check fails when error / allowed exceeds this
THRESH = 4.0  # safety factor on the first-order model (its terms are estimates, not bounds)
FA_FACTOR = 3.0  # kernel error may be this multiple of the same-precision dense error
N_DIRECTIONS = 2  # random sign directions for the sensitivity estimate
U64 = 2.0**-53
MP_MAX_WORK = 64 * 64 * 8  # S * S * D up to which the mpmath oracle re-checks a dispute


# Every check made in this process: (check, impl, ratio, case). The property suite
# prints "k of N checks over threshold, worst ratio r at <case>" from it.
LEDGER: list = []


def record(check: str, impl: str, ratio: float, case: str) -> None:
    LEDGER.append((check, impl, float(ratio), case))


@dataclass
class Verdict:
    """The outcome of one comparison: a ratio, a pass/fail, and why."""

    check: str
    impl: str
    case: str
    ratio: float
    passed: bool
    cause: str  # "ok" | "implementation" | "conditioning" | "solver" | "non-finite"
    message: str
    worst: tuple | None = None
    n_defined: int = 0
    n_undefined: int = 0
    per_query: dict = field(default_factory=dict)  # tensors, for plots and reports
    summary: dict = field(default_factory=dict)  # scalars for the report row

    def __str__(self) -> str:
        return self.message


def _lam_tensor(problem: Problem) -> torch.Tensor:
    return problem.lam_tensor.to(problem.q.device)


def rounds_inputs(impl: Impl) -> bool:
    """Whether ``impl`` declares a rounding of its inputs (Impl.input_dtype, lambda_dtype)."""
    return impl.input_dtype is not None or impl.lambda_dtype is not None


def kernel_view(problem: Problem, impl: Impl) -> Problem:
    """``problem`` as ``impl`` computes on it: q, k, v rounded to ``impl.input_dtype`` (and
    held in it), lambda to ``impl.lambda_dtype`` ("input": the dtype of q as passed).

    The oracle and every budget term run on this problem (SPEC 8: rounding the kernel
    does to its inputs is input, not error). Apply it once, to the problem the
    implementation was given: a "input" lambda follows that problem's dtype.
    """
    if not rounds_inputs(impl):
        return problem
    in_dt = impl.input_dtype
    q, k, v = (t if in_dt is None else t.to(in_dt) for t in (problem.q, problem.k, problem.v))
    lam_dt = problem.q.dtype if impl.lambda_dtype == "input" else impl.lambda_dtype
    lam = problem.ridge_lambda
    if lam_dt is not None:
        if isinstance(lam, torch.Tensor):
            lam = lam.to(lam_dt).to(lam.dtype)
        else:
            lam = float(torch.tensor(float(lam), dtype=lam_dt))
    return Problem(problem.case, q, k, v, lam, problem.qk_scale)


def io_roundoff(problem: Problem, impl: Impl) -> float:
    """Unit roundoff of the coarser of the rounding ``impl`` applies to its inputs and to its
    output on ``problem`` (Impl.input_dtype, output_dtype; the problem's dtype where the
    record names none): the rounding an exact identity of LLA is allowed on top of the
    compute precision's."""
    dts = [impl.input_dtype or problem.q.dtype, impl.output_dtype or problem.q.dtype]
    return max(unit_roundoff(dt) if dt != torch.float64 else U64 for dt in dts)


def rounding_note(problem: Problem, impl: Impl) -> str:
    """One line naming the rounding a verdict was judged under, or '' when there is none."""
    if not rounds_inputs(impl):
        return ""
    lam_dt = problem.q.dtype if impl.lambda_dtype == "input" else impl.lambda_dtype
    name = lambda dt: DTYPE_NAMES.get(dt, str(dt)) if dt is not None else "as given"  # noqa: E731
    return (f"\n  judged on what {impl.name} computes from: q, k, v rounded to {name(impl.input_dtype)}, "
            f"lambda to {name(lam_dt)}, output rounded to {name(impl.output_dtype)}")


def sensitivity(problem: Problem, *, directions: int = N_DIRECTIONS, seed: int = 0) -> torch.Tensor:
    """max over random sign directions xi of ||J_o(x)[x * xi]||_2 per query, (B, H, S).

    The forward error a backward-stable computation would make, per unit of
    componentwise relative backward error in q, k, v and lambda.
    """
    q, k, v = (t.to(torch.float64) for t in (problem.q, problem.k, problem.v))
    lam = _lam_tensor(problem).clone()
    gen = torch.Generator().manual_seed(seed)

    def f(q_, k_, v_, l_):
        return lla_forward(q_, k_, v_, ridge_lambda=l_, qk_scale=problem.qk_scale)

    best = None
    for _ in range(directions):
        xs = [torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1 for t in (q, k, v, lam)]
        tangents = tuple(x * t for x, t in zip(xs, (q, k, v, lam)))
        _, do = jvp(f, (q, k, v, lam), tangents)
        n = do.norm(dim=-1)
        best = n if best is None else torch.maximum(best, n)
    return best


def same_precision_allowed(model: torch.Tensor, dense_err: torch.Tensor, factor: float,
                           rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """allowed_i and the scale put on the model, from the same-precision reference (SPEC 8).

    Per row, FlashAttention's rule: allowed_i >= factor * dense_err_i. And the same rule
    in model-normalised units: with c = max_i dense_err_i / model_i, the honest
    computation's worst error relative to the model on this problem, every row may reach
    factor * c times its model (when that exceeds 1). The reference's error at one row
    is one sample of a rounding error that a second fp32 computation (the kernel) draws
    afresh, so a per-row comparison alone fails the kernel wherever the two samples
    differ: the dlambda of a bandwidth problem at lambda 1e-3 (S = 128, D = 64, fp32:
    reference 1.33x over the model at row 19, kernel 1.4x at row 101, both 10% off
    overall), and of early rows at kappa 6e4 (spectrum kappa 1e4, bf16: reference 266 at
    row 6, kernel 343 at row 7, against a model of 187 there; overall 5.1e-3 and 8.2e-3).
    Where the reference sits well inside the model (c < 1 / factor), nothing changes.
    """
    de = torch.nan_to_num(dense_err, nan=0.0, posinf=0.0)
    ratio = torch.where(rows & (model > 0), de / model.clamp_min(1e-300), torch.zeros_like(de))
    c = float(ratio.max()) if ratio.numel() else 0.0
    scale = max(1.0, factor * c)
    return torch.maximum(model * scale, factor * de), scale


def accumulation_length(problem: Problem) -> torch.Tensor:
    """n_i = (i + 1) D, shaped (1, 1, S) to broadcast against (B, H, S)."""
    S, D = problem.q.shape[-2], problem.q.shape[-1]
    return (torch.arange(1, S + 1, dtype=torch.float64, device=problem.q.device) * D)[None, None, :]


@dataclass
class ForwardBudget:
    details: LLADetails
    sens: torch.Tensor
    terms: dict
    model: torch.Tensor
    dense_err: torch.Tensor | None
    allowed: torch.Tensor
    u_c: float
    u_out: float
    model_scale: float = 1.0  # the same-precision scale on the model (same_precision_allowed)


def forward_budget(problem: Problem, impl: Impl, *, details: LLADetails | None = None, dense: bool = True,
                   out_dtype: torch.dtype | None = None, rounded: bool = False) -> ForwardBudget:
    """The allowed per-query error of ``impl`` on ``problem`` (module docstring).

    ``problem`` is the one the implementation was given; the budget is built on
    ``kernel_view(problem, impl)`` (pass ``rounded=True`` when it already is that view),
    and the output rounding is ``impl.output_dtype`` when the record names one.
    """
    if not rounded:
        problem = kernel_view(problem, impl)
    q = problem.q
    d = details or lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                       qk_scale=problem.qk_scale)
    u_c = impl.u
    out_dt = impl.output_dtype or out_dtype or q.dtype
    u_out = unit_roundoff(out_dt) if out_dt != torch.float64 else U64
    sens = sensitivity(problem)
    root_n = accumulation_length(problem).sqrt()
    vscale = problem.v.to(torch.float64).norm(dim=-1).amax(-1, keepdim=True)  # (B, H, 1)
    onorm = d.o.norm(dim=-1)
    # The true residual ||mu_i - Sigma_i rho_i|| / ||mu_i|| the solve can reach, over u_c
    # (error-model.md §3.2). A backward-stable direct solve: ||Sigma_i|| ||rho_i|| / ||mu_i||,
    # between 1 and kappa_i (the float64 oracle exceeded a budget of 1 by 265x against
    # mpmath at kappa 1e6). CG: its recursive residual drifts from the true one by a
    # further sqrt(D) (Greenbaum); the GPU property run found kernel rows at that level.
    attainable = torch.nan_to_num(
        d.sigma_norm * d.rho.norm(dim=-1) / d.mu.norm(dim=-1), nan=1.0, posinf=1.0).clamp_min(1.0)
    if impl.solver_tol > 0:
        attainable = math.sqrt(q.shape[-1]) * attainable
    terms = {
        "rounding": u_c * root_n * sens,
        # an iterative solve stops at relative residual tol, and its true residual stays
        # above u_c * attainable whatever tol says
        "solver": (impl.solver_tol + u_c * attainable) * torch.nan_to_num(d.solv, nan=0.0),
        "output": u_out * onorm,
        "floor": u_c * root_n * vscale,
    }
    model = THRESH * sum(terms.values())
    dense_err, allowed, scale = None, model, 1.0
    if dense:
        o_dense = dense_torch_lla(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                  qk_scale=problem.qk_scale, compute_dtype=impl.compute_dtype)
        dense_err = (o_dense.to(torch.float64) - d.o).norm(dim=-1)
        allowed, scale = same_precision_allowed(model, dense_err, FA_FACTOR, ~d.undefined)
    return ForwardBudget(d, sens, terms, model, dense_err, allowed, u_c, u_out, scale)


def _fmt_idx(idx) -> str:
    return "(b=%d, h=%d, i=%d)" % tuple(int(x) for x in idx)


def float64_trust(fb: ForwardBudget) -> torch.Tensor:
    """Estimated error of the float64 oracle itself, per query (same model at u64)."""
    return U64 * fb.sens * 10.0 + U64 * fb.details.kappa.clamp(max=1e300) * fb.details.o.norm(dim=-1)


def check_forward(problem: Problem, impl: Impl, o: torch.Tensor, *, stats: dict | None = None,
                  dense: bool = True, mp_recheck: bool = True, fb: ForwardBudget | None = None) -> Verdict:
    """Compare an implementation's output ``o`` with the oracle on ``problem`` within budget."""
    case = problem.describe()
    if o.shape != problem.v.shape:
        return Verdict("forward", impl.name, case, math.inf, False, "implementation",
                       f"[{impl.name}] forward on {case}: output shape {tuple(o.shape)} != expected {tuple(problem.v.shape)}")
    given = problem
    problem = kernel_view(problem, impl)
    fb = fb or forward_budget(problem, impl, dense=dense, out_dtype=o.dtype, rounded=True)
    d = fb.details
    defined = ~d.undefined
    o64 = o.detach().to(torch.float64)
    err = (o64 - d.o).norm(dim=-1)
    finite = torch.isfinite(o64).all(-1)
    ratio_q = torch.where(defined, err / fb.allowed, torch.zeros_like(err))
    ratio_q = torch.where(defined & ~finite, torch.full_like(err, math.inf), ratio_q)
    n_def, n_undef = int(defined.sum()), int((~defined).sum())
    flat = ratio_q.flatten()
    worst_flat = int(torch.argmax(torch.nan_to_num(flat, nan=math.inf, posinf=math.inf)))
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst_flat), ratio_q.shape))
    ratio = float(flat[worst_flat])
    passed = ratio <= THRESHOLD
    lam = _lam_tensor(problem)
    per_query = {"err": err, "allowed": fb.allowed, "ratio": ratio_q, "kappa": d.kappa,
                 "delta_rel": d.delta / d.omega, "lam": lam, "model": fb.model}
    if fb.dense_err is not None:
        per_query["dense_err"] = fb.dense_err
    cause = "ok"
    extra = ""
    if not passed:
        if not bool(finite[idx]):
            cause = "non-finite"
        else:
            cause = "implementation"
            trust = float(float64_trust(fb)[idx])
            if stats is not None and "cg_residual" in stats and impl.solver_tol > 0:
                res = float(stats["cg_residual"][idx])
                it = int(stats["cg_iters"][idx]) if "cg_iters" in stats else -1
                if res > 10 * impl.solver_tol:
                    cause = "solver"
                    extra = f"; CG stopped at relative residual {res:.2e} > tol {impl.solver_tol:.1e} after {it} iterations"
            if cause == "implementation" and trust > 0.1 * float(fb.allowed[idx]):
                cause = "conditioning"
                extra = f"; float64 itself is uncertain here (estimated float64 error {trust:.2e})"
                if mp_recheck:
                    verdict_mp = _mp_recheck(problem, o64, idx, float(fb.allowed[idx]))
                    if verdict_mp is not None:
                        mp_err, mp_ratio = verdict_mp
                        if mp_ratio > THRESHOLD:
                            cause = "implementation"
                        extra += f"; mpmath re-check: error {mp_err:.3e}, ratio {mp_ratio:.3g}"
    t = {k: float(v[idx]) for k, v in fb.terms.items()}
    dense_txt = f", dense {DTYPE_NAMES.get(impl.compute_dtype, impl.compute_dtype)} error {float(fb.dense_err[idx]):.3e}" \
        if fb.dense_err is not None else ""
    if fb.model_scale > 1.0:
        dense_txt += f"; model x{fb.model_scale:.3g} (FA factor x the reference's worst error / model here)"
    msg = (
        f"[{impl.name}] forward {'PASS' if passed else 'FAIL'} ratio {ratio:.3g} on {case}\n"
        f"  worst query {_fmt_idx(idx)}: error {float(err[idx]):.3e} vs allowed {float(fb.allowed[idx]):.3e} "
        f"(model: rounding {t['rounding']:.2e} + solver {t['solver']:.2e} + output {t['output']:.2e} + floor "
        f"{t['floor']:.2e}, x{THRESH:g}{dense_txt})\n"
        f"  kappa(Sigma) {float(d.kappa[idx]):.3e}, delta/omega {float(d.delta[idx] / d.omega[idx]):.3e}, "
        f"lambda {float(lam[idx]):.3g}, scale {problem.qk_scale:.4g}, |o| {float(d.o[idx].norm()):.3g}; "
        f"{n_def} defined queries, {n_undef} undefined (lambda=0, delta=0) skipped\n"
        f"  cause: {cause}{extra}"
        f"{rounding_note(given, impl)}"
    )
    summary = {"ratio": ratio, "cause": cause, "kappa_worst": float(d.kappa[idx]),
               "kappa_max": float(torch.nan_to_num(d.kappa, posinf=1e300).max()),
               "err_max": float(torch.where(defined, err, torch.zeros_like(err)).max()),
               "nonfinite": int((defined & ~finite).sum()), "n_defined": n_def, "n_undefined": n_undef}
    record("forward", impl.name, ratio, case)
    return Verdict("forward", impl.name, case, ratio, passed, "ok" if passed else cause, msg, idx, n_def, n_undef,
                   per_query, summary)


def _mp_recheck(problem: Problem, o64: torch.Tensor, idx, allowed: float):
    """Re-run the worst head in mpmath when small enough; return (error, ratio) or None."""
    B, H, S, D = problem.q.shape
    if S * S * D > MP_MAX_WORK:
        return None
    try:
        from lla_verify.oracles.mp import lla_forward_mp
    except ImportError:
        return None
    b, h, i = idx
    lam = _lam_tensor(problem)[b:b + 1, h:h + 1, : i + 1]
    sl = lambda t: t[b:b + 1, h:h + 1, : i + 1]  # noqa: E731  causality: keys after i are irrelevant
    ref = lla_forward_mp(sl(problem.q), sl(problem.k), sl(problem.v), ridge_lambda=lam, qk_scale=problem.qk_scale)
    e = float((o64[b, h, i] - ref[0, 0, i]).norm())
    return e, e / allowed


def assert_within_budget(verdict: Verdict) -> None:
    """pytest helper: fail with the verdict's message (the failure points at the caller)."""
    __tracebackhide__ = True
    if not verdict.passed:
        raise AssertionError(verdict.message)


# ------------------------------------------------------------------ gradients
THRESH_GRAD = 8.0  # gradients chain two solves (rho and the adjoint u): a wider factor, as JAX keeps
FA_FACTOR_GRAD = 3.0  # FlashAttention's rule for gradients: 3x the same-precision reference
GRAD_NAMES = ("dq", "dk", "dv", "dlambda")
SOLVE_PROBE_SEEDS = (0, 1)
# Where kappa(Sigma_i) u_c >= 1, a perturbation of Sigma_i of the compute precision's
# rounding size reaches its smallest eigenvalue: Sigma_i may as well be singular in that
# precision, no first-order model of the gradient's error applies (both solves feed it),
# and the dense same-precision reference itself returns 100% errors there (spectrum
# kappa 1e8, fp32). Such rows, and the key rows their queries feed, are checked for NaN
# and counted, not judged against a budget.
BEYOND_PRECISION = 1.0


SOLVE_PROBE_LINEAR = 1e-2  # h_solve kappa_i at most this: the probe's second-order term ~1%
SOLVE_PROBE_MIN_STEP = 1e-12  # below this float64's own rounding of the gradient takes over


def beyond_precision(kappa: torch.Tensor, defined: torch.Tensor, u_c: float) -> torch.Tensor:
    """Defined query rows with kappa_i u_c >= BEYOND_PRECISION (an unmeasured kappa counts
    as infinite): held to no gradient budget, only to being free of NaN."""
    return defined & (torch.nan_to_num(kappa, nan=math.inf, posinf=math.inf) * u_c >= BEYOND_PRECISION)


def solve_probe_step(kappa: torch.Tensor, defined: torch.Tensor, u_c: float, h: float = 1e-6) -> float:
    """The relative size of the Sigma_i probe: ``h``, or less where a judged row's kappa_i
    would take the one-sided difference out of its linear regime (h kappa_i ~ 1 moves the
    smallest eigenvalue by its own size). Rows beyond the compute precision
    (``beyond_precision``) are judged for NaN only and set no step."""
    k = torch.nan_to_num(kappa, nan=math.inf, posinf=math.inf)
    judged = defined & ~beyond_precision(kappa, defined, u_c)
    if not bool(judged.any()):
        return h
    k_max = float(k[judged].max())
    return float(min(h, max(SOLVE_PROBE_MIN_STEP, SOLVE_PROBE_LINEAR / max(k_max, 1.0))))


def cotangent_for(problem: Problem, seed: int = 1234) -> torch.Tensor:
    """A fixed float64 output cotangent for ``problem`` (zero on undefined rows)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(problem.v.shape, generator=gen, dtype=torch.float64).to(problem.q.device)


def oracle_grads(problem: Problem, cot: torch.Tensor, *, q=None, k=None, v=None, lam=None,
                 sigma_probe: tuple[float, int] | None = None) -> dict:
    """float64 autograd through the oracle: dq, dk, dv, dlambda of sum <cot, o>.

    sigma_probe=(h, seed): through ``lla_forward_sigma_probe`` instead (every Sigma_i
    perturbed by h ||Sigma_i||_2 E_i, E_i random symmetric of unit spectral norm).
    """
    q = (problem.q if q is None else q).to(torch.float64).detach().requires_grad_(True)
    k = (problem.k if k is None else k).to(torch.float64).detach().requires_grad_(True)
    v = (problem.v if v is None else v).to(torch.float64).detach().requires_grad_(True)
    lam = (_lam_tensor(problem) if lam is None else lam).detach().clone().requires_grad_(True)
    if sigma_probe is None:
        o = lla_forward(q, k, v, ridge_lambda=lam, qk_scale=problem.qk_scale)
    else:
        o = lla_forward_sigma_probe(q, k, v, ridge_lambda=lam, qk_scale=problem.qk_scale,
                                    h=sigma_probe[0], seed=sigma_probe[1])
    cot = torch.where(torch.isnan(o), torch.zeros_like(cot), cot)
    gq, gk, gv, gl = torch.autograd.grad(torch.nan_to_num(o, nan=0.0), (q, k, v, lam), cot)
    return {"dq": gq, "dk": gk, "dv": gv, "dlambda": gl}


def impl_grads(impl: Impl, problem: Problem, cot: torch.Tensor, forward=None) -> dict:
    """The implementation's gradients of sum <cot, o> (lambda as a (B, H, S) tensor)."""
    from lla_verify.trust import call_grads

    fwd = forward or impl.forward
    lam = _lam_tensor(problem).to(torch.float32)
    # across the trust boundary: fresh copies in, a checked plain tensor out (trust.Misbehaved if not)
    grads = call_grads(fwd, problem.q, problem.k, problem.v, lam, cot, qk_scale=problem.qk_scale)
    return dict(zip(GRAD_NAMES, grads))


def solve_residual(d: LLADetails, impl: Impl) -> torch.Tensor:
    """||r_i||, the true residual of the forward solve the forward model allows, (B, H, S):
    (tol + u_c attainable_i) ||mu_i|| as in forward_budget (error-model.md §3.2)."""
    mu_n = d.mu.norm(dim=-1)
    attainable = torch.nan_to_num(d.sigma_norm * d.rho.norm(dim=-1) / mu_n, nan=1.0, posinf=1.0).clamp_min(1.0)
    if impl.solver_tol > 0:
        attainable = math.sqrt(d.mu.shape[-1]) * attainable
    return (impl.solver_tol + impl.u * attainable) * mu_n


def rho_residual_dlambda(problem: Problem, cot: torch.Tensor) -> torch.Tensor:
    """||d dlambda_i / d r_i||_2 per query (B, H, S): how dlambda_i = omega_i <u_i, rho_i>
    moves per unit of residual r_i left in the forward solve for rho_i, when the backward
    uses that rho_i (error-model.md §6, "The forward solve's residual").

    dlambda_i depends on rho_i alone among the rho's, so one reverse pass through the
    float64 gradient (double backward) gives every row's vector at once.
    """
    q, k, v = (t.to(torch.float64).detach() for t in (problem.q, problem.k, problem.v))
    lam = _lam_tensor(problem).detach().clone().requires_grad_(True)
    shift = torch.zeros(q.shape, dtype=torch.float64, device=q.device, requires_grad=True)
    o = lla_forward_mu_shift(q, k, v, ridge_lambda=lam, shift=shift, qk_scale=problem.qk_scale)
    cot = torch.where(torch.isnan(o), torch.zeros_like(cot), cot)
    (dl,) = torch.autograd.grad(torch.nan_to_num(o, nan=0.0), lam, cot, create_graph=True)
    (j,) = torch.autograd.grad(dl.sum(), shift, allow_unused=True)
    if j is None:  # no row's dlambda depends on its solve (every lambda_i's row undefined)
        return torch.zeros(q.shape[:-1], dtype=torch.float64, device=q.device)
    return j.norm(dim=-1)


def _row_norm(t: torch.Tensor, name: str) -> torch.Tensor:
    t = t.to(torch.float64)
    return t.abs() if name == "dlambda" else t.norm(dim=-1)


def _normalisation_terms(problem: Problem, d: LLADetails, cot: torch.Tensor, u_c: float, floor: dict,
                         exclude: torch.Tensor | None = None) -> dict:
    """Rounding of the normalised weights s_ij = w_ij f_ij / den_i in the gradients.

    f_ij = 1 - <z_ij, rho_i> is formed with an error of ~ sqrt(D) u_c |z_ij| |rho_i|; the
    forward output is immune (the same f_ij sit in numerator and denominator) but a
    backward that forms s_ij, o_i or den_i in separate passes is not: s_ij moves by
    w_ij sqrt(D) u_c |z_ij| |rho_i| / |den_i|, which is large where delta_i << omega_i.
    dv_j = sum_i s_ij g_i takes that per pair; the other gradients take the row's
    relative uncertainty r_i = sum_j (that) times their scale floor; dk_j takes the
    largest r_i over the queries i >= j that key j feeds (causality: an earlier query,
    however ill-conditioned, adds nothing to it). Query rows in ``exclude`` (beyond the
    compute precision) feed no judged key row, so they are left out of dk's maximum.
    """
    q, k = problem.q.to(torch.float64), problem.k.to(torch.float64)
    S, D = q.shape[-2], q.shape[-1]
    a = problem.qk_scale * (q @ k.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    w = torch.exp(a.masked_fill(~mask, float("-inf")) - d.m[..., None])
    zn = torch.cdist(q, k)  # |z_ij|
    den = (d.delta.abs()).clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    pair = math.sqrt(D) * u_c * w * zn * d.rho.norm(dim=-1)[..., None] / den  # (B, H, S_i, S_j)
    pair = torch.nan_to_num(pair, nan=0.0, posinf=0.0)
    r = pair.sum(-1)  # (B, H, S_i)
    dv = (pair * cot.norm(dim=-1)[..., None]).sum(-2)  # (B, H, S_j)
    r_keys = r if exclude is None else r.masked_fill(exclude, 0.0)
    return {"dv": dv, "dq": r * floor["dq"], "dlambda": r * floor["dlambda"],
            "dk": r_keys.flip(-1).cummax(-1).values.flip(-1) * floor["dk"]}


# ---- cause attribution: which over-budget gradient rows conditioning explains
CONDITIONING = 0.1  # kappa u_c at or above this: a row over budget is blamed on conditioning


def row_kappa(kappa: torch.Tensor, defined: torch.Tensor, name: str) -> torch.Tensor:
    """The condition number gradient row ``name`` answers to, (B, H, S).

    dq and dlambda row i: kappa_i. dk and dv row j: the largest kappa_i over the defined
    queries i >= j, the ones key j feeds (causality); a key fed only by well-conditioned
    queries is judged as well-conditioned, whatever an earlier query's kappa. An
    unmeasured kappa counts as infinite; undefined queries feed nothing.
    """
    k = torch.nan_to_num(kappa, nan=math.inf, posinf=math.inf).masked_fill(~defined, 0.0)
    if name in ("dq", "dlambda"):
        return k
    return k.flip(-1).cummax(-1).values.flip(-1)


def _worst_outside_conditioning(r: torch.Tensor, kap_rows: torch.Tensor, u_c: float) -> tuple:
    """(ratio, index) of the worst row of ``r`` whose kappa u_c stays below CONDITIONING."""
    plain = torch.nan_to_num(r.masked_fill(kap_rows * u_c >= CONDITIONING, 0.0), nan=math.inf, posinf=math.inf).flatten()
    k = int(torch.argmax(plain))
    return float(plain[k]), tuple(int(x) for x in torch.unravel_index(torch.tensor(k), r.shape))


def _conditioning_cause(worst_plain: tuple, kappa, defined, wname: str, widx: tuple, u_c: float) -> tuple:
    """("implementation" | "conditioning", message tail) for a failed backward check:
    conditioning only when every row over THRESHOLD answers to kappa u_c >= CONDITIONING."""
    ratio, name, idx = worst_plain
    if ratio > THRESHOLD:
        kap = float(row_kappa(kappa, defined, name)[idx])
        return "implementation", (f" ({name} row {idx} over budget, ratio {ratio:.3g}, where kappa "
                                  f"{kap:.2e} x u_c {u_c:.1e} < {CONDITIONING:g})")
    kap = float(row_kappa(kappa, defined, wname)[widx])
    fed = " over the queries that key feeds" if wname in ("dk", "dv") else ""
    return "conditioning", (f" (every row over budget has kappa u_c >= {CONDITIONING:g}; worst: kappa {kap:.2e}"
                            f"{fed} x u_c {u_c:.1e}: beyond the compute precision)")


def assert_backward_within_budget(verdict: Verdict, impl: Impl) -> None:
    """pytest helper: a backward verdict passes, or conditioning explains every row over
    budget: each such row's kappa (row_kappa, from the float64 kappas the verdict carries,
    not from the cause it states) reaches kappa u_c >= CONDITIONING. Anything else fails
    with the verdict's message."""
    __tracebackhide__ = True
    if verdict.passed:
        return
    if verdict.cause != "conditioning":
        raise AssertionError(verdict.message)
    kappa, defined = verdict.per_query["kappa"], verdict.per_query["defined"]
    for name in GRAD_NAMES:
        r = verdict.per_query.get(name)
        if r is None:
            continue
        bad = torch.nan_to_num(r, nan=math.inf, posinf=math.inf) > THRESHOLD
        bad &= row_kappa(kappa, defined, name) * impl.u < CONDITIONING
        if bool(bad.any()):
            idx = tuple(int(x) for x in bad.nonzero()[0])
            raise AssertionError(f"{name}: {int(bad.sum())} rows over budget where kappa u_c < {CONDITIONING:g} "
                                 f"(first {idx}, ratio {float(r[idx]):.3g}), yet the cause given is "
                                 f"conditioning\n{verdict.message}")


def check_backward(problem: Problem, impl: Impl, *, cot: torch.Tensor | None = None, dense: bool = True,
                   grads: dict | None = None, h: float = 1e-6) -> Verdict:
    """Gradients of ``impl`` against float64 autograd through the oracle, within budget.

    Per row (query for dq and dlambda, key for dk and dv):
        model = THRESH_GRAD ((u_c sqrt(S D) + tol) sens + (u_c sqrt(D) + tol) sens_solve
                             + u_out |g_ref| + u_c sqrt(S D) (max|g_ref| + floor))
    where floor = |g|_max |v|_max / rms(X) for X = q, k (|g|_max for v, / max(lambda, 1) for
    lambda) keeps a gradient that vanishes exactly from demanding an exact zero, plus
    the rounding of the normalised weights (_normalisation_terms), and for dlambda the
    forward solve's residual ||r_i|| (solve_residual) through ||d dlambda_i / d mu_i|| / sqrt(D)
    (rho_residual_dlambda; error-model.md §6).
        allowed = max(model, FA_FACTOR_GRAD * error of dense fp32 autograd)
    with sens the change of the float64 gradient under a unit relative perturbation of
    the inputs along a random sign pattern (central difference at step h), and
    sens_solve its largest change under random symmetric perturbations of Sigma_i of size
    ||Sigma_i||_F (the solves' rounding and stopping residual; one-sided difference).
    Rows beyond the compute precision (BEYOND_PRECISION) are held to no budget, only to
    being free of NaN (an overflow to Inf there is counted), and counted in the message
    and in summary["n_beyond_precision"].
    """
    case = problem.describe()
    if not impl.supports_grad:
        return Verdict("backward", impl.name, case, 0.0, True, "skipped",
                       f"[{impl.name}] backward skipped on {case}: {impl.skip_reason('grad') or 'no gradients'}")
    # the implementation runs on the problem it was given; the oracle, the budget and the
    # same-precision reference on what it computes from (kernel_view)
    given = problem
    problem = kernel_view(problem, impl)
    d = lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                            qk_scale=problem.qk_scale)
    defined = ~d.undefined
    cot = cotangent_for(problem) if cot is None else cot
    # the implementation receives the cotangent in its dtype: that rounding is input, not error
    cot = torch.where(defined[..., None], cot, torch.zeros_like(cot)).to(problem.q.dtype).to(torch.float64)
    ref = oracle_grads(problem, cot)
    # sensitivity of the gradient: central difference along x -> x (1 + t xi)
    gen = torch.Generator().manual_seed(7)
    base = [t.to(torch.float64) for t in (problem.q, problem.k, problem.v)] + [_lam_tensor(problem)]
    xi = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in base]
    def shifted(sign):
        q_, k_, v_, l_ = (t * (1 + sign * h * x) for t, x in zip(base, xi))
        return oracle_grads(problem, cot, q=q_, k=k_, v=v_, lam=l_)

    plus, minus = shifted(1.0), shifted(-1.0)
    # Rounding inside the solves (rho and the adjoint u) and the CG stopping residual act
    # like a perturbation of Sigma_i of size (u + tol) ||Sigma_i||, whatever lambda is, in
    # no particular direction. An isotropic ridge shift is one direction only, and the
    # gradients can be blind to it (cancelling terms in dlambda at kappa ~ 1e4 were); two
    # random symmetric directions, the larger response taken, are not.
    # The probe's step must stay in the linear regime, h_solve kappa_i << 1: at h = 1e-6 a
    # kappa 9e5 row's one-sided difference came out 13x its h -> 0 value (error-model.md §6)
    h_solve = solve_probe_step(d.kappa, defined, impl.u, h)
    solve_probes = [oracle_grads(problem, cot, sigma_probe=(h_solve, seed)) for seed in SOLVE_PROBE_SEEDS]
    try:
        got = grads or impl_grads(impl, given, cot)
    except NotImplementedError as exc:
        return Verdict("backward", impl.name, case, 0.0, True, "skipped", f"[{impl.name}] backward skipped: {exc}")
    dense_g = None
    if dense:
        dense_g = impl_grads(impl, problem, cot, forward=lambda *a, **kw: dense_torch_lla(
            *a, compute_dtype=impl.compute_dtype, **kw))
    u_c = impl.u
    out_dt = impl.output_dtype or problem.q.dtype
    u_out = unit_roundoff(out_dt) if out_dt != torch.float64 else U64
    S, D = problem.q.shape[-2], problem.q.shape[-1]
    root_n = math.sqrt(S * D)
    # A floor for gradients that vanish exactly (S = 1, or a zero cotangent row): dL/dX
    # has the units of |g| |v| / |X|, so rounding leaves about u that much behind.
    gv = cot.norm(dim=-1).amax(-1, keepdim=True) * problem.v.to(torch.float64).norm(dim=-1).amax(-1, keepdim=True)

    def rms(t):
        return t.to(torch.float64).pow(2).mean((-1, -2)).sqrt()[..., None].clamp_min(1e-30)

    floor = {"dq": gv / rms(problem.q), "dk": gv / rms(problem.k), "dv": cot.norm(dim=-1).amax(-1, keepdim=True),
             "dlambda": gv / _lam_tensor(problem).clamp_min(1.0)}
    kappa_q = torch.nan_to_num(d.kappa, nan=math.inf, posinf=math.inf)
    beyond_q = beyond_precision(d.kappa, defined, u_c)
    # key j feeds every query i >= j: its dk, dv rows carry any beyond query at or after j
    beyond_k = beyond_q.flip(-1).to(torch.int8).cummax(-1).values.flip(-1).bool()
    norm_terms = _normalisation_terms(problem, d, cot, u_c, floor, exclude=beyond_q)
    # the forward solve's residual, in the typical (isotropic) direction: the RMS of
    # <J_i, r_i> over directions of r_i is ||J_i|| ||r_i|| / sqrt(D) (error-model.md §6)
    rho_resid = None
    if got.get("dlambda") is not None:
        rho_resid = (torch.nan_to_num(rho_residual_dlambda(problem, cot), nan=0.0, posinf=0.0)
                     * torch.nan_to_num(solve_residual(d, impl), nan=0.0, posinf=0.0) / math.sqrt(D))
    lines, worst, worst_plain = [], (0.0, None, None), (0.0, None, None)
    per_query, nonfinite, n_unmeasured, n_overflow, scaled = {}, 0, 0, 0, []
    not_checked = [n for n in GRAD_NAMES if n not in impl.grads]
    for name in GRAD_NAMES:
        if name in not_checked:
            lines.append(f"  {name:8s} not checked: {impl.skip_reason(name) or 'not among the gradients the record names'}")
            continue
        g_ref = ref[name]
        g = got.get(name)
        if g is None:
            if name == "dlambda" and not impl.per_query_lambda:
                continue
            lines.append(f"  {name:8s} missing: the implementation returned no gradient")
            worst = max(worst, (math.inf, name, None), key=lambda w: w[0])
            continue
        diff = (g.to(torch.float64) - g_ref)
        err = _row_norm(diff, name)
        sens = _row_norm((plus[name] - minus[name]) / (2 * h), name)
        sens_solve = torch.stack([_row_norm((p[name] - g_ref) / h_solve, name) for p in solve_probes]).amax(0)
        ref_n = _row_norm(g_ref, name)
        # by causality a judged row depends on no beyond row: their (huge) gradients
        # set no scale for it
        rows = defined if name in ("dq", "dlambda") else torch.ones_like(defined)
        judged = rows & ~(beyond_q if name in ("dq", "dlambda") else beyond_k)
        # A float64 probe can itself fail (kappa 5e11 at S = 1 made the GPU's probe NaN):
        # such a row keeps the budget's other terms, the smaller budget, and is counted
        unmeasured = ~(torch.isfinite(sens) & torch.isfinite(sens_solve) & torch.isfinite(norm_terms[name]))
        n_unmeasured += int(unmeasured.sum())
        sens, sens_solve = torch.nan_to_num(sens, nan=0.0, posinf=0.0), torch.nan_to_num(sens_solve, nan=0.0, posinf=0.0)
        nterm = torch.nan_to_num(norm_terms[name], nan=0.0, posinf=0.0)
        conditioned = THRESH_GRAD * ((u_c * root_n + impl.solver_tol) * sens
                                     + (u_c * math.sqrt(D) + impl.solver_tol) * sens_solve)
        scale_max = ref_n.masked_fill(~judged, 0.0).amax(-1, keepdim=True)
        model = conditioned + THRESH_GRAD * (u_out * ref_n + u_c * root_n * (scale_max + floor[name]) + nterm)
        if name == "dlambda" and rho_resid is not None:
            model = model + THRESH_GRAD * rho_resid
        allowed = model
        if dense_g is not None and dense_g.get(name) is not None:
            dense_err = _row_norm(dense_g[name].to(torch.float64) - g_ref, name)
            allowed, scale = same_precision_allowed(model, dense_err, FA_FACTOR_GRAD, judged)
            if scale > 1.0:
                scaled.append(f"{name} x{scale:.3g}")
        g64 = g.to(torch.float64)
        fin, not_nan = torch.isfinite(g64), ~torch.isnan(g64)
        fin, not_nan = (fin, not_nan) if name == "dlambda" else (fin.all(-1), not_nan.all(-1))
        # A row beyond the compute precision may overflow (its true scale can exceed a
        # 16-bit gradient's range, and the implementation cannot resolve it): an Inf there
        # is counted, not failed. NaN fails everywhere.
        beyond_rows = rows & ~judged
        n_overflow += int((beyond_rows & ~fin & not_nan).sum())
        fin = torch.where(beyond_rows, not_nan, fin)
        r = torch.where(judged, err / allowed, torch.zeros_like(err))
        r = torch.where(rows & ~fin, torch.full_like(r, math.inf), r)
        nonfinite += int((rows & ~fin).sum())
        flat = torch.nan_to_num(r.flatten(), nan=math.inf, posinf=math.inf)
        k = int(torch.argmax(flat))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(k), r.shape))
        rel = float(diff.norm() / g_ref.norm().clamp_min(1e-300))
        lines.append(f"  {name:8s} ratio {float(flat[k]):9.3g}  rel err {rel:.2e}  worst row {idx}: "
                     f"error {float(err[idx]):.2e} vs allowed {float(allowed[idx]):.2e}")
        per_query[name] = r
        if float(flat[k]) > worst[0] or worst[1] is None:
            worst = (float(flat[k]), name, idx)
        plain = _worst_outside_conditioning(r, row_kappa(d.kappa, defined, name), u_c)
        if plain[0] > worst_plain[0]:
            worst_plain = (plain[0], name, plain[1])
    per_query["kappa"], per_query["defined"] = d.kappa, defined  # what conditioning is judged from
    ratio, wname, widx = worst
    passed = ratio <= THRESHOLD
    cause = "ok" if passed else ("non-finite" if nonfinite else "implementation")
    extra = ""
    # a NaN or Inf at lambda > 0 is the implementation's, however bad the conditioning
    if cause == "implementation" and widx is not None:
        cause, extra = _conditioning_cause(worst_plain, d.kappa, defined, wname, widx, u_c)
    n_judged = int((defined & ~beyond_q).sum())
    judged_txt = f" ({n_judged} of {int(defined.sum())} query rows judged)" if bool(beyond_q.any()) else ""
    checked_txt = f" ({', '.join(n for n in GRAD_NAMES if n not in not_checked)} only)" if not_checked else ""
    msg = (f"[{impl.name}] backward {'PASS' if passed else 'FAIL'} ratio {ratio:.3g}{checked_txt}{judged_txt} on {case}\n"
           + "\n".join(lines)
           + f"\n  worst: {wname} at {widx}; kappa max {float(torch.nan_to_num(d.kappa, posinf=1e300).max()):.3e}; "
           f"{int(d.undefined.sum())} undefined rows skipped"
           + (f"; {n_unmeasured} rows without a measurable float64 sensitivity (budget without that term)"
              if n_unmeasured else "")
           + (f"\n  {int(beyond_q.sum())} query rows and {int(beyond_k.sum())} key rows beyond the compute "
              f"precision (kappa u_c >= {BEYOND_PRECISION:g}, kappa up to {float(kappa_q[beyond_q].max()):.2e}): "
              "no budget applies, a NaN still fails" if bool(beyond_q.any()) else "")
           + (f"; {n_overflow} of those rows overflowed to Inf (counted, not failed)" if n_overflow else "")
           + (f"\n  model scaled by the same-precision reference ({', '.join(scaled)}: FA factor x its "
              "worst error / model on this problem)" if scaled else "")
           + f"\n  cause: {cause}{extra}"
           + rounding_note(given, impl))
    record("backward", impl.name, ratio, case)
    return Verdict("backward", impl.name, case, ratio, passed, cause, msg, widx, int(defined.sum()),
                   int(d.undefined.sum()), per_query, {"ratio": ratio, "cause": cause, "worst_tensor": wname,
                                                        "n_beyond_precision": int(beyond_q.sum()),
                                                        "grads_checked": [n for n in GRAD_NAMES if n not in not_checked],
                                                        "grads_not_checked": not_checked})
