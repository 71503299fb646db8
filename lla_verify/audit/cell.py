"""One audit cell: its case built, the implementation run (in a child process when it
can be pickled), judged by the budget module, and kept as a record for the report.
"""

from __future__ import annotations

import math
import shlex

from lla_verify.audit.plan import Cell


QUERY_SAMPLES = 96  # per-query points kept per cell in report.json, for the plots
COTANGENT_SEED = 1234  # the fixed cotangent of the backward check
# The backward check differentiates the float64 oracle (four times) and the dense
# fp32 reference through autograd, which keeps every pairwise (S, S, D) tensor alive:
# above this S * S * D (about 1 GiB per float64 pairwise tensor) it would not fit
# beside the kernel (nor in a five-minute --full run), so larger cells check the
# forward only, and say so.
BACKWARD_MAX_WORK = 1024 * 1024 * 64


def repro_command(spec: str, impl_name: str, device: str, backward: bool = False, op: str = "lla") -> str:
    op_arg = "" if op == "lla" else f" --op {op}"
    cmd = f"lla-verify check --case {shlex.quote(spec)}{op_arg} --impl {shlex.quote(impl_name)} --device {device}"
    return cmd + (" --backward" if backward else "")


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


def _sample(t, n=QUERY_SAMPLES):
    """Up to n evenly spaced entries of a flattened per-query tensor, as floats."""
    import torch

    flat = t.detach().flatten().to(torch.float64).cpu()
    if flat.numel() > n:
        flat = flat[torch.linspace(0, flat.numel() - 1, n).round().long()]
    return [float(x) for x in flat]


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _call(impl, problem):
    """Run the forward across the trust boundary (with CG statistics when the implementation
    has them); raises trust.Misbehaved when the implementation breaks the calling contract."""
    from lla_verify.trust import call_forward

    return call_forward(impl, problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                        qk_scale=problem.qk_scale, stats=True)


def _cotangent(problem):
    import torch

    gen = torch.Generator().manual_seed(COTANGENT_SEED)
    return torch.randn(tuple(problem.v.shape), generator=gen, dtype=torch.float64).to(problem.v.device)


def _worst_verdict(res):
    """check_backward may return one Verdict or several (one per input): keep the worst."""
    if isinstance(res, dict):
        res = list(res.values())
    if isinstance(res, (list, tuple)):
        vs = [r for r in res if hasattr(r, "ratio")]
        if not vs:
            return None
        return max(vs, key=lambda r: (not r.passed, float(r.ratio) if not math.isnan(float(r.ratio)) else math.inf))
    return res if hasattr(res, "ratio") else None


def backward_check(problem, impl) -> dict:
    """The gradient verdict of one cell, or why there is none.

    budget.check_backward is being written alongside this module, so it is looked up
    at call time and its cotangent argument found by name; the audit only supplies
    the fixed cotangent and records the Verdict it returns.
    """
    import inspect

    from lla_verify.budget import backward as budget

    if not impl.supports_grad:
        return {"status": f"not checked: {impl.name} has no gradients"}
    cb = getattr(budget, "check_backward", None)
    if cb is None:
        return {"status": "not checked: budget.check_backward unavailable"}
    # one definition of the fixed cotangent: the budget module's, when it has one
    cot_fn = getattr(budget, "cotangent_for", None)
    cot = cot_fn(problem) if callable(cot_fn) else _cotangent(problem)
    try:
        params = inspect.signature(cb).parameters
    except (TypeError, ValueError):
        params = {}
    kw = {}
    for name in ("cot", "cotangent", "do", "grad_out", "grad_output"):
        if name in params:
            kw[name] = cot
            break
    from lla_verify.trust import Misbehaved

    try:
        res = cb(problem, impl, **kw)
    except Misbehaved as exc:
        return {"status": "checked", "ratio": math.inf, "passed": False, "cause": "implementation",
                "message": f"[{impl.name}] backward {exc}"}
    except TypeError as exc:
        return {"status": f"not checked: budget.check_backward{inspect.signature(cb)} not understood: {exc}"}
    except Exception as exc:  # the implementation's backward raised: its fault
        return {"status": "checked", "ratio": math.inf, "passed": False, "cause": "implementation",
                "message": f"[{impl.name}] backward raised {type(exc).__name__}: {exc}"}
    v = _worst_verdict(res)
    if v is None:
        return {"status": f"not checked: budget.check_backward returned {type(res).__name__}, not a Verdict"}
    if v.cause == "skipped":
        return {"status": f"not checked: {v.message}"}
    return {"status": "checked", "ratio": float(v.ratio), "passed": bool(v.passed), "cause": str(v.cause),
            "message": str(v.message), "check": getattr(v, "check", "backward"),
            "grads_checked": list((getattr(v, "summary", None) or {}).get("grads_checked", [])),
            "grads_not_checked": list((getattr(v, "summary", None) or {}).get("grads_not_checked", [])),
            "n_beyond_precision": int((getattr(v, "summary", None) or {}).get("n_beyond_precision", 0))}


