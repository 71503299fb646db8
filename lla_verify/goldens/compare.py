"""An implementation compared against the stored goldens, each judged by the budget of
its operator (registry/operators.py): LLA's forward budget, Parallax's, and for a decode
the forward's budget row by row."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lla_verify.registry.cases import DTYPES, Problem
from lla_verify.goldens.catalog import (Golden, MP_DPS, build_problem, deterministic, noise_tol,
                                        problem_from_arrays, select, stored_probe)
from lla_verify.goldens.regen import DERIVED_INPUTS, probe_drift, rel_diff, say
from lla_verify.goldens.store import (MANIFEST, manifest_hashes, array_hash, embedded_mismatch, entry_operator,
                                      entry_path, load_manifest, read_arrays)


@dataclass
class CaseResult:
    name: str
    checks: dict  # check name -> ratio (error / allowed; > 1 fails)
    skipped: str | None = None
    notes: str = ""
    detail: str = ""  # the failing verdict's message, printed under the case line
    lost_context: str | None = None  # the CUDA error when this golden's kernel lost the context

    @property
    def worst(self) -> tuple[str, float]:
        if not self.checks:
            return "", 0.0
        key = max(self.checks, key=lambda k: (math.isnan(self.checks[k]), self.checks[k]))
        return key, self.checks[key]


def _stored_ratio(o: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, undefined: torch.Tensor) -> float:
    defined = ~undefined & torch.isfinite(ref).all(-1)
    err = (o.to(torch.float64) - ref).norm(dim=-1)
    r = torch.where(defined, err / allowed, torch.zeros_like(err))
    r = torch.where(defined & ~torch.isfinite(o).all(-1), torch.full_like(r, math.inf), r)
    return float(r.max()) if r.numel() else 0.0


def _rounded_by(impl, problem: Problem) -> str:
    """Which inputs the implementation's declared rounding changes on ``problem`` ('' if none)."""
    from lla_verify.budget.forward import kernel_view

    seen = kernel_view(problem, impl)
    names = [n for n in ("q", "k", "v") if not torch.equal(getattr(seen, n).to(torch.float64),
                                                         getattr(problem, n).to(torch.float64))]
    if not torch.equal(seen.lam_tensor, problem.lam_tensor):
        names.append("lambda")
    return ", ".join(names)


def _verified(golden: Golden, folder: Path, entry: dict | None, rebuilt: dict):
    """The stored arrays of ``golden`` once its file is proven to be the manifest's (the
    folder, the hashes, the embedded name, spec and operator, the catalog's spec and
    operator) and its inputs to be what the spec rebuilds (``rebuilt``: input name ->
    tensor); else a failing CaseResult naming what is wrong."""
    def fail(notes):
        return CaseResult(golden.name, {"golden": math.inf}, notes=notes)

    if entry is None:
        return fail(f"not in the manifest of {folder}")
    try:
        path = entry_path(folder, entry)
        stored = read_arrays(path)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))
    hashes = manifest_hashes(entry)
    bad = [k for k, h in hashes.items() if k not in stored or array_hash(stored[k]) != h]
    if bad or not hashes:
        return fail(f"hash mismatch in {bad}: the file is altered" if bad
                    else f"manifest entry {golden.name!r} has no array hashes")
    mismatch = embedded_mismatch(path, entry)
    if entry.get("spec") != golden.spec:
        mismatch.append(f"spec in manifest {entry.get('spec')!r} != catalog {golden.spec!r}")
    if entry_operator(entry) != golden.op:
        mismatch.append(f"operator in manifest {entry_operator(entry)!r} != catalog {golden.op!r}")
    if mismatch:
        return fail("; ".join(mismatch))
    def same(k, t):
        if k not in stored:
            return False
        if array_hash(t) == array_hash(stored[k]):
            return True
        # a probe derived in float64 may round a step apart on another platform, or move
        # with its eigensolver (regen.probe_drift)
        return k in DERIVED_INPUTS and probe_drift(golden, stored[k], t, noise_tol(stored)) <= 1.0

    changed = [k for k, t in rebuilt.items() if not same(k, t)]
    if changed:
        return fail(f"the spec no longer rebuilds the stored inputs {changed}")
    return stored


