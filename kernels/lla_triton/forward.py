"""FlashLLA forward in Triton: one program per (head, query tile), CG inside.

docs/kernels.md explains the passes, the anchor, the stopping rule and the
delta guard; this file keeps to why-comments.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from lla_contract import raise_nonfinite

from ._common import (PRECISIONS, SUPPORTED_HEAD_DIMS, fitted_rounds, interpreting, launch_fitting,
                      reanchor_rounds, score_precision)

DEFAULT_CG_TOL = 1e-7
# CG ends in D steps in exact arithmetic; in fp32 lost orthogonality delays convergence
# without stopping it: kappa(Sigma_i) ~ 1e4 to 1e5 took up to 5.2 D, and a kappa 1.7e6
# row (spectrum family, D = 32) 13.5 D, where a cap of 6 D left it at residual 7e-4 and
# the output 1.26x over its budget (found by the GPU property suite). Tiles stop when
# their rows converge, so the cap costs only the rows that need it.
CG_ITERS_PER_DIM = 16


def default_cg_max_iters(D: int) -> int:
    """The CG iteration cap ``lla_attention`` uses when cg_max_iters is None: 16 D."""
    return CG_ITERS_PER_DIM * int(D)


DEFAULT_DELTA_EPS = 2.0**-22  # 4 u32 of sum_j w_ij (1 + |<z_ij, rho_i>|): den's rounding
DEFAULT_PRECISION = "tf32x3"


class ForwardOut(NamedTuple):
    o: torch.Tensor  # (N, S, D) input dtype
    m: torch.Tensor  # (N, S) fp32, row max of a_ij (natural-log units)
    omega: torch.Tensor  # (N, S) fp32, sum_j w_ij
    den: torch.Tensor  # (N, S) fp32, den_i = sum_j g_ij as summed (before the guard)
    rho: torch.Tensor  # (N, S, D) fp32
    fallback: torch.Tensor  # (N, S) int8, 1 where the delta guard returned the softmax average
    cg_iters: Optional[torch.Tensor]  # (N, S) int32 or None
    cg_residual: Optional[torch.Tensor]  # (N, S) fp32 or None
    anchor_rounds: Optional[torch.Tensor] = None  # (N, S) int32 or None: anchors the row's tile tried


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _load_keys(K, base, start_n, S, c, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
    kf = k.to(tl.float32)
    # z_ij = k'_j - q'_i: subtracting the anchor here, before any product, is what
    # makes a large common offset of q and k cancel exactly instead of in a dot.
    kp = kf - c[None, :]
    if UPCAST:
        k_dot = kf
    else:
        k_dot = k
    return offs_n, k_dot, kp


@triton.jit
def _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK: tl.constexpr, SPREC: tl.constexpr):
    a = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC) * scale
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
        a = tl.where(keep, a, float("-inf"))
    return a


@triton.jit
def _dot3(a, b, UPCAST: tl.constexpr):
    """a (fp32) times b (exact bf16 values) to fp32 accuracy with bf16 MMAs.

    a = a_h + a_m + a_l, three bf16 parts holding 24 bits; each product with a bf16
    b is exact in fp32 and accumulates in fp32: the accuracy of an fp32 dot against
    the exact keys/values, at 3 bf16 MMAs (tf32x3 costs the equivalent of 6).
    """
    a_h = a.to(tl.bfloat16)
    r = a - a_h.to(tl.float32)
    a_m = r.to(tl.bfloat16)
    a_l = (r - a_m.to(tl.float32)).to(tl.bfloat16)
    if UPCAST:
        # same numbers, fp32 operands: the interpreter's bf16 dot is broken
        bf = b.to(tl.float32)
        acc = tl.dot(a_l.to(tl.float32), bf, input_precision="ieee")
        acc = tl.dot(a_m.to(tl.float32), bf, acc, input_precision="ieee")
        acc = tl.dot(a_h.to(tl.float32), bf, acc, input_precision="ieee")
    else:
        acc = tl.dot(a_l, b)
        acc = tl.dot(a_m, b, acc)
        acc = tl.dot(a_h, b, acc)
    return acc


@triton.jit
def _pass1_tile(q_dot, c, K, base, start_n, S, scale, offs_m, m_i, omega, s1, kk, s2,
                D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
                JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr):
    offs_n, k_dot, kp = _load_keys(K, base, start_n, S, c, D, BLOCK_N, UPCAST)
    a = _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK, SPREC)
    m_new = tl.maximum(m_i, tl.max(a, 1))
    # every row sees key 0 in the first tile, so m_new is finite from then on
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(a - m_new[:, None])
    omega = omega * alpha + tl.sum(w, 1)
    s1 = s1 * alpha[:, None] + tl.dot(w, kp, input_precision=PREC)
    kk = kk * alpha + tl.sum(w * tl.sum(kp * kp, 1)[None, :], 1)
    if JACOBI:
        s2 = s2 * alpha[:, None] + tl.dot(w, kp * kp, input_precision=PREC)
    return m_new, omega, s1, kk, s2


@triton.jit
def _pass1(q_dot, c, K, base, S, scale, offs_m, lo_full, hi,
           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
           JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr):
    """Pass 1 over the causal key tiles (full, then masked): the online max m_i, omega_i,
    S1_i = sum_j w_ij k'_j, sum_j w_ij |k'_j|^2, and for Jacobi sum_j w_ij k'_j^2."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    omega = tl.zeros([BLOCK_M], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kk = tl.zeros([BLOCK_M], dtype=tl.float32)
    if JACOBI:
        s2 = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    else:
        s2 = 0.0
    for start_n in range(0, lo_full, BLOCK_N):
        m_i, omega, s1, kk, s2 = _pass1_tile(q_dot, c, K, base, start_n, S, scale, offs_m, m_i, omega, s1, kk,
                                             s2, D, BLOCK_N, UPCAST, False, JACOBI, PREC, SPREC)
    for start_n in range(lo_full, hi, BLOCK_N):
        m_i, omega, s1, kk, s2 = _pass1_tile(q_dot, c, K, base, start_n, S, scale, offs_m, m_i, omega, s1, kk,
                                             s2, D, BLOCK_N, UPCAST, True, JACOBI, PREC, SPREC)
    return m_i, omega, s1, kk, s2


