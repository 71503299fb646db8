"""The registry of LLA implementations under test: one record per implementation.

A record says what the implementation can be asked (dtypes, head dims, devices,
gradients, per-query lambda), the precision it computes in (which sets its error
budget) and, for iterative solvers, the tolerance it stops at. Properties, goldens,
the audit and the hunt all read these records; a property an implementation
cannot be asked is skipped with the reason recorded here, never passed.

The protocol an implementation follows (``--lla-impl MODULE:CALLABLE``):

    fn(q, k, v, *, ridge_lambda, qk_scale) -> o

q, k, v of shape (B, H, S, D) on the suite's device, ridge_lambda a float or a
(B, H, S) tensor, o of shape (B, H, S, D) in q's dtype; gradients through autograd.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from lla_contract import LLAInputError, check_lambda, check_qkv, check_scale

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_GRADS = ("dq", "dk", "dv", "dlambda")


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a dtype with p significand bits (round to nearest)."""
    bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
    if dtype not in bits:
        raise LLAInputError(f"dtype: no unit roundoff known for {dtype}")
    return 2.0 ** -bits[dtype]


@dataclass(frozen=True)
class Impl:
    name: str
    forward: Callable  # fn(q, k, v, *, ridge_lambda, qk_scale) -> o
    description: str
    dtypes: tuple = ALL_DTYPES
    head_dims: tuple | None = None  # None: any D >= 1
    devices: tuple = ("cpu", "cuda")
    compute_dtype: torch.dtype = torch.float32  # precision of its arithmetic
    solver_tol: float = 0.0  # relative residual its inner solve stops at; 0 = direct solve
    supports_grad: bool = True
    # the gradients it returns and is judged on; one left out is reported as not
    # checked, with the reason in skips[name], never passed
    grads: tuple = ALL_GRADS
    per_query_lambda: bool = True
    # Rounding it applies before computing, which budgets treat as input (SPEC 8: the
    # oracle runs on what the implementation computed from): q, k, v rounded to
    # input_dtype, lambda to lambda_dtype ("input": the dtype of q as passed to it), the
    # result rounded to output_dtype before the adapter casts it to q's dtype. None: as given.
    input_dtype: torch.dtype | None = None
    lambda_dtype: torch.dtype | str | None = None
    output_dtype: torch.dtype | None = None
    forward_with_stats: Callable | None = None  # same args -> (o, stats dict of (B, H, S))
    skips: dict = field(default_factory=dict)  # property name -> reason

    @property
    def u(self) -> float:
        return unit_roundoff(self.compute_dtype)

    def supports(self, *, dtype=None, head_dim=None, device=None) -> str | None:
        """None if the implementation accepts this configuration, else the reason it does not."""
        if dtype is not None and dtype not in self.dtypes:
            return f"{self.name} does not accept dtype {dtype} (accepts {[str(d) for d in self.dtypes]})"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"{self.name} does not accept head_dim {head_dim} (accepts {self.head_dims})"
        if device is not None and torch.device(device).type not in self.devices:
            return f"{self.name} does not run on {device} (runs on {self.devices})"
        return None

    def skip_reason(self, prop: str) -> str | None:
        return self.skips.get(prop)


