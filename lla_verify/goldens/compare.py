"""An implementation compared against the stored goldens, each judged by the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lla_verify.registry.cases import DTYPES, Problem
from lla_verify.goldens.catalog import (Golden, MP_DPS, build_problem, deterministic, noise_tol,
                                        problem_from_arrays, select)
from lla_verify.goldens.regen import rel_diff, say
from lla_verify.goldens.store import (MANIFEST, manifest_hashes, array_hash, embedded_mismatch, entry_path,
                                      load_manifest, read_arrays)


@dataclass
class CaseResult:
    name: str
    checks: dict  # check name -> ratio (error / allowed; > 1 fails)
    skipped: str | None = None
    notes: str = ""
    detail: str = ""  # the failing verdict's message, printed under the case line

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


def compare_one(golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    from lla_verify.budget.forward import check_forward, forward_budget
    from lla_verify.registry.impls import is_available

    dt = DTYPES[golden.case.dtype]
    reason = impl.supports(dtype=dt, head_dim=golden.case.D) or is_available(impl, device)
    rebuilt = build_problem(golden)
    if not reason and isinstance(rebuilt.ridge_lambda, torch.Tensor) and not impl.per_query_lambda:
        reason = f"{impl.name} has no per-query lambda"
    if reason:
        return CaseResult(golden.name, {}, skipped=reason)
    if entry is None:
        return CaseResult(golden.name, {"golden": math.inf}, notes=f"not in the manifest of {folder}")
    try:
        path = entry_path(folder, entry)
        stored = read_arrays(path)
    except (ValueError, FileNotFoundError) as exc:
        return CaseResult(golden.name, {"golden": math.inf}, notes=str(exc))
    hashes = manifest_hashes(entry)
    bad = [k for k, h in hashes.items() if k not in stored or array_hash(stored[k]) != h]
    if bad or not hashes:
        return CaseResult(golden.name, {"golden": math.inf}, notes=f"hash mismatch in {bad}: the file is altered"
                          if bad else f"manifest entry {golden.name!r} has no array hashes")
    mismatch = embedded_mismatch(path, entry)
    if entry.get("spec") != golden.spec:
        mismatch.append(f"spec in manifest {entry.get('spec')!r} != catalog {golden.spec!r}")
    if mismatch:
        return CaseResult(golden.name, {"golden": math.inf}, notes="; ".join(mismatch))
    changed = [k for k in ("q", "k", "v") if array_hash(getattr(rebuilt, k)) != array_hash(stored[k])]
    if changed:
        return CaseResult(golden.name, {"golden": math.inf},
                          notes=f"the spec no longer rebuilds the stored inputs {changed}")
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


def _compare_one_isolated(worker, golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    from lla_verify.trust import ChildFailed, run_isolated

    try:
        return run_isolated(worker, compare_one, golden, folder, entry, impl, device)
    except ChildFailed as exc:  # the implementation ended or hung its process: this golden fails
        return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")


def compare(folder: Path, impl, *, device: str = "cpu", only=None, isolate: bool = True,
            timeout: float | None = None) -> tuple[int, list[CaseResult]]:
    """Every selected golden through ``impl``; with ``isolate`` each in a child process
    (trust.Worker), so an implementation that exits or hangs fails its golden only."""
    from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

    goldens = select(only)
    man = load_manifest(folder)
    if man is None:
        raise FileNotFoundError(f"--dir: no {MANIFEST} in {folder}")
    entries = {e.get("name"): e for e in man["cases"]}
    width = max(len(g.name) for g in goldens)
    worker = (Worker(timeout if timeout is not None else DEFAULT_CALL_TIMEOUT)
              if isolate and picklable(impl) else None)
    try:
        results = _compare_all(worker, goldens, folder, entries, impl, device, width)
    finally:
        if worker is not None:
            worker.close()
    return _compare_summary(results)


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
