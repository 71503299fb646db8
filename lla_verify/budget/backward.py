"""The gradient budget (docs/error-model.md): dq, dk, dv and d lambda against float64
autograd through the oracle, each row judged against its own allowed error, and an
over-budget row attributed to conditioning only where kappa u_c says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lla_verify.registry.cases import Problem
from lla_verify.registry.impls import Impl
from lla_verify.oracles.dense import dense_torch_lla
from lla_verify.registry.precision import unit_roundoff
from lla_verify.oracles.float64 import (LLADetails, lla_forward, lla_forward_details, lla_forward_mu_shift,
                                        lla_forward_sigma_probe)
from lla_verify.budget.forward import U64, lam_on_device, kernel_view, rounding_note, same_precision_allowed
from lla_verify.budget.verdict import RANGE_RULE, THRESHOLD, Verdict, beyond_range, range_error, record


GRAD_SAFETY = 8.0  # gradients chain two solves (rho and the adjoint u): a wider factor, as JAX keeps
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
                 sigma_probe: tuple[float, int] | None = None, mu_shift: torch.Tensor | None = None) -> dict:
    """float64 autograd through the oracle: dq, dk, dv, dlambda of sum <cot, o>.

    sigma_probe=(h, seed): through ``lla_forward_sigma_probe`` instead (every Sigma_i
    perturbed by h ||Sigma_i||_2 E_i, E_i random symmetric of unit spectral norm).
    mu_shift (..., S, D): through ``lla_forward_mu_shift`` instead (rho_i solving
    Sigma_i rho_i = mu_i + shift_i: a forward solve that left the residual -shift_i).
    """
    q = (problem.q if q is None else q).to(torch.float64).detach().requires_grad_(True)
    k = (problem.k if k is None else k).to(torch.float64).detach().requires_grad_(True)
    v = (problem.v if v is None else v).to(torch.float64).detach().requires_grad_(True)
    lam = (lam_on_device(problem) if lam is None else lam).detach().clone().requires_grad_(True)
    if mu_shift is not None:
        o = lla_forward_mu_shift(q, k, v, ridge_lambda=lam, shift=mu_shift.to(torch.float64), qk_scale=problem.qk_scale)
    elif sigma_probe is None:
        o = lla_forward(q, k, v, ridge_lambda=lam, qk_scale=problem.qk_scale)
    else:
        o = lla_forward_sigma_probe(q, k, v, ridge_lambda=lam, qk_scale=problem.qk_scale,
                                    h=sigma_probe[0], seed=sigma_probe[1])
    cot = torch.where(torch.isnan(o), torch.zeros_like(cot), cot)
    gq, gk, gv, gl = torch.autograd.grad(torch.nan_to_num(o, nan=0.0), (q, k, v, lam), cot)
    return {"dq": gq, "dk": gk, "dv": gv, "dlambda": gl}


def _stacked_oracle_grads(problem: Problem, cot: torch.Tensor, inputs: list, sigma_probe=None,
                          mu_shifts: list | None = None) -> list:
    """``oracle_grads`` at several points in one batched pass: ``inputs`` a list of (q, k,
    v, lam) float64 tuples, stacked along a new first dimension (the oracle treats every
    leading index apart); sigma_probe=(h, seeds), one seed per point; mu_shifts, one
    shift per point. Returns one grads dict per point."""
    n = len(inputs)
    q, k, v, lam = (torch.stack(ts) for ts in zip(*inputs))
    probe = None if sigma_probe is None else (sigma_probe[0], tuple(sigma_probe[1]))
    shift = None if mu_shifts is None else torch.stack(mu_shifts)
    g = oracle_grads(problem, cot.expand((n,) + tuple(cot.shape)), q=q, k=k, v=v, lam=lam, sigma_probe=probe,
                     mu_shift=shift)
    return [{name: t[i] for name, t in g.items()} for i in range(n)]


@dataclass
class OraclePass:
    """One float64 pass over the oracle for check_backward: the details (detached), and the
    graph of o kept (through a zero mu_shift) for the reference gradients and the solve
    residual's double backward (reference_grads)."""
    details: LLADetails
    o: torch.Tensor
    leaves: tuple  # q, k, v, lambda, shift: float64 leaves that require grad


