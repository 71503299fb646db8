"""Planted bugs: implementations that are wrong on purpose, to measure the suite.

Each is the dense fp32 reference itself (lla_verify/oracles/dense.py, ``torch-fp32``),
assembled from the reference's own pieces with one step changed, and follows the
``--lla-impl MODULE:CALLABLE`` protocol, e.g.

    pytest properties --lla-impl lla_verify.testing.mutants:lambda_not_scaled_by_omega

A suite that passes one of these has a hole; docs/kill-list.md records which
property catches which mutant, with the command that re-measures it. ``control`` is the
same assembly without a bug (bitwise the reference): whatever fails it is not a kill.
"""

from __future__ import annotations

import torch

from lla_contract import check_qkv, check_scale
from lla_verify.oracles.dense import (causal_mask, guarded_combine, guarded_solve, masked_scores, moments, prepare,
                                      weights)

TILE = 16  # the tile a blockwise kernel would use, for the dropped-tile mutant


def _dense(q, k, v, *, ridge_lambda, qk_scale=None, bug: str = "", cg_iters: int | None = None):
    # dense_torch_lla's steps in its order, so that bug="" is the reference bit for bit
    # and each bug below is the only difference from it
    qc, kc, vc, lam, scale = prepare(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale,
                                     compute_dtype=torch.float32)
    if bug == "per_query_lambda_ignored":
        lam = lam[..., :1].expand_as(lam)  # one lambda per head: the first query's
    S = q.shape[-2]
    if bug == "head_dim_block_8":
        # a head-dim loop that covers one block of 8 channels: q and k beyond it unseen
        qc, kc = qc.clone(), kc.clone()
        qc[..., 8:], kc[..., 8:] = 0.0, 0.0
    mask = causal_mask(S, q.device)
    if bug == "off_by_one_mask":
        mask = torch.ones_like(mask).tril(1)  # key i+1 admitted at query i
    if bug == "dropped_partial_tile" and S % TILE:
        # the last, partial key tile is skipped by its own queries (their diagonal kept,
        # so the bug shows as wrong values rather than an easy 0/0)
        last = (S // TILE) * TILE
        mask[last:, last:] = torch.eye(S - last, dtype=torch.bool, device=q.device)
    a = masked_scores(qc, kc, scale, mask)
    w = torch.exp(a) if bug == "no_max_subtraction" else weights(a)
    omega = w.sum(-1)
    ridge = lam if bug == "lambda_not_scaled_by_omega" else lam * omega
    z, mu, sig = moments(w, qc, kc, ridge)
    if cg_iters is not None:
        # CG in place of the Cholesky solve: there is no factorisation to fail, so every
        # row counts as solved and the reference's delta guard (guarded_combine) judges
        # the CG rho_i, as the kernel's guard judges its own CG iterate
        rho = _cg(sig, mu, cg_iters)
        solved_ok = torch.ones(rho.shape[:-1], dtype=torch.bool, device=rho.device)
    else:
        rho, solved_ok = guarded_solve(sig, mu)
    if bug == "rho_rounded_to_bf16":
        rho = rho.to(torch.bfloat16).to(rho.dtype)
    o = guarded_combine(w, omega, z, vc, rho, solved_ok)
    if bug == "bias_0.1pct":
        o = o * 1.001
    return o.to(q.dtype)


def _cg(A, b, iters):
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(iters):
        Ap = (A @ p[..., None])[..., 0]
        alpha = rr / (p * Ap).sum(-1, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
    return x


class _ScaleLastKeyGrad(torch.autograd.Function):
    """Identity on k; its backward scales the last key's gradient."""

    @staticmethod
    def forward(ctx, k):
        return k.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[..., -1, :] *= 1.05
        return g


def dk_last_key_scaled(q, k, v, *, ridge_lambda, qk_scale=None):
    """dk of the sequence's last key 5% too large (the forward is right): a key fed by the
    last query alone, so its conditioning is that query's, whatever earlier ones are."""
    return _dense(q, _ScaleLastKeyGrad.apply(k), v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def _make(bug: str, doc: str, **kw):
    def fn(q, k, v, *, ridge_lambda, qk_scale=None):
        return _dense(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale, bug=bug, **kw)

    fn.__name__ = bug
    fn.__doc__ = doc
    return fn


off_by_one_mask = _make("off_by_one_mask", "the causal mask admits key i+1 at query i")
lambda_not_scaled_by_omega = _make("lambda_not_scaled_by_omega", "ridge lambda instead of lambda * omega")
dropped_partial_tile = _make("dropped_partial_tile", "queries of the last partial tile ignore that tile's earlier keys")
bias_01pct = _make("bias_0.1pct", "output scaled by 1.001")
per_query_lambda_ignored = _make("per_query_lambda_ignored", "the first query's lambda used for every query")
no_max_subtraction = _make("no_max_subtraction", "w = exp(a) without subtracting the row max")
rho_rounded_to_bf16 = _make("rho_rounded_to_bf16", "rho rounded to bf16 before the output pass")
head_dim_block_8 = _make("head_dim_block_8", "q and k channels beyond the first 8 ignored (correct at D <= 8)")
# not in MUTANTS: it must pass every property, and the suite's ledger reports MUTANTS as "must fail"
control = _make("", "the dense fp32 reference assembled as the mutants are, without a planted bug (the control)")
control.__name__ = "control"


def cg_two_short(q, k, v, *, ridge_lambda, qk_scale=None):
    """CG with D - 2 iterations: two short of the exact-arithmetic D steps."""
    return _dense(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale, cg_iters=max(1, q.shape[-1] - 2))


MUTANTS = {
    "off_by_one_mask": off_by_one_mask,
    "lambda_not_scaled_by_omega": lambda_not_scaled_by_omega,
    "dropped_partial_tile": dropped_partial_tile,
    "bias_0.1pct": bias_01pct,
    "per_query_lambda_ignored": per_query_lambda_ignored,
    "no_max_subtraction": no_max_subtraction,
    "rho_rounded_to_bf16": rho_rounded_to_bf16,
    "cg_two_short": cg_two_short,
    "head_dim_block_8": head_dim_block_8,
    "dk_last_key_scaled": dk_last_key_scaled,
}


# ---------------------------------------------------------------- Parallax
# Planted bugs of a Parallax kernel, each a variation of the dense fp32 centred
# computation, following ``--lla-parallax-impl MODULE:CALLABLE``:
#
#     pytest properties/test_parallax.py --lla-parallax-impl lla_verify.testing.mutants:px_dropped_nu


def _parallax_dense(q, k, v, r, *, qk_scale=None, bug: str = ""):
    from lla_contract import check_probe

    check_qkv(q, k, v)
    check_probe(r, q)
    scale = check_scale(qk_scale, q.shape[-1])
    cd = torch.float32
    qc, kc, vc, rc = (t.to(cd) for t in (q, k, v, r))
    S = q.shape[-2]
    a = scale * (qc @ kc.transpose(-1, -2))
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    w = torch.exp(a.masked_fill(~causal, float("-inf")) - a.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True))
    omega = w.sum(-1, keepdim=True)
    p = w / omega
    nu = p @ vc
    if bug == "unmasked_correction":
        # the correction's weights over every key, the future included
        pc = torch.softmax(a, -1)
        nuc = pc @ vc
    else:
        pc, nuc = p, nu
    if bug == "uncentred":
        # the streaming expansion sum_j p_ij v_j <k_j, r_i> - nu_i <kbar_i, r_i>, which
        # cancels when the keys share an offset
        kbar = pc @ kc
        kr = (kc[..., None, :, :] * rc[..., :, None, :]).sum(-1)
        corr = (pc * kr) @ vc - nuc * (kbar * rc).sum(-1, keepdim=True)
    else:
        wts = w if bug == "unnormalised_probe" else pc  # w: exp(a - m) without dividing by omega_i
        corr = _correction(wts, _projections(pc, kc, rc), vc, nuc)
    o = -corr if bug == "dropped_nu" else nu - corr
    return o.to(q.dtype)


def _projections(pc, kc, rc):
    """<k_j - kbar_i, r_i> (..., S_q, S_k) for the weights pc (..., S_q, S_k)."""
    kbar = pc @ kc
    return ((kc[..., None, :, :] - kbar[..., :, None, :]) * rc[..., :, None, :]).sum(-1)


def _correction(wts, proj, vc, nuc):
    """C_i r_i = sum_j wts_ij <k_j - kbar_i, r_i> (v_j - nu_i), the value side centred."""
    return (wts * proj) @ vc - nuc * (wts * proj).sum(-1, keepdim=True)


def _make_px(bug: str, doc: str):
    def fn(q, k, v, r, *, qk_scale=None):
        return _parallax_dense(q, k, v, r, qk_scale=qk_scale, bug=bug)

    fn.__name__ = "px_" + bug
    fn.__doc__ = doc
    return fn


px_uncentred = _make_px("uncentred", "the uncentred expansion sum_j p_ij v_j <k_j, r_i> - nu_i <kbar_i, r_i> in fp32")
px_unnormalised_probe = _make_px("unnormalised_probe", "the correction weighted by w_ij = exp(a_ij - m_i), not p_ij")
px_dropped_nu = _make_px("dropped_nu", "o_i = -C_i r_i: the softmax term nu_i dropped")
px_unmasked_correction = _make_px("unmasked_correction", "the correction's weights over all keys, no causal mask")
px_control = _make_px("", "the dense fp32 centred computation without a planted bug (the control)")

PARALLAX_MUTANTS = {
    "px_uncentred": px_uncentred,
    "px_unnormalised_probe": px_unnormalised_probe,
    "px_dropped_nu": px_dropped_nu,
    "px_unmasked_correction": px_unmasked_correction,
}


# ---------------------------------------------------------------- decode
# Planted bugs of a decode kernel, each a variation of the float64 decode references
# (oracles/decode.py), following the decode protocols of registry/operators.py:
#
#     lla-verify check --op lla-decode --case SPEC --impl lla_verify.testing.mutants:dec_stale_length


def _shorter(lengths):
    return torch.clamp(lengths - 1, min=1)


def _stale(lengths):
    """The last sequence of the batch keeps the length it had before its last append."""
    lengths = lengths.clone()
    lengths[-1:] = _shorter(lengths[-1:])
    return lengths


def dec_off_by_one_length(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    """LLA decode over positions 0..lengths-2: the query's own key and value dropped."""
    from lla_verify.oracles.decode import lla_decode_reference

    return lla_decode_reference(q, k_cache, v_cache, _shorter(lengths), ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def dec_stale_length(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    """LLA decode with a stale length for the batch's last sequence."""
    from lla_verify.oracles.decode import lla_decode_reference

    return lla_decode_reference(q, k_cache, v_cache, _stale(lengths), ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def pxdec_off_by_one_length(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    """Parallax decode over positions 0..lengths-2."""
    from lla_verify.oracles.decode import parallax_decode_reference

    return parallax_decode_reference(q, r, k_cache, v_cache, _shorter(lengths), qk_scale=qk_scale)


def pxdec_stale_length(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    """Parallax decode with a stale length for the batch's last sequence."""
    from lla_verify.oracles.decode import parallax_decode_reference

    return parallax_decode_reference(q, r, k_cache, v_cache, _stale(lengths), qk_scale=qk_scale)


def pxdec_dropped_nu(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    """Parallax decode returning -C r: the softmax term nu dropped."""
    from lla_verify.oracles.decode import parallax_decode_reference

    o = parallax_decode_reference(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale)
    return o - parallax_decode_reference(q, torch.zeros_like(r), k_cache, v_cache, lengths, qk_scale=qk_scale)


# ---- a flash-decoding split combine: the cache cut into splits of SPLIT positions, each
# summed against its own maximum m_s, and the splits' sums added after rescaling each by
# exp(m_s - M), M the largest. The sums are linear in the weights, so a combine is exactly
# the one-pass computation with the weights it leaves each key: the rescale forgotten,
# key j of split s weighs exp(a_j - m_s) instead of exp(a_j - M). The decode rows below
# are float64 and the dense pieces' own (oracles/dense.py for LLA, the centred Parallax
# above), so the controls (the rescale kept) differ from the decode oracles by float64
# rounding alone.

SPLIT = 16  # the split a flash-decoding kernel would use (the interpreted kernels' tile)


def _split_weights(a, rescaled: bool):
    """The weights (..., L) a split combine gives the scores a (..., L)."""
    L = a.shape[-1]
    split_of = torch.arange(L, device=a.device) // SPLIT
    m_s = torch.full((*a.shape[:-1], int(split_of[-1]) + 1), float("-inf"), dtype=a.dtype, device=a.device)
    m_s = m_s.scatter_reduce(-1, split_of.expand_as(a), a, "amax")
    m_j = m_s[..., split_of]
    w = torch.exp(a - m_j)
    if rescaled:
        w = w * torch.exp(m_j - a.amax(-1, keepdim=True))
    return w


def _split_rows(q, k_cache, v_cache, lengths, extra=()):
    """Per sequence: the query row (1, H, 1, D) (and extras), keys and values of its prefix, in float64."""
    from lla_verify.oracles.decode import _prefixes

    for b, L, rows, kb, vb in _prefixes(q, k_cache, v_cache, lengths, extra):
        yield b, [t[:, :, -1:].double() for t in rows], kb.double(), vb.double()


def _lla_split_decode(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale, rescaled: bool):
    from lla_contract import check_lambda

    scale = check_scale(qk_scale, q.shape[-1])
    lam_bh = check_lambda(ridge_lambda, tuple(q.shape[:2]), q.device, dtype=torch.float64)
    out = []
    for b, (qb,), kb, vb in _split_rows(q, k_cache, v_cache, lengths):
        w = _split_weights(scale * (qb @ kb.transpose(-1, -2)), rescaled)  # (1, H, 1, L)
        omega = w.sum(-1)
        z, mu, sig = moments(w, qb, kb, lam_bh[b][None, :, None] * omega)
        rho, solved = guarded_solve(sig, mu)
        out.append(guarded_combine(w, omega, z, vb, rho, solved)[:, :, 0])
    return torch.cat(out, 0)


def _parallax_split_decode(q, r, k_cache, v_cache, lengths, *, qk_scale, rescaled: bool):
    from lla_contract import check_probe

    check_probe(r, q)
    scale = check_scale(qk_scale, q.shape[-1])
    out = []
    for b, (qb, rb), kb, vb in _split_rows(q, k_cache, v_cache, lengths, (r,)):
        w = _split_weights(scale * (qb @ kb.transpose(-1, -2)), rescaled)
        pc = w / w.sum(-1, keepdim=True)
        nu = pc @ vb
        out.append((nu - _correction(pc, _projections(pc, kb, rb), vb, nu))[:, :, 0])
    return torch.cat(out, 0)


def dec_unscaled_split_combine(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    """LLA decode whose split combine adds the splits' sums without rescaling each by exp(m_s - M)."""
    return _lla_split_decode(q, k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, qk_scale=qk_scale,
                             rescaled=False)


def dec_split_control(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    """The same split computation with the rescale (the control: no bug)."""
    return _lla_split_decode(q, k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, qk_scale=qk_scale,
                             rescaled=True)


def pxdec_unscaled_split_combine(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    """Parallax decode whose split combine adds the splits' sums without rescaling each by exp(m_s - M)."""
    return _parallax_split_decode(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale, rescaled=False)


def pxdec_split_control(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    """The same split computation with the rescale (the control: no bug)."""
    return _parallax_split_decode(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale, rescaled=True)


DECODE_MUTANTS = {"dec_off_by_one_length": dec_off_by_one_length, "dec_stale_length": dec_stale_length,
                  "dec_unscaled_split_combine": dec_unscaled_split_combine}
PARALLAX_DECODE_MUTANTS = {"pxdec_off_by_one_length": pxdec_off_by_one_length,
                           "pxdec_stale_length": pxdec_stale_length, "pxdec_dropped_nu": pxdec_dropped_nu,
                           "pxdec_unscaled_split_combine": pxdec_unscaled_split_combine}
