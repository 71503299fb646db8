"""``lla-verify cg``: CG iterations and final error against kappa(Sigma_i) (issue 6, docs/cg.md).

Sweeps the spectrum family's kappa over a log grid from 1 to 1e8, with the bad
scaling on the key axes (rotate=0, where Jacobi helps) and hidden behind a rotation
(rotate=1). For every query of every problem it records kappa(Sigma_i), the bound,
the float64 reference CG (plain and Jacobi), the same CG in float32 on the rounded
Sigma_i, and the kernel (plain and Jacobi, with statistics) when it can run here;
then writes

    cg_iterations.png   iterations to tolerance against kappa (log x), with the bound
    cg_error.png        final relative error of rho and of o against the float64 oracle
    cg_points.csv       one row per query and problem
    cg_points.json      the same rows, with the settings and per-problem summaries

--quick: CPU (the kernel through the Triton interpreter), S = 48, D = 16.
--full:  GPU sizes, S = 1024 with D = 64 and S = 2048 with D = 128.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import torch

from lla_verify.registry.cases import Case
from lla_verify.cliutil import UsageError, atomic_write, check_device, check_out_dir, float_in, int_in, jsonable, save_figure, seed_type
from lla_verify.cg.bound import U32, bound_applies, finite_precision_limit, iteration_bound
from lla_verify.cg.kernel import cg_records, kernel_defaults, triton_unavailable

KAPPAS_MAX = 1000  # grid points; a denser log grid from 1 to 1e8 adds nothing but time
QUICK = dict(shapes=((48, 16),), kappas=9, B=1, H=1)
FULL = dict(shapes=((1024, 64), (2048, 128)), kappas=9, B=1, H=1)


def kappa_grid(n: int) -> list[float]:
    """n points, log-spaced from 1 to 1e8 inclusive."""
    if n < 1:
        raise ValueError(f"--kappas: expected >= 1, got {n}")
    if n == 1:
        return [1.0]
    return [float(10.0 ** (8.0 * i / (n - 1))) for i in range(n)]


def _device(requested: str | None, full: bool) -> str:
    if requested:
        return requested
    return "cuda" if (full and torch.cuda.is_available()) else "cpu"


def _kernel_reason(impl_name: str | None, device: str) -> str | None:
    if not impl_name or impl_name == "none":
        return "no implementation asked for (--impl none)"
    if impl_name == "triton":
        return triton_unavailable(device)
    from lla_verify.registry.impls import get_impl, is_available

    impl = get_impl(impl_name)
    if impl.forward_with_stats is None:
        return f"{impl.name} reports no CG statistics"
    return is_available(impl, device)


def run_study(*, impl_name="triton", full=False, out="cg-study", seed=0, kappas=None, shapes=None,
              tol=None, max_iters=None, device=None, progress=True, log=print) -> dict:
    """Run the sweep; returns the JSON document it wrote (settings, summaries, rows)."""
    from tqdm import tqdm

    cfg = FULL if full else QUICK
    shapes = tuple(shapes or cfg["shapes"])
    grid = kappa_grid(int(kappas if kappas is not None else cfg["kappas"]))
    dev = _device(device, full)
    d_tol, _, why_defaults = kernel_defaults()
    tol = float(tol if tol is not None else d_tol)
    fixed_iters = max_iters

    def iters_for(D):  # the kernel's own cap depends on D
        return int(fixed_iters) if fixed_iters is not None else kernel_defaults(D)[1]
    reason = _kernel_reason(impl_name, dev)
    impl = None
    if reason is None:
        from lla_verify.registry.impls import get_impl

        impl = get_impl(impl_name)
        log(f"cg: kernel {impl.name} on {dev}, tol {tol:g}, max_iters "
            f"{', '.join(f'{iters_for(D)} (D={D})' for _, D in shapes)}")
    else:
        log(f"cg: kernel skipped: {reason}; running the float64 and float32 reference CG only")
    if why_defaults:
        log(f"cg: kernel defaults unknown ({why_defaults}); using tol {tol:g}, max_iters {iters_for(shapes[0][1])}")

    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows, summaries, notes = [], [], set()
    jobs = [(S, D, rot, kap) for (S, D) in shapes for rot in (0, 1) for kap in grid]
    t0 = time.time()
    bar = tqdm(jobs, desc="cg sweep", unit="problem", disable=not progress)
    for S, D, rot, kap in bar:
        bar.set_postfix_str(f"S={S} D={D} rotate={rot} kappa={kap:.0e}")
        case = Case("spectrum", {"kappa": kap, "rotate": rot}, B=cfg["B"], H=cfg["H"], S=S, D=D,
                    dtype="float32", seed=seed)
        problem = case.build(dev)
        rec = cg_records(problem, tol=tol, max_iters=iters_for(D), impl=impl, device=dev)
        if rec.kernel_skipped:
            notes.add(rec.kernel_skipped)
        for r in rec.rows():
            r.update(S=S, D=D, rotate=rot, kappa_param=kap, seed=seed)
            rows.append(r)
        summaries.append(_summary(rec, S=S, D=D, rotate=rot, kappa_param=kap))
    elapsed = time.time() - t0

    doc = {
        "settings": {"impl": impl_name, "kernel_ran": impl is not None, "kernel_skipped": reason,
                     "notes": sorted(notes), "device": dev, "mode": "full" if full else "quick",
                     "tol": tol, "max_iters": {str(D): iters_for(D) for _, D in shapes}, "seed": seed, "kappa_grid": grid,
                     "shapes": [list(s) for s in shapes], "u32": U32, "seconds": round(elapsed, 1)},
        "summaries": summaries,
        "rows": rows,
    }
    _write_csv(outdir / "cg_points.csv", rows)
    atomic_write(outdir / "cg_points.json", json.dumps(jsonable(doc), indent=1))
    _plot_iterations(outdir / "cg_iterations.png", rows, doc["settings"])
    _plot_error(outdir / "cg_error.png", rows, doc["settings"])
    log(format_table(summaries, kernel=impl is not None))
    log(f"cg: wrote {outdir}/cg_iterations.png, cg_error.png, cg_points.csv, cg_points.json ({elapsed:.0f} s)")
    return doc


def _med(t):
    t = t.to(torch.float64)
    t = t[torch.isfinite(t)]
    return float(t.median()) if t.numel() else math.nan


def _max(t):
    t = t.to(torch.float64)
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else math.nan


def _summary(rec, **keys) -> dict:
    c = rec.columns
    s = dict(keys)
    s["kappa_median"] = _med(c["kappa"])
    s["kappa_jacobi_median"] = _med(c["kappa_jacobi"])
    s["bound_median"] = _med(c["bound"])
    for name in ("ref64_plain", "ref64_jacobi", "ref32_plain", "ref32_jacobi", "kernel_plain", "kernel_jacobi"):
        if f"{name}_iters" in c:
            s[f"{name}_iters_median"] = _med(c[f"{name}_iters"])
            s[f"{name}_iters_max"] = _max(c[f"{name}_iters"])
    for name in ("kernel_plain", "kernel_jacobi"):
        if f"{name}_iters" in c:
            s[f"{name}_over_limit"] = int((c[f"{name}_iters"] > c["limit"]).sum())
            s[f"{name}_res_max"] = _max(c[f"{name}_res"])
            s[f"{name}_err_o_median"] = _med(c[f"{name}_err_o"])
        if f"{name}_err_rho" in c:
            s[f"{name}_err_rho_median"] = _med(c[f"{name}_err_rho"])
    return s


def format_table(summaries, *, kernel: bool) -> str:
    """Median iterations per problem; one line each."""
    head = f"{'S':>5} {'D':>4} {'rot':>3} {'kappa':>8} {'k(Sig)':>9} {'bound':>7} {'f64 p/j':>9} {'f32 p/j':>9}"
    if kernel:
        head += f" {'kern p/j':>9} {'over':>5} {'err_rho':>9}"
    lines = [head]
    for s in summaries:
        line = (f"{s['S']:>5} {s['D']:>4} {s['rotate']:>3} {s['kappa_param']:>8.0e} {s['kappa_median']:>9.2e} "
                f"{s['bound_median']:>7.0f} {s['ref64_plain_iters_median']:>4.0f}/{s['ref64_jacobi_iters_median']:<4.0f}"
                f" {s['ref32_plain_iters_median']:>4.0f}/{s['ref32_jacobi_iters_median']:<4.0f}")
        if kernel:
            over = s.get("kernel_plain_over_limit", 0) + s.get("kernel_jacobi_over_limit", 0)
            line += (f" {s['kernel_plain_iters_median']:>4.0f}/{s['kernel_jacobi_iters_median']:<4.0f}"
                     f" {over:>5d} {s.get('kernel_plain_err_rho_median', math.nan):>9.1e}")
        lines.append(line)
    return "\n".join(lines)


def _write_csv(path, rows):
    if not rows:
        atomic_write(path, "")
        return
    names = list(rows[0])
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=names)
    w.writeheader()
    for r in rows:
        w.writerow({k: _scalar(v) for k, v in r.items()})
    atomic_write(path, fh.getvalue())


def _scalar(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


# ------------------------------------------------------------------ plots
_SERIES = (  # column prefix, label, colour, marker, line style
    ("ref64_plain", "float64 CG, plain", "tab:blue", "o", "-"),
    ("ref64_jacobi", "float64 CG, Jacobi", "tab:orange", "s", "-"),
    ("ref32_plain", "float32 dense CG, plain", "tab:blue", "o", ":"),
    ("ref32_jacobi", "float32 dense CG, Jacobi", "tab:orange", "s", ":"),
    ("kernel_plain", "kernel, plain", "tab:green", "^", "--"),
    ("kernel_jacobi", "kernel, Jacobi", "tab:red", "v", "--"),
)


def _groups(rows, S, D, rot):
    """Rows of one (S, D, rotate), grouped by kappa_param, in grid order."""
    out = {}
    for r in rows:
        if r["S"] == S and r["D"] == D and r["rotate"] == rot:
            out.setdefault(r["kappa_param"], []).append(r)
    return [out[k] for k in sorted(out)]


def _panels(rows):
    shapes = sorted({(r["S"], r["D"]) for r in rows})
    return [(S, D, rot) for (S, D) in shapes for rot in (0, 1)]


def _plot_series(ax, groups, series, floor: float | None = None) -> None:
    """Per series (row key, label, colour, marker, line style) present in the rows: every
    row as a faint point over kappa, and the median of each kappa group as a line;
    values below ``floor`` (a zero would vanish from a log plot) drawn at it."""
    lift = (lambda y: y) if floor is None else (lambda y: max(y, floor))
    for key, label, colour, marker, ls in series:
        if key not in groups[0][0]:
            continue
        xs = [r["kappa"] for g in groups for r in g]
        ys = [lift(r[key]) for g in groups for r in g]
        ax.scatter(xs, ys, s=4, color=colour, marker=marker, alpha=0.12, linewidths=0)
        mx = [_median([r["kappa"] for r in g]) for g in groups]
        my = [lift(_median([r[key] for r in g])) for g in groups]
        ax.plot(mx, my, color=colour, marker=marker, ls=ls, ms=4, label=f"{label} (median)")


def _label_panel(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kappa(Sigma_i)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _save_panels(plt, fig, axes, st, path) -> None:
    axes[0][0].legend(fontsize=6.5, loc="upper left")
    fig.suptitle(_title(st), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _plot_iterations(path, rows, st):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    tol, mi = st["tol"], st["max_iters"]
    for ax, (S, D, rot) in zip(axes[0], panels):
        groups = _groups(rows, S, D, rot)
        kmin = min(r["kappa"] for g in groups for r in g)
        kmax = max(r["kappa"] for g in groups for r in g if math.isfinite(r["kappa"]))
        _plot_series(ax, groups, [(f"{prefix}_iters", *rest) for prefix, *rest in _SERIES])
        kk = torch.logspace(math.log10(max(kmin, 1.0)), math.log10(kmax), 100, dtype=torch.float64)
        ax.plot(kk, iteration_bound(kk, tol), color="black", lw=1.2,
                label="bound ceil(sqrt(k)/2 ln(2 sqrt(k)/tol))")
        ka = kk[bound_applies(kk, D)]
        if ka.numel():
            ax.plot(ka, finite_precision_limit(ka, tol, D, 10**9), color="black", lw=0.8, ls="--",
                    label="allowed fp32: bound at 2 kappa, + 2 (up to 1/(2 D u32))")
        ax.axhline(D, color="tab:gray", lw=0.6, ls="--", label=f"D = {D} (exact CG terminates)")
        cap = mi[str(D)] if isinstance(mi, dict) else mi
        ax.axhline(cap, color="grey", lw=0.8, ls="-.", label=f"max_iters = {cap}")
        ax.axvline(1.0 / (2 * D * st["u32"]), color="grey", lw=0.6, ls=":", label="kappa = 1/(2 D u32)")
        _label_panel(ax, "CG iterations to ||r|| <= tol ||mu||", f"S={S} D={D} rotate={rot} tol={tol:g}")
        ax.set_ylim(1, max(3 * cap, 10))
    _save_panels(plt, fig, axes, st, path)


def _plot_error(path, rows, st):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    tol = st["tol"]
    series = (
        ("ref64_plain_err_rho", "rho: float64 CG, plain", "tab:blue", "o", "-"),
        ("ref32_plain_err_rho", "rho: float32 dense CG, plain", "tab:blue", "o", ":"),
        ("ref32_jacobi_err_rho", "rho: float32 dense CG, Jacobi", "tab:orange", "s", ":"),
        ("kernel_plain_err_rho", "rho: kernel, plain", "tab:green", "^", "--"),
        ("kernel_jacobi_err_rho", "rho: kernel, Jacobi", "tab:red", "v", "--"),
        ("kernel_plain_err_o", "o: kernel, plain", "tab:purple", "D", "-"),
        ("kernel_jacobi_err_o", "o: kernel, Jacobi", "tab:brown", "D", "-."),
    )
    floor = 1e-18  # a zero error would vanish from a log plot
    for ax, (S, D, rot) in zip(axes[0], panels):
        groups = _groups(rows, S, D, rot)
        kmax = max(r["kappa"] for g in groups for r in g if math.isfinite(r["kappa"]))
        _plot_series(ax, groups, series, floor=floor)
        kk = torch.logspace(0, math.log10(kmax), 50, dtype=torch.float64)
        ax.plot(kk, (tol * kk).clamp_max(10.0), color="black", lw=1.0, label="tol * kappa (error from residual tol)")
        ax.plot(kk, (st["u32"] * kk).clamp_max(10.0), color="grey", lw=1.0, ls="--", label="u32 * kappa")
        _label_panel(ax, "relative error vs float64 oracle", f"S={S} D={D} rotate={rot}")
    _save_panels(plt, fig, axes, st, path)


def _title(st) -> str:
    k = "kernel ran" if st["kernel_ran"] else f"kernel skipped: {st['kernel_skipped']}"
    return f"lla-verify cg --{st['mode']} ({st['device']}, seed {st['seed']}); {k}"


def _median(xs):
    xs = sorted(x for x in xs if isinstance(x, (int, float)) and math.isfinite(x))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ------------------------------------------------------------------ the command
def _check_args(args) -> None:
    """Every argument checked before the sweep: a usage error names it (exit 2)."""
    if args.device is not None:
        check_device(args.device)
    if args.impl not in ("none", "triton"):
        from lla_verify.registry.impls import get_impl
        from lla_contract import LLAInputError

        try:
            get_impl(args.impl)
        except LLAInputError as exc:
            raise UsageError(str(exc).replace("--lla-impl", "--impl")) from None
    check_out_dir(args.out)


def _run(args) -> int:
    _check_args(args)
    if not args.full and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available() \
            and args.impl == "triton":
        # --quick runs the kernel on CPU through the interpreter; say so instead of skipping silently
        os.environ["TRITON_INTERPRET"] = "1"
        print("lla-verify cg: --quick on CPU: setting TRITON_INTERPRET=1 for the Triton kernel")
    from lla_verify.trust import Misbehaved

    try:
        run_study(impl_name=args.impl, full=args.full, out=args.out, seed=args.seed, kappas=args.kappas,
                  tol=args.tol, max_iters=args.max_iters, device=args.device, progress=not args.no_progress)
    except Misbehaved as exc:  # a breach of the calling contract: no study of its statistics is possible
        print(f"lla-verify cg: FAIL: {args.impl} broke the calling contract: {exc}")
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("cg", help="CG iterations and error against kappa(Sigma_i): plots, CSV, JSON (docs/cg.md)")
    p.add_argument("--impl", default="triton", help="implementation with CG statistics (default triton; 'none' for "
                                                    "the reference CG only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU through the Triton interpreter, S=48, D=16 (default)")
    mode.add_argument("--full", action="store_true", help="GPU sizes: S=1024 D=64 and S=2048 D=128")
    p.add_argument("--out", default="cg-study", help="output directory (default cg-study)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the spectrum problems")
    p.add_argument("--kappas", type=int_in(1, KAPPAS_MAX), default=None,
                   help=f"grid points from 1 to 1e8, 1 to {KAPPAS_MAX} (default 9)")
    p.add_argument("--tol", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=None,
                   help="CG relative tolerance in (0, 1) (default: the kernel's DEFAULT_CG_TOL)")
    p.add_argument("--max-iters", type=int_in(0, 2**31 - 1), default=None,
                   help="kernel CG iteration cap, >= 0 (default: the kernel's own, 16 D)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --full when present, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=_run)