def compare_one(golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    if golden.op != "lla":
        return _compare_op(golden, folder, entry, impl, device)
    from lla_verify.budget.forward import check_forward, forward_budget
    from lla_verify.registry.impls import is_available

    dt = DTYPES[golden.case.dtype]
    reason = impl.supports(dtype=dt, head_dim=golden.case.D) or is_available(impl, device)
    rebuilt = build_problem(golden)
    if not reason and isinstance(rebuilt.ridge_lambda, torch.Tensor) and not impl.per_query_lambda:
        reason = f"{impl.name} has no per-query lambda"
    if reason:
        return CaseResult(golden.name, {}, skipped=reason)
    stored = _verified(golden, folder, entry, {k: getattr(rebuilt, k) for k in ("q", "k", "v")})
    if isinstance(stored, CaseResult):
        return stored
    problem = problem_from_arrays(golden, stored, rebuilt.qk_scale)
    with deterministic():
        from lla_verify.trust import Misbehaved, call_forward

        on = problem.to(device)
        try:
            o, _ = call_forward(impl, on.q, on.k, on.v, ridge_lambda=on.ridge_lambda, qk_scale=problem.qk_scale)
        except Misbehaved as exc:  # a breach of the calling contract fails the golden, whatever came back
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")
        except Exception as exc:  # an implementation crash is a failed check, reported with its reason
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"{type(exc).__name__}: {exc}")
        o = o.cpu()
        fb = forward_budget(problem, impl, dense=True, out_dtype=o.dtype)
        verdict = check_forward(problem, impl, o, fb=fb)
    # the oracle of today against the stored oracle: the golden still means what it says
    fresh_o, rounded = fb.details.o, _rounded_by(impl, problem)
    if rounded:  # fb's oracle is of the inputs the implementation rounded (budget.kernel_view)
        from lla_verify.oracles.float64 import lla_forward_details

        fresh_o = lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                      qk_scale=problem.qk_scale).o
    rel, idx = rel_diff(stored["o"], fresh_o)
    tol = noise_tol(stored)
    checks = {"oracle": rel / tol if rel > 0 else 0.0, "forward": verdict.ratio}
    ref_key = "o_mp" if "o_mp" in stored else "o"
    if rounded:
        pass  # the stored reference is of other inputs than those computed from: "forward" judges
    elif o.shape == stored[ref_key].shape:
        checks["stored"] = _stored_ratio(o, stored[ref_key], fb.allowed, stored["undefined"])
    else:
        checks["stored"] = math.inf
    notes = f"stored ref {'mp' + str(MP_DPS) if ref_key == 'o_mp' else 'f64'}"
    if rel > 0:
        notes += f"; oracle drift {rel:.2g} at o[{','.join(map(str, idx))}]"
    if rounded:
        notes += f"; {impl.name} rounds these inputs ({rounded}): judged against the oracle of the rounded ones"
    detail = "" if verdict.passed else "\n".join("    " + ln for ln in verdict.message.splitlines())
    return CaseResult(golden.name, checks, notes=notes, detail=detail)


def _decode_inputs(golden: Golden, problem) -> dict:
    """The decode layout of ``problem`` as the operator's check hands it over (every position)."""
    from lla_verify.goldens.catalog import decode_lambda
    from lla_verify.testing.decode import every_position

    if golden.op == "lla-decode":
        qd, kc, vc, lens, (lam,) = every_position(problem.q, problem.k, problem.v, decode_lambda(problem)[..., None])
        return {"q": qd, "k_cache": kc, "v_cache": vc, "lengths": lens, "lam": lam[..., 0]}
    qd, kc, vc, lens, (rd,) = every_position(problem.q, problem.k, problem.v, problem.r)
    return {"q": qd, "r": rd, "k_cache": kc, "v_cache": vc, "lengths": lens}


def _compare_op(golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    """A Parallax or decode golden through its operator (registry/operators.py): the
    implementation on the stored inputs across the trust boundary, judged by the
    operator's budget (the forward's, row by row, for a decode), and against the stored
    reference within the same allowed error."""
    from lla_verify.registry.operators import get_operator
    from lla_verify.trust import Misbehaved

    op = get_operator(golden.op)
    reason = op.supports(impl, golden.case) or op.available(impl, device)
    if reason:
        return CaseResult(golden.name, {}, skipped=reason)
    problem = op.build(golden.case, "cpu")
    if golden.op == "parallax":
        rebuilt = {k: getattr(problem, k) for k in ("q", "k", "v", "r")}
    else:
        rebuilt = _decode_inputs(golden, problem)
    stored = _verified(golden, folder, entry, rebuilt)
    if isinstance(stored, CaseResult):
        return stored
    derived = ""
    if "r" in stored and not torch.equal(rebuilt["r"], stored["r"]):
        # within a rounding step (_verified): judge on the stored probe, the one the
        # implementation is given
        problem.r = stored_probe(golden, stored["r"]).clone()
        derived = "; r rebuilds a rounding step apart (float64's last bits): judged on the stored r"
    with deterministic():
        try:
            o, fresh_o, verdict, allowed, undefined = _run_op(golden, problem, stored, impl, device)
        except Misbehaved as exc:  # a breach of the calling contract fails the golden, whatever came back
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")
        except Exception as exc:  # an implementation crash is a failed check, reported with its reason
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"{type(exc).__name__}: {exc}")
    # the oracle of today against the stored reference: the golden still means what it says
    rel, idx = rel_diff(stored["o"], fresh_o)
    tol = noise_tol(stored)
    checks = {"oracle": rel / tol if rel > 0 else 0.0, "forward": verdict.ratio}
    ref_key = "o_mp" if "o_mp" in stored else "o"
    checks["stored"] = (_stored_ratio(o, stored[ref_key], allowed, undefined) if o.shape == stored[ref_key].shape
                        else math.inf)
    notes = f"stored ref {'mp' + str(MP_DPS) if ref_key == 'o_mp' else 'f64'}{derived}"
    if rel > 0:
        notes += f"; oracle drift {rel:.2g} at o[{','.join(map(str, idx))}]"
    detail = "" if verdict.passed else "\n".join("    " + ln for ln in verdict.message.splitlines())
    return CaseResult(golden.name, checks, notes=notes, detail=detail)


