"""The report.json files of slices of one audit merged into one report."""

from __future__ import annotations

import math
import re

from lla_verify.cliutil import UsageError, jsonable
from lla_verify.audit.baseline import (REGRESSION_FACTOR, REGRESSION_FLOOR, SCHEMA, check_baseline_matches,
                                       compare, plan_digest, read_report, record_key)
from lla_verify.audit.run import audit_verdict


def cell_slice(text: str, n: int) -> slice:
    """--cells START:STOP, a Python slice of the plan (which is deterministic for a seed)."""
    m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", text)
    if not m:
        raise UsageError(f"--cells: expected START:STOP (e.g. 62: or 0:40), got {text!r}")
    sl = slice(int(m[1]) if m[1] else None, int(m[2]) if m[2] else None)
    if not range(n)[sl]:
        raise UsageError(f"--cells: {text!r} selects no cell of the {n} planned")
    return sl


MERGE_KEYS = ("impl", "impls", "ops", "device", "mode", "seed", "only", "plan_size", "plan_digest")


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
        allowed = set(range(size)[cell_slice(str(sl), size)]) if isinstance(sl, str) else set()
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
            if record_key(c) in seen:
                raise UsageError(f"--merge: {record_key(c)} appears at two plan positions")
            by_index[i], specs[i] = c, path
            seen.add(record_key(c))
        regressions += [r for r in rep.get("regressions") or [] if r not in regressions]
    cells = [by_index[i] for i in sorted(by_index)]
    plan_size = first["plan_size"]
    interrupted = None
    if len(cells) < plan_size:
        interrupted = f"merged {len(cells)} of {plan_size} planned cells"
    elif plan_digest(record_key(c) for c in cells) != first["plan_digest"]:
        raise UsageError(f"--merge: the {len(cells)} merged cells are not the plan the slices name "
                         f"(meta.plan_digest differs): a slice was edited or comes from another plan")
    binfo = None
    if baseline is not None:
        check_baseline_matches([record_key(c) for c in cells], baseline, baseline_path)
        regressions, binfo = compare(cells, baseline, factor=factor, floor=floor)
    meta = dict(first, merged_from=list(paths), cells_slice=None, cells_start=None,
                cell_indices=sorted(by_index),
                wall_s=sum(float(r["meta"].get("wall_s") or 0) for r in reps if _is_number(r["meta"].get("wall_s"))),
                interrupted=interrupted, command=command or first.get("command"))
    return jsonable({"schema": SCHEMA, "meta": meta, "verdict": audit_verdict(cells, regressions, interrupted=interrupted),
                      "regressions": regressions, "baseline": binfo, "skipped": reps[0].get("skipped") or [],
                      "cells": cells})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
