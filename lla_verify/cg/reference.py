"""Conjugate gradient on Sigma_i rho_i = mu_i, tracked against kappa(Sigma_i) (issue 6).

What is here, per query i of a problem:

* ``sigma_mu``: Sigma_i, mu_i and omega_i in float64 from the inputs the kernel saw,
  with the oracle's definition z_ij = k_j - q_i (formed explicitly, chunked over
  queries, weights exp(a_ij - m_i)); ``kappas``: kappa(Sigma_i) and the condition
  number after Jacobi scaling, both from float64 ``eigvalsh``.
* ``reference_cg``: plain or Jacobi-preconditioned CG, vectorised over all queries
  at once, each query frozen once it meets the kernel's stopping rule

      ||r_k|| <= tol * ||mu_i||       (r_k the recursively updated residual, x_0 = 0),

  so its iteration count is comparable with the kernel's; the residual history is
  kept. It runs in float64 (the reference) or in another dtype (to see what finite
  precision alone does to the same iteration).
* ``cg_bound`` / ``iteration_bound`` / ``finite_precision_limit``: the Chebyshev
  bound of SPEC 5 and the slack we allow a float32 kernel (docs/cg.md derives it).
* ``true_residual``: ||mu_i - Sigma_i rho_i|| / ||mu_i|| in float64 for any rho, to
  check the residual a kernel reports.
* ``cg_records``: all of the above for one problem, plus the kernel's reported
  iterations and residual (plain and Jacobi) when given an implementation with stats.

Which eps goes into the bound. SPEC 5 bounds the A-norm error:
||e_k||_A <= 2 ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^k ||e_0||_A, hence
k(eps) <= ceil(sqrt(kappa)/2 * ln(2/eps)) steps make ||e_k||_A / ||e_0||_A <= eps.
The kernel stops on the relative *residual*. With x_0 = 0, r_k = Sigma e_k and
r_0 = mu, and sqrt(lambda_min) ||e||_A <= ||Sigma e|| <= sqrt(lambda_max) ||e||_A, so

    ||r_k|| / ||mu||  <=  sqrt(kappa) * ||e_k||_A / ||e_0||_A      (1)
    ||e_k||_A / ||e_0||_A  <=  sqrt(kappa) * ||r_k|| / ||mu||      (2)

By (1), reaching a relative residual tol is guaranteed once the A-norm error ratio
is at most tol / sqrt(kappa): the iteration bound we check is k(eps) with
**eps = tol / sqrt(kappa)** (``iteration_bound``). By (2), a kernel that stops at
relative residual tol has an A-norm error of at most sqrt(kappa) * tol
(``a_norm_error_at``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lla_verify.registry.cases import Problem
from lla_contract import LLAInputError, check_lambda, check_qkv, check_scale

_F64 = torch.float64
U32 = 2.0**-24
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Slack for the float32 kernel's iteration count (docs/cg.md, "The slack"):
# Greenbaum: finite-precision CG behaves like exact CG on a matrix whose eigenvalues
# lie within GREENBAUM_C * D * u * lambda_max of Sigma_i's. While that width is at
# most half of lambda_min, the effective condition number is at most
# KAPPA_FP_FACTOR * kappa (1 + small), so the Chebyshev bound holds with kappa
# replaced by 2 kappa. EXTRA_ITERS covers the stopping test itself: the residual
# norm compared against tol * ||mu|| is computed in float32 and can sit on either
# side of the threshold for one step, and kernels differ by one in whether the
# check counts before or after the update.
GREENBAUM_C = 1.0
KAPPA_FP_FACTOR = 2.0
EXTRA_ITERS = 2
RESIDUAL_THRESH = 4.0  # safety factor on the probabilistic rounding model (as budget.THRESH)


# ------------------------------------------------------------------ the bound
def cg_bound(kappa, eps):
    """SPEC 5: steps after which the A-norm error ratio is at most eps.

    k(eps) = ceil(sqrt(kappa)/2 * ln(2/eps)); elementwise over tensors, floats in,
    float out. kappa >= 1 and 0 < eps < 2 (eps >= 2 needs no step: returns 0);
    kappa = inf gives inf.
    """
    if isinstance(kappa, torch.Tensor) or isinstance(eps, torch.Tensor):
        kap = torch.as_tensor(kappa, dtype=_F64)
        e = torch.as_tensor(eps, dtype=_F64, device=kap.device)
        if bool((kap < 1).any()) or bool((e <= 0).any()):
            raise LLAInputError("cg_bound: expected kappa >= 1 and eps > 0")
        return torch.ceil(torch.sqrt(kap) / 2 * torch.log(2.0 / e)).clamp_min(0.0)
    kappa, eps = float(kappa), float(eps)
    if not kappa >= 1 or not eps > 0:
        raise LLAInputError(f"cg_bound: expected kappa >= 1 and eps > 0, got kappa={kappa}, eps={eps}")
    if math.isinf(kappa):
        return math.inf
    return float(max(0, math.ceil(math.sqrt(kappa) / 2 * math.log(2.0 / eps))))


def residual_tol_to_eps(kappa, tol):
    """The A-norm error ratio that guarantees relative residual <= tol: tol / sqrt(kappa) (eq. 1)."""
    if isinstance(kappa, torch.Tensor):
        return tol / torch.sqrt(kappa.to(_F64))
    return float(tol) / math.sqrt(float(kappa))


def a_norm_error_at(kappa, relres):
    """Upper bound on ||e||_A / ||e_0||_A when the relative residual is relres (eq. 2)."""
    if isinstance(kappa, torch.Tensor):
        return torch.sqrt(kappa.to(_F64)) * relres
    return math.sqrt(float(kappa)) * float(relres)


def iteration_bound(kappa, tol):
    """Steps after which exact CG has relative residual <= tol: k(eps = tol / sqrt(kappa))."""
    return cg_bound(kappa, residual_tol_to_eps(kappa, tol))


def jacobi_iteration_bound(kappa, kappa_jacobi, tol):
    """The same for Jacobi-preconditioned CG: rate from kappa(D^-1/2 Sigma D^-1/2), eps from kappa(Sigma).

    Preconditioned CG contracts the Sigma-norm error at the rate of the scaled matrix,
    while eq. (1) linking it to the unpreconditioned residual (the stopping test) is
    about Sigma itself: k = ceil(sqrt(kappa_jacobi)/2 * ln(2 sqrt(kappa) / tol)).
    """
    return cg_bound(kappa_jacobi, residual_tol_to_eps(kappa, tol))


def bound_applies(kappa, D: int, u: float = U32):
    """Where the finite-precision argument holds: GREENBAUM_C * D * u * kappa <= 1/2."""
    return GREENBAUM_C * D * u * kappa <= 0.5


def finite_precision_limit(kappa, tol, D: int, max_iters: int, u: float = U32, kappa_rate=None):
    """The most iterations we allow a kernel computing in unit roundoff u.

    min(max_iters, k + EXTRA_ITERS), k the bound at tol with the rate's condition
    number multiplied by KAPPA_FP_FACTOR (kappa_rate: the Jacobi-scaled kappa for
    preconditioned CG, default kappa), where ``bound_applies``; just max_iters beyond
    (no rate is claimed once the rounding width reaches lambda_min). Tensors in,
    float64 tensor out.
    """
    kap = torch.as_tensor(kappa, dtype=_F64)
    rate = kap if kappa_rate is None else torch.as_tensor(kappa_rate, dtype=_F64)
    fin = torch.isfinite(kap) & torch.isfinite(rate)
    one = torch.ones_like(kap)
    # the factor goes on both: the rate and the residual-to-error link (eq. 1) alike
    # see the perturbed spectrum
    lim = jacobi_iteration_bound(KAPPA_FP_FACTOR * torch.where(fin, kap, one),
                                 KAPPA_FP_FACTOR * torch.where(fin, rate, one).clamp_min(1.0), tol) + EXTRA_ITERS
    lim = torch.where(bound_applies(kap, D, u) & fin, lim, torch.full_like(lim, math.inf))
    return lim.clamp_max(float(max_iters))


# ------------------------------------------------------------------ Sigma_i in float64
def sigma_mu(q, k, ridge_lambda, qk_scale=None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, absolute: bool = False):
    """Sigma_i (..., S, D, D), mu_i (..., S, D) and omega_i (..., S) in float64.

    The oracle's definitions (SPEC 1): w_ij = exp(a_ij - m_i) over j <= i, z_ij = k_j - q_i
    formed before any product (so shared offsets cancel exactly), Sigma_i =
    sum_j w_ij z_ij z_ij^T + lambda_i omega_i I. The common factor exp(-m_i) cancels
    from rho_i, kappa(Sigma_i) and every relative residual, so a kernel using another
    row shift solves the same system up to scale.

    absolute=True replaces z_ij by |k_j| + |q_i| (componentwise): the magnitudes a
    kernel's expanded product sum_j w (k_j k_j^T - k_j q^T - q k_j^T + q q^T) p sums
    before cancelling, which is what its rounding scales with (``residual_rounding``).
    """
    check_qkv(q, k, q)
    scale = check_scale(qk_scale, q.shape[-1])
    lead = tuple(q.shape[:-2])
    S, D = q.shape[-2], q.shape[-1]
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device).reshape(-1, S)
    qf = q.to(_F64).reshape(-1, S, D)
    kf = k.to(_F64).reshape(-1, S, D)
    N = qf.shape[0]
    # per query of a chunk: the (J, D) pairwise differences, weighted copy, and (D, D)
    C = int(max(1, min(S, chunk_bytes // max(8 * (S * (2 * D + 2) + 2 * D * D), 1))))
    sig = torch.empty(N, S, D, D, dtype=_F64, device=q.device)
    mu = torch.empty(N, S, D, dtype=_F64, device=q.device)
    omega = torch.empty(N, S, dtype=_F64, device=q.device)
    eye = torch.eye(D, dtype=_F64, device=q.device)
    for i0 in range(0, S, C):
        i1 = min(S, i0 + C)
        qc = qf[:, i0:i1]
        a = scale * (qc @ kf[:, :i1].transpose(-1, -2))
        rows = torch.arange(i0, i1, device=q.device)[:, None]
        cols = torch.arange(i1, device=q.device)[None, :]
        a = a.masked_fill(cols > rows, float("-inf"))
        w = torch.exp(a - a.amax(-1, keepdim=True))
        om = w.sum(-1)
        if absolute:
            z = kf[:, None, :i1, :].abs() + qc[:, :, None, :].abs()
        else:
            z = kf[:, None, :i1, :] - qc[:, :, None, :]
        wz = w[..., None] * z
        s = wz.transpose(-1, -2) @ z + (lam[:, i0:i1] * om)[..., None, None] * eye
        sig[:, i0:i1] = 0.5 * (s + s.transpose(-1, -2))
        mu[:, i0:i1] = wz.sum(-2)
        omega[:, i0:i1] = om
    return sig.reshape(*lead, S, D, D), mu.reshape(*lead, S, D), omega.reshape(*lead, S)


def problem_sigma_mu(problem: Problem, **kw):
    """``sigma_mu`` on a Problem's (already rounded) inputs."""
    return sigma_mu(problem.q, problem.k, problem.ridge_lambda, problem.qk_scale, **kw)


