"""Earlier audit reports read back, and a run compared against one: which cells regressed."""

from __future__ import annotations

import json
import math

from lla_verify.cliutil import UsageError


SCHEMA = "lla-verify-audit/1"
# A cell regresses against a baseline when its ratio grew by more than this factor
# and is above REGRESSION_FLOOR: ratios below half the budget move with rounding
# noise (a different BLAS, thread count or GPU) and say nothing about the kernel.
REGRESSION_FACTOR = 2.0
REGRESSION_FLOOR = 0.5


def cell_key(spec: str, op: str | None = "lla") -> str:
    """A cell's identity across reports: its case spec, prefixed by its operator unless LLA's
    (an LLA case spec is also an lla-decode cell's)."""
    return spec if op in (None, "lla") else f"{op} {spec}"


def record_key(c: dict) -> str:
    return cell_key(c["spec"], c.get("op"))


def ratio_number(x) -> float:
    """A ratio from report.json: a number, or the string 'inf' / 'nan' (strict JSON has
    neither); a missing one (None) is nan."""
    return float(x) if x is not None else math.nan


def fmt_ratio(x) -> str:
    """A ratio from report.json as it is printed: 3 significant digits, 'inf' or 'nan'."""
    v = ratio_number(x)
    # >= 1e300 is an inf that went through nan_to_num on its way here
    return "inf" if v >= 1e300 else ("nan" if math.isnan(v) else f"{v:.3g}")


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
    from lla_verify.budget.verdict import THRESHOLD
    from lla_verify.registry.operators import OPERATORS
    from lla_contract import LLAInputError

    def _over(r: float) -> bool:
        return not r <= THRESHOLD  # NaN is over

    if not isinstance(c, dict):
        raise UsageError(f"{where}: expected a cell object, got {type(c).__name__}")
    spec = c.get("spec")
    if not isinstance(spec, str):
        raise UsageError(f"{where}: no case spec")
    op = c.get("op", "lla")
    if op not in OPERATORS:
        raise UsageError(f"{where}: 'op' must be one of {list(OPERATORS)}, got {op!r}")
    try:
        OPERATORS[op].parse_case(spec)
    except LLAInputError as exc:
        raise UsageError(f"{where}: spec {spec!r} is not a{'' if op == 'lla' else ' ' + op} case: {exc}") from None
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
            raise UsageError(f"{where}: {name} check marked passed with ratio {fmt_ratio(r)} > {THRESHOLD:g}")
        if not (ratio >= r or math.isnan(ratio)):
            raise UsageError(f"{where}: ratio {fmt_ratio(ratio)} is below its {name} ratio {fmt_ratio(r)}")
    if c["passed"]:
        if _over(ratio):
            raise UsageError(f"{where}: marked passed with ratio {fmt_ratio(ratio)} > {THRESHOLD:g}")
        failed = [name for name, _, ok in checks if not ok]
        if failed:
            raise UsageError(f"{where}: marked passed with a failed {' and '.join(failed)} check")


def load_baseline(path: str) -> list[dict]:
    """The cells of a baseline report.json, validated; each case spec once."""
    cells = read_report(path, "--baseline")["cells"]
    seen = set()
    for c in cells:
        if record_key(c) in seen:
            raise UsageError(f"--baseline: {path!r} holds {record_key(c)} twice")
        seen.add(record_key(c))
    return cells


def check_baseline_matches(specs, baseline: list[dict], path: str) -> None:
    """A baseline that matches none of the cells compares nothing: a usage error, not a pass.
    ``specs`` are the cells' keys (``cell_key``)."""
    have = {record_key(c) for c in baseline}
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
    base = {record_key(c): c for c in baseline if "spec" in c}
    regs = []
    matched = 0
    for c in cells:
        b = base.get(record_key(c))
        if b is None:
            continue
        matched += 1
        fwd = lambda r: ratio_number(r.get("forward_ratio", r.get("ratio")))  # noqa: E731
        pairs = [("forward", fwd(c), fwd(b))]
        cg, bg = c.get("grad") or {}, b.get("grad") or {}
        if "ratio" in cg and "ratio" in bg:
            pairs.append(("gradient", ratio_number(cg["ratio"]), ratio_number(bg["ratio"])))
        why = []
        if b.get("passed") and not c.get("passed"):
            why.append("newly failing")
        for what, new, old in pairs:
            grew = new > floor and (new > factor * old or (math.isnan(old) and not math.isnan(new)))
            if grew or (math.isnan(new) and not math.isnan(old)):
                why.append(f"{what} ratio {old:.3g} -> {new:.3g}")
        if why:
            regs.append({"spec": c["spec"], **({"op": c["op"]} if c.get("op", "lla") != "lla" else {}),
                         "ratio": c.get("ratio"), "baseline_ratio": b.get("ratio"),
                         "passed": c.get("passed"), "baseline_passed": b.get("passed"),
                         "why": "; ".join(why), "command": c.get("command")})
    specs = {record_key(c) for c in cells}
    info = {"matched": matched, "new": len(cells) - matched, "missing": sum(1 for s in base if s not in specs)}
    return regs, info
