"""Decode entry points of the float64 oracles: one query against a cache, computed as the
last row of the full forward on that sequence's prefix (no second copy of the mathematics).

For sequence b the prefix is cache positions 0..lengths[b]-1; the query (and Parallax's
probe) is placed at the last of them. Every earlier row's query only feeds rows that are
thrown away (row t of the causal forward depends on q_t and keys/values 0..t only), so
those rows hold copies of the query. Grouped-query caches (H_kv dividing H) are expanded
to one key-value head per query head.
"""

from __future__ import annotations

import torch

from lla_contract import check_cache, check_lambda

from .float64 import DEFAULT_CHUNK_BYTES, lla_forward
from .parallax import parallax_forward


def _prefixes(q, k_cache, v_cache, lengths, extra=()):
    """Per sequence b: (b, queries (1, H, L, D), keys, values, extras) over its prefix L = lengths[b]."""
    lens = check_cache(q, k_cache, v_cache, lengths)
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    for b in range(B):
        L = int(lens[b])
        kb = k_cache[b:b + 1, :, :L].repeat_interleave(G, dim=1)
        vb = v_cache[b:b + 1, :, :L].repeat_interleave(G, dim=1)
        rows = [t[b:b + 1, :, None, :].expand(1, H, L, t.shape[-1]) for t in (q,) + tuple(extra)]
        yield b, L, rows, kb, vb


def lla_decode_reference(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None,
                         chunk_bytes=DEFAULT_CHUNK_BYTES):
    """LLA decode in float64: row lengths[b]-1 of ``lla_forward`` on sequence b's prefix.

    q (B, H, D), caches (B, H_kv, T_max, D|Dv), lengths (B,); ridge_lambda a float or a tensor
    broadcastable to (B, H). Returns float64 (B, H, Dv). ``chunk_bytes``: the forward's
    memory per chunk of queries (a long prefix on a GPU runs far fewer chunks with more).
    """
    lam_bh = check_lambda(ridge_lambda, tuple(q.shape[:2]), q.device)
    out = []
    for b, L, (qb,), kb, vb in _prefixes(q, k_cache, v_cache, lengths):
        lam = lam_bh[b][None, :, None].expand(1, q.shape[1], L)
        out.append(lla_forward(qb, kb, vb, ridge_lambda=lam, qk_scale=qk_scale, chunk_bytes=chunk_bytes)[:, :, L - 1])
    return torch.cat(out, 0)


def parallax_decode_reference(q, r, k_cache, v_cache, lengths, *, qk_scale=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Parallax decode in float64: row lengths[b]-1 of ``parallax_forward`` on sequence b's
    prefix, with the probe r (B, H, D) at that row. Returns float64 (B, H, Dv); ``chunk_bytes``
    as for ``lla_decode_reference``."""
    out = []
    for b, L, (qb, rb), kb, vb in _prefixes(q, k_cache, v_cache, lengths, (r,)):
        out.append(parallax_forward(qb, kb, vb, rb, qk_scale=qk_scale, chunk_bytes=chunk_bytes)[:, :, L - 1])
    return torch.cat(out, 0)