# ---------------------------------------------------------------- dense fp32 torch
def dense_torch_lla(q, k, v, *, ridge_lambda, qk_scale=None, compute_dtype=torch.float32):
    """Dense LLA in ``compute_dtype`` (default fp32): materialises z_ij and Sigma_i.

    The same-precision reference of SPEC 8 (FlashAttention's rule): the plain
    computation, carried out in the kernel's compute precision on the same rounded
    inputs. Direct solve (Cholesky) per query; output in q's dtype. Memory
    Theta(S^2 D), so small S only.
    """
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device, dtype=compute_dtype)
    cd = compute_dtype
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    S, D = q.shape[-2], q.shape[-1]
    a = scale * (qc @ kc.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    a = a.masked_fill(~mask, float("-inf"))
    w = torch.exp(a - a.amax(-1, keepdim=True))
    omega = w.sum(-1)
    z = kc[..., None, :, :] - qc[..., :, None, :]  # (..., S, S, D)
    wz = w[..., None] * z
    mu = wz.sum(-2)
    eye = torch.eye(D, dtype=cd, device=q.device)
    sig = wz.transpose(-1, -2) @ z + (lam * omega)[..., None, None] * eye
    # Which rows factor is decided without autograd, and the differentiable factorisation
    # sees only matrices that factor: a failed factor is NaN, and selecting around it
    # afterwards still sends NaN through autograd (0 * NaN is NaN) into every input.
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(sig)
        # Sigma_i is SPD in exact arithmetic when lambda_i > 0, but once kappa exceeds
        # 1/u_c its rounded form need not be: a jitter of D u_c tr(Sigma_i)/D is a
        # backward error of the size the rounding already made.
        u = torch.finfo(cd).eps / 2
        needs = (info != 0)[..., None, None]
        jitter = torch.where(needs, (u * torch.diagonal(sig, dim1=-2, dim2=-1).sum(-1))[..., None, None] * eye,
                             torch.zeros_like(sig))
        L0, info2 = torch.linalg.cholesky_ex(sig + jitter)
        chol_ok = (info2 == 0) & torch.isfinite(L0).flatten(-2).all(-1)
    # rows that do not factor even jittered fall back to the softmax average below
    L, _ = torch.linalg.cholesky_ex(torch.where(chol_ok[..., None, None], sig + jitter, eye))
    rho = torch.cholesky_solve(mu[..., None], L)[..., 0]
    rho_ok = chol_ok & torch.isfinite(rho).all(-1)
    rho = torch.where(rho_ok[..., None], rho, torch.zeros_like(rho))
    zr = (z @ rho[..., None])[..., 0]
    g = w * (1.0 - zr)
    den = g.sum(-1)
    # The kernel's delta guard (docs/kernels.md), so that the reference is held to the
    # same function: a den_i below the rounding of the sum it came from (4 u_c of
    # sum_j w_ij (1 + |<z_ij, rho_i>|)) has no correct digit (lambda = 0 early tokens,
    # lambda 1e-8), and a rho_i the jittered Cholesky could not make finite has none
    # either; such rows return the softmax average (rho_i = 0). Without it the
    # reference broke partition of unity at lambda 1e-8 and returned NaN at kappa 1e12.
    u = torch.finfo(cd).eps / 2
    mag = (w * (1.0 + zr.abs())).sum(-1)
    bad = ~rho_ok | ~torch.isfinite(den) | (den.abs() <= 4.0 * u * mag)
    g = torch.where(bad[..., None], w, g)
    den = torch.where(bad, omega, den)
    o = (g @ vc) / den[..., None]
    return o.to(q.dtype)


def _oracle_impl(q, k, v, *, ridge_lambda, qk_scale=None):
    from lla_verify.oracles.float64 import lla_forward

    return lla_forward(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


# ---------------------------------------------------------------- our Triton kernel
def _triton_forward(q, k, v, *, ridge_lambda, qk_scale=None):
    import lla_triton

    return lla_triton.lla_attention(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def _triton_forward_stats(q, k, v, *, ridge_lambda, qk_scale=None, **kw):
    import lla_triton

    return lla_triton.lla_attention(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale, return_stats=True, **kw)


def _triton_record() -> Impl:
    tol = 1e-6
    try:
        import lla_triton

        tol = float(getattr(lla_triton, "DEFAULT_CG_TOL", tol))
    except ImportError:
        pass
    return Impl(
        name="triton",
        forward=_triton_forward,
        forward_with_stats=_triton_forward_stats,
        description="lla_triton: blockwise FlashLLA in Triton, CG solve, fp32 accumulation",
        dtypes=ALL_DTYPES,
        head_dims=(16, 32, 64, 128),
        devices=("cuda", "cpu"),  # cpu only through TRITON_INTERPRET=1
        compute_dtype=torch.float32,
        solver_tol=tol,
    )


# ---------------------------------------------------------------- public FlashLLA
# What the adapter relies on in the public code (flashlla/ops/__init__.py and forward.py;
# tests/test_flashlla_adapter.py::test_assumed_api_matches_the_public_source reads it):
# lla_attention(q, k, v, *, ridge_lambda, qk_scale, ...) takes (batch, seqlen, head_dim)
# tensors and a ridge_lambda that is a float or a tensor expanding to (batch, seqlen); a
# float becomes a tensor of q's dtype as passed (so bf16 inputs get a bf16 lambda); a
# tensor is used in its own dtype. LLAFunction.forward casts q, k, v to bf16 and returns
# o in bf16; its backward returns dq, dk, dv in bf16 and None for ridge_lambda.
FLASHLLA_HEAD_DIMS = (16, 32, 64, 128)


def _flashlla_forward(q, k, v, *, ridge_lambda, qk_scale=None):
    import flashlla  # only when importable (is_available says why not)

    check_qkv(q, k, v)
    if q.dim() != 4:
        raise LLAInputError(f"q: expected shape (B, H, S, D), got {tuple(q.shape)}")
    B, H, S, D = q.shape
    if v.shape[-1] != D:
        # forward.py loads v with q's HEAD_DIM block: it has no separate value width
        raise LLAInputError(f"v: flashlla needs v's head dimension equal to q's ({D}), got {v.shape[-1]}")
    if isinstance(ridge_lambda, torch.Tensor):
        # Its docstring says a tensor lambda is coerced to q's dtype, its code passes the
        # tensor through: the adapter does the coercion, so a tensor lambda is rounded as a
        # float one is (Impl.lambda_dtype "input"), and folds heads into the batch.
        lam = check_lambda(ridge_lambda, (B, H, S), q.device, dtype=q.dtype).reshape(B * H, S).contiguous()
    else:
        check_lambda(ridge_lambda, (1,), "cpu", dtype=q.dtype)  # the same refusals, by name
        lam = float(ridge_lambda)  # the kernel rounds it to q's dtype itself
    fold = lambda t: t.reshape(B * H, S, t.shape[-1])  # noqa: E731  heads folded into its batch
    o = flashlla.lla_attention(fold(q), fold(k), fold(v), ridge_lambda=lam,
                               qk_scale=check_scale(qk_scale, D))
    return o.reshape(B, H, S, D).to(q.dtype)


def _flashlla_record() -> Impl:
    return Impl(
        name="flashlla",
        forward=_flashlla_forward,
        description="public FlashLLA (flashlla.lla_attention) at its defaults: bf16 inputs and output, "
                    "fp32 accumulation, unpreconditioned CG (atol = rtol = 1e-12, 32 iterations)",
        # float32 and bfloat16 inputs are both rounded to bf16 by the kernel (input_dtype).
        # float16 is left out: a float lambda becomes an fp16 tensor (lla_attention), so
        # lambda < 6e-8 turns into 0 and lambda > 65504 into Inf, a different problem
        # rather than a rounding of this one.
        dtypes=(torch.float32, torch.bfloat16),
        # HEAD_DIM is a tl.constexpr block-shape dimension (tl.make_block_ptr, tl.zeros):
        # Triton needs a power of two, and tl.dot at least 16; its autotuner tries 256-row
        # tiles, so widths beyond 128 are not claimed.
        head_dims=FLASHLLA_HEAD_DIMS,
        devices=("cuda",),
        compute_dtype=torch.float32,
        solver_tol=1e-12,
        supports_grad=True,
        grads=("dq", "dk", "dv"),
        per_query_lambda=True,
        input_dtype=torch.bfloat16,
        lambda_dtype="input",
        output_dtype=torch.bfloat16,
        skips={"dlambda": "flashlla's LLAFunction.backward returns None for ridge_lambda: "
                          "d lambda is not computed, so it is not checked"},
    )


def _builtin() -> dict[str, Callable[[], Impl]]:
    return {
        "triton": _triton_record,
        "torch-fp32": lambda: Impl(
            name="torch-fp32",
            forward=dense_torch_lla,
            description="dense LLA in fp32 torch (Cholesky per query); the same-precision reference",
            compute_dtype=torch.float32,
        ),
        "oracle-f64": lambda: Impl(
            name="oracle-f64",
            forward=_oracle_impl,
            description="the float64 oracle itself (a sanity run of the suite)",
            dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
            compute_dtype=torch.float64,
        ),
        "flashlla": _flashlla_record,
    }


BUILTIN_NAMES = tuple(_builtin())


def get_impl(spec: str) -> Impl:
    """Resolve ``NAME`` (a built-in) or ``MODULE:CALLABLE`` (the protocol above)."""
    table = _builtin()
    if spec in table:
        return table[spec]()
    if ":" not in spec:
        raise LLAInputError(
            f"--lla-impl: unknown implementation {spec!r}; expected one of {list(table)} or MODULE:CALLABLE"
        )
    modname, _, attr = spec.partition(":")
    if not modname or not attr or modname.startswith(".") or any(not p.isidentifier() for p in attr.split(".")):
        raise LLAInputError(f"--lla-impl: expected a built-in name {list(table)} or MODULE:CALLABLE "
                            f"(e.g. mypkg.mymod:my_lla), got {spec!r}")
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # noqa: BLE001  (the user's module failed to import: their input, named)
        raise LLAInputError(f"--lla-impl: cannot import module {modname!r}: {type(exc).__name__}: {exc}") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise LLAInputError(f"--lla-impl: module {modname!r} has no attribute {attr!r}")
    if not callable(fn):
        raise LLAInputError(f"--lla-impl: {spec} is not callable")
    record = getattr(fn, "lla_impl_record", None)  # an external may describe itself
    if isinstance(record, Impl):
        return record
    return Impl(name=spec, forward=fn, description=f"external implementation {spec}")


def with_overrides(impl: Impl, **kw) -> Impl:
    return replace(impl, **kw)


def is_available(impl: Impl, device: str) -> str | None:
    """None if ``impl`` can run on ``device`` in this process, else why not."""
    reason = impl.supports(device=device)
    if reason:
        return reason
    if impl.name == "triton":
        import os

        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton kernel runs on CPU only through the interpreter (set TRITON_INTERPRET=1)"
        try:
            import lla_triton  # noqa: F401
            if not hasattr(lla_triton, "lla_attention"):
                return "lla_triton.lla_attention is not built yet"
        except ImportError as exc:
            return f"lla_triton does not import: {exc}"
    if impl.name == "flashlla":
        try:
            import flashlla  # noqa: F401
        except ImportError:
            return "flashlla (the public FlashLLA) is not installed"
    return None


__all__ = ["Impl", "get_impl", "BUILTIN_NAMES", "dense_torch_lla", "unit_roundoff", "is_available"]
