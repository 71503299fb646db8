"""Parallax forward and backward in Triton.

docs/kernels-parallax.md derives the gradient and explains the centring; this file keeps
to why-comments. Notation per query i, keys j <= i (c_k = k_0 and c_v = v_0 are the
head's first key and value, the anchors):

    a_ij = s <q_i, k_j>      p_ij = exp(a_ij - m_i) / W_i   kp_j = k_j - c_k, vp_j = v_j - c_v
    d_ij = <kp_j, r_i>       dbar_i = sum_j p_ij d_ij       e_ij = d_ij - dbar_i = <k_j - kbar_i, r_i>
    nup_i = sum_j p_ij vp_j  cr_i = C_i r_i = sum_j p_ij vp_j d_ij - nup_i dbar_i
    o_i = c_v + nup_i - cr_i

The forward never evaluates that expansion of cr_i (its two sums cancel at |vp| |d| when
the softmax sits on a key far from k_0): it streams the centred co-moment
M_i = sum_j w_ij (vp_j - nup_i)(d_ij - dbar_i) over key tiles with Chan et al.'s merge.

Backward, with g_i = dL/do_i, gv_ij = <g_i, vp_j> - <g_i, nup_i> = <g_i, v_j - nu_i> and
delta_i = <g_i, cr_i>:

    da_ij = p_ij (gv_ij (1 - e_ij) + delta_i)
    dq_i = s sum_j da_ij kp_j         dr_i = -sum_j p_ij gv_ij kp_j
    dk_j = s sum_i da_ij q_i - sum_i p_ij gv_ij r_i
    dv_j = sum_i p_ij (1 - e_ij) g_i

Both passes form a_ij - m_i, e_ij and gv_ij against each row's heaviest key ref_i (m_i is
its score), and the dq, dr sums with k_ref subtracted, so that each cancels exactly at that
key (docs/kernels-parallax.md §3, §5). The scores and d go through exact split products only
on the entries whose plain product's rounding bound exceeds u_in / 4 (u_in: the inputs'
unit roundoff); a tile pair with no such entry forms the plain products alone
(docs/kernels-parallax.md §3, "Fast tiles"; _score_pair, _d_pair).

One program per (head, query tile) for the forward and for dq, dr; one per (head, key
tile) for dk, dv. No atomics: every output element is written by one program. For bf16
inputs a first kernel forms each key's splits once (_px_key_prep_kernel), and the tile
products run as bf16 products of exact parts (docs/kernels-parallax.md §3, "bf16 products").
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# Input precision of fp32 tl.dot on the GPU: three TF32 products, about fp32 accuracy.
# One TF32 product (10 mantissa bits) would put the covariance term's error far above
# the fp32 dense reference the budget compares with.
GPU_PRECISION = "tf32x3"
# fp32 inputs' tl.dot precision on the GPU: exact fp32 products summed by FMAs, as the dense
# fp32 reference sums them. The tensor cores' fp32 accumulation is not round-to-nearest (it
# truncates, so its errors add with one sign): on an H200, with tf32x3 products, fp32 draws
# missed issue 22's same-precision target by up to 1.44x, and on these products they pass
# (docs/kernels-parallax.md §6). None gives GPU_PRECISION.
FP32_PRECISION = "ieee"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class ForwardOut(NamedTuple):
    # a forward with bf16 weights (outside autograd) keeps o, split, norms, ta and td alone,
    # the row statistics None
    o: torch.Tensor  # (N, S, Dv) input dtype
    m: torch.Tensor  # (N, S) accumulation dtype: m_i = max_j a_ij, the score at key ref_i (0 with the split)
    lw: torch.Tensor  # (N, S): log sum_j exp(a_ij - m_i), kept apart from m_i (m_i + lw_i rounds lw_i at u |m_i|)
    nup: torch.Tensor  # (N, S, Dv): nu_i - v_0
    dbar: torch.Tensor  # (N, S): sum_j p_ij d_ij - tref_i - trem_i (d_ij = <k_j - k_0, r_i>)
    cr: torch.Tensor  # (N, S, Dv): C_i r_i
    tref: torch.Tensor  # (N, S): the row's reference, exact r_hi kp_hi^T at key ref_i (0 without the split)
    trem: torch.Tensor  # (N, S): and d's remainder there (0 without the split): d_ij is kept as
    #                     (hi_ij - tref_i) + (rem_ij - trem_i), exactly 0 at key ref_i
    ref: torch.Tensor  # (N, S) int32: the row's heaviest key (the first argmax_j a_ij in tile order)
    sa: torch.Tensor  # (N, S): with the split, q_hi k_hi^T at key ref_i (exact), the scores' reference
    sr: torch.Tensor  # (N, S): and the remainder q_lo k^T + q_hi k_lo^T there (0 without the split)
    split: bool  # d and the scores formed through the split products
    norms: torch.Tensor  # (N, S, N_NORMS) fp32: the bounds of the fast-tile test (NORM_NAMES)
    ta: float  # the thresholds of the fast-tile test (fast_thresholds), scores
    td: float  # and d


class BackwardOut(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dr: torch.Tensor


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _load_rows(PTR, base, offs, S, W: tl.constexpr):
    offs_w = tl.arange(0, W)
    return tl.load(PTR + base + offs[:, None] * W + offs_w[None, :], mask=(offs < S)[:, None], other=0.0)


@triton.jit
def _query_program(S, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program of a query-tile launch: its tile (the last first: late query tiles do the
    most work, so launching them first balances the tail), head, the head's offsets into the
    (N, S, D), (N, S, Dv) and (N, S) tensors, and the tile's rows."""
    pid_m = tl.cdiv(S, BLOCK_M) - 1 - tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    return pid_m, head, head * S * D, head * S * DV, head * S, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _load_keys(K, V, kbase, vbase, offs_n, S, ck, cv, D: tl.constexpr, DV: tl.constexpr,
               UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Raw keys for the scores (exact 16-bit operands compiled), and the keys and values
    less their anchors in the accumulation dtype for everything else."""
    k = _load_rows(K, kbase, offs_n, S, D)
    kp = k.to(ACC) - ck[None, :]
    v = _load_rows(V, vbase, offs_n, S, DV)
    vp = v.to(ACC) - cv[None, :]
    if UPCAST:
        k_dot = k.to(ACC)
        v_dot = v.to(ACC)
    else:
        k_dot = k
        v_dot = v
    return k_dot, kp, vp, v_dot


@triton.jit
def _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK: tl.constexpr, SPREC: tl.constexpr):
    a = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC) * scale
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
        a = tl.where(keep, a, float("-inf"))
    return a


@triton.jit
def _masked(x, offs_m, offs_n, S, MASK: tl.constexpr):
    if MASK:
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
        x = tl.where(keep, x, float("-inf"))
    return x


@triton.jit
def _grid_split(x, g):
    """x = hi + lo with hi on the grid g (a power of two): both parts exact."""
    hi = tl.floor(x / g + 0.5) * g
    return hi, x - hi


@triton.jit
def _pow2_below(x):
    """The largest power of two <= x >= 0 (its exponent bits alone); 1 where x is 0 or
    subnormal, whose grid would be 0 (a grid of 1 puts all of x in the exact low part)."""
    p = (x.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(p > 0.0, p, 1.0)


@triton.jit
def _split_rows(x):
    """x = hi + lo with hi on a grid of 2^-6 the largest power of two in each row: an
    integer of at most 8 bits times the row's grid, both parts exact."""
    return _grid_split(x, _pow2_below(tl.max(tl.abs(x), 1))[:, None] * 0.015625)


@triton.jit
def _exact_dot(r_hi, kp_hi, EXACT: tl.constexpr):
    """r_hi kp_hi^T, exact in fp32 for 8-bit hi parts (docs/kernels-parallax.md §3):
    8-bit significands are exact bf16 values, so one bf16 product."""
    return _dot16(r_hi, tl.trans(kp_hi), EXACT)


@triton.jit
def _dot16(a, b, EXACT: tl.constexpr):
    """a @ b for operands whose entries are exact bf16 values (held in any float dtype):
    one bf16 product, whose products are exact, accumulated in fp32. The interpreter (its
    bf16 dot is broken) takes the same values in fp32."""
    if EXACT == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=EXACT)


@triton.jit
def _bf16_parts(x):
    """fp32 x = p1 + p2 + p3 exactly, each part a bf16 value: each conversion keeps 8
    significant bits of what is left, and 24 bits of fp32 need three (parts below bf16's
    smallest subnormal, 2^-133, are lost; nothing of that size survives the fp32 sums)."""
    p1 = x.to(tl.bfloat16)
    x1 = x - p1.to(tl.float32)
    p2 = x1.to(tl.bfloat16)
    p3 = (x1 - p2.to(tl.float32)).to(tl.bfloat16)
    return p1, p2, p3


@triton.jit
def _dot3(a, b16, EXACT: tl.constexpr):
    """a @ b16 for fp32 a and an exact-bf16 b16: three bf16 products of a's exact parts,
    every product exact and accumulated in fp32 (tf32x3 drops a_lo b_lo and rounds b to
    tf32 parts: this is at least as accurate at half its tensor-core cost)."""
    a1, a2, a3 = _bf16_parts(a)
    return _dot16(a1, b16, EXACT) + _dot16(a2, b16, EXACT) + _dot16(a3, b16, EXACT)