@triton.jit
def _matvec_tile(p, pq, q_dot, c, K, base, start_n, S, scale, offs_m, m_i, acc, tsum,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
                 PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    offs_n, k_dot, kp = _load_keys(K, base, start_n, S, c, D, BLOCK_N, UPCAST)
    a = _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK, SPREC)
    w = tl.exp(a - m_i[:, None])
    # t_ij = w_ij <z_ij, p_i>, with z expanded (never formed)
    if SPLIT:
        # bf16 keys are exact: expand around 0 (pq = <q_i, p_i>); the fp32
        # accumulation loses only u ||k|| / ||z||, see docs/kernels.md
        t = w * (_dot3(p, tl.trans(k_dot), UPCAST) - pq[:, None])
        acc += _dot3(t, k_dot, UPCAST)
    else:
        t = w * (tl.dot(p, tl.trans(kp), input_precision=PREC) - pq[:, None])
        acc += tl.dot(t, kp, input_precision=PREC)
    tsum += tl.sum(t, 1)
    return acc, tsum


@triton.jit
def _matvec(p, qx, q_dot, c, K, base, S, scale, offs_m, m_i, lam_omega, lo_full, hi,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
            PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    """(Sigma_i p_i) for every row of the tile: one pass over the causal key tiles.

    qx is q' = q - c (anchored path) or q itself (SPLIT path, keys not anchored).
    """
    pq = tl.sum(qx * p, 1)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    tsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, lo_full, BLOCK_N):
        acc, tsum = _matvec_tile(p, pq, q_dot, c, K, base, start_n, S, scale, offs_m, m_i, acc, tsum,
                                 D, BLOCK_N, UPCAST, False, PREC, SPREC, SPLIT)
    for start_n in range(lo_full, hi, BLOCK_N):
        acc, tsum = _matvec_tile(p, pq, q_dot, c, K, base, start_n, S, scale, offs_m, m_i, acc, tsum,
                                 D, BLOCK_N, UPCAST, True, PREC, SPREC, SPLIT)
    return acc - tsum[:, None] * qx + lam_omega[:, None] * p


