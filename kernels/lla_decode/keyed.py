"""lla_decode's keyed solve: CG on Sigma rho = mu without forming Sigma.

Each CG product is a pass over the cached keys, as the forward kernel's matvec is: with the
weights w_j against the head's global max M and z_j = k_j - q formed in fp32,

    Sigma p = sum_j w_j <z_j, p> z_j + lambda Omega p,    p^T Sigma p = sum_j w_j <z_j, p>^2 + ...

with fp32 factors (w_j, z_j) and fp64 products and sums, split across the output pass's
programs and summed per head in fp64. The computed product is then exactly that of
sum_j w_j (1 + d_j) z_j z_j^T, |d_j| <= u_32: a positive definite matrix within u_32 of Sigma
in every direction (p^T E p <= u_32 p^T Sigma p), a tighter class than the materialised fp64
Sigma's (docs/decode.md, "Which precision Sigma needs" and "The keyed solve"). A product reads
the keys once and no D x D matrix exists: an iteration costs a pass over half a decode's
bytes (and 4 D fp64 operations a key), so a call costs about (iterations + 2) cache passes
where the Sigma path's pass costs 2 D^2 fp64 tensor-core operations a key.

Launches: the statistics pass (m, omega, mu a split), the start of the solve (per head: the
rescaled sums, rho = 0, the residual mu), then per iteration a product pass and a CG update
(per head; a head that has converged skips both), the Sigma solve of the heads still
iterating at KEYED_MAX_ITERS (gated per head), and the package's output pass and finish.
The true residual needs one more product, with rho: the output pass forms it as it reads
the keys (RESID), so it costs no pass of its own, and the finish turns it into the
residual and the solve's error bound that the delta guard reads. A call checks on the host
whether any head is still iterating after iterations 4, 8, 16, ...: one device-to-host read
each, and a launch with every head converged costs only its launch. A plan's run (``fixed``) makes every
launch with no host read, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lla_contract.host import f32_arrays as _f32_arrays

from . import (SHARED_TILE_WARPS, _cdiv, _chunk, _gate, _head_lambda, _head_splits, _head_sums, _key_tile,
               _output_and_finish, _scalar, _sigma_solve, _split_program, pass_split)

# the first iteration after which the host reads whether a head still iterates; then every
# doubling (a read is a synchronisation: rare, since a launch after convergence only costs
# its launch)
FIRST_CHECK = 4
# keyed iterations (cache passes) after which a head that has not converged is solved by the
# Sigma path instead, whose iterations read no cache: a speed rule, not an accuracy one (both
# solves are in one accuracy class), and not yet measured on a GPU
KEYED_MAX_ITERS = 32
# the key passes' tiles: positions a tile, warps, tiles in flight, and whether a product pass
# keeps y = sum_j w_j <z_j, p> z_j as a (positions, D) fp64 accumulator summed over the
# positions once at the end, instead of a column sum of every tile (with several warps, a
# cross-warp exchange through shared memory a tile). The tile and warps are those of a pass
# on a split of its own (lla_decode.pass_split); on the shared split a pass takes lla_decode's
# BLOCK_N and SHARED_TILE_WARPS. Read at call time (scripts/profile_decode_kernels.py
# --variant sets them).
KEY_PASS_BLOCK_N = 16
KEY_PASS_WARPS = 4
KEY_PASS_STAGES = 3
# the (positions, D) accumulator: on the H200 0.67-0.79x the keyed step's graph time with the column
# sums at every point of scripts/decode_sweeps.sh's keyed sweep, outputs bit for bit the same
KEY_PASS_ACC2D = True
# splits of their own for the product passes and the statistics pass (programs an SM by D;
# None: lla_decode's split). Each pass's partials are summed per head by the launch after
# it, so each may split the cache its own way. On an H200 (scripts/decode_sweeps.sh passes),
# with the output pass's own split, own splits against the shared one: products 4.35 against
# 6.20 ms and statistics 0.72 against 1.36 ms at batch 64 with 128k positions, D = 128 (the
# step graphed 6.16 against 9.83 ms); the step 1.81 against 2.58 ms at batch 16 with 128k, and
# 3.09 against 4.09 ms at batch 64, D = 64.
KEY_PRODUCT_RESIDENT_PER_SM = {16: 8, 32: 8, 64: 8, 128: 8}
KEY_STATS_RESIDENT_PER_SM = {16: 8, 32: 8, 64: 8, 128: 8}
KEY_STATS_BLOCK_N = 16
KEY_STATS_WARPS = 1


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _keyed_stats_kernel(Q, K, LENS, M_S, OM_S, MU_S, H, G, T, n_splits, split, scale,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Per (split, head): m_s, omega_s and mu_s = sum_j w_j z_j against the split's own max,
    rescaled as the max moves (flash-attention style). An empty split stores m = -inf, 0, 0."""
    pid_s, bh, start, end, q, Kb, _, k0 = _split_program(Q, K, K, LENS, H, G, T, split, tl.program_id(0),
                                                         tl.program_id(1), D, D)
    m_i = _scalar(float("-inf"))
    omega = _scalar(0.0)
    mu = tl.zeros([D], dtype=tl.float32)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        a, z = _key_tile(Kb, start_n + tl.arange(0, BLOCK_N), end, q, k0, scale, D)
        # each tile holds a kept position, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(a, 0))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(a - m_new)
        omega = omega * alpha + tl.sum(w, 0)
        mu = mu * alpha + tl.sum(w[:, None] * z, 0)
        m_i = m_new
    row = bh.to(tl.int64) * n_splits + pid_s
    tl.store(M_S + row, m_i)
    tl.store(OM_S + row, omega)
    tl.store(MU_S + row * D + tl.arange(0, D), mu)