@triton.jit
def _score_rem(q_lo, q_hi, k16, kf, k_lo, PREC: tl.constexpr, B16: tl.constexpr, EXACT: tl.constexpr):
    """The remainder q_lo k^T + q_hi k_lo^T of the split scores. With bf16 inputs all four
    operands are exact bf16 values (q_hi: 8 bits on its grid; q_lo, k_lo: the bits of q, k
    below their row's grid, at most 8 of them), so two bf16 products with exact products."""
    if B16:
        return _dot16(q_lo, tl.trans(k16), EXACT) + _dot16(q_hi, tl.trans(k_lo), EXACT)
    else:
        return tl.dot(q_lo, tl.trans(kf), input_precision=PREC) + tl.dot(q_hi, tl.trans(k_lo), input_precision=PREC)


@triton.jit
def _d_rem(r16, r_lo, r_hi, kp, kp_hi, kp_lo, l1, l2, l3, PREC: tl.constexpr, B16: tl.constexpr,
           EXACT: tl.constexpr):
    """The remainder of d = r kp^T beyond the exact r_hi kp_hi^T. With bf16 inputs it is
    written r_lo kp_hi^T + r kp_lo^T (the same sum): r, r_lo and kp_hi are exact bf16
    values, kp_lo = kp - kp_hi is fp32 and goes in as its three exact bf16 parts l1, l2,
    l3, so four bf16 products with exact products; else r_lo kp^T + r_hi kp_lo^T at PREC."""
    if B16:
        return (_dot16(r_lo, tl.trans(kp_hi), EXACT) + _dot16(r16, tl.trans(l1), EXACT)
                + _dot16(r16, tl.trans(l2), EXACT) + _dot16(r16, tl.trans(l3), EXACT))
    else:
        return tl.dot(r_lo, tl.trans(kp), input_precision=PREC) + tl.dot(r_hi, tl.trans(kp_lo), input_precision=PREC)


@triton.jit
def _score_pair(q_dot, q_hi, q_lo, k_dot, KPARTS, kbase, offs_n, S, N_HEADS, qn, kn, ta,
                D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, EXACT: tl.constexpr,
                B16: tl.constexpr):
    """The unscaled scores <q_i, k_j> of a tile pair as (hi, rem), hi + rem the score.

    Per entry (docs/kernels-parallax.md §3, "Fast tiles"): where s |q_i| |k_j| <= ta (qn_i =
    s |q_i|, kn_j = |k_j|), the plain product in hi and 0 in rem; elsewhere the split, hi the
    exact q_hi k_hi^T and rem the remainder. The decision is a function of (q_i, k_j) alone,
    the same in every kernel and tiling (bitwise causal, the backward's p the forward's); a
    tile whose every entry passes skips the split products."""
    a_pl = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC).to(ACC)
    if tl.max(qn, 0) * tl.max(kn, 0) > ta:
        if B16:
            plane = N_HEADS.to(tl.int64) * S * D
            ptr = KPARTS + kbase + offs_n[:, None] * D + tl.arange(0, D)[None, :]
            ok = (offs_n < S)[:, None]
            k_hi = tl.load(ptr + KP_HI_K * plane, mask=ok, other=0.0)
            k_lo = tl.load(ptr + KP_LO_K * plane, mask=ok, other=0.0)
            kf = k_dot
        else:
            kf = k_dot.to(ACC)
            k_hi, k_lo = _split_rows(kf)
        fast = qn[:, None] * kn[None, :] <= ta
        hi = tl.where(fast, a_pl, _exact_dot(q_hi, k_hi, EXACT))
        rem = tl.where(fast, 0.0, _score_rem(q_lo, q_hi, k_dot, kf, k_lo, PREC, B16, EXACT))
    else:
        hi = a_pl
        rem = tl.zeros_like(a_pl)
    return hi, rem


@triton.jit
def _d_plain(rf, r16, k_dot, kp, c0, PREC: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr):
    """d's plain product: <k_j, r_i> - c0_i for bf16 inputs (one bf16 product, exact
    products), r kp^T at PREC for the others."""
    if B16:
        return _dot16(r16, tl.trans(k_dot), EXACT) - c0[:, None]
    else:
        return tl.dot(rf, tl.trans(kp), input_precision=PREC)


@triton.jit
def _d_pair(rf, r16, r_hi, r_lo, k_dot, kp, KPARTS, kbase, offs_n, S, N_HEADS, rn, kdn, c0, td,
            D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr):
    """d_ij = <k_j - k_0, r_i> of a tile pair as (hi, rem), as _score_pair does the scores:
    where |r_i| kd_j <= td, the plain product in hi; elsewhere the exact r_hi kp_hi^T and the
    remainder. For bf16 inputs the plain product is <k_j, r_i> - c0_i (c0_i = <k_0, r_i>), one
    bf16 product with exact products, and kd_j = |k_j| + |k_0| bounds its rounding; for the
    others it is r kp^T at PREC, and kd_j = |k_j - k_0|."""
    d_pl = _d_plain(rf, r16, k_dot, kp, c0, PREC, EXACT, B16)
    if tl.max(rn, 0) * tl.max(kdn, 0) > td:
        if B16:
            plane = N_HEADS.to(tl.int64) * S * D
            ptr = KPARTS + kbase + offs_n[:, None] * D + tl.arange(0, D)[None, :]
            ok = (offs_n < S)[:, None]
            kp_hi = tl.load(ptr + KP_HI_P * plane, mask=ok, other=0.0)
            l1 = tl.load(ptr + KP_L1 * plane, mask=ok, other=0.0)
            l2 = tl.load(ptr + KP_L2 * plane, mask=ok, other=0.0)
            l3 = tl.load(ptr + KP_L3 * plane, mask=ok, other=0.0)
            kp_lo = kp
        else:
            kp_hi, kp_lo = _split_rows(kp)
            l1, l2, l3 = kp_lo, kp_lo, kp_lo
        fast = rn[:, None] * kdn[None, :] <= td
        hi = tl.where(fast, d_pl, _exact_dot(r_hi, kp_hi, EXACT))
        rem = tl.where(fast, 0.0, _d_rem(r16, r_lo, r_hi, kp, kp_hi, kp_lo, l1, l2, l3, PREC, B16, EXACT))
    else:
        hi = d_pl
        rem = tl.zeros_like(d_pl)
    return hi, rem


# The key-side operands of the bf16 products, one plane each of a (N_KPARTS, N, S, D) bf16
# tensor: the split of k (scores) and of kp = k - k_0 (d), kp_lo in its three exact parts;
# and a (3, N, S, Dv) one of vp = v - v_0 in its exact parts. Each is a function of its own
# key (grids per key: bitwise causal), the same in every program that reads the key, so
# they are formed once per key by _px_key_prep_kernel instead of once per (query tile, key
# tile) pair, which takes that work and its registers out of the tile loops.
KP_HI_K, KP_LO_K, KP_HI_P, KP_L1, KP_L2, KP_L3 = (tl.constexpr(i) for i in range(6))
N_KPARTS = 6