def oracle_pass(problem: Problem) -> OraclePass:
    """``lla_forward_details`` on ``problem`` with its output's graph kept: the one forward
    that lla_forward_details, oracle_grads and rho_residual_dlambda each ran on their own
    (the same function, hence the same numbers)."""
    q, k, v = (t.to(torch.float64).detach().requires_grad_(True) for t in (problem.q, problem.k, problem.v))
    lam = lam_on_device(problem).detach().clone().requires_grad_(True)
    shift = torch.zeros(q.shape, dtype=torch.float64, device=q.device, requires_grad=True)
    with torch.enable_grad():
        d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=problem.qk_scale, mu_shift=shift,
                                solver_sensitivity=False)
    o = d.o
    fields = {f: (getattr(d, f).detach() if isinstance(getattr(d, f), torch.Tensor) else getattr(d, f))
              for f in LLADetails.__dataclass_fields__}
    return OraclePass(LLADetails(**fields), o, (q, k, v, lam, shift))


def reference_grads(op: OraclePass, cot: torch.Tensor, *, dlambda_residual: bool) -> tuple:
    """(``oracle_grads(problem, cot)``, ``rho_residual_dlambda(problem, cot)`` or None when
    not asked) from the graph of ``op``, which is released."""
    q, k, v, lam, shift = op.leaves
    o = op.o
    cot = torch.where(torch.isnan(o), torch.zeros_like(cot), cot)
    gq, gk, gv, gl = torch.autograd.grad(torch.nan_to_num(o, nan=0.0), (q, k, v, lam), cot,
                                         create_graph=dlambda_residual)
    jac = None
    if dlambda_residual:
        (j,) = torch.autograd.grad(gl.sum(), shift, allow_unused=True)
        jac = torch.zeros(q.shape[:-1], dtype=torch.float64, device=q.device) if j is None else j.norm(dim=-1)
    op.o, op.leaves = None, ()
    return {"dq": gq.detach(), "dk": gk.detach(), "dv": gv.detach(), "dlambda": gl.detach()}, jac


def impl_grads(impl: Impl, problem: Problem, cot: torch.Tensor, forward=None) -> dict:
    """The implementation's gradients of sum <cot, o> (lambda as a (B, H, S) tensor)."""
    from lla_verify.trust import call_grads

    fwd = forward or impl.forward
    lam = lam_on_device(problem).to(torch.float32)
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


# the weight's relative error beyond the score's: the subtraction a_ij - m_i, the product
# by log2 e and the online rescalings (their arguments telescope to at most |a_ij - m_i|)
# round at u |a_ij - m_i| each, and the exponential itself is a few ulp off (error-model.md §8)
WEIGHT_ARG_ULPS = 4.0
WEIGHT_EXP_ULPS = 4.0