def failed_record(rec: dict, message: str, *, time_s: float = math.nan) -> dict:
    """``rec`` (the cell's identity) completed as a forward failure of the implementation's."""
    rec.update(ratio=math.inf, forward_ratio=math.inf, passed=False, cause="implementation",
               forward_passed=False, failed_checks=["forward"], message=message, time_s=time_s,
               grad={"status": "not checked: the forward failed"})
    return rec


NOT_RUN = "not run"  # the cause of a cell the process could not run (its CUDA context was lost before it)


def lost_context_record(rec: dict, name: str, err: str) -> dict:
    """``rec`` completed as the cell that lost the process's CUDA context: whatever its
    checks said, the kernel faulted on the device while it ran."""
    rec = failed_record(rec, f"[{name}] CUDA context lost during this cell: {err}; the implementation faulted "
                             f"on {rec['spec']}", time_s=rec.get("time_s", math.nan))
    rec["cuda_context_lost"] = err
    return rec


def not_run_record(rec: dict, name: str, lost_in: str) -> dict:
    """``rec`` (the cell's identity) completed as not run: the process's CUDA context was
    lost in the cell ``lost_in``, so no verdict on this one exists. It fails (an audit
    with cells not run never passes) with a NaN ratio, which no worst-cell ranking takes."""
    rec.update(ratio=math.nan, forward_ratio=math.nan, passed=False, cause=NOT_RUN, forward_passed=False,
               failed_checks=[], time_s=math.nan, grad={"status": "not checked: the cell was not run"},
               message=f"[{name}] not run: the CUDA context of this process was lost in {lost_in}",
               not_run_after=lost_in)
    return rec


def run_checked(fn, cell: Cell, impl, device: str, *, backward: bool = True, impl_name: str | None = None) -> dict:
    """``fn`` (run_cell or run_op_cell) on ``cell``, then the CUDA context check
    (lla_verify/testing/cuda_context.py), in the process that runs the cell: a fault that
    lost the context is this cell's, and a process whose context was lost earlier runs
    no cell (it says where the context was lost)."""
    from lla_verify.testing import cuda_context

    name = impl_name or impl.name
    spec = cell.case.spec()

    def blank():
        return _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)

    return cuda_context.guarded(
        spec, lambda: fn(cell, impl, device, backward=backward, impl_name=impl_name),
        not_run=lambda where: not_run_record(blank(), name, where),
        # a fault outside the implementation's call (the check's own CUDA work)
        raised=lambda exc: failed_record(blank(), f"[{name}] raised {type(exc).__name__}: {exc} on {spec}"),
        lost=lambda rec, err: lost_context_record(rec, name, err))


def _cell_record(cell: Cell, impl, device: str, *, backward: bool, impl_name: str | None) -> dict:
    spec = cell.case.spec()
    op = getattr(cell, "op", "lla")
    case = cell.case
    extra = {}
    if op != "lla":
        from lla_verify.registry.operators import get_operator

        opr = get_operator(op)
        case = opr.base_case(cell.case)
        backward = backward and opr.has_backward
        if case is not cell.case:  # a Parallax case: its probe
            extra = {"probe": cell.case.probe, "probe_params": dict(cell.case.probe_params)}
    return {"spec": spec, "op": op, "sweep": cell.sweep, "family": case.family, "params": dict(case.params), **extra,
            "dtype": case.dtype, "B": case.B, "H": case.H, "S": case.S, "D": case.D, "seed": case.seed,
            "command": repro_command(spec, impl_name or impl.name, device, backward=backward and impl.supports_grad,
                                     op=op)}


