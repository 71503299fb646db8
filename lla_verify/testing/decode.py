"""Decode judged against the full forward: the layouts and budgets the decode tests and
properties share (tests/test_kernel_decode.py, properties/test_decode.py).

The one property: decoding position t of a problem gives row t of the causal forward on
the same inputs, within the budget of that row. Every position of a (B, H, S, D) problem
is decoded in one call, as a batch of B * S sequences (sequence b * S + t holds problem b's
whole cache with length t + 1), so the result lines up with the forward's (B, H, S, Dv)
output and is judged by the forward's own rule:

* LLA: ``budget.forward.check_forward``, the forward kernels' budget (the derived model,
  its CG-tolerance term, and the same-precision dense rule);
* Parallax: ``check_parallax`` below, the same shape of rule on the Parallax oracle.

Cache positions past a sequence's length are poisoned (NaN): a kernel that reads them
returns NaN, which no budget passes.
"""

from __future__ import annotations

import math

import torch

from lla_contract import check_scale
from lla_verify.budget.forward import FA_FACTOR, MODEL_SAFETY
from lla_verify.oracles.parallax import parallax_dense, parallax_forward
from lla_verify.registry.precision import unit_roundoff

U64 = 2.0**-53


def poison_past(cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A copy of ``cache`` (B, H, T, X) with NaN at positions >= lengths[b]."""
    T = cache.shape[2]
    past = torch.arange(T, device=cache.device)[None, :] >= lengths.to(cache.device)[:, None]
    return cache.masked_fill(past[:, None, :, None], float("nan"))


def every_position(q, k, v, *extra, kv_group: int = 1):
    """Inputs that decode every position of a (B, H, S, D) problem in one call.

    Returns (q_dec (B*S, H, D), k_cache (B*S, H_kv, S, D), v_cache, lengths (B*S,), extras
    each (B*S, H, ...)); k, v may have H_kv = H / kv_group heads. Row b*S + t is position t of
    sequence b.
    """
    B, H, S, _ = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(B * S, H, *t.shape[3:])  # noqa: E731
    lengths = torch.arange(1, S + 1, device=q.device).repeat(B)
    kc = poison_past(k.repeat_interleave(S, dim=0), lengths)
    vc = poison_past(v.repeat_interleave(S, dim=0), lengths)
    return flat(q), kc, vc, lengths, tuple(flat(t) for t in extra)


def unflatten(o: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(B*S, H, ...) decode outputs back to the forward's (B, H, S, ...)."""
    return o.reshape(B, S, *o.shape[1:]).transpose(1, 2)


def decode_lla_every_position(problem, fn, **kw):
    """``fn`` (lla_decode's signature) at every position of ``problem``: o (B, H, S, Dv) and,
    when ``fn`` returns them, its statistics as (B, H, S) tensors."""
    B, H, S, _ = problem.q.shape
    lam = problem.lam_tensor.to(problem.q.device)
    qd, kc, vc, lens, (lam_d,) = every_position(problem.q, problem.k, problem.v, lam[..., None])
    out = fn(qd, kc, vc, lens, ridge_lambda=lam_d[..., 0].to(torch.float32), qk_scale=problem.qk_scale,
             return_stats=True, **kw)
    o, st = out if isinstance(out, tuple) else (out, {})
    return unflatten(o, B, S), {key: unflatten(val, B, S) for key, val in st.items()}


def decode_parallax_every_position(problem, r, fn, **kw):
    """``fn`` (parallax_decode's signature) at every position: o (B, H, S, Dv)."""
    B, H, S, _ = problem.q.shape
    qd, kc, vc, lens, (rd,) = every_position(problem.q, problem.k, problem.v, r)
    return unflatten(fn(qd, rd, kc, vc, lens, qk_scale=problem.qk_scale, **kw), B, S)


def parallax_allowed(q, k, v, r, *, qk_scale, out_dtype, compute_dtype=torch.float32):
    """(oracle o, allowed (..., S), dense error) for Parallax on these (rounded) inputs.

    The forward's rule (budget.forward) with Parallax's terms:
        model_i   = MODEL_SAFETY (u_c sqrt(n_i) mag_i + u_out ||o_i||),  n_i = (i + 1) D
        mag_i     = ||nu_i|| + max_j ||v_j - nu_i|| (1 + |<k_j - kbar_i, r_i>|)
        allowed_i = max(model_i, FA_FACTOR dense_err_i)
    mag_i bounds the terms whose rounding reaches o_i (the centred form's); dense_err_i is
    the error of the same centred computation in the compute precision.
    """
    o = parallax_forward(q, k, v, r, qk_scale=qk_scale)
    dense = parallax_dense(q, k, v, r, qk_scale=qk_scale, compute_dtype=compute_dtype)
    dense_err = (dense.to(torch.float64) - o).norm(dim=-1)
    # the oracle's own quantities, from its weights (a plain float64 recomputation)
    qf, kf, vf, rf = (t.to(torch.float64) for t in (q, k, v, r))
    S, D = q.shape[-2], q.shape[-1]
    s = check_scale(qk_scale, D)
    a = s * (qf @ kf.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(a.masked_fill(~mask, float("-inf")), -1)
    nu = p @ vf
    kbar = p @ kf
    dk = ((kf[..., None, :, :] - kbar[..., :, None, :]) * rf[..., :, None, :]).sum(-1)  # (.., i, j)
    dv = (vf[..., None, :, :] - nu[..., :, None, :]).norm(dim=-1)
    mag = nu.norm(dim=-1) + torch.where(mask, dv * (1 + dk.abs()), torch.zeros_like(dv)).amax(-1)
    n = torch.arange(1, S + 1, dtype=torch.float64, device=q.device) * D
    u_c = unit_roundoff(compute_dtype)
    u_out = unit_roundoff(out_dtype) if out_dtype != torch.float64 else U64
    model = MODEL_SAFETY * (u_c * n.sqrt() * mag + u_out * o.norm(dim=-1))
    return o, torch.maximum(model, FA_FACTOR * dense_err), dense_err


def check_parallax(q, k, v, r, o_kernel, *, qk_scale, label=""):
    """(ratio, message): max_i error_i / allowed_i of a Parallax output (..., S, Dv)."""
    ref, allowed, dense_err = parallax_allowed(q, k, v, r, qk_scale=qk_scale, out_dtype=o_kernel.dtype)
    err = (o_kernel.to(torch.float64) - ref).norm(dim=-1)
    ratio_q = torch.where(torch.isfinite(err), err / allowed, torch.full_like(err, math.inf))
    flat = int(torch.argmax(ratio_q))
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), ratio_q.shape))
    ratio = float(ratio_q[idx])
    msg = (f"parallax decode {label}: ratio {ratio:.3g} at {idx}: error {float(err[idx]):.3e} vs allowed "
           f"{float(allowed[idx]):.3e} (dense error {float(dense_err[idx]):.3e}, |o| {float(ref[idx].norm()):.3g})")
    return ratio, msg
