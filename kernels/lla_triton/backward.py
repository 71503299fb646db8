"""FlashLLA backward in Triton: dq and d lambda per query tile, dk and dv per key tile.

docs/kernels-backward.md derives the gradient and explains the design; this file
keeps to why-comments. Notation (per query i, keys j <= i):

    z_ij = k_j - q_i      f_ij = 1 - <z_ij, rho_i>     den_i = sum_j w_ij f_ij
    c_ij = <g_i, v_j - o_i> / den_i                     b_i = sum_j c_ij w_ij z_ij
    Sigma_i u_i = b_i     e_ij = c_ij - <u_i, z_ij>     beta_i = lambda_i <u_i, rho_i>
    dA_ij = w_ij (f_ij e_ij + beta_i)
    dq_i = s sum_j dA_ij k_j + rho_i sum_j w_ij e_ij + u_i den_i
    dk_j = s sum_i dA_ij q_i - sum_i w_ij (e_ij rho_i + f_ij u_i)
    dv_j = sum_i (w_ij f_ij / den_i) g_i          dlambda_i = omega_i <u_i, rho_i>

Kernel A (one program per query tile) recomputes m_i, omega_i, den_i and o_i
itself in its first pass, from the saved rho alone: the gradient is then that of
exactly the weights it recomputes, whatever rounding the forward's saved
normalisers carried. It solves for u_i by CG and hands per-row scalars to
kernel B (one program per key tile), which loops over query tiles i >= j. Neither
uses atomics: every output element is written by one program, so runs are
bitwise reproducible.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (PRECISIONS, SUPPORTED_HEAD_DIMS, fitted_rounds, interpreting, launch_fitting,
                      reanchor_rounds, score_precision, backward_product_precision)
from .forward import NO_SPECIALIZE, _cg, _dot3, anchor_too_far, split_too_lossy

DEFAULT_PRECISION = "tf32x3"


class BackwardOut(NamedTuple):
    dq: torch.Tensor  # (N, S, D) input dtype
    dk: torch.Tensor  # (N, S, D) input dtype
    dv: torch.Tensor  # (N, S, D) input dtype
    dlam: torch.Tensor  # (N, S) fp32, dL/dlambda_i per query
    u: torch.Tensor  # (N, S, D) fp32, the adjoint solution
    cg_iters: Optional[torch.Tensor]  # (N, S) int32
    cg_residual: Optional[torch.Tensor]  # (N, S) fp32, recursive relative residual at exit


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _load_rows(PTR, base, offs, S, D: tl.constexpr):
    offs_d = tl.arange(0, D)
    return tl.load(PTR + base + offs[:, None] * D + offs_d[None, :], mask=(offs < S)[:, None], other=0.0)


@triton.jit
def _gv_anchored(g_dot, gf, vp, UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """<g_i, v_j - v_ref> for a tile, (BLOCK_M, BLOCK_N), to fp32 accuracy.

    vp = v - v_ref is exact in fp32 for 16-bit v but not a 16-bit number, so the product
    is fp32-class: bf16 g is exact, and vp splits three ways against it (forward._dot3)."""
    if SPLIT:
        return tl.trans(_dot3(vp, tl.trans(g_dot), UPCAST))
    else:
        return tl.dot(gf, tl.trans(vp), input_precision=PREC)


@triton.jit
def _xk_tile(x, kp, k_dot, UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """<k'_j, x_i> for a tile (anchored keys), or on the split path <k_j, x_i> against the
    exact bf16 keys, expanded around 0 as the forward's output pass does: 3 bf16 MMAs
    instead of tf32x3's 6, its loss bounded by the split rule (forward.SPLIT_RATIO). The
    caller pairs it with <q'_i, x_i> or <q_i, x_i> to match."""
    if SPLIT:
        return _dot3(x, tl.trans(k_dot), UPCAST)
    else:
        return tl.dot(x, tl.trans(kp), input_precision=PREC)


