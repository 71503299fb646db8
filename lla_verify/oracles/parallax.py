"""Float64 oracle for Parallax (docs/math.md, "Parallax"), and the probe that makes it LLA.

Per query i over keys j <= i, with the softmax weights p_ij of LLA's scores:

    nu_i   = sum_j p_ij v_j
    C_i    = sum_j p_ij (v_j - nu_i)(k_j - kbar_i)^T,   kbar_i = sum_j p_ij k_j
    o_i    = nu_i - C_i r_i

C_i r_i is formed centred: the key deviations k_j - kbar_i are built as
(k_j - q_i) - (kbar_i - q_i), so a common offset of the keys (and of q) cancels in
the pairwise differences before any product, as in the LLA oracle. Float64 on any
device, differentiable in q, k, v and r, chunked over queries like the LLA oracle.
"""

from __future__ import annotations

import torch

from lla_contract import check_probe, check_qkv, check_scale

from .float64 import DEFAULT_CHUNK_BYTES, causal_scores, chunk_size, flatten_leading, lla_forward_details

_F64 = torch.float64


def parallax_forward(q, k, v, r, *, qk_scale=None, chunk_bytes=DEFAULT_CHUNK_BYTES, score_shift=None):
    """Causal Parallax o = nu - C r in float64; shape (..., S, Dv).

    ``score_shift`` (..., S, S), optional, float64: added to the scores a_ij before the
    softmax (entries above the diagonal are ignored). The backward budget differentiates
    through it to carry the scores' rounding into the gradients
    (budget.parallax.score_rounding_allowance)."""
    return _parallax(q, k, v, r, qk_scale, _F64, chunk_bytes, score_shift)


def parallax_dense(q, k, v, r, *, qk_scale=None, compute_dtype=torch.float32, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """The same computation in ``compute_dtype`` on the same rounded inputs, output in q's dtype.

    The same-precision reference of the error model (docs/error-model.md): what the plain
    centred computation loses in the kernel's compute precision.
    """
    return _parallax(q, k, v, r, qk_scale, compute_dtype, chunk_bytes).to(q.dtype)


def _parallax(q, k, v, r, qk_scale, cd, chunk_bytes, score_shift=None):
    check_qkv(q, k, v)
    check_probe(r, q)
    scale = check_scale(qk_scale, q.shape[-1])
    lead = tuple(q.shape[:-2])
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    qf, kf, vf, rf = (flatten_leading(t.to(cd), 2) for t in (q, k, v, r))
    if score_shift is not None:
        if tuple(score_shift.shape) != lead + (S, S):
            raise ValueError(f"score_shift: expected shape {lead + (S, S)}, got {tuple(score_shift.shape)}")
        shift = flatten_leading(score_shift.to(cd), 2)
    C = chunk_size(S, D, Dv, chunk_bytes)
    outs = []
    for i0 in range(0, S, C):
        i1 = min(S, i0 + C)
        qc, rc = qf[:, i0:i1], rf[:, i0:i1]
        a, mask = causal_scores(qc, kf, scale, i0, i1)
        if score_shift is not None:
            a = a + shift[:, i0:i1, :i1]
        p = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=-1)  # (N, C, J)
        z = kf[:, None, :i1, :] - qc[:, :, None, :]  # (N, C, J, D)
        zbar = (p[..., None] * z).sum(-2)  # kbar_i - q_i
        d = ((z - zbar[:, :, None, :]) @ rc[..., None])[..., 0]  # <k_j - kbar_i, r_i>
        vj = vf[:, None, :i1, :]
        nu = (p[..., None] * vj).sum(-2)
        corr = ((p * d)[..., None] * (vj - nu[:, :, None, :])).sum(-2)  # C_i r_i
        outs.append(nu - corr)
    return torch.cat(outs, 1).reshape(*lead, S, Dv)


def lla_probe(q, k, v, *, ridge_lambda, qk_scale=None):
    """The probe r_i = rho_i / (1 - <mubar_i, rho_i>) for which Parallax equals LLA.

    LLA's output is nu_i - C_i rho_i / (1 - <mubar_i, rho_i>) with mubar_i = mu_i / omega_i
    (docs/math.md, "Parallax"); rho_i and mu_i come from the float64 LLA oracle. Rows the
    LLA oracle leaves undefined are NaN.
    """
    det = lla_forward_details(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
    mubar = det.mu / det.omega[..., None]
    return det.rho / (1.0 - (mubar * det.rho).sum(-1))[..., None]