def weight_residual(q, k, d: LLADetails, impl: Impl) -> torch.Tensor:
    """The residual a solver's rho^_i has against the exact system because its weights
    were rounded, (B, H, S), in the units of solve_residual (error-model.md §8, "A
    solver's rho").

    An implementation forms w^_ij = w_ij (1 + eta_ij) up to a factor common to the row
    (which cancels in rho), so its Sigma^_i, mu^_i differ from the exact ones and

        mu_i - Sigma_i rho^_i = r^_i - sum_j w_ij eta_ij (f_ij z_ij - lambda_i rho_i),

    f_ij = 1 - <z_ij, rho_i>, r^_i its residual against its own system. |eta_ij| is the
    score's rounding, sqrt(D) u_c |s| |q_i| |k_j| (the D-long product), plus
    u_c (WEIGHT_ARG_ULPS |a_ij - m_i| + WEIGHT_EXP_ULPS) for the exponential; the
    etas of different keys are independent, so their typical sum is the root sum of
    squares of the terms (§3.1's model). rho_i is the float64 oracle's: first order.
    """
    q64, k64 = q.detach().to(torch.float64), k.detach().to(torch.float64)
    S, D = q64.shape[-2], q64.shape[-1]
    a = d.scale * (q64 @ k64.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q64.device).tril()
    w = torch.exp(a.masked_fill(~mask, -math.inf) - d.m[..., None])
    eta = impl.u * (math.sqrt(D) * abs(d.scale) * q64.norm(dim=-1)[..., :, None] * k64.norm(dim=-1)[..., None, :]
                    + WEIGHT_ARG_ULPS * (a - d.m[..., None]).abs() + WEIGHT_EXP_ULPS)
    rho = torch.nan_to_num(d.rho, nan=0.0, posinf=0.0, neginf=0.0)
    # |f z - lambda rho|^2 = f^2 |z|^2 - 2 lambda f <z, rho> + lambda^2 |rho|^2, all (S, S)
    zr = rho @ k64.transpose(-1, -2) - (q64 * rho).sum(-1)[..., None]  # <z_ij, rho_i>
    f = 1.0 - zr
    zz = torch.cdist(q64, k64, compute_mode="donot_use_mm_for_euclid_dist").square()
    lam = d.lam.to(torch.float64)[..., None]
    sq = f * f * zz - 2.0 * lam * f * zr + (lam * rho.square().sum(-1)[..., None]).mul(lam)
    term = (w * eta * sq.clamp_min(0.0).sqrt()).masked_fill(~mask, 0.0)
    return torch.nan_to_num(term.square().sum(-1).sqrt(), nan=0.0, posinf=0.0)


def rho_residual_dlambda(problem: Problem, cot: torch.Tensor) -> torch.Tensor:
    """||d dlambda_i / d r_i||_2 per query (B, H, S): how dlambda_i = omega_i <u_i, rho_i>
    moves per unit of residual r_i left in the forward solve for rho_i, when the backward
    uses that rho_i (error-model.md §6, "The forward solve's residual").

    dlambda_i depends on rho_i alone among the rho's, so one reverse pass through the
    float64 gradient (double backward) gives every row's vector at once.
    """
    q, k, v = (t.to(torch.float64).detach() for t in (problem.q, problem.k, problem.v))
    lam = lam_on_device(problem).detach().clone().requires_grad_(True)
    shift = torch.zeros(q.shape, dtype=torch.float64, device=q.device, requires_grad=True)
    o = lla_forward_mu_shift(q, k, v, ridge_lambda=lam, shift=shift, qk_scale=problem.qk_scale)
    cot = torch.where(torch.isnan(o), torch.zeros_like(cot), cot)
    (dl,) = torch.autograd.grad(torch.nan_to_num(o, nan=0.0), lam, cot, create_graph=True)
    (j,) = torch.autograd.grad(dl.sum(), shift, allow_unused=True)
    if j is None:  # no row's dlambda depends on its solve (every lambda_i's row undefined)
        return torch.zeros(q.shape[:-1], dtype=torch.float64, device=q.device)
    return j.norm(dim=-1)


# random residual directions drawn for the vector gradients' residual term: the mean of
# n draws of ||J s||^2 estimates its mean square; for a rank-one J (dq's response, which
# goes through one scalar per row) it is chi^2_n / n times the truth: at n = 8 above 0.21
# of it (0.46 of the root) with probability 0.99 (error-model.md §6)
RESIDUAL_SAMPLES = 8
RESIDUAL_SEED = 11