def _jacobi_scaled(sig):
    d = torch.diagonal(sig, dim1=-2, dim2=-1).clamp_min(torch.finfo(_F64).tiny).rsqrt()
    return d[..., :, None] * sig * d[..., None, :]


def _cond(sig):
    ev = torch.linalg.eigvalsh(sig)
    lo, hi = ev[..., 0], ev[..., -1]
    return torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(_F64).tiny), torch.full_like(hi, math.inf))


def kappas(sig, *, batch: int = 4096):
    """(kappa(Sigma_i), kappa(D^-1/2 Sigma_i D^-1/2)) from float64 eigvalsh; inf when singular.

    The second is what Jacobi-preconditioned CG sees. Batched so a long sequence
    does not hold every eigen-decomposition workspace at once.
    """
    flat = sig.reshape(-1, sig.shape[-2], sig.shape[-1])
    outs, outj = [], []
    for i in range(0, flat.shape[0], batch):
        s = flat[i:i + batch]
        outs.append(_cond(s))
        outj.append(_cond(_jacobi_scaled(s)))
    lead = sig.shape[:-2]
    return torch.cat(outs).reshape(lead), torch.cat(outj).reshape(lead)


# ------------------------------------------------------------------ reference CG
@dataclass
class CGRun:
    """The outcome of ``reference_cg``; leading shape (...) is the queries'."""

    rho: torch.Tensor  # (..., D), in the dtype the CG ran in
    iters: torch.Tensor  # (...) int64: updates made
    converged: torch.Tensor  # (...) bool: met ||r|| <= tol ||mu|| within max_iters
    breakdown: torch.Tensor  # (...) bool: p^T Sigma p <= 0 or non-finite (singular or indefinite in rounding)
    recursive_residual: torch.Tensor  # (...) ||r_k|| / ||mu|| as the iteration carried it
    residual: torch.Tensor  # (...) true ||mu - Sigma rho|| / ||mu|| in float64
    history: torch.Tensor | None  # (steps + 1, ...) recursive relative residual; frozen rows repeat
    tol: float = 0.0
    max_iters: int = 0
    preconditioner: str | None = None
    dtype: torch.dtype = _F64


