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
from lla_verify.oracles.dense import dense_torch_lla
from lla_verify.registry.precision import unit_roundoff

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_GRADS = ("dq", "dk", "dv", "dlambda")


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
    # why a configuration left out of dtypes is left out: "dtype:torch.float16" -> reason.
    # supports() gives it with the refusal, so a skip names its reason and a run's
    # checker (scripts/flashlla_suite_check.py) can tell a declared refusal from any other
    refusals: dict = field(default_factory=dict)
    # the operator it computes: "lla" (the protocol above) or "parallax"
    # (registry/parallax.py: fn(q, k, v, r, *, qk_scale) -> o)
    operator: str = "lla"
    # keywords beyond its protocol that it accepts and a property may draw (the built-in
    # decode kernels: "split", the cache positions a program reads)
    options: tuple = ()

    @property
    def u(self) -> float:
        return unit_roundoff(self.compute_dtype)

    def supports(self, *, dtype=None, head_dim=None, device=None) -> str | None:
        """None if the implementation accepts this configuration, else the reason it does not."""
        if dtype is not None and dtype not in self.dtypes:
            why = self.refusals.get(f"dtype:{dtype}")
            return (f"{self.name} does not accept dtype {dtype} (accepts {[str(d) for d in self.dtypes]})"
                    + (f": {why}" if why else ""))
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"{self.name} does not accept head_dim {head_dim} (accepts {self.head_dims})"
        if device is not None and torch.device(device).type not in self.devices:
            return f"{self.name} does not run on {device} (runs on {self.devices})"
        return None

    def skip_reason(self, prop: str) -> str | None:
        return self.skips.get(prop)

    def declared_skips(self) -> dict:
        """Every reason the record gives for not checking something: the properties it
        cannot be asked (skips) and the configurations it refuses (refusals)."""
        return {**self.skips, **self.refusals}


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


def triton_impl(**kernel_kw) -> Impl:
    """The triton record with its kernel called with ``kernel_kw`` (``lla_attention``'s
    options: preconditioner, cg_tol, ...), named after them; the budget's solver_tol
    follows cg_tol, so a budget is built for the solve that ran."""
    base = _triton_record()
    if not kernel_kw:
        return base

    def forward(q, k, v, *, ridge_lambda, qk_scale=None):
        import lla_triton

        return lla_triton.lla_attention(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale, **kernel_kw)

    def forward_stats(q, k, v, *, ridge_lambda, qk_scale=None):
        return _triton_forward_stats(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale, **kernel_kw)

    name = "triton[" + ",".join(f"{k}={v}" for k, v in sorted(kernel_kw.items())) + "]"
    return replace(base, name=name, forward=forward, forward_with_stats=forward_stats,
                   solver_tol=float(kernel_kw.get("cg_tol", base.solver_tol)))


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
        dtypes=(torch.float32, torch.bfloat16),
        refusals={"dtype:torch.float16": "lla_attention makes a float lambda a tensor of q's dtype, so in "
                                         "float16 a lambda below 6e-8 becomes 0 and one above 65504 Inf: "
                                         "a different problem, not a rounding of this one"},
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


def load_callable(spec, opt: str, builtins: list, example: str):
    """The callable named by ``MODULE:CALLABLE``; an LLAInputError naming ``opt`` otherwise.

    Shared by every operator's implementation registry (LLA's --lla-impl, Parallax's
    --lla-parallax-impl): ``builtins`` are the names the message offers instead.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise LLAInputError(f"{opt}: unknown implementation {spec!r}; expected one of {builtins} or MODULE:CALLABLE")
    modname, _, attr = spec.partition(":")
    if not modname or not attr or modname.startswith(".") or any(not p.isidentifier() for p in attr.split(".")):
        raise LLAInputError(f"{opt}: expected a built-in name {builtins} or MODULE:CALLABLE "
                            f"(e.g. {example}), got {spec!r}")
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # noqa: BLE001  (the user's module failed to import: their input, named)
        raise LLAInputError(f"{opt}: cannot import module {modname!r}: {type(exc).__name__}: {exc}") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise LLAInputError(f"{opt}: module {modname!r} has no attribute {attr!r}")
    if not callable(fn):
        raise LLAInputError(f"{opt}: {spec} is not callable")
    return fn


def get_impl(spec: str) -> Impl:
    """Resolve ``NAME`` (a built-in) or ``MODULE:CALLABLE`` (the protocol above)."""
    table = _builtin()
    if spec in table:
        return table[spec]()
    fn = load_callable(spec, "--lla-impl", list(table), "mypkg.mymod:my_lla")
    record = getattr(fn, "lla_impl_record", None)  # an external may describe itself
    if isinstance(record, Impl):
        if record.operator != "lla":
            raise LLAInputError(f"--lla-impl: {spec} describes itself as a {record.operator} implementation, "
                                f"not LLA (pass it to --lla-{record.operator}-impl)")
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


__all__ = ["Impl", "get_impl", "BUILTIN_NAMES", "is_available"]
