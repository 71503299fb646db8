"""The Parallax forward budget (docs/error-model.md, "Parallax"): the same model as LLA's
forward budget without the solve.

Parallax has no inner solve, so of budget/forward.py's terms three remain. For query i:

    model_i   = MODEL_SAFETY * ( u_c sqrt(n_i) sens_i     rounding in the compute precision
                               + u_out ||o_i||            rounding of the output
                               + u_c sqrt(n_i) vscale )   floor for outputs near zero
    allowed_i = max(model_i max(1, FA_FACTOR c), FA_FACTOR * dense_err_i)

sens_i is the first-order change of o_i under componentwise relative perturbations of q,
k, v and r along random sign patterns (Jacobian-vector products of the float64 oracle):
the conditioning of this operator, large where |r_i| amplifies the covariance term;
dense_err_i is the error of the plain centred computation in the compute precision on
the same inputs (oracles.parallax.parallax_dense), FlashAttention's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import jvp

from lla_verify.budget.forward import FA_FACTOR, MODEL_SAFETY, N_DIRECTIONS, U64, same_precision_allowed
from lla_verify.budget.verdict import RANGE_RULE, THRESHOLD, Verdict, range_error, record, row_ratios
from lla_verify.oracles.extremes import spectral_norm
from lla_verify.oracles.parallax import parallax_dense, parallax_forward
from lla_verify.registry.precision import unit_roundoff


@dataclass
class ParallaxBudget:
    o: torch.Tensor  # float64 oracle output (..., S, Dv)
    sens: torch.Tensor  # (..., S)
    terms: dict
    model: torch.Tensor
    dense_err: torch.Tensor | None
    allowed: torch.Tensor
    model_scale: float


def _random_signs(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t)


def _largest_rows(directional, tangents) -> tuple:
    """For each output of ``directional`` (a map from a tangent to a tuple of tensors: a
    derivative along it), the largest row norm over the tangents in ``tangents``, per row
    (the last dimension is the row's). The sensitivity estimates of this module are all of
    this form: a derivative along sign patterns, the largest one kept."""
    best = None
    for t in tangents:
        norms = tuple(o.norm(dim=-1) for o in directional(t))
        best = norms if best is None else tuple(torch.maximum(b, n) for b, n in zip(best, norms))
    return best


def parallax_sensitivity(q, k, v, r, *, qk_scale=None, directions: int = N_DIRECTIONS,
                         seed: int = 0) -> torch.Tensor:
    """max over random sign directions xi of ||J_o(x)[x * xi]||_2 per query, (..., S)."""
    xs64 = tuple(t.detach().to(torch.float64) for t in (q, k, v, r))
    gen = torch.Generator().manual_seed(seed)

    def f(*a):
        return parallax_forward(*a, qk_scale=qk_scale)

    def tangents():
        for _ in range(directions):
            yield tuple(_random_signs(t, gen) * t for t in xs64)

    return _largest_rows(lambda t: (jvp(f, xs64, t)[1],), tangents())[0]


def parallax_budget(q, k, v, r, *, qk_scale=None, compute_dtype=torch.float32,
                    out_dtype: torch.dtype | None = None, dense: bool = True,
                    directions: int = N_DIRECTIONS) -> ParallaxBudget:
    """The allowed per-query error of an implementation computing in ``compute_dtype``.

    ``directions``: random sign patterns of the sensitivity estimate (a max over them, so
    more can only raise it). Two can miss a row whose sensitivity sits in few components:
    under a large common key offset a key's relative perturbation cancels in k_j - kbar_i
    whenever the signs of the keys agree (both of a two-key row's patterns did, estimating
    1.5 against ||J diag(x)||_F = 28)."""
    o64 = parallax_forward(q, k, v, r, qk_scale=qk_scale)
    u_c = unit_roundoff(compute_dtype) if compute_dtype != torch.float64 else U64
    out_dt = out_dtype or q.dtype
    u_out = unit_roundoff(out_dt) if out_dt != torch.float64 else U64
    S, D = q.shape[-2], q.shape[-1]
    root_n = (torch.arange(1, S + 1, dtype=torch.float64, device=q.device) * D).sqrt()
    sens = parallax_sensitivity(q, k, v, r, qk_scale=qk_scale, directions=directions)
    vscale = v.to(torch.float64).norm(dim=-1).amax(-1, keepdim=True)
    terms = {"rounding": u_c * root_n * sens, "output": u_out * o64.norm(dim=-1), "floor": u_c * root_n * vscale}
    model = MODEL_SAFETY * sum(terms.values())
    dense_err, allowed, scale = None, model, 1.0
    if dense:
        o_dense = parallax_dense(q, k, v, r, qk_scale=qk_scale, compute_dtype=compute_dtype)
        dense_err = (o_dense.to(torch.float64) - o64).norm(dim=-1)
        allowed, scale = same_precision_allowed(model, dense_err, FA_FACTOR, torch.ones_like(model, dtype=torch.bool))
    return ParallaxBudget(o64, sens, terms, model, dense_err, allowed, scale)


def check_parallax_forward(q, k, v, r, o, *, impl: str, case: str, qk_scale=None,
                           compute_dtype=torch.float32, dense: bool = True,
                           pb: ParallaxBudget | None = None) -> Verdict:
    """Compare an implementation's Parallax output ``o`` with the float64 oracle within budget."""
    expected = tuple(v.shape)
    if tuple(o.shape) != expected:
        return Verdict("parallax-forward", impl, case, math.inf, False, "implementation",
                       f"[{impl}] parallax forward on {case}: output shape {tuple(o.shape)} != expected {expected}")
    pb = pb or parallax_budget(q, k, v, r, qk_scale=qk_scale, compute_dtype=compute_dtype, out_dtype=o.dtype,
                               dense=dense)
    judged = torch.ones(pb.allowed.shape, dtype=torch.bool, device=pb.allowed.device)
    return _parallax_verdict("parallax-forward", "parallax forward", impl, case, r, o.detach().to(torch.float64),
                             judged, pb, o.dtype)


def check_parallax_decode(q, k, v, r, o, *, impl: str, case: str, qk_scale=None, compute_dtype=torch.float32,
                          lengths: torch.Tensor | None = None, pb: ParallaxBudget | None = None) -> Verdict:
    """A Parallax decode judged by the forward's rule: decoding position t of a problem
    (B, H, S, D) is row t of its causal forward, so each decoded output is compared with
    the float64 forward's row t within that row's forward budget (parallax_budget).

    ``o`` holds either every position, (B, H, S, Dv) (lla_verify.testing.decode.every_position
    lays a problem out that way), or, with ``lengths`` (B,), one output per sequence,
    (B, H, Dv), sequence b decoded at position lengths[b] - 1 of the problem. Rows not
    decoded are not judged.
    """
    B, H, S = tuple(q.shape[:-1])
    Dv = v.shape[-1]
    if lengths is None:
        expected = (B, H, S, Dv)
    else:
        lengths = torch.as_tensor(lengths)
        if tuple(lengths.shape) != (B,) or bool(((lengths < 1) | (lengths > S)).any()):
            raise ValueError(f"lengths: expected {B} integers in [1, {S}], got {lengths.tolist()}")
        expected = (B, H, Dv)
    if tuple(o.shape) != expected:
        return Verdict("parallax-decode", impl, case, math.inf, False, "implementation",
                       f"[{impl}] parallax decode on {case}: output shape {tuple(o.shape)} != expected {expected}")
    pb = pb or parallax_budget(q, k, v, r, qk_scale=qk_scale, compute_dtype=compute_dtype, out_dtype=o.dtype)
    o64 = o.detach().to(torch.float64)
    if lengths is None:
        judged = torch.ones((B, H, S), dtype=torch.bool, device=pb.o.device)
        what = "parallax decode, every position against the forward's row:"
    else:
        b, t = torch.arange(B, device=pb.o.device), lengths.to(pb.o.device).long() - 1
        full = pb.o.clone()  # rows not decoded: the oracle's own, error 0, not judged
        full[b, :, t] = o64.to(full.device)
        judged = torch.zeros((B, H, S), dtype=torch.bool, device=pb.o.device)
        judged[b, :, t] = True
        o64 = full
        what = "parallax decode, sequence b at position lengths[b] - 1 against the forward's row:"
    return _parallax_verdict("parallax-decode", what, impl, case, r, o64, judged, pb, o.dtype)


def _parallax_verdict(check: str, what: str, impl: str, case: str, r, o64, judged, pb: ParallaxBudget,
                      out_dtype) -> Verdict:
    """The verdict of output rows ``o64`` (float64, the oracle's shape) against ``pb`` on the
    rows ``judged``; the worst judged row's terms in the message."""
    err = torch.where(judged, range_error(o64, pb.o, out_dtype).norm(dim=-1), torch.zeros_like(pb.allowed))
    ratio_q, finite, beyond = row_ratios(err, pb.allowed, o64, pb.o, judged, out_dtype)
    finite = finite | ~judged
    flat = torch.nan_to_num(ratio_q.flatten(), nan=math.inf, posinf=math.inf)
    worst = int(torch.argmax(flat))
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), ratio_q.shape))
    ratio = float(flat[worst])
    passed = ratio <= THRESHOLD
    cause = "ok" if passed else ("non-finite" if not bool(finite[idx]) else "implementation")
    t = {key: float(val[idx]) for key, val in pb.terms.items()}
    dense_txt = f", dense error {float(pb.dense_err[idx]):.3e}" if pb.dense_err is not None else ""
    if pb.model_scale > 1.0:
        dense_txt += f"; model x{pb.model_scale:.3g} (FA factor x the reference's worst error / model)"
    where = ", ".join(f"{n}={i}" for n, i in zip("bhi" if len(idx) == 3 else "x" * len(idx), idx))
    msg = (f"[{impl}] {what} {'PASS' if passed else 'FAIL'} ratio {ratio:.3g} on {case}\n"
           f"  worst query ({where}): error {float(err[idx]):.3e} vs allowed {float(pb.allowed[idx]):.3e} "
           f"(model: rounding {t['rounding']:.2e} + output {t['output']:.2e} + floor {t['floor']:.2e}, "
           f"x{MODEL_SAFETY:g}{dense_txt})\n"
           f"  sensitivity {float(pb.sens[idx]):.3e}, |r| {float(r[idx].double().norm()):.3g}, "
           f"|o| {float(pb.o[idx].norm()):.3g}\n  cause: {cause}"
           + (f"\n  {int(beyond.sum())} rows beyond {out_dtype}'s range (exact output rounds to Inf there): "
              f"{RANGE_RULE}" if bool(beyond.any()) else ""))
    record(check, impl, ratio, case)
    per_query = {"err": err, "allowed": pb.allowed, "ratio": ratio_q, "model": pb.model, "judged": judged}
    summary = {"ratio": ratio, "cause": cause, "err_max": float(torch.nan_to_num(err, nan=math.inf).max()),
               "nonfinite": int((~finite).sum()), "n_beyond_range": int(beyond.sum())}
    return Verdict(check, impl, case, ratio, passed, cause, msg, idx, int(judged.sum()), 0, per_query, summary)