@triton.jit
def _a_pass1_tile(q_dot, g_dot, gf, c, vref, rho, qr, K, V, base, start_n, S, scale, offs_m,
                  m_i, omega, den, ov, pk, p0, mk, kk, k2,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
                  JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, base, offs_n, S, D)
    v = _load_rows(V, base, offs_n, S, D)
    kf = k.to(tl.float32)
    # anchored keys: z_ij = k'_j - q'_i with the same anchor on both sides, so a
    # common offset of q and k cancels here, before any product
    kp = kf - c[None, :]
    # values anchored too (v' = v - v_ref, v_ref the anchor row's value): c_ij needs
    # <g_i, v_j - o_i>, a difference that is 0 where o_i = v_j exactly (the first token,
    # one dominant key) and is otherwise formed from two rounded sums of the size of v
    vp = v.to(tl.float32) - vref[None, :]
    if UPCAST:
        k_dot = kf
    else:
        k_dot = k
    # scores exactly as the forward forms them (unanchored, same operands)
    a = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC) * scale
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
        a = tl.where(keep, a, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(a, 1))
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(a - m_new[:, None])
    wf = w * ((1.0 + qr[:, None]) - _xk_tile(rho, kp, k_dot, UPCAST, PREC, SPLIT))
    gv = _gv_anchored(g_dot, gf, vp, UPCAST, PREC, SPLIT)
    wg = w * gv
    omega = omega * alpha + tl.sum(w, 1)
    den = den * alpha + tl.sum(wf, 1)
    # ov = sum_j w f (v_j - v_ref): o_i - v_ref = ov / den
    ov = ov * alpha[:, None] + tl.dot(wf, vp, input_precision=PREC)
    # b_i needs o_i, known only after this pass: keep sum_j w <g,v'_j> z_ij and
    # sum_j w z_ij apart and combine them with <g_i, o_i - v_ref> afterwards
    pk = pk * alpha[:, None] + tl.dot(wg, kp, input_precision=PREC)
    p0 = p0 * alpha + tl.sum(wg, 1)
    mk = mk * alpha[:, None] + tl.dot(w, kp, input_precision=PREC)
    kk = kk * alpha + tl.sum(w * tl.sum(kp * kp, 1)[None, :], 1)
    if JACOBI:
        k2 = k2 * alpha[:, None] + tl.dot(w, kp * kp, input_precision=PREC)
    return m_new, omega, den, ov, pk, p0, mk, kk, k2


