"""The table of operators lla-verify checks: one record per operator, shared by check and audit.

``OPERATORS`` maps a name to an :class:`Operator`:

=================  ==========================================  ==================================
operator           case spec                                   implementation protocol
=================  ==========================================  ==================================
lla                CASE (registry.cases)                       fn(q, k, v, *, ridge_lambda, qk_scale)
parallax           CASE;probe=NAME[:p=v] (registry.parallax)   fn(q, k, v, r, *, qk_scale)
lla-decode         CASE                                        fn(q, k_cache, v_cache, lengths, *,
                                                               ridge_lambda, qk_scale)
parallax-decode    CASE;probe=NAME[:p=v]                       fn(q, r, k_cache, v_cache, lengths, *,
                                                               qk_scale)
=================  ==========================================  ==================================

A decode case is a forward case decoded at every position in one call (testing/decode.py:
a batch of B * S sequences, sequence b * S + t holding problem b's keys and values with
length t + 1, the positions past it NaN), judged row by row against the forward's output
by the forward's own budget (budget.forward.check_forward, budget.parallax.check_parallax_decode).

The API (everything a command needs; nothing else here is meant to be called):

- ``get_operator(name)`` -> Operator, or LLAInputError naming --op;
- ``op.parse_case(spec)`` -> the case (cases.Case or parallax.ParallaxCase), LLAInputError if bad;
- ``op.prepare(spec, device)`` -> None or why not: sets up what a built-in needs (the Triton
  interpreter on CPU), to be called before ``resolve``;
- ``op.resolve(spec, opt="--impl")`` -> an ``impls.Impl`` record (built-in name or
  MODULE:CALLABLE via impls.load_callable), LLAInputError naming ``opt`` if bad;
- ``op.available(impl, device)`` -> None, or why it cannot run here;
- ``op.supports(impl, case)`` -> None, or why the record refuses this dtype / head dim;
- ``op.check_fits(case, device)`` -> LLAInputError when the case would not fit in memory;
- ``op.build(case, device)`` -> the problem the implementation is given (LLAInputError when
  the case cannot be built: the user's error, raised before any implementation runs);
- ``op.check(case, impl, device, backward=False)`` -> list of Verdicts (forward first, then
  the gradients when asked and the operator has them), in the form of the LLA checks:
  ratio = error / budget at the worst row, ``worst``, ``cause``, the message; ``summary``
  carries time_s, n_nan, n_inf (and kappa, CG statistics where the operator has them).
  Every implementation call goes across the trust boundary (lla_verify/trust.py): one that
  exits, returns a wrong shape, mutates its inputs or raises gives a failing Verdict with
  cause "implementation", never an exception (a hang is ended by the trust.Worker the
  caller runs ``check`` in);
- ``op.spec(case)`` prints a case back; ``op.base_case(case)`` is its LLA ``Case`` (family,
  sizes, dtype);
- fields: ``name``, ``description``, ``case_help``, ``default_impl``, ``builtins``,
  ``has_backward``.

The audit runs LLA cells through audit/cell.run_cell (its record format predates this
table) and every other operator's through ``op.check`` (audit/cell.run_op_cell).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch

from lla_contract import LLAInputError
from lla_verify.registry import impls as _impls
from lla_verify.registry.cases import DTYPES, Case, parse_case

# the Triton built-ins of every operator, and the module each imports
TRITON_BUILTINS = {"triton": "lla_triton", "parallax-triton": "parallax_triton",
                   "parallax-triton-bf16w": "parallax_triton",
                   "lla-decode-triton": "lla_decode", "lla-decode-keyed": "lla_decode",
                   "parallax-decode-triton": "parallax_decode"}
COTANGENT_SEED = 1234  # the fixed cotangent of a gradient check (audit/cell.py's, for the same cells)
DECODE_HEAD_DIMS = (16, 32, 64, 128)  # the decode kernels' D and Dv (powers of two: tl.arange)


@dataclass(frozen=True)
class Operator:
    name: str
    description: str
    case_help: str  # the case spec's form, for messages
    default_impl: str
    builtins: tuple  # built-in implementation names
    has_backward: bool
    parse_case: Callable  # spec -> case; LLAInputError
    _resolve: Callable  # (spec, opt) -> Impl
    _available: Callable  # (impl, device) -> str | None
    _check: Callable  # (case, impl, device, backward) -> list[Verdict]
    _build: Callable  # (case, device) -> problem

    def resolve(self, spec, opt: str = "--impl"):
        return self._resolve(spec, opt)

    @staticmethod
    def prepare(spec, device: str) -> str | None:
        """Before ``resolve``: the environment a built-in needs on ``device`` (the Triton
        interpreter on CPU, chosen before its module is imported); None, or why it cannot run."""
        if isinstance(spec, str) and spec in TRITON_BUILTINS:
            return _triton_env(spec, device, TRITON_BUILTINS[spec])
        return None

    def available(self, impl, device: str) -> str | None:
        return self._available(impl, device)

    @staticmethod
    def base_case(case) -> Case:
        return case if isinstance(case, Case) else case.case

    @staticmethod
    def spec(case) -> str:
        return case.spec()

    def supports(self, impl, case) -> str | None:
        c = self.base_case(case)
        return impl.supports(dtype=DTYPES[c.dtype], head_dim=c.D)

    def check_fits(self, case, device: str) -> None:
        """LLAInputError when the case would not fit in ``device``'s memory (cases.Case.check_fits);
        a decode case also holds its cache once per position."""
        c = self.base_case(case)
        nbytes = c.check_bytes()
        if self.name.endswith("decode"):
            nbytes += 2 * c.B * c.H * c.S * c.S * c.D * DTYPES[c.dtype].itemsize
        c.check_fits(device, nbytes=nbytes)

    def build(self, case, device: str = "cpu"):
        return self._build(case, device)

    def check(self, case, impl, device: str, backward: bool = False) -> list:
        if backward and not self.has_backward:
            raise LLAInputError(f"--backward: the {self.name} operator has no gradients to check")
        return self._check(case, impl, device, backward)


# ------------------------------------------------------------------ shared pieces
def _failed(check: str, impl, spec: str, what: str, exc: BaseException):
    """A failing Verdict for an implementation that broke the contract or raised."""
    from lla_verify.budget.verdict import Verdict
    from lla_verify.trust import Misbehaved

    why = str(exc) if isinstance(exc, Misbehaved) else f"raised {type(exc).__name__}: {exc}"
    return Verdict(check, impl.name, spec, math.inf, False, "implementation", f"[{impl.name}] {what} {why} on {spec}",
                   summary={"ratio": math.inf, "cause": "implementation"})


def _timed(call, device: str):
    """(result, seconds) of ``call()``; on a GPU a second call is timed (and judged): the
    first carries the JIT compile."""
    from lla_verify.trust import _sync, clock

    t0 = clock()
    out = call()
    _sync(device)
    elapsed = clock() - t0
    if str(device).startswith("cuda"):
        t1 = clock()
        out = call()
        _sync(device)
        elapsed = clock() - t1
    return out, elapsed


def _output_summary(v, o: torch.Tensor, elapsed: float, **more):
    """``v`` with the output's NaN/Inf counts and the call's time in its summary."""
    s = dict(v.summary)
    s.update(time_s=elapsed, n_nan=int(torch.isnan(o).sum()), n_inf=int(torch.isinf(o).sum()), **more)
    return replace(v, summary=s)


def _triton_env(name: str, device: str, module: str) -> str | None:
    """Why the Triton built-in ``name`` (module ``module``) cannot run on ``device``, or None.

    On CPU it needs the interpreter, which must be chosen before its module is imported:
    set here when the module is not imported yet, as the LLA audit does for --impl triton."""
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.jit picks compiled or interpreted as triton and the kernels are imported
        loaded = [m for m in (module, "triton") if m in sys.modules]
        if loaded:
            return (f"{loaded[0]} was imported before TRITON_INTERPRET=1 could be set; rerun as "
                    f"TRITON_INTERPRET=1 lla-verify ...")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} does not import: {exc}"
    return None


def _rename(exc: LLAInputError, old: str, opt: str) -> LLAInputError:
    return LLAInputError(str(exc).replace(old, opt))


# ------------------------------------------------------------------ lla
def _lla_resolve(spec, opt):
    try:
        impl = _impls.get_impl(spec)
    except LLAInputError as exc:
        raise _rename(exc, "--lla-impl", opt) from None
    return impl


def _lla_available(impl, device):
    if impl.name == "triton":
        why = _triton_env("triton", device, "lla_triton")
        if why:
            return why
    return _impls.is_available(impl, device)


def _lla_check(case, impl, device, backward):
    from lla_verify.budget.backward import check_backward, cotangent_for
    from lla_verify.budget.forward import check_forward
    from lla_verify.trust import call_forward

    problem = case.build(device)
    spec = case.spec()
    try:
        (o, stats), elapsed = _timed(lambda: call_forward(impl, problem.q, problem.k, problem.v,
                                                          ridge_lambda=problem.ridge_lambda,
                                                          qk_scale=problem.qk_scale, stats=True), device)
    except Exception as exc:  # the implementation's fault, whatever it raised (trust.Misbehaved included)
        return [_failed("forward", impl, spec, "forward", exc)]
    out = [_output_summary(check_forward(problem, impl, o, stats=stats), o, elapsed, **_cg_summary(stats))]
    if backward and impl.supports_grad:
        try:
            out.append(check_backward(problem, impl, cot=cotangent_for(problem, COTANGENT_SEED)))
        except Exception as exc:
            out.append(_failed("backward", impl, spec, "backward", exc))
    return out


def _cg_summary(stats) -> dict:
    if not stats:
        return {}
    s = {}
    if "cg_iters" in stats:
        it = stats["cg_iters"].detach().to(torch.float64)
        s.update(cg_iters_mean=float(it.mean()), cg_iters_max=int(it.max()))
    if "cg_residual" in stats:
        s["cg_residual_max"] = float(torch.nan_to_num(stats["cg_residual"].detach().double(), nan=math.inf,
                                                      posinf=math.inf).max())
    return s


# ------------------------------------------------------------------ parallax
def _parallax_parse(spec):
    from lla_verify.registry.parallax import parse_parallax_case

    return parse_parallax_case(spec)


def _parallax_resolve(spec, opt):
    from lla_verify.registry.parallax import get_parallax_impl

    try:
        return get_parallax_impl(spec)
    except LLAInputError as exc:
        raise _rename(exc, "--lla-parallax-impl", opt) from None


def _parallax_available(impl, device):
    from lla_verify.registry.parallax import is_parallax_available

    if impl.name in TRITON_BUILTINS:
        why = _triton_env(impl.name, device, TRITON_BUILTINS[impl.name])
        if why:
            return why
    return is_parallax_available(impl, device)


def _parallax_build(case, device):
    return case.build(device)


def _parallax_check(case, impl, device, backward):
    from lla_verify.budget.parallax import check_parallax_backward, check_parallax_forward
    from lla_verify.trust import call_parallax, call_parallax_grads

    p = case.build(device)
    spec = case.spec()
    try:
        o, elapsed = _timed(lambda: call_parallax(impl, p.q, p.k, p.v, p.r, qk_scale=p.qk_scale), device)
    except Exception as exc:
        return [_failed("parallax-forward", impl, spec, "parallax forward", exc)]
    v = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl=impl.name, case=spec, qk_scale=p.qk_scale,
                               compute_dtype=impl.compute_dtype)
    out = [_output_summary(v, o, elapsed)]
    if backward and impl.supports_grad:
        gen = torch.Generator().manual_seed(COTANGENT_SEED)
        # the cotangent in the inputs' dtype: the implementation, the oracle and the dense
        # reference all differentiate against the same values
        do = torch.randn(tuple(p.v.shape), generator=gen, dtype=torch.float64).to(p.q.dtype).to(p.q.device)
        try:
            grads = call_parallax_grads(impl.forward, p.q, p.k, p.v, p.r, do, qk_scale=p.qk_scale)
        except Exception as exc:
            out.append(_failed("parallax-backward", impl, spec, "parallax backward", exc))
        else:
            out.append(check_parallax_backward(p.q, p.k, p.v, p.r, do, grads, impl=impl.name, case=spec,
                                               qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype))
    return out


# ------------------------------------------------------------------ decodes
def _lla_decode_solve(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, solver: str, stats: bool, split):
    import lla_decode

    return lla_decode.lla_decode(q, k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, qk_scale=qk_scale,
                                 return_stats=stats, solver=solver, split=split)


# module-level functions, not closures: the audit pickles an implementation into its worker
# processes (a closure cannot be, and its cells would run unprotected in the audit's own)
def _lla_decode_triton(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, split=None):
    return _lla_decode_solve(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, "sigma", False, split)


def _lla_decode_triton_stats(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, split=None):
    return _lla_decode_solve(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, "sigma", True, split)


def _lla_decode_keyed(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, split=None):
    return _lla_decode_solve(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, "keyed", False, split)


def _lla_decode_keyed_stats(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, split=None):
    return _lla_decode_solve(q, k_cache, v_cache, lengths, ridge_lambda, qk_scale, "keyed", True, split)


def _lla_decode_oracle(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    from lla_verify.oracles.decode import lla_decode_reference

    return lla_decode_reference(q, k_cache, v_cache, lengths, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def _parallax_decode_triton(q, r, k_cache, v_cache, lengths, *, qk_scale=None, split=None):
    import parallax_decode

    return parallax_decode.parallax_decode(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale, split=split)


def _parallax_decode_oracle(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    from lla_verify.oracles.decode import parallax_decode_reference

    return parallax_decode_reference(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale)


def _decode_cg_tol() -> float:
    try:
        import lla_decode

        return float(lla_decode.DEFAULT_CG_TOL)
    except ImportError:
        return 1e-7


_ORACLE_DTYPES = (torch.float64,) + _impls.ALL_DTYPES


def _lla_decode_record(name: str, forward, forward_with_stats, description: str):
    return _impls.Impl(name=name, forward=forward, forward_with_stats=forward_with_stats, operator="lla-decode",
                       description=description, head_dims=DECODE_HEAD_DIMS, compute_dtype=torch.float32,
                       solver_tol=_decode_cg_tol(), supports_grad=False, grads=(), options=("split",))


def _lla_decode_builtins() -> dict:
    Impl = _impls.Impl
    return {
        "lla-decode-triton": lambda: _lla_decode_record(
            "lla-decode-triton", _lla_decode_triton, _lla_decode_triton_stats,
            "lla_decode: flash-decoding LLA in Triton (split cache, fp64 CG on the combined Sigma), fp32 "
            "accumulation"),
        "lla-decode-keyed": lambda: _lla_decode_record(
            "lla-decode-keyed", _lla_decode_keyed, _lla_decode_keyed_stats,
            "lla_decode(solver='keyed'): CG's products as fp64 passes over the cached keys, no Sigma formed "
            "(docs/decode.md)"),
        "lla-decode-oracle": lambda: Impl(
            name="lla-decode-oracle", forward=_lla_decode_oracle, operator="lla-decode",
            description="the float64 decode reference (oracles.decode: the forward oracle's last row per sequence)",
            dtypes=_ORACLE_DTYPES, compute_dtype=torch.float64, supports_grad=False, grads=()),
    }


def _parallax_decode_builtins() -> dict:
    Impl = _impls.Impl
    return {
        "parallax-decode-triton": lambda: Impl(
            name="parallax-decode-triton", forward=_parallax_decode_triton, operator="parallax-decode",
            description="parallax_decode: flash-decoding Parallax in Triton (centred split moments), fp32 "
                        "accumulation", head_dims=DECODE_HEAD_DIMS, compute_dtype=torch.float32,
            supports_grad=False, grads=(), options=("split",)),
        "parallax-decode-oracle": lambda: Impl(
            name="parallax-decode-oracle", forward=_parallax_decode_oracle, operator="parallax-decode",
            description="the float64 Parallax decode reference (oracles.decode)", dtypes=_ORACLE_DTYPES,
            compute_dtype=torch.float64, supports_grad=False, grads=()),
    }


def _decode_resolver(op: str, table: Callable, example: str):
    def resolve(spec, opt):
        t = table()
        if isinstance(spec, str) and spec in t:
            return t[spec]()
        fn = _impls.load_callable(spec, opt, list(t), example)
        record = getattr(fn, "lla_impl_record", None)  # an external may describe itself
        if isinstance(record, _impls.Impl):
            if record.operator != op:
                raise LLAInputError(f"{opt}: {spec} describes itself as a {record.operator} implementation, not {op}")
            return record
        return _impls.Impl(name=spec, forward=fn, operator=op, description=f"external {op} implementation {spec}",
                           supports_grad=False, grads=())
    return resolve


def _decode_available(module: str):
    def available(impl, device):
        why = impl.supports(device=device)
        if why:
            return why
        if impl.name in TRITON_BUILTINS:
            return _triton_env(impl.name, device, module)
        return None
    return available


def _lla_decode_check(case, impl, device, backward):
    from lla_verify.budget.forward import check_forward
    from lla_verify.testing.decode import every_position, unflatten
    from lla_verify.trust import call_decode

    p = case.build(device)
    spec = case.spec()
    B, H, S, _ = p.q.shape
    qd, kc, vc, lens, (lam_d,) = every_position(p.q, p.k, p.v, p.lam_tensor.to(p.q.device)[..., None])
    args = {"q": qd, "k_cache": kc, "v_cache": vc, "lengths": lens}
    kw = {"ridge_lambda": lam_d[..., 0].to(torch.float32), "qk_scale": p.qk_scale}
    try:
        (o, st), elapsed = _timed(lambda: call_decode(impl, args, kw, stats=True), device)
    except Exception as exc:
        return [_failed("lla-decode", impl, spec, "decode", exc)]
    o = unflatten(o, B, S)
    st = {key: unflatten(val, B, S) for key, val in (st or {}).items()}
    v = check_forward(p, impl, o, stats=st or None)
    v = replace(v, check="lla-decode", message=v.message.replace(
        "] forward ", "] decode, every position against the forward's row: ", 1))
    return [_output_summary(v, o, elapsed, **_cg_summary(st))]


def _parallax_decode_check(case, impl, device, backward):
    from lla_verify.budget.parallax import check_parallax_decode
    from lla_verify.testing.decode import every_position, unflatten
    from lla_verify.trust import call_decode

    p = case.build(device)
    spec = case.spec()
    B, H, S, _ = p.q.shape
    qd, kc, vc, lens, (rd,) = every_position(p.q, p.k, p.v, p.r)
    args = {"q": qd, "r": rd, "k_cache": kc, "v_cache": vc, "lengths": lens}
    try:
        (o, _), elapsed = _timed(lambda: call_decode(impl, args, {"qk_scale": p.qk_scale}), device)
    except Exception as exc:
        return [_failed("parallax-decode", impl, spec, "decode", exc)]
    o = unflatten(o, B, S)
    v = check_parallax_decode(p.q, p.k, p.v, p.r, o, impl=impl.name, case=spec, qk_scale=p.qk_scale,
                              compute_dtype=impl.compute_dtype)
    return [_output_summary(v, o, elapsed)]


def _lla_build(case, device):
    return case.build(device)


# ------------------------------------------------------------------ the table
OPERATORS: dict[str, Operator] = {
    "lla": Operator(
        "lla", "Local Linear Attention, the forward (and gradients)", "CASE, e.g. gaussian:lam=1:B=1,H=1,S=16,D=16,"
        "dtype=float32,seed=0", "triton", _impls.BUILTIN_NAMES, True, parse_case, _lla_resolve, _lla_available,
        _lla_check, _lla_build),
    "parallax": Operator(
        "parallax", "Parallax o = nu - C r, the forward (and gradients dq, dk, dv, dr)",
        "CASE;probe=NAME[:p=v,...]", "parallax-triton",
        ("parallax-dense", "parallax-oracle", "parallax-triton", "parallax-triton-bf16w"),
        True, _parallax_parse, _parallax_resolve, _parallax_available, _parallax_check, _parallax_build),
    "lla-decode": Operator(
        "lla-decode", "LLA decode: one query against a KV cache, every position judged against the forward's row",
        "CASE", "lla-decode-triton", tuple(_lla_decode_builtins()), False, parse_case,
        _decode_resolver("lla-decode", _lla_decode_builtins, "mypkg.mymod:my_lla_decode"),
        _decode_available("lla_decode"), _lla_decode_check, _lla_build),
    "parallax-decode": Operator(
        "parallax-decode", "Parallax decode: one query (and probe) against a KV cache, every position judged "
        "against the forward's row", "CASE;probe=NAME[:p=v,...]", "parallax-decode-triton",
        tuple(_parallax_decode_builtins()), False, _parallax_parse,
        _decode_resolver("parallax-decode", _parallax_decode_builtins, "mypkg.mymod:my_parallax_decode"),
        _decode_available("parallax_decode"), _parallax_decode_check, _parallax_build),
}
OPERATOR_NAMES = tuple(OPERATORS)


def get_operator(name, opt: str = "--op") -> Operator:
    if not isinstance(name, str) or name not in OPERATORS:
        raise LLAInputError(f"{opt}: unknown operator {name!r}; expected one of {list(OPERATORS)}")
    return OPERATORS[name]


__all__ = ["Operator", "OPERATORS", "OPERATOR_NAMES", "get_operator"]