@triton.jit(do_not_specialize=('H', 'n_splits', 'cg_max_iters'))
def _keyed_start_kernel(LENS, LAM, M_S, OM_S, MU_S, M_OUT, OM_OUT, RIDGE, MU, RHO, RHO32, RES, P, RR, THRESH, ACT,
                        IT, H, n_splits, split, cg_tol, cg_max_iters, D: tl.constexpr, CHUNK: tl.constexpr,
                        LAM_PER_HEAD: tl.constexpr):
    """Per head: M, Omega and mu (fp64) from the splits, the ridge lambda Omega, and CG's
    start: rho = 0 (and its fp32 copy for the output pass), residual and direction mu; a
    head with mu = 0 (the first token) starts done at rho = 0."""
    bh, used, base = _head_splits(LENS, H, n_splits, split)
    offs_d = tl.arange(0, D)
    big, omega, mu = _head_sums(M_S, OM_S, MU_S, base, used, D, CHUNK)
    lam = _head_lambda(LAM, bh, LAM_PER_HEAD)
    rr = tl.sum(mu * mu, 0)
    thresh = (cg_tol * cg_tol) * rr
    h = bh.to(tl.int64)
    tl.store(M_OUT + bh, big)
    tl.store(OM_OUT + bh, omega)
    tl.store(RIDGE + bh, (lam * omega).to(tl.float64))
    tl.store(MU + h * D + offs_d, mu)
    tl.store(RHO + h * D + offs_d, tl.zeros([D], dtype=tl.float64))
    tl.store(RHO32 + h * D + offs_d, tl.zeros([D], dtype=tl.float32))
    tl.store(RES + h * D + offs_d, mu)
    tl.store(P + h * D + offs_d, mu)
    tl.store(RR + bh, rr)
    tl.store(THRESH + bh, thresh)
    tl.store(ACT + bh, ((rr > thresh) & (cg_max_iters > 0)).to(tl.int32))
    tl.store(IT + bh, 0)


@triton.jit
def _product(Q, K, LENS, M_G, P, Y_S, PAP_S, H, G, T, n_splits, split, scale, pid_s, bh,
             D: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, ACC2D: tl.constexpr):
    pid_s, bh, start, end, q, Kb, _, k0 = _split_program(Q, K, K, LENS, H, G, T, split, pid_s, bh, D, D)
    offs_d = tl.arange(0, D)
    p = tl.load(P + bh.to(tl.int64) * D + offs_d)
    big = tl.load(M_G + bh)
    if ACC2D:
        y_acc = tl.zeros([BLOCK_N, D], dtype=tl.float64)
    else:
        y_acc = tl.zeros([D], dtype=tl.float64)
    pap = tl.zeros([BLOCK_N], dtype=tl.float64)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        a, z = _key_tile(Kb, start_n + tl.arange(0, BLOCK_N), end, q, k0, scale, D)
        # fp32 factors (z_j and w_j, each rounded once), fp64 products and sums: the product
        # is that of sum_j w_j (1 + d_j) z_j z_j^T with |d_j| <= u_32, a positive definite
        # perturbation of Sigma within u_32 of it in every direction (docs/decode.md)
        z64 = z.to(tl.float64)
        w = tl.exp(a - big).to(tl.float64)
        t = tl.sum(z64 * p[None, :], 1)
        wt = w * t
        if ACC2D:
            y_acc += wt[:, None] * z64
        else:
            y_acc += tl.sum(wt[:, None] * z64, 0)
        pap += wt * t
    if ACC2D:
        y = tl.sum(y_acc, 0)
    else:
        y = y_acc
    row = bh.to(tl.int64) * n_splits + pid_s
    tl.store(Y_S + row * D + offs_d, y)
    tl.store(PAP_S + row, tl.sum(pap, 0))


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _keyed_product_kernel(Q, K, LENS, M_G, P, ACT, Y_S, PAP_S, H, G, T, n_splits, split, scale,
                          D: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, GATED: tl.constexpr,
                          ACC2D: tl.constexpr):
    """Per (split, head): y_s = sum_j w_j <z_j, p> z_j and sum_j w_j <z_j, p>^2 over the
    split, w_j against the head's global max (so the splits add without rescaling). With
    GATED, a head that has converged (ACT 0) does nothing."""
    bh = tl.program_id(1)
    if _gate(ACT, bh, GATED):
        _product(Q, K, LENS, M_G, P, Y_S, PAP_S, H, G, T, n_splits, split, scale, tl.program_id(0), bh, D, BLOCK_N,
                 STAGES, ACC2D)


