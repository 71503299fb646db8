"""``lla-verify hunt``: search each family's parameters for the input that
maximises error / budget for one implementation of one operator.

The operator (``--op``: lla, parallax, lla-decode, parallax-decode; registry/operators.py)
fixes the case space, the implementation protocol and the check. The search space of a
family is its parameters (cases.py: each with a range and a log or linear scale), mapped
to the unit cube, plus the seed; for the Parallax operators the probe family's
parameters (registry/parallax.py) are further coordinates of the same cube, and every
(family, probe family) pair is searched. The search is
random-restart hill climbing: from the easy point and from random points, move
one step of a Gaussian in the unit cube (with a fresh seed now and then), keep the
move if the ratio grew, halve the step after a run of failures, restart when the
step is spent. Every evaluation is one full check (oracle, budget, attribution):
for LLA ``budget.check_forward``, for the others the operator's ``check``, so the
objective is exactly what the property suite, ``check`` and the audit assert.

The same number of evaluations of plain random sampling from the same space is the
baseline it is measured against (``--compare-random``, docs/hunt.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lla_verify.budget.forward import check_forward

from lla_verify.budget.verdict import THRESHOLD
from lla_verify.registry.cases import DTYPES, FAMILIES, Case, get_family
from lla_verify.cliutil import UsageError, atomic_write, check_device, check_out_dir, int_in, save_figure, seed_type
from lla_verify.testing.location import suite_dir
from lla_verify.registry.impls import get_impl, is_available
from lla_contract import LLAInputError

REGRESSIONS = suite_dir() / "regressions.json"


@dataclass
class Eval:
    ratio: float
    case: Case
    cause: str
    message: str


@dataclass
class HuntResult:
    family: str
    best: Eval | None
    history: list = field(default_factory=list)  # ratio of each evaluation, in order

    def add(self, e: Eval, progress=None) -> Eval:
        """Record one evaluation: its ratio in the history, the worst so far, the bar."""
        self.history.append(e.ratio)
        if self.best is None or e.ratio > self.best.ratio:
            self.best = e
        if progress is not None:
            progress.update(1)
            progress.set_postfix(worst=f"{self.best.ratio:.3g}")
        return e

    def first_over(self, threshold: float = THRESHOLD) -> int | None:
        """Evaluations until the first ratio over ``threshold`` (1-based), None if never."""
        for n, r in enumerate(self.history, 1):
            if r > threshold:
                return n
        return None

    def worst_so_far(self) -> list:
        out, best = [], -math.inf
        for r in self.history:
            best = max(best, r)
            out.append(best)
        return out


def _to_unit(p, x: float) -> float:
    if p.hi == p.lo:
        return 0.0
    if p.log:
        return (math.log10(x) - math.log10(p.lo)) / (math.log10(p.hi) - math.log10(p.lo))
    return (x - p.lo) / (p.hi - p.lo)


def _from_unit(p, u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    if p.log:
        x = 10 ** (math.log10(p.lo) + u * (math.log10(p.hi) - math.log10(p.lo)))
    else:
        x = p.lo + u * (p.hi - p.lo)
    return p.clip(x)


def evaluate(impl, device: str, case, op: str = "lla") -> tuple[float, str, str]:
    """(ratio, cause, message) of one case: the implementation across the trust boundary,
    judged by check_forward (LLA) or the operator's check. Runs in the Objective's worker process."""
    if op != "lla":
        return _evaluate_op(impl, device, case, op)
    from lla_verify.trust import Misbehaved, call_forward

    problem = case.build(device)
    try:
        o, stats = call_forward(impl, problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                qk_scale=problem.qk_scale, stats=True)
    except Misbehaved as exc:  # a breach of the calling contract is the worst possible verdict
        return math.inf, "implementation", f"[{impl.name}] {exc} on {case.spec()}"
    except Exception as exc:  # an implementation that crashes on a valid input has failed
        return math.inf, "implementation", f"[{impl.name}] raised {type(exc).__name__}: {exc}"
    v = check_forward(problem, impl, o, stats=stats, mp_recheck=False)
    return v.ratio, v.cause, v.message


UNBUILDABLE = "unbuildable"


class CudaContextLost(RuntimeError):
    """The search's own process lost its CUDA context: no evaluation can run in it."""


