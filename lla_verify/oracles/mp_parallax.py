"""mpmath oracle for Parallax (docs/math.md, "Parallax"): the forward term by term at
``dps`` digits, and its derivatives in q, k, v and r by central differences.

Shares the LLA mp oracle's conventions and helpers (lla_verify/oracles/mp.py): inputs
of any float dtype are taken as the exact float64 values they hold, precision is
scoped with ``mpmath.workdps``, and problems past a few seconds of pure Python are
refused unless ``force=True``. The covariance is formed centred, as the definition
reads: C_i r_i = sum_j p_ij (v_j - nu_i) <k_j - kbar_i, r_i>, with k_j - kbar_i built
from the exact differences k_j - q_i so that a common key offset cancels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import torch

from lla_contract import check_probe

from .mp import (MP_WORK_LIMIT, _check_dps, _check_grad_size, _check_step, _check_work,
                 _F64, _f64, _like, _objarray, _prepare, _to_mp)


@dataclass
class ParallaxGradMP:
    """Gradients of L = sum <cotangent, o> by central differences at high precision."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dr: torch.Tensor
    dps: int = 0
    step: float = 0.0


def _prepare_px(q, k, v, r, qk_scale):
    check_probe(r, q)
    p = _prepare(q, k, v, 0.0, qk_scale, 0.0)
    R = r.detach().to(device="cpu", dtype=_F64).reshape(-1, p.S, p.D).tolist()
    return p, R


def _row_px(qi, ri, K, V, i, s):
    """o_i of one sequence at the mp precision in force."""
    mp = mpmath.mp
    n, D, Dv = i + 1, len(qi), len(V[0])
    a = [s * mp.fdot(qi, K[j]) for j in range(n)]
    m = max(a)
    w = [mp.exp(x - m) for x in a]
    omega = mp.fsum(w)
    p = [x / omega for x in w]
    z = [[mp.fsub(K[j][d], qi[d], exact=True) for d in range(D)] for j in range(n)]
    zbar = [mp.fdot(p, [z[j][d] for j in range(n)]) for d in range(D)]  # kbar_i - q_i
    nu = [mp.fdot(p, [V[j][e] for j in range(n)]) for e in range(Dv)]
    proj = [mp.fdot([z[j][d] - zbar[d] for d in range(D)], ri) for j in range(n)]  # <k_j - kbar_i, r_i>
    pd = [p[j] * proj[j] for j in range(n)]
    return [nu[e] - mp.fdot(pd, [V[j][e] - nu[e] for j in range(n)]) for e in range(Dv)]


def parallax_forward_mp(q, k, v, r, *, qk_scale=None, dps=50, return_mp=False, force=False):
    """Causal Parallax o = nu - C r evaluated in mpmath at ``dps`` digits; float64 (..., S, Dv).

    With ``return_mp=True`` returns ``(o, o_mp)``, o_mp a numpy object array of mpf.
    """
    dps = _check_dps(dps)
    p, R = _prepare_px(q, k, v, r, qk_scale)
    _check_work(p, MP_WORK_LIMIT, force, "parallax_forward_mp")
    with mpmath.workdps(dps):
        Q, K, V, _ = _to_mp(p)
        Rm = [[[mpmath.mpf(x) for x in row] for row in seq] for seq in R]
        s = mpmath.mpf(p.scale)
        rows = [[_row_px(Q[n][i], Rm[n][i], K[n], V[n], i, s) for i in range(p.S)] for n in range(p.N)]
    o_mp = _objarray(rows, p.lead + (p.S, p.Dv))
    o = _f64(o_mp)
    return (o, o_mp) if return_mp else o


def parallax_grad_mp(q, k, v, r, *, qk_scale=None, cotangent, dps=60, step=1e-20,
                     force=False) -> ParallaxGradMP:
    """dL/dq, dL/dk, dL/dv, dL/dr of L = sum <cotangent, o>, by central differences in mp.

    As ``lla_grad_mp``: each input scalar is moved by +- step, only the rows that depend
    on it are re-evaluated (q_i, r_i: row i; k_j, v_j: rows i >= j), and the difference
    is taken at ``dps`` digits (truncation and cancellation both ~1e-40 at the defaults).
    Tiny problems only (mp.GRAD_MAX_S, GRAD_MAX_D) unless ``force``.
    """
    dps = _check_dps(dps)
    h = _check_step(step, dps)
    p, R = _prepare_px(q, k, v, r, qk_scale)
    _check_grad_size(p, force, "parallax_grad_mp")
    cot = _like(cotangent, p.lead + (p.S, p.Dv), "cotangent").reshape(-1, p.S, p.Dv).tolist()
    S, D, Dv = p.S, p.D, p.Dv
    with mpmath.workdps(dps):
        Q, K, V, _ = _to_mp(p)
        Rm = [[[mpmath.mpf(x) for x in row] for row in seq] for seq in R]
        s = mpmath.mpf(p.scale)
        hm = mpmath.mpf(h)
        Cm = [[[mpmath.mpf(x) for x in row] for row in seq] for seq in cot]
        out = {name: [[[None] * w for _ in range(S)] for _ in range(p.N)]
               for name, w in (("dq", D), ("dk", D), ("dv", Dv), ("dr", D))}
        for n in range(p.N):
            Qn, Kn, Vn, Rn, Cn = Q[n], K[n], V[n], Rm[n], Cm[n]

            def loss(rows):
                return mpmath.fsum(mpmath.fdot(Cn[i], _row_px(Qn[i], Rn[i], Kn, Vn, i, s)) for i in rows)

            def central(row, d, rows):
                x0 = row[d]
                row[d] = x0 + hm
                up = loss(rows)
                row[d] = x0 - hm
                down = loss(rows)
                row[d] = x0
                return (up - down) / (2 * hm)

            for i in range(S):
                for d in range(D):
                    out["dq"][n][i][d] = central(Qn[i], d, [i])
                    out["dr"][n][i][d] = central(Rn[i], d, [i])
            for j in range(S):
                later = range(j, S)
                for d in range(D):
                    out["dk"][n][j][d] = central(Kn[j], d, later)
                for e in range(Dv):
                    out["dv"][n][j][e] = central(Vn[j], e, later)
    L = p.lead

    def t(nested, w):
        return torch.tensor([[[float(x) for x in row] for row in seq] for seq in nested], dtype=_F64).reshape(L + (S, w))

    return ParallaxGradMP(dq=t(out["dq"], D), dk=t(out["dk"], D), dv=t(out["dv"], Dv), dr=t(out["dr"], D),
                          dps=dps, step=h)
