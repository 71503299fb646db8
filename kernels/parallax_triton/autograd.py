"""Autograd wiring for parallax_triton.

``ParallaxFunction.apply(q, k, v, r, scale)`` on flattened heads: q, k, r (N, S, D), v
(N, S, Dv), contiguous, one dtype. Saved for backward: the inputs and the forward's row
quantities (kernels.ForwardOut: the row's heaviest key and its score parts, log W_i,
nu_i - v_0, C_i r_i, the reference t_i and dbar_i, the bounds of the fast-tile test),
Theta(S (D + Dv)). The backward
recomputes p_ij from them (docs/kernels-parallax.md).
"""

from __future__ import annotations

import torch

from lla_contract import LLAInputError

from .kernels import ForwardOut, parallax_backward_kernel, parallax_forward_kernel


class ParallaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, r, scale):
        fo = parallax_forward_kernel(q, k, v, r, scale)
        ctx.save_for_backward(q, k, v, r, fo.m, fo.lw, fo.nup, fo.dbar, fo.cr, fo.tref, fo.trem, fo.ref, fo.sa, fo.sr,
                              fo.norms)
        ctx.split = fo.split
        ctx.thresholds = (fo.ta, fo.td)
        ctx.scale = scale
        return fo.o

    @staticmethod
    def backward(ctx, grad_output):
        # No derivative of the backward kernels exists. Under create_graph every gradient
        # is tied to a node that raises when differentiated, so double backward fails
        # loudly instead of returning gradients that silently carry no graph.
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _backward(ctx, grad_output)
        if not create_graph:
            return grads
        live = [i for i, t in enumerate(grads) if t is not None]
        err = torch._C._functions.DelayedError(
            b"parallax_triton: double backward (differentiating a gradient of parallax_attention) is not supported",
            len(live))
        wrapped = err(*[grads[i].detach().requires_grad_() for i in live])
        if not isinstance(wrapped, tuple):
            wrapped = (wrapped,)
        out = list(grads)
        for i, t in zip(live, wrapped):
            out[i] = t
        return tuple(out)


def _backward(ctx, grad_output):
    q, k, v, r, m, lw, nup, dbar, cr, tref, trem, ref, sa, sr, norms = ctx.saved_tensors
    if grad_output.shape != v.shape:
        raise LLAInputError(
            f"grad_output: expected shape {tuple(v.shape)} (the output's), got {tuple(grad_output.shape)}")
    if grad_output.dtype != q.dtype:
        raise LLAInputError(f"grad_output: expected dtype {q.dtype} (the output's), got {grad_output.dtype}")
    # sum().backward() hands in a stride-0 expanded tensor; the kernels index densely
    g = grad_output.contiguous()
    fo = ForwardOut(None, m, lw, nup, dbar, cr, tref, trem, ref, sa, sr, ctx.split, norms, *ctx.thresholds)
    bo = parallax_backward_kernel(q, k, v, r, g, fo, ctx.scale)
    need = ctx.needs_input_grad
    return (bo.dq if need[0] else None, bo.dk if need[1] else None, bo.dv if need[2] else None,
            bo.dr if need[3] else None, None)