def evaluate_checked(impl, device: str, case, op: str = "lla") -> tuple[float, str, str, str | None]:
    """``evaluate`` and then the CUDA context check (lla_verify/testing/cuda_context.py), in
    the process that evaluates: (ratio, cause, message, the fault when this evaluation lost
    the context). A point whose kernel faulted is the worst ratio, charged to the
    implementation; a process that lost its context earlier evaluates nothing."""
    from lla_verify.testing import cuda_context

    def not_run(where):
        raise CudaContextLost(f"the CUDA context of this process was lost in {where}: no later point can be "
                              f"evaluated in it")

    return cuda_context.guarded(
        case.spec(), lambda: (*evaluate(impl, device, case, op), None), not_run=not_run,
        # outside the implementation's call: only a fault is answered here
        raised=lambda exc: (math.inf, "implementation", f"[{impl.name}] raised {type(exc).__name__}: {exc}", None),
        lost=lambda _r, err: (math.inf, "implementation", f"[{impl.name}] CUDA context lost during this "
                              f"evaluation: {err}; the implementation faulted on {case.spec()}", err))


def _evaluate_op(impl, device: str, case, op: str) -> tuple[float, str, str]:
    from lla_verify.registry.operators import get_operator

    operator = get_operator(op)
    try:
        operator.build(case, device)
    except LLAInputError as exc:
        # a point of the cube the case space cannot build (the exact LLA probe beyond the
        # dtype's range): no input, so no finding; ratio 0 keeps the search moving
        return 0.0, UNBUILDABLE, f"{case.spec()}: {exc}"
    v = operator.check(case, impl, device)[0]  # the implementation's failures come back as verdicts
    return v.ratio, v.cause, v.message


class Objective:
    """ratio(case) for one implementation; counts evaluations; never raises on a bad point.

    With ``isolate`` (the default) each evaluation runs in a child process (trust.Worker):
    an implementation that exits, crashes or runs past ``timeout`` seconds on a call
    scores the worst ratio at that point and the search goes on; so does one whose kernel
    faults on the device (the CUDA context of the child is lost, and the child replaced).
    In this process a lost context ends the search (CudaContextLost).
    """

    def __init__(self, impl, device, *, S, D, dtype, B=1, H=1, isolate: bool = True, timeout: float | None = None,
                 op: str = "lla"):
        from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

        self.impl, self.device, self.op = impl, device, op
        self.S, self.D, self.dtype, self.B, self.H = S, D, dtype, B, H
        self.evals = 0
        self.fault: Eval | None = None  # the evaluation that lost this process's CUDA context
        self.worker = (Worker(timeout if timeout is not None else DEFAULT_CALL_TIMEOUT)
                       if isolate and picklable(impl) else None)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def case(self, family: str, u: np.ndarray, seed: int, probe: str | None = None):
        """The case at ``u``: the family's parameters first, then the probe family's."""
        fam = get_family(family)
        params = {p.name: _from_unit(p, float(x)) for p, x in zip(fam.params, u)}
        case = Case(family, params, B=self.B, H=self.H, S=self.S, D=self.D, dtype=self.dtype, seed=int(seed))
        if probe is None:
            return case
        from lla_verify.registry.parallax import ParallaxCase, get_probe

        pf = get_probe(probe)
        rest = u[len(fam.params):]
        return ParallaxCase(case, probe, {p.name: _from_unit(p, float(x)) for p, x in zip(pf.params, rest)})

    def __call__(self, case) -> Eval:
        from lla_verify.trust import ChildFailed, run_isolated

        self.evals += 1
        try:
            ratio, cause, message, lost = run_isolated(self.worker, evaluate_checked, self.impl, self.device, case,
                                                       self.op)
        except ChildFailed as exc:
            ratio, cause, message, lost = math.inf, "implementation", f"[{self.impl.name}] {exc} on {case.spec()}", None
        r = ratio if math.isfinite(ratio) else 1e30
        e = Eval(r, case, cause, message)
        if lost is not None:
            if self.worker is not None:
                self.worker.restart()
            elif self.fault is None:
                self.fault = e
        return e