@triton.jit(do_not_specialize=("S",))
def _px_key_prep_kernel(K, V, KPARTS, VPARTS, S, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                        VALUES: tl.constexpr):
    """Each key's split parts (KPARTS) and, with VALUES (the backward's), its value's three
    bf16 parts (VPARTS)."""
    head = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (offs < S)[:, None]
    kbase = head * S * D
    vbase = head * S * DV
    kf = _load_rows(K, kbase, offs, S, D).to(tl.float32)
    ck = tl.load(K + kbase + tl.arange(0, D)).to(tl.float32)
    k_hi, k_lo = _split_rows(kf)
    kp_hi, kp_lo = _split_rows(kf - ck[None, :])
    l1, l2, l3 = _bf16_parts(kp_lo)
    plane = tl.num_programs(1).to(tl.int64) * S * D
    ptr = KPARTS + kbase + offs[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(ptr + KP_HI_K * plane, k_hi.to(tl.bfloat16), mask=ok)
    tl.store(ptr + KP_LO_K * plane, k_lo.to(tl.bfloat16), mask=ok)
    tl.store(ptr + KP_HI_P * plane, kp_hi.to(tl.bfloat16), mask=ok)
    tl.store(ptr + KP_L1 * plane, l1, mask=ok)
    tl.store(ptr + KP_L2 * plane, l2, mask=ok)
    tl.store(ptr + KP_L3 * plane, l3, mask=ok)
    if VALUES:
        cv = tl.load(V + vbase + tl.arange(0, DV)).to(tl.float32)
        vp1, vp2, vp3 = _bf16_parts(_load_rows(V, vbase, offs, S, DV).to(tl.float32) - cv[None, :])
        vplane = tl.num_programs(1).to(tl.int64) * S * DV
        vptr = VPARTS + vbase + offs[:, None] * DV + tl.arange(0, DV)[None, :]
        tl.store(vptr, vp1, mask=ok)
        tl.store(vptr + vplane, vp2, mask=ok)
        tl.store(vptr + 2 * vplane, vp3, mask=ok)


# Per-row and per-key bounds of the fast-tile test, one (N, S, N_NORMS) fp32 tensor formed on
# the host (fast_tile_norms) and shared by the forward and the backward, so that every kernel
# takes the same decision for the same (query, key) pair: s |q_i|, |r_i|, |k_j|, the bound
# kd_j of d's plain product (|k_j| + |k_0| for bf16 inputs, |k_j - k_0| otherwise), and
# c0_i = <k_0, r_i> (bf16 inputs' plain d); and for the test per program, the largest kn, kdn
# over keys 0..j and the largest qn, rn over queries i..S-1.
NORM_NAMES = ("qn", "rn", "kn", "kdn", "c0", "pkn", "pkdn", "sqn", "srn")
# fast_tile_norms takes (kn, kdn) -> (pkn, pkdn) and (qn, rn) -> (sqn, srn) as adjacent pairs
assert NORM_NAMES[:4] == ("qn", "rn", "kn", "kdn") and NORM_NAMES[5:] == ("pkn", "pkdn", "sqn", "srn")
NM_QN, NM_RN, NM_KN, NM_KDN, NM_C0, NM_PKN, NM_PKDN, NM_SQN, NM_SRN = (tl.constexpr(i) for i in range(len(NORM_NAMES)))
N_NORMS = tl.constexpr(len(NORM_NAMES))


@triton.jit
def _norm(NORMS, rows, ok, col: tl.constexpr):
    return tl.load(NORMS + rows * N_NORMS + col, mask=ok, other=0.0)


# Upper bounds: a norm formed in fp32 is within (D/2 + 2) u of the true one for D <= 128,
# below 2^-17 relative; the factor makes every stored bound at least the true value.
NORM_UP = tl.constexpr(1.0 + 2.0**-16)


@triton.jit(do_not_specialize=("S",))
def _px_norms_kernel(Q, K, R, NORMS, S, scale, D: tl.constexpr, BLOCK: tl.constexpr, B16: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    kbase = head * S * D
    q = _load_rows(Q, kbase, offs, S, D).to(tl.float32)
    k = _load_rows(K, kbase, offs, S, D).to(tl.float32)
    r = _load_rows(R, kbase, offs, S, D).to(tl.float32)
    ck = tl.load(K + kbase + tl.arange(0, D)).to(tl.float32)
    kn = tl.sqrt(tl.sum(k * k, 1)) * NORM_UP
    if B16:
        kdn = kn + tl.sqrt(tl.sum(ck * ck, 0)) * NORM_UP
    else:
        kp = k - ck[None, :]
        kdn = tl.sqrt(tl.sum(kp * kp, 1)) * NORM_UP
    ptr = NORMS + (head * S + offs) * N_NORMS
    tl.store(ptr + NM_QN, scale * tl.sqrt(tl.sum(q * q, 1)) * NORM_UP, mask=ok)
    tl.store(ptr + NM_RN, tl.sqrt(tl.sum(r * r, 1)) * NORM_UP, mask=ok)
    tl.store(ptr + NM_KN, kn, mask=ok)
    tl.store(ptr + NM_KDN, kdn, mask=ok)
    tl.store(ptr + NM_C0, tl.sum(r * ck[None, :], 1), mask=ok)


@triton.jit
def _program_runs(ba, ta, bd, td, MODE: tl.constexpr):
    """Whether a program runs in launch MODE (1: programs whose every entry is fast, 2: the
    others), from the largest score and d bounds over its entries."""
    if MODE == 1:
        return (ba <= ta) & (bd <= td)
    else:
        return (ba > ta) | (bd > td)


@triton.jit
def _fast_rows(NORMS, rows, ok, ta, td):
    """Rows whose every entry (i, j <= i) takes the plain products: the row's bounds times
    the prefix maxima of the keys' up to it (§3, "Fast tiles"). The forward outside autograd
    runs these rows in inference._px_fwd_infer_kernel and the others in _px_fwd_kernel's
    MODE 3; the test reads no token after the row, so the output stays bitwise causal."""
    return ((_norm(NORMS, rows, ok, NM_QN) * _norm(NORMS, rows, ok, NM_PKN) <= ta)
            & (_norm(NORMS, rows, ok, NM_RN) * _norm(NORMS, rows, ok, NM_PKDN) <= td))


@triton.jit
def _fwd_merge(w, d, vp, v16, cv, alpha, l_i, nu, dbar, cm, PREC: tl.constexpr, W16: tl.constexpr,
               EXACT: tl.constexpr, WE_PARTS: tl.constexpr):
    """Merge a tile's weights w and d (against the row's reference) into the running (W,
    nu, dbar, M) of each query: Chan et al.'s update of a co-moment, M = sum_j w_j (vp_j -
    nu)(d_j - dbar) in the weights of the running maximum.

    W16 (a fast tile of bf16 inputs, FAST_BF16_WEIGHTS; docs/kernels-parallax.md §3, "bf16
    weights"): the weights rounded to bf16, w~ = bf16(w), in every sum below, so the row is
    exact for weights perturbed by at most 2^-9 relatively; w~ v one bf16 product with exact
    products against the raw bf16 values v16, and the co-moment's weights w~ (d - dbar) in
    two bf16 parts (e perturbed by at most 2^-17 relatively), or in one with WE_PARTS = 1
    (2^-9, a product fewer: kernels.INFER_WE_PARTS)."""
    if W16:
        w = w.to(tl.bfloat16).to(w.dtype)
    w_a = l_i * alpha
    sw = tl.sum(w, 1)
    w_ab = w_a + sw
    # w_ab >= 1 (the row's maximum weighs 1), while a tile's own weight may underflow to
    # zero or a subnormal: so the tile is centred on the merged means, never divided by
    # its own weight, and a row that sees no key of the tile is left as it was
    inv = 1.0 / w_ab
    if W16:
        # sum_j w~_j (v_j - v_0) = w~ v - (sum_j w~_j) v_0
        wvp = _dot16(w, v16, EXACT) - sw[:, None] * cv[None, :]
    else:
        # w vp stays a product of the anchored values for bf16 inputs too: w v - W v_0
        # through exact bf16 products would round at u |v|, and on a one-hot row nu_i - v_ref
        # would no longer be exact, which the backward's gv needs at the heavy key
        # (docs/kernels-parallax.md §5)
        wvp = tl.dot(w, vp, input_precision=PREC)
    nu_new = (w_a[:, None] * nu + wvp) * inv[:, None]
    dbar_new = (w_a * dbar + tl.sum(w * d, 1)) * inv
    # sum_j w_ij (vp_j - nu_new)(d_ij - dbar_new), the value side centred through the
    # second term because nu_new differs per query and cannot enter the product
    we = w * (d - dbar_new[:, None])
    if W16:
        # we = we1 + we2 exactly as summed here, against v_j - v_0 - nu_new
        we1 = we.to(tl.bfloat16).to(we.dtype)
        if WE_PARTS == 1:
            cm_b = _dot16(we1, v16, EXACT) - (cv[None, :] + nu_new) * tl.sum(we1, 1)[:, None]
        else:
            we2 = (we - we1).to(tl.bfloat16).to(we.dtype)
            cm_b = (_dot16(we1, v16, EXACT) + _dot16(we2, v16, EXACT)
                    - (cv[None, :] + nu_new) * tl.sum(we1 + we2, 1)[:, None])
    else:
        cm_b = tl.dot(we, vp, input_precision=PREC) - nu_new * tl.sum(we, 1)[:, None]
    # Chan et al.: moving the old moment from its means to the merged ones adds
    # w_a (nu - nu_new)(dbar - dbar_new)
    cm = cm * alpha[:, None] + cm_b + (w_a * (dbar - dbar_new))[:, None] * (nu - nu_new)
    return w_ab, nu_new, dbar_new, cm


@triton.jit
def _fwd_split_tile(a_hi, a_rem, s_hi, rem, vp, v16, cv, offs_m, offs_n, start_n, S, scale, m_i, l_i, nu, dbar, cm,
                    t_ref, t_rem, j_ref, s_a, s_r, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
                    HAS_REM: tl.constexpr, W16: tl.constexpr, EXACT: tl.constexpr):
    """One key tile of the split forward from its scores (a_hi + a_rem, unscaled) and d
    (s_hi + rem), every entry either exact hi part and remainder or plain product and 0.
    The scores and d are kept relative to the row's heaviest key so far, j_ref, whose
    entries are s_a, s_r (scores) and t_ref, t_rem (d): the running maximum is 0 once a row
    has seen a key, and d is exactly 0 at that key. HAS_REM = False: a fast tile, every
    remainder 0 and not formed; each value below is then bitwise the one a tile with
    remainders gives a plain entry. W16 (a fast tile of bf16 inputs, FAST_BF16_WEIGHTS):
    the merge with bf16 weights against the raw values v16 (_fwd_merge)."""
    col = tl.arange(0, BLOCK_N)
    if HAS_REM:
        x = _masked(((a_hi - s_a[:, None]) + (a_rem - s_r[:, None])) * scale, offs_m, offs_n, S, MASK)
    else:
        x = _masked(((a_hi - s_a[:, None]) - s_r[:, None]) * scale, offs_m, offs_n, S, MASK)
    m_tile = tl.max(x, 1)
    moved = m_tile > m_i
    jmax = tl.argmax(x, 1)
    top = col[None, :] == jmax[:, None]
    s_a = tl.where(moved, tl.sum(tl.where(top, a_hi, 0.0), 1), s_a)
    if HAS_REM:
        s_r = tl.where(moved, tl.sum(tl.where(top, a_rem, 0.0), 1), s_r)
        x = _masked(((a_hi - s_a[:, None]) + (a_rem - s_r[:, None])) * scale, offs_m, offs_n, S, MASK)
    else:
        s_r = tl.where(moved, 0.0, s_r)
        x = _masked(((a_hi - s_a[:, None]) - s_r[:, None]) * scale, offs_m, offs_n, S, MASK)
    # m_i is -inf until a row sees its first key, 0 (its reference's score) from then on
    alpha = tl.exp(tl.where(moved, m_i - m_tile, 0.0))
    m_new = tl.where(moved, 0.0, m_i)
    w = tl.exp(x)
    # the reference key moves to the tile's heaviest where the running maximum moves, and
    # t_ref, t_rem with it; dbar follows (the co-moment is centred and does not move)
    j_ref = tl.where(moved, start_n + jmax, j_ref)
    t_new = tl.where(moved, tl.sum(tl.where(top, s_hi, 0.0), 1), t_ref)
    if HAS_REM:
        r_new = tl.where(moved, tl.sum(tl.where(top, rem, 0.0), 1), t_rem)
    else:
        r_new = tl.where(moved, 0.0, t_rem)
    dbar = dbar + ((t_ref - t_new) + (t_rem - r_new))
    t_ref = t_new
    t_rem = r_new
    # the remainder, like the hi part, less its value at the reference key: the row's mean
    # dbar_i sits near that key's d on a one-hot row, and rem_ij added alone would leave
    # e_ij = d_ij - dbar_i there at u |rem_ref| (up to 2^-6 |r_i| |kp_ref|) where it is far
    # smaller (docs/kernels-parallax.md §5)
    if HAS_REM:
        d = (s_hi - t_ref[:, None]) + (rem - t_rem[:, None])
    else:
        d = (s_hi - t_ref[:, None]) - t_rem[:, None]
    w_ab, nu_new, dbar_new, cm = _fwd_merge(w, d, vp, v16, cv, alpha, l_i, nu, dbar, cm, PREC, W16, EXACT, 2)
    return m_new, w_ab, nu_new, dbar_new, cm, t_ref, t_rem, j_ref, s_a, s_r


@triton.jit
def _fwd_general_tile(q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, k_dot, kp, vp, KPARTS, N_HEADS, kbase, offs_m, offs_n,
                      start_n, S, scale, m_i, l_i, nu, dbar, cm, t_ref, t_rem, j_ref, s_a, s_r, qn, kn, rn, kdn, c0,
                      ta, td, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, ACC: tl.constexpr,
                      PREC: tl.constexpr, SPREC: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr):
    """A tile with entries that need the split: each entry through its own product."""
    a_hi, a_rem = _score_pair(q_dot, q_hi, q_lo, k_dot, KPARTS, kbase, offs_n, S, N_HEADS, qn, kn, ta, D, ACC,
                              PREC, SPREC, EXACT, B16)
    s_hi, rem = _d_pair(rf, r16, r_hi, r_lo, k_dot, kp, KPARTS, kbase, offs_n, S, N_HEADS, rn, kdn, c0, td, D,
                        ACC, PREC, EXACT, B16)
    return _fwd_split_tile(a_hi, a_rem, s_hi, rem, vp, vp, vp, offs_m, offs_n, start_n, S, scale, m_i, l_i, nu, dbar,
                           cm, t_ref, t_rem, j_ref, s_a, s_r, BLOCK_N, MASK, PREC, True, False, EXACT)


@triton.jit
def _fwd_tile(q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, ck, cv, K, V, KPARTS, NORMS, N_HEADS, kbase, vbase, nbase,
              start_n, S, scale, offs_m, m_i, l_i,
              nu, dbar, cm, t_ref, t_rem, j_ref, s_a, s_r, qn, rn, c0, ta, td,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
              SPLIT_D: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr, FAST_ONLY: tl.constexpr,
              W16: tl.constexpr):
    """Merge one key tile into the running (m, W, nu, dbar, M) of each query; with the
    split, the scores and d relative to the row's heaviest key so far (_fwd_split_tile)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_dot, kp, vp, v_dot = _load_keys(K, V, kbase, vbase, offs_n, S, ck, cv, D, DV, UPCAST, ACC)
    if SPLIT_D:
        # a_ij - a_i,ref = s <q_i, k_j - k_ref>: a score rounded on its own carries up to half
        # an ulp of |a_ij|, which moves p_ij by that much relatively where the softmax is steep,
        # and d_ij = <k_j - k_0, r_i> rounds at u |k_j - k_0| |r_i| while the covariance needs
        # e_ij = d_ij - dbar_i, O(spread |r_i|) at the keys that carry the weight
        # (docs/kernels-parallax.md §3). Both are formed from exact split products referred to
        # the row's heaviest key, r_hi kp_hi^T and q_hi k_hi^T (8-bit hi parts on power-of-two
        # grids per row and per key: sums of D <= 128 16-bit products on one grid, exact in
        # fp32; grids per key, not per tile, keep a row's values free of keys after i, bitwise
        # causal), plus remainders 2^-7 the size: except on the entries whose plain product's
        # rounding is below u_in / 4 (§3, "Fast tiles"). A tile with no other entry forms the
        # plain products alone.
        if FAST_ONLY:
            # a program whose every entry is fast (_px_fwd_kernel): no split code compiled
            a_pl = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC).to(ACC)
            d_pl = _d_plain(rf, r16, k_dot, kp, c0, PREC, EXACT, B16)
            m_new, w_ab, nu_new, dbar_new, cm, t_ref, t_rem, j_ref, s_a, s_r = _fwd_split_tile(
                a_pl, a_pl, d_pl, d_pl, vp, v_dot, cv, offs_m, offs_n, start_n, S, scale, m_i, l_i, nu, dbar, cm,
                t_ref, t_rem, j_ref, s_a, s_r, BLOCK_N, MASK, PREC, False, W16, EXACT)
        else:
            ok_n = offs_n < S
            kn = _norm(NORMS, nbase + offs_n, ok_n, NM_KN)
            kdn = _norm(NORMS, nbase + offs_n, ok_n, NM_KDN)
            if (tl.max(qn, 0) * tl.max(kn, 0) <= ta) & (tl.max(rn, 0) * tl.max(kdn, 0) <= td):
                a_pl = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC).to(ACC)
                d_pl = _d_plain(rf, r16, k_dot, kp, c0, PREC, EXACT, B16)
                m_new, w_ab, nu_new, dbar_new, cm, t_ref, t_rem, j_ref, s_a, s_r = _fwd_split_tile(
                    a_pl, a_pl, d_pl, d_pl, vp, v_dot, cv, offs_m, offs_n, start_n, S, scale, m_i, l_i, nu, dbar, cm,
                    t_ref, t_rem, j_ref, s_a, s_r, BLOCK_N, MASK, PREC, False, W16, EXACT)
            else:
                m_new, w_ab, nu_new, dbar_new, cm, t_ref, t_rem, j_ref, s_a, s_r = _fwd_general_tile(
                    q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, k_dot, kp, vp, KPARTS, N_HEADS, kbase, offs_m, offs_n,
                    start_n, S, scale, m_i, l_i, nu, dbar, cm, t_ref, t_rem, j_ref, s_a, s_r, qn, kn, rn, kdn, c0,
                    ta, td, D, BLOCK_N, MASK, ACC, PREC, SPREC, EXACT, B16)
    else:
        # float64: single products, rounding at u64
        a = _scores(q_dot, k_dot, offs_m, offs_n, S, scale, MASK, SPREC).to(ACC)
        m_tile = tl.max(a, 1)
        m_new = tl.maximum(m_i, m_tile)
        # every row sees key 0 in the first tile, so m_new is finite from then on
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(a - m_new[:, None])
        moved = m_tile > m_i
        j_ref = tl.where(moved, start_n + tl.argmax(a, 1), j_ref)
        # d_ij against the anchored keys: O(spread |r_i|), never O(|k_j| |r_i|)
        d = tl.dot(rf, tl.trans(kp), input_precision=PREC)
        w_ab, nu_new, dbar_new, cm = _fwd_merge(w, d, vp, vp, cv, alpha, l_i, nu, dbar, cm, PREC, False, EXACT, 2)
    return m_new, w_ab, nu_new, dbar_new, cm, t_ref, t_rem, j_ref, s_a, s_r


# S is not specialised on (== 1, % 16): every pointer is offset by multiples of D or Dv
@triton.jit(do_not_specialize=("S",))
def _px_fwd_kernel(Q, K, V, R, KPARTS, NORMS, O, M, LW, SA, SR, NUP, DBAR, CR, TREF, TREM, REF, S, scale, ta, td,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                   SPLIT_D: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr, MODE: tl.constexpr,
                   W16: tl.constexpr):
    pid_m, head, kbase, vbase, nbase, offs_m = _query_program(S, D, DV, BLOCK_M)
    row_ok = offs_m < S

    q = _load_rows(Q, kbase, offs_m, S, D)
    if UPCAST:
        q_dot = q.to(ACC)
    else:
        q_dot = q
    rf = _load_rows(R, kbase, offs_m, S, D).to(ACC)
    # Anchors: the head's first key and value. They move with a common offset of the
    # keys (values), which then cancels in kp, vp before any product.
    ck = tl.load(K + kbase + tl.arange(0, D)).to(ACC)
    cv = tl.load(V + vbase + tl.arange(0, DV)).to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    dbar = tl.zeros([BLOCK_M], dtype=ACC)
    nup = tl.zeros([BLOCK_M, DV], dtype=ACC)
    cm = tl.zeros([BLOCK_M, DV], dtype=ACC)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, S)
    # key tiles entirely below the diagonal (and inside S) need no mask
    lo_full = ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    # per-row bounds of the fast-tile test (§3, "Fast tiles"), formed once per forward
    qn = _norm(NORMS, nbase + offs_m, row_ok, NM_QN)
    rn = _norm(NORMS, nbase + offs_m, row_ok, NM_RN)
    c0 = _norm(NORMS, nbase + offs_m, row_ok, NM_C0)
    # MODE 1 runs the programs whose every entry is fast, compiled without the split; MODE 2
    # the others (their fast tiles still skip it); MODE 0 every program. MODE 3 (a forward
    # outside autograd) the programs with a row that is not fast (_fast_rows), storing those
    # rows alone: inference._px_fwd_infer_kernel stores the others
    if MODE == 3:
        slow = row_ok & (_fast_rows(NORMS, nbase + offs_m, row_ok, ta, td) == 0)
        run = tl.max(slow.to(tl.int32), 0) > 0
        hi = tl.where(run, hi, 0)
        lo_full = tl.where(run, lo_full, 0)
        row_ok = slow
    elif MODE != 0:
        last = nbase + hi - 1
        run = _program_runs(tl.max(qn, 0) * tl.load(NORMS + last * N_NORMS + NM_PKN), ta,
                            tl.max(rn, 0) * tl.load(NORMS + last * N_NORMS + NM_PKDN), td, MODE)
        hi = tl.where(run, hi, 0)
        lo_full = tl.where(run, lo_full, 0)
        row_ok = offs_m < tl.where(run, S, 0)
    # r = r_hi + r_lo, r_hi on a per-row grid of 2^-6 its largest power of two (_fwd_tile)
    if SPLIT_D and MODE != 1:
        r_hi, r_lo = _split_rows(rf)
        q_hi, q_lo = _split_rows(q.to(ACC))
    else:
        r_hi, r_lo, q_hi, q_lo = rf, rf, rf, rf
    if B16:
        # every part of a bf16 q or r is an exact bf16 value (_score_rem, _d_rem): held in
        # bf16 they are the products' operands as they are, at half the registers
        r16 = rf.to(tl.bfloat16)
        r_hi, r_lo, q_hi, q_lo = (r_hi.to(tl.bfloat16), r_lo.to(tl.bfloat16), q_hi.to(tl.bfloat16),
                                  q_lo.to(tl.bfloat16))
    else:
        r16 = rf
    # t_ref, t_rem: the row's reference, r_hi kp_hi^T and d's remainder at its heaviest key
    # so far; d and dbar are kept relative to it (0 without the split: d relative to k_0 itself)
    t_ref = tl.zeros([BLOCK_M], dtype=ACC)
    t_rem = tl.zeros([BLOCK_M], dtype=ACC)
    j_ref = tl.zeros([BLOCK_M], dtype=tl.int32)
    s_a = tl.zeros([BLOCK_M], dtype=ACC)
    s_r = tl.zeros([BLOCK_M], dtype=ACC)
    for start_n in range(0, lo_full, BLOCK_N):
        m_i, l_i, nup, dbar, cm, t_ref, t_rem, j_ref, s_a, s_r = _fwd_tile(
            q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, ck, cv, K, V, KPARTS, NORMS, tl.num_programs(1), kbase, vbase, nbase,
            start_n, S, scale, offs_m, m_i, l_i, nup,
            dbar, cm, t_ref, t_rem, j_ref, s_a, s_r, qn, rn, c0, ta, td, D, DV, BLOCK_N, UPCAST, False, ACC, PREC, SPREC,
            SPLIT_D, EXACT, B16,
            MODE == 1, W16)
    for start_n in range(lo_full, hi, BLOCK_N):
        m_i, l_i, nup, dbar, cm, t_ref, t_rem, j_ref, s_a, s_r = _fwd_tile(
            q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, ck, cv, K, V, KPARTS, NORMS, tl.num_programs(1), kbase, vbase, nbase,
            start_n, S, scale, offs_m, m_i, l_i, nup,
            dbar, cm, t_ref, t_rem, j_ref, s_a, s_r, qn, rn, c0, ta, td, D, DV, BLOCK_N, UPCAST, True, ACC, PREC, SPREC,
            SPLIT_D, EXACT, B16,
            MODE == 1, W16)
    # l_i >= 1 on every row a program runs (its heaviest key weighs 1); 0 only where the
    # launch's MODE skips the program, whose stores are masked
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    cr = cm / l_i[:, None]
    o = cv[None, :] + nup - cr

    offs_e = tl.arange(0, DV)
    vptrs = vbase + offs_m[:, None] * DV + offs_e[None, :]
    tl.store(O + vptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(NUP + vptrs, nup, mask=row_ok[:, None])
    tl.store(CR + vptrs, cr, mask=row_ok[:, None])
    tl.store(M + head * S + offs_m, m_i, mask=row_ok)
    tl.store(LW + head * S + offs_m, tl.log(l_i), mask=row_ok)
    tl.store(SA + head * S + offs_m, s_a, mask=row_ok)
    tl.store(SR + head * S + offs_m, s_r, mask=row_ok)
    # the backward forms d_ij against the same reference (exactly, from the same split)
    # and centres on the same key
    tl.store(DBAR + head * S + offs_m, dbar, mask=row_ok)
    tl.store(TREF + head * S + offs_m, t_ref, mask=row_ok)
    tl.store(TREM + head * S + offs_m, t_rem, mask=row_ok)
    tl.store(REF + head * S + offs_m, j_ref, mask=row_ok)


# Per-row quantities of the backward, one (N, S, N_STATS) tensor in the accumulation dtype
STAT_NAMES = ("m", "lw", "sa", "sr", "dbar", "tref", "trem", "delta")
ST_M, ST_LW, ST_SA, ST_SR, ST_DBAR, ST_TREF, ST_TREM, ST_DELTA = (tl.constexpr(i) for i in range(len(STAT_NAMES)))
N_STATS = tl.constexpr(len(STAT_NAMES))


@triton.jit
def _stat(STATS, rows, ok, col: tl.constexpr):
    return tl.load(STATS + rows * N_STATS + col, mask=ok, other=0.0)


@triton.jit
def _bwd_rows(Q, K, V, R, G, NUP, REF, kbase, vbase, head, offs_m, S, ck, cv,
              D: tl.constexpr, DV: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr,
              B16: tl.constexpr):
    """A query tile's operands for the backward: q (for the product and in ACC), r, g,
    the splits of q and r, the row's heaviest key ref_i, its anchored key, and
    <g_i, vp_ref> and gc_i = <g_i, nu_i - v_ref> (vp_ref formed as the tiles form vp_j).
    With bf16 inputs r, g and the splits are returned in bf16 too (their values are exact
    bf16: the products' operands as they are)."""
    ok = offs_m < S
    q = _load_rows(Q, kbase, offs_m, S, D)
    qf = q.to(ACC)
    if UPCAST:
        q_dot = qf
    else:
        q_dot = q
    rf = _load_rows(R, kbase, offs_m, S, D).to(ACC)
    gf = _load_rows(G, vbase, offs_m, S, DV).to(ACC)
    ref = tl.load(REF + head * S + offs_m, mask=ok, other=0)
    # padding rows read key 0 (ref = 0); their p is masked to 0
    k_ref = tl.load(K + kbase + ref[:, None] * D + tl.arange(0, D)[None, :]).to(ACC)
    vp_ref = tl.load(V + vbase + ref[:, None] * DV + tl.arange(0, DV)[None, :]).to(ACC) - cv[None, :]
    nup = _load_rows(NUP, vbase, offs_m, S, DV)
    g_ref = tl.sum(gf * vp_ref, 1)
    gc = tl.sum(gf * (nup - vp_ref), 1)
    if SPLIT:
        q_hi, q_lo = _split_rows(qf)
        r_hi, r_lo = _split_rows(rf)
    else:
        q_hi, q_lo, r_hi, r_lo = qf, qf, rf, rf
    if B16:
        r16, g16 = rf.to(tl.bfloat16), gf.to(tl.bfloat16)
        q_hi, q_lo, r_hi, r_lo = (q_hi.to(tl.bfloat16), q_lo.to(tl.bfloat16), r_hi.to(tl.bfloat16),
                                  r_lo.to(tl.bfloat16))
    else:
        r16, g16 = rf, gf
    return q_dot, qf, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, k_ref - ck[None, :], g_ref, gc


@triton.jit
def _bwd_keys(K, V, VPARTS, NORMS, N_HEADS, kbase, vbase, nbase, offs_n, S, ck, cv, D: tl.constexpr,
              DV: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, B16: tl.constexpr):
    """A key tile's operands for the backward: k (for the product), kp, vp, with bf16 inputs
    vp's exact parts from _px_key_prep_kernel, and the key's bounds of the fast-tile test.
    The splits of k and kp are formed (or loaded) by _score_pair and _d_pair, on the tiles
    that need them."""
    k_dot, kp, vp, _v_dot = _load_keys(K, V, kbase, vbase, offs_n, S, ck, cv, D, DV, UPCAST, ACC)
    ok = offs_n < S
    if B16:
        vplane = N_HEADS.to(tl.int64) * S * DV
        vptr = VPARTS + vbase + offs_n[:, None] * DV + tl.arange(0, DV)[None, :]
        vp1 = tl.load(vptr, mask=ok[:, None], other=0.0)
        vp2 = tl.load(vptr + vplane, mask=ok[:, None], other=0.0)
        vp3 = tl.load(vptr + 2 * vplane, mask=ok[:, None], other=0.0)
    else:
        vp1, vp2, vp3 = vp, vp, vp
    kn = _norm(NORMS, nbase + offs_n, ok, NM_KN)
    kdn = _norm(NORMS, nbase + offs_n, ok, NM_KDN)
    return k_dot, kp, vp, vp1, vp2, vp3, kn, kdn


@triton.jit
def _bwd_fast_xe(q_dot, k_dot, rf, r16, kp, c0, sa, sr, tref, trem, dbar, hit, scale, ACC: tl.constexpr,
                 PREC: tl.constexpr, SPREC: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr):
    """x and e of a fast tile: every remainder 0 and not formed, each value bitwise the one a
    tile with remainders gives a plain entry."""
    a_pl = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC).to(ACC)
    x = ((a_pl - sa[:, None]) - tl.where(hit, 0.0, sr)[:, None]) * scale
    e = ((_d_plain(rf, r16, k_dot, kp, c0, PREC, EXACT, B16) - tref[:, None]) - tl.where(hit, 0.0, trem)[:, None]
         - dbar[:, None])
    return x, e


@triton.jit
def _bwd_tile(q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, g_ref, gc, qn, rn, c0, STATS, NORMS, KPARTS,
              N_HEADS, kbase, rows, k_dot, kp, kn, kdn, vp, vp1, vp2, vp3, offs_m, offs_n, S, scale, ta, td,
              D: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr,
              EXACT: tl.constexpr, B16: tl.constexpr, FAST_ONLY: tl.constexpr):
    """p, 1 - e, p gv and da for a (query tile, key tile) pair, causal mask included."""
    ok = offs_m < S
    keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S) & ok[:, None]
    # where the row's heaviest key lies in this tile, its per-row terms below are taken
    # from this tile's own products, so that they cancel exactly at that key
    at_ref = offs_n[None, :] == ref[:, None]
    hit = tl.max(at_ref.to(tl.int32), 1) > 0
    lw = _stat(STATS, rows, ok, ST_LW)
    dbar = _stat(STATS, rows, ok, ST_DBAR)
    if SPLIT:
        # a_ij - a_i,ref = s <q_i, k_j - k_ref> and d_ij against the row's reference t_i as the
        # forward formed them (_fwd_tile), entry by entry through the same products (the
        # decisions are the forward's): the hi part less its saved value at the key, the
        # remainder less the tile's own entry there (the saved one where the tile does not
        # hold the key). A single product would round d at u |k_j - k_0| |r_i|, far above
        # e_ij where the keys have a large norm (docs/kernels-parallax.md §5).
        sa = _stat(STATS, rows, ok, ST_SA)
        sr = _stat(STATS, rows, ok, ST_SR)
        tref = _stat(STATS, rows, ok, ST_TREF)
        trem = _stat(STATS, rows, ok, ST_TREM)
        if FAST_ONLY:
            x, e = _bwd_fast_xe(q_dot, k_dot, rf, r16, kp, c0, sa, sr, tref, trem, dbar, hit, scale, ACC, PREC, SPREC,
                                EXACT, B16)
        elif (tl.max(qn, 0) * tl.max(kn, 0) <= ta) & (tl.max(rn, 0) * tl.max(kdn, 0) <= td):
            x, e = _bwd_fast_xe(q_dot, k_dot, rf, r16, kp, c0, sa, sr, tref, trem, dbar, hit, scale, ACC, PREC, SPREC,
                                EXACT, B16)
        else:
            a_hi, a_rem = _score_pair(q_dot, q_hi, q_lo, k_dot, KPARTS, kbase, offs_n, S, N_HEADS, qn, kn, ta, D, ACC,
                                      PREC, SPREC, EXACT, B16)
            rem_at = tl.where(hit, tl.sum(tl.where(at_ref, a_rem, 0.0), 1), sr)
            x = ((a_hi - sa[:, None]) + (a_rem - rem_at[:, None])) * scale
            s_hi, rem = _d_pair(rf, r16, r_hi, r_lo, k_dot, kp, KPARTS, kbase, offs_n, S, N_HEADS, rn, kdn, c0, td, D,
                                ACC, PREC, EXACT, B16)
            trem_at = tl.where(hit, tl.sum(tl.where(at_ref, rem, 0.0), 1), trem)
            e = ((s_hi - tref[:, None]) + (rem - trem_at[:, None])) - dbar[:, None]
    else:
        a = tl.dot(q_dot, tl.trans(k_dot), input_precision=SPREC).to(ACC) * scale
        x = a - _stat(STATS, rows, ok, ST_M)[:, None]
        e = tl.dot(rf, tl.trans(kp), input_precision=PREC) - dbar[:, None]
    # the exponent is masked first: padding rows could overflow
    p = tl.exp(tl.where(keep, x - lw[:, None], float("-inf")))
    # gv_ij = <g_i, v_j - nu_i> = (<g_i, vp_j> - <g_i, vp_ref>) - gc_i, gc_i = <g_i, nu_i - v_ref>:
    # 0 at the heaviest key of a one-hot row (nu_i = v_ref), as is the true value, where
    # <g_i, nu_i> rounded in another order than the product would leave u |g_i| |vp|
    if B16:
        gvp = (_dot16(g16, tl.trans(vp1), EXACT) + _dot16(g16, tl.trans(vp2), EXACT)
               + _dot16(g16, tl.trans(vp3), EXACT))
    else:
        gvp = tl.dot(gf, tl.trans(vp), input_precision=PREC)
    g_at = tl.where(hit, tl.sum(tl.where(at_ref, gvp, 0.0), 1), g_ref)
    gv = (gvp - g_at[:, None]) - gc[:, None]
    pg = p * gv
    pf = p * (1.0 - e)
    da = pg * (1.0 - e) + p * _stat(STATS, rows, ok, ST_DELTA)[:, None]
    return pf, pg, da


@triton.jit(do_not_specialize=("S",))
def _px_bwd_dq_kernel(Q, K, V, R, KPARTS, VPARTS, NORMS, G, NUP, STATS, REF, DQ, DR, GC, S, scale, ta, td,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                      SPLIT: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr, MODE: tl.constexpr):
    pid_m, head, kbase, vbase, nbase, offs_m = _query_program(S, D, DV, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = nbase + offs_m
    row_ok = offs_m < S
    ck = tl.load(K + kbase + offs_d).to(ACC)
    cv = tl.load(V + vbase + tl.arange(0, DV)).to(ACC)
    q_dot, qf, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, kp_ref, g_ref, gc = _bwd_rows(
        Q, K, V, R, G, NUP, REF, kbase, vbase, head, offs_m, S, ck, cv, D, DV, UPCAST, ACC, SPLIT, B16)
    qn = _norm(NORMS, rows, row_ok, NM_QN)
    rn = _norm(NORMS, rows, row_ok, NM_RN)
    c0 = _norm(NORMS, rows, row_ok, NM_C0)

    dq = tl.zeros([BLOCK_M, D], dtype=ACC)
    dr = tl.zeros([BLOCK_M, D], dtype=ACC)
    da_sum = tl.zeros([BLOCK_M], dtype=ACC)
    pg_sum = tl.zeros([BLOCK_M], dtype=ACC)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, S)
    # the forward's launches: MODE 1 the programs whose every entry is fast, 2 the others
    if MODE != 0:
        last = nbase + hi - 1
        run = _program_runs(tl.max(qn, 0) * tl.load(NORMS + last * N_NORMS + NM_PKN), ta,
                            tl.max(rn, 0) * tl.load(NORMS + last * N_NORMS + NM_PKDN), td, MODE)
        hi = tl.where(run, hi, 0)
        row_ok = offs_m < tl.where(run, S, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_dot, kp, vp, vp1, vp2, vp3, kn, kdn = _bwd_keys(
            K, V, VPARTS, NORMS, tl.num_programs(1), kbase, vbase, nbase, offs_n, S, ck, cv, D, DV, UPCAST, ACC, B16)
        _pf, pg, da = _bwd_tile(q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, g_ref, gc, qn, rn, c0, STATS,
                                NORMS, KPARTS, tl.num_programs(1), kbase, rows, k_dot, kp, kn, kdn, vp, vp1, vp2, vp3,
                                offs_m, offs_n, S, scale, ta, td, D, PREC, SPREC, ACC, SPLIT, EXACT, B16,
                                MODE == 1)
        dq += tl.dot(da, kp, input_precision=PREC)
        dr += tl.dot(pg, kp, input_precision=PREC)
        da_sum += tl.sum(da, 1)
        pg_sum += tl.sum(pg, 1)
    # sum_j da_ij = 0 and sum_j pg_ij = 0, so any key may be subtracted from the k_j: the
    # row's heaviest key, which removes the sums' rounding, |sum| |k_ref - k_0|, and is
    # exact where the row is one-hot (both products then hold one term and cancel)
    dq = (dq - da_sum[:, None] * kp_ref) * scale
    dr = pg_sum[:, None] * kp_ref - dr
    # gc_i from the saved nu_i rounds at u |g_i| |nu_i - v_0|, while on a one-hot row
    # gc_i = <g_i, nu_i - v_ref> is a small difference, and its error enters dk at the
    # heavy key at full weight (p_ij gc_i r_i): sum_j p_ij gv_ij = 0, so the row sum of pg
    # is that error, to the rounding of terms of size p_ij |gv_ij|. The dk, dv kernel takes
    # the corrected value (docs/kernels-parallax.md §5)
    tl.store(GC + head * S + offs_m, gc + pg_sum, mask=row_ok)
    ptrs = kbase + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DR + ptrs, dr.to(DR.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=("S",))
def _px_bwd_dkdv_kernel(Q, K, V, R, KPARTS, VPARTS, NORMS, G, NUP, STATS, REF, GC, DK, DV_OUT, S, scale, ta,
                        td,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                        SPLIT: tl.constexpr, EXACT: tl.constexpr, B16: tl.constexpr, MODE: tl.constexpr):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    kbase = head * S * D
    vbase = head * S * DV
    nbase = head * S
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < S
    ck = tl.load(K + kbase + tl.arange(0, D)).to(ACC)
    cv = tl.load(V + vbase + tl.arange(0, DV)).to(ACC)
    k_dot, kp, vp, vp1, vp2, vp3, kn, kdn = _bwd_keys(
        K, V, VPARTS, NORMS, tl.num_programs(1), kbase, vbase, nbase, offs_n, S, ck, cv, D, DV, UPCAST, ACC, B16)

    dk = tl.zeros([BLOCK_N, D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, DV], dtype=ACC)
    # queries i >= j only: the first query tile that reaches this key tile
    lo = (start_n // BLOCK_M) * BLOCK_M
    hi = S
    # MODE 1 the programs whose every entry is fast (queries lo..S-1 against this tile's
    # keys), 2 the others
    if MODE != 0:
        first = nbase + lo
        run = _program_runs(tl.load(NORMS + first * N_NORMS + NM_SQN) * tl.max(kn, 0), ta,
                            tl.load(NORMS + first * N_NORMS + NM_SRN) * tl.max(kdn, 0), td, MODE)
        hi = tl.where(run, hi, lo)
        col_ok = offs_n < tl.where(run, S, 0)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = nbase + offs_m
        row_ok = offs_m < S
        q_dot, qf, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, _kp_ref, g_ref, _gc = _bwd_rows(
            Q, K, V, R, G, NUP, REF, kbase, vbase, head, offs_m, S, ck, cv, D, DV, UPCAST, ACC, SPLIT, B16)
        # gc_i as the dq kernel corrected it (_px_bwd_dq_kernel)
        gc = tl.load(GC + head * S + offs_m, mask=row_ok, other=0.0)
        qn = _norm(NORMS, rows, row_ok, NM_QN)
        rn = _norm(NORMS, rows, row_ok, NM_RN)
        c0 = _norm(NORMS, rows, row_ok, NM_C0)
        pf, pg, da = _bwd_tile(q_dot, q_hi, q_lo, rf, r16, r_hi, r_lo, gf, g16, ref, g_ref, gc, qn, rn, c0, STATS,
                               NORMS, KPARTS, tl.num_programs(1), kbase, rows, k_dot, kp, kn, kdn, vp, vp1, vp2, vp3,
                               offs_m, offs_n, S, scale, ta, td, D, PREC, SPREC, ACC, SPLIT, EXACT, B16,
                                MODE == 1)
        if B16:
            # g, q and r are exact bf16 values: the fp32 side goes in as its exact parts
            dv += _dot3(tl.trans(pf), g16, EXACT)
            dk += scale * _dot3(tl.trans(da), q_dot, EXACT) - _dot3(tl.trans(pg), r16, EXACT)
        else:
            dv += tl.dot(tl.trans(pf), gf, input_precision=PREC)
            dk += scale * tl.dot(tl.trans(da), qf, input_precision=PREC) - tl.dot(tl.trans(pg), rf,
                                                                                  input_precision=PREC)
    tl.store(DK + kbase + offs_n[:, None] * D + tl.arange(0, D)[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV_OUT + vbase + offs_n[:, None] * DV + tl.arange(0, DV)[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=col_ok[:, None])


# ----------------------------------------------------------------------------- launchers
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and larger head dim (of D, Dv) on
# the GPU, then SMALLER_CONFIGS in order where shared memory runs out. Chosen from the
# sm_90 compile (scripts/parallax_kernel_stats.py) for bf16: 64-row query tiles keep
# Hopper's warpgroup MMA (mma.sync below that), and of those the fewest register spills
# that fit the 227 KB of shared memory (dk, dv at D = 128: 64 keys over 32-row query tiles,
# whose dk, dv products keep wgmma and spill 440 B against 64 x 32's 1588 B); fp32 and fp16
# fall back where they do not fit.
GPU_CONFIGS = {
    "fwd": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 1)},
    "dq": {16: (64, 64, 8, 1), 32: (64, 64, 8, 1), 64: (64, 64, 8, 1), 128: (64, 32, 8, 1)},
    "dkdv": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (32, 64, 8, 1)},
    # the forward outside autograd on its fast rows (inference._px_fwd_infer_kernel), bf16
    # only: of the 64-row tiles the fewest spills (sm_90, Triton 3.9: none at D = 64,
    # 336 / 300 B at D = 128, where 64 x 64 spills 884 / 760 B)
    "infer": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2)},
}
# Every launch but bf16 at D >= 64 keeps these 4-warp tiles: on the H200 (Triton 3.6) the
# 8-warp launches above give wrong fp32 and fp16 outputs at D = 16 in a full suite, and an
# fp16 D = 16 launch at (64, 64, 8, 1) alone faults with an illegal address
# (scripts/diag_parallax_configs.py), where these run clean for every dtype and D; bf16 at
# D >= 64 runs the 8-warp tiles clean and matches these to its rounding.
NARROW_CONFIGS = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 2)}
SMALLER_CONFIGS = ((64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1))


