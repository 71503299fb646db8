"""The audit's plan: the cells it sweeps, one ``Case`` each, along the axes where LLA
kernels break (the spread of Sigma_i's spectrum, bandwidth against ridge, lambda, every
other family, awkward shapes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    sweep: str  # "kappa" | "scale-lambda" | "lambda" | "family" | "shape"
    case: object  # cases.Case
    # why this cell's gradients are not checked even when the implementation has them
    # (None: checked); the quick audit checks float32 gradients only, to stay in minutes
    no_grad: str | None = None
    # the operator of registry/operators.py the cell checks; its case is that operator's
    # (a ParallaxCase for parallax and parallax-decode)
    op: str = "lla"


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


# ------------------------------------------------------------------ the other operators
# Their cells sit where each operator's own trouble is (registry/operators.py): for
# Parallax every probe family, the key offset the centring must survive, a large probe in
# the low precisions; for the decodes the forward's hard families, cache lengths that are
# not multiples of the tile or split (every position of S is decoded: lengths 1..S), ragged
# batches (B > 1: each problem's positions are sequences of one batch) and t = 0 (S = 1).
# Through the Triton interpreter an LLA decode cell costs seconds, so the quick plan keeps
# S <= 33 and a handful of cells per operator (make audit stays within about 2.5 minutes);
# the full plan adds 38 cells to LLA's 145 (scripts/gpu-release.sh slices them).
PARALLAX_PROBES = (("zero", {}), ("random", {"amp": 1.0}), ("large", {"amp": 100.0}), ("lla", {}),
                   ("small_eig", {"amp": 1.0}))


def _op_adder(op: str, impl, full: bool, seed: int, cells: list, skipped: list):
    from lla_verify.registry.cases import DTYPES, Case
    from lla_verify.registry.parallax import ParallaxCase

    def add(sweep, family, params, *, S, D, dtype, B=1, H=1, probe=None):
        case = Case(family=family, params=dict(params), B=B, H=H, S=S, D=D, dtype=dtype, seed=seed)
        if probe is not None:
            case = ParallaxCase(case, probe[0], dict(probe[1]))
        reason = impl.supports(dtype=DTYPES[dtype], head_dim=D)
        if reason is None and family == "lambda_decades" and not impl.per_query_lambda:
            reason = f"{impl.name} takes no per-query lambda"
        no_grad = None
        if not full and dtype != "float32":
            no_grad = "not checked: --quick checks gradients on float32 cells only (--full checks every dtype)"
        if reason is None:
            cells.append(Cell(sweep, case, no_grad, op=op))
        else:
            skipped.append({"spec": case.spec(), "op": op, "sweep": sweep, "reason": reason})

    return add


def plan_parallax(impl, *, full: bool = False, seed: int = 0) -> tuple[list[Cell], list[dict]]:
    """Parallax cells (op "parallax"): every probe family on the baseline, the families that
    stress its centring and conditioning, the low precisions, awkward shapes."""
    cells, skipped = [], []
    add = _op_adder("parallax", impl, full, seed, cells, skipped)
    S, D = (48, 16) if not full else (1000, 64)
    for probe in PARALLAX_PROBES:
        add("probe", "gaussian", {"lam": 1.0}, S=S, D=D, dtype="float32", probe=probe)
    rnd, big, eig = PARALLAX_PROBES[1], PARALLAX_PROBES[2], PARALLAX_PROBES[4]
    add("family", "offset", {"offset": 1e3, "lam": 1.0}, S=S, D=D, dtype="float32", probe=big)
    add("family", "large_norm", {"factor": 1e2, "lam": 1.0}, S=S, D=D, dtype="float32", probe=eig)
    add("family", "spectrum", {"kappa": 1e6, "rotate": 1}, S=S if full else 40, D=D, dtype="float32", probe=eig)
    add("family", "bandwidth", {"scale": 1e2, "lam": 1.0}, S=S, D=D, dtype="float32", probe=rnd)
    for dt in ("bfloat16",) + (("float16",) if full else ()):
        add("dtype", "offset", {"offset": 1e3, "lam": 1.0}, S=S, D=D, dtype=dt, probe=big)
    shapes = ((1, 16, 2, 1), (19, 16, 2, 3), (29, 32, 1, 1)) if not full else \
        ((63, 64, 2, 3), (1000, 128, 1, 1), (2048, 64, 1, 1))
    for S2, D2, B, H in shapes:
        add("shape", "gaussian", {"lam": 1.0}, S=S2, D=D2, dtype="float32", B=B, H=H, probe=rnd)
    if full:
        add("dtype", "gaussian", {"lam": 1.0}, S=S, D=128, dtype="bfloat16", probe=rnd)
    return cells, skipped


def plan_decode(op: str, impl, *, full: bool = False, seed: int = 0) -> tuple[list[Cell], list[dict]]:
    """Decode cells (op "lla-decode" or "parallax-decode"): every position of each case is
    decoded in one call and judged against the forward's row (registry/operators.py)."""
    if op not in ("lla-decode", "parallax-decode"):
        raise ValueError(f"plan_decode: op must be lla-decode or parallax-decode, got {op!r}")
    cells, skipped = [], []
    add = _op_adder(op, impl, full, seed, cells, skipped)
    px = op == "parallax-decode"
    rnd = PARALLAX_PROBES[1] if px else None
    # quick: S = 33 and 24 decode three and two tiles of 16 (the last partial), S = 19 two
    # problems of one batch; full: 256 positions of D = 64
    S, S2, D = (33, 24, 16) if not full else (256, 255, 64)
    add("family", "gaussian", {"lam": 1.0}, S=S, D=D, dtype="float32", probe=rnd)
    if px:
        add("family", "offset", {"offset": 1e3, "lam": 1.0}, S=S, D=D, dtype="float32", probe=PARALLAX_PROBES[2])
        add("family", "gaussian", {"lam": 1.0}, S=S2, D=D, dtype="float32", probe=PARALLAX_PROBES[3])
    else:
        add("family", "offset", {"offset": 1e3, "lam": 1.0}, S=S2, D=D, dtype="float32")
        add("family", "spectrum", {"kappa": 1e6, "rotate": 1}, S=S2 if full else 20, D=D, dtype="float32")
        add("family", "lambda_decades", DECADES[0], S=S2, D=D, dtype="float16")
    add("shape", "gaussian", {"lam": 1.0}, S=19, D=D, dtype="bfloat16", B=2, H=1, probe=rnd)
    add("shape", "gaussian", {"lam": 1.0}, S=1, D=D, dtype="float32", B=2, probe=rnd)  # t = 0, two sequences
    add("shape", "gaussian", {"lam": 1.0}, S=7, D=D, dtype="float32", probe=rnd)  # a cache shorter than a tile
    if full:
        # the forward's hardest families for the solve and the centring
        for fam in ("subspace", "clusters", "early"):
            add("family", fam, FAMILY_CELLS[fam], S=S, D=D, dtype="float32", probe=rnd)
        for S3, D3, B, H in ((255, 128, 1, 1), (1000, 64, 1, 1)):
            add("shape", "gaussian", {"lam": 1.0}, S=S3, D=D3, dtype="bfloat16", B=B, H=H, probe=rnd)
    return cells, skipped


def plan_op(op: str, impl, *, full: bool = False, seed: int = 0) -> tuple[list[Cell], list[dict]]:
    """The cells of operator ``op`` (registry/operators.py) for ``impl``, and the skipped ones."""
    if op == "lla":
        return plan(impl, full=full, seed=seed)
    if op == "parallax":
        return plan_parallax(impl, full=full, seed=seed)
    return plan_decode(op, impl, full=full, seed=seed)