def _check_prec(preconditioner):
    if preconditioner not in (None, "jacobi"):
        raise LLAInputError(f"preconditioner: expected None or 'jacobi', got {preconditioner!r}")


def reference_cg(sig, mu, *, tol: float, max_iters: int, preconditioner: str | None = None,
                 dtype: torch.dtype = _F64, history: bool = True) -> CGRun:
    """CG on Sigma_i rho_i = mu_i for every query at once (x_0 = 0).

    Stops query i at the first k with ||r_k|| <= tol ||mu_i|| (r_k the recursive
    residual, which is what a kernel can afford to test), or at max_iters, or at a
    breakdown (p^T Sigma p not positive: Sigma_i singular, or indefinite after
    rounding), leaving its state frozen while the others go on. mu_i = 0 counts as
    converged after 0 steps. With Jacobi, z = diag(Sigma)^-1 r; the stopping test is
    still on the unpreconditioned r, as in the kernel.
    """
    _check_prec(preconditioner)
    if not tol > 0:
        raise LLAInputError(f"tol: expected > 0, got {tol}")
    if int(max_iters) < 0:
        raise LLAInputError(f"max_iters: expected >= 0, got {max_iters}")
    D = mu.shape[-1]
    if sig.shape[-2:] != (D, D) or sig.shape[:-2] != mu.shape[:-1]:
        raise LLAInputError(f"sig: expected shape {tuple(mu.shape[:-1]) + (D, D)}, got {tuple(sig.shape)}")
    lead = tuple(mu.shape[:-1])
    A = sig.to(dtype).reshape(-1, D, D)
    b = mu.to(dtype).reshape(-1, D)
    if preconditioner == "jacobi":
        diag = torch.diagonal(A, dim1=-2, dim2=-1)
        # a non-positive diagonal (an all-zero key axis at lambda = 0) gets no scaling
        dinv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))
    else:
        dinv = None
    x = torch.zeros_like(b)
    r = b.clone()
    zv = r if dinv is None else dinv * r
    p = zv.clone()
    rz = (r * zv).sum(-1)
    bnorm = b.norm(dim=-1)
    bsafe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    thresh = tol * bnorm
    rnorm = r.norm(dim=-1)
    active = rnorm > thresh
    iters = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    broke = torch.zeros_like(active)
    hist = [(rnorm / bsafe).to(_F64)] if history else None
    for _ in range(int(max_iters)):
        if not bool(active.any()):
            break
        Ap = (A @ p[..., None])[..., 0]
        pAp = (p * Ap).sum(-1)
        ok = active & (pAp > 0) & torch.isfinite(pAp)
        broke |= active & ~ok
        alpha = torch.where(ok, rz / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x = torch.where(ok[:, None], x + alpha[:, None] * p, x)
        r = torch.where(ok[:, None], r - alpha[:, None] * Ap, r)
        zv = r if dinv is None else dinv * r
        rz_new = (r * zv).sum(-1)
        beta = torch.where(ok, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = torch.where(ok[:, None], zv + beta[:, None] * p, p)
        rz = torch.where(ok, rz_new, rz)
        iters += ok.to(torch.int64)
        rnorm = torch.where(ok, r.norm(dim=-1), rnorm)
        active = ok & (rnorm > thresh)
        if history:
            hist.append((rnorm / bsafe).to(_F64))
    converged = rnorm <= thresh
    true_res = true_residual(sig.reshape(-1, D, D), mu.reshape(-1, D), x)
    return CGRun(
        rho=x.reshape(*lead, D), iters=iters.reshape(lead), converged=converged.reshape(lead),
        breakdown=broke.reshape(lead), recursive_residual=(rnorm / bsafe).to(_F64).reshape(lead),
        residual=true_res.reshape(lead),
        history=torch.stack(hist).reshape(-1, *lead) if history else None,
        tol=float(tol), max_iters=int(max_iters), preconditioner=preconditioner, dtype=dtype,
    )


def true_residual(sig, mu, rho):
    """||mu_i - Sigma_i rho_i|| / ||mu_i|| in float64 (0 where mu_i = 0 and the residual is 0).

    Every operand is promoted to float64 before the product, so for a float32 rho the
    result is exact to float64 rounding: what a kernel's own residual is checked against.
    """
    s, m, x = sig.to(_F64), mu.to(_F64), rho.to(_F64, copy=False).to(sig.device)
    r = m - (s @ x[..., None])[..., 0]
    num, den = r.norm(dim=-1), m.norm(dim=-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))


def residual_rounding(q, k, ridge_lambda, qk_scale, rho, *, u: float = U32, worst_case: bool = False):
    """How far a residual computed in unit roundoff u may sit from the float64 one, relative to ||mu_i||.

    A kernel forms mu_i and Sigma_i rho_i from key-tile sums of length n_i = i + 1 in
    the expanded form (no z_ij), each entry then an inner product of length D, with
    weights rounded once. Rounding errors scale with the magnitudes added up before
    they cancel (``sigma_mu(absolute=True)``: |k_j| + |q_i| in place of z_ij):

        | ||r_fp|| - ||r_64|| | / ||mu_i||  <=  c_i u ( || |Sigma|_abs |rho_i| || + || |mu|_abs || ) / ||mu_i||

    with c_i = n_i + D + 2 (the gamma_n worst case, ``worst_case=True``) or, by
    default, the probabilistic model of budget.py, c_i = THRESH (sqrt(n_i) + sqrt(D) + 2)
    with THRESH = 4, which grows like sqrt(n) and so stays meaningful at S = 2048 where
    the worst case would hide a plainly wrong residual (both sit about 100 times above
    what a dense fp32 residual shows at S = 48). The
    relative error of ||mu_i|| itself is covered by the same terms. Returns the
    bound per query, float64, shape (..., S).
    """
    S, D = q.shape[-2], q.shape[-1]
    sig_abs, mu_abs, _ = sigma_mu(q, k, ridge_lambda, qk_scale, absolute=True)
    _, mu, _ = sigma_mu(q, k, ridge_lambda, qk_scale)
    x = rho.to(_F64).to(sig_abs.device).abs()
    mag = (sig_abs @ x[..., None])[..., 0].norm(dim=-1) + mu_abs.norm(dim=-1)
    n = torch.arange(1, S + 1, dtype=_F64, device=sig_abs.device)
    c = (n + D + 2) if worst_case else RESIDUAL_THRESH * (n.sqrt() + math.sqrt(D) + 2)
    den = mu.norm(dim=-1)
    return c * u * mag / torch.where(den > 0, den, torch.ones_like(den))


# ------------------------------------------------------------------ the kernel side
@dataclass
class KernelRun:
    """One kernel call with CG statistics; tensors (B, H, S[, D]) on the problem's device."""

    o: torch.Tensor
    iters: torch.Tensor
    residual: torch.Tensor  # as the kernel reports it
    rho: torch.Tensor | None  # the kernel's own rho when exposed
    note: str | None = None  # why rho is absent


def run_kernel(impl, problem: Problem, *, tol: float, max_iters: int, preconditioner=None) -> KernelRun:
    """Run the implementation once with the given CG settings, statistics on.

    For the Triton kernel this goes through lla_triton.forward.lla_forward_kernel (the
    entry lla_attention itself uses without autograd), which also returns rho, so one
    launch gives o, the iteration count, the reported residual and rho. Other
    implementations go through ``impl.forward_with_stats`` and have no rho.
    """
    _check_prec(preconditioner)
    B, H, S, D = problem.q.shape
    if impl.name == "triton":
        try:
            from lla_triton import forward as fwd  # type: ignore
            fn = fwd.lla_forward_kernel
        except (ImportError, AttributeError) as exc:
            fn, why = None, f"lla_triton.forward.lla_forward_kernel is not exposed ({exc})"
        if fn is not None:
            fold = lambda t: t.reshape(B * H, S, t.shape[-1]).contiguous()  # noqa: E731
            lam = problem.lam_tensor.to(torch.float32).reshape(B * H, S).contiguous().to(problem.q.device)
            with torch.no_grad():
                out = fn(fold(problem.q), fold(problem.k), fold(problem.v), lam, problem.qk_scale,
                         delta_eps=_kernel_delta_eps(), cg_tol=tol, cg_max_iters=int(max_iters),
                         preconditioner=preconditioner, want_stats=True)
            return KernelRun(o=out.o.reshape(B, H, S, -1), iters=out.cg_iters.reshape(B, H, S),
                             residual=out.cg_residual.reshape(B, H, S), rho=out.rho.reshape(B, H, S, D))
    else:
        why = f"{impl.name} exposes no rho"
    if impl.forward_with_stats is None:
        raise LLAInputError(f"{impl.name}: has no forward_with_stats (no CG statistics to compare)")
    with torch.no_grad():
        o, st = impl.forward_with_stats(
            problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda, qk_scale=problem.qk_scale,
            cg_tol=tol, cg_max_iters=int(max_iters), preconditioner=preconditioner,
        )
    return KernelRun(o=o, iters=st["cg_iters"], residual=st["cg_residual"], rho=None, note=why)


def _kernel_delta_eps() -> float:
    # lla_attention's default guard, so the internal entry computes what users get
    try:
        import lla_triton  # type: ignore

        return float(getattr(lla_triton, "DEFAULT_DELTA_EPS", 0.0))
    except ImportError:
        return 0.0


def kernel_defaults(D: int = 64) -> tuple[float, int, str | None]:
    """(DEFAULT_CG_TOL, the default iteration cap at head dim D, None) from lla_triton, or
    fallbacks and the reason."""
    try:
        import lla_triton  # type: ignore
    except ImportError as exc:
        return 1e-6, 64, f"lla_triton does not import: {exc}"
    tol = float(getattr(lla_triton, "DEFAULT_CG_TOL", 1e-6))
    cap = getattr(lla_triton, "default_cg_max_iters", None)
    iters = int(cap(D)) if cap is not None else 64
    return tol, iters, None


def triton_unavailable(device: str = "cpu") -> str | None:
    """None when lla_triton.lla_attention can run on ``device`` here, else why not."""
    from lla_verify.registry.impls import get_impl, is_available

    reason = is_available(get_impl("triton"), device)
    if reason is None:
        return None
    # one prefix for every cause, so a skip is recognisable in any report
    return f"lla_triton.lla_attention not available ({reason})"


# ------------------------------------------------------------------ per-query records
@dataclass
class CGRecords:
    """Per-query arrays (flattened over B, H, S; float64 or int64 on the CPU) for one problem."""

    case: str
    tol: float
    max_iters: int
    ref_max_iters: int
    D: int
    columns: dict = field(default_factory=dict)  # name -> 1-D tensor, one entry per query
    kernel_skipped: str | None = None  # why some kernel columns are absent

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).numel()) if self.columns else 0

    def rows(self) -> list[dict]:
        names = list(self.columns)
        cols = [self.columns[n].tolist() for n in names]
        return [dict(zip(names, vals)) for vals in zip(*cols)]