@triton.jit
def _a_pass1(q_dot, g_dot, gf, c, vref, rho, qr, K, V, base, S, scale, offs_m, lo_full, hi,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
             JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    """Kernel A's pass 1 over the causal key tiles (full, then masked): m, omega, den, o
    and the pieces of b (and sum_j w_ij k'_j^2 for Jacobi)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    omega = tl.zeros([BLOCK_M], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    ov = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    pk = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    p0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    mk = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kk = tl.zeros([BLOCK_M], dtype=tl.float32)
    if JACOBI:
        k2 = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    else:
        k2 = 0.0
    for start_n in range(0, lo_full, BLOCK_N):
        m_i, omega, den, ov, pk, p0, mk, kk, k2 = _a_pass1_tile(
            q_dot, g_dot, gf, c, vref, rho, qr, K, V, base, start_n, S, scale, offs_m,
            m_i, omega, den, ov, pk, p0, mk, kk, k2, D, BLOCK_N, UPCAST, False, JACOBI, PREC, SPREC, SPLIT)
    for start_n in range(lo_full, hi, BLOCK_N):
        m_i, omega, den, ov, pk, p0, mk, kk, k2 = _a_pass1_tile(
            q_dot, g_dot, gf, c, vref, rho, qr, K, V, base, start_n, S, scale, offs_m,
            m_i, omega, den, ov, pk, p0, mk, kk, k2, D, BLOCK_N, UPCAST, True, JACOBI, PREC, SPREC, SPLIT)
    return m_i, omega, den, ov, pk, p0, mk, kk, k2


@triton.jit
def _a_grad_tile(q_dot, g_dot, gf, c, vref, rho, qr, u, uq, go, inv_den, beta, K, V, base, start_n, S, scale,
                 offs_m, m_i, dqa, esum,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
                 PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, base, offs_n, S, D)
    v = _load_rows(V, base, offs_n, S, D)
    kf = k.to(tl.float32)
    kp = kf - c[None, :]
    vp = v.to(tl.float32) - vref[None, :]
    if UPCAST:
        k_dot = kf
    else:
        k_dot = k
    a = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC) * scale
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
        a = tl.where(keep, a, float("-inf"))
    w = tl.exp(a - m_i[:, None])
    f = (1.0 + qr[:, None]) - _xk_tile(rho, kp, k_dot, UPCAST, PREC, SPLIT)
    # go = <g_i, o_i - v_ref> here (pass 1's anchored values)
    cc = (_gv_anchored(g_dot, gf, vp, UPCAST, PREC, SPLIT) - go[:, None]) * inv_den[:, None]
    e = cc - (_xk_tile(u, kp, k_dot, UPCAST, PREC, SPLIT) - uq[:, None])
    da = w * (f * e + beta[:, None])
    # sum_j dA_ij = 0 exactly (o is invariant to a per-row shift of the scores), so
    # k'_j and k_j give the same dq; the anchored k' avoid the offset's rounding, and
    # the split path's exact bf16 k lose at most its 5 bits (SPLIT_RATIO) against a
    # bf16 dq: 3 bf16 MMAs instead of tf32x3's 6
    if SPLIT:
        dqa += _dot3(da, k_dot, UPCAST)
    else:
        dqa += tl.dot(da, kp, input_precision=PREC)
    esum += tl.sum(w * e, 1)
    return dqa, esum


# ----------------------------------------------------------------------------- kernel A
@triton.jit
def _a_solve_rows(q_dot, g_dot, qf, gf, c, vref, todo, fb, rho, lam, K, V, base, S, scale, cg_tol, cg_max_iters,
                  offs_m, row_ok, lo_full, hi,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, JACOBI: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Kernel A's passes for one tile around anchor c; the adjoint CG runs on the rows
    of ``todo`` this anchor serves, and ``far`` (the rest of todo) goes to the next
    anchor, as in the forward (docs/kernels.md, "Anchor")."""
    qp = qf - c[None, :]
    # f_ij = 1 + <q_i, rho_i> - <k_j, rho_i>: around the anchor, or around 0 on the split path
    if SPLIT:
        qr = tl.sum(qf * rho, 1)
    else:
        qr = tl.sum(qp * rho, 1)

    m_i, omega, den, ov, pk, p0, mk, kk, k2 = _a_pass1(q_dot, g_dot, gf, c, vref, rho, qr, K, V, base, S, scale,
                                                       offs_m, lo_full, hi, D, BLOCK_M, BLOCK_N, UPCAST, JACOBI,
                                                       PREC, SPREC, SPLIT)
    far = todo & anchor_too_far(qp, mk, kk, omega)
    if SPLIT:
        # the forward's rule: rows the split matvec would serve badly go to a later,
        # anchored round (the launcher passes SPLIT only to the first)
        far = far | (todo & split_too_lossy(qf, c, mk, kk, omega))
    mine = todo & (~far)

    den_used = tl.where(den == 0.0, 1.0, den)  # den = 0 only on padding rows
    inv_den = tl.where(row_ok, 1.0 / den_used, 0.0)
    # go = <g_i, o_i - v_ref>; o_i = v_ref + ov / den
    go = tl.sum(gf * (ov * inv_den[:, None]), 1)
    # b_i = sum_j (<g,v'_j> - <g,o_i - v_ref>) w_ij (k'_j - q'_i) / den_i
    b = ((pk - p0[:, None] * qp) - go[:, None] * (mk - omega[:, None] * qp)) * inv_den[:, None]
    b = tl.where(row_ok[:, None] & (~fb)[:, None], b, 0.0)
    lam_omega = lam * omega
    # the forward's matvec, split path included: bf16 keys are exact, so Sigma_i p_i is
    # expanded around 0 (q itself) with 3 bf16 MMAs per product instead of tf32x3's 6
    if SPLIT:
        qx = qf
    else:
        qx = qp

    # ---- CG on Sigma_i u_i = b_i: the forward's iteration and stopping rule
    b2 = tl.sum(b * b, 1)
    u, rr, iters = _cg(b, mine, k2, mk, qp, omega, lam_omega, cg_tol, cg_max_iters,
                       qx, q_dot, c, K, base, S, scale, offs_m, m_i, lo_full, hi,
                       D, BLOCK_M, BLOCK_N, UPCAST, JACOBI, PREC, SPREC, SPLIT)

    # ---- pass 3: dq and E_i = sum_j w_ij e_ij
    ur = tl.sum(u * rho, 1)
    beta = lam * ur
    if SPLIT:
        uq = tl.sum(u * qf, 1)
    else:
        uq = tl.sum(u * qp, 1)
    dqa = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    esum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, lo_full, BLOCK_N):
        dqa, esum = _a_grad_tile(q_dot, g_dot, gf, c, vref, rho, qr, u, uq, go, inv_den, beta, K, V, base,
                                 start_n, S, scale, offs_m, m_i, dqa, esum, D, BLOCK_N, UPCAST, False, PREC,
                                 SPREC, SPLIT)
    for start_n in range(lo_full, hi, BLOCK_N):
        dqa, esum = _a_grad_tile(q_dot, g_dot, gf, c, vref, rho, qr, u, uq, go, inv_den, beta, K, V, base,
                                 start_n, S, scale, offs_m, m_i, dqa, esum, D, BLOCK_N, UPCAST, True, PREC,
                                 SPREC, SPLIT)
    # -sum_j dZ_ij = rho_i E_i + u_i sum_j w_ij f_ij; the last sum is den
    dq = scale * dqa + esum[:, None] * rho + den[:, None] * u
    rel = tl.where(b2 > 0.0, tl.sqrt(rr / tl.where(b2 > 0.0, b2, 1.0)), 0.0)
    return u, dq, omega * ur, m_i, den_used, go, beta, iters, rel, far


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _lla_bwd_query_kernel(Q, K, V, G, RHO, LAM, FB, U, DQ, DLAM, M_OUT, DEN_OUT, GO_OUT, VA_OUT, BETA_OUT,
                          ITERS_OUT, RES_OUT, TILE_IDS, ANCHORS, TODO, FAR_OUT,
                          S, scale, cg_tol, cg_max_iters,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          UPCAST: tl.constexpr, JACOBI: tl.constexpr, PREC: tl.constexpr,
                          SPREC: tl.constexpr, SPLIT: tl.constexpr, FIRST: tl.constexpr):
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

    q = _load_rows(Q, base, offs_m, S, D)
    g = _load_rows(G, base, offs_m, S, D)
    qf = q.to(tl.float32)
    gf = g.to(tl.float32)
    if UPCAST:
        q_dot = qf
        g_dot = gf
    else:
        q_dot = q
        g_dot = g
    rho = _load_rows(RHO, base, offs_m, S, D)
    lam = tl.load(LAM + row_ptrs, mask=row_ok, other=0.0)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, S)
    lo_full = ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    # Rows where the forward's delta guard fell back to the softmax average arrive with
    # rho_i = 0 (the caller zeroes it), so den_i = omega_i and o_i = sum w v / omega
    # here exactly as there; b_i = 0 makes u_i = 0, and what remains is the gradient
    # of softmax attention, the function the forward actually returned for that row.
    fb = tl.load(FB + row_ptrs, mask=row_ok, other=0) != 0

    # anchors as in the forward: the tile's first row, then (later launches) the first
    # row still too far
    if FIRST:
        a_row = pid_m * BLOCK_M
        todo = row_ok
    else:
        a_row = tl.load(ANCHORS + tl.program_id(0))
        todo = row_ok & (tl.load(TODO + row_ptrs, mask=row_ok, other=0) != 0)
    c = tl.load(Q + base + a_row * D + offs_d).to(tl.float32)
    vref = tl.load(V + base + a_row * D + offs_d).to(tl.float32)
    u, dq, dlam, m_i, den, go, beta, iters, rel, far = _a_solve_rows(
        q_dot, g_dot, qf, gf, c, vref, todo, fb, rho, lam, K, V, base, S, scale, cg_tol, cg_max_iters,
        offs_m, row_ok, lo_full, hi, D, BLOCK_M, BLOCK_N, UPCAST, JACOBI, PREC, SPREC, SPLIT)
    take = todo & (~far)

    tile_ptrs = base + offs_m[:, None] * D + offs_d[None, :]
    tl.store(U + tile_ptrs, u, mask=take[:, None])
    tl.store(DQ + tile_ptrs, dq.to(DQ.dtype.element_ty), mask=take[:, None])
    tl.store(DLAM + row_ptrs, dlam, mask=take)
    tl.store(M_OUT + row_ptrs, m_i, mask=take)
    tl.store(DEN_OUT + row_ptrs, den, mask=take)
    # go = <g_i, o_i - v_a> around this anchor: kernel B re-anchors it to its own
    tl.store(GO_OUT + row_ptrs, go, mask=take)
    tl.store(VA_OUT + row_ptrs, a_row.to(tl.int32) + tl.zeros([BLOCK_M], dtype=tl.int32), mask=take)
    tl.store(BETA_OUT + row_ptrs, beta, mask=take)
    tl.store(ITERS_OUT + row_ptrs, iters, mask=take)
    tl.store(RES_OUT + row_ptrs, rel, mask=take)
    tl.store(FAR_OUT + row_ptrs, far.to(tl.int8), mask=row_ok)


