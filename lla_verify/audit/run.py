"""``lla-verify audit`` (the release audit) and ``lla-verify check`` (replay one case).

The audit sweeps the case registry along the axes where LLA kernels break
(SPEC 7): the spread of Sigma_i's spectrum (``spectrum``, kappa 1 to 1e8), the
bandwidth against the ridge (``bandwidth``, scale 1e-4 to 1e2 by lambda 1e-3 to
10, one grid that is both the scale sweep and the heatmap), lambda alone
(``gaussian`` and the per-query ``lambda_decades``), one cell for every other
family, and a few awkward shapes. Each cell is one ``Case``: built, run through the
implementation, judged by ``budget.check_forward`` (and ``budget.check_backward``
when it exists and the implementation has gradients). The audit owns no oracle
and no tolerance: the verdicts, ratios and attributions are the budget module's.

A failing cell is replayed by the one-line ``lla-verify check --case SPEC`` that
the report prints beside it.

Exit status (both commands): 0 every cell within budget and no regression,
1 otherwise, 2 usage error (bad argument, unknown or unavailable implementation).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass

from lla_verify.cliutil import UsageError, check_device, check_out_dir, one_line, seed_type

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
SCHEMA = "lla-verify-audit/1"
# A cell regresses against a baseline when its ratio grew by more than this factor
# and is above REGRESSION_FLOOR: ratios below half the budget move with rounding
# noise (a different BLAS, thread count or GPU) and say nothing about the kernel.
REGRESSION_FACTOR = 2.0
REGRESSION_FLOOR = 0.5
QUERY_SAMPLES = 96  # per-query points kept per cell in report.json, for the plots
COTANGENT_SEED = 1234  # the fixed cotangent of the backward check
# The backward check differentiates the float64 oracle (four times) and the dense
# fp32 reference through autograd, which keeps every pairwise (S, S, D) tensor alive:
# above this S * S * D (about 1 GiB per float64 pairwise tensor) it would not fit
# beside the kernel (nor in a five-minute --full run), so larger cells check the
# forward only, and say so.
BACKWARD_MAX_WORK = 1024 * 1024 * 64




# ------------------------------------------------------------------ the cells
@dataclass(frozen=True)
class Cell:
    sweep: str  # "kappa" | "scale-lambda" | "lambda" | "family" | "shape"
    case: object  # cases.Case
    # why this cell's gradients are not checked even when the implementation has them
    # (None: checked); the quick audit checks float32 gradients only, to stay in minutes
    no_grad: str | None = None


# Adversarial but not absurd settings for the families that get one cell each:
# each sits where its family's trouble starts (SPEC 7), not at its extreme.
FAMILY_CELLS = {
    "subspace": {"rank": 2, "noise": 1e-3, "lam": 1e-6},
    "clusters": {"clusters": 2, "spread": 1e-3, "lam": 1e-4},
    "duplicates": {"pool": 4, "lam": 1e-4},
    "early": {"lam": 1e-6},
    "offset": {"offset": 1e3, "lam": 1.0},
    "large_norm": {"factor": 1e2, "lam": 1.0},
    "linear_values": {"lam": 1e-8},
}

KAPPAS_QUICK = (1.0, 1e2, 1e4, 1e6, 1e8)
KAPPAS_FULL = tuple(10.0**e for e in range(9))
# The quick grid and lambda sweep are thinned to every other decade: through the
# Triton interpreter a cell with its gradient check costs seconds on two cores.
SCALES_QUICK = (1e-4, 1e-2, 1.0, 1e1, 1e2)
SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)
GRID_LAMS_QUICK = (1e-3, 1e-1, 1.0)
GRID_LAMS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
LAMS_QUICK = (1e-3, 1e-1, 10.0, 100.0)
LAMS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DECADES = ({"lam_lo": 1e-4, "decades": 6.0}, {"lam_lo": 1e-2, "decades": 2.0})


def _dtypes(impl, full: bool) -> list[str]:
    import torch

    want = ["float32", "bfloat16"] + (["float16"] if full else [])
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    have = {names[d] for d in impl.dtypes if d in names}
    return [d for d in want if d in have]


def plan(impl, *, full: bool = False, seed: int = 0) -> tuple[list[Cell], list[dict]]:
    """The cells of a quick or full audit for ``impl``, and the skipped ones with reasons.

    Quick: S <= 48, D = 16 (the smallest head dim the Triton kernel takes), about
    a hundred cells, minutes on two CPU cores even through the Triton interpreter.
    Full: GPU sizes, S from 1 to 4096 (non-multiples of the tile sizes included),
    D = 64 and 128, about 150 cells.
    """
    from lla_verify.registry.cases import Case, DTYPES

    cells: list[Cell] = []
    skipped: list[dict] = []
    dts = _dtypes(impl, full)
    if not dts:
        skipped.append({"spec": "*", "reason": f"{impl.name} accepts neither float32 nor bfloat16"})
        return cells, skipped

    def add(sweep, family, params, *, S, D, dtype, B=1, H=1):
        case = Case(family=family, params=dict(params), B=B, H=H, S=S, D=D, dtype=dtype, seed=seed)
        reason = impl.supports(dtype=DTYPES[dtype], head_dim=D)
        if reason is None and family == "lambda_decades" and not impl.per_query_lambda:
            reason = f"{impl.name} takes no per-query lambda"
        no_grad = None
        if not full and dtype != "float32":
            no_grad = "not checked: --quick checks gradients on float32 cells only (--full checks every dtype)"
        elif not full and (params.get("rotate") == 0 or (family == "bandwidth" and params.get("lam") == 0.1)):
            # each backward check through the Triton interpreter costs seconds: the
            # rotated spectrum and the grid's outer lambda rows keep the hard ones
            no_grad = "not checked: --quick thins gradient checks (axis-aligned kappa, grid row lambda 0.1)"
        if reason is None:
            cells.append(Cell(sweep, case, no_grad))
        else:
            skipped.append({"spec": case.spec(), "sweep": sweep, "reason": reason})

    if not full:
        D = 16
        for dt in dts:
            # the axis-aligned spectrum is float32's; bfloat16 gets the rotated one only
            # (high-kappa cells run CG to its cap, the costliest cells of the sweep)
            for rot in ((0, 1) if dt == dts[0] else (1,)):
                for kap in KAPPAS_QUICK:
                    add("kappa", "spectrum", {"kappa": kap, "rotate": rot}, S=48, D=D, dtype=dt)
        for dt in dts:
            for lam in (GRID_LAMS_QUICK if dt == "float32" else (1.0,)):
                for s in SCALES_QUICK:
                    add("scale-lambda", "bandwidth", {"scale": s, "lam": lam}, S=33, D=D, dtype=dt)
        for dt in dts:
            for lam in LAMS_QUICK:
                add("lambda", "gaussian", {"lam": lam}, S=40, D=D, dtype=dt)
            for p in DECADES:
                add("lambda", "lambda_decades", p, S=40, D=D, dtype=dt)
        for dt in dts:
            for fam, p in FAMILY_CELLS.items():
                add("family", fam, p, S=48, D=D, dtype=dt)
        for S, D2, B, H in ((1, 16, 1, 1), (7, 16, 1, 1), (17, 16, 2, 3), (31, 32, 1, 1), (47, 16, 1, 1)):
            add("shape", "gaussian", {"lam": 1.0}, S=S, D=D2, dtype=dts[0], B=B, H=H)
        if dts[-1] != dts[0]:
            add("shape", "gaussian", {"lam": 1.0}, S=17, D=16, dtype=dts[-1], B=2, H=3)
        return cells, skipped

    for dt in dts[:2]:
        for rot in (0, 1):
            for kap in KAPPAS_FULL:
                add("kappa", "spectrum", {"kappa": kap, "rotate": rot}, S=1000, D=64, dtype=dt)
        for kap in (1.0, 1e4, 1e8):
            add("kappa", "spectrum", {"kappa": kap, "rotate": 1}, S=1000, D=128, dtype=dt)
    for dt in dts[:2]:
        for lam in (GRID_LAMS if dt == "float32" else (1.0,)):
            for s in SCALES:
                add("scale-lambda", "bandwidth", {"scale": s, "lam": lam}, S=1000, D=64, dtype=dt)
    for dt in dts:
        for lam in LAMS:
            add("lambda", "gaussian", {"lam": lam}, S=2047, D=64, dtype=dt)
        for p in DECADES:
            add("lambda", "lambda_decades", p, S=2047, D=64, dtype=dt)
    for dt in dts[:2]:
        for D in (64, 128):
            for fam, p in FAMILY_CELLS.items():
                add("family", fam, p, S=1000, D=D, dtype=dt)
    for S, D, B, H in ((1, 64, 1, 1), (63, 64, 2, 3), (1000, 128, 1, 1), (2048, 64, 1, 1), (2048, 128, 1, 1),
                       (4096, 64, 1, 1), (4096, 128, 1, 1)):
        add("shape", "gaussian", {"lam": 1.0}, S=S, D=D, dtype=dts[0], B=B, H=H)
    if len(dts) > 1:
        for S, D in ((4096, 64), (4095, 128)):
            add("shape", "gaussian", {"lam": 1.0}, S=S, D=D, dtype=dts[1])
    return cells, skipped


# ------------------------------------------------------------------ one cell
def repro_command(spec: str, impl_name: str, device: str, backward: bool = False) -> str:
    cmd = f"lla-verify check --case {shlex.quote(spec)} --impl {shlex.quote(impl_name)} --device {device}"
    return cmd + (" --backward" if backward else "")


def _f(x) -> float | None:
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

    from lla_verify import budget

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


def _cell_record(cell: Cell, impl, device: str, *, backward: bool, impl_name: str | None) -> dict:
    case = cell.case
    spec = case.spec()
    return {"spec": spec, "sweep": cell.sweep, "family": case.family, "params": dict(case.params),
            "dtype": case.dtype, "B": case.B, "H": case.H, "S": case.S, "D": case.D, "seed": case.seed,
            "command": repro_command(spec, impl_name or impl.name, device, backward=backward and impl.supports_grad)}


def run_cell_isolated(worker, cell: Cell, impl, device: str, *, backward: bool = True,
                      impl_name: str | None = None) -> dict:
    """run_cell in ``worker``'s child process (in this one when ``worker`` is None): an
    implementation that ends its process, crashes it or hangs fails this cell only."""
    from lla_verify.trust import ChildFailed, run_isolated

    try:
        return run_isolated(worker, run_cell, cell, impl, device, backward=backward, impl_name=impl_name)
    except ChildFailed as exc:
        rec = _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)
        return failed_record(rec, f"[{impl_name or impl.name}] {exc} on {rec['spec']}")


def run_cell(cell: Cell, impl, device: str, *, backward: bool = True, impl_name: str | None = None) -> dict:
    """Build, run, time and judge one cell; every number lands in the returned record."""
    import torch

    from lla_verify.budget import check_forward

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
        err_max=_f(v.summary.get("err_max")), kappa_max=_f(v.summary.get("kappa_max")),
        kappa_worst=_f(v.summary.get("kappa_worst")),
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
    g = rec["grad"]
    grad_ok = g.get("passed", True)
    rec["passed"] = bool(v.passed) and bool(grad_ok)
    if "ratio" in g:
        # the cell's ratio is its worst check, so sorting and the verdict see gradient failures too
        rec["ratio"] = max(rec["forward_ratio"], g["ratio"], key=lambda x: math.inf if math.isnan(x) else x)
    if v.passed and not grad_ok:
        rec["cause"] = g.get("cause", "implementation")
    rec["failed_checks"] = [n for n, ok in (("forward", v.passed), ("backward", grad_ok)) if not ok]
    return rec


# ------------------------------------------------------------------ baseline
def _num(x) -> float:
    """Ratios are stored as numbers, or as 'inf'/'nan' strings (strict JSON has neither)."""
    return float(x) if x is not None else math.nan


def _show(x) -> str:
    from lla_verify.audit.report import _r

    return _r(x)


def read_report(path: str, flag: str) -> dict:
    """An audit report.json whose cells are well formed and consistent (``check_cell``),
    or a UsageError naming ``flag``, the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{flag}: cannot read {path!r}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag}: cannot read {path!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"{flag}: cannot read {path!r} as JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise UsageError(f"{flag}: {path!r} is not an audit report.json (no 'cells' list)")
    if data.get("schema") != SCHEMA:
        raise UsageError(f"{flag}: {path!r} has schema {data.get('schema')!r}, expected {SCHEMA!r}")
    for n, cell in enumerate(data["cells"]):
        check_cell(cell, f"{flag}: {path!r} cell {n}")
    return data


def _ratio_of(x, where: str) -> float:
    """A stored ratio: a number >= 0 (NaN allowed), or the strings 'inf' / 'nan'."""
    if isinstance(x, str) and x in ("inf", "nan"):
        return float(x)
    if isinstance(x, (int, float)) and not isinstance(x, bool) and not x < 0:
        return float(x)
    raise UsageError(f"{where}: expected a ratio (a number >= 0, 'inf' or 'nan'), got {x!r}")


def check_cell(c, where: str) -> None:
    """UsageError unless ``c`` is a well-formed cell record whose ``passed`` agrees with
    its ratios: a passing cell has every ratio within the threshold and every check
    passed, and its ratio is its worst check's. (A cell may fail with a ratio within
    the threshold: failing is never the forgery that matters.)"""
    from lla_verify.budget import THRESHOLD
    from lla_verify.registry.cases import parse_case
    from lla_contract import LLAInputError

    def _over(r: float) -> bool:
        return not r <= THRESHOLD  # NaN is over

    if not isinstance(c, dict):
        raise UsageError(f"{where}: expected a cell object, got {type(c).__name__}")
    spec = c.get("spec")
    if not isinstance(spec, str):
        raise UsageError(f"{where}: no case spec")
    try:
        parse_case(spec)
    except LLAInputError as exc:
        raise UsageError(f"{where}: spec {spec!r} is not a case: {exc}") from None
    where = f"{where} ({spec})"
    for key in ("command", "cause"):  # the summary prints both beside a failing or the worst cell
        if not isinstance(c.get(key), str):
            raise UsageError(f"{where}: '{key}' must be a string, got {c.get(key)!r}")
    if not isinstance(c.get("passed"), bool):
        raise UsageError(f"{where}: 'passed' must be true or false, got {c.get('passed')!r}")
    ratio = _ratio_of(c.get("ratio"), f"{where} ratio")
    checks = []  # (name, ratio, passed) of each recorded check
    if "forward_ratio" in c or "forward_passed" in c:
        fp = c.get("forward_passed")
        if not isinstance(fp, bool):
            raise UsageError(f"{where}: 'forward_passed' must be true or false, got {fp!r}")
        checks.append(("forward", _ratio_of(c.get("forward_ratio"), f"{where} forward_ratio"), fp))
    g = c.get("grad")
    if g is not None and not isinstance(g, dict):
        raise UsageError(f"{where}: 'grad' must be an object, got {type(g).__name__}")
    if isinstance(g, dict) and g.get("status") == "checked":
        gp = g.get("passed")
        if not isinstance(gp, bool):
            raise UsageError(f"{where}: grad 'passed' must be true or false, got {gp!r}")
        checks.append(("gradient", _ratio_of(g.get("ratio"), f"{where} grad ratio"), gp))
    for name, r, ok in checks:
        if ok and _over(r):
            raise UsageError(f"{where}: {name} check marked passed with ratio {_show(r)} > {THRESHOLD:g}")
        if not (ratio >= r or math.isnan(ratio)):
            raise UsageError(f"{where}: ratio {_show(ratio)} is below its {name} ratio {_show(r)}")
    if c["passed"]:
        if _over(ratio):
            raise UsageError(f"{where}: marked passed with ratio {_show(ratio)} > {THRESHOLD:g}")
        failed = [name for name, _, ok in checks if not ok]
        if failed:
            raise UsageError(f"{where}: marked passed with a failed {' and '.join(failed)} check")


def load_baseline(path: str) -> list[dict]:
    """The cells of a baseline report.json, validated; each case spec once."""
    cells = read_report(path, "--baseline")["cells"]
    seen = set()
    for c in cells:
        if c["spec"] in seen:
            raise UsageError(f"--baseline: {path!r} holds {c['spec']} twice")
        seen.add(c["spec"])
    return cells


def check_baseline_matches(specs, baseline: list[dict], path: str) -> None:
    """A baseline that matches none of the cells compares nothing: a usage error, not a pass."""
    have = {c["spec"] for c in baseline}
    specs = list(specs)
    if specs and not any(s in have for s in specs):
        raise UsageError(f"--baseline: {path!r} matches none of the {len(specs)} cells (another mode, seed or "
                         f"sizes?)")


def plan_digest(specs) -> str:
    """A fingerprint of the planned cells, in plan order: --merge checks a complete
    merge against it, so a slice's edited plan_size cannot make a part pass for the whole."""
    import hashlib

    return hashlib.sha256("\n".join(specs).encode()).hexdigest()


def compare(cells: list[dict], baseline: list[dict], *, factor: float = REGRESSION_FACTOR,
            floor: float = REGRESSION_FLOOR) -> tuple[list[dict], dict]:
    """Regressions of ``cells`` against ``baseline``, matched by case spec.

    A regression: a cell that passed in the baseline and fails now, or a ratio
    (forward or gradient) that grew by more than ``factor`` to above ``floor``.
    Returns the regressions and counts of matched, new and vanished cells.
    """
    base = {c["spec"]: c for c in baseline if "spec" in c}
    regs = []
    matched = 0
    for c in cells:
        b = base.get(c["spec"])
        if b is None:
            continue
        matched += 1
        fwd = lambda r: _num(r.get("forward_ratio", r.get("ratio")))  # noqa: E731
        pairs = [("forward", fwd(c), fwd(b))]
        cg, bg = c.get("grad") or {}, b.get("grad") or {}
        if "ratio" in cg and "ratio" in bg:
            pairs.append(("gradient", _num(cg["ratio"]), _num(bg["ratio"])))
        why = []
        if b.get("passed") and not c.get("passed"):
            why.append("newly failing")
        for what, new, old in pairs:
            grew = new > floor and (new > factor * old or (math.isnan(old) and not math.isnan(new)))
            if grew or (math.isnan(new) and not math.isnan(old)):
                why.append(f"{what} ratio {old:.3g} -> {new:.3g}")
        if why:
            regs.append({"spec": c["spec"], "ratio": c.get("ratio"), "baseline_ratio": b.get("ratio"),
                         "passed": c.get("passed"), "baseline_passed": b.get("passed"),
                         "why": "; ".join(why), "command": c.get("command")})
    specs = {c["spec"] for c in cells}
    info = {"matched": matched, "new": len(cells) - matched, "missing": sum(1 for s in base if s not in specs)}
    return regs, info


# ------------------------------------------------------------------ the audit
@dataclass
class AuditResult:
    report: dict
    exit_code: int


def _verdict(cells: list[dict], regressions: list[dict], interrupted: str | None = None) -> dict:
    failed = [c for c in cells if not c.get("passed")]
    finite = [c for c in cells if c.get("ratio") is not None]
    worst = max(finite, key=lambda c: _num(c["ratio"]) if not math.isnan(_num(c["ratio"])) else math.inf,
                default=None)
    grads = [c["grad"] for c in cells if (c.get("grad") or {}).get("status") == "checked"]
    unchecked: dict[str, int] = {}
    for c in cells:
        st = (c.get("grad") or {}).get("status", "not checked")
        if st != "checked":
            # a reason's cell-specific tail (sizes, the case spec) is cut so that like reasons group
            key = re.sub(r" on [a-z_]+:\S*", "", st).split(" (")[0]
            unchecked[key] = unchecked.get(key, 0) + 1
    beyond = [c for c in cells if (c.get("grad") or {}).get("n_beyond_precision")]
    n_rows = sum(c["grad"]["n_beyond_precision"] for c in beyond)
    beyond_note = (f"; {len(beyond)} checked cells have rows beyond the compute precision (kappa u_c >= 1), "
                   f"{n_rows} query rows held to no budget (a NaN still fails)" if beyond else "")
    return {
        "passed": not failed and not regressions and not interrupted,
        "interrupted": interrupted,
        "n_cells": len(cells), "n_failed": len(failed), "n_regressions": len(regressions),
        "worst_ratio": worst["ratio"] if worst else None, "worst_spec": worst["spec"] if worst else None,
        "worst_command": worst["command"] if worst else None,
        "causes": {k: sum(1 for c in failed if c.get("cause") == k) for k in sorted({c.get("cause") for c in failed})},
        "gradients_checked": len(grads),
        "gradients_unchecked": unchecked,
        "gradients_note": (f"gradients checked on {len(grads)} of {len(cells)} cells"
                           + "".join(f"; {n} {why}" for why, n in unchecked.items()) + beyond_note),
        "gradients_beyond_precision": len(beyond),
    }


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def metadata(impl, device: str, mode: str, command: str, seed: int) -> dict:
    from lla_verify.commands.info import collect

    try:
        versions = collect()
    except Exception as exc:  # versions are context, never a reason to lose the audit
        versions = {"error": str(exc)}
    return {"impl": impl.name, "impl_description": impl.description, "device": device, "mode": mode,
            "seed": seed, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "versions": versions, "solver_tol": impl.solver_tol,
            "compute_dtype": str(impl.compute_dtype).replace("torch.", ""),
            # what the implementation rounds its inputs to and which gradients it is judged on
            "input_dtype": str(impl.input_dtype).replace("torch.", "") if impl.input_dtype else None,
            "grads": list(impl.grads) if impl.supports_grad else [],
            "grads_not_checked": {n: impl.skip_reason(n) for n in ("dq", "dk", "dv", "dlambda")
                                  if impl.supports_grad and n not in impl.grads},
            "regression_rule": f"forward or gradient ratio grew more than x{REGRESSION_FACTOR:g} to above "
                               f"{REGRESSION_FLOOR:g}, or a cell newly failing"}


def run_audit(impl, cells: list[Cell], *, device: str = "cpu", backward: bool = True,
              baseline: list[dict] | None = None, out: str | None = None, meta: dict | None = None,
              skipped: list[dict] | None = None, progress: bool = False, impl_name: str | None = None,
              log=None, factor: float = REGRESSION_FACTOR, floor: float = REGRESSION_FLOOR,
              isolate: bool = True, cell_timeout: float | None = None) -> AuditResult:
    """Run ``cells`` on ``impl``; write report.json and report.html into ``out`` when given.

    With ``isolate`` (the default) the cells run one after another in a child process
    (trust.Worker), so that an implementation that exits, crashes or hangs fails its cell
    and the sweep goes on; ``cell_timeout`` bounds each of its calls (seconds, default
    trust.DEFAULT_CALL_TIMEOUT). An implementation that cannot be pickled (a closure)
    runs in this process, behind the same boundary but without those two protections.
    """
    from tqdm import tqdm

    from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

    t0 = time.perf_counter()
    records = []
    # in a log (no terminal) a redraw every 0.1 s would bury the FAIL lines
    bar = tqdm(cells, desc=f"audit {impl_name or impl.name}", unit="cell", disable=not progress, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    interrupted = None
    worker = None
    if isolate and picklable(impl, cells):
        worker = Worker(cell_timeout if cell_timeout is not None else DEFAULT_CALL_TIMEOUT)
    elif isolate and log is not None:
        print(f"lla-verify audit: {impl_name or impl.name} cannot be pickled into a worker process; its cells run "
              "in this one (no protection against exit or hang)", file=log)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.case.family, refresh=False)
            rec = run_cell_isolated(worker, cell, impl, device, backward=backward, impl_name=impl_name)
            records.append(rec)
            if not rec["passed"] and log is not None:
                tqdm.write(f"FAIL {'+'.join(rec.get('failed_checks', []))} ratio {_show(rec['ratio'])} "
                           f"({rec['cause']}) {rec['spec']}", file=log)
    except KeyboardInterrupt:
        # Ctrl-C or a scheduler's SIGTERM: the cells done so far are evidence worth keeping;
        # the report says it is partial and the verdict cannot pass
        bar.close()
        interrupted = f"interrupted after {len(records)} of {len(cells)} cells"
        if log is not None:
            print(f"lla-verify audit: {interrupted}; writing a partial report", file=log)
    finally:
        if worker is not None:
            worker.close()
    regressions, binfo = (compare(records, baseline, factor=factor, floor=floor) if baseline is not None
                          else ([], None))
    report = {
        "schema": SCHEMA,
        "meta": dict(meta or {}, wall_s=time.perf_counter() - t0, interrupted=interrupted),
        "verdict": _verdict(records, regressions, interrupted=interrupted),
        "regressions": regressions,
        "baseline": binfo,
        "skipped": skipped or [],
        "cells": records,
    }
    report = _jsonable(report)
    if out:
        from lla_verify.audit.report import write_reports

        write_reports(report, out)
    return AuditResult(report, EXIT_OK if report["verdict"]["passed"] else EXIT_FAIL)


def summary_lines(report: dict, *, top: int = 5) -> list[str]:
    """The stdout summary: regressions first, then the verdict, failures, worst cells."""
    from lla_verify.audit.report import wall_text

    v = report["verdict"]
    lines = []
    regs = report.get("regressions") or []
    if regs:
        lines.append(f"REGRESSIONS against the baseline: {len(regs)}")
        for r in regs:
            lines.append(f"  {r['why']}: {r['spec']}")
            lines.append(f"    {r['command']}")
    meta = report.get("meta", {})
    head = "PASS" if v["passed"] else "FAIL"
    lines.append(f"{head}: {v['n_failed']} out of {v['n_cells']} cells failed to pass the threshold (ratio > 1)"
                 f"{'; ' + str(len(regs)) + ' regressions' if regs else ''} "
                 f"[impl {meta.get('impl')}, device {meta.get('device')}, {meta.get('mode')}, "
                 f"{wall_text(meta)}]")
    if v.get("interrupted"):
        lines.append(f"INCOMPLETE: {v['interrupted']} (a partial audit never passes)")
    if meta.get("cells_slice") and not meta.get("merged_from"):
        lines.append(f"slice {meta['cells_slice']} of a {meta.get('plan_size')}-cell plan: this verdict covers "
                     f"its cells only; the audit's is the merge of every slice (lla-verify audit --merge)")
    if v.get("worst_spec"):
        lines.append(f"worst ratio {_show(v['worst_ratio'])} at {v['worst_spec']}")
    failed = [c for c in report["cells"] if not c.get("passed")]
    for c in sorted(failed, key=lambda c: -_num(c["ratio"]) if not math.isnan(_num(c["ratio"])) else -math.inf):
        lines.append(f"  FAIL {'+'.join(c.get('failed_checks', []))} ratio {_show(c['ratio'])} "
                     f"cause {c['cause']}: {c['spec']}")
        lines.append(f"    {c['command']}")
    if v.get("gradients_note"):
        lines.append(v["gradients_note"])
    if report.get("skipped"):
        lines.append(f"{len(report['skipped'])} cells skipped (reasons in report.json)")
    return lines


# ------------------------------------------------------------------ command line
def _resolve(impl_spec: str, device: str):
    """The Impl record, after the environment it needs; UsageError when it cannot run."""
    import torch

    from lla_verify.registry.impls import get_impl, is_available
    from lla_contract import LLAInputError

    check_device(device)
    if impl_spec == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.jit decides compiled vs interpreted when lla_triton is imported, so the
        # variable must be set before that import; a process that already imported it
        # compiled would need a fresh interpreter.
        if "lla_triton" in sys.modules:
            raise UsageError("--impl triton on cpu: lla_triton was imported before TRITON_INTERPRET=1 could be set; "
                             "rerun as TRITON_INTERPRET=1 lla-verify ...")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        impl = get_impl(impl_spec)
    except LLAInputError as exc:
        raise UsageError(str(exc).replace("--lla-impl", "--impl")) from None
    why = is_available(impl, device)
    if why:
        hint = "" if impl_spec == "torch-fp32" else " (--impl torch-fp32 runs everywhere)"
        raise UsageError(f"--impl {impl_spec}: not available on {device}: {why}{hint}")
    return impl


def _command_line(args, full: bool, device: str) -> str:
    """The audit's own invocation, rebuilt from the parsed arguments (argv may be a test's list)."""
    parts = ["lla-verify", "audit", "--impl", args.impl, "--device", device, "--full" if full else "--quick",
             "--seed", str(args.seed), "--out", args.out]
    for s in args.only or ():
        parts += ["--only", s]
    if args.baseline:
        parts += ["--baseline", args.baseline]
        if args.regression_factor != REGRESSION_FACTOR or args.regression_floor != REGRESSION_FLOOR:
            parts += ["--regression-factor", f"{args.regression_factor:g}",
                      "--regression-floor", f"{args.regression_floor:g}"]
    if args.no_backward:
        parts.append("--no-backward")
    if args.max_cells is not None:
        parts += ["--max-cells", str(args.max_cells)]
    if args.cells:
        parts += ["--cells", args.cells]
    if getattr(args, "cell_timeout", None) is not None:
        parts += ["--cell-timeout", f"{args.cell_timeout:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def _cell_slice(text: str, n: int) -> slice:
    """--cells START:STOP, a Python slice of the plan (which is deterministic for a seed)."""
    m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", text)
    if not m:
        raise UsageError(f"--cells: expected START:STOP (e.g. 62: or 0:40), got {text!r}")
    sl = slice(int(m[1]) if m[1] else None, int(m[2]) if m[2] else None)
    if not range(n)[sl]:
        raise UsageError(f"--cells: {text!r} selects no cell of the {n} planned")
    return sl


def _sigterm_as_interrupt(signum, frame):
    from lla_verify.trust import user_interrupt

    user_interrupt(signum, frame)  # marked as the user's: the trust boundary lets it stop the run


MERGE_KEYS = ("impl", "device", "mode", "seed", "only", "plan_size", "plan_digest")


def _slice_indices(rep: dict, path: str) -> list[int]:
    """The plan positions of a slice's cell records, checked against its meta."""
    meta = rep["meta"]
    where = f"--merge: {path!r}"
    size, idx = meta.get("plan_size"), meta.get("cell_indices")
    if not isinstance(meta.get("plan_digest"), str) or not isinstance(idx, list):
        raise UsageError(f"{where} has no meta.plan_digest or meta.cell_indices: not a slice this lla-verify "
                         f"can check (rerun it)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UsageError(f"{where}: meta.plan_size must be an integer >= 1, got {size!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in idx) \
            or any(a >= b for a, b in zip(idx, idx[1:])):
        raise UsageError(f"{where}: meta.cell_indices must be increasing plan positions in [0, {size})")
    sl = meta.get("cells_slice")
    if sl is not None:
        allowed = set(range(size)[_cell_slice(str(sl), size)]) if isinstance(sl, str) else set()
        if not set(idx) <= allowed:
            raise UsageError(f"{where}: meta.cell_indices lie outside its slice {sl!r} of {size} cells")
    n = len(rep["cells"])
    if n > len(idx) or (n < len(idx) and not meta.get("interrupted")):
        raise UsageError(f"{where} holds {n} cells where meta.cell_indices names {len(idx)}"
                         f"{'' if n > len(idx) else ' and it was not interrupted'}")
    return idx[:n]  # an interrupted slice ran the first of its cells


def merge_reports(paths: list[str], command: str = "", *, baseline: list[dict] | None = None,
                  factor: float = REGRESSION_FACTOR, floor: float = REGRESSION_FLOOR,
                  baseline_path: str = "") -> dict:
    """One report from the slices of one plan (``--cells``), e.g. run on several calls or
    machines. Each slice is validated (schema, cells, passed against ratio), the slices
    must share implementation, device, mode, seed and plan (size and digest), and no plan
    position may be in two slices. The merge is complete, and can pass, only when every
    planned cell is in it, and then its cells must be the plan its digest names. With
    ``baseline`` the merged cells are compared with it (a slice's own comparison sees
    only its cells, so its 'missing' count is wrong)."""
    reps = [read_report(path, "--merge") for path in paths]
    for path, rep in zip(paths, reps):
        if not isinstance(rep.get("meta"), dict):
            raise UsageError(f"--merge: {path!r} has no 'meta' object: not the report.json of an audit slice")
        if not isinstance(rep.get("regressions") or [], list) or not all(
                isinstance(r, dict) and isinstance(r.get("spec"), str) and isinstance(r.get("why"), str)
                for r in rep.get("regressions") or []):
            raise UsageError(f"--merge: {path!r} has a malformed 'regressions' list")
    first = reps[0]["meta"]
    for path, rep in zip(paths[1:], reps[1:]):
        for key in MERGE_KEYS:
            if rep["meta"].get(key) != first.get(key):
                raise UsageError(f"--merge: {path!r} has {key}={rep['meta'].get(key)!r} where {paths[0]!r} has "
                                 f"{first.get(key)!r}: not slices of one audit")
    by_index, specs, seen, regressions = {}, {}, set(), []
    for path, rep in zip(paths, reps):
        for i, c in zip(_slice_indices(rep, path), rep["cells"]):
            if i in by_index:
                raise UsageError(f"--merge: plan position {i} is in two slices ({specs[i]} and {path!r}): "
                                 f"slices overlap (drop one of the two)")
            if c["spec"] in seen:
                raise UsageError(f"--merge: {c['spec']} appears at two plan positions")
            by_index[i], specs[i] = c, path
            seen.add(c["spec"])
        regressions += [r for r in rep.get("regressions") or [] if r not in regressions]
    cells = [by_index[i] for i in sorted(by_index)]
    plan_size = first["plan_size"]
    interrupted = None
    if len(cells) < plan_size:
        interrupted = f"merged {len(cells)} of {plan_size} planned cells"
    elif plan_digest(c["spec"] for c in cells) != first["plan_digest"]:
        raise UsageError(f"--merge: the {len(cells)} merged cells are not the plan the slices name "
                         f"(meta.plan_digest differs): a slice was edited or comes from another plan")
    binfo = None
    if baseline is not None:
        check_baseline_matches([c["spec"] for c in cells], baseline, baseline_path)
        regressions, binfo = compare(cells, baseline, factor=factor, floor=floor)
    meta = dict(first, merged_from=list(paths), cells_slice=None, cells_start=None,
                cell_indices=sorted(by_index),
                wall_s=sum(float(r["meta"].get("wall_s") or 0) for r in reps if _is_number(r["meta"].get("wall_s"))),
                interrupted=interrupted, command=command or first.get("command"))
    return _jsonable({"schema": SCHEMA, "meta": meta, "verdict": _verdict(cells, regressions, interrupted=interrupted),
                      "regressions": regressions, "baseline": binfo, "skipped": reps[0].get("skipped") or [],
                      "cells": cells})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _merge_main(args) -> int:
    command = "lla-verify audit --merge " + " ".join(shlex.quote(p) for p in args.merge) + (
        f" --baseline {shlex.quote(args.baseline)}" if args.baseline else "") + (
        f" --out {shlex.quote(args.out)}" if args.out else "")
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.out:
        check_out_dir(args.out)
    report = merge_reports(args.merge, command, baseline=baseline, factor=args.regression_factor,
                           floor=args.regression_floor, baseline_path=args.baseline or "")
    if args.out:
        from lla_verify.audit.report import write_reports

        write_reports(report, args.out)
    return _print_summary(report, args.out)


def _print_summary(report: dict, out: str | None) -> int:
    """The stdout summary of a written report; returns its exit status."""
    for line in summary_lines(report):
        print(line)
    if out:
        print(f"report: {os.path.join(out, 'report.html')} and report.json")
    return EXIT_OK if report["verdict"]["passed"] else EXIT_FAIL


def _audit_main(args) -> int:
    import signal

    if not args.regression_factor >= 1.0:
        raise UsageError(f"--regression-factor: must be >= 1, got {args.regression_factor}")
    if not args.regression_floor >= 0.0:
        raise UsageError(f"--regression-floor: must be >= 0, got {args.regression_floor}")
    if args.merge:
        return _merge_main(args)

    # a batch scheduler's timeout (SIGTERM) ends the sweep like Ctrl-C: with a partial report
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    full = bool(args.full)
    device = args.device if args.device is not None else ("cuda" if full else "cpu")
    if args.max_cells is not None and args.max_cells < 1:
        raise UsageError(f"--max-cells: must be >= 1, got {args.max_cells}")
    baseline = load_baseline(args.baseline) if args.baseline else None
    impl = _resolve(args.impl, device)
    if args.out:
        check_out_dir(args.out)  # before the sweep: a bad --out found after it loses the run
    cells, skipped = plan(impl, full=full, seed=args.seed)
    if args.only:
        cells = [c for c in cells if any(s in c.case.spec() for s in args.only)]
        if not cells:
            raise UsageError(f"--only: no cell matches {args.only}")
    plan_size = len(cells)
    digest = plan_digest(c.case.spec() for c in cells)
    indices = list(range(plan_size))
    if args.cells:
        indices = indices[_cell_slice(args.cells, plan_size)]
    if args.max_cells is not None and len(indices) > args.max_cells:
        # evenly spaced, so every sweep keeps a few cells
        step = len(indices) / args.max_cells
        indices = [indices[int(i * step)] for i in range(args.max_cells)]
    cells = [cells[i] for i in indices]
    cells_start = indices[0]
    if baseline is not None:
        check_baseline_matches([c.case.spec() for c in cells], baseline, args.baseline)
    from lla_contract import LLAInputError

    for c in cells:
        try:
            c.case.check_fits(device)
        except LLAInputError as exc:
            raise UsageError(f"cell {c.case.spec()}: {str(exc).removeprefix('case: ')} (--only or --cells "
                             f"leave it out)") from None
    command = _command_line(args, full, device)
    meta = metadata(impl, device, "full" if full else "quick", command, args.seed)
    meta["impl"] = args.impl
    meta["plan_size"] = plan_size  # cells planned before --cells: what --merge checks completeness against
    meta["plan_digest"] = digest  # and what a complete merge's cells must hash to
    meta["cell_indices"] = indices  # the plan position of each cell run, in order
    meta["only"] = list(args.only or [])
    meta["cells_slice"] = args.cells or None
    meta["cells_start"] = cells_start  # the slice's first plan position: --merge orders by it
    meta["regression_rule"] = (f"forward or gradient ratio grew more than x{args.regression_factor:g} to above "
                               f"{args.regression_floor:g}, or a cell newly failing")
    print(f"lla-verify audit: {len(cells)} cells on {args.impl} ({device}, {'full' if full else 'quick'})"
          f"{', ' + str(len(skipped)) + ' skipped' if skipped else ''}", file=sys.stderr)
    res = run_audit(impl, cells, device=device, backward=not args.no_backward, baseline=baseline, out=args.out,
                    meta=meta, skipped=skipped, progress=not args.no_progress, impl_name=args.impl, log=sys.stderr,
                    factor=args.regression_factor, floor=args.regression_floor,
                    cell_timeout=_cell_timeout(args))
    return _print_summary(res.report, args.out)


def _check_main(args) -> int:
    from lla_verify.registry.cases import DTYPES, parse_case
    from lla_contract import LLAInputError

    try:
        case = parse_case(args.case)
    except LLAInputError as exc:
        raise UsageError(f"--case: {str(exc).removeprefix('case: ')}") from None
    impl = _resolve(args.impl, args.device)
    reason = impl.supports(dtype=DTYPES[case.dtype], head_dim=case.D)
    if reason:
        raise UsageError(f"--case: {reason}")
    from lla_verify.trust import Worker, picklable

    try:
        case.check_fits(args.device)
        case.build(args.device)  # a case that cannot be built is the user's error, said here
    except LLAInputError as exc:
        raise UsageError(f"--case: {str(exc).removeprefix('case: ')}") from None
    cell = Cell("check", case)
    worker = Worker(_cell_timeout(args)) if picklable(impl, cell) else None
    try:
        # in a child process: an implementation that exits or hangs fails the check, it does not end it
        rec = run_cell_isolated(worker, cell, impl, args.device, backward=args.backward, impl_name=args.impl)
    except LLAInputError as exc:
        raise UsageError(f"--case: {exc}") from None
    finally:
        if worker is not None:
            worker.close()
    print(rec["message"])
    extras = [f"time {rec['time_s'] * 1e3:.1f} ms"]
    if rec.get("n_nan") or rec.get("n_inf"):
        extras.append(f"NaN {rec['n_nan']}, Inf {rec['n_inf']}")
    if "cg_iters_max" in rec:
        extras.append(f"CG iterations mean {rec['cg_iters_mean']:.1f} max {rec['cg_iters_max']}")
    if "cg_residual_max" in rec:
        extras.append(f"CG residual max {rec['cg_residual_max']:.2e}")
    print("  " + ", ".join(extras))
    g = rec.get("grad") or {}
    if args.backward:
        print(g.get("message") or f"gradients {g.get('status')}")
    return EXIT_OK if rec["passed"] else EXIT_FAIL


def _cell_timeout(args) -> float:
    from lla_verify.trust import DEFAULT_CALL_TIMEOUT

    t = getattr(args, "cell_timeout", None)
    t = DEFAULT_CALL_TIMEOUT if t is None else t
    if not (t > 0 and math.isfinite(t)):
        raise UsageError(f"--cell-timeout: expected a positive number of seconds, got {t:g}")
    return float(t)


def _add_cell_timeout(p) -> None:
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="each call of the implementation may take this long before its cell fails as timed out "
                        "(default 300)")


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except UsageError as exc:
            print(f"lla-verify {args.command}: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE

    return run


def register(sub) -> None:
    p = sub.add_parser(
        "audit", help="the release audit: sweep kappa, bandwidth, lambda and every case family; HTML + JSON report",
        description="Sweep the case registry over kappa, scale x lambda, lambda, every SPEC 7 family and awkward "
                    "shapes; judge each cell against its derived budget; write report.html and report.json. "
                    "Exit 0 all within budget, 1 a cell over budget or a regression, 2 usage error.")
    p.add_argument("--impl", default="triton", help="implementation: triton, torch-fp32, oracle-f64, flashlla or "
                   "MODULE:CALLABLE (default: triton)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for --quick, cuda for --full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes on CPU, minutes (the default)")
    mode.add_argument("--full", action="store_true", help="GPU sizes: S up to 4096, D 64 and 128, ~150 cells")
    p.add_argument("--baseline", metavar="REPORT_JSON", help="an earlier report.json: regressions fail the audit")
    p.add_argument("--out", default="report", metavar="DIR", help="directory for report.html and report.json "
                   "(default: ./report)")
    p.add_argument("--regression-factor", type=float, default=REGRESSION_FACTOR, metavar="X",
                   help="with --baseline: a ratio growing more than X times is a regression "
                        f"(default {REGRESSION_FACTOR:g})")
    p.add_argument("--regression-floor", type=float, default=REGRESSION_FLOOR, metavar="R",
                   help="with --baseline: growth to a ratio below R is rounding noise, not a regression "
                        f"(default {REGRESSION_FLOOR:g})")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of every case (default 0)")
    p.add_argument("--only", action="append", metavar="SUBSTRING",
                   help="keep only cells whose case spec contains SUBSTRING (repeatable)")
    p.add_argument("--no-backward", action="store_true", help="skip the gradient checks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-cells", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cells", default=None, metavar="START:STOP",
                   help="run a slice of the plan (to finish an interrupted audit, or split one across machines)")
    p.add_argument("--merge", nargs="+", default=None, metavar="REPORT",
                   help="merge the report.json files of slices of one audit into one report (no cell is run)")
    _add_cell_timeout(p)
    p.set_defaults(func=_guard(_audit_main))

    c = sub.add_parser("check", help="replay one case from its one-line spec and judge it (exit 0 pass, 1 fail)",
                       description="Rebuild one case from its spec (as printed by the audit), run the "
                                   "implementation, print the verdict. Exit 0 within budget, 1 not, 2 usage error.")
    c.add_argument("--case", required=True, metavar="SPEC",
                   help="e.g. 'spectrum:kappa=1e+06,rotate=1:B=1,H=1,S=48,D=16,dtype=float32,seed=0'")
    c.add_argument("--impl", default="triton", help="implementation (default: triton)")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    c.add_argument("--backward", action="store_true", help="also check gradients (budget.check_backward)")
    _add_cell_timeout(c)
    c.set_defaults(func=_guard(_check_main))


__all__ = ["Cell", "plan", "run_cell", "run_audit", "compare", "load_baseline", "summary_lines", "register",
           "repro_command", "UsageError"]