# ----------------------------------------------------------------------------- issue 22's kernel target
KERNEL_TARGET_FACTOR = 4.0  # a kernel's error may be this multiple of the dense fp32 computation's
TARGET_ULPS = 2.0  # or this many ulp of the output
TARGET_ORDERINGS = 9  # evaluations of the dense computation whose median is its error (odd: a true median)


def coordinate_orderings(D: int, Dv: int, orderings: int = TARGET_ORDERINGS, *, seed: int = 0,
                         device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``orderings`` pairs (pk, pv): a permutation of the D coordinates of q, k and r
    (together) and one of the Dv coordinates of v. The first pair is the identity, the
    others are drawn from ``seed``; the forward's target and the backward budget use the
    same ones."""
    if isinstance(orderings, bool) or not isinstance(orderings, int) or orderings < 1:
        raise ValueError(f"orderings: expected an int >= 1, got {orderings!r}")
    gen = torch.Generator().manual_seed(seed)
    perms = []
    for n in range(orderings):
        pk = torch.arange(D) if n == 0 else torch.randperm(D, generator=gen)
        pv = torch.arange(Dv) if n == 0 else torch.randperm(Dv, generator=gen)
        perms.append((pk.to(device), pv.to(device)))
    return perms



def dense_error_over_orderings(q, k, v, r, *, qk_scale=None, compute_dtype=torch.float32,
                               orderings: int = TARGET_ORDERINGS, seed: int = 0,
                               o64: torch.Tensor | None = None) -> torch.Tensor:
    """The dense centred computation's error per query, (..., S): the median over
    ``orderings`` evaluations on the same problem with its coordinates reordered.

    Permuting the D coordinates of q, k and r together, and the Dv coordinates of v, is
    an exact symmetry of the operator (o comes out permuted the same way, its norm
    unchanged) but changes every summation order in the dense computation, so each
    ordering draws a fresh rounding error of the same computation on the same problem.
    One ordering is one draw: on a case with a single covariance row (S = 2) that draw
    ranged from 1.2e-7 to 4.2e-6 over 40 orderings (docs/kernels-parallax.md, "The
    same-precision target"), so a target of 4x one draw is a lottery. The median is the
    computation's typical error there; the first ordering is the identity.
    """
    perms = coordinate_orderings(q.shape[-1], v.shape[-1], orderings, seed=seed, device=q.device)
    o64 = parallax_forward(q, k, v, r, qk_scale=qk_scale) if o64 is None else o64
    errs = []
    for pk, pv in perms:
        o = parallax_dense(q[..., pk], k[..., pk], v[..., pv], r[..., pk], qk_scale=qk_scale,
                           compute_dtype=compute_dtype)
        errs.append((o.to(torch.float64) - o64[..., pv]).norm(dim=-1))
    return torch.stack(errs).median(0).values


def kernel_target(q, k, v, r, *, qk_scale=None, compute_dtype=torch.float32, out_dtype=None,
                  o64: torch.Tensor | None = None, orderings: int = TARGET_ORDERINGS):
    """Issue 22's accuracy target for a Parallax kernel, per query (..., S):
    max(KERNEL_TARGET_FACTOR x the dense computation's worst error over the queries,
    TARGET_ULPS ulp of |o_i| in the output dtype), the dense error taken as
    dense_error_over_orderings. Returns (allowed, dense_err)."""
    o64 = parallax_forward(q, k, v, r, qk_scale=qk_scale) if o64 is None else o64
    dense_err = dense_error_over_orderings(q, k, v, r, qk_scale=qk_scale, compute_dtype=compute_dtype,
                                           orderings=orderings, o64=o64)
    out_dt = out_dtype or q.dtype
    u_out = unit_roundoff(out_dt) if out_dt != torch.float64 else U64
    # one ulp of a value in [2^e, 2^(e+1)) is 2 u 2^e <= 2 u |x|
    ulps = TARGET_ULPS * 2.0 * u_out * o64.norm(dim=-1)
    return torch.maximum(KERNEL_TARGET_FACTOR * dense_err.max(), ulps), dense_err


# ----------------------------------------------------------------------------- reduction with a solved rho
@dataclass
class RhoProbeBudget:
    """The reduction to LLA at a solver's rho (docs/error-model.md §8, "A solver's rho")."""

    probe: torch.Tensor  # (..., S, D) float64: r^_i = rho^_i / (1 - <mubar_i, rho^_i>); 0 on rows not judged
    lla: torch.Tensor  # (..., S, Dv) float64 LLA oracle output
    allowed: torch.Tensor  # (..., S): ||K_i|| R_i / (1 - |rho_i| R_i / |t_i|), the bound on
    #                        |Parallax_f64(r^_i) - LLA_i| from rho^'s error; inf where not judged
    judged: torch.Tensor  # (..., S) bool: LLA defined and the allowed residual cannot flip t_i
    residual: torch.Tensor  # (..., S): R_i, the allowed ||mubar_i - Sigbar_i rho^_i||
    # the float64 LLA oracle's details on (q, k, v, lambda) as given, solver sensitivity
    # included: forward_budget(details=...) of the same problem takes them as they are
    details: object = None


def _normalised_moments(q, k, v, lam, scale, chunk_bytes):
    """Per query, float64 and centred: Sigbar_i = Sigma_i / omega_i (D x D) and the
    Parallax covariance C_i (Dv x D), from the softmax weights p_ij."""
    from lla_verify.oracles.float64 import DEFAULT_CHUNK_BYTES, causal_scores, chunk_size, flatten_leading

    lead = tuple(q.shape[:-2])
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    qf, kf, vf = (flatten_leading(t.to(torch.float64), 2) for t in (q, k, v))
    lf = lam.to(torch.float64).reshape(-1, S)
    step = max(1, chunk_size(S, D, Dv + D, chunk_bytes or DEFAULT_CHUNK_BYTES) // 2)
    sig, cov = [], []
    eye = torch.eye(D, dtype=torch.float64, device=q.device)
    for i0 in range(0, S, step):
        i1 = min(S, i0 + step)
        qc = qf[:, i0:i1]
        a, mask = causal_scores(qc, kf, scale, i0, i1)
        p = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=-1)
        z = kf[:, None, :i1, :] - qc[:, :, None, :]  # k_j - q_i: a common offset cancels here
        zbar = (p[..., None] * z).sum(-2)  # mubar_i = kbar_i - q_i
        zc = z - zbar[:, :, None, :]  # k_j - kbar_i
        vj = vf[:, None, :i1, :]
        vc = vj - (p[..., None] * vj).sum(-2)[:, :, None, :]  # v_j - nu_i
        pz = p[..., None] * zc
        sig.append(pz.transpose(-1, -2) @ zc + zbar[..., :, None] * zbar[..., None, :]
                   + lf[:, i0:i1, None, None] * eye)
        cov.append(vc.transpose(-1, -2) @ pz)
    return (torch.cat(sig, 1).reshape(*lead, S, D, D), torch.cat(cov, 1).reshape(*lead, S, Dv, D))


def rho_probe_budget(q, k, v, rho, *, ridge_lambda, qk_scale=None, impl,
                     chunk_bytes: int | None = None) -> RhoProbeBudget:
    """How far Parallax at the probe built from a solver's rho^ may be from LLA.

    rho^ (..., S, D) solves Sigma_i rho_i = mu_i with a true residual the forward model
    allows the LLA implementation ``impl`` (its Impl record: solver_tol, compute precision):
    budget.backward.solve_residual, (tol + u_c attainable_i) ||mu_i||, against the system
    it formed, plus budget.backward.weight_residual, that system's distance from the exact
    one through the rounding of its weights, times MODEL_SAFETY. The probe
    r^_i = rho^_i / t^_i, t^_i = 1 - <mubar_i, rho^_i>, is formed
    in float64 with the oracle's mubar_i = mu_i / omega_i. For any rho, LLA's output
    formula equals nu_i - C_i rho / (1 - <mubar_i, rho>), so with Delta = rho^ - rho =
    -Sigbar^-1 res (Sigbar = Sigma / omega, res the normalised residual), exactly

        Parallax(r^_i) - LLA_i = -C_i (r^_i - r_i) = (t_i / t^_i) K_i res_i,
        K_i = C_i (Sigbar_i^-1 + r_i rho_i^T) / t_i,
        |t^_i - t_i| = |<mubar_i, Delta>| = |<rho_i, res_i>| <= |rho_i| |res_i|

    so |error_i| <= ||K_i||_2 R_i / (1 - |rho_i| R_i / |t_i|) with R_i the allowed
    normalised residual. Rows where that denominator is not positive (the allowed
    residual could flip the sign of t_i: no digit of the probe is promised) and rows
    the LLA oracle leaves undefined are not judged. The float64 oracles' own errors
    are added by the caller.
    """
    from lla_verify.budget.backward import solve_residual, weight_residual
    from lla_verify.oracles.float64 import lla_forward_details

    from lla_contract import check_lambda, check_scale

    if tuple(rho.shape) != tuple(q.shape):
        raise ValueError(f"rho: expected the shape of q {tuple(q.shape)}, got {tuple(rho.shape)}")
    scale = check_scale(qk_scale, q.shape[-1])
    lead = tuple(q.shape[:-1])
    lam = check_lambda(ridge_lambda, lead, q.device)
    d = lla_forward_details(q, k, v, ridge_lambda=ridge_lambda, qk_scale=scale)
    rho_hat = rho.detach().to(torch.float64)
    mubar = d.mu / d.omega[..., None]
    probe = rho_hat / (1.0 - (mubar * rho_hat).sum(-1))[..., None]

    # the residual allowed in units of ||mu_i||, carried to the normalised system: the
    # solve's against its own system, and its system's distance from the exact one (the
    # weights' rounding)
    allowed_res = solve_residual(d, impl) + weight_residual(q, k, d, impl)
    R = MODEL_SAFETY * allowed_res / d.mu.norm(dim=-1) * mubar.norm(dim=-1)
    sigbar, cov = _normalised_moments(q, k, v, lam, scale, chunk_bytes)
    t = 1.0 - (mubar * d.rho).sum(-1)
    defined = ~d.undefined & torch.isfinite(t) & (t != 0) & torch.isfinite(R)
    # rows left out are given finite stand-ins (identity Sigbar, rho = 0, t = 1) so the
    # batched inverse and norm run; they are not judged
    t = torch.where(defined, t, 1.0)
    rho64 = torch.where(defined[..., None], d.rho, 0.0)
    r = rho64 / t[..., None]
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    inv = torch.linalg.inv(torch.where(defined[..., None, None], sigbar, eye))
    cov = torch.where(defined[..., None, None], cov, 0.0)
    K = cov @ (inv + r[..., :, None] * rho64[..., None, :]) / t[..., None, None]
    knorm = spectral_norm(K)
    margin = 1.0 - rho64.norm(dim=-1) * R / t.abs()
    judged = defined & (margin > 0)
    allowed = torch.where(judged, knorm * R / torch.where(judged, margin, 1.0), torch.full_like(R, math.inf))
    # a row not judged may have t^_i = 0: its probe is set to 0, so that every row evaluates
    probe = torch.where(judged[..., None], probe, 0.0)
    return RhoProbeBudget(probe, d.o, allowed, judged, R, d)



# ----------------------------------------------------------------------------- backward
GRAD_NAMES = ("dq", "dk", "dv", "dr")
BWD_FACTOR = 4.0  # an implementation's gradient error may be this multiple of the dense reference's
BWD_ULPS = 2.0  # floor: this many units of roundoff (see parallax_backward_budget)
# the dense reference's error per row: the median over this many coordinate orderings, the
# forward target's nine first (docs/error-model.md §8 says why nine are too few here)
BWD_ORDERINGS = 21
# orderings differentiated in one call while autograd's saved tensors stay under this (an
# estimate): stacking saves kernel launches on small problems; on large ones a call per
# ordering keeps the peak memory of one evaluation and, on the CPU, runs faster
DENSE_GRAD_CALL_BYTES = 32 * 2**20
_PERMUTED_BY = ("k", "k", "v", "k")  # dq, dk, dr follow the key coordinates, dv the value coordinates


@dataclass
class ParallaxBackwardBudget:
    grads64: tuple  # float64 oracle gradients (dq, dk, dv, dr)
    dense_err: tuple  # per-row error of autograd through parallax_dense in the compute precision,
    #                   the median over ``orderings`` coordinate orderings
    allowed: tuple  # per-row allowed error, one tensor per gradient
    orderings: int = BWD_ORDERINGS
    dense_max: tuple = ()  # per-row largest error over the orderings (reported, not allowed)
    score: tuple = ()  # per-row allowance for the scores' rounding, sqrt(D) u_c T_x
    floor: tuple = ()  # per-row floor, BWD_ULPS ulp (before the scale c puts on it)


def _grads(fn, xs, do):
    leaves = tuple(t.detach().requires_grad_(True) for t in xs)
    return torch.autograd.grad(fn(*leaves), leaves, do)


def _orderings_per_call(q, v, compute_dtype, orderings: int) -> int:
    """How many orderings one autograd call through parallax_dense takes: all of them
    unless the pairwise (S, S, D + Dv) tensors it saves, a few per head and ordering,
    would pass DENSE_GRAD_CALL_BYTES."""
    heads = max(1, q[..., 0, 0].numel())
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    per_ordering = 4 * heads * S * S * (D + Dv) * torch.empty((), dtype=compute_dtype).element_size()
    return max(1, min(orderings, DENSE_GRAD_CALL_BYTES // max(per_ordering, 1)))


def dense_grad_errors_over_orderings(q, k, v, r, do, grads64, *, qk_scale=None, compute_dtype=torch.float32,
                                     orderings: int = BWD_ORDERINGS, seed: int = 0) -> tuple:
    """The dense reference's gradient error per row of dq, dk, dv and dr, each
    (orderings, ..., S): one evaluation of autograd through parallax_dense per coordinate
    ordering (coordinate_orderings; the first is the identity).

    The reordering is the forward's exact symmetry (dense_error_over_orderings) carried to
    the gradients: with q, k, r permuted by pk, v and the cotangent by pv, the float64
    gradients come out permuted the same way (dq, dk, dr by pk, dv by pv), their row
    norms unchanged, while every sum of the dense computation and of its backward runs in
    another order. The orderings are stacked along a new leading dimension and
    differentiated in one call (several, when their saved tensors would pass
    DENSE_GRAD_CALL_BYTES): each ordering is a batch entry of its own, computed as if
    alone. ``grads64`` are the float64 oracle's (dq, dk, dv, dr).
    """
    perms = coordinate_orderings(q.shape[-1], v.shape[-1], orderings, seed=seed, device=q.device)
    step = _orderings_per_call(q, v, compute_dtype, len(perms))

    def dense(*a):
        return parallax_dense(*a, qk_scale=qk_scale, compute_dtype=compute_dtype)

    errs = ([], [], [], [])
    for n0 in range(0, len(perms), step):
        group = perms[n0:n0 + step]

        def stacked(t, by):
            return torch.stack([t[..., pk if by == "k" else pv] for pk, pv in group])

        xs = tuple(stacked(t, by) for t, by in zip((q, k, v, r), _PERMUTED_BY))
        gd = _grads(dense, xs, stacked(do.to(q.dtype), "v"))
        for e, g, g64, by in zip(errs, gd, grads64, _PERMUTED_BY):
            e.append((g.to(torch.float64) - stacked(g64, by)).norm(dim=-1))
    return tuple(torch.cat(e) for e in errs)


def score_rounding_sensitivity(q, k, v, r, do, *, qk_scale=None, directions: int = N_DIRECTIONS,
                               seed: int = 0) -> tuple:
    """Per row of dq, dk, dv and dr, (..., S) each: the largest over sign patterns xi of
    ||J_g(a)[xi * b]||, the first-order change of the float64 gradients g = dL/dx of
    L = <do, o> when each score a_ij (j <= i) moves by xi_ij b_ij, b_ij = |s| |q_i| |k_j|.

    The first pattern moves the heaviest key of each query (its largest score) by +b and
    every other key by -b; the others are ``directions`` random sign patterns. The softmax
    sees only differences of a query's scores, so on a row with two significant keys a
    random pattern that gives both the same sign moves nothing there; the first pattern
    gives them opposite signs. Every pattern lies in the box |delta_ij| <= b_ij, so the
    estimate never exceeds the worst case over the box.

    The derivative along t is a second derivative, J_g(a)[t] = d/dx <dL/da, t>: one
    backward pass to dL/da (the oracle's scores shifted by a zero ``score_shift``,
    differentiable) whose graph each pattern differentiates again. Heads are taken a few
    at a time (SCORE_CALL_BYTES): that graph holds several pairwise (S, S, D) tensors per
    head, more than the float64 gradients' own.
    """
    from lla_contract import check_scale

    scale = check_scale(qk_scale, q.shape[-1])
    lead, S, D, Dv = tuple(q.shape[:-2]), q.shape[-2], q.shape[-1], v.shape[-1]
    xs64 = tuple(t.detach().to(torch.float64).reshape(-1, S, t.shape[-1]) for t in (q, k, v, r))
    do64 = do.detach().to(torch.float64).reshape(-1, S, Dv)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    b = abs(scale) * xs64[0].norm(dim=-1)[..., :, None] * xs64[1].norm(dim=-1)[..., None, :]
    b = torch.where(causal, b, 0.0)
    heaviest = (xs64[0] @ xs64[1].transpose(-1, -2)).mul(scale).masked_fill(~causal, -math.inf).argmax(-1)
    # the patterns are drawn for every head at once, so that grouping the heads changes nothing
    gen = torch.Generator().manual_seed(seed)
    patterns = [torch.full_like(b, -1.0).scatter_(-1, heaviest[..., None], 1.0) * b]
    patterns += [_random_signs(b, gen) * b for _ in range(directions)]

    heads = xs64[0].shape[0]
    per_head = 3 * 8 * S * S * (3 * D + Dv + 4)
    step = max(1, min(heads, SCORE_CALL_BYTES // per_head))
    out = None
    for n0 in range(0, heads, step):
        part = _score_rounding_rows(tuple(x[n0:n0 + step] for x in xs64), do64[n0:n0 + step], scale,
                                    [t[n0:n0 + step] for t in patterns])
        out = part if out is None else tuple(torch.cat([o, p]) for o, p in zip(out, part))
    return tuple(o.reshape(*lead, S) for o in out)


# heads whose score sensitivity is taken in one double-backward call, while their graph (an
# estimate: three times the oracle's pairwise tensors) stays under this
SCORE_CALL_BYTES = 256 * 2**20


def _score_rounding_rows(xs64, do64, scale, patterns) -> tuple:
    """score_rounding_sensitivity on a group of heads (N, S, *): the largest row norm of
    d/dx <dL/da, t> over the patterns t."""
    leaves = tuple(x.clone().requires_grad_(True) for x in xs64)
    shift = torch.zeros_like(patterns[0], requires_grad=True)
    with torch.enable_grad():
        loss = (parallax_forward(*leaves, qk_scale=scale, score_shift=shift) * do64).sum()
        dl_da, = torch.autograd.grad(loss, shift, create_graph=True)

    def along(t):
        with torch.enable_grad():
            g = torch.autograd.grad((dl_da * t).sum(), leaves, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(x) if d is None else d for d, x in zip(g, leaves))

    return _largest_rows(along, patterns)


def parallax_backward_budget(q, k, v, r, do, *, qk_scale=None, compute_dtype=torch.float32,
                             grad_dtype: torch.dtype | None = None, orderings: int = BWD_ORDERINGS,
                             directions: int = N_DIRECTIONS) -> ParallaxBackwardBudget:
    """The allowed per-row error of dq, dk, dv, dr for the cotangent ``do``.

    Per row x of each gradient (one row of dq, dk, dv or dr, a vector over D or Dv):

        floor_x   = BWD_ULPS (u_c sqrt(S D) max_x' ||g64_x'|| + u_g ||g64_x||)
        score_x   = sqrt(D) u_c T_x
        allowed_x = max(BWD_FACTOR med_x, floor_x max(1, BWD_FACTOR c)) + score_x,
        c         = max_x med_x / (floor_x + score_x)

    med_x is the median over ``orderings`` coordinate orderings
    (dense_grad_errors_over_orderings) of the error of autograd through parallax_dense in
    ``compute_dtype`` on the same inputs and cotangent (gradients in the inputs' dtype, as
    an implementation returns them). FlashAttention's rule, BWD_FACTOR times the
    reference's error, is applied to the median, the forward target's principle: one
    evaluation is one draw of a rounding error that the implementation, summing in another
    order, draws afresh, and a single draw may sit far above or below the computation's
    typical error at that row. A row where even the reference's error is near zero (the
    last key's dv, a single product) would demand more than the precision holds. Hence the
    floor: a few units of the compute precision u_c over sums of S terms of D-long products
    at the scale of the head's largest gradient row (max over x' in the same (batch,
    head)), plus the output rounding u_g of the row itself in the gradient dtype. Where the
    reference's error is far above what floor and score allow, c scales the floor as the
    forward budget's same_precision_allowed does with floor_x + score_x as its model: every
    row may reach BWD_FACTOR times the reference's worst median error in those units. A row
    whose error is a level of its scores' rounding sits within its own score_x and scales
    no other row's floor; measured against the floor alone, c would follow that level, and
    under a relabelling of the coordinates the allowance of every row of the head with it.

    score_x is the scores' rounding carried into the row. Where the scores are large
    (one-hot rows at a large bandwidth scale, keys of large norm) a row's error is the
    rounding of a few scores a_ij, and it comes in levels (which ulp each score rounds to)
    that no multiple of a typical error bounds: the median follows whichever level holds
    the majority of the orderings. T_x (score_rounding_sensitivity) is the first-order
    change of the float64 gradient row when each score moves by up to |s| |q_i| |k_j|; a
    score is a D-term dot product, whose rounding is below sqrt(D) u_c |s| sum_d
    |q_id k_jd| <= sqrt(D) u_c |s| |q_i| |k_j| (the probabilistic bound, lambda = 1). The
    term is added: the implementation's error is its scores' rounding plus the rest, and
    the reference's median bounds the rest (docs/error-model.md §8).
    """
    xs = (q, k, v, r)
    g64 = _grads(lambda *a: parallax_forward(*a, qk_scale=qk_scale), tuple(t.to(torch.float64) for t in xs),
                 do.to(torch.float64))
    draws = dense_grad_errors_over_orderings(q, k, v, r, do, g64, qk_scale=qk_scale, compute_dtype=compute_dtype,
                                             orderings=orderings)
    dense_err = tuple(d.median(0).values for d in draws)
    dense_max = tuple(d.amax(0) for d in draws)
    gdt = grad_dtype or q.dtype
    u_g = unit_roundoff(gdt) if gdt != torch.float64 else U64
    u_c = unit_roundoff(compute_dtype) if compute_dtype != torch.float64 else U64
    root_n = math.sqrt(q.shape[-2] * q.shape[-1])
    sens = score_rounding_sensitivity(q, k, v, r, do, qk_scale=qk_scale, directions=directions)
    score = tuple(math.sqrt(q.shape[-1]) * u_c * t for t in sens)
    allowed, floors = [], []
    for e, b, sc in zip(dense_err, g64, score):
        n = b.norm(dim=-1)
        floor = BWD_ULPS * (u_c * root_n * n.amax(-1, keepdim=True) + u_g * n)
        # the score term stays outside the scaled floor: it bounds the scores' rounding,
        # which no multiple of the reference's error describes
        _, scale = same_precision_allowed(floor + sc, e, BWD_FACTOR, torch.ones_like(e, dtype=torch.bool))
        allowed.append(torch.maximum(floor * scale, BWD_FACTOR * torch.nan_to_num(e, nan=0.0, posinf=0.0)) + sc)
        floors.append(floor.expand_as(e))
    return ParallaxBackwardBudget(g64, dense_err, tuple(allowed), orderings, dense_max, score, tuple(floors))


def check_parallax_backward(q, k, v, r, do, grads, *, impl: str, case: str, qk_scale=None,
                            compute_dtype=torch.float32,
                            pb: ParallaxBackwardBudget | None = None) -> Verdict:
    """Compare an implementation's gradients ``grads`` = (dq, dk, dv, dr) of <do, o> with the
    float64 oracle's (autograd through parallax_forward), row by row within budget."""
    expected = tuple(tuple(t.shape) for t in (q, k, v, r))
    got = tuple(None if t is None else tuple(t.shape) for t in grads)
    if len(got) != 4 or got != expected:
        return Verdict("parallax-backward", impl, case, math.inf, False, "implementation",
                       f"[{impl}] parallax backward on {case}: gradient shapes {got} != expected {expected}")
    pb = pb or parallax_backward_budget(q, k, v, r, do, qk_scale=qk_scale, compute_dtype=compute_dtype,
                                        grad_dtype=grads[0].dtype)
    worst = (-1.0, None, None)
    per_query, summary, n_range, fine = {}, {"nonfinite": 0}, {}, {}
    for name, g, g64, allowed, de, top, sc in zip(GRAD_NAMES, grads, pb.grads64, pb.allowed, pb.dense_err,
                                                  pb.dense_max, pb.score):
        gdt = g.dtype
        g = g.detach().to(torch.float64)
        # an overflowed element's error is its distance from the exact value to the values
        # it stands for (verdict.range_error, docs/error-model.md §2.4)
        err = range_error(g, g64, gdt).norm(dim=-1)
        # a row whose gradient vanishes exactly (dq_0, dr_0: one key) allows 0 and passes at 0
        ratio_x = torch.where(allowed > 0, err / allowed.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
        # NaN, and an Inf the budget does not admit, fail as the forward's rows do
        # (verdict.row_ratios); the ratio above is already in allowed units, hence the
        # allowance of 1.
        ratio_x, fine[name], beyond = row_ratios(ratio_x, torch.ones_like(ratio_x), g, g64,
                                                 torch.ones_like(err, dtype=torch.bool), gdt)
        if bool(beyond.any()):
            n_range[name] = int(beyond.sum())
        flat = torch.nan_to_num(ratio_x.flatten(), nan=math.inf, posinf=math.inf)
        at = int(torch.argmax(flat))
        per_query[name] = {"err": err, "allowed": allowed, "ratio": ratio_x, "dense_err": de, "dense_max": top,
                           "score": sc}
        summary[f"ratio_{name}"] = float(flat[at])
        summary["nonfinite"] += int((~fine[name]).sum())
        if float(flat[at]) > worst[0]:
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(at), ratio_x.shape))
            worst = (float(flat[at]), name, idx)
    ratio, name, idx = worst
    passed = ratio <= THRESHOLD
    pq = per_query[name]
    cause = "ok" if passed else ("non-finite" if not bool(fine[name][idx]) else "implementation")
    where = ", ".join(f"{n}={i}" for n, i in zip("bhi" if len(idx) == 3 else "x" * len(idx), idx))
    parts = ", ".join(f"{n} {summary[f'ratio_{n}']:.3g}" for n in GRAD_NAMES)
    g64 = pb.grads64[GRAD_NAMES.index(name)]
    msg = (f"[{impl}] parallax backward {'PASS' if passed else 'FAIL'} ratio {ratio:.3g} on {case} ({parts})\n"
           f"  worst row {name} ({where}): error {float(pq['err'][idx]):.3e} vs allowed {float(pq['allowed'][idx]):.3e} "
           f"(x{BWD_FACTOR:g} dense error {float(pq['dense_err'][idx]):.3e}, the median of {pb.orderings} "
           f"orderings, largest {float(pq['dense_max'][idx]):.3e}, or {BWD_ULPS:g} ulp of "
           f"|{name}| {float(g64[idx].norm()):.3e}; plus the scores' rounding {float(pq['score'][idx]):.3e})"
           + (f"\n  rows whose exact gradient exceeds the gradient dtype's range "
              f"({', '.join(f'{n} {c}' for n, c in n_range.items())}): "
              f"{RANGE_RULE}" if n_range else "")
           + f"\n  cause: {cause}")
    record("parallax-backward", impl, ratio, case)
    summary.update(ratio=ratio, cause=cause, n_beyond_range=sum(n_range.values()))
    return Verdict("parallax-backward", impl, case, ratio, passed, cause, msg, (name, idx),
                   int(sum(t.numel() for t in pb.allowed)), 0, per_query, summary)