# ----------------------------------------------------------------------------- kernel B
@triton.jit
def _b_tile(k_dot, vp, vref, kp, c, V, Q, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN, BETA_IN, base, row_base,
            start_m, S, scale, offs_n, dv, dka, cs, sw, swq, swqq,
            D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
            PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S
    q = _load_rows(Q, base, offs_m, S, D)
    g = _load_rows(G, base, offs_m, S, D)
    rho = _load_rows(RHO, base, offs_m, S, D)
    u = _load_rows(U, base, offs_m, S, D)
    # padding rows: m = +inf makes w = 0, den = 1 keeps c finite, so they add 0
    m_i = tl.load(M_IN + row_base + offs_m, mask=row_ok, other=float("inf"))
    den = tl.load(DEN_IN + row_base + offs_m, mask=row_ok, other=1.0)
    go = tl.load(GO_IN + row_base + offs_m, mask=row_ok, other=0.0)
    beta = tl.load(BETA_IN + row_base + offs_m, mask=row_ok, other=0.0)
    # kernel A's value anchor of each query row (its tile's, or its round's)
    va_row = tl.load(VA_IN + row_base + offs_m, mask=row_ok, other=0)
    va = tl.load(V + base + va_row[:, None] * D + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
    qf = q.to(tl.float32)
    gf = g.to(tl.float32)
    qp = qf - c[None, :]
    if UPCAST:
        q_dot = qf
        g_dot = gf
    else:
        q_dot = q
        g_dot = g
    inv_den = 1.0 / den
    # <g_i, o_i - v_ref> for this program's anchor v_ref: kernel A's <g_i, o_i - v_a> plus
    # <g_i, v_a - v_ref>, both exactly 0 at the first token (v_a = v_ref = v_0, o_0 = v_0)
    go = go + tl.sum(gf * (va.to(tl.float32) - vref[None, :]), 1)
    qr = tl.sum(qp * rho, 1)
    uq = tl.sum(qp * u, 1)
    # transposed tiles: rows are keys j, columns queries i. The scores are formed as kernel A
    # forms them (q k^T, then transposed): w_ij is divided by A's den_i and measured against
    # A's m_i, and k q^T rounds differently: at |a| ~ 4e2 a one-hot row's weight would be
    # 1 + O(u |a|) instead of exactly 1, a 1000x fp32 error in dv (regressions.json)
    a = tl.trans(tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC)) * scale
    if MASK:
        keep = (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :]
        a = tl.where(keep, a, float("-inf"))
    w = tl.exp(a - m_i[None, :])
    f = (1.0 + qr[None, :]) - tl.dot(kp, tl.trans(rho), input_precision=PREC)
    # c_ij = <g_i, (v_j - v_ref) - (o_i - v_ref)> / den_i, anchored as in kernel A: 0 exactly
    # where o_i = v_j = v_ref (the first token), and otherwise rounding relative to the
    # values' spread around the anchor, not to |v|
    if SPLIT:
        gv = _dot3(vp, tl.trans(g_dot), UPCAST)
    else:
        gv = tl.dot(vp, tl.trans(gf), input_precision=PREC)
    cc = (gv - go[None, :]) * inv_den[None, :]
    e = cc - (tl.dot(kp, tl.trans(u), input_precision=PREC) - uq[None, :])
    wf = w * f
    if SPLIT:
        # bf16 g is exact: the fp32 weights split three ways against it (forward._dot3)
        dv += _dot3(wf * inv_den[None, :], g_dot, UPCAST)
    else:
        dv += tl.dot(wf * inv_den[None, :], gf, input_precision=PREC)
    da = w * (f * e + beta[None, :])
    dka += tl.dot(scale * da, qp, input_precision=PREC)
    dka -= tl.dot(w * e, rho, input_precision=PREC)
    dka -= tl.dot(wf, u, input_precision=PREC)
    cs += tl.sum(da, 1)
    # the key-side distance test (anchor_too_far with the roles of q and k swapped)
    sw += tl.sum(w, 1)
    # swq only routes keys (anchor_too_far against a ratio of 8): TF32's 2^-11 is ample
    swq += tl.dot(w, qp, input_precision="tf32")
    swqq += tl.sum(w * tl.sum(qp * qp, 1)[None, :], 1)
    return dv, dka, cs, sw, swq, swqq


@triton.jit
def _b_sweep(k_dot, vf, kf, c, vref, todo, V, Q, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN, BETA_IN, base, row_base,
             S, scale, pid_n, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
             PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr):
    """dk, dv for the key tile around anchor c, and the keys of ``todo`` too far from it."""
    kp = kf - c[None, :]
    vp = vf - vref[None, :]
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dka = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    cs = tl.zeros([BLOCK_N], dtype=tl.float32)
    sw = tl.zeros([BLOCK_N], dtype=tl.float32)
    swq = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    swqq = tl.zeros([BLOCK_N], dtype=tl.float32)
    # query tiles that reach the diagonal need the causal mask; later ones do not
    # (padding rows past S are neutralised by their loads)
    first = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    full = tl.cdiv((pid_n + 1) * BLOCK_N - 1, BLOCK_M) * BLOCK_M
    full = tl.minimum(full, tl.cdiv(S, BLOCK_M) * BLOCK_M)
    for start_m in range(first, full, BLOCK_M):
        dv, dka, cs, sw, swq, swqq = _b_tile(k_dot, vp, vref, kp, c, V, Q, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN,
                                             BETA_IN, base, row_base, start_m, S, scale, offs_n_of(pid_n, BLOCK_N),
                                             dv, dka, cs, sw, swq, swqq, D, BLOCK_M, UPCAST, True, PREC, SPREC, SPLIT)
    for start_m in range(full, S, BLOCK_M):
        dv, dka, cs, sw, swq, swqq = _b_tile(k_dot, vp, vref, kp, c, V, Q, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN,
                                             BETA_IN, base, row_base, start_m, S, scale, offs_n_of(pid_n, BLOCK_N),
                                             dv, dka, cs, sw, swq, swqq, D, BLOCK_M, UPCAST, False, PREC, SPREC, SPLIT)
    # s sum_i dA_ij q_i with q_i = q'_i + c: the anchor's share is a rank-one term
    dk = dka + (scale * cs)[:, None] * c[None, :]
    far = todo & anchor_too_far(kp, swq, swqq, sw)
    return dk, dv, far


@triton.jit
def offs_n_of(pid_n, BLOCK_N: tl.constexpr):
    return pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit(do_not_specialize=("S",))
def _lla_bwd_key_kernel(Q, K, V, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN, BETA_IN, DK, DV,
                        TILE_IDS, ANCHORS, TODO, FAR_OUT, S, scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, SPLIT: tl.constexpr,
                        FIRST: tl.constexpr):
    n_tiles = tl.cdiv(S, BLOCK_N)
    if FIRST:
        # early key tiles meet the most queries: launch them first
        pid_n = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
    else:
        tile = tl.load(TILE_IDS + tl.program_id(0))
        pid_n = tile % n_tiles
        head = (tile // n_tiles).to(tl.int64)
    base = head * S * D
    row_base = head * S
    offs_n = offs_n_of(pid_n, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < S
    k = _load_rows(K, base, offs_n, S, D)
    v = _load_rows(V, base, offs_n, S, D)
    kf = k.to(tl.float32)
    if UPCAST:
        k_dot = kf
    else:
        k_dot = k
    # anchors as in kernel A, on the key side: the tile's first key, then (later
    # launches) the first key whose queries sit too far from it
    if FIRST:
        a_row = pid_n * BLOCK_N
        todo = col_ok
    else:
        a_row = tl.load(ANCHORS + tl.program_id(0))
        todo = col_ok & (tl.load(TODO + row_base + offs_n, mask=col_ok, other=0) != 0)
    c = tl.load(K + base + a_row * D + offs_d).to(tl.float32)
    # the values anchored at the same row, for c_ij (as kernel A anchors its query rows')
    vref = tl.load(V + base + a_row * D + offs_d).to(tl.float32)
    dk, dv, far = _b_sweep(k_dot, v.to(tl.float32), kf, c, vref, todo, V, Q, G, RHO, U, M_IN, DEN_IN, GO_IN, VA_IN,
                           BETA_IN, base, row_base, S, scale, pid_n, D, BLOCK_M, BLOCK_N, UPCAST, PREC, SPREC, SPLIT)
    take = todo & (~far)
    tile_ptrs = base + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + tile_ptrs, dk.to(DK.dtype.element_ty), mask=take[:, None])
    tl.store(DV + tile_ptrs, dv.to(DV.dtype.element_ty), mask=take[:, None])
    tl.store(FAR_OUT + row_base + offs_n, far.to(tl.int8), mask=col_ok)


# ----------------------------------------------------------------------------- launcher
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel A and kernel B per head dim;
# hand-picked (docs/performance.md), not autotuned, so runs are deterministic.
GPU_CONFIGS_A = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    # (128, 64, 8, 3) until the split-path products; then 7.89 ms against 6.14 ms for
    # the backward at (16, 1, 2048, 64), same run (docs/performance.md, seventh run)
    64: (64, 64, 4, 2),
    128: (32, 64, 8, 2),
}
GPU_CONFIGS_B = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    64: (32, 128, 8, 2),
    128: (32, 64, 8, 2),
}
INTERP_CONFIG = (16, 16, 1, 1)


