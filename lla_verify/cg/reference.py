"""Sigma_i and CG in float64, the reference a kernel's solve is measured against.

* ``sigma_mu``: Sigma_i, mu_i and omega_i in float64 from the inputs the kernel saw,
  with the oracle's definition z_ij = k_j - q_i (formed explicitly, chunked over
  queries, weights exp(a_ij - m_i)); ``kappas``: kappa(Sigma_i) and the condition
  number after Jacobi scaling, both from float64 extreme eigenvalues
  (``oracles.extremes``: eigvalsh on CPU, the certified iteration on the GPU).
* ``reference_cg``: plain or Jacobi-preconditioned CG, vectorised over all queries
  at once, each query frozen once it meets the kernel's stopping rule

      ||r_k|| <= tol * ||mu_i||       (r_k the recursively updated residual, x_0 = 0),

  so its iteration count is comparable with the kernel's; the residual history is
  kept. It runs in float64 (the reference) or in another dtype (to see what finite
  precision alone does to the same iteration).
* ``true_residual``: ||mu_i - Sigma_i rho_i|| / ||mu_i|| in float64 for any rho, to
  check the residual a kernel reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lla_verify.registry.cases import Problem
from lla_contract import LLAInputError, check_lambda, check_qkv, check_scale
from lla_verify.cg.bound import U32
from lla_verify.oracles.extremes import extreme_eigenvalues

_F64 = torch.float64


DEFAULT_CHUNK_BYTES = 128 * 2**20
RESIDUAL_SAFETY = 4.0  # safety factor on the probabilistic rounding model (as budget.MODEL_SAFETY)
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
    lo, hi, _ = extreme_eigenvalues(sig)
    return torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(_F64).tiny), torch.full_like(hi, math.inf))


def kappas(sig, *, batch: int = 4096):
    """(kappa(Sigma_i), kappa(D^-1/2 Sigma_i D^-1/2)) in float64; inf when singular.

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


def check_preconditioner(preconditioner):
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
    check_preconditioner(preconditioner)
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
    default, the probabilistic model of budget/forward.py, c_i = MODEL_SAFETY (sqrt(n_i) + sqrt(D) + 2)
    with MODEL_SAFETY = 4, which grows like sqrt(n) and so stays meaningful at S = 2048 where
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
    c = (n + D + 2) if worst_case else RESIDUAL_SAFETY * (n.sqrt() + math.sqrt(D) + 2)
    den = mu.norm(dim=-1)
    return c * u * mag / torch.where(den > 0, den, torch.ones_like(den))