def rho_residual_rms(problem: Problem, cot: torch.Tensor, d: LLADetails, impl: Impl, ref: dict, names,
                     exclude: torch.Tensor) -> dict:
    """The root mean square change of each gradient row of ``names`` (dq, dk, dv) when every
    forward solve leaves a residual of the size the forward model allows, ||r_i|| =
    solve_residual, in a uniformly random direction, independently per query
    (error-model.md §6, "The forward solve's residual").

    A backward that takes the solver's rho_i as given computes exactly the gradient of the
    function whose solve has right-hand side mu_i - r_i, so row x moves by sum_i J_xi r_i
    (J_xi its Jacobian in the shift of query i) and the mean of ||.||^2 over the directions
    is sum_i ||J_xi||_F^2 ||r_i||^2 / D. Estimated from RESIDUAL_SAMPLES draws s_i = y_i
    ||r_i|| / sqrt(D), y_i standard normal (E ||s_i||^2 = ||r_i||^2): the gradients at
    each shift less the float64 ones, squared, averaged. Query rows in ``exclude`` (beyond
    the compute precision, undefined) are not shifted: they feed no judged row.
    """
    if not names:
        return {}
    D = problem.q.shape[-1]
    size = torch.nan_to_num(solve_residual(d, impl), nan=0.0, posinf=0.0).masked_fill(exclude, 0.0)
    gen = torch.Generator().manual_seed(RESIDUAL_SEED)
    shape = tuple(problem.q.shape)
    shifts = [(torch.randn(shape, generator=gen, dtype=torch.float64).to(problem.q.device)
               * (size / math.sqrt(D))[..., None]) for _ in range(RESIDUAL_SAMPLES)]
    base = tuple(t.to(torch.float64) for t in (problem.q, problem.k, problem.v)) + (lam_on_device(problem),)
    # two points per batched pass, as the other probes: the peak memory stays theirs
    acc = {name: torch.zeros_like(_row_norm(ref[name], name)) for name in names}
    for i in range(0, RESIDUAL_SAMPLES, 2):
        part = shifts[i:i + 2]
        for g in _stacked_oracle_grads(problem, cot, [base] * len(part), mu_shifts=part):
            for name in names:
                acc[name] += _row_norm(g[name] - ref[name], name).square()
    return {name: (t / RESIDUAL_SAMPLES).sqrt() for name, t in acc.items()}


def _row_norm(t: torch.Tensor, name: str) -> torch.Tensor:
    t = t.to(torch.float64)
    return t.abs() if name == "dlambda" else t.norm(dim=-1)