@triton.jit
def _summed_product(LENS, Y_S, PAP_S, H, n_splits, split, D: tl.constexpr, CHUNK: tl.constexpr):
    """A head's product summed over its used splits in fp64: (head, y, p^T y without the ridge)."""
    bh, used, base = _head_splits(LENS, H, n_splits, split)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK)
    y = tl.zeros([D], dtype=tl.float64)
    pap = tl.zeros([CHUNK], dtype=tl.float64)
    for c0 in range(0, used, CHUNK):
        live = c0 + offs_c < used
        row = base + c0 + offs_c
        y_s = tl.load(Y_S + row[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
        y += tl.sum(y_s, 0)
        pap += tl.load(PAP_S + row, mask=live, other=0.0)
    return bh, y, tl.sum(pap, 0)


@triton.jit(do_not_specialize=('H', 'n_splits', 'cg_max_iters'))
def _keyed_update_kernel(LENS, Y_S, PAP_S, RIDGE, RHO, RHO32, RES, P, RR, THRESH, ACT, IT,
                         H, n_splits, split, cg_max_iters, D: tl.constexpr, CHUNK: tl.constexpr):
    """Per head still iterating: one CG step from the summed product (fp64), rho's fp32
    copy (the output pass's) with it."""
    if tl.load(ACT + tl.program_id(0)) != 0:
        bh, y, pap = _summed_product(LENS, Y_S, PAP_S, H, n_splits, split, D, CHUNK)
        h = bh.to(tl.int64)
        offs_d = tl.arange(0, D)
        ridge = tl.load(RIDGE + bh)
        p = tl.load(P + h * D + offs_d)
        y += ridge * p
        pap += ridge * tl.sum(p * p, 0)
        rr = tl.load(RR + bh)
        # pAp <= 0 only when Sigma is singular (lambda = 0) and p hit its null space: stop
        ok = pap > 0.0
        alpha = tl.where(ok, rr / tl.where(ok, pap, 1.0), 0.0)
        rho = tl.load(RHO + h * D + offs_d) + alpha * p
        res = tl.load(RES + h * D + offs_d) - alpha * y
        rr_new = tl.sum(res * res, 0)
        beta = tl.where(rr > 0.0, rr_new / tl.where(rr > 0.0, rr, 1.0), 0.0)
        it = tl.load(IT + bh) + 1
        tl.store(RHO + h * D + offs_d, rho)
        tl.store(RHO32 + h * D + offs_d, rho.to(tl.float32))
        tl.store(RES + h * D + offs_d, res)
        tl.store(P + h * D + offs_d, res + beta * p)
        tl.store(RR + bh, rr_new)
        tl.store(IT + bh, it)
        tl.store(ACT + bh, (ok & (rr_new > tl.load(THRESH + bh)) & (it < cg_max_iters)).to(tl.int32))


def launch(prep, q, k_cache, v_cache, out=None, fixed=False):
    """The keyed solve's launches for a prepared call (lla_decode's ``_Prepared``): returns
    (o, (iters, res, om_g, den, fb)) as the Sigma path's ``_launch`` does. A head still
    iterating after KEYED_MAX_ITERS iterations (below cg_max_iters) is handed to the Sigma
    solve, its output and statistics then the Sigma solve's. ``fixed``: every iteration's
    launches and the hand-over's are made whatever the heads' state (those of converged heads
    do nothing), with no host read: a CUDA graph can capture the call. Otherwise the host
    reads whether any head still iterates after iterations 4, 8, 16, ... and stops there."""
    B, H, D = q.shape
    Hk, T = k_cache.shape[1], k_cache.shape[2]
    bn, interp, lens_d = prep.bn, prep.interp, prep.lens_d
    N, G, dev = B * H, H // Hk, q.device
    qc, kc, vc = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    scale = float(prep.scale)
    chunk = _chunk(D, interp)
    # each pass on a split of its own where the call chose the splits and its own is no
    # longer than the shared one, else on the shared split with the shared tile
    own = prep.chosen

    def layout(resident, tile, warps):
        if interp:
            tile, warps = bn, 4
        mine = pass_split(T, N, tile, prep.sms, resident if own else None, D, prep.split)
        if mine is None:
            return prep.split, bn, 4 if interp else SHARED_TILE_WARPS
        return mine, tile, warps

    split, kbn, kwarps = layout(KEY_PRODUCT_RESIDENT_PER_SM, KEY_PASS_BLOCK_N, KEY_PASS_WARPS)
    s_split, sbn, swarps = layout(KEY_STATS_RESIDENT_PER_SM, KEY_STATS_BLOCK_N, KEY_STATS_WARPS)
    for name, tile, length in (("KEY_PASS_BLOCK_N", kbn, split), ("KEY_STATS_BLOCK_N", sbn, s_split)):
        if length % tile:
            raise ValueError(f"{name} {tile} does not divide the split {length}")
    n_splits, s_splits = _cdiv(T, split), _cdiv(T, s_split)
    kpass = dict(D=D, BLOCK_N=kbn, STAGES=KEY_PASS_STAGES, num_warps=kwarps)

    m_s, om_s = _f32_arrays(2, N * s_splits, dev)
    mu_s = torch.empty(N, s_splits, D, device=dev, dtype=torch.float32)
    y_s = torch.empty(N, n_splits, D, device=dev, dtype=torch.float64)
    pap_s = torch.empty(N * n_splits, device=dev, dtype=torch.float64)
    _keyed_stats_kernel[(s_splits, N)](qc, kc, lens_d, m_s, om_s, mu_s, H, G, T, s_splits, s_split, scale, D=D,
                                       BLOCK_N=sbn, STAGES=KEY_PASS_STAGES, num_warps=swarps)
    m_g, om_g, res, serr, den = _f32_arrays(5, N, dev)
    ridge, rr, thresh = torch.empty(3, N, device=dev, dtype=torch.float64).unbind(0)
    mu, rho, resid, p = torch.empty(4, N, D, device=dev, dtype=torch.float64).unbind(0)
    act, iters = torch.empty(2, N, device=dev, dtype=torch.int32).unbind(0)
    rho32 = torch.empty(N, D, device=dev, dtype=torch.float32)
    _keyed_start_kernel[(N,)](lens_d, prep.lam, m_s, om_s, mu_s, m_g, om_g, ridge, mu, rho, rho32, resid, p, rr,
                              thresh, act, iters, H, s_splits, s_split, float(prep.tol), int(prep.max_iters), D=D,
                              CHUNK=chunk, LAM_PER_HEAD=prep.lam_per_head, num_warps=4)
    cap = min(prep.max_iters, KEYED_MAX_ITERS)
    done, check_at = 0, FIRST_CHECK
    while done < cap:
        _keyed_product_kernel[(n_splits, N)](qc, kc, lens_d, m_g, p, act, y_s, pap_s, H, G, T, n_splits, split,
                                             scale, GATED=True, ACC2D=KEY_PASS_ACC2D, **kpass)
        _keyed_update_kernel[(N,)](lens_d, y_s, pap_s, ridge, rho, rho32, resid, p, rr, thresh, act, iters,
                                   H, n_splits, split, int(prep.max_iters), D=D, CHUNK=chunk, num_warps=4)
        done += 1
        if not fixed and done == check_at:
            if not bool(act.any()):
                break
            check_at *= 2
    # the heads still iterating at the cap (act nonzero: never when the cap is cg_max_iters,
    # where the update clears it) are solved again by the Sigma solve, which overwrites their
    # M, Omega, rho, iterations, residual and error bound
    if cap < prep.max_iters and (fixed or bool(act.any())):
        _sigma_solve(prep, qc, kc, vc, (m_g, om_g, rho32, iters, res, serr), gate=act)
    # the true residual |mu - Sigma rho| / |mu| and the solve's error bound on den come with
    # the output pass (its keys' product with the fp64 rho) and the finish, but for the heads
    # handed over, which keep the Sigma solve's
    o, fb = _output_and_finish(prep, qc, kc, vc, m_g, rho32, serr, den, out, resid=(mu, ridge, rho, res, act))
    return o, (iters, res, om_g, den, fb)