def _space(family: str, probe: str | None) -> tuple:
    """The parameters of the cube's coordinates: the family's, then the probe family's."""
    params = tuple(get_family(family).params)
    if probe is not None:
        from lla_verify.registry.parallax import get_probe

        params += tuple(get_probe(probe).params)
    return params


def label(family: str, probe: str | None) -> str:
    return family if probe is None else f"{family};probe={probe}"


def random_search(obj: Objective, family: str, evals: int, rng: np.random.Generator, progress=None,
                  probe: str | None = None) -> HuntResult:
    dim = len(_space(family, probe))
    res = HuntResult(label(family, probe), None)
    for _ in range(evals):
        u = rng.random(dim)
        res.add(obj(obj.case(family, u, int(rng.integers(0, 2**16)), probe)), progress)
    return res


def hill_climb(obj: Objective, family: str, evals: int, rng: np.random.Generator, progress=None,
               probe: str | None = None) -> HuntResult:
    space = _space(family, probe)
    dim = len(space)
    res = HuntResult(label(family, probe), None)

    def evaluate(u, seed):
        return res.add(obj(obj.case(family, u, seed, probe)), progress)

    start_easy = True
    while len(res.history) < evals:
        if start_easy:
            u = np.array([_to_unit(p, p.easy) for p in space])
            start_easy = False
        else:
            u = rng.random(dim)
        seed = int(rng.integers(0, 2**16))
        cur = evaluate(u, seed)
        step, fails = 0.25, 0
        while len(res.history) < evals and step > 0.02:
            cand = np.clip(u + rng.normal(0.0, step, dim), 0.0, 1.0)
            cseed = seed if rng.random() < 0.7 else int(rng.integers(0, 2**16))
            e = evaluate(cand, cseed)
            if e.ratio > cur.ratio:
                u, seed, cur, fails = cand, cseed, e, 0
                step = min(0.5, step * 1.5)
            else:
                fails += 1
                if fails >= 3:
                    step, fails = step / 2, 0
    return res


def add_regression(case, note: str, path: Path = REGRESSIONS, op: str = "lla") -> None:
    """Append ``case`` (of operator ``op``) to the stored regressions that the property suite
    always runs; an entry of another operator than LLA carries its "op" (testing/regressions.py)."""
    from lla_verify.testing.regressions import entry_op

    data = json.loads(path.read_text()) if path.exists() else []
    if any(d["spec"] == case.spec() and entry_op(d) == op for d in data):
        return
    entry = {"spec": case.spec(), "note": note, "date": time.strftime("%Y-%m-%d")}
    if op != "lla":
        entry["op"] = op
    data.append(entry)
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, res in results.items():
        ax.plot(range(1, len(res.history) + 1), res.worst_so_far(), label=label)
    ax.set_yscale("log")
    ax.axhline(THRESHOLD, color="k", lw=0.8, ls="--")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("worst error / budget so far")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "hunt.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _resolve(args, op, device):
    """The implementation record of ``--impl`` in ``op``'s registry; UsageError if bad."""
    spec = args.impl if args.impl is not None else op.default_impl
    if op.name != "lla":
        from lla_verify.commands.audit import resolve_op_impl

        return resolve_op_impl(op.name, spec, device, "--impl")
    try:
        impl = get_impl(spec)
    except LLAInputError as exc:
        raise UsageError(str(exc).replace("--lla-impl", "--impl")) from None
    if impl.name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--impl triton: the Triton kernel on CPU needs TRITON_INTERPRET=1")
    reason = is_available(impl, device)
    if reason:
        raise UsageError(f"--impl {spec}: {reason}")
    return impl