@triton.jit
def _cg(b, rows, s2, s1, qp, omega, lam_omega, cg_tol, cg_max_iters,
        qx, q_dot, c, K, base, S, scale, offs_m, m_i, lo_full, hi,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
        JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    """CG on Sigma_i x_i = b_i for the ``rows`` of the tile together (the forward's rho and
    the backward's adjoint u), each row stopping at ||r_i|| <= cg_tol ||b_i||; Jacobi
    preconditioning from diag(Sigma_i) = s2 - 2 q' s1 + omega q'^2 + lambda omega
    (s2 = sum_j w_ij k'_j^2, s1 = sum_j w_ij k'_j). Returns x, ||r||^2 of the recursive
    residual, and the iterations of each row."""
    x = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    r = b
    if JACOBI:
        diag = s2 - 2.0 * qp * s1 + omega[:, None] * qp * qp + lam_omega[:, None]
        inv_diag = tl.where(diag > 0.0, 1.0 / diag, 1.0)
        zr = r * inv_diag
    else:
        inv_diag = 1.0
        zr = r
    p = zr
    rz = tl.sum(r * zr, 1)
    rr = tl.sum(r * r, 1)
    thresh = (cg_tol * cg_tol) * tl.sum(b * b, 1)
    # a row with b_i = 0 (first token, padding rows, a zero cotangent) is solved by x = 0 at once
    active = rows & (rr > thresh)
    iters = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_active = tl.sum(active.to(tl.int32), 0)
    it = 0
    while (n_active > 0) & (it < cg_max_iters):
        ap = _matvec(p, qx, q_dot, c, K, base, S, scale, offs_m, m_i, lam_omega, lo_full, hi,
                     D, BLOCK_M, BLOCK_N, UPCAST, PREC, SPREC, SPLIT)
        pap = tl.sum(p * ap, 1)
        # pAp <= 0 only when Sigma_i is singular (lambda_i = 0) and p hit its null
        # space, or p underflowed: stop the row there rather than divide by it
        ok = active & (pap > 0.0)
        alpha = tl.where(ok, rz / tl.where(ok, pap, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        if JACOBI:
            zr = r * inv_diag
        else:
            zr = r
        rz_new = tl.sum(r * zr, 1)
        beta = tl.where(ok & (rz > 0.0), rz_new / tl.where(rz > 0.0, rz, 1.0), 0.0)
        p = tl.where(ok[:, None], zr + beta[:, None] * p, p)
        rz = tl.where(ok, rz_new, rz)
        rr = tl.where(ok, tl.sum(r * r, 1), rr)
        iters += active.to(tl.int32)
        active = ok & (rr > thresh)
        n_active = tl.sum(active.to(tl.int32), 0)
        it += 1
    return x, rr, iters


@triton.jit
def _out_tile(rho, qr, q_dot, c, K, V, base, start_n, S, scale, offs_m, m_i, acc, den, mag,
              D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
              PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    offs_n, k_dot, kp = _load_keys(K, base, start_n, S, c, D, BLOCK_N, UPCAST)
    offs_d = tl.arange(0, D)
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=(offs_n < S)[:, None], other=0.0)
    a = _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK, SPREC)
    w = tl.exp(a - m_i[:, None])
    # g_ij = w_ij (1 - <z_ij, rho_i>); weights stay fp32 into the value product
    if SPLIT:
        # qr = <q_i, rho_i> here (keys not anchored on this path)
        t = _dot3(rho, tl.trans(k_dot), UPCAST)
    else:
        t = tl.dot(rho, tl.trans(kp), input_precision=PREC)
    g = w * ((1.0 + qr[:, None]) - t)
    if SPLIT:
        acc += _dot3(g, v, UPCAST)
    else:
        acc += tl.dot(g, v.to(tl.float32), input_precision=PREC)
    den += tl.sum(g, 1)
    # the size of what den_i's rounding acts on: sum_j w_ij (1 + |qr_i| + |t_ij|)
    mag += tl.sum(w * ((1.0 + tl.abs(qr[:, None])) + tl.abs(t)), 1)
    return acc, den, mag


# ----------------------------------------------------------------------------- the kernel
# A row is re-solved around its own anchor when the anchored expansion's magnitude,
# sum_j w_ij |k'_j|^2 + omega_i |q'_i|^2, exceeds REANCHOR_RATIO times what it expands,
# sum_j w_ij |z_ij|^2 (docs/kernels.md, "Anchor"): products then lose more than
# log2(REANCHOR_RATIO) bits to cancellation. Gaussian rows sit near 1 to 2.
REANCHOR_RATIO = tl.constexpr(8.0)


@triton.jit
def _out_pass(rho, qr, q_dot, c, K, V, base, S, scale, offs_m, m_i, lo_full, hi,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    """The output pass over the causal key tiles (full tiles, then the masked diagonal
    ones): acc_i = sum_j g_ij v_j, den_i = sum_j g_ij and mag_i (the delta guard's scale)."""
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    mag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, lo_full, BLOCK_N):
        acc, den, mag = _out_tile(rho, qr, q_dot, c, K, V, base, start_n, S, scale, offs_m, m_i, acc, den,
                                  mag, D, BLOCK_N, UPCAST, False, PREC, SPREC, SPLIT)
    for start_n in range(lo_full, hi, BLOCK_N):
        acc, den, mag = _out_tile(rho, qr, q_dot, c, K, V, base, start_n, S, scale, offs_m, m_i, acc, den,
                                  mag, D, BLOCK_N, UPCAST, True, PREC, SPREC, SPLIT)
    return acc, den, mag


@triton.jit
def _zz_anchored(qp, s1, kk, omega):
    """sum_j w_ij |z_ij|^2 through the anchored expansion (kk = sum w |k'|^2,
    s1 = sum w k'); an underestimate only makes a row look farther from c."""
    return kk - 2.0 * tl.sum(qp * s1, 1) + omega * tl.sum(qp * qp, 1)


@triton.jit
def anchor_too_far(qp, s1, kk, omega):
    """Rows whose anchored expansion of sum_j w_ij |z_ij|^2 is under 1 / REANCHOR_RATIO
    of the magnitudes it cancels."""
    # at the anchor's own row q' = 0 and zz = kk exactly, so that row is never too far
    mag = kk + omega * tl.sum(qp * qp, 1)
    return mag > REANCHOR_RATIO * tl.maximum(_zz_anchored(qp, s1, kk, omega), 0.0)


# The bf16 split path expands z_ij around 0, not the anchor (keys stay exact bf16): its
# products lose about log2 sqrt(r) bits, r = (sum_j w_ij |k_j|^2 + omega_i |q_i|^2) /
# sum_j w_ij |z_ij|^2 (docs/kernels.md). Rows with r above SPLIT_RATIO (5 bits) are left to
# the anchored path of a later round: at a common offset of 1e4 (r ~ 6e6) the split
# matvec's floor, ~ u_32 sqrt(r) = 1.5e-4, stopped CG's true residual far above tol.
SPLIT_RATIO = tl.constexpr(1024.0)


@triton.jit
def split_too_lossy(qf, c, s1, kk, omega):
    """Rows whose expansion around 0 (the split path's) cancels more than SPLIT_RATIO:
    s1, kk are the anchored sums sum w k', sum w |k'|^2 with k' = k - c."""
    kk0 = kk + 2.0 * tl.sum(c[None, :] * s1, 1) + omega * tl.sum(c * c, 0)  # sum_j w |k_j|^2
    mag0 = kk0 + omega * tl.sum(qf * qf, 1)
    return mag0 > SPLIT_RATIO * tl.maximum(_zz_anchored(qf - c[None, :], s1, kk, omega), 0.0)


@triton.jit
def _solve_rows(q_dot, qf, c, todo, lam, K, V, base, S, scale, cg_tol, cg_max_iters, delta_eps,
                offs_m, row_ok, lo_full, hi,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr, JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                SPLIT: tl.constexpr, WANT_STATS: tl.constexpr):
    """Every pass for the rows of one tile around anchor c; CG runs on the rows in
    ``todo`` that this anchor serves. Returns the outputs and ``far``, the rows of
    ``todo`` too far from c, which the caller solves again around another anchor."""
    qp = qf - c[None, :]

    m_i, omega, s1, kk, s2 = _pass1(q_dot, c, K, base, S, scale, offs_m, lo_full, hi,
                                    D, BLOCK_M, BLOCK_N, UPCAST, JACOBI, PREC, SPREC)

    mu = s1 - omega[:, None] * qp
    mu = tl.where(row_ok[:, None], mu, 0.0)
    # sum_j w |z|^2 through the same expansion; where it is a small remainder of the
    # magnitude, the row is far from c (an underestimate only makes it look farther)
    far = todo & anchor_too_far(qp, s1, kk, omega)
    if SPLIT:
        # later rounds run the anchored path (the launcher passes SPLIT only to the first)
        far = far | (todo & split_too_lossy(qf, c, s1, kk, omega))
    mine = todo & (~far)
    lam_omega = lam * omega
    if SPLIT:
        qx = qf
    else:
        qx = qp

    # ---- CG on Sigma_i rho_i = mu_i, all rows of the tile together
    mu2 = tl.sum(mu * mu, 1)
    rho, rr, iters = _cg(mu, mine, s2, s1, qp, omega, lam_omega, cg_tol, cg_max_iters,
                         qx, q_dot, c, K, base, S, scale, offs_m, m_i, lo_full, hi,
                         D, BLOCK_M, BLOCK_N, UPCAST, JACOBI, PREC, SPREC, SPLIT)

    # ---- output pass: g_ij = w_ij (1 - <z_ij, rho_i>), den_i = sum_j g_ij
    qr = tl.sum(qx * rho, 1)
    acc, den, mag = _out_pass(rho, qr, q_dot, c, K, V, base, S, scale, offs_m, m_i, lo_full, hi,
                              D, BLOCK_M, BLOCK_N, UPCAST, PREC, SPREC, SPLIT)
    # delta guard (docs/kernels.md). den_i = omega_i - <mu_i, rho_i> carries two errors:
    # rounding, below delta_eps * mag_i, and the solve's: with r_i = mu_i - Sigma_i rho_i,
    # <mu_i, Sigma_i^-1 mu_i - rho_i> = <rho_i, r_i> exactly (Sigma_i symmetric), so at
    # most |rho_i| |r_i| (2x for the recursive r's drift). A den inside that band has no
    # correct digit (lambda = 0 early tokens, tiny lambda, CG stopped short on a singular
    # Sigma_i); dividing would return noise / noise or 0 / 0. Such a row returns the
    # rho = 0 (lambda -> inf) limit instead, the softmax average sum_j w_ij v_j / omega_i:
    # finite, and sum_j s_ij = 1 still holds.
    # delta_eps = 0 turns the guard off but for den = 0 exactly (no 0 / 0).
    solve_err = tl.where(delta_eps > 0.0, 2.0 * tl.sqrt(tl.sum(rho * rho, 1)) * tl.sqrt(rr), 0.0)
    fallback = mine & (tl.abs(den) <= delta_eps * mag + solve_err)
    acc0 = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    den0 = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    # one more output pass at rho = 0, only in the rare tile that needs it; it is the pass
    # the backward recomputes for these rows, so forward and backward see one function
    if tl.sum(fallback.to(tl.int32), 0) > 0:
        rho0 = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        qr0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0, den0, mag0 = _out_pass(rho0, qr0, q_dot, c, K, V, base, S, scale, offs_m, m_i, lo_full, hi,
                                     D, BLOCK_M, BLOCK_N, UPCAST, PREC, SPREC, SPLIT)
    o = tl.where(fallback[:, None], acc0 / tl.where(fallback, den0, 1.0)[:, None],
                 acc / tl.where(fallback | (den == 0.0), 1.0, den)[:, None])
    rel = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WANT_STATS:
        # the true residual, one extra matvec: CG's recursive r drifts from it
        sr = _matvec(rho, qx, q_dot, c, K, base, S, scale, offs_m, m_i, lam_omega, lo_full, hi,
                     D, BLOCK_M, BLOCK_N, UPCAST, PREC, SPREC, SPLIT)
        res = mu - sr
        res_n = tl.sqrt(tl.sum(res * res, 1))
        mu_n = tl.sqrt(mu2)
        rel = tl.where(mu_n > 0.0, res_n / tl.where(mu_n > 0.0, mu_n, 1.0), 0.0)
    return o, rho, m_i, omega, den, fallback, iters, rel, far


# S and cg_max_iters are not specialised on (== 1, % 16): every pointer is offset by
# multiples of D, and it doubled the variants the shapes of a GPU property-suite run
# compiled (96 forward variants, 46 without); timed within 4% either way
# (docs/performance.md, sixth run)
NO_SPECIALIZE = ("S", "cg_max_iters")


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _lla_fwd_kernel(Q, K, V, LAM, O, M_OUT, OMEGA_OUT, DEN_OUT, RHO_OUT, FB_OUT, ITERS_OUT, RES_OUT,
                    TILE_IDS, ANCHORS, TODO, FAR_OUT,
                    S, scale, cg_tol, cg_max_iters, delta_eps,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                    SPLIT: tl.constexpr, WANT_STATS: tl.constexpr, FIRST: tl.constexpr):
    n_tiles = tl.cdiv(S, BLOCK_M)
    if FIRST:
        # late query tiles do the most work: launch them first for a balanced tail
        pid_m = n_tiles - 1 - tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
    else:
        tile = tl.load(TILE_IDS + tl.program_id(0))
        pid_m = tile % n_tiles
        head = (tile // n_tiles).to(tl.int64)
    base = head * S * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < S
    row_ptrs = head * S + offs_m

    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qf = q.to(tl.float32)
    if UPCAST:
        q_dot = qf
    else:
        q_dot = q
    lam = tl.load(LAM + head * S + offs_m, mask=row_ok, other=0.0)

    hi = tl.minimum((pid_m + 1) * BLOCK_M, S)
    # key tiles entirely below the diagonal (and inside S) need no mask
    lo_full = ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N

    # Anchor c: in the first launch the tile's first query row; rows too far from it
    # (queries of one tile in different tight clusters) are left unwritten, marked in
    # FAR_OUT, and solved by a later launch around the first of them (the host loop,
    # _common.reanchor_rounds).
    if FIRST:
        a_row = pid_m * BLOCK_M
        todo = row_ok
    else:
        a_row = tl.load(ANCHORS + tl.program_id(0))
        todo = row_ok & (tl.load(TODO + row_ptrs, mask=row_ok, other=0) != 0)
    c = tl.load(Q + base + a_row * D + offs_d).to(tl.float32)
    o, rho, m_i, omega, den, fb, iters, rel, far = _solve_rows(
        q_dot, qf, c, todo, lam, K, V, base, S, scale, cg_tol, cg_max_iters, delta_eps,
        offs_m, row_ok, lo_full, hi, D, BLOCK_M, BLOCK_N, UPCAST, JACOBI, PREC, SPREC, SPLIT, WANT_STATS)
    take = todo & (~far)

    tile_ptrs = base + offs_m[:, None] * D + offs_d[None, :]
    tl.store(O + tile_ptrs, o.to(O.dtype.element_ty), mask=take[:, None])
    tl.store(RHO_OUT + tile_ptrs, rho, mask=take[:, None])
    tl.store(M_OUT + row_ptrs, m_i, mask=take)
    tl.store(OMEGA_OUT + row_ptrs, omega, mask=take)
    tl.store(DEN_OUT + row_ptrs, den, mask=take)
    tl.store(FB_OUT + row_ptrs, fb.to(tl.int8), mask=take)
    tl.store(FAR_OUT + row_ptrs, far.to(tl.int8), mask=row_ok)
    if WANT_STATS:
        tl.store(ITERS_OUT + row_ptrs, iters, mask=take)
        tl.store(RES_OUT + row_ptrs, rel, mask=take)


# ----------------------------------------------------------------------------- launcher
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim on the GPU; hand-picked
# (docs/performance.md) rather than autotuned, so runs are deterministic.
GPU_CONFIGS = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (32, 64, 4, 2),
}
INTERP_CONFIG = (16, 16, 1, 1)


def tile_config(D: int, override=None):
    if override is not None:
        return tuple(override)
    if interpreting():
        return INTERP_CONFIG
    return GPU_CONFIGS[D]


def lla_forward_kernel(q, k, v, lam, scale, *, delta_eps, cg_tol, cg_max_iters, preconditioner,
                       want_stats, precision=None, config=None, input_check=None) -> ForwardOut:
    """Launch the forward kernel on flattened heads.

    q, k, v: (N, S, D) contiguous, one dtype; lam: (N, S) float32 contiguous.
    ``precision`` (default DEFAULT_PRECISION) and ``config`` ((BLOCK_M, BLOCK_N,
    num_warps, num_stages)) are optional extras; callers that know neither omit them.
    ``input_check`` = (flag, named): a deferred finiteness check of the caller's inputs
    (lla_contract.nonfinite_flag and the (name, tensor) pairs it covers), read in the same
    device-to-host transfer as the anchor rounds' first; raises LLAInputError if set.
    """
    N, S, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dimension {D} unsupported; expected one of {SUPPORTED_HEAD_DIMS}")
    precision = precision or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if preconditioner not in (None, "none", "jacobi"):
        raise ValueError(f"preconditioner: expected None, 'none' or 'jacobi', got {preconditioner!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("lam", lam)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: lla_forward_kernel needs a contiguous tensor")
    dev = q.device
    o = torch.empty_like(q)
    m = torch.empty(N, S, device=dev, dtype=torch.float32)
    omega = torch.empty_like(m)
    den = torch.empty_like(m)
    rho = torch.empty(N, S, D, device=dev, dtype=torch.float32)
    fallback = torch.empty(N, S, device=dev, dtype=torch.int8)
    if want_stats:
        iters = torch.empty(N, S, device=dev, dtype=torch.int32)
        res = torch.empty_like(m)
    else:
        iters = torch.empty(1, device=dev, dtype=torch.int32)
        res = torch.empty(1, device=dev, dtype=torch.float32)
    interp = interpreting()
    upcast = interp  # triton issue 11584: interpreted bf16 dots are wrong
    BM, BN, warps, stages = tile_config(D, config)
    sprec = score_precision(q.dtype, precision, upcast)
    # bf16 inputs: the fp32 operand of each solve/output product is split into three
    # bf16 parts against the exact bf16 keys/values (tf32x3-class accuracy, half the work)
    split = q.dtype == torch.bfloat16 and precision == "tf32x3"

    far = torch.zeros(N, S, device=dev, dtype=torch.int8)
    dummy = torch.zeros(1, device=dev, dtype=torch.int32)

    def launch(cfg, first=True, tile_ids=dummy, anchors=dummy, todo=far):
        bm, bn, nw, ns = cfg
        grid = (triton.cdiv(S, bm), N) if first else (tile_ids.numel(), 1)
        # rows of later rounds are far from their anchor or lost too much on the split
        # path: they run the anchored one
        _lla_fwd_kernel[grid](
            q, k, v, lam, o, m, omega, den, rho, fallback, iters, res, tile_ids, anchors, todo, far,
            S, float(scale), float(cg_tol), int(cg_max_iters), float(delta_eps),
            D=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, JACOBI=(preconditioner == "jacobi"),
            PREC=precision, SPREC=sprec, SPLIT=split and first, WANT_STATS=bool(want_stats), FIRST=first,
            num_warps=nw, num_stages=ns,
        )
        return cfg

    cfg = launch_fitting("fwd", (D, q.dtype, precision), (BM, BN, warps, stages), launch,
                         explicit=config is not None)
    rounds = torch.ones(N, S, device=dev, dtype=torch.int32) if want_stats else None
    bad = reanchor_rounds(far, cfg[0], fitted_rounds("fwd_round", (D, q.dtype, precision), cfg, 0,
                                                     lambda c, t, a, todo: launch(c, False, t, a, todo),
                                                     explicit=config is not None), rounds,
                          also=None if input_check is None else input_check[0])
    if bad:
        raise_nonfinite(input_check[1])
    return ForwardOut(o, m, omega, den, rho, fallback, iters if want_stats else None, res if want_stats else None,
                      rounds)