def cg_records(problem: Problem, *, tol: float, max_iters: int, ref_max_iters: int | None = None,
               impl=None, device=None, with_fp32_reference: bool = True) -> CGRecords:
    """Everything issue 6 tracks, per query, for one problem.

    Columns: query (flat index), kappa, kappa_jacobi, bound and bound_jacobi
    (iteration bounds at tol), limit and limit_jacobi (finite_precision_limit), ref64_{plain,jacobi}_{iters,res,conv}: float64
    reference CG (run up to ref_max_iters, default max(max_iters, 10 D), so the
    float64 count is seen even where the kernel is capped); ref32_* the same CG in
    float32 on the rounded Sigma_i (finite precision alone) when asked; and with an
    implementation: kernel_{plain,jacobi}_{iters,res,res64,err_o} (reported count and
    residual, the float64 recomputation of the residual when the kernel's rho is
    exposed, the relative error of o against the float64 oracle) and
    kernel_{plain,jacobi}_err_rho.
    """
    from lla_verify.oracles.float64 import lla_forward

    dev = device or problem.q.device
    B, H, S, D = problem.q.shape
    ref_max = int(ref_max_iters if ref_max_iters is not None else max(max_iters, 10 * D))
    sig, mu, _ = sigma_mu(problem.q.to(dev), problem.k.to(dev), problem.lam_tensor.to(dev), problem.qk_scale)
    kap, kapj = kappas(sig)
    cols = {
        "query": torch.arange(B * H * S),
        "kappa": kap.reshape(-1).cpu(),
        "kappa_jacobi": kapj.reshape(-1).cpu(),
    }
    kfin = torch.where(torch.isfinite(kap), kap, torch.full_like(kap, math.inf))
    cols["bound"] = torch.where(torch.isfinite(kfin), iteration_bound(torch.where(torch.isfinite(kfin), kfin,
                                torch.ones_like(kfin)), tol), torch.full_like(kfin, math.inf)).reshape(-1).cpu()
    cols["bound_jacobi"] = torch.where(torch.isfinite(kfin) & torch.isfinite(kapj), jacobi_iteration_bound(
        torch.where(torch.isfinite(kfin), kfin, torch.ones_like(kfin)),
        torch.where(torch.isfinite(kapj), kapj, torch.ones_like(kapj)).clamp_min(1.0), tol),
        torch.full_like(kfin, math.inf)).reshape(-1).cpu()
    cols["limit"] = finite_precision_limit(kap.cpu(), tol, D, max_iters).reshape(-1)
    cols["limit_jacobi"] = finite_precision_limit(kap.cpu(), tol, D, max_iters, kappa_rate=kapj.cpu()).reshape(-1)
    exact = torch.linalg.solve_ex(sig, mu[..., None])[0][..., 0]
    for dt, tag in ((_F64, "ref64"), (torch.float32, "ref32")):
        if tag == "ref32" and not with_fp32_reference:
            continue
        for prec in (None, "jacobi"):
            name = f"{tag}_{prec or 'plain'}"
            run = reference_cg(sig, mu, tol=tol, max_iters=ref_max if dt == _F64 else max_iters,
                               preconditioner=prec, dtype=dt, history=False)
            cols[f"{name}_iters"] = run.iters.reshape(-1).cpu()
            cols[f"{name}_res"] = run.residual.reshape(-1).cpu()
            cols[f"{name}_conv"] = run.converged.reshape(-1).cpu()
            cols[f"{name}_err_rho"] = _rel_err(run.rho.to(_F64), exact).reshape(-1).cpu()
    skipped = None
    if impl is not None:
        o_ref = lla_forward(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                            qk_scale=problem.qk_scale).cpu()
        for prec in (None, "jacobi"):
            name = f"kernel_{prec or 'plain'}"
            kr = run_kernel(impl, problem, tol=tol, max_iters=max_iters, preconditioner=prec)
            cols[f"{name}_iters"] = kr.iters.reshape(-1).to(torch.int64).cpu()
            cols[f"{name}_res"] = kr.residual.reshape(-1).to(_F64).cpu()
            cols[f"{name}_err_o"] = _rel_err(kr.o.to(_F64).cpu(), o_ref).reshape(-1)
            if kr.rho is None:
                skipped = f"kernel rho not compared: {kr.note}"
            else:
                cols[f"{name}_res64"] = true_residual(sig, mu, kr.rho.to(dev)).reshape(-1).cpu()
                cols[f"{name}_err_rho"] = _rel_err(kr.rho.to(_F64).to(dev), exact).reshape(-1).cpu()
    return CGRecords(case=problem.describe(), tol=float(tol), max_iters=int(max_iters), ref_max_iters=ref_max,
                     D=D, columns=cols, kernel_skipped=skipped)


def _rel_err(x, ref):
    num = (x.to(_F64) - ref.to(_F64)).norm(dim=-1)
    den = ref.to(_F64).norm(dim=-1)
    return num / torch.where(den > 0, den, torch.ones_like(den))


__all__ = [
    "cg_bound", "iteration_bound", "jacobi_iteration_bound", "residual_tol_to_eps", "a_norm_error_at", "finite_precision_limit",
    "bound_applies", "sigma_mu", "problem_sigma_mu", "kappas", "reference_cg", "CGRun", "true_residual",
    "residual_rounding", "KernelRun", "run_kernel", "kernel_defaults", "triton_unavailable",
    "CGRecords", "cg_records",
]
