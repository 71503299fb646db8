"""The Parallax forward outside autograd, on the rows whose every entry is fast.

A forward that no backward reads (parallax_attention outside autograd, bf16 inputs, bf16
weights: kernels.FAST_BF16_WEIGHTS) needs none of the row statistics the backward reads,
and on a row whose every (query, key) entry passes the fast-tile test (docs/kernels-parallax.md
§3, "Fast tiles") it needs none of the reference-key mechanics either: those exist for the
split products, which such a row never forms. So these rows run FlashAttention's loop with
the Chan merge of kernels._fwd_merge and nothing else:

    x_ij = fl(s a_ij) - m_i        (m_i the running maximum of the scaled scores, as FlashAttention)
    d_ij = <k_j, r_i> - c0_i       (one bf16 product, exact products: kernels._d_plain)

and the merge with bf16 weights (kernels._fwd_merge, W16; the co-moment's weights in
kernels.INFER_WE_PARTS bf16 parts). A row is fast when
s |q_i| max_{j<=i} |k_j| <= ta and |r_i| max_{j<=i} kd_j <= td (_fast_rows): the bounds of
every entry (i, j <= i) then hold, and the test reads the row and the keys up to it alone, so
which kernel computes a row never depends on a later token and the output stays bitwise
causal. The other rows run the split kernel (kernels._px_fwd_kernel, MODE 3), each row in
exactly one of the two launches.

Why the rounding is that of the fast tiles (docs/kernels-parallax.md §3): s a_ij rounds at
u |s a_ij| <= u ta and the subtraction of m_i at u |x_ij|, inside the (D + 2) roundings the fast
threshold charges (an error in m_i is common to the row and cancels in the normalisation);
d_ij is the fast tiles' plain d, and the centring e_ij = d_ij - dbar_i in the merge rounds at
u |e_ij| (dbar_i's own error is common to the row and cancels against sum_j p_ij (v_j - nu_i) = 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import NM_C0, _dot16, _fast_rows, _fwd_merge, _load_rows, _masked, _norm, _query_program


@triton.jit
def _infer_tile(q_dot, r16, c0, cv, K, V, kbase, vbase, start_n, S, scale, offs_m, m_i, l_i, nu, dbar, cm,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                MASK: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr, EXACT: tl.constexpr,
                WE_PARTS: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, kbase, offs_n, S, D)
    v = _load_rows(V, vbase, offs_n, S, DV)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    x = _masked(tl.dot(q_dot, tl.trans(k), input_precision=SPREC) * scale, offs_m, offs_n, S, MASK)
    m_new = tl.maximum(m_i, tl.max(x, 1))
    # every row sees key 0 in its first tile, so m_new is finite and the row's heaviest key
    # so far weighs exactly 1
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(x - m_new[:, None])
    d = _dot16(r16, tl.trans(k), EXACT) - c0[:, None]
    l_i, nu, dbar, cm = _fwd_merge(w, d, v, v, cv, alpha, l_i, nu, dbar, cm, PREC, True, EXACT, WE_PARTS)
    return m_new, l_i, nu, dbar, cm


# S is not specialised on (== 1, % 16): every pointer is offset by multiples of D or Dv
@triton.jit(do_not_specialize=("S",))
def _px_fwd_infer_kernel(Q, K, V, R, NORMS, O, S, scale, ta, td, D: tl.constexpr, DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, SPREC: tl.constexpr, EXACT: tl.constexpr, WE_PARTS: tl.constexpr):
    """One program per (head, query tile): the tile's fast rows (_fast_rows), stored alone;
    a tile without one loops over no key."""
    pid_m, _, kbase, vbase, nbase, offs_m = _query_program(S, D, DV, BLOCK_M)
    mine = (offs_m < S) & _fast_rows(NORMS, nbase + offs_m, offs_m < S, ta, td)
    hi = tl.where(tl.max(mine.to(tl.int32), 0) > 0, tl.minimum((pid_m + 1) * BLOCK_M, S), 0)
    # key tiles entirely below the diagonal (and inside S) need no mask
    lo_full = tl.minimum(((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N, hi)

    q_dot = _load_rows(Q, kbase, offs_m, S, D)
    r16 = _load_rows(R, kbase, offs_m, S, D)
    if UPCAST:
        q_dot = q_dot.to(tl.float32)
        r16 = r16.to(tl.float32)
    c0 = _norm(NORMS, nbase + offs_m, offs_m < S, NM_C0)
    cv = tl.load(V + vbase + tl.arange(0, DV)).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    dbar = tl.zeros([BLOCK_M], dtype=tl.float32)
    nu = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    cm = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    for start_n in range(0, lo_full, BLOCK_N):
        m_i, l_i, nu, dbar, cm = _infer_tile(q_dot, r16, c0, cv, K, V, kbase, vbase, start_n, S, scale, offs_m,
                                             m_i, l_i, nu, dbar, cm, D, DV, BLOCK_N, UPCAST, False, PREC, SPREC,
                                             EXACT, WE_PARTS)
    for start_n in range(lo_full, hi, BLOCK_N):
        m_i, l_i, nu, dbar, cm = _infer_tile(q_dot, r16, c0, cv, K, V, kbase, vbase, start_n, S, scale, offs_m,
                                             m_i, l_i, nu, dbar, cm, D, DV, BLOCK_N, UPCAST, True, PREC, SPREC,
                                             EXACT, WE_PARTS)
    # l_i >= 1 on every row that ran; 0 only in a program that looped over no key
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    o = cv[None, :] + nu - cm / l_i[:, None]
    optr = O + vbase + offs_m[:, None] * DV + tl.arange(0, DV)[None, :]
    tl.store(optr, o.to(O.dtype.element_ty), mask=mine[:, None])
