"""Decode judged against the full forward: the layouts and budgets the decode tests and
properties share (tests/test_kernel_decode.py, properties/test_decode.py).

The one property: decoding position t of a problem gives row t of the causal forward on
the same inputs, within the budget of that row. Every position of a (B, H, S, D) problem
is decoded in one call, as a batch of B * S sequences (sequence b * S + t holds problem b's
whole cache with length t + 1), so the result lines up with the forward's (B, H, S, Dv)
output and is judged by the forward's own rule, row t of the forward's budget:

* LLA: ``budget.forward.check_forward``, the forward kernels' budget (the derived model,
  its CG-tolerance term, and the same-precision dense rule);
* Parallax: ``budget.parallax.check_parallax_decode``, which is ``check_parallax_forward``'s
  budget (``parallax_budget``) applied to the decoded rows, for every position or for
  each sequence's last one.

Cache positions past a sequence's length are poisoned (NaN): a kernel that reads them
returns NaN, which no budget passes.
"""

from __future__ import annotations

import torch


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
