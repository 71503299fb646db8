"""FlashLLA in Triton: blockwise Local Linear Attention with a conjugate-gradient solve.

Public API: ``lla_attention`` and the defaults below. docs/kernels.md explains them.
"""

from __future__ import annotations

import math

import torch

from lla_contract import (LLAInputError, check_delta_eps, check_lambda, check_nonnegative, check_qkv, check_scale,
                          nonfinite_flag)

from ._common import PRECISIONS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreting
from .forward import (
    CG_ITERS_PER_DIM,
    default_cg_max_iters,
    DEFAULT_CG_TOL,
    DEFAULT_DELTA_EPS,
    DEFAULT_PRECISION,
    ForwardOut,
    lla_forward_kernel,
)

__all__ = [
    "lla_attention", "DEFAULT_CG_TOL", "CG_ITERS_PER_DIM", "default_cg_max_iters", "DEFAULT_DELTA_EPS", "DEFAULT_PRECISION",
    "PRECISIONS", "ForwardOut", "lla_forward_kernel", "LLAInputError",
]


def _check_options(cg_tol, cg_max_iters, preconditioner, precision):
    tol = check_nonnegative(cg_tol, "cg_tol")
    if cg_max_iters is not None and (isinstance(cg_max_iters, bool) or not isinstance(cg_max_iters, int)
                                     or cg_max_iters < 0):
        raise LLAInputError(f"cg_max_iters: expected None (16 D) or an int >= 0, got {cg_max_iters!r}")
    if preconditioner not in (None, "none", "jacobi"):
        raise LLAInputError(f"preconditioner: expected None, 'none' or 'jacobi', got {preconditioner!r}")
    if precision not in PRECISIONS:
        raise LLAInputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return tol


def lla_attention(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=DEFAULT_DELTA_EPS, cg_tol=DEFAULT_CG_TOL,
                  cg_max_iters=None, preconditioner=None, precision=DEFAULT_PRECISION,
                  return_stats=False, return_rho=False, check_finite=True):
    """Causal Local Linear Attention (SPEC 1).

    q, k, v: (B, H, S, D) or (B, S, D), one of fp32 / bf16 / fp16, D in {16, 32, 64, 128};
    output in the input dtype and rank. ridge_lambda: float >= 0 or a tensor broadcastable
    to (B, H, S) (per-query lambda). ``return_stats=True`` returns (o, stats) with
    (B, H, S) tensors cg_iters, cg_residual (true relative residual), omega, delta
    (den_i = sum_j g_ij as summed), m, and fallback (True where |den_i| <= delta_eps
    sum_j |g_ij|: den_i carried no correct digit and the row returned the softmax
    average sum_j w_ij v_j / omega_i instead; docs/kernels.md), and anchor_rounds (int32:
    how many anchors the row's tile tried before the row was served; above 1 only for
    queries far from their tile's first one, docs/kernels.md "Rows far from the anchor").

    ``return_rho=True`` appends rho, the solve's rho_i of Sigma_i rho_i = mu_i (SPEC 1),
    fp32, of q's shape (B, H, S, D) or (B, S, D), without gradient: the CG iterate the
    output pass used, the one whose true residual is stats' cg_residual. On rows where
    stats' fallback is True the output was formed with rho_i = 0 instead (the softmax
    average); rho there is still the solve's. Returns o, (o, stats), (o, rho) or
    (o, stats, rho): o first, then what was asked in that order.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise LLAInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise LLAInputError(f"{name}: expected shape (B, H, S, D) or (B, S, D), got {tuple(t.shape)}")
    # finiteness is checked on the device and read with the kernel's own device-to-host
    # transfer (forward.lla_forward_kernel, input_check): a sync of its own here left the
    # GPU idle for the launch's host work, 0.23-0.33 ms (docs/performance.md, seventh run)
    check_qkv(q, k, v, dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS, check_finite=False)
    if v.shape != q.shape:
        raise LLAInputError(f"v: expected the shape of q {tuple(q.shape)} (same D), got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise LLAInputError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type == "cpu" and not interpreting():
        raise LLAInputError("q: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1) or a CUDA device")
    if isinstance(ridge_lambda, torch.Tensor) and ridge_lambda.device != q.device and ridge_lambda.dim() > 0:
        raise LLAInputError(f"ridge_lambda: expected a tensor on {q.device}, got one on {ridge_lambda.device}")
    scale = check_scale(qk_scale, q.shape[-1])
    eps = check_delta_eps(delta_eps)
    tol = _check_options(cg_tol, cg_max_iters, preconditioner, precision)

    lead = tuple(q.shape[:-1])
    S, D = q.shape[-2], q.shape[-1]
    if cg_max_iters is None:
        cg_max_iters = default_cg_max_iters(D)
    N = math.prod(lead[:-1])
    lam = check_lambda(ridge_lambda, lead, q.device, dtype=torch.float32).reshape(N, S).contiguous()
    q3, k3, v3 = (t.reshape(N, S, D).contiguous() for t in (q, k, v))
    pending = (nonfinite_flag((q, k, v)), (("q", q), ("k", k), ("v", v))) if check_finite else None

    lam_grad = isinstance(ridge_lambda, torch.Tensor) and ridge_lambda.requires_grad
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or lam_grad):
        try:
            from .autograd import LLAFunction
        except ImportError:
            raise NotImplementedError("lla_triton: backward not available yet") from None
        o3 = LLAFunction.apply(q3, k3, v3, lam, scale, eps, tol, cg_max_iters, preconditioner, precision, pending)
        if not (return_stats or return_rho):
            return o3.reshape(q.shape)
        # the forward is deterministic (no atomics): this launch solves for the rho the
        # autograd forward saved, and reports its statistics
        with torch.no_grad():
            fo = lla_forward_kernel(q3.detach(), k3.detach(), v3.detach(), lam.detach(), scale, delta_eps=eps,
                                    cg_tol=tol, cg_max_iters=cg_max_iters, preconditioner=preconditioner,
                                    want_stats=return_stats, precision=precision)
    else:
        fo = lla_forward_kernel(q3, k3, v3, lam, scale, delta_eps=eps, cg_tol=tol, cg_max_iters=cg_max_iters,
                                preconditioner=preconditioner, want_stats=return_stats, precision=precision,
                                input_check=pending)
        o3 = fo.o
    o = o3.reshape(q.shape)
    if not (return_stats or return_rho):
        return o
    out = (o,)
    if return_stats:
        out += (_stats(fo, lead),)
    if return_rho:
        out += (fo.rho.reshape(q.shape),)
    return out


def _stats(fo, lead):
    return {
        "cg_iters": fo.cg_iters.reshape(lead),
        "cg_residual": fo.cg_residual.reshape(lead),
        "omega": fo.omega.reshape(lead),
        "delta": fo.den.reshape(lead),
        "fallback": fo.fallback.bool().reshape(lead),
        "m": fo.m.reshape(lead),
        "anchor_rounds": fo.anchor_rounds.reshape(lead),
    }


def __getattr__(name):
    # issue 23's interface is lla_triton.lla_decode; the kernel is a package of its own
    # (kernels/lla_decode, docs/decode.md), imported on first use so that this package
    # still loads without it
    if name == "lla_decode":
        from lla_decode import lla_decode

        return lla_decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
