"""Parallax decode in Triton: one query against a key-value cache, flash-decoding style.

o = nu - C r over the cache positions 0..lengths[b]-1 (docs/decode.md; the operator is
docs/math.md "Parallax"). The cache is cut into splits of ``split`` positions, one program
per (split, head); the combine merges them a chunk of splits at a time (in two launches where a
head has more splits than a chunk: each chunk in a program of its own, then the chunks). With
d_j = <k_j - k_0, r> and
v'_j = v_j - v_0 (k_0, v_0: the sequence's first key and value, a common anchor) and the
scores a_j = s <q, k_j - k_0> (a softmax-invariant shift), every group of positions (a
tile, a split, the whole cache) is summarised by its centred moments

    m = max_j a_j,  omega = sum_j w_j (w_j = exp(a_j - m)),  nu' = sum_j w_j v'_j / omega,
    dbar = sum_j w_j d_j / omega,  X = sum_j w_j (v'_j - nu')(d_j - dbar)

and two groups merge by the parallel-covariance rule (Chan, Golub and LeVeque): rescale
omega and X by exp(m - M), then

    omega = omega_a + omega_b,   nu' = nu'_a + (omega_b / omega)(nu'_b - nu'_a)   (same for dbar)
    X = X_a + X_b + (omega_a omega_b / omega)(nu'_b - nu'_a)(dbar_b - dbar_a).

o = v_0 + nu' - X / omega is nu - C r. No term is ever the uncentred product of two means,
which cancels catastrophically under a large common key offset (docs/math.md §5.3); and a
key offset of 1e3 cancels in k_j - k_0 before any product.

Imports torch, triton and lla_contract only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lla_contract import (LLAInputError, check_cache, check_cache_finite, check_num_heads, check_plan_cache,
                          check_planned, check_probe, check_scale, write_plan_lengths)
from lla_contract.host import (cdiv as _cdiv, f32_arrays as _f32_arrays, interpreting as _interpreting,
                               sm_count as _sm_count)

__all__ = ["parallax_decode", "parallax_decode_partials", "parallax_decode_combine", "parallax_decode_plan",
           "ParallaxDecodePlan", "LLAInputError",
           "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "BLOCK_N", "INTERPRETED_BLOCK_N", "tile_size",
           "combine_chunk"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # D and Dv: powers of two (tl.arange needs them)
# Split programs resident on one SM at once. With no split size given, a launch of (splits x
# heads) programs aims at one wave of the SMs (SM count x this): a second, partial wave would
# leave most SMs idle while it runs, and more splits than that only add partials to combine.
# One warp a program over 16-position tiles: the tile's moments are row and column sums, and
# with more warps each one is a cross-warp exchange through shared memory; a one-warp program
# keeps them in shuffles, and eight of them on an SM keep enough loads in flight. Measured on
# an H200 (scripts/study_decode_variants.py; docs/decode.md "Speed"): 1.16-1.26x SDPA's time
# where the cache is large, against 1.9-2.3x for 4-warp programs over 64-position tiles.
# An fp32 cache at D = 128 (32 KB of shared memory a program) fits 7 on an SM.
RESIDENT_PER_SM = {16: 8, 32: 8, 64: 8, 128: 8}
SPLIT_WARPS = 1
# the longest split (in tiles) taken to keep a head's splits within one combine chunk. A few
# heads over a small cache would otherwise make more splits than a chunk, and the combine's
# second launch, a few microseconds of latency, is then a large part of a step that SDPA
# does in 10-20 us. Measured on an H200 (graph time, docs/decode.md "Speed"): at batch 1
# with a 4k cache, 1.50x SDPA against 1.68x at D = 64 (4 tiles a split); 8 tiles a split
# (32 programs at D = 128) took 1.94x against 1.42x
ONE_LEVEL_MAX_TILES = 4
# the most splits a head may have for the split kernel to combine them itself (0: never): the
# last program of a head to finish (an atomic count of the head's programs) merges the head's
# splits, FUSED_CHUNK at a time, so that a step is one launch instead of two or three, whose
# dependent latencies dominate a small cache. Off until measured on a GPU (docs/decode.md
# "Open"; scripts/decode_sweeps.sh)
FUSED_MAX_SPLITS = 0
# splits the fused combine loads at once: the split kernel's one warp holds 2 FUSED_CHUNK Dv
# floats of nu' and X (8 at Dv = 128: 64 registers a thread)
FUSED_CHUNK = 8
# cache tiles a split program keeps in flight (cp.async into shared memory) while it works on
# the one before: the split kernel is memory-bound, and without them each program waits for
# every tile's load before computing (Triton pipelines only the loads of dot products unless
# asked)
SPLIT_STAGES = 3
# splits a combine program merges at once: at most 64, and at most 4096 floats of nu' (and as
# many of X) a chunk, 32 registers a thread at 4 warps
COMBINE_CHUNK = 64
INTERPRETED_COMBINE_CHUNK = 2
# cache positions per tile: a split is a multiple of it. The interpreter runs each program
# as numpy, where small tiles keep the CPU tests fast.
BLOCK_N = 16
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


def choose_split(t_max: int, n_heads: int, block_n: int, slots: int, chunk: int | None = None) -> int:
    """Split length (a multiple of block_n): splits x n_heads programs within ``slots`` (the
    programs one wave of the device holds), one split a head when the heads alone fill it.
    With ``chunk`` (the combine's), a head whose cache fits in ``chunk`` splits of at most
    ONE_LEVEL_MAX_TILES tiles takes ``chunk`` splits, so that its combine is one launch."""
    n_tiles = _cdiv(t_max, block_n)
    n_splits = max(1, min(n_tiles, slots // n_heads))
    if chunk is not None and n_splits > chunk and _cdiv(n_tiles, chunk) <= ONE_LEVEL_MAX_TILES:
        n_splits = chunk
    return _cdiv(n_tiles, n_splits) * block_n


def combine_chunk(dv: int, interp: bool | None = None) -> int:
    """Splits the combine merges at once for value width dv (a power of two)."""
    if _interpreting() if interp is None else interp:
        return INTERPRETED_COMBINE_CHUNK
    return max(1, min(COMBINE_CHUNK, 4096 // dv))


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
def _store_moments(M, OM, DB, NU, X, row, m, om, db, nu, x, offs_v, DV: tl.constexpr):
    """A group's summary (max, weight, dbar, nu', X) at ``row`` of the moment arrays."""
    tl.store(M + row, m)
    tl.store(OM + row, om)
    tl.store(DB + row, db)
    tl.store(NU + row * DV + offs_v, nu)
    tl.store(X + row * DV + offs_v, x)


@triton.jit
def _merge(om_a, nu_a, db_a, x_a, om_b, nu_b, db_b, x_b):
    """Centred moments of two groups merged (both already against one max). A group whose
    weights all underflowed against the other's max (exp below fp32's range, scores more
    than ~103 apart) has omega = 0 and adds nothing; two such groups merge to an empty one."""
    om = om_a + om_b
    fb = tl.where(om > 0.0, om_b / tl.where(om > 0.0, om, 1.0), 0.0)
    dnu = nu_b - nu_a
    ddb = db_b - db_a
    return om, nu_a + fb * dnu, db_a + fb * ddb, x_a + x_b + (om_a * fb) * ddb * dnu


# Integer arguments left unspecialised: Triton would compile one variant per class
# (== 1, divisible by 16, other) of each, and the test suites draw many shapes; row
# offsets need no divisibility facts from them, since D and DV are constexpr.
@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _parallax_split_kernel(Q, R, K, V, LENS, M_S, OM_S, DB_S, NU_S, X_S, CNT, O,
                           H, G, T, n_splits, split, scale,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                           FUSED: tl.constexpr, CHUNK: tl.constexpr):
    """Program (split, head): the split's centred moments. With FUSED, the head's last program
    to store them (CNT: an int32 count a head, 0 on entry and left 0) also combines the head's
    splits into O, CHUNK at a time."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _head(bh, H, G)
    L = tl.load(LENS + b)
    start = pid_s * split
    end = tl.minimum(start + split, L)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    q = tl.load(Q + bh.to(tl.int64) * D + offs_d).to(tl.float32)
    r = tl.load(R + bh.to(tl.int64) * D + offs_d).to(tl.float32)
    kbase = K + kvh * T * D
    vbase = V + kvh * T * DV
    k0 = tl.load(kbase + offs_d).to(tl.float32)
    v0 = tl.load(vbase + offs_v).to(tl.float32)

    m_i = _scalar(float("-inf"))
    omega = _scalar(0.0)
    dbar = _scalar(0.0)
    nu = tl.zeros([DV], dtype=tl.float32)
    x = tl.zeros([DV], dtype=tl.float32)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        k = tl.load(kbase + offs_n[:, None] * D + offs_d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        v = tl.load(vbase + offs_n[:, None] * DV + offs_v[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        kd = k - k0[None, :]
        a = tl.where(keep, scale * tl.sum(kd * q[None, :], 1), float("-inf"))
        # the tile's own centred moments against its own max (two passes over the tile in
        # registers): each tile holds a kept position, so m_t is finite and om_t >= 1, and
        # its means never divide by a weight sum that underflowed against another tile's max
        m_t = tl.max(a, 0)
        w = tl.exp(a - m_t)
        d = tl.sum(kd * r[None, :], 1)
        vd = v - v0[None, :]
        om_t = tl.sum(w, 0)
        nu_t = tl.sum(w[:, None] * vd, 0) / om_t
        db_t = tl.sum(w * d, 0) / om_t
        x_t = tl.sum((w * (d - db_t))[:, None] * (vd - nu_t[None, :]), 0)
        m_new = tl.maximum(m_i, m_t)
        alpha = tl.exp(m_i - m_new)
        beta = tl.exp(m_t - m_new)
        omega, nu, dbar, x = _merge(omega * alpha, nu, dbar, x * alpha, om_t * beta, nu_t, db_t, x_t * beta)
        m_i = m_new
    # an empty split (start >= L) stores m = -inf and omega = 0: no weight in the combine
    _store_moments(M_S, OM_S, DB_S, NU_S, X_S, bh.to(tl.int64) * n_splits + pid_s, m_i, omega, dbar, nu, x,
                   offs_v, DV)
    if FUSED:
        # every thread's stores before the count (a release at device scope); the program that
        # counts last acquires the others' and combines: the order of the splits in the
        # combine is their index order, whichever program is last, so o is deterministic
        tl.debug_barrier()
        ticket = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")
        if ticket == n_splits - 1:
            _combine_head(V, LENS, M_S, OM_S, DB_S, NU_S, X_S, O, bh, H, G, T, n_splits, split, DV, CHUNK, True)
            # the count back to 0 for the next call on the same buffer (a plan's, a graph's replay)
            tl.atomic_xchg(CNT + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _chunk_moments(M_S, OM_S, DB_S, NU_S, X_S, row, live, offs_v, DV: tl.constexpr, L2: tl.constexpr = False):
    """Centred moments of the live splits at rows ``row``, against their own max m_c: weights
    w_i = f_i omega_i with f_i = exp(m_i - m_c), omega_c = sum_i w_i, the means nu'_c, dbar_c as
    w-weighted means, and X_c = sum_i f_i X_i + sum_i w_i (nu'_i - nu'_c)(dbar_i - dbar_c), the
    k-group form of the parallel-covariance rule (two groups: _merge). At least one row is
    live and every live split holds a cache position, so m_c is finite; the split attaining it
    has f = 1 and omega >= 1 (its own tiles' maxima weigh exp(0) = 1), so omega_c >= 1 and the
    means divide by no sum that underflowed. A split whose weights underflow against m_c
    (f = 0) adds nothing, as in _merge; a masked one neither. With L2, the loads bypass the
    SM's L1 (moments other programs of the same launch stored: the fused combine)."""
    CM: tl.constexpr = ".cg" if L2 else ""
    m_s = tl.load(M_S + row, mask=live, other=float("-inf"), cache_modifier=CM)
    m_c = tl.max(m_s, 0)
    f = tl.where(live, tl.exp(m_s - m_c), 0.0)
    w = f * tl.load(OM_S + row, mask=live, other=0.0, cache_modifier=CM)
    om_c = tl.sum(w, 0)
    p = w / om_c
    nu_s = tl.load(NU_S + row[:, None] * DV + offs_v[None, :], mask=live[:, None], other=0.0, cache_modifier=CM)
    db_s = tl.load(DB_S + row, mask=live, other=0.0, cache_modifier=CM)
    nu_c = tl.sum(p[:, None] * nu_s, 0)
    db_c = tl.sum(p * db_s, 0)
    x_s = tl.load(X_S + row[:, None] * DV + offs_v[None, :], mask=live[:, None], other=0.0, cache_modifier=CM)
    x_c = tl.sum(f[:, None] * x_s + (w * (db_s - db_c))[:, None] * (nu_s - nu_c[None, :]), 0)
    return m_c, om_c, nu_c, db_c, x_c


@triton.jit(do_not_specialize=('H', 'n_splits', 'n_groups', 'split'))
def _parallax_group_kernel(LENS, M_S, OM_S, DB_S, NU_S, X_S, M_G, OM_G, DB_G, NU_G, X_G,
                           H, n_splits, n_groups, split, DV: tl.constexpr, CHUNK: tl.constexpr):
    """The combine's first level where a head has more used splits than one chunk: program
    (g, head) summarises splits g CHUNK .. (g + 1) CHUNK - 1 (those used) as one group, in
    the split kernel's layout, so that the final combine reads n_groups groups of
    split CHUNK positions each. A group past the used splits stores nothing: the final
    combine, at that group length, never reads it."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    used = tl.cdiv(tl.load(LENS + bh // H), split)
    if g * CHUNK < used:
        offs_v = tl.arange(0, DV)
        offs_c = g * CHUNK + tl.arange(0, CHUNK)
        m_c, om_c, nu_c, db_c, x_c = _chunk_moments(M_S, OM_S, DB_S, NU_S, X_S, bh.to(tl.int64) * n_splits + offs_c,
                                                    offs_c < used, offs_v, DV)
        _store_moments(M_G, OM_G, DB_G, NU_G, X_G, bh.to(tl.int64) * n_groups + g, m_c, om_c, db_c, nu_c, x_c,
                       offs_v, DV)


@triton.jit
def _combine_head(V, LENS, M_S, OM_S, DB_S, NU_S, X_S, O, bh, H, G, T, n_splits, split, DV: tl.constexpr,
                  CHUNK: tl.constexpr, L2: tl.constexpr):
    """o of head bh from its used splits, CHUNK at a time, each chunk summarised by
    _chunk_moments and the chunks merged in order by _merge."""
    b, kvh = _head(bh, H, G)
    used = tl.cdiv(tl.load(LENS + b), split)
    offs_v = tl.arange(0, DV)
    offs_c = tl.arange(0, CHUNK)
    base = bh.to(tl.int64) * n_splits
    m_i = _scalar(float("-inf"))
    omega = _scalar(0.0)
    dbar = _scalar(0.0)
    nu = tl.zeros([DV], dtype=tl.float32)
    x = tl.zeros([DV], dtype=tl.float32)
    for c0 in range(0, used, CHUNK):
        m_c, om_c, nu_c, db_c, x_c = _chunk_moments(M_S, OM_S, DB_S, NU_S, X_S, base + c0 + offs_c,
                                                    (c0 + offs_c) < used, offs_v, DV, L2)
        m_new = tl.maximum(m_i, m_c)
        alpha = tl.exp(m_i - m_new)
        beta = tl.exp(m_c - m_new)
        omega, nu, dbar, x = _merge(omega * alpha, nu, dbar, x * alpha, om_c * beta, nu_c, db_c, x_c * beta)
        m_i = m_new
    v0 = tl.load(V + kvh * T * DV + offs_v).to(tl.float32)
    o = (v0 + nu) - x / omega
    tl.store(O + bh.to(tl.int64) * DV + offs_v, o.to(O.dtype.element_ty))


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits', 'split'))
def _parallax_combine_kernel(V, LENS, M_S, OM_S, DB_S, NU_S, X_S, O,
                             H, G, T, n_splits, split, DV: tl.constexpr, CHUNK: tl.constexpr):
    """One program per head: _combine_head."""
    _combine_head(V, LENS, M_S, OM_S, DB_S, NU_S, X_S, O, tl.program_id(0), H, G, T, n_splits, split, DV, CHUNK,
                  False)


def _check(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite, interp):
    if isinstance(q, torch.Tensor) and q.dim() != 3:
        raise LLAInputError(f"q: expected shape (B, H, D), got {tuple(q.shape)}")
    lens = check_cache(q, k_cache, v_cache, lengths, dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS,
                       check_finite=False)
    check_probe(r, q, dtypes=SUPPORTED_DTYPES, check_finite=False)
    if r.dtype != q.dtype:
        raise LLAInputError(f"r: expected q's dtype {q.dtype}, got {r.dtype}")
    if check_finite:
        # q, the used cache and r in one reduction: one device-to-host read, not two
        check_cache_finite(q, k_cache, v_cache, lens, (("r", r),))
    if q.device.type == "cpu" and not _accepts_cpu():
        raise LLAInputError("q: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1) or a CUDA device")
    scale = check_scale(qk_scale, q.shape[-1])
    bn = _block_n(interp)
    if split is None:
        slots = _sm_count(q.device) * RESIDENT_PER_SM[q.shape[-1]]
        # under the interpreter (one program at a time) the split count is no cost, and the
        # tests' default splits keep several chunks to combine
        split = choose_split(k_cache.shape[2], q.shape[0] * q.shape[1], bn, slots,
                             None if interp else combine_chunk(v_cache.shape[-1], interp))
    elif isinstance(split, bool) or not isinstance(split, int) or split < bn or split % bn:
        raise LLAInputError(f"split: expected None or a positive multiple of the tile {bn}, got {split!r}")
    return lens, scale, split, bn


def _moments(N, n_splits, Dv, dev):
    """The split kernel's outputs (m, omega, dbar flat, at least N*n_splits entries; nu', X
    (N, n_splits, Dv)): two allocations, not five, since at a small cache each one costs about
    what the kernels do. The moments stay contiguous arrays, as the kernels index them."""
    m_s, om_s, db_s = _f32_arrays(3, N * n_splits, dev)
    nu_s, x_s = torch.empty(2, N, n_splits, Dv, device=dev, dtype=torch.float32).unbind(0)
    return m_s, om_s, db_s, nu_s, x_s


def _lengths_on(lens, dev):
    # lens is on the host (check_cache); a blocking copy would wait for the stream to drain
    # before every launch. A pageable source is staged before the call returns, so the
    # asynchronous copy is safe to drop.
    return lens.to(dtype=torch.int32).to(device=dev, non_blocking=True)


def _fuses(n_splits: int) -> bool:
    """Whether the split kernel combines a call of n_splits splits a head itself."""
    return n_splits <= FUSED_MAX_SPLITS


def _launch_split(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn, fused=None):
    """The split kernel; ``fused``: (count, o) for the split kernel to combine into o itself,
    count an int32 zero a head (left zero)."""
    B, H, D = q.shape
    Hk, T, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    n_splits = moments[3].shape[1]
    # without fusion the count and o are not read: the moments stand in for their pointers
    cnt, o = fused if fused is not None else (moments[0], moments[0])
    _parallax_split_kernel[(n_splits, B * H)](
        q.contiguous(), r.contiguous(), k_cache.contiguous(), v_cache.contiguous(), lens_d, *moments, cnt, o,
        H, H // Hk, T, n_splits, split, float(scale), D=D, DV=Dv, BLOCK_N=bn, STAGES=SPLIT_STAGES,
        FUSED=int(fused is not None), CHUNK=FUSED_CHUNK, num_warps=SPLIT_WARPS)


def _fused_step(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn, count, o=None):
    """The one launch of a fused call: the split kernel combining into ``o`` (else a new
    tensor), with ``count`` an int32 zero a head (left zero)."""
    if o is None:
        o = torch.empty(*q.shape[:2], v_cache.shape[-1], device=q.device, dtype=q.dtype)
    _launch_split(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn, (count, o))
    return o


def _setup(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite, interp):
    """A call's checks and buffers: (moments, split, device lengths, scale, tile)."""
    lens, scale, split, bn = _check(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite, interp)
    B, H, _ = q.shape
    moments = _moments(B * H, _cdiv(k_cache.shape[2], split), v_cache.shape[-1], q.device)
    return moments, split, _lengths_on(lens, q.device), scale, bn


def _partials(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite, interp):
    """The split kernel's launch: (m, omega, dbar, nu', X, split, device lengths); m, omega
    and dbar flat, at least B*H*n_splits entries."""
    moments, split, lens_d, scale, bn = _setup(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite,
                                               interp)
    _launch_split(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn)
    return (*moments, split, lens_d)


def _groups(N, n_splits, chunk, Dv, dev):
    """The first combine level's outputs where a head's splits exceed one chunk (else None):
    per (head, group of ``chunk`` splits) moments in the split kernel's layout."""
    if n_splits <= chunk:
        return None
    return _moments(N, _cdiv(n_splits, chunk), Dv, dev)


def _combine(m_s, om_s, db_s, nu_s, x_s, split, lens_d, q, v_cache, chunk, o=None, groups=None):
    """o from the split moments. Where a head has more splits than one chunk, a first launch
    summarises each chunk of splits in a program of its own (``groups``: its buffers, from
    _groups; allocated here when None), and the final combine merges those groups: a long
    cache at batch 1 has up to a wave of splits (over a thousand), whose chunks one program
    alone would merge one after another."""
    B, H, _ = q.shape
    Hk, T, Dv = v_cache.shape[1], v_cache.shape[2], v_cache.shape[-1]
    N, n_splits = nu_s.shape[:2]
    if o is None:
        o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    if n_splits > chunk:
        if groups is None:
            groups = _groups(N, n_splits, chunk, Dv, q.device)
        n_groups = groups[3].shape[1]
        _parallax_group_kernel[(n_groups, N)](
            lens_d, m_s, om_s, db_s, nu_s, x_s, *groups, H, n_splits, n_groups, split, DV=Dv, CHUNK=chunk,
            num_warps=4)
        (m_s, om_s, db_s, nu_s, x_s), n_splits, split = groups, n_groups, split * chunk
    _parallax_combine_kernel[(N,)](
        v_cache.contiguous(), lens_d, m_s, om_s, db_s, nu_s, x_s, o,
        H, H // Hk, T, n_splits, split, DV=Dv, CHUNK=chunk, num_warps=4)
    return o


def parallax_decode_partials(q, r, k_cache, v_cache, lengths, *, qk_scale=None, split=None, check_finite=True):
    """The split kernel alone: per (B*H, n_splits) centred moments (m, omega, dbar, nu', X)
    and the split length; ``parallax_decode_combine`` finishes them. Exposed so that tests
    can plant a wrong combine."""
    m_s, om_s, db_s, nu_s, x_s, split, lens_d = _partials(q, r, k_cache, v_cache, lengths, qk_scale, split,
                                                          check_finite, _interpreting())
    N, n_splits = nu_s.shape[:2]
    m_s, om_s, db_s = (t[:N * n_splits].view(N, n_splits) for t in (m_s, om_s, db_s))
    return {"m": m_s, "omega": om_s, "dbar": db_s, "nu": nu_s, "x": x_s, "split": split, "lengths": lens_d}


def parallax_decode_combine(parts, q, v_cache, *, chunk=None):
    """Combine the partial moments of ``parallax_decode_partials`` into o (B, H, Dv),
    ``chunk`` splits at a time (a power of two; None: ``combine_chunk(Dv)``)."""
    if chunk is None:
        chunk = combine_chunk(v_cache.shape[-1])
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise LLAInputError(f"chunk: expected None or a power of two >= 1, got {chunk!r}")
    return _combine(parts["m"], parts["omega"], parts["dbar"], parts["nu"], parts["x"], parts["split"],
                    parts["lengths"], q, v_cache, chunk)


def parallax_decode(q, r, k_cache, v_cache, lengths, *, qk_scale=None, split=None, check_finite=True):
    """Parallax for one query per (batch, head) against a cache (docs/decode.md).

    q, r: (B, H, D); k_cache (B, H_kv, T_max, D), v_cache (B, H_kv, T_max, Dv), H_kv dividing
    H (query head h reads key-value head h // (H / H_kv)); lengths (B,) integers with
    1 <= lengths[b] <= T_max: the query attends to positions 0..lengths[b]-1, its own key
    and value being the last of them. One dtype of fp32 / bf16 / fp16; D, Dv in
    {16, 32, 64, 128}. Returns (B, H, Dv) in q's dtype. ``split``: cache positions per
    program (a multiple of the tile; None picks one from the shape).
    """
    # the environment read once a call: the tile, split and chunk all follow from it
    interp = _interpreting()
    moments, split, lens_d, scale, bn = _setup(q, r, k_cache, v_cache, lengths, qk_scale, split, check_finite,
                                               interp)
    if _fuses(moments[3].shape[1]):
        count = torch.zeros(q.shape[0] * q.shape[1], device=q.device, dtype=torch.int32)
        return _fused_step(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn, count)
    _launch_split(q, r, k_cache, v_cache, lens_d, moments, split, scale, bn)
    return _combine(*moments, split, lens_d, q, v_cache, combine_chunk(v_cache.shape[-1], interp))


class ParallaxDecodePlan:
    """parallax_decode for one cache, prepared once: ``parallax_decode_plan`` checks the cache
    and the lengths and holds the split size, the device lengths and the split kernel's
    moments; ``run(q, r)`` then checks q and r against the plan (shape, dtype, device: no
    device work) and launches its kernels (one to three). With ``check_finite=False`` a
    run allocates at most its output (none with ``out=``), copies nothing to the device and never waits
    for it, so it can be captured in a CUDA graph, whose replays read the cache, q, r and
    the lengths as they are at replay time. ``set_lengths`` checks new lengths and writes them
    into the plan's device copy (outside a capture: it copies from the host). The split size
    depends on T_max and the heads only, so it holds for every lengths.

    The plan reads k_cache and v_cache in place, so they must be contiguous (a copy would not
    see the writes of later decode steps). Its runs share the moment buffers: run them on one
    stream, one after another, as a decode loop does."""

    def __init__(self, k_cache, v_cache, lengths, *, num_heads=None, qk_scale=None, split=None):
        check_plan_cache(k_cache, v_cache)
        B, Hk, _, D = k_cache.shape
        H = check_num_heads(num_heads, Hk)
        self.interp = _interpreting()
        # q and r as a run will pass them: every check of parallax_decode runs here once
        like = torch.empty((B, H, D), device=k_cache.device, dtype=k_cache.dtype)
        lens, self.scale, self.split, self.bn = _check(like, like, k_cache, v_cache, lengths, qk_scale, split,
                                                       False, self.interp)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.shape, self.dtype, self.device = (B, H, D), k_cache.dtype, k_cache.device
        self.moments = _moments(B * H, _cdiv(k_cache.shape[2], self.split), v_cache.shape[-1], self.device)
        self.lengths = lens
        self.lens_d = _lengths_on(lens, self.device)
        self.chunk = combine_chunk(v_cache.shape[-1], self.interp)
        self.groups = _groups(B * H, self.moments[3].shape[1], self.chunk, v_cache.shape[-1], self.device)
        # the fused combine's count a head, zeroed once: every run leaves it zero
        self.count = (torch.zeros(B * H, device=self.device, dtype=torch.int32)
                      if _fuses(self.moments[3].shape[1]) else None)

    def set_lengths(self, lengths) -> None:
        """Check ``lengths`` against the cache and write them into the plan's device copy."""
        self.lengths = write_plan_lengths(self.k_cache, self.v_cache, self.shape, lengths, self.lens_d,
                                          dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS)

    def run(self, q, r, *, out=None, check_finite=True):
        """o (B, H, Dv) of parallax_decode(q, r, k_cache, v_cache, lengths) for the plan's
        cache and lengths; ``out``: a contiguous (B, H, Dv) tensor of q's dtype to write it into."""
        check_planned("q", q, self.shape, self.dtype, self.device)
        check_planned("r", r, self.shape, self.dtype, self.device)
        if out is not None:
            check_planned("out", out, self.shape[:2] + (self.v_cache.shape[-1],), self.dtype, self.device,
                          contiguous=True)
        if check_finite:
            check_cache_finite(q, self.k_cache, self.v_cache, self.lengths, (("r", r),))
        if self.count is not None:
            return _fused_step(q, r, self.k_cache, self.v_cache, self.lens_d, self.moments, self.split, self.scale,
                               self.bn, self.count, out)
        _launch_split(q, r, self.k_cache, self.v_cache, self.lens_d, self.moments, self.split, self.scale, self.bn)
        return _combine(*self.moments, self.split, self.lens_d, q, self.v_cache, self.chunk, out, self.groups)


def parallax_decode_plan(k_cache, v_cache, lengths, *, num_heads=None, qk_scale=None, split=None):
    """A ParallaxDecodePlan: parallax_decode's checks and buffers for this cache and lengths,
    done once; ``plan.run(q, r)`` is then the decode step (q, r of shape (B, num_heads, D),
    num_heads defaulting to the cache's H_kv)."""
    return ParallaxDecodePlan(k_cache, v_cache, lengths, num_heads=num_heads, qk_scale=qk_scale, split=split)