def gpu_config(kind: str, D: int, dtype) -> tuple:
    """The first configuration tried on the GPU for a kernel ("fwd", "dq", "dkdv") at head
    dim D (the larger of D, Dv) and input dtype."""
    if dtype == torch.bfloat16 and D >= 64:
        return GPU_CONFIGS[kind][D]
    return NARROW_CONFIGS[D]
INTERP_CONFIG = (16, 16, 1, 1)
# bf16 inputs, a forward without a backward (parallax_attention outside autograd): fast tiles
# merge with bf16 weights (_fwd_merge W16; docs/kernels-parallax.md §3, "bf16 weights"), 5 bf16
# units of tensor-core work a fast tile instead of 14: on the H200 0.50-0.55x the forward time
# of the tf32x3 merge at issue 22's shapes (docs/performance.md). Read at call time; False
# keeps the tf32x3 merge everywhere
FAST_BF16_WEIGHTS = True
# the co-moment's weights w~ (d - dbar) in the inference kernel (inference.py): in two bf16
# parts (e_ij perturbed by at most 2^-17 relatively), or in one (2^-9, within u_in / 2; 4
# bf16 products a tile pair instead of 5, FlashAttention's 2 twice). Both are within the
# budget and issue 22's target on every family under the interpreter
# (test_bf16_weights_meet_the_forward_budget_and_target_on_every_family); what one part saves
# is a GPU measurement. Read at call time
INFER_WE_PARTS = 2


