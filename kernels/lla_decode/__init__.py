"""LLA decode in Triton: one query against a key-value cache, flash-decoding style.

For the query q of a (batch, head), over the cache positions j < lengths[b]
(docs/decode.md; the operator is SPEC 1 / docs/math.md):

    z_j = k_j - q,   w_j = exp(a_j - M),   a_j = s <q, k_j - k_0>   (softmax-invariant shift)
    mu = sum_j w_j z_j,   Sigma = sum_j w_j z_j z_j^T + lambda Omega I,   Sigma rho = mu
    o  = sum_j w_j (1 - <z_j, rho>) v_j / sum_j w_j (1 - <z_j, rho>)

Five launches:
1. split:  one program per (split of the cache, head, block of Sigma): m_s, omega_s, mu_s and
           Sigma_s (D x D, fp64), each against the split's own running max;
2. sum:    per (head, block of entries): sum_s exp(m_s - M) Sigma_s in fp64;
3. solve:  one program per head: rescales the splits by exp(m_s - M), sums them, adds
           lambda Omega I, and runs CG in fp64 on the materialised Sigma (D <= 128: 128 KiB).
           In fp32 the materialised Sigma's rounding, u_32 ||Sigma||, exceeds its smallest
           eigenvalues once kappa passes 1/u_32: p^T Sigma p went negative and CG stopped at
           relative residual 0.19 (subspace family, lambda 1e-8, kappa 2.6e8, a 4.6x budget
           failure), where the forward's matvec, a sum of w_j <z_j, p>^2 >= 0, stays positive;
4. output: one program per (split, head): g_j = w_j (1 - <z_j, rho>) against the global M, so
           its partial sums add without rescaling;
5. finish: sums them and divides, with the forward kernel's delta guard.

z_j is formed explicitly (k_j - q, in fp32, before any product): a common offset of q and
the keys cancels there, as in the float64 oracle. Imports torch, triton and lla_contract only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lla_contract import (LLAInputError, check_cache, check_cache_finite, check_delta_eps, check_lambda,
                          check_lambda_value, check_nonnegative, check_num_heads, check_plan_cache, check_planned,
                          check_scale, write_plan_lengths)
from lla_contract.host import (cdiv as _cdiv, f32_arrays as _f32_arrays, interpreting as _interpreting,
                               sm_count as _sm_count)

__all__ = ["lla_decode", "lla_decode_stages", "lla_decode_plan", "LLADecodePlan", "LLAInputError", "DEFAULT_CG_TOL",
           "resolve_solver",
           "DEFAULT_DELTA_EPS",
           "CG_ITERS_PER_DIM", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "BLOCK_N",
           "INTERPRETED_BLOCK_N", "tile_size"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # D and Dv: powers of two (tl.arange needs them)
# The forward kernel's defaults (lla_triton.forward; not imported: this package stands alone)
DEFAULT_CG_TOL = 1e-7
CG_ITERS_PER_DIM = 16
DEFAULT_DELTA_EPS = 2.0**-22
# Output-pass programs resident on one SM (sm_90, Triton 3.6, 4 warps, tile 64, 3 stages;
# from ptxas's registers a thread: 65536 / (128 x regs)). With no split size given, the output
# pass, a memory-bound read of the cache like Parallax's, aims at one wave of the SMs.
RESIDENT_PER_SM = {16: 4, 32: 4, 64: 4, 128: 2}
# A split holds at least 2 D positions: its Sigma_s (8 D^2 bytes, written once and read once)
# then costs at most the cache bytes it summarises (4 D a position at 16 bits). A longer floor
# leaves SMs idle at small caches: on the H200 at batch 1, 4k positions, D = 128, a floor of
# 8 D (4 splits) took 21.1x SDPA's graph time and 2 D 11.9x, and no point of
# scripts/decode_sweeps.sh's sigma sweep was slower with 2 D (docs/decode.md, "Speed").
MIN_SPLIT_PER_DIM = 2
OUT_STAGES = 3
# The memory-bound passes (the output pass here, the keyed solve's key passes) on splits of
# their own (pass_split): programs an SM by max(D, Dv), and the tile and warps such a split
# runs with. The Sigma pass's split, which MIN_SPLIT_PER_DIM keeps long since each of its
# splits writes a D x D partial, leaves few programs an SM at large caches; the output pass's
# partials are Dv + 3 floats a split. On an H200 (scripts/decode_sweeps.sh passes), 8 one-warp
# programs an SM over 16-position tiles took the output pass from 2.18 to 0.96 ms at batch 64
# with 128k positions (D = 128), 1.00 to 0.48 ms at D = 64, and 0.075 to 0.041 ms at batch 64
# with 4k. A pass keeps the shared split, with SHARED_TILE_WARPS warps over BLOCK_N-position
# tiles, where its own would be longer (PASS_MAX_SPLITS binds: batch 1 with 32k positions,
# where the own split's 64 one-warp programs took 0.039 ms against 0.014).
OUT_RESIDENT_PER_SM = {16: 8, 32: 8, 64: 8, 128: 8}
OUT_BLOCK_N = 16
OUT_WARPS = 1
SHARED_TILE_WARPS = 4
# at most this many splits a head for a pass on a split of its own: one program a head sums
# them in order, CHUNK at a time, so without a cap a few heads on many SMs hand it a long
# chain of dependent loads (on an H200 at batch 1 with 32k positions, 1056 splits of the
# output pass took the finish 72 us, against 3 us for 32)
PASS_MAX_SPLITS = 64
# the split kernel's warps: its fp64 BS x BS accumulator and tile operands spill from 4 warps'
# registers (ptxas: 255 registers and a stack)
SPLIT_WARPS = 8
# splits a solve or finish program loads at once (a chunk of mu_s or of the outputs' acc_s:
# at most 4096 floats); 2 under the interpreter, so that small tests see several chunks
COMBINE_CHUNK = 64
INTERPRETED_COMBINE_CHUNK = 2
# the split kernel's Sigma blocks (BS x BS); 16 under the interpreter (tl.dot's least), so
# that tests at D = 32 and 64 see two and four block rows, as D = 128 does compiled
SIGMA_BLOCK = 64
INTERPRETED_SIGMA_BLOCK = 16
# rows of Sigma the solve reads at a time in each CG product, by D: D itself holds the matrix
# in registers (32 KB of fp64 at D = 64 over 4 warps: 7-9 us a solve against 16-22 us
# streamed, on an H200); at D = 128 it spills, and 16 rows a load (16 KB) stream it
SOLVE_ROWS = {16: 16, 32: 32, 64: 64, 128: 16}
# the solve's warps by D: a held D x D fp64 matrix takes 2 D^2 / (32 warps) registers a thread
# (64 at D = 64 over 4 warps; at D = 128 it needs 16 warps for the same)
SOLVE_WARPS = {16: 4, 32: 4, 64: 4, 128: 4}
SIGMA_SUM_BLOCK = 1024  # fp64 entries of Sigma a summing program owns (D^2 / this programs a head)
# solver="auto": the keyed solve where a call reads at least this many cache positions over
# its query heads (H x the sum of the lengths), by D, else the Sigma solve; None: the Sigma
# solve always. The Sigma pass costs 2 D^2 fp64 tensor-core operations a position, a keyed
# iteration a read of the keys, and the keyed solve's launches (two an iteration) cost latency
# that only a large read hides. From bench-decode --graphs with each solve on one H200
# (docs/performance.md, "Decode against SDPA"): at D = 128 the keyed solve is the faster from
# 131072 positions (1 x 128k: 11.5x SDPA against 13.2x; 64 x 4k: 13.8x against 14.7x) and the
# slower at 65536 and below (16 x 4k: 19.8x against 12.6x); at D = 64 from 2^21 (16 x 128k:
# 6.9x against 8.7x) and the slower at 2^19 and below (16 x 32k: 9.0x against 7.0x). D = 16
# and 32 are not measured.
KEYED_MIN_POSITIONS = {16: None, 32: None, 64: 1 << 21, 128: 1 << 17}
SOLVERS = ("sigma", "keyed", "auto")


def choose_solver(positions: int, D: int) -> str:
    """solver="auto"'s choice for a call reading ``positions`` cache positions over its query
    heads at head dim D."""
    least = KEYED_MIN_POSITIONS.get(D)
    return "keyed" if least is not None and positions >= least else "sigma"


def resolve_solver(solver, lengths, H: int, D: int) -> str:
    """The solve a call with ``solver`` makes ("sigma" or "keyed"), for ``lengths`` (B,) on the
    host and H query heads at head dim D; an unknown name is an LLAInputError."""
    if solver not in SOLVERS:
        raise LLAInputError(f"solver: expected one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    if solver == "auto":
        return choose_solver(H * int(lengths.sum()), D)
    return solver


# cache positions per tile: a split is a multiple of it. The interpreter runs each program
# as numpy, where small tiles keep the CPU tests fast.
BLOCK_N = 64
INTERPRETED_BLOCK_N = 16


def _accepts_cpu() -> bool:
    """CPU tensors run only under the interpreter. A name apart from ``_interpreting`` so that
    lla_verify.testing.compile_check can let CPU tensors through to compile the kernels
    and still get the GPU's tile and split sizes."""
    return _interpreting()


