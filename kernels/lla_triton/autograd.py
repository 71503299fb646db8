"""Autograd wiring for lla_triton: the forward kernel's output, the backward kernels' gradients.

``LLAFunction.apply(q, k, v, lam, scale, delta_eps, cg_tol, cg_max_iters,
preconditioner[, precision[, input_check]])`` on flattened heads (input_check as in
forward.lla_forward_kernel): q, k, v (N, S, D) contiguous, lam (N, S) fp32. lam may
carry a graph (a broadcast, reshaped, cast user tensor): the per-query d lambda returned
here flows back through it, and autograd sums it over the broadcast dimensions. A
Python-float lambda arrives as a tensor without grad and gets none.

Saved for backward: q, k, v, rho and lam only, Theta(S D). The backward
recomputes m, omega, den and o from rho itself (docs/kernels-backward.md says why).
"""

from __future__ import annotations

import torch

from lla_contract import LLAInputError

from .backward import lla_backward_kernel
from .forward import DEFAULT_PRECISION, lla_forward_kernel


class LLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lam, scale, delta_eps, cg_tol, cg_max_iters, preconditioner, precision=None,
                input_check=None):
        precision = precision or DEFAULT_PRECISION
        fo = lla_forward_kernel(q, k, v, lam.detach(), scale, delta_eps=delta_eps, cg_tol=cg_tol,
                                cg_max_iters=cg_max_iters, preconditioner=preconditioner, want_stats=False,
                                precision=precision, input_check=input_check)
        ctx.save_for_backward(q, k, v, fo.rho, lam.detach(), fo.fallback)
        ctx.opts = (scale, delta_eps, cg_tol, cg_max_iters, preconditioner, precision)
        return fo.o

    @staticmethod
    def backward(ctx, grad_output):
        # The adjoint CG has no derivative of its own. torch's once_differentiable
        # raises only when grad_output itself requires grad; with create_graph=True and
        # a plain cotangent it would hand back gradients that silently have no graph.
        # So under create_graph every gradient is tied to a node that raises when
        # differentiated: double backward fails loudly, first-order use is unaffected.
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _backward(ctx, grad_output)
        if not create_graph:
            return grads
        live = [i for i, t in enumerate(grads) if t is not None]
        err = torch._C._functions.DelayedError(
            b"lla_triton: double backward (differentiating a gradient of lla_attention) is not supported",
            len(live))
        wrapped = err(*[grads[i].detach().requires_grad_() for i in live])
        if not isinstance(wrapped, tuple):
            wrapped = (wrapped,)
        out = list(grads)
        for i, t in zip(live, wrapped):
            out[i] = t
        return tuple(out)


def _backward(ctx, grad_output):
    q, k, v, rho, lam, fallback = ctx.saved_tensors
    scale, _delta_eps, cg_tol, cg_max_iters, preconditioner, precision = ctx.opts
    if grad_output.shape != q.shape:
        raise LLAInputError(
            f"grad_output: expected shape {tuple(q.shape)} (the output's), got {tuple(grad_output.shape)}")
    if grad_output.dtype != q.dtype:
        raise LLAInputError(f"grad_output: expected dtype {q.dtype} (the output's), got {grad_output.dtype}")
    # sum().backward() hands in a stride-0 expanded tensor; the kernels index densely
    g = grad_output.contiguous()
    bo = lla_backward_kernel(q, k, v, rho, lam, g, scale, fallback=fallback, cg_tol=cg_tol,
                             cg_max_iters=cg_max_iters, preconditioner=preconditioner, precision=precision)
    need = ctx.needs_input_grad
    return (bo.dq if need[0] else None, bo.dk if need[1] else None, bo.dv if need[2] else None,
            bo.dlam if need[3] else None, None, None, None, None, None, None, None)