def _configs(D, config_a=None, config_b=None):
    if interpreting():
        ca, cb = INTERP_CONFIG, INTERP_CONFIG
    else:
        ca, cb = GPU_CONFIGS_A[D], GPU_CONFIGS_B[D]
    return tuple(config_a or ca), tuple(config_b or cb)


def lla_backward_kernel(q, k, v, rho, lam, grad_out, scale, *, fallback=None, cg_tol, cg_max_iters,
                        preconditioner=None, precision=None, config_a=None, config_b=None) -> BackwardOut:
    """Gradients of sum(o * grad_out) with respect to q, k, v and lambda.

    q, k, v, grad_out: (N, S, D) contiguous, one dtype; rho: (N, S, D) fp32 from the
    forward; lam: (N, S) fp32; fallback: the forward's (N, S) int8 mask of rows the
    delta guard returned as softmax averages (None: no such row). Returns BackwardOut;
    dq, dk, dv in the input dtype.
    """
    N, S, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dimension {D} unsupported; expected one of {SUPPORTED_HEAD_DIMS}")
    precision = precision or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if preconditioner not in (None, "none", "jacobi"):
        raise ValueError(f"preconditioner: expected None, 'none' or 'jacobi', got {preconditioner!r}")
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype:
        raise ValueError(
            f"grad_output: expected shape {tuple(q.shape)} and dtype {q.dtype}, "
            f"got shape {tuple(grad_out.shape)} and dtype {grad_out.dtype}")
    if rho.shape != q.shape or rho.dtype != torch.float32:
        raise ValueError(f"rho: expected fp32 of shape {tuple(q.shape)}, got {rho.dtype} {tuple(rho.shape)}")
    if lam.shape != (N, S) or lam.dtype != torch.float32:
        raise ValueError(f"lam: expected fp32 of shape {(N, S)}, got {lam.dtype} {tuple(lam.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("grad_output", grad_out), ("rho", rho), ("lam", lam)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: lla_backward_kernel needs a contiguous tensor")
    dev = q.device
    f32 = torch.float32
    if fallback is None:
        fallback = torch.zeros(N, S, device=dev, dtype=torch.int8)
    elif fallback.shape != (N, S):
        raise ValueError(f"fallback: expected shape {(N, S)}, got {tuple(fallback.shape)}")
    else:
        fallback = fallback.to(torch.int8).contiguous()
        # both kernels read rho: a fallback row is the rho = 0 (lambda -> inf) limit
        rho = rho.masked_fill(fallback.bool()[..., None], 0.0)
    upcast = interpreting()  # triton issue 11584: interpreted bf16 dots are wrong
    # The interpreter casts fp32 -> bf16 by truncation (twice the error of the
    # GPU's round-to-nearest): there the kernels store fp32 and torch rounds.
    gdt = f32 if upcast else q.dtype
    dq = torch.empty(N, S, D, device=dev, dtype=gdt)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    u = torch.empty(N, S, D, device=dev, dtype=f32)
    dlam = torch.empty(N, S, device=dev, dtype=f32)
    m = torch.empty_like(dlam)
    den = torch.empty_like(dlam)
    go = torch.empty_like(dlam)
    va = torch.zeros(N, S, device=dev, dtype=torch.int32)
    beta = torch.empty_like(dlam)
    iters = torch.empty(N, S, device=dev, dtype=torch.int32)
    res = torch.empty_like(dlam)
    sprec = score_precision(q.dtype, precision, upcast)
    bprec = backward_product_precision(q.dtype, precision)
    # the forward's rule: bf16 keys are exact in bf16, so the adjoint CG's products split
    # their fp32 operand three ways against them (forward._dot3)
    split = q.dtype == torch.bfloat16 and precision == "tf32x3"
    cfg_a, cfg_b = _configs(D, config_a, config_b)

    far = torch.zeros(N, S, device=dev, dtype=torch.int8)
    dummy = torch.zeros(1, device=dev, dtype=torch.int32)

    def launch_a(cfg, first=True, tile_ids=dummy, anchors=dummy, todo=far):
        am, an, aw, ast = cfg
        grid = (triton.cdiv(S, am), N) if first else (tile_ids.numel(), 1)
        _lla_bwd_query_kernel[grid](
            q, k, v, grad_out, rho, lam, fallback, u, dq, dlam, m, den, go, va, beta, iters, res,
            tile_ids, anchors, todo, far,
            S, float(scale), float(cg_tol), int(cg_max_iters),
            D=D, BLOCK_M=am, BLOCK_N=an, UPCAST=upcast, JACOBI=(preconditioner == "jacobi"),
            PREC=bprec, SPREC=sprec, SPLIT=split and first, FIRST=first, num_warps=aw, num_stages=ast,
        )
        return cfg

    def launch_b(cfg, first=True, tile_ids=dummy, anchors=dummy, todo=far):
        bm, bn, bw, bst = cfg
        grid = (triton.cdiv(S, bn), N) if first else (tile_ids.numel(), 1)
        _lla_bwd_key_kernel[grid](
            q, k, v, grad_out, rho, u, m, den, go, va, beta, dk, dv, tile_ids, anchors, todo, far, S, float(scale),
            D=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, PREC=bprec, SPREC=sprec, SPLIT=split, FIRST=first,
            num_warps=bw, num_stages=bst,
        )
        return cfg

    # fp32 operands at D = 64 overflow the H100's 227 KiB with kernel A's default tiles
    key = (D, q.dtype, precision)
    ca = launch_fitting("bwd_query", key, cfg_a, launch_a, explicit=config_a is not None)
    # rows far from their tile's anchor, again around their own (docs/kernels.md)
    reanchor_rounds(far, ca[0], fitted_rounds("bwd_query_round", key, ca, 0,
                                              lambda c, t, a, todo: launch_a(c, False, t, a, todo),
                                              explicit=config_a is not None))
    cb = launch_fitting("bwd_key", key, cfg_b, launch_b, explicit=config_b is not None)
    # kernel B's tiles are key tiles: its rounds keep BLOCK_N
    reanchor_rounds(far, cb[1], fitted_rounds("bwd_key_round", key, cb, 1,
                                              lambda c, t, a, todo: launch_b(c, False, t, a, todo),
                                              explicit=config_b is not None))
    return BackwardOut(dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dlam, u, iters, res)