def _exact_precision() -> str:
    """The precision of products of exact bf16 parts: bf16 on the GPU; the interpreter (whose
    bf16 dot is broken) takes the same values in fp32, exactly."""
    return "ieee" if interpreting() else "bf16"


def _is_out_of_resources(exc: Exception) -> bool:
    return type(exc).__name__ == "OutOfResources"


def _launch(kernel, kind, grid_of, args, D, DV, dtype, config, **extra):
    interp = interpreting()
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # triton issue 11584: interpreted bf16 dots are wrong, so every tile goes to fp32 there
    upcast = interp or dtype in (torch.float32, torch.float64)
    # the interpreter multiplies exact fp32 whatever the precision; the GPU's is passed there
    # too, so that an emulation of its operand rounding (lla_verify.testing.tensor_cores)
    # sees it
    if dtype == torch.float64:
        prec = "ieee"
    elif dtype == torch.float32 and FP32_PRECISION is not None:
        prec = FP32_PRECISION
    else:
        prec = GPU_PRECISION
    # 16-bit score products are exact in fp32 accumulation: precision matters for fp32 only
    sprec = prec if upcast else "tf32"
    if config is not None:
        order = [tuple(config)]
    elif interp:
        order = [INTERP_CONFIG]
    else:
        order = [gpu_config(kind, max(D, DV), dtype), *SMALLER_CONFIGS]
    last = None
    for bm, bn, nw, ns in order:
        try:
            kernel[grid_of(bm, bn)](*args, D=D, DV=DV, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, ACC=acc,
                                    PREC=prec, SPREC=sprec, num_warps=nw, num_stages=ns, **extra)
            return (bm, bn, nw, ns)
        except Exception as exc:  # noqa: BLE001 - only out-of-resources is retried
            if config is not None or not _is_out_of_resources(exc):
                raise
            last = exc
    raise last