def normalisation_terms(problem: Problem, d: LLADetails, cot: torch.Tensor, u_c: float, floor: dict,
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


@dataclass
class GradBudget:
    """The allowed error of one gradient, per row (query for dq and dlambda, key for dk and dv)."""
    allowed: torch.Tensor
    model: torch.Tensor
    rows: torch.Tensor  # rows the gradient has: defined queries (dq, dlambda), every key (dk, dv)
    judged: torch.Tensor  # rows held to the budget: ``rows`` less those beyond the compute precision and ``unmeasured``
    unmeasured: torch.Tensor  # rows within the precision whose float64 sensitivity is not finite: no budget
    scale: float = 1.0  # the same-precision scale on the model (same_precision_allowed)

    @property
    def n_unmeasured(self) -> int:
        return int(self.unmeasured.sum())


@dataclass
class BackwardBudget:
    details: LLADetails
    ref: dict  # the float64 gradients
    grads: dict  # name -> GradBudget, for the gradients budgeted
    beyond_q: torch.Tensor  # query rows beyond the compute precision (beyond_precision)
    beyond_k: torch.Tensor  # key rows that feed such a query
    u_c: float
    u_out: float


def backward_budget(problem: Problem, impl: Impl, cot: torch.Tensor, names, *, details: LLADetails,
                    dense: bool = True, h: float = 1e-6, ref: dict | None = None,
                    rho_jac: torch.Tensor | None = None, residual_rms: bool = True) -> BackwardBudget:
    """The allowed per-row error of ``impl``'s gradients ``names`` on ``problem`` (the
    kernel's view of it: kernel_view), for the cotangent ``cot`` (float64, zero on
    undefined rows); the model is check_backward's. ``ref`` and ``rho_jac``: the float64
    gradients and ``rho_residual_dlambda`` when already computed (reference_grads).
    residual_rms=False leaves out dq, dk and dv's forward-residual term (rho_residual_rms),
    a budget no larger than the full one."""
    d = details
    defined = ~d.undefined
    ref = oracle_grads(problem, cot) if ref is None else ref
    # sensitivity of the gradient: central difference along x -> x (1 + t xi)
    gen = torch.Generator().manual_seed(7)
    base = [t.to(torch.float64) for t in (problem.q, problem.k, problem.v)] + [lam_on_device(problem)]
    xi = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in base]
    def shifted(sign):
        return tuple(t * (1 + sign * h * x) for t, x in zip(base, xi))

    # both points in one batched oracle pass (each leading index is computed apart)
    plus, minus = _stacked_oracle_grads(problem, cot, [shifted(1.0), shifted(-1.0)])
    # Rounding inside the solves (rho and the adjoint u) and the CG stopping residual act
    # like a perturbation of Sigma_i of size (u + tol) ||Sigma_i||, whatever lambda is, in
    # no particular direction. An isotropic ridge shift is one direction only, and the
    # gradients can be blind to it (cancelling terms in dlambda at kappa ~ 1e4 were); two
    # random symmetric directions, the larger response taken, are not.
    # The probe's step must stay in the linear regime, h_solve kappa_i << 1: at h = 1e-6 a
    # kappa 9e5 row's one-sided difference came out 13x its h -> 0 value (error-model.md §6)
    h_solve = solve_probe_step(d.kappa, defined, impl.u, h)
    solve_probes = _stacked_oracle_grads(problem, cot, [tuple(base)] * len(SOLVE_PROBE_SEEDS),
                                         sigma_probe=(h_solve, SOLVE_PROBE_SEEDS))
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
             "dlambda": gv / lam_on_device(problem).clamp_min(1.0)}
    beyond_q = beyond_precision(d.kappa, defined, u_c)
    # key j feeds every query i >= j: its dk, dv rows carry any beyond query at or after j
    beyond_k = beyond_q.flip(-1).to(torch.int8).cummax(-1).values.flip(-1).bool()
    norm_terms = normalisation_terms(problem, d, cot, u_c, floor, exclude=beyond_q)
    # the forward solve's residual, in the typical (isotropic) direction: the RMS of
    # <J_i, r_i> over directions of r_i is ||J_i|| ||r_i|| / sqrt(D) (error-model.md §6)
    rho_resid = None
    vec_resid = rho_residual_rms(problem, cot, d, impl, ref, [n for n in names if n != "dlambda" and residual_rms],
                                 beyond_q | ~defined)
    if "dlambda" in names:
        jac = rho_residual_dlambda(problem, cot) if rho_jac is None else rho_jac
        rho_resid = (torch.nan_to_num(jac, nan=0.0, posinf=0.0)
                     * torch.nan_to_num(solve_residual(d, impl), nan=0.0, posinf=0.0) / math.sqrt(D))
    grads = {}
    for name in names:
        g_ref = ref[name]
        sens = _row_norm((plus[name] - minus[name]) / (2 * h), name)
        sens_solve = torch.stack([_row_norm((p[name] - g_ref) / h_solve, name) for p in solve_probes]).amax(0)
        ref_n = _row_norm(g_ref, name)
        # by causality a judged row depends on no beyond row: their (huge) gradients
        # set no scale for it
        rows = defined if name in ("dq", "dlambda") else torch.ones_like(defined)
        judged = rows & ~(beyond_q if name in ("dq", "dlambda") else beyond_k)
        # A row whose own float64 probe is not finite has no budget: the terms left are a
        # smaller allowance than the model derives, not a bound (error-model.md §6, "Rows
        # without a measurable sensitivity"). It is held to finiteness only, and named.
        # (A judged row depends on judged queries alone, all solvable in float64 by kappa
        # u_c < 1; the oracle keeps other rows' failures out of its probes.)
        resid = vec_resid.get(name, torch.zeros_like(sens))
        unmeasured = judged & ~(torch.isfinite(sens) & torch.isfinite(sens_solve) & torch.isfinite(norm_terms[name])
                                & torch.isfinite(resid))
        # every row within the precision sets the gradient's scale, measured or not
        scale_max = torch.nan_to_num(ref_n, nan=0.0, posinf=0.0).masked_fill(~judged, 0.0).amax(-1, keepdim=True)
        judged = judged & ~unmeasured
        sens, sens_solve = torch.nan_to_num(sens, nan=0.0, posinf=0.0), torch.nan_to_num(sens_solve, nan=0.0, posinf=0.0)
        nterm = torch.nan_to_num(norm_terms[name], nan=0.0, posinf=0.0)
        conditioned = GRAD_SAFETY * ((u_c * root_n + impl.solver_tol) * sens
                                     + (u_c * math.sqrt(D) + impl.solver_tol) * sens_solve)
        model = conditioned + GRAD_SAFETY * (u_out * ref_n + u_c * root_n * (scale_max + floor[name]) + nterm)
        if name == "dlambda" and rho_resid is not None:
            model = model + GRAD_SAFETY * rho_resid
        else:
            model = model + GRAD_SAFETY * torch.nan_to_num(resid, nan=0.0, posinf=0.0)
        allowed, scale = model, 1.0
        if dense_g is not None and dense_g.get(name) is not None:
            dense_err = _row_norm(dense_g[name].to(torch.float64) - g_ref, name)
            allowed, scale = same_precision_allowed(model, dense_err, FA_FACTOR_GRAD, judged)
        grads[name] = GradBudget(allowed, model, rows, judged, unmeasured, scale)
    return BackwardBudget(d, ref, grads, beyond_q, beyond_k, u_c, u_out)