def _probes(args, op) -> list:
    """The probe families searched: [None] for the LLA operators."""
    from lla_verify.registry.parallax import PROBES

    if not op.name.startswith("parallax"):
        if args.probe is not None:
            raise UsageError(f"--probe: only with --op parallax or parallax-decode (the {op.name} operator has no probe)")
        return [None]
    if args.probe in (None, "all"):
        return list(PROBES)
    if args.probe not in PROBES:
        raise UsageError(f"--probe: unknown {args.probe!r}; expected 'all' or one of {list(PROBES)}")
    return [args.probe]


def _run(args) -> int:
    from lla_verify.registry.operators import get_operator

    try:
        op = get_operator(args.op)
    except LLAInputError as exc:
        raise UsageError(str(exc)) from None
    device = check_device(args.device) if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    impl = _resolve(args, op, device)
    args.impl = args.impl if args.impl is not None else op.default_impl
    families = list(FAMILIES) if args.family == "all" else [args.family]
    for f in families:
        if f not in FAMILIES:
            raise UsageError(f"--family: unknown {f!r}; expected 'all' or one of {list(FAMILIES)}")
    probes = _probes(args, op)
    D = args.head_dim or (min(impl.head_dims) if impl.head_dims else 8)
    reason = impl.supports(dtype=DTYPES[args.dtype], head_dim=D)
    if reason:
        raise UsageError(f"--head-dim/--dtype: {reason}")
    if args.cell_timeout is not None and not (args.cell_timeout > 0 and math.isfinite(args.cell_timeout)):
        raise UsageError(f"--cell-timeout: expected a positive number of seconds, got {args.cell_timeout:g}")
    sizes = {"S": args.seq, "D": D, "dtype": args.dtype}
    try:  # the largest problem the search builds: refused now, not by the allocator mid-search
        easy = np.array([_to_unit(p, p.easy) for p in _space(families[0], probes[0])])
        op.check_fits(Objective(impl, device, isolate=False, **sizes).case(families[0], easy, 0, probes[0]), device)
    except LLAInputError as exc:
        raise UsageError(f"--seq/--head-dim: {str(exc).removeprefix('case: ')}") from None
    out = check_out_dir(args.out)
    obj = Objective(impl, device, timeout=args.cell_timeout, op=op.name, **sizes)
    try:
        return _search(args, impl, device, families, probes, obj, out, op.name)
    except CudaContextLost as exc:
        # only in this process (an implementation that cannot be pickled into a child)
        print(f"lla-verify hunt: stopped, incomplete: {exc}", file=sys.stderr)
        if obj.fault is not None:
            print(obj.fault.message)
            print(f"replay: {replay_command(op.name, args.impl, device, obj.fault.case.spec())}")
        return 1
    finally:
        obj.close()


def replay_command(op: str, impl: str, device: str, spec: str) -> str:
    """The one line that replays a hunt's worst case (``lla-verify check``)."""
    opt = "" if op == "lla" else f" --op {op}"
    return f"lla-verify check{opt} --impl {impl} --device {device} --case '{spec}'"