PREP_BLOCK = 64


def key_parts(k, v, values=True):
    """(KPARTS, VPARTS) of bf16 k (N, S, D), v (N, S, Dv): see _px_key_prep_kernel. Without
    ``values`` (the forward, which reads the keys' parts alone) VPARTS is None."""
    N, S, D = k.shape
    DV = v.shape[-1]
    kparts = torch.empty(N_KPARTS, N, S, D, device=k.device, dtype=torch.bfloat16)
    # not written without values: kparts stands in for the pointer
    vparts = torch.empty(3, N, S, DV, device=k.device, dtype=torch.bfloat16) if values else None
    # 32 keys of D = 128 per program keep its split in registers (64 spill)
    block = 16 if interpreting() else (PREP_BLOCK if max(D, DV) <= 64 else 32)
    _px_key_prep_kernel[(triton.cdiv(S, block), N)](k, v, kparts, kparts if vparts is None else vparts, S, D=D, DV=DV,
                                                    BLOCK=block, VALUES=values)
    return kparts, vparts


# Fast tiles (docs/kernels-parallax.md §3, "Fast tiles"): an entry takes the plain product
# where its rounding, at most GAMMA s |q_i| |k_j| in the score and GAMMA |r_i| kd_j in d, is at
# most u_out / FAST_MARGIN, u_out the unit roundoff of the inputs' (and the output's) dtype.
FAST_MARGIN = 4.0
U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U_ACC = 2.0**-24
# tf32x3 (fp32 operands on the GPU) adds at most 3 * 2^-22 relative per product (the tail
# x tail product dropped, the tails rounded to tf32); 16-bit operands multiply exactly
TF32X3_PRODUCT = 3 * 2.0**-22


