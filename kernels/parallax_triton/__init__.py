"""Parallax in Triton: softmax attention minus the projected key-value covariance
(SPEC 9), one pass over FlashAttention's key tiles, with a hand-derived backward.

Public API: ``parallax_attention``. docs/kernels-parallax.md explains the centring and
derives the gradient. Depends on torch, triton and lla_contract only.
"""

from __future__ import annotations

import torch

from lla_contract import LLAInputError, check_probe, check_qkv, check_scale, nonfinite_flag, raise_nonfinite

from .kernels import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, ForwardOut, interpreting, parallax_backward_kernel,
                      parallax_forward_kernel)

__all__ = ["parallax_attention", "parallax_forward_kernel", "parallax_backward_kernel", "ForwardOut",
           "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "LLAInputError"]


def parallax_attention(q, k, v, r, *, qk_scale=None, check_finite=True, bf16_weights=None):
    """Causal Parallax o_i = nu_i - C_i r_i (SPEC 9).

    q, k, r: (B, H, S, D) or (B, S, D); v: the same leading shape with its own Dv. One
    dtype for all four: fp32, bf16, fp16 or float64 (float64 computes in float64). D and
    Dv in {16, 32, 64, 128}. qk_scale defaults to 1/sqrt(D). Returns o of v's shape in
    the inputs' dtype, differentiable in q, k, v and r.

    bf16_weights: for bf16 inputs in a forward outside autograd, merge the fast tiles with
    bf16 weights (docs/kernels-parallax.md §3, "bf16 weights"); None takes
    kernels.FAST_BF16_WEIGHTS. True under autograd (an input requiring grad, grad enabled)
    is an error: the backward needs the row statistics at fp32 accuracy.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("r", r)):
        if not isinstance(t, torch.Tensor):
            raise LLAInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise LLAInputError(f"{name}: expected shape (B, H, S, D) or (B, S, D), got {tuple(t.shape)}")
    check_qkv(q, k, v, dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS, check_finite=False)
    check_probe(r, q, dtypes=SUPPORTED_DTYPES, check_finite=False)
    if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise LLAInputError(f"v: value dimension Dv={v.shape[-1]} unsupported; expected one of {SUPPORTED_HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype == r.dtype):
        raise LLAInputError(f"q, k, v, r: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {r.dtype}")
    if q.device.type == "cpu" and not interpreting():
        raise LLAInputError("q: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1) or a CUDA device")
    scale = check_scale(qk_scale, q.shape[-1])
    if check_finite and bool(nonfinite_flag((q, k, v, r))):
        raise_nonfinite((("q", q), ("k", k), ("v", v), ("r", r)))

    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    N = q.numel() // (S * D)
    q3, k3, r3 = (t.reshape(N, S, D).contiguous() for t in (q, k, r))
    v3 = v.reshape(N, S, Dv).contiguous()
    if bf16_weights not in (None, True, False):
        raise LLAInputError(f"bf16_weights: expected None, True or False, got {bf16_weights!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, r)):
        if bf16_weights:
            raise LLAInputError("bf16_weights: True needs a forward outside autograd (no input requiring grad, or "
                                "torch.no_grad()): the backward needs the row statistics at fp32 accuracy")
        from .autograd import ParallaxFunction
        o3 = ParallaxFunction.apply(q3, k3, v3, r3, scale)
    else:
        # no backward reads this forward's row statistics: bf16 weights are allowed
        from . import kernels

        w16 = kernels.FAST_BF16_WEIGHTS if bf16_weights is None else bf16_weights
        o3 = parallax_forward_kernel(q3, k3, v3, r3, scale, bf16_weights=w16).o
    return o3.reshape(v.shape)


def __getattr__(name):
    # issue 23's interface is parallax_triton.parallax_decode; the kernel is a package of its
    # own (kernels/parallax_decode, docs/decode.md), imported on first use so that this
    # package still loads without it
    if name == "parallax_decode":
        from parallax_decode import parallax_decode

        return parallax_decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
