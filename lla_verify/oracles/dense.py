"""The dense same-precision reference: LLA computed plainly, materialising every z_ij and
Sigma_i, in a chosen compute dtype (the ``torch-fp32`` implementation of the registry, and
the same-precision term of the error budgets)."""

from __future__ import annotations

import torch

from lla_contract import check_lambda, check_qkv, check_scale


def dense_torch_lla(q, k, v, *, ridge_lambda, qk_scale=None, compute_dtype=torch.float32):
    """Dense LLA in ``compute_dtype`` (default fp32): materialises z_ij and Sigma_i.

    The same-precision reference of SPEC 8 (FlashAttention's rule): the plain
    computation, carried out in the kernel's compute precision on the same rounded
    inputs. Direct solve (Cholesky) per query; output in q's dtype. Memory
    Theta(S^2 D), so small S only.
    """
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device, dtype=compute_dtype)
    cd = compute_dtype
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    S, D = q.shape[-2], q.shape[-1]
    a = scale * (qc @ kc.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    a = a.masked_fill(~mask, float("-inf"))
    w = torch.exp(a - a.amax(-1, keepdim=True))
    omega = w.sum(-1)
    z = kc[..., None, :, :] - qc[..., :, None, :]  # (..., S, S, D)
    wz = w[..., None] * z
    mu = wz.sum(-2)
    eye = torch.eye(D, dtype=cd, device=q.device)
    sig = wz.transpose(-1, -2) @ z + (lam * omega)[..., None, None] * eye
    # Which rows factor is decided without autograd, and the differentiable factorisation
    # sees only matrices that factor: a failed factor is NaN, and selecting around it
    # afterwards still sends NaN through autograd (0 * NaN is NaN) into every input.
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(sig)
        # Sigma_i is SPD in exact arithmetic when lambda_i > 0, but once kappa exceeds
        # 1/u_c its rounded form need not be: a jitter of D u_c tr(Sigma_i)/D is a
        # backward error of the size the rounding already made.
        u = torch.finfo(cd).eps / 2
        needs = (info != 0)[..., None, None]
        jitter = torch.where(needs, (u * torch.diagonal(sig, dim1=-2, dim2=-1).sum(-1))[..., None, None] * eye,
                             torch.zeros_like(sig))
        L0, info2 = torch.linalg.cholesky_ex(sig + jitter)
        chol_ok = (info2 == 0) & torch.isfinite(L0).flatten(-2).all(-1)
    # rows that do not factor even jittered fall back to the softmax average below
    L, _ = torch.linalg.cholesky_ex(torch.where(chol_ok[..., None, None], sig + jitter, eye))
    rho = torch.cholesky_solve(mu[..., None], L)[..., 0]
    rho_ok = chol_ok & torch.isfinite(rho).all(-1)
    rho = torch.where(rho_ok[..., None], rho, torch.zeros_like(rho))
    zr = (z @ rho[..., None])[..., 0]
    g = w * (1.0 - zr)
    den = g.sum(-1)
    # The kernel's delta guard (docs/kernels.md), so that the reference is held to the
    # same function: a den_i below the rounding of the sum it came from (4 u_c of
    # sum_j w_ij (1 + |<z_ij, rho_i>|)) has no correct digit (lambda = 0 early tokens,
    # lambda 1e-8), and a rho_i the jittered Cholesky could not make finite has none
    # either; such rows return the softmax average (rho_i = 0). Without it the
    # reference broke partition of unity at lambda 1e-8 and returned NaN at kappa 1e12.
    u = torch.finfo(cd).eps / 2
    mag = (w * (1.0 + zr.abs())).sum(-1)
    bad = ~rho_ok | ~torch.isfinite(den) | (den.abs() <= 4.0 * u * mag)
    g = torch.where(bad[..., None], w, g)
    den = torch.where(bad, omega, den)
    o = (g @ vc) / den[..., None]
    return o.to(q.dtype)