def fast_thresholds(dtype, D, fast=None):
    """(ta, td): an entry's plain score is taken where s |q_i| |k_j| <= ta, its plain d where
    |r_i| kd_j <= td. fast: None, the derived thresholds; True, every entry plain; False,
    every entry split (for measuring and testing either path alone)."""
    if fast is not None:
        return (math.inf, math.inf) if fast else (-1.0, -1.0)
    if dtype not in U_OUT:
        return (-1.0, -1.0)
    # D accumulating fp32 roundings of the products' sum, one for the subtraction of c0 (bf16
    # d) or the reference, one for the bound's own rounding; for fp32 and fp16 d's product,
    # and fp32's scores, the tf32x3 products' error besides
    gamma = (D + 2) * U_ACC + (0.0 if dtype == torch.bfloat16 else TF32X3_PRODUCT)
    t = U_OUT[dtype] / (FAST_MARGIN * gamma)
    return (t, t)


def fast_tile_norms(q, k, r, scale, suffix=True):
    """The (N, S, N_NORMS) fp32 bounds of the fast-tile test (NORM_NAMES), one launch and the
    prefix (and, with ``suffix``, the backward's suffix) maxima."""
    N, S, D = q.shape
    norms = torch.empty(N, S, int(N_NORMS), device=q.device, dtype=torch.float32)
    block = 16 if interpreting() else 64
    _px_norms_kernel[(triton.cdiv(S, block), N)](q, k, r, norms, S, float(scale), D=D, BLOCK=block,
                                                 B16=q.dtype == torch.bfloat16)
    col = NORM_NAMES.index
    # each pair of columns in one op (a call's host time counts at small shapes)
    norms[..., col("pkn"):col("pkdn") + 1] = norms[..., col("kn"):col("kdn") + 1].cummax(1).values
    if suffix:
        norms[..., col("sqn"):col("srn") + 1] = norms[..., col("qn"):col("rn") + 1].flip(1).cummax(1).values.flip(1)
    return norms