def _run_op(golden: Golden, problem, stored: dict, impl, device: str):
    """(o in the stored layout, today's float64 reference in that layout, the operator's
    verdict, allowed error per stored row, undefined rows) for a Parallax or decode golden.

    The implementation gets the stored inputs (proven equal to the rebuilt ones); a decode's
    rows are judged against the forward's on the rebuilt problem, as the operator's check does."""
    from dataclasses import replace

    from lla_verify.budget.parallax import check_parallax_decode, check_parallax_forward, parallax_budget
    from lla_verify.goldens.catalog import decode_lambda, flat_rows
    from lla_verify.oracles.parallax import parallax_forward
    from lla_verify.testing.decode import unflatten
    from lla_verify.trust import call_decode, call_parallax

    spec = golden.spec
    on = {k: t.to(device) for k, t in stored.items()}
    if golden.op == "parallax":
        o = call_parallax(impl, on["q"], on["k"], on["v"], on["r"], qk_scale=problem.qk_scale).cpu()
        pb = parallax_budget(problem.q, problem.k, problem.v, problem.r, qk_scale=problem.qk_scale,
                             compute_dtype=impl.compute_dtype, out_dtype=o.dtype)
        v = check_parallax_forward(problem.q, problem.k, problem.v, problem.r, o, impl=impl.name, case=spec,
                                   qk_scale=problem.qk_scale, compute_dtype=impl.compute_dtype, pb=pb)
        return o, pb.o, v, pb.allowed, torch.zeros(pb.allowed.shape, dtype=torch.bool)
    B, H, S, _ = problem.q.shape
    if golden.op == "lla-decode":
        from lla_verify.budget.forward import check_forward, forward_budget
        from lla_verify.oracles.float64 import lla_forward_details

        args = {k: on[k] for k in ("q", "k_cache", "v_cache", "lengths")}
        o, st = call_decode(impl, args, {"ridge_lambda": on["lam"], "qk_scale": problem.qk_scale}, stats=True)
        o, st = o.cpu(), {k: t.cpu() for k, t in (st or {}).items()}
        o_rows = unflatten(o, B, S)
        fb = forward_budget(problem, impl, dense=True, out_dtype=o.dtype)
        v = check_forward(problem, impl, o_rows, stats={k: unflatten(t, B, S) for k, t in st.items()} or None, fb=fb)
        v = replace(v, check="lla-decode", message=v.message.replace(
            "] forward ", "] decode, every position against the forward's row: ", 1))
        d = lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=decode_lambda(problem),
                                qk_scale=problem.qk_scale)
        return o, flat_rows(d.o), v, flat_rows(fb.allowed), flat_rows(d.undefined)
    args = {k: on[k] for k in ("q", "r", "k_cache", "v_cache", "lengths")}
    o, _ = call_decode(impl, args, {"qk_scale": problem.qk_scale})
    o = o.cpu()
    pb = parallax_budget(problem.q, problem.k, problem.v, problem.r, qk_scale=problem.qk_scale,
                         compute_dtype=impl.compute_dtype, out_dtype=o.dtype)
    v = check_parallax_decode(problem.q, problem.k, problem.v, problem.r, unflatten(o, B, S), impl=impl.name,
                              case=spec, qk_scale=problem.qk_scale, compute_dtype=impl.compute_dtype, pb=pb)
    fresh = flat_rows(parallax_forward(problem.q, problem.k, problem.v, problem.r, qk_scale=problem.qk_scale))
    return o, fresh, v, flat_rows(pb.allowed), torch.zeros(o.shape[:-1], dtype=torch.bool)