def _search(args, impl, device, families, probes, obj, out, op="lla") -> int:
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    worst: Eval | None = None
    curves, table = {}, []
    spaces = [(f, pr) for f in families for pr in probes]
    total = args.evals * len(spaces) * (2 if args.compare_random else 1)
    with tqdm(total=total, desc=f"hunt {op} {impl.name}", unit="eval", file=sys.stderr) as bar:
        for fam, probe in spaces:
            name = label(fam, probe)
            res = hill_climb(obj, fam, args.evals, rng, progress=bar, probe=probe)
            curves[f"{name} hunt"] = res
            row = {"family": fam, "hunt_worst": res.best.ratio, "hunt_first_over": res.first_over(),
                   "hunt_case": res.best.case.spec()}
            if probe is not None:
                row["probe"] = probe
            if args.compare_random:
                rres = random_search(obj, fam, args.evals, np.random.default_rng(args.seed + 1), progress=bar,
                                     probe=probe)
                curves[f"{name} random"] = rres
                row.update(random_worst=rres.best.ratio, random_first_over=rres.first_over(),
                           random_case=rres.best.case.spec())
            table.append(row)
            # the verdict is about the implementation: whichever search found the input
            found = [res.best] + ([rres.best] if args.compare_random else [])
            for e in found:
                if worst is None or e.ratio > worst.ratio:
                    worst = e
    replay = replay_command(op, args.impl, device, worst.case.spec())
    summary = {"op": op, "impl": args.impl, "device": device, "evals_per_family": args.evals, "seed": args.seed,
               "worst_ratio": worst.ratio, "worst_case": worst.case.spec(), "cause": worst.cause,
               "replay": replay, "families": table, "date": time.strftime("%Y-%m-%d")}
    atomic_write(out / "hunt.json", json.dumps(summary, indent=1) + "\n")
    png = _plot(curves, out)
    def first(n):
        return "-" if n is None else str(n)

    width = max(15, *(len(label(r["family"], r.get("probe"))) for r in table))
    for row in table:
        extra = (f"  random {row['random_worst']:9.3g} (over at eval {first(row['random_first_over'])})"
                 if "random_worst" in row else "")
        print(f"{label(row['family'], row.get('probe')):{width}s} hunt {row['hunt_worst']:9.3g} "
              f"(over at eval {first(row['hunt_first_over'])}){extra}")
    print(worst.message)
    print(f"replay: {replay}")
    print(f"wrote {out / 'hunt.json'} and {png}")
    over = worst.ratio > THRESHOLD
    if over and args.add_regression:
        add_regression(worst.case, f"found by lla-verify hunt --op {op} on {args.impl}: ratio {worst.ratio:.3g}",
                       op=op)
        print(f"added {worst.case.spec()} ({op}) to {REGRESSIONS}")
    n_over = sum(1 for r in table if max(r["hunt_worst"], r.get("random_worst", 0.0)) > THRESHOLD)
    what = "families" if probes == [None] else "(family, probe) pairs"
    print(f"{n_over} of {len(table)} {what} over threshold, worst ratio {worst.ratio:.3g} at {worst.case.spec()}")
    return 1 if over else 0


def register(sub) -> None:
    p = sub.add_parser("hunt", help="search for the input that maximises error / budget")
    p.add_argument("--op", default="lla", metavar="OPERATOR",
                   help="the operator searched: lla, parallax, lla-decode or parallax-decode (default: lla; "
                        "registry/operators.py)")
    p.add_argument("--impl", default=None,
                   help="implementation of --op: a built-in name or MODULE:CALLABLE (default: triton; "
                        "parallax-triton, lla-decode-triton, parallax-decode-triton for the others)")
    p.add_argument("--family", default="all", help="a family of cases.py, or 'all'")
    p.add_argument("--probe", default=None,
                   help="with --op parallax or parallax-decode: a probe family of registry/parallax.py, or 'all' "
                        "(the default)")
    p.add_argument("--evals", type=int_in(1), default=40, help="evaluations per family (and probe family) (>= 1)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seq", type=int_in(1), default=33, help="sequence length S of the problems searched")
    p.add_argument("--head-dim", type=int_in(1), default=None,
                   help="head dimension D (default: the smallest the implementation takes, else 8)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="each call of the implementation may take this long before its evaluation fails as timed "
                        "out (default 300)")
    p.add_argument("--out", default="hunt-out", help="folder for hunt.json and hunt.png")
    p.add_argument("--compare-random", action="store_true", help="also run random sampling at the same budget")
    p.add_argument("--add-regression", action="store_true",
                   help="store the worst case (with its operator) in the suite's regressions.json when it exceeds "
                        "the threshold")
    p.set_defaults(func=_run)