def run_cell_isolated(worker, cell: Cell, impl, device: str, *, backward: bool = True,
                      impl_name: str | None = None) -> dict:
    """run_cell in ``worker``'s child process (in this one when ``worker`` is None): an
    implementation that ends its process, crashes it or hangs fails this cell only.

    A cell that lost the child's CUDA context fails, and the child is replaced, so the
    next cell runs on a fresh context. In this process a lost context cannot be replaced:
    the cells after it are records of cells not run (``run_checked``)."""
    from lla_verify.trust import ChildFailed, run_isolated

    fn = run_cell if getattr(cell, "op", "lla") == "lla" else run_op_cell
    try:
        rec = run_isolated(worker, run_checked, fn, cell, impl, device, backward=backward, impl_name=impl_name)
    except ChildFailed as exc:
        rec = _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)
        return failed_record(rec, f"[{impl_name or impl.name}] {exc} on {rec['spec']}")
    if rec.get("cuda_context_lost") and worker is not None:
        worker.restart()
    return rec


def run_cell(cell: Cell, impl, device: str, *, backward: bool = True, impl_name: str | None = None) -> dict:
    """Build, run, time and judge one cell; every number lands in the returned record."""
    import torch

    from lla_verify.budget.forward import check_forward

    case = cell.case
    spec = case.spec()
    name = impl_name or impl.name
    rec = _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)
    problem = case.build(device)
    from lla_verify.trust import Misbehaved, clock

    t0 = clock()
    try:
        _sync(device)
        o, stats = _call(impl, problem)
        _sync(device)
        elapsed = clock() - t0
        if str(device).startswith("cuda"):
            # the first call carries the JIT compile; time a second one (fresh input copies:
            # a cache keyed on their addresses misses), and judge that one
            t1 = clock()
            o, stats = _call(impl, problem)
            _sync(device)
            elapsed = clock() - t1
    except Misbehaved as exc:  # a breach of the calling contract fails the cell, whatever the output
        return failed_record(rec, f"[{name}] forward {exc} on {spec}", time_s=clock() - t0)
    except Exception as exc:  # a kernel that raises on a valid input fails that cell
        return failed_record(rec, f"[{name}] forward raised {type(exc).__name__}: {exc} on {spec}",
                             time_s=clock() - t0)
    v = check_forward(problem, impl, o, stats=stats)
    of = o.detach()
    rec.update(
        ratio=float(v.ratio), forward_ratio=float(v.ratio), forward_passed=bool(v.passed), cause=v.cause,
        message=v.message,
        worst_query=list(v.worst) if v.worst is not None else None,
        err_max=_float_or_none(v.summary.get("err_max")), kappa_max=_float_or_none(v.summary.get("kappa_max")),
        kappa_worst=_float_or_none(v.summary.get("kappa_worst")),
        n_nan=int(torch.isnan(of).sum()), n_inf=int(torch.isinf(of).sum()),
        n_defined=v.n_defined, n_undefined=v.n_undefined, time_s=elapsed,
    )
    pq = v.per_query
    rec["queries"] = {"kappa": _sample(pq["kappa"].clamp(max=1e300)), "ratio": _sample(pq["ratio"].clamp(max=1e300))}
    if stats:
        if "cg_iters" in stats:
            it = stats["cg_iters"].detach().to(torch.float64)
            rec["cg_iters_mean"] = float(it.mean())
            rec["cg_iters_max"] = int(it.max())
            rec["queries"]["cg_iters"] = _sample(it)
        if "cg_residual" in stats:
            rec["cg_residual_max"] = float(torch.nan_to_num(stats["cg_residual"].detach().double(), nan=math.inf, posinf=math.inf).max())
    work = case.B * case.H * case.S * case.S * case.D
    if backward and cell.no_grad:
        rec["grad"] = {"status": cell.no_grad}
    elif backward and work > BACKWARD_MAX_WORK:
        rec["grad"] = {"status": f"not checked: too large for the backward check (B H S^2 D = {work:.2e} > "
                                 f"{BACKWARD_MAX_WORK:.2e}, its memory limit)"}
    elif backward:
        rec["grad"] = backward_check(problem, impl)
    else:
        rec["grad"] = {"status": "not checked: --no-backward"}
    return _combine(rec, bool(v.passed))