def compare_checked(golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    """``compare_one`` and then the CUDA context check (lla_verify/testing/cuda_context.py),
    in the process that compares: a golden whose kernel faulted on the device fails with
    the fault (``lost_context`` set), and in a process whose context was lost earlier no
    golden runs (each fails as not run, NaN, naming where the context was lost)."""
    from lla_verify.testing import cuda_context

    return cuda_context.guarded(
        golden.name, lambda: compare_one(golden, folder, entry, impl, device),
        not_run=lambda where: CaseResult(
            golden.name, {"forward": math.nan},
            notes=f"[{impl.name}] not run: the CUDA context of this process was lost in {where}"),
        # outside the implementation's call: only a fault is answered here
        raised=lambda exc: CaseResult(golden.name, {"forward": math.inf}, notes=f"{type(exc).__name__}: {exc}"),
        lost=lambda r, err: CaseResult(
            golden.name, dict(r.checks, forward=math.inf),
            notes=f"[{impl.name}] CUDA context lost during this golden: {err}; the implementation faulted",
            detail=r.detail, lost_context=err))


def _compare_one_isolated(worker, golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    from lla_verify.trust import ChildFailed, run_isolated

    try:
        r = run_isolated(worker, compare_checked, golden, folder, entry, impl, device)
    except ChildFailed as exc:  # the implementation ended or hung its process: this golden fails
        return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")
    if r.lost_context and worker is not None:
        worker.restart()  # a fresh child, a fresh context, for the next golden
    return r


def compare(folder: Path, impl, *, device: str = "cpu", only=None, isolate: bool = True,
            timeout: float | None = None, op: str = "lla") -> tuple[int, list[CaseResult]]:
    """Every selected golden of operator ``op`` through ``impl`` (an implementation of that
    operator); with ``isolate`` each in a child process (trust.Worker), so an
    implementation that exits or hangs fails its golden only."""
    return compare_ops(folder, {op: impl}, device=device, only=only, isolate=isolate, timeout=timeout)


def compare_ops(folder: Path, impls: dict, *, device: str = "cpu", only=None, isolate: bool = True,
                timeout: float | None = None) -> tuple[int, list[CaseResult]]:
    """The goldens of each operator in ``impls`` (operator -> Impl) through its implementation,
    one section per operator when there are several, one summary line over all."""
    if len(impls) == 1:
        (op, impl), = impls.items()
        goldens = select(only, op)
    else:
        goldens = [g for g in select(only) if g.op in impls]
    man = load_manifest(folder)
    if man is None:
        raise FileNotFoundError(f"--dir: no {MANIFEST} in {folder}")
    entries = {e.get("name"): e for e in man["cases"]}
    results = []
    for op, impl in impls.items():
        mine = [g for g in goldens if g.op == op]
        if not mine:
            continue
        if len(impls) > 1:
            say(f"== {op}: {impl.name} ({len(mine)} golden(s))")
        results += _compare_with(folder, entries, mine, impl, device, isolate, timeout)
    return _compare_summary(results)


def _compare_with(folder, entries, goldens, impl, device, isolate, timeout) -> list[CaseResult]:
    from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

    width = max(len(g.name) for g in goldens)
    worker = (Worker(timeout if timeout is not None else DEFAULT_CALL_TIMEOUT)
              if isolate and picklable(impl) else None)
    try:
        return _compare_all(worker, goldens, folder, entries, impl, device, width)
    finally:
        if worker is not None:
            worker.close()


def _compare_all(worker, goldens, folder, entries, impl, device, width) -> list[CaseResult]:
    results = []
    for g in goldens:
        r = _compare_one_isolated(worker, g, folder, entries.get(g.name), impl, device)
        results.append(r)
        if r.skipped:
            say(f"{g.name:<{width}}  SKIP  {r.skipped}")
            continue
        key, worst = r.worst
        status = "PASS" if worst <= 1.0 else "FAIL"
        ratios = "  ".join(f"{k} {v:.3g}" for k, v in r.checks.items())
        say(f"{g.name:<{width}}  {status}  ratio {worst:.3g}  ({ratios}; {r.notes})")
        if r.detail:
            say(r.detail)
    return results


def _compare_summary(results: list[CaseResult]) -> tuple[int, list[CaseResult]]:
    n = sum(len(r.checks) for r in results)
    over = sum(1 for r in results for v in r.checks.values() if not v <= 1.0)
    ran = [r for r in results if not r.skipped]
    skipped = len(results) - len(ran)
    if ran:
        w = max(ran, key=lambda r: (math.isnan(r.worst[1]), r.worst[1]))
        tail = f", worst ratio {w.worst[1]:.3g} at {w.name} ({w.worst[0]})"
    else:
        tail = ""
    skip_txt = f" ({skipped} golden(s) skipped)" if skipped else ""
    say(f"{over} of {n} checks over threshold{tail}{skip_txt}")
    return (1 if over else 0), results