def check_backward(problem: Problem, impl: Impl, *, cot: torch.Tensor | None = None, dense: bool = True,
                   grads: dict | None = None, h: float = 1e-6) -> Verdict:
    """Gradients of ``impl`` against float64 autograd through the oracle, within budget.

    Per row (query for dq and dlambda, key for dk and dv; backward_budget):
        model = GRAD_SAFETY ((u_c sqrt(S D) + tol) sens + (u_c sqrt(D) + tol) sens_solve
                             + u_out |g_ref| + u_c sqrt(S D) (max|g_ref| + floor))
    where floor = |g|_max |v|_max / rms(X) for X = q, k (|g|_max for v, / max(lambda, 1) for
    lambda) keeps a gradient that vanishes exactly from demanding an exact zero, plus
    the rounding of the normalised weights (normalisation_terms), and the forward solve's
    residual ||r_i|| (solve_residual) in a random direction: for dlambda through
    ||d dlambda_i / d mu_i|| / sqrt(D) (rho_residual_dlambda), for dq, dk, dv its root mean
    square response (rho_residual_rms; error-model.md §6).
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
    op = oracle_pass(problem)
    d = op.details
    defined = ~d.undefined
    cot = cotangent_for(problem) if cot is None else cot
    # the implementation receives the cotangent in its dtype: that rounding is input, not error
    cot = torch.where(defined[..., None], cot, torch.zeros_like(cot)).to(problem.q.dtype).to(torch.float64)
    not_checked = [n for n in GRAD_NAMES if n not in impl.grads]
    # the float64 gradients from the details' own forward, its graph released before the
    # implementation runs
    ref, rho_jac = reference_grads(op, cot, dlambda_residual="dlambda" not in not_checked)
    try:
        got = grads or impl_grads(impl, given, cot)
    except NotImplementedError as exc:
        return Verdict("backward", impl.name, case, 0.0, True, "skipped", f"[{impl.name}] backward skipped: {exc}")
    returned = [n for n in GRAD_NAMES if n not in not_checked and got.get(n) is not None]
    # The forward residual's term for dq, dk, dv costs as much again as the rest of the
    # budget and only widens it: it is computed for a cell whose rows exceed the budget
    # without it. A verdict is the full budget's; a passing cell's ratios are against the
    # budget without the term, at least the full budget's ratios (error-model.md §6).
    bb = backward_budget(problem, impl, cot, returned, details=d, dense=dense, h=h, ref=ref, rho_jac=rho_jac,
                         residual_rms=False)
    errs = {n: _row_norm(range_error(got[n].to(torch.float64), bb.ref[n], got[n].dtype), n) for n in returned}

    def judged(bb):
        return {n: _row_ratios(got[n], errs[n], bb.grads[n], n, bb.ref[n]) for n in returned}

    ratios = judged(bb)
    if any(float(ratios[n][0].nan_to_num(nan=math.inf).max()) > THRESHOLD for n in returned if n != "dlambda"):
        bb = backward_budget(problem, impl, cot, returned, details=d, dense=dense, h=h, ref=ref, rho_jac=rho_jac)
        ratios = judged(bb)
    lines, worst, worst_plain = [], (0.0, None, None), (0.0, None, None)
    per_query, nonfinite, n_overflow, n_range = {}, 0, 0, {}
    for name in GRAD_NAMES:
        if name in not_checked:
            lines.append(f"  {name:8s} not checked: {impl.skip_reason(name) or 'not among the gradients the record names'}")
            continue
        if name not in returned:
            if name == "dlambda" and not impl.per_query_lambda:
                continue
            lines.append(f"  {name:8s} missing: the implementation returned no gradient")
            worst = max(worst, (math.inf, name, None), key=lambda w: w[0])
            continue
        gb = bb.grads[name]
        g_ref = bb.ref[name]
        diff = (got[name].to(torch.float64) - g_ref)
        err = errs[name]
        r, n_bad, n_over, n_rng = ratios[name]
        nonfinite += n_bad
        n_overflow += n_over
        if n_rng:
            n_range[name] = n_rng
        flat = torch.nan_to_num(r.flatten(), nan=math.inf, posinf=math.inf)
        k = int(torch.argmax(flat))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(k), r.shape))
        # an element that overflowed (rightly or not: the ratio says which) would make the
        # whole tensor's relative error Inf; it is reported over the finite elements
        fin_el = torch.isfinite(diff)
        rel = float(diff[fin_el].norm() / g_ref[fin_el].norm().clamp_min(1e-300))
        rel_txt = f"{rel:.2e}" + ("" if bool(fin_el.all()) else f" ({int((~fin_el).sum())} non-finite elements left out)")
        lines.append(f"  {name:8s} ratio {float(flat[k]):9.3g}  rel err {rel_txt}  worst row {idx}: "
                     f"error {float(err[idx]):.2e} vs allowed {float(gb.allowed[idx]):.2e}")
        per_query[name] = r
        if float(flat[k]) > worst[0] or worst[1] is None:
            worst = (float(flat[k]), name, idx)
        plain = _worst_outside_conditioning(r, row_kappa(d.kappa, defined, name), bb.u_c)
        if plain[0] > worst_plain[0]:
            worst_plain = (plain[0], name, plain[1])
    per_query["kappa"], per_query["defined"] = d.kappa, defined  # what conditioning is judged from
    ratio, wname, widx = worst
    passed = ratio <= THRESHOLD
    cause = "ok" if passed else ("non-finite" if nonfinite else "implementation")
    extra = ""
    # a NaN or Inf at lambda > 0 is the implementation's, however bad the conditioning
    if cause == "implementation" and widx is not None:
        cause, extra = _conditioning_cause(worst_plain, d.kappa, defined, wname, widx, bb.u_c)
    msg = _backward_message(impl, case, bb, lines, not_checked, ratio, passed, wname, widx, n_overflow,
                            cause + extra, rounding_note(given, impl), n_range)
    record("backward", impl.name, ratio, case)
    return Verdict("backward", impl.name, case, ratio, passed, cause, msg, widx, int(defined.sum()),
                   int(d.undefined.sum()), per_query, {"ratio": ratio, "cause": cause, "worst_tensor": wname,
                                                        "n_beyond_precision": int(bb.beyond_q.sum()),
                                                        "n_judged": int((defined & ~bb.beyond_q).sum()),
                                                        "n_unmeasured": sum(gb.n_unmeasured for gb in bb.grads.values()),
                                                        "grads_checked": [n for n in GRAD_NAMES if n not in not_checked],
                                                        "grads_not_checked": not_checked})


def _row_ratios(g: torch.Tensor, err: torch.Tensor, gb: GradBudget, name: str, ref: torch.Tensor) -> tuple:
    """(error / allowed per row, rows with a non-finite gradient that fail, rows beyond the
    compute precision that overflowed to Inf, rows whose exact gradient is beyond the
    gradient dtype's range): a judged row's ratio, 0 elsewhere, and inf for a failing
    non-finite row."""
    g64 = g.to(torch.float64)
    fin, not_nan = torch.isfinite(g64), ~torch.isnan(g64)
    fin, not_nan = (fin, not_nan) if name == "dlambda" else (fin.all(-1), not_nan.all(-1))
    # A row beyond the compute precision may overflow (its true scale can exceed a
    # 16-bit gradient's range, and the implementation cannot resolve it): an Inf there
    # is counted, not failed. NaN fails everywhere, Inf on an unmeasured row too.
    beyond_rows = gb.rows & ~gb.judged & ~gb.unmeasured
    n_overflow = int((beyond_rows & ~fin & not_nan).sum())
    fin = torch.where(beyond_rows, not_nan, fin)
    # An overflow is the right answer where the exact gradient is beyond the gradient
    # dtype's range (fp16's 65504 is reached by well-posed problems with small lambda), and
    # an admissible one where the budget reaches past the range (an ill-conditioned row):
    # ``err`` measures it as verdict.range_error does, and a judged row with an Inf passes
    # when that error is within its budget, as the forward's rows do (verdict.row_ratios).
    r = torch.where(gb.judged, err / gb.allowed, torch.zeros_like(err))
    fin = fin | (gb.judged & not_nan & (r <= THRESHOLD))
    ex = ref[..., None] if name == "dlambda" else ref
    out_of_range = gb.rows & beyond_range(ex, g.dtype)  # none for a dtype without Inf or float64
    r = torch.where(gb.rows & ~fin, torch.full_like(r, math.inf), r)
    return r, int((gb.rows & ~fin).sum()), n_overflow, int(out_of_range.sum())


def _backward_message(impl: Impl, case: str, bb: BackwardBudget, lines: list, not_checked: list, ratio: float,
                      passed: bool, wname, widx, n_overflow: int, cause_txt: str, note: str,
                      n_range: dict | None = None) -> str:
    d, beyond_q, beyond_k = bb.details, bb.beyond_q, bb.beyond_k
    defined = ~d.undefined
    kappa_q = torch.nan_to_num(d.kappa, nan=math.inf, posinf=math.inf)
    n_unmeasured = sum(gb.n_unmeasured for gb in bb.grads.values())
    scaled = [f"{name} x{gb.scale:.3g}" for name, gb in bb.grads.items() if gb.scale > 1.0]
    n_judged = int((defined & ~beyond_q).sum())
    judged_txt = f" ({n_judged} of {int(defined.sum())} query rows judged)" if bool(beyond_q.any()) else ""
    checked_txt = f" ({', '.join(n for n in GRAD_NAMES if n not in not_checked)} only)" if not_checked else ""
    return (f"[{impl.name}] backward {'PASS' if passed else 'FAIL'} ratio {ratio:.3g}{checked_txt}{judged_txt} on {case}\n"
            + "\n".join(lines)
            + f"\n  worst: {wname} at {widx}; kappa max {float(torch.nan_to_num(d.kappa, posinf=1e300).max()):.3e}; "
            f"{int(d.undefined.sum())} undefined rows skipped"
            + (f"\n  {n_unmeasured} rows within the compute precision without a measurable float64 sensitivity "
               f"({', '.join(f'{n} {gb.n_unmeasured}' for n, gb in bb.grads.items() if gb.n_unmeasured)}): "
               "no budget derives without it, not judged; a NaN or Inf still fails" if n_unmeasured else "")
            + (f"\n  {int(beyond_q.sum())} query rows and {int(beyond_k.sum())} key rows beyond the compute "
               f"precision (kappa u_c >= {BEYOND_PRECISION:g}, kappa up to {float(kappa_q[beyond_q].max()):.2e}): "
               "no budget applies, a NaN still fails" if bool(beyond_q.any()) else "")
            + (f"; {n_overflow} of those rows overflowed to Inf (counted, not failed)" if n_overflow else "")
            + (f"\n  rows whose exact gradient exceeds the gradient dtype's range "
               f"({', '.join(f'{n} {c}' for n, c in n_range.items())}): "
               f"{RANGE_RULE}" if n_range else "")
            + (f"\n  model scaled by the same-precision reference ({', '.join(scaled)}: FA factor x its "
               "worst error / model on this problem)" if scaled else "")
            + f"\n  cause: {cause_txt}"
            + note)