def _combine(rec: dict, forward_passed: bool, first: str = "forward") -> dict:
    """The cell's verdict from its forward (named ``first``) and gradient checks."""
    g = rec["grad"]
    grad_ok = g.get("passed", True)
    rec["passed"] = forward_passed and bool(grad_ok)
    if "ratio" in g:
        # the cell's ratio is its worst check, so sorting and the verdict see gradient failures too
        rec["ratio"] = max(rec["forward_ratio"], g["ratio"], key=lambda x: math.inf if math.isnan(x) else x)
    if forward_passed and not grad_ok:
        rec["cause"] = g.get("cause", "implementation")
    rec["failed_checks"] = [n for n, ok in ((first, forward_passed), ("backward", grad_ok)) if not ok]
    return rec


def run_op_cell(cell: Cell, impl, device: str, *, backward: bool = True, impl_name: str | None = None) -> dict:
    """run_cell for a cell of another operator (registry/operators.py): its ``check`` runs
    and judges the implementation; the record has the LLA cells' fields (kappa, CG
    statistics where the operator has them) and ``op``."""
    import torch

    from lla_verify.registry.operators import get_operator

    op = get_operator(cell.op)
    name = impl_name or impl.name
    rec = _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)
    first = "decode" if cell.op.endswith("decode") else "forward"
    base = op.base_case(cell.case)
    work = base.B * base.H * base.S * base.S * base.D
    grad = None
    if not backward:
        grad = {"status": "not checked: --no-backward"}
    elif not op.has_backward:
        grad = {"status": f"not checked: the {op.name} operator has no gradients"}
    elif not impl.supports_grad:
        grad = {"status": f"not checked: {impl.name} has no gradients"}
    elif cell.no_grad:
        grad = {"status": cell.no_grad}
    elif work > BACKWARD_MAX_WORK:
        grad = {"status": f"not checked: too large for the backward check (B H S^2 D = {work:.2e} > "
                          f"{BACKWARD_MAX_WORK:.2e}, its memory limit)"}
    verdicts = op.check(cell.case, impl, device, backward=grad is None)
    v = verdicts[0]
    if not v.per_query:  # the implementation broke the contract or raised: no output to judge
        rec = failed_record(rec, v.message.replace(f"[{impl.name}]", f"[{name}]", 1),
                            time_s=float(v.summary.get("time_s", math.nan)))
        rec["failed_checks"] = [first]
        return rec
    s = v.summary
    rec.update(
        ratio=float(v.ratio), forward_ratio=float(v.ratio), forward_passed=bool(v.passed), cause=v.cause,
        message=v.message, worst_query=list(v.worst) if v.worst is not None else None,
        err_max=_float_or_none(s.get("err_max")), kappa_max=_float_or_none(s.get("kappa_max")),
        kappa_worst=_float_or_none(s.get("kappa_worst")), n_nan=int(s.get("n_nan", 0)), n_inf=int(s.get("n_inf", 0)),
        n_defined=int(s.get("n_defined", v.n_defined)), n_undefined=int(s.get("n_undefined", v.n_undefined)),
        time_s=float(s.get("time_s", math.nan)))
    pq = v.per_query
    rec["queries"] = {"ratio": _sample(torch.nan_to_num(pq["ratio"], nan=math.inf).clamp(max=1e300))}
    if "kappa" in pq:
        rec["queries"]["kappa"] = _sample(pq["kappa"].clamp(max=1e300))
    for key in ("cg_iters_mean", "cg_iters_max", "cg_residual_max"):
        if key in s:
            rec[key] = s[key]
    if grad is None:
        g = verdicts[1] if len(verdicts) > 1 else None
        if g is None:
            grad = {"status": "not checked: the operator's check returned no gradient verdict"}
        else:
            grad = {"status": "checked", "ratio": float(g.ratio), "passed": bool(g.passed), "cause": str(g.cause),
                    "message": str(g.message), "check": g.check,
                    "grads_checked": [n for n in ("dq", "dk", "dv", "dr", "dlambda") if f"ratio_{n}" in g.summary]
                    or list(g.summary.get("grads_checked", [])),
                    "grads_not_checked": list(g.summary.get("grads_not_checked", [])),
                    "n_beyond_precision": int(g.summary.get("n_beyond_precision", 0))}
    rec["grad"] = grad
    return _combine(rec, bool(v.passed), first)