def fast_fraction(q, k, r, scale, fast=None):
    """(scores, d): the fraction of causal (query, key) entries of flattened heads that take
    the plain product, by the kernels' own bounds and rule (for tests and reports)."""
    norms = fast_tile_norms(q, k, r, scale)
    ta, td = fast_thresholds(q.dtype, q.shape[-1], fast)
    qn, rn, kn, kdn = (norms[..., i] for i in (NORM_NAMES.index(n) for n in ("qn", "rn", "kn", "kdn")))
    S = q.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    fa = (qn[:, :, None] * kn[:, None, :] <= ta) & causal
    fd = (rn[:, :, None] * kdn[:, None, :] <= td) & causal
    n = float(causal.sum()) * q.shape[0]
    return float(fa.sum()) / n, float(fd.sum()) / n


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def infer_fast_rows(q, k, v, r, scale, norms, ta, td, o, config=None):
    """Write into o the rows whose every entry is fast (_fast_rows), by
    inference._px_fwd_infer_kernel; bf16 q, k, v, r (N, S, D|Dv), norms from fast_tile_norms."""
    from .inference import _px_fwd_infer_kernel

    N, S, D = q.shape
    _launch(_px_fwd_infer_kernel, "infer", lambda bm, bn: (triton.cdiv(S, bm), N),
            (q, k, v, r, norms, o, S, float(scale), ta, td), D, v.shape[-1], q.dtype, config,
            EXACT=_exact_precision(), WE_PARTS=INFER_WE_PARTS)


def parallax_forward_kernel(q, k, v, r, scale, *, config=None, split_d=None, fast=None,
                            bf16_weights=False) -> ForwardOut:
    """Launch the forward on flattened heads: q, k, r (N, S, D), v (N, S, Dv), contiguous, one dtype.

    split_d: refer d_ij and the scores to each row's heaviest key through exact split
    products (docs/kernels-parallax.md §3, §5), for every dtype but float64 (whose single
    products round at u64). None (the default) or True: split; False: single products, for
    measuring what the split costs and buys. fast: which entries of the split take the plain
    product instead (fast_thresholds: None, the derived test; True, all; False, none).
    bf16_weights: for bf16 inputs, fast tiles merge with bf16 weights (_fwd_merge's W16): a
    forward that no backward reads: the backward's dq and dr need the row statistics at
    fp32 accuracy (docs/kernels-parallax.md §3, "bf16 weights"). Its rows whose every entry
    is fast run inference._px_fwd_infer_kernel, and its ForwardOut holds o, norms and the
    thresholds alone (the row statistics None)."""
    N, S, D = q.shape
    DV = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    split = q.dtype != torch.float64 and (split_d is None or bool(split_d))
    b16 = split and q.dtype == torch.bfloat16
    kparts = key_parts(k, v, values=False)[0] if b16 else k
    o = torch.empty_like(v)
    # the row statistics in one allocation (a call's host time counts at small shapes)
    rows = torch.empty(7 * N * S + 2 * N * S * DV, device=q.device, dtype=acc)
    m, lw, dbar, tref, trem, sa, sr = rows[:7 * N * S].view(7, N, S).unbind(0)
    nup, cr = rows[7 * N * S:].view(2, N, S, DV).unbind(0)
    ref = torch.empty(N, S, device=q.device, dtype=torch.int32)
    w16 = b16 and bool(bf16_weights)
    # no backward reads a forward with bf16 weights: its norms need no suffix maxima
    norms = fast_tile_norms(q, k, r, scale, suffix=not w16)
    ta, td = fast_thresholds(q.dtype, D, fast)
    if w16:
        # no backward reads this forward: the fast rows run FlashAttention's loop with the
        # bf16-weight merge and nothing else (inference._px_fwd_infer_kernel), the others the
        # split kernel (MODE 3); each row is stored by one of the two, which may tile apart
        infer_fast_rows(q, k, v, r, scale, norms, ta, td, o, config)
        modes = (3,)
    else:
        # the split: two launches, the programs whose every entry is fast compiled without it
        # (MODE 1), then the others (MODE 2); each program runs in one of them
        modes = (1, 2) if split else (0,)
    used = config
    for mode in modes:
        # both launches on the same tiles, or the two would not share out the programs
        used = _launch(_px_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(S, bm), N),
                (q, k, v, r, kparts, norms, o, m, lw, sa, sr, nup, dbar, cr, tref, trem, ref, S, float(scale), ta, td),
                D,
                DV, q.dtype, used,
                # float64 keeps d's rounding at u64 |d| without the split; 8-bit parts are exact
                # bf16 operands (the interpreter's bf16 dot is broken: fp32 there)
                SPLIT_D=split, EXACT=_exact_precision(), B16=b16, MODE=mode, W16=w16)
    if w16:
        # the fast rows keep no row statistics: none of them is returned (nor the norms'
        # suffix maxima, which only the backward reads)
        return ForwardOut(o, None, None, None, None, None, None, None, None, None, None, split, norms, ta, td)
    return ForwardOut(o, m, lw, nup, dbar, cr, tref, trem, ref, sa, sr, split, norms, ta, td)


def parallax_backward_kernel(q, k, v, r, g, fo: ForwardOut, scale, *, config=None) -> BackwardOut:
    """dq, dk, dv, dr for dL/do = g (N, S, Dv), from the forward's saved row quantities."""
    N, S, D = q.shape
    DV = v.shape[-1]
    acc = fo.nup.dtype
    gf = g.to(acc)
    # delta_i = <g_i, C_i r_i>; the terms against the row's heaviest key are formed in the
    # kernels, which gather its key and value
    delta = (gf * fo.cr).sum(-1)
    cols = dict(fo._asdict(), delta=delta)
    stats = torch.stack([cols[name] for name in STAT_NAMES], -1).contiguous()
    dq, dk, dr = torch.empty_like(q), torch.empty_like(k), torch.empty_like(r)
    dv = torch.empty_like(v)
    b16 = q.dtype == torch.bfloat16
    kparts, vparts = key_parts(k, v) if b16 else (k, v)
    # the forward's bounds and thresholds: every entry takes the forward's path
    common = (q, k, v, r, kparts, vparts, fo.norms, g, fo.nup, stats, fo.ref)
    # gc_i = <g_i, nu_i - v_ref>, written by the dq kernel for the dk, dv kernel
    gc = torch.empty_like(delta)
    # the backward forms p and d as the forward did (float64: single products at u64)
    extra = dict(SPLIT=fo.split, EXACT=_exact_precision(), B16=b16)
    # as the forward: the programs whose every entry is fast, compiled without the split, then the others
    # (each pair of launches on the same tiles, or the two would not share out the programs)
    used = config
    for mode in ((1, 2) if fo.split else (0,)):
        used = _launch(_px_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(S, bm), N),
                       common + (dq, dr, gc, S, float(scale), fo.ta, fo.td), D, DV, q.dtype, used, MODE=mode, **extra)
    used = config
    for mode in ((1, 2) if fo.split else (0,)):
        used = _launch(_px_bwd_dkdv_kernel, "dkdv", lambda bm, bn: (triton.cdiv(S, bn), N),
                       common + (gc, dk, dv, S, float(scale), fo.ta, fo.td), D, DV, q.dtype, used, MODE=mode, **extra)
    return BackwardOut(dq, dk, dv, dr)
