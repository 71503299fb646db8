"""The forward budget (docs/error-model.md): what an output may be off by, per query.

Every comparison in lla-verify goes through here and reduces to one number,
ratio = max_i error_i / allowed_i, failing above 1 (THRESHOLD). For query i:

    model_i   = MODEL_SAFETY * ( u_c sqrt(n_i) sens_i           rounding in the compute precision
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
from dataclasses import dataclass

import torch
from torch.func import jvp

from lla_verify.registry.cases import DTYPE_NAMES, Problem
from lla_verify.registry.impls import Impl
from lla_verify.oracles.dense import dense_torch_lla
from lla_verify.registry.precision import unit_roundoff
from lla_verify.oracles.float64 import LLADetails, lla_forward, lla_forward_details
from lla_verify.budget.verdict import RANGE_RULE, THRESHOLD, Verdict, range_error, record, row_ratios


MODEL_SAFETY = 4.0  # safety factor on the first-order model (its terms are estimates, not bounds)
FA_FACTOR = 3.0  # kernel error may be this multiple of the same-precision dense error
N_DIRECTIONS = 2  # random sign directions for the sensitivity estimate
U64 = 2.0**-53
MP_RECHECK_WORK = 64 * 64 * 8  # S * S * D up to which the mpmath oracle re-checks a dispute

def lam_on_device(problem: Problem) -> torch.Tensor:
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
    lam = lam_on_device(problem).clone()
    gen = torch.Generator().manual_seed(seed)

    def f(q_, k_, v_, l_):
        return lla_forward(q_, k_, v_, ridge_lambda=l_, qk_scale=problem.qk_scale)

    tangents = []
    for _ in range(directions):
        xs = [torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1 for t in (q, k, v, lam)]
        tangents.append(tuple(x * t for x, t in zip(xs, (q, k, v, lam))))
    # every direction in one pass, stacked along a new first dimension (the oracle
    # computes each leading index apart: the same numbers as one pass per direction)
    n = directions
    primals = tuple(t.expand((n,) + tuple(t.shape)).clone() for t in (q, k, v, lam))
    _, do = jvp(f, primals, tuple(torch.stack(ts) for ts in zip(*tangents)))
    return do.norm(dim=-1).amax(0)


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
                   out_dtype: torch.dtype | None = None, rounded: bool = False,
                   directions: int = N_DIRECTIONS) -> ForwardBudget:
    """The allowed per-query error of ``impl`` on ``problem`` (module docstring).

    ``problem`` is the one the implementation was given; the budget is built on
    ``kernel_view(problem, impl)`` (pass ``rounded=True`` when it already is that view),
    and the output rounding is ``impl.output_dtype`` when the record names one.
    ``directions``: the random sign patterns of the sensitivity estimate (``sensitivity``).
    """
    if not rounded:
        problem = kernel_view(problem, impl)
    q = problem.q
    d = details or lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                       qk_scale=problem.qk_scale)
    u_c = impl.u
    out_dt = impl.output_dtype or out_dtype or q.dtype
    u_out = unit_roundoff(out_dt) if out_dt != torch.float64 else U64
    sens = sensitivity(problem, directions=directions)
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
    model = MODEL_SAFETY * sum(terms.values())
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
    err = range_error(o64, d.o, o.dtype).norm(dim=-1)
    ratio_q, finite, beyond = row_ratios(err, fb.allowed, o64, d.o, defined, o.dtype)
    n_def, n_undef = int(defined.sum()), int((~defined).sum())
    flat = ratio_q.flatten()
    worst_flat = int(torch.argmax(torch.nan_to_num(flat, nan=math.inf, posinf=math.inf)))
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst_flat), ratio_q.shape))
    ratio = float(flat[worst_flat])
    passed = ratio <= THRESHOLD
    lam = lam_on_device(problem)
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
        f"{t['floor']:.2e}, x{MODEL_SAFETY:g}{dense_txt})\n"
        f"  kappa(Sigma) {float(d.kappa[idx]):.3e}, delta/omega {float(d.delta[idx] / d.omega[idx]):.3e}, "
        f"lambda {float(lam[idx]):.3g}, scale {problem.qk_scale:.4g}, |o| {float(d.o[idx].norm()):.3g}; "
        f"{n_def} defined queries, {n_undef} undefined (lambda=0, delta=0) skipped\n"
        f"  cause: {cause}{extra}"
        f"{rounding_note(given, impl)}"
        + (f"\n  {int(beyond.sum())} rows beyond {o.dtype}'s range (exact output rounds to Inf there): "
           f"{RANGE_RULE}" if bool(beyond.any()) else "")
    )
    summary = {"ratio": ratio, "cause": cause, "kappa_worst": float(d.kappa[idx]),
               "kappa_max": float(torch.nan_to_num(d.kappa, posinf=1e300).max()),
               "err_max": float(torch.where(defined, err, torch.zeros_like(err)).max()),
               "nonfinite": int((defined & ~finite).sum()), "n_defined": n_def, "n_undefined": n_undef,
               "n_beyond_range": int(beyond.sum())}
    record("forward", impl.name, ratio, case)
    return Verdict("forward", impl.name, case, ratio, passed, "ok" if passed else cause, msg, idx, n_def, n_undef,
                   per_query, summary)


def _mp_recheck(problem: Problem, o64: torch.Tensor, idx, allowed: float):
    """Re-run the worst head in mpmath when small enough; return (error, ratio) or None."""
    B, H, S, D = problem.q.shape
    if S * S * D > MP_RECHECK_WORK:
        return None
    try:
        from lla_verify.oracles.mp import lla_forward_mp
    except ImportError:
        return None
    b, h, i = idx
    lam = lam_on_device(problem)[b:b + 1, h:h + 1, : i + 1]
    sl = lambda t: t[b:b + 1, h:h + 1, : i + 1]  # noqa: E731  causality: keys after i are irrelevant
    ref = lla_forward_mp(sl(problem.q), sl(problem.k), sl(problem.v), ridge_lambda=lam, qk_scale=problem.qk_scale)
    e = float((o64[b, h, i] - ref[0, 0, i]).norm())
    return e, e / allowed