def _block_n(interp: bool | None = None) -> int:
    return INTERPRETED_BLOCK_N if (_interpreting() if interp is None else interp) else BLOCK_N


def tile_size() -> int:
    """Cache positions per tile in this process (BLOCK_N, or INTERPRETED_BLOCK_N under the
    interpreter): a ``split`` must be a positive multiple of it."""
    return _block_n()


def choose_split(t_max: int, n_heads: int, block_n: int, slots: int, min_split: int) -> int:
    """Split length (a multiple of block_n, at least min_split rounded up to one): splits x
    n_heads programs within ``slots`` (one wave of the output pass), one split a head when the
    heads alone fill it."""
    n_tiles = _cdiv(t_max, block_n)
    n_splits = max(1, min(n_tiles // max(1, _cdiv(min_split, block_n)), slots // n_heads))
    return _cdiv(n_tiles, n_splits) * block_n


def pass_split(t_max: int, n_heads: int, block_n: int, sms: int, resident, width: int, shared: int):
    """A pass's own split, or None where it keeps the ``shared`` one: ``resident`` (programs an
    SM, by width) is None, or its own split would be longer than the shared one. Its own split
    is one wave of ``resident[width]`` programs an SM, at most PASS_MAX_SPLITS splits a head,
    each a multiple of ``block_n``."""
    if resident is None:
        return None
    slots = min(sms * resident[width], n_heads * PASS_MAX_SPLITS)
    own = choose_split(t_max, n_heads, block_n, slots, block_n)
    return own if own <= shared else None


def _chunk(width: int, interp: bool) -> int:
    return INTERPRETED_COMBINE_CHUNK if interp else max(1, min(COMBINE_CHUNK, 4096 // width))


@triton.jit
def _scalar(x):
    """A 0-d fp32 tensor holding x (loop-carried scalars need a tensor type)."""
    return tl.sum(tl.full([16], 0.0, tl.float32), 0) + x


@triton.jit
def _head(bh, H, G):
    """(batch, key-value head) of flattened query head bh; G query heads share one kv head."""
    b = bh // H
    return b, (b * (H // G) + (bh % H) // G).to(tl.int64)


@triton.jit
def _key_tile(Kb, offs_n, end, q, k0, scale, D: tl.constexpr):
    """Scores a_j (-inf past the split) and z_j = k_j - q (0 there) of one tile of keys."""
    offs_d = tl.arange(0, D)
    keep = offs_n < end
    k = tl.load(Kb + offs_n[:, None] * D + offs_d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
    a = tl.where(keep, scale * tl.sum((k - k0[None, :]) * q[None, :], 1), float("-inf"))
    z = tl.where(keep[:, None], k - q[None, :], 0.0)
    return a, z


@triton.jit
def _tile(Kb, Vb, offs_n, end, q, k0, scale, D: tl.constexpr, DV: tl.constexpr):
    """_key_tile's scores and z_j, and the tile's values (0 past the split)."""
    a, z = _key_tile(Kb, offs_n, end, q, k0, scale, D)
    offs_v = tl.arange(0, DV)
    v = tl.load(Vb + offs_n[:, None] * DV + offs_v[None, :], mask=(offs_n < end)[:, None], other=0.0).to(tl.float32)
    return a, z, v


@triton.jit
def _split_program(Q, K, V, LENS, H, G, T, split, pid_s, bh, D: tl.constexpr, DV: tl.constexpr):
    """What a program of the split and output kernels serves: its split pid_s of head bh
    (cache positions start..end-1), the query, its kv head's keys and values, and the
    anchor key k_0."""
    b, kvh = _head(bh, H, G)
    L = tl.load(LENS + b)
    start = pid_s * split
    end = tl.minimum(start + split, L)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh.to(tl.int64) * D + offs_d).to(tl.float32)
    Kb = K + kvh * T * D
    Vb = V + kvh * T * DV
    k0 = tl.load(Kb + offs_d).to(tl.float32)
    return pid_s, bh, start, end, q, Kb, Vb, k0


# Integer arguments left unspecialised: Triton would compile one variant per class
# (== 1, divisible by 16, other) of each, and the test suites draw many shapes; row
# offsets need no divisibility facts from them, since D and DV are constexpr.
@triton.jit
def _gate(GATE, bh, GATED: tl.constexpr):
    """Whether head bh takes part in a launch: with GATED, where GATE (int32 a head) is
    nonzero (the keyed solve's heads still iterating; those handed to the Sigma solve at its
    cap), else every head."""
    if GATED:
        run = tl.load(GATE + bh) != 0
    else:
        run = bh >= 0
    return run


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _lla_split_kernel(Q, K, V, LENS, GATE, M_S, OM_S, MU_S, SIG_S, H, G, T, n_splits, split, scale,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                      GATED: tl.constexpr):
    """Program (split, head, blk) accumulates the block (I, J) of Sigma_s, rows I = bi BS..,
    columns J = bj BS.., for the blk-th block on or above the diagonal in row order (NB = D / BS
    block rows, row t holding NB - t of them: at NB = 2 (0, 0), (0, 1), (1, 1)), and stores it
    and its transpose: the full symmetric Sigma_s in (NB + 1) / (2 NB) of the products, with a
    BS x BS fp64 accumulator that stays in registers (a D x D one at D = 128 spilled to local
    memory). Every block's program forms the tile's scores and weights itself; block 0's
    stores m_s and omega_s, the diagonal blocks' the rows I of mu_s."""
    # the block is the fastest grid axis: a split's block programs run together and share
    # the key tiles through L2
    blk = tl.program_id(0)
    pid_s, bh, start, end, q, Kb, Vb, k0 = _split_program(Q, K, V, LENS, H, G, T, split, tl.program_id(1),
                                                          tl.program_id(2), D, DV)
    # a head not solved reads no tile (its partials, stored as an empty split's, go unread)
    end = tl.where(_gate(GATE, bh, GATED), end, start)
    NB: tl.constexpr = D // BS
    # bi: the block rows whose first block (t NB - t (t - 1) / 2) is at or before blk
    bi = blk * 0
    for t in tl.static_range(1, NB):
        bi += (blk >= t * NB - t * (t - 1) // 2).to(bi.dtype)
    bj = bi + blk - (bi * NB - bi * (bi - 1) // 2)
    offs_d = tl.arange(0, D)
    offs_i = bi * BS + tl.arange(0, BS)
    offs_j = bj * BS + tl.arange(0, BS)
    q_i = tl.load(Q + bh.to(tl.int64) * D + offs_i).to(tl.float32)
    q_j = tl.load(Q + bh.to(tl.int64) * D + offs_j).to(tl.float32)
    m_i = _scalar(float("-inf"))
    omega = _scalar(0.0)
    mu = tl.zeros([BS], dtype=tl.float32)
    sig = tl.zeros([BS, BS], dtype=tl.float64)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        k = tl.load(Kb + offs_n[:, None] * D + offs_d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        a = tl.where(keep, scale * tl.sum((k - k0[None, :]) * q[None, :], 1), float("-inf"))
        # the block's columns of the same tile (a second load of cached lines, not of memory)
        k_i = tl.load(Kb + offs_n[:, None] * D + offs_i[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        k_j = tl.load(Kb + offs_n[:, None] * D + offs_j[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        # each tile holds at least one kept position, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(a, 0))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(a - m_new)
        # z_i, z_j: the same fp32 differences k - q as z, column for column
        z_i = tl.where(keep[:, None], k_i - q_i[None, :], 0.0)
        z_j = tl.where(keep[:, None], k_j - q_j[None, :], 0.0)
        # an identity (a sum over a unit axis) that Triton 3.6 needs: it sizes an fp64 dot
        # operand's register layout by the narrowest load its operand traces back to through
        # elementwise ops, and for a 16-bit cache picks one its fp64 MMA lowering rejects
        # (MMAv2.cpp "fp64 don't support largeK MMA"). A reduction ends that trace, so z
        # counts as fp32 as with an fp32 cache; the values are unchanged.
        z_i = tl.sum(z_i[:, :, None], 2)
        z_j = tl.sum(z_j[:, :, None], 2)
        omega = omega * alpha + tl.sum(w, 0)
        mu = mu * alpha + tl.sum(w[:, None] * z_i, 0)
        # fp64 products of fp32 factors, exact, summed in fp64: docs/decode.md "Why fp64"
        sig = sig * alpha.to(tl.float64) + tl.dot(tl.trans(w[:, None] * z_i).to(tl.float64), z_j.to(tl.float64))
        m_i = m_new
    # an empty split (start >= L) stores m = -inf and zero sums: weight 0 in the combine
    row = bh.to(tl.int64) * n_splits + pid_s
    if blk == 0:
        tl.store(M_S + row, m_i)
        tl.store(OM_S + row, omega)
    sbase = SIG_S + row * D * D
    tl.store(sbase + offs_i[:, None] * D + offs_j[None, :], sig)
    if bi == bj:
        tl.store(MU_S + row * D + offs_i, mu)
    else:
        tl.store(sbase + offs_j[:, None] * D + offs_i[None, :], tl.trans(sig))


@triton.jit
def _head_splits(LENS, H, n_splits, split):
    """What a program of the solve and finish kernels serves: head bh, the number of its
    splits that hold cache positions, and the row of its first split's partials."""
    bh = tl.program_id(0)
    used = tl.cdiv(tl.load(LENS + bh // H), split)
    return bh, used, bh.to(tl.int64) * n_splits


@triton.jit
def _head_max(M_S, base, used, CHUNK: tl.constexpr):
    """The largest of a head's used splits' maxima, CHUNK splits a load."""
    offs_c = tl.arange(0, CHUNK)
    big = _scalar(float("-inf"))
    for c0 in range(0, used, CHUNK):
        big = tl.maximum(big, tl.max(tl.load(M_S + base + c0 + offs_c, mask=c0 + offs_c < used,
                                             other=float("-inf")), 0))
    return big


@triton.jit
def _head_sums(M_S, OM_S, MU_S, base, used, D: tl.constexpr, CHUNK: tl.constexpr):
    """A head's global max M, Omega and mu (fp64) from its used splits' partials, each split
    rescaled by exp(m_s - M), CHUNK splits a load. A split whose max underflows against M
    (f = 0) adds nothing; masked ones neither."""
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK)
    big = _head_max(M_S, base, used, CHUNK)
    omega = _scalar(0.0)
    mu = tl.zeros([D], dtype=tl.float64)
    for c0 in range(0, used, CHUNK):
        live = c0 + offs_c < used
        row = base + c0 + offs_c
        f = tl.where(live, tl.exp(tl.load(M_S + row, mask=live, other=float("-inf")) - big), 0.0)
        omega += tl.sum(f * tl.load(OM_S + row, mask=live, other=0.0), 0)
        mu_s = tl.load(MU_S + row[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
        mu += tl.sum((f[:, None] * mu_s).to(tl.float64), 0)
    return big, omega, mu


@triton.jit
def _head_lambda(LAM, bh, LAM_PER_HEAD: tl.constexpr):
    """Head bh's lambda: LAM a (B*H) fp32 array with LAM_PER_HEAD, else one float for every
    head (an argument: no device array to fill per call)."""
    if LAM_PER_HEAD:
        lam = tl.load(LAM + bh)
    else:
        # fp32, as the per-head array holds it (the interpreter passes a host float as is)
        lam = tl.cast(LAM, tl.float32)
    return lam


@triton.jit(do_not_specialize=('H', 'n_splits'))
def _lla_sigma_sum_kernel(LENS, GATE, M_S, SIG_S, SIG, H, n_splits, split, D: tl.constexpr, BE: tl.constexpr,
                          CHUNK: tl.constexpr, GATED: tl.constexpr):
    """Program (element block, head): BE entries of sum_s exp(m_s - M) Sigma_s in fp64, the
    splits' loads pipelined; the solve kernel reads the sum. Many programs a head share the
    D x D x n_splits fp64 partials' read, which a single program per head serialised."""
    bh, used, base = _head_splits(LENS, H, n_splits, split)
    used = tl.where(_gate(GATE, bh, GATED), used, 0)
    big = _head_max(M_S, base, used, CHUNK)
    offs_e = tl.program_id(1) * BE + tl.arange(0, BE)
    acc = tl.zeros([BE], dtype=tl.float64)
    for s in tl.range(0, used, num_stages=3):
        f = tl.exp(tl.load(M_S + base + s) - big).to(tl.float64)
        acc += f * tl.load(SIG_S + (base + s) * D * D + offs_e)
    tl.store(SIG + bh.to(tl.int64) * D * D + offs_e, acc)


@triton.jit
def _sigma_matvec(SIGh, sig, p, offs_d, D: tl.constexpr, ROWS: tl.constexpr):
    """Sigma p for the head's D x D fp64 Sigma: ``sig`` itself where the solve holds it in
    registers (ROWS == D), else read ROWS rows at a time from SIGh (L2 after the first product;
    symmetric, so p's entries of rows J weigh Sigma's rows J): at D = 128 the held matrix
    spilled to local memory and the solve took 0.6-0.8 ms a call on an H200, 0.05 ms streamed."""
    if ROWS == D:
        y = tl.sum(sig * p[None, :], 1)
    else:
        y = tl.zeros([D], dtype=tl.float64)
        offs_r = tl.arange(0, ROWS)
        for r0 in tl.static_range(0, D, ROWS):
            rows = r0 + offs_r
            # p's entries r0..r0+ROWS-1 taken out of the register vector
            p_rows = tl.sum(tl.where(rows[:, None] == offs_d[None, :], p[None, :], 0.0), 1)
            blk = tl.load(SIGh + rows[:, None] * D + offs_d[None, :])
            y += tl.sum(blk * p_rows[:, None], 0)
    return y


@triton.jit(do_not_specialize=('H', 'n_splits', 'cg_max_iters'))
def _lla_solve_kernel(LENS, LAM, GATE, M_S, OM_S, MU_S, SIG, M_OUT, OM_OUT, RHO, ITERS, RES, SERR,
                      H, n_splits, split, cg_tol, cg_max_iters, D: tl.constexpr, CHUNK: tl.constexpr,
                      LAM_PER_HEAD: tl.constexpr, ROWS: tl.constexpr, GATED: tl.constexpr):
    """LAM: lambda per head (B*H fp32) with LAM_PER_HEAD, else one lambda for every head (a
    float argument: no device array to fill per call). A head not solved (GATE) reads no
    split (mu = 0: CG stops at once) and stores nothing."""
    bh, used, base = _head_splits(LENS, H, n_splits, split)
    run = _gate(GATE, bh, GATED)
    used = tl.where(run, used, 0)
    offs_d = tl.arange(0, D)
    big, omega, mu = _head_sums(M_S, OM_S, MU_S, base, used, D, CHUNK)
    sig_h = SIG + bh.to(tl.int64) * D * D
    if ROWS == D:
        sig = tl.load(sig_h + offs_d[:, None] * D + offs_d[None, :])
    else:
        # not read: each product streams Sigma's rows from sig_h
        sig = tl.zeros([1], dtype=tl.float64)
    # the ridge lambda Omega I, added to Sigma's diagonal in every product
    ridge = (_head_lambda(LAM, bh, LAM_PER_HEAD) * omega).to(tl.float64)

    # CG on Sigma rho = mu; mu = 0 (the first token) is solved by rho = 0 at once
    rho = tl.zeros([D], dtype=tl.float64)
    res = mu
    p = mu
    rr = tl.sum(mu * mu, 0)
    mu2 = rr
    thresh = (cg_tol * cg_tol) * mu2
    active = rr > thresh
    it = 0
    while active & (it < cg_max_iters):
        ap = _sigma_matvec(sig_h, sig, p, offs_d, D, ROWS) + ridge * p
        pap = tl.sum(p * ap, 0)
        # pAp <= 0 only when Sigma is singular (lambda = 0) and p hit its null space:
        # stop there rather than divide by it
        ok = pap > 0.0
        alpha = tl.where(ok, rr / tl.where(ok, pap, 1.0), 0.0)
        rho += alpha * p
        res -= alpha * ap
        rr_new = tl.sum(res * res, 0)
        beta = tl.where(rr > 0.0, rr_new / tl.where(rr > 0.0, rr, 1.0), 0.0)
        p = res + beta * p
        rr = rr_new
        it += 1
        active = ok & (rr > thresh)
    # the true residual of the rounded Sigma: CG's recursive one drifts from it
    tres = mu - (_sigma_matvec(sig_h, sig, rho, offs_d, D, ROWS) + ridge * rho)
    tn = tl.sqrt(tl.sum(tres * tres, 0))
    mn = tl.sqrt(mu2)
    tl.store(M_OUT + bh, big, mask=run)
    tl.store(OM_OUT + bh, omega, mask=run)
    tl.store(RHO + bh.to(tl.int64) * D + offs_d, rho.to(tl.float32), mask=offs_d < tl.where(run, D, 0))
    tl.store(ITERS + bh, it, mask=run)
    tl.store(RES + bh, tl.where(mn > 0.0, tn / tl.where(mn > 0.0, mn, 1.0), 0.0).to(tl.float32), mask=run)
    # <mu, Sigma^-1 mu - rho> = <rho, r> exactly for symmetric Sigma: the solve's error in
    # den is at most |rho| |r|, 2x for safety as in the forward kernel's guard
    tl.store(SERR + bh, (2.0 * tl.sqrt(tl.sum(rho * rho, 0)) * tn).to(tl.float32), mask=run)


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _lla_out_kernel(Q, K, V, LENS, M_G, RHO, ACC_S, ACC0_S, DEN_S, MAG_S, OMW_S, RHO64, Y_S,
                    H, G, T, n_splits, split, scale,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                    RESID: tl.constexpr):
    """Per (split, head): the output's sums against the global max. RESID (the keyed solve):
    besides, y_s = sum_j w_j <z_j, rho> z_j with the solve's fp64 rho, as the keyed product
    forms it (fp32 factors, fp64 products and sums), for the finish's true residual: the
    pass reads the keys anyway, so the residual costs no pass of its own."""
    pid_s, bh, start, end, q, Kb, Vb, k0 = _split_program(Q, K, V, LENS, H, G, T, split, tl.program_id(0),
                                                          tl.program_id(1), D, DV)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    rho = tl.load(RHO + bh.to(tl.int64) * D + offs_d)
    big = tl.load(M_G + bh)
    acc = tl.zeros([DV], dtype=tl.float32)
    acc0 = tl.zeros([DV], dtype=tl.float32)
    den = _scalar(0.0)
    mag = _scalar(0.0)
    omw = _scalar(0.0)
    if RESID:
        rho64 = tl.load(RHO64 + bh.to(tl.int64) * D + offs_d)
        y = tl.zeros([D], dtype=tl.float64)
    # cache tiles loaded STAGES - 1 ahead (cp.async): Triton pipelines only dot operands
    # unless asked, and this pass is memory-bound
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        a, z, v = _tile(Kb, Vb, start_n + tl.arange(0, BLOCK_N), end, q, k0, scale, D, DV)
        # against the global max: the splits' sums add without rescaling
        w = tl.exp(a - big)
        t = tl.sum(z * rho[None, :], 1)
        g = w * (1.0 - t)
        acc += tl.sum(g[:, None] * v, 0)
        acc0 += tl.sum(w[:, None] * v, 0)
        den += tl.sum(g, 0)
        # the size of what den's rounding acts on (the forward kernel's guard)
        mag += tl.sum(w * (1.0 + tl.abs(t)), 0)
        omw += tl.sum(w, 0)
        if RESID:
            z64 = z.to(tl.float64)
            w64 = w.to(tl.float64)
            y += tl.sum((w64 * tl.sum(z64 * rho64[None, :], 1))[:, None] * z64, 0)
    row = bh.to(tl.int64) * n_splits + pid_s
    if RESID:
        tl.store(Y_S + row * D + offs_d, y)
    tl.store(ACC_S + row * DV + offs_v, acc)
    tl.store(ACC0_S + row * DV + offs_v, acc0)
    tl.store(DEN_S + row, den)
    tl.store(MAG_S + row, mag)
    tl.store(OMW_S + row, omw)


@triton.jit(do_not_specialize=('H', 'n_splits'))
def _lla_finish_kernel(LENS, ACC_S, ACC0_S, DEN_S, MAG_S, OMW_S, SERR, O, DEN_OUT, FB_OUT,
                       Y_S, MU, RIDGE, RHO64, RES, HANDED, H, n_splits, split, delta_eps,
                       DV: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, RESID: tl.constexpr):
    """Per head: the output from the splits' sums, with the delta guard. RESID (the keyed
    solve): first the true relative residual |mu - Sigma rho| / |mu| from the output pass's
    y_s (CG's recursive residual drifts from it) and the solve's error bound 2 |rho| |r| on
    den (as the Sigma solve forms them), stored as the head's statistics; a head handed to
    the Sigma solve (HANDED nonzero) keeps that solve's."""
    bh, used, base = _head_splits(LENS, H, n_splits, split)
    if RESID:
        h = bh.to(tl.int64)
        offs_d = tl.arange(0, D)
        offs_c = tl.arange(0, CHUNK)
        y = tl.zeros([D], dtype=tl.float64)
        for c0 in range(0, used, CHUNK):
            live = c0 + offs_c < used
            row = base + c0 + offs_c
            y += tl.sum(tl.load(Y_S + row[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0), 0)
        rho = tl.load(RHO64 + h * D + offs_d)
        mu = tl.load(MU + h * D + offs_d)
        tres = mu - (y + tl.load(RIDGE + bh) * rho)
        tn = tl.sqrt(tl.sum(tres * tres, 0))
        mn = tl.sqrt(tl.sum(mu * mu, 0))
        mine = tl.load(HANDED + bh) == 0
        bound = (2.0 * tl.sqrt(tl.sum(rho * rho, 0)) * tn).to(tl.float32)
        tl.store(RES + bh, tl.where(mn > 0.0, tn / tl.where(mn > 0.0, mn, 1.0), 0.0).to(tl.float32), mask=mine)
        tl.store(SERR + bh, bound, mask=mine)
        serr = tl.where(mine, bound, tl.load(SERR + bh))
    else:
        serr = tl.load(SERR + bh)
    offs_v = tl.arange(0, DV)
    offs_c = tl.arange(0, CHUNK)
    acc = tl.zeros([DV], dtype=tl.float32)
    acc0 = tl.zeros([DV], dtype=tl.float32)
    den = _scalar(0.0)
    mag = _scalar(0.0)
    omw = _scalar(0.0)
    # the splits' sums are all against the global max: plain sums, CHUNK splits a load
    for c0 in range(0, used, CHUNK):
        live = c0 + offs_c < used
        row = base + c0 + offs_c
        rows_v = row[:, None] * DV + offs_v[None, :]
        acc += tl.sum(tl.load(ACC_S + rows_v, mask=live[:, None], other=0.0), 0)
        acc0 += tl.sum(tl.load(ACC0_S + rows_v, mask=live[:, None], other=0.0), 0)
        den += tl.sum(tl.load(DEN_S + row, mask=live, other=0.0), 0)
        mag += tl.sum(tl.load(MAG_S + row, mask=live, other=0.0), 0)
        omw += tl.sum(tl.load(OMW_S + row, mask=live, other=0.0), 0)
    # delta guard (docs/kernels.md): a den inside its rounding and solve error has no
    # correct digit; such a query returns the softmax average (rho = 0) instead
    fallback = tl.abs(den) <= delta_eps * mag + serr
    o = tl.where(fallback, acc0 / omw, acc / tl.where(fallback | (den == 0.0), 1.0, den))
    tl.store(O + bh.to(tl.int64) * DV + offs_v, o.to(O.dtype.element_ty))
    tl.store(DEN_OUT + bh, den)
    tl.store(FB_OUT + bh, fallback.to(tl.int8))


class DecodeStats(NamedTuple):
    cg_iters: torch.Tensor  # (B, H) int32
    cg_residual: torch.Tensor  # (B, H) fp32, true relative residual ||mu - Sigma rho|| / ||mu||
    omega: torch.Tensor  # (B, H) fp32
    delta: torch.Tensor  # (B, H) fp32, den = sum_j w_j (1 - <z_j, rho>) as summed
    fallback: torch.Tensor  # (B, H) bool


def _check_options(cg_tol, cg_max_iters, D):
    tol = check_nonnegative(cg_tol, "cg_tol")
    if cg_max_iters is None:
        return tol, CG_ITERS_PER_DIM * D
    if isinstance(cg_max_iters, bool) or not isinstance(cg_max_iters, int) or cg_max_iters < 0:
        raise LLAInputError(f"cg_max_iters: expected None (16 D) or an int >= 0, got {cg_max_iters!r}")
    return tol, cg_max_iters


class _Prepared(NamedTuple):
    """A call's checked arguments and launch sizes: everything but q's values."""
    lens: torch.Tensor  # host int64 (B,)
    lens_d: torch.Tensor  # device int32 (B,)
    lam: object  # a float, or a (B, H) fp32 tensor on the device
    lam_per_head: bool
    scale: float
    eps: float
    tol: float
    max_iters: int
    split: int
    n_splits: int
    bn: int
    interp: bool
    out_split: int  # the output pass's split (a multiple of its tile); ``split`` unless chosen apart
    out_own: bool  # out_split is the output pass's own (OUT_BLOCK_N, OUT_WARPS), else the shared split
    sms: int  # the device's SMs (the keyed solve's passes choose their splits from it)
    chosen: bool  # the splits were chosen here (no ``split`` given): passes may take their own


def _prepare(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters, delta_eps, split,
             check_finite) -> _Prepared:
    """Every check of a call and the sizes its launches take; copies the lengths to the device."""
    if isinstance(q, torch.Tensor) and q.dim() != 3:
        raise LLAInputError(f"q: expected shape (B, H, D), got {tuple(q.shape)}")
    lens = check_cache(q, k_cache, v_cache, lengths, dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS,
                       check_finite=check_finite)
    if q.device.type == "cpu" and not _accepts_cpu():
        raise LLAInputError("q: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1) or a CUDA device")
    B, H, D = q.shape
    T, Dv = k_cache.shape[2], v_cache.shape[-1]
    if isinstance(ridge_lambda, torch.Tensor) and ridge_lambda.dim() > 0 and ridge_lambda.device != q.device:
        raise LLAInputError(f"ridge_lambda: expected a tensor on {q.device}, got one on {ridge_lambda.device}")
    if isinstance(ridge_lambda, torch.Tensor):
        lam, lam_per_head = check_lambda(ridge_lambda, (B, H), q.device, dtype=torch.float32).contiguous(), True
    else:
        # one lambda for every head goes to the solve as an argument: no (B, H) array to fill
        lam, lam_per_head = check_lambda_value(ridge_lambda, (B, H), dtype=torch.float32), False
    scale = check_scale(qk_scale, D)
    eps = check_delta_eps(delta_eps)
    tol, max_iters = _check_options(cg_tol, cg_max_iters, D)
    interp = _interpreting()
    bn = _block_n(interp)
    sms = _sm_count(q.device)
    chosen = split is None
    if split is None:
        split = choose_split(T, B * H, bn, sms * RESIDENT_PER_SM[max(D, Dv)], MIN_SPLIT_PER_DIM * D)
        own = pass_split(T, B * H, bn if interp else OUT_BLOCK_N, sms, OUT_RESIDENT_PER_SM, max(D, Dv), split)
        out_split, out_own = (split, False) if own is None else (own, True)
    elif isinstance(split, bool) or not isinstance(split, int) or split < bn or split % bn:
        raise LLAInputError(f"split: expected None or a positive multiple of the tile {bn}, got {split!r}")
    else:
        out_split, out_own = split, False
    # lens is on the host (check_cache); a blocking copy would wait for the stream to drain
    # before every launch. A pageable source is staged before the call returns, so the
    # asynchronous copy is safe to drop.
    lens_d = lens.to(dtype=torch.int32).to(device=q.device, non_blocking=True)
    return _Prepared(lens, lens_d, lam, lam_per_head, scale, eps, tol, max_iters, split, _cdiv(T, split), bn, interp,
                     out_split, out_own, sms, chosen)


def _stages(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters, delta_eps, split,
            check_finite, combine):
    """The launches: (o, (iters, res, om_g, den, fb) per head (flat, at least B*H entries),
    parts: the arguments of ``_parts``, or its dict when ``combine`` needed it). Only what a
    caller asks for is shaped: at a small cache each torch call costs about what a kernel
    does."""
    prep = _prepare(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters, delta_eps, split,
                    check_finite)
    return _launch(prep, q, k_cache, v_cache, combine)


def _launch(prep: _Prepared, q, k_cache, v_cache, combine, out=None):
    """The five launches of a prepared call (``out``: o's storage, else a new tensor). No host
    copy and no synchronisation: a CUDA graph can capture it."""
    N, D = q.shape[0] * q.shape[1], q.shape[2]
    qc, kc, vc = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    m_g, om_g, res, serr, den = _f32_arrays(5, N, q.device)
    rho = torch.empty(N, D, device=q.device, dtype=torch.float32)
    iters = torch.empty(N, device=q.device, dtype=torch.int32)
    parts = _sigma_solve(prep, qc, kc, vc, (m_g, om_g, rho, iters, res, serr), combine=combine)
    o, fb = _output_and_finish(prep, qc, kc, vc, m_g, rho, serr, den, out)
    return o, (iters, res, om_g, den, fb), parts


def _sigma_solve(prep: _Prepared, qc, kc, vc, outs, gate=None, combine=None):
    """The Sigma pass, its sum and the solve, writing outs = (M, Omega, rho (fp32), iterations,
    residual, solve error bound) per head; with ``gate`` (int32 a head) only the heads where
    it is nonzero, the others' entries untouched (no head's partials are read for them).
    Returns the split kernel's partials as ``_parts``' arguments."""
    B, H, D = qc.shape
    Hk, T, Dv = kc.shape[1], kc.shape[2], vc.shape[-1]
    split, n_splits, bn, interp, lens_d = prep.split, prep.n_splits, prep.bn, prep.interp, prep.lens_d
    N, G, dev = B * H, H // Hk, qc.device
    gated = gate is not None
    # not read ungated: the lengths stand in for the pointer
    gate = gate if gated else lens_d

    m_s, om_s = _f32_arrays(2, N * n_splits, dev)
    mu_s = torch.empty(N, n_splits, D, device=dev, dtype=torch.float32)
    sig_s = torch.empty(N, n_splits, D, D, device=dev, dtype=torch.float64)
    # Sigma in blocks of BS x BS: those on and above the diagonal, one program each
    bs = min(D, INTERPRETED_SIGMA_BLOCK if interp else SIGMA_BLOCK)
    n_blocks = (D // bs) * (D // bs + 1) // 2
    _lla_split_kernel[(n_blocks, n_splits, N)](qc, kc, vc, lens_d, gate, m_s, om_s, mu_s, sig_s, H, G, T, n_splits,
                                               split, float(prep.scale), D=D, DV=Dv, BLOCK_N=bn, BS=bs,
                                               GATED=int(gated), num_warps=SPLIT_WARPS)
    parts = (m_s, om_s, mu_s, sig_s, split, lens_d, N, n_splits)
    if combine is not None:
        parts = _parts(*parts)
        # a planted combine hands the solve one "split" holding its sums
        big, om, mu, sig = combine(parts)
        m_s, om_s, mu_s, sig_s = (t.to(torch.float32).reshape(N, 1, *t.shape[1:]).contiguous()
                                  for t in (big, om, mu, sig))
        sig_s = sig_s.double()
        n_solve, split_solve = 1, T
    else:
        n_solve, split_solve = n_splits, split

    sig = torch.empty(N, D, D, device=dev, dtype=torch.float64)
    be = min(D * D, SIGMA_SUM_BLOCK)
    _lla_sigma_sum_kernel[(N, D * D // be)](lens_d, gate, m_s, sig_s, sig, H, n_solve, split_solve, D=D, BE=be,
                                            CHUNK=_chunk(1, interp), GATED=int(gated), num_warps=4)
    _lla_solve_kernel[(N,)](lens_d, prep.lam, gate, m_s, om_s, mu_s, sig, *outs,
                            H, n_solve, split_solve, float(prep.tol), int(prep.max_iters), D=D,
                            CHUNK=_chunk(D, interp), LAM_PER_HEAD=prep.lam_per_head,
                            ROWS=min(D, 16) if interp else SOLVE_ROWS[D], GATED=int(gated),
                            num_warps=4 if interp else SOLVE_WARPS[D])
    return parts


def _output_and_finish(prep: _Prepared, qc, kc, vc, m_g, rho, serr, den, out, resid=None):
    """The output pass and the finish, for either solve: o (``out``, else a new tensor) and
    the fallback flags; den is written. rho is fp32 (N, D), m_g and serr fp32 (N,).
    ``resid`` (the keyed solve): (mu, ridge, rho64, res, handed), with which the output pass
    and the finish also form the true residual and the error bound serr (written into
    ``res`` and ``serr`` but where ``handed`` is nonzero)."""
    B, H, D = qc.shape
    Hk, T, Dv = kc.shape[1], kc.shape[2], vc.shape[-1]
    # the output pass's own split (prep.split unless chosen apart): its partials are summed
    # by the finish alone, against the global max, so any split serves
    split, interp, lens_d = prep.out_split, prep.interp, prep.lens_d
    n_splits = _cdiv(T, split)
    N, dev = B * H, qc.device
    acc_s, acc0_s = torch.empty(2, N, n_splits, Dv, device=dev, dtype=torch.float32).unbind(0)
    den_s, mag_s, omw_s = _f32_arrays(3, N * n_splits, dev)
    # the output pass's tile and warps are read at call time: scripts/study_decode_variants.py
    # sets them on the package for its variants
    out_bn, out_warps = (OUT_BLOCK_N, OUT_WARPS) if prep.out_own else (prep.bn, SHARED_TILE_WARPS)
    if interp:
        out_bn = prep.bn
    if resid is None:
        # not read: RESID is off
        mu, ridge, rho64, res, handed, y_s = serr, serr, serr, serr, serr, serr
    else:
        mu, ridge, rho64, res, handed = resid
        y_s = torch.empty(N, n_splits, D, device=dev, dtype=torch.float64)
    _lla_out_kernel[(n_splits, N)](qc, kc, vc, lens_d, m_g, rho, acc_s, acc0_s, den_s, mag_s, omw_s, rho64, y_s,
                                   H, H // Hk, T, n_splits, split, float(prep.scale), D=D, DV=Dv, BLOCK_N=out_bn,
                                   STAGES=OUT_STAGES, RESID=resid is not None, num_warps=out_warps)
    o = torch.empty(B, H, Dv, device=dev, dtype=qc.dtype) if out is None else out
    fb = torch.empty(N, device=dev, dtype=torch.int8)
    _lla_finish_kernel[(N,)](lens_d, acc_s, acc0_s, den_s, mag_s, omw_s, serr, o, den, fb,
                             y_s, mu, ridge, rho64, res, handed, H, n_splits, split, float(prep.eps), DV=Dv,
                             CHUNK=_chunk(Dv, interp), D=D, RESID=resid is not None, num_warps=4)
    return o, fb


def _parts(m_s, om_s, mu_s, sig_s, split, lens_d, N, n_splits):
    """The split kernel's partials as (B*H, n_splits, ...) arrays."""
    return {"m": m_s[:N * n_splits].view(N, n_splits), "omega": om_s[:N * n_splits].view(N, n_splits), "mu": mu_s,
            "sigma": sig_s, "split": split, "lengths": lens_d}


def _stats(raw, B, H) -> DecodeStats:
    iters, res, om_g, den, fb = raw
    N = B * H
    return DecodeStats(iters.reshape(B, H), res[:N].reshape(B, H), om_g[:N].reshape(B, H), den[:N].reshape(B, H),
                       fb.bool().reshape(B, H))


def lla_decode_stages(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, cg_tol=DEFAULT_CG_TOL,
                      cg_max_iters=None, delta_eps=DEFAULT_DELTA_EPS, split=None, check_finite=True,
                      combine=None):
    """``lla_decode`` with every stage's result: returns (o, stats, parts), parts holding the
    split kernel's partials. ``combine``, when given, replaces the solve stage's rescaled
    sum of the splits by a function of those partials returning (M, Omega, mu, Sigma) per
    head (Sigma without the ridge), which tests use to plant a wrong combine."""
    o, raw, parts = _stages(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters, delta_eps,
                            split, check_finite, combine)
    if isinstance(parts, tuple):
        parts = _parts(*parts)
    return o, _stats(raw, *q.shape[:2]), parts


def lla_decode(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, cg_tol=DEFAULT_CG_TOL,
               cg_max_iters=None, delta_eps=DEFAULT_DELTA_EPS, split=None, return_stats=False,
               check_finite=True, solver="auto"):
    """LLA for one query per (batch, head) against a cache (docs/decode.md).

    q: (B, H, D); k_cache (B, H_kv, T_max, D), v_cache (B, H_kv, T_max, Dv), H_kv dividing H
    (query head h reads key-value head h // (H / H_kv)); lengths (B,) integers with
    1 <= lengths[b] <= T_max: the query attends to positions 0..lengths[b]-1, its own key and
    value being the last. ridge_lambda: a float >= 0 or a tensor broadcastable to (B, H).
    One dtype of fp32 / bf16 / fp16; D, Dv in {16, 32, 64, 128}. Returns (B, H, Dv) in q's
    dtype, and with ``return_stats`` a dict of (B, H) tensors: cg_iters, cg_residual (true
    relative residual), omega, delta (den as summed) and fallback (the delta guard served
    the softmax average). ``split``: cache positions per program (a multiple of the tile;
    None picks one from the shape). ``solver``: "sigma" (the cache's Sigma formed in fp64 and
    solved on the device), "keyed" (each CG product a pass over the keys, as the forward
    kernel's; the host reads whether any head still iterates after iterations 4, 8, 16, ...,
    so a call waits for the device: a plan's run does not, and a CUDA graph captures that) or
    "auto" (the keyed solve from KEYED_MIN_POSITIONS[D] cache positions over the query heads,
    else the Sigma solve); docs/decode.md compares them.
    """
    prep = _prepare(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters, delta_eps,
                    split, check_finite)
    if resolve_solver(solver, prep.lens, q.shape[1], q.shape[2]) == "keyed":
        from .keyed import launch as keyed_launch

        o, raw = keyed_launch(prep, q, k_cache, v_cache)
    else:
        o, raw, _ = _launch(prep, q, k_cache, v_cache, None)
    if not return_stats:
        return o
    return o, _stats(raw, *q.shape[:2])._asdict()


class LLADecodePlan:
    """lla_decode for one cache, prepared once (``lla_decode_plan``): every check of the cache,
    the lengths, lambda and the options, the split size, and the lengths' device copy. A
    ``run(q)`` checks q against the plan (shape, dtype, device: no device work) and makes the
    solver's launches (five for the Sigma solve; a fixed count for the keyed one); with
    ``check_finite=False`` it copies nothing to the device and never
    waits for it (its workspaces are allocations, which a CUDA graph captures), so a graph can
    capture it and its replays read the cache, q and the lengths as they are then. Lambda and
    the options are fixed at planning. ``set_lengths`` checks new lengths and writes them into
    the plan's device copy (from the host: outside a capture). The plan reads the cache in
    place, so it must be contiguous."""

    def __init__(self, k_cache, v_cache, lengths, *, ridge_lambda, num_heads=None, qk_scale=None,
                 cg_tol=DEFAULT_CG_TOL, cg_max_iters=None, delta_eps=DEFAULT_DELTA_EPS, split=None, solver="auto"):
        check_plan_cache(k_cache, v_cache)
        B, Hk, _, D = k_cache.shape
        H = check_num_heads(num_heads, Hk)
        # q as a run will pass it: every check of lla_decode runs here once
        like = torch.empty((B, H, D), device=k_cache.device, dtype=k_cache.dtype)
        self.prep = _prepare(like, k_cache, v_cache, lengths, ridge_lambda, qk_scale, cg_tol, cg_max_iters,
                             delta_eps, split, False)
        # "auto" chooses once, by the planning lengths: a captured step keeps its launches
        self.solver = resolve_solver(solver, self.prep.lens, H, D)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.shape, self.dtype, self.device = (B, H, D), k_cache.dtype, k_cache.device

    def set_lengths(self, lengths) -> None:
        """Check ``lengths`` against the cache and write them into the plan's device copy."""
        lens = write_plan_lengths(self.k_cache, self.v_cache, self.shape, lengths, self.prep.lens_d,
                                  dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS)
        self.prep = self.prep._replace(lens=lens)

    def run(self, q, *, out=None, check_finite=True, return_stats=False):
        """o (B, H, Dv) of lla_decode(q, k_cache, v_cache, lengths, ...) for the plan's cache,
        lengths and options (with ``return_stats``, lla_decode's statistics too); ``out``: a
        contiguous (B, H, Dv) tensor of q's dtype to write o into."""
        check_planned("q", q, self.shape, self.dtype, self.device)
        if out is not None:
            check_planned("out", out, self.shape[:2] + (self.v_cache.shape[-1],), self.dtype, self.device,
                          contiguous=True)
        if check_finite:
            check_cache_finite(q, self.k_cache, self.v_cache, self.prep.lens)
        if self.solver == "keyed":
            from .keyed import launch as keyed_launch

            # every iteration's launches made, gated on the device: no host read
            o, raw = keyed_launch(self.prep, q, self.k_cache, self.v_cache, out, fixed=True)
        else:
            o, raw, _ = _launch(self.prep, q, self.k_cache, self.v_cache, None, out)
        if not return_stats:
            return o
        return o, _stats(raw, *self.shape[:2])._asdict()


def lla_decode_plan(k_cache, v_cache, lengths, *, ridge_lambda, num_heads=None, qk_scale=None, cg_tol=DEFAULT_CG_TOL,
                    cg_max_iters=None, delta_eps=DEFAULT_DELTA_EPS, split=None, solver="auto"):
    """An LLADecodePlan: lla_decode's checks and launch sizes for this cache, lengths, lambda
    and options, done once; ``plan.run(q)`` is then the decode step (q of shape
    (B, num_heads, D), num_heads defaulting to the cache's H_kv). ``solver`` as lla_decode's;
    a keyed plan's run makes every iteration's launches (min(cg_max_iters, KEYED_MAX_ITERS)
    of them, those of converged heads doing nothing) and the Sigma hand-over's, with no host
    read."""
    return LLADecodePlan(k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, num_heads=num_heads,
                         qk_scale=qk_scale, cg_tol=cg_tol, cg_max_iters=cg_max_iters, delta_eps=delta_eps, split=split,
                         solver=solver)
