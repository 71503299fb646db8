"""The audit's report files: report.json (every number) and report.html (for people).

The HTML is one self-contained file: plots are PNGs rendered with Matplotlib's Agg
backend and embedded as base64 data URIs, so it can be mailed, attached to a CI run
or opened from an artefact store without its directory. It reads top-down:
verdict, regressions, failing cells with their attribution, worst cells with the
command that replays each, then the plots, then every cell.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os

from lla_verify.audit.baseline import fmt_ratio, ratio_number
from lla_verify.budget.verdict import THRESHOLD  # drawn on every ratio axis: the one threshold, never a copy

RATIO_FLOOR = 1e-6  # ratios of 0 (exact answers) are drawn here on log axes
CAUSE_COLORS = {"ok": "#2b8a3e", "implementation": "#c92a2a", "conditioning": "#e67700",
                "solver": "#5f3dc4", "non-finite": "#000000"}
DTYPE_COLORS = {"float32": "#1c7ed6", "bfloat16": "#e8590c", "float16": "#2f9e44", "float64": "#495057"}


def wall_text(meta: dict) -> str:
    """The run's time for headers: a merged report's is the sum over its slices, which
    may have run side by side, so it says so rather than pass for a wall time."""
    wall = float(meta.get("wall_s") or 0)
    parts = meta.get("merged_from") or []
    return f"{wall:.0f} s summed over {len(parts)} slices" if parts else f"{wall:.0f} s"


RATIO_CEIL = 1e4  # larger ratios (and inf/nan) are drawn on this line as off-scale triangles


def _pos(x: float) -> float:
    if math.isnan(x) or x > RATIO_CEIL:
        return RATIO_CEIL
    return max(x, RATIO_FLOOR)


def _off(x: float) -> bool:
    return math.isnan(x) or x > RATIO_CEIL


def _ratio_axis(ax, label: str) -> None:
    ax.axhline(THRESHOLD, color="#c92a2a", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_ylim(RATIO_FLOOR / 3, RATIO_CEIL * 4)
    ax.set_ylabel(label)


def write_reports(report: dict, out: str) -> tuple[str, str]:
    """report.json, then report.html, each written whole or not at all (``atomic_write``):
    a Ctrl-C during the write of a partial report leaves no truncated file."""
    from lla_verify.cliutil import atomic_write

    os.makedirs(out, exist_ok=True)
    jpath = os.path.join(out, "report.json")
    atomic_write(jpath, json.dumps(report, indent=1, allow_nan=False))
    hpath = os.path.join(out, "report.html")
    atomic_write(hpath, render_html(report))
    return jpath, hpath


# ------------------------------------------------------------------ plots
def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100})
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _mpl().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_overview(cells: list[dict]) -> str | None:
    """Every cell's ratio, one column per sweep: the whole audit in one picture."""
    if not cells:
        return None
    plt = _mpl()
    sweeps = list(dict.fromkeys(c["sweep"] for c in cells))
    fig, ax = plt.subplots(figsize=(8.5, 2.9))
    for xi, sw in enumerate(sweeps):
        cs = [c for c in cells if c["sweep"] == sw]
        for j, c in enumerate(cs):
            x = xi + (j / max(len(cs) - 1, 1) - 0.5) * 0.6
            r = ratio_number(c["ratio"])
            ax.scatter(x, _pos(r), s=22 if c.get("passed") else 44,
                       marker="^" if _off(r) else ("o" if c.get("passed") else "X"),
                       color=CAUSE_COLORS.get(c.get("cause"), "#888"), edgecolor="none", alpha=0.8)
    _ratio_axis(ax, "error / budget (worst check)")
    ax.set_xticks(range(len(sweeps)), sweeps)
    handles = [ax.scatter([], [], color=col, s=22, label=cause) for cause, col in CAUSE_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="attribution",
              title_fontsize=7)
    ax.set_title(f"every cell, forward and gradient (X: over budget; triangles: above {RATIO_CEIL:g} or non-finite)")
    return _png(fig)


def plot_kappa(cells: list[dict]) -> str | None:
    """error/budget against kappa(Sigma_i), one panel per dtype: per query (dots) and per cell (rings)."""
    with_q = [c for c in cells if c.get("queries", {}).get("kappa")]
    if not with_q:
        return None
    plt = _mpl()
    dts = list(dict.fromkeys(c["dtype"] for c in with_q))
    fig, axes = plt.subplots(1, len(dts), figsize=(4.6 * len(dts), 3.4), squeeze=False, sharey=True)
    for ax, dt in zip(axes[0], dts):
        cs = [c for c in with_q if c["dtype"] == dt]
        xs, ys = [], []
        for c in cs:
            for k, r in zip(c["queries"]["kappa"], c["queries"]["ratio"]):
                if k is not None and ratio_number(k) > 0 and math.isfinite(ratio_number(k)):
                    xs.append(ratio_number(k))
                    ys.append(_pos(ratio_number(r)))
        ax.scatter(xs, ys, s=3, color=DTYPE_COLORS.get(dt, "#555"), alpha=0.25, edgecolor="none", label="queries")
        for c in cs:
            k = ratio_number(c.get("kappa_worst"))
            if not (k > 0 and math.isfinite(k)):
                continue
            r = ratio_number(c.get("forward_ratio", c["ratio"]))
            ax.scatter(k, _pos(r), s=30, marker="^" if _off(r) else "o", facecolor="none",
                       edgecolor="#c92a2a" if r > THRESHOLD or math.isnan(r) else "#212529", lw=0.9)
        ax.scatter([], [], s=30, facecolor="none", edgecolor="#212529", label="cell worst")
        _ratio_axis(ax, "forward error / budget" if ax is axes[0][0] else "")
        ax.set_xscale("log")
        ax.set_xlabel("kappa(Sigma_i)")
        ax.set_title(dt)
        ax.legend(loc="upper left", fontsize=7)
    return _png(fig)


def plot_heatmap(cells: list[dict]) -> str | None:
    """worst error/budget over the (scale, lambda) grid of the bandwidth family, per dtype."""
    grid = [c for c in cells if c["sweep"] == "scale-lambda"]
    panels = []
    for dt in dict.fromkeys(c["dtype"] for c in grid):
        cs = [c for c in grid if c["dtype"] == dt]
        lams = sorted({c["params"]["lam"] for c in cs})
        scales = sorted({c["params"]["scale"] for c in cs})
        if len(lams) >= 2 and len(scales) >= 2:
            panels.append((dt, cs, lams, scales))
    if not panels:
        return None
    plt = _mpl()
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.2), squeeze=False)
    for ax, (dt, cs, lams, scales) in zip(axes[0], panels):
        M = [[math.nan] * len(scales) for _ in lams]
        for c in cs:
            M[lams.index(c["params"]["lam"])][scales.index(c["params"]["scale"])] = math.log10(_pos(ratio_number(c["ratio"])))
        norm = TwoSlopeNorm(vmin=-3.0, vcenter=0.0, vmax=2.0)
        im = ax.imshow([[min(max(x, -3.0), 2.0) if not math.isnan(x) else math.nan for x in row] for row in M],
                       cmap="RdYlGn_r", norm=norm, aspect="auto", origin="lower")
        for i in range(len(lams)):
            for j in range(len(scales)):
                if not math.isnan(M[i][j]):
                    r = 10 ** M[i][j]
                    ax.text(j, i, f"{r:.2g}" if r < RATIO_CEIL else "off", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set_yticks(range(len(lams)), [f"{x:g}" for x in lams])
        ax.set_xlabel("qk_scale (bandwidth family)")
        ax.set_ylabel("lambda")
        ax.set_title(f"error / budget, {dt}")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="log10 ratio")
    return _png(fig)


def plot_cg(cells: list[dict], tol: float) -> str | None:
    with_it = [c for c in cells if c.get("queries", {}).get("cg_iters")]
    if not with_it:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for dt in dict.fromkeys(c["dtype"] for c in with_it):
        xs, ys = [], []
        for c in with_it:
            if c["dtype"] != dt:
                continue
            for k, it in zip(c["queries"]["kappa"], c["queries"]["cg_iters"]):
                if ratio_number(k) > 0 and math.isfinite(ratio_number(k)):
                    xs.append(ratio_number(k))
                    ys.append(ratio_number(it))
        ax.scatter(xs, ys, s=4, alpha=0.35, color=DTYPE_COLORS.get(dt, "#555"), edgecolor="none", label=dt)
    if tol > 0:
        from lla_verify.cg.bound import cg_bound

        ks = [10 ** (e / 10) for e in range(0, 101)]
        ax.plot(ks, [cg_bound(k, tol) for k in ks], color="#212529", lw=1,
                label=f"bound ceil(sqrt(kappa)/2 ln(2/tol)), tol {tol:.0e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kappa(Sigma_i)")
    ax.set_ylabel("CG iterations")
    ax.set_title("CG iterations against conditioning")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_grad(cells: list[dict]) -> str | None:
    gs = [c for c in cells if (c.get("grad") or {}).get("status") == "checked"]
    if not gs:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    for dt in dict.fromkeys(c["dtype"] for c in gs):
        cs = [c for c in gs if c["dtype"] == dt]
        for off in (False, True):
            sel = [c for c in cs if _off(ratio_number(c["grad"]["ratio"])) == off]
            ax.scatter([max(ratio_number(c.get("kappa_max")), 1.0) if math.isfinite(ratio_number(c.get("kappa_max"))) else 1e30
                        for c in sel], [_pos(ratio_number(c["grad"]["ratio"])) for c in sel], s=18, marker="^" if off else "o",
                       color=DTYPE_COLORS.get(dt, "#555"), label=dt if not off else None)
    _ratio_axis(ax, "gradient error / budget")
    ax.set_xscale("log")
    ax.set_xlabel("kappa max of the cell")
    ax.set_title("gradients (fixed cotangent)")
    ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------ html
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#212529;
font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dee2e6}
.verdict{padding:14px 18px;border-radius:6px;color:#fff;font-size:18px;margin:12px 0}
.pass{background:#2b8a3e} .fail{background:#c92a2a}
.verdict small{display:block;font-size:13px;opacity:.95;margin-top:4px}
.meta{color:#495057;font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #dee2e6;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f1f3f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px}
pre{background:#f8f9fa;border:1px solid #e9ecef;padding:6px 8px;white-space:pre-wrap;margin:4px 0}
.cause{font-weight:600} .bad{color:#c92a2a;font-weight:600} .ok{color:#2b8a3e}
img{max-width:100%;display:block;margin:8px 0}
details summary{cursor:pointer;color:#1c7ed6}
"""


def _escape(x) -> str:
    return html.escape(str(x))


def _fmt_sci(x) -> str:
    if x is None:
        return ""
    v = ratio_number(x)
    return f"{v:.2e}" if math.isfinite(v) else str(x)


def _cause(c: str) -> str:
    return f'<span class="cause" style="color:{CAUSE_COLORS.get(c, "#333")}">{_escape(c)}</span>'


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    h = "".join(f"<th>{_escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{x}</td>' for i, x in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _ratio_key(c: dict) -> float:
    v = ratio_number(c.get("ratio"))
    return math.inf if math.isnan(v) else v


def _ratios(c: dict) -> str:
    g = c.get("grad") or {}
    txt = f"forward {fmt_ratio(c.get('forward_ratio', c['ratio']))}"
    return txt + (f", gradient {fmt_ratio(g['ratio'])}" if g.get("status") == "checked" else "")


def _cell_table(cs: list[dict], *, failing: bool) -> str:
    head = ["ratio", "over budget" if failing else "ratios", "attribution", "kappa worst", "reproduce"]
    rows = [[f"<b>{fmt_ratio(c['ratio'])}</b>",
             _escape("+".join(c.get("failed_checks") or [])) + f"<br><span class=meta>{_escape(_ratios(c))}</span>"
             if failing else _escape(_ratios(c)),
             _cause(c["cause"]), _fmt_sci(c.get("kappa_worst")), f"<code>{_escape(c['command'])}</code>"] for c in cs]
    return _table(head, rows, numeric={0, 3})


def render_html(report: dict) -> str:
    """The audit's HTML page: verdict, regressions, short tables, plots, failure details
    and the table of all cells, in that order."""
    cells = report["cells"]
    failed = sorted((c for c in cells if not c.get("passed")), key=_ratio_key, reverse=True)
    parts = _html_head(report)
    if report.get("baseline") is not None:
        parts += _html_regressions(report)
    ops = list(dict.fromkeys(_op(c) for c in cells))
    if ops in ([], ["lla"]):
        # Short tables up front; the Verdicts' full messages come after the plots.
        parts += _html_cell_tables(cells, failed)
        parts += _html_by_sweep(cells)
        parts += _html_plots(report)
    else:
        parts += _html_operator_index(report, ops)
        for op in ops:  # one section per operator, each with its own tables and plots
            parts += _html_operator(report, op)
    if failed:
        parts += _html_failure_details(failed)
    parts += _html_all_cells(report)
    parts.append("</body></html>")
    return "\n".join(parts)


def _op(c: dict) -> str:
    return c.get("op", "lla")


OPERATOR_TITLES = {"lla": "LLA", "parallax": "Parallax", "lla-decode": "LLA decode",
                   "parallax-decode": "Parallax decode"}
OPERATOR_NOTES = {
    "parallax": "o = nu - C r judged by budget.parallax (forward: conditioning from the oracle's sensitivity and "
                "the same-precision dense rule; backward: dq, dk, dv, dr against float64 autograd).",
    "lla-decode": "Every position of each case decoded in one call (a batch of B S sequences, cache tails NaN) "
                  "and judged row by row against the forward's output by the forward's budget "
                  "(budget.forward.check_forward); kappa and CG statistics as for the forward.",
    "parallax-decode": "Every position decoded in one call and judged against the forward's row by the "
                       "Parallax forward budget (budget.parallax.check_parallax_forward).",
}


def _html_operator_index(report: dict, ops: list[str]) -> list[str]:
    """One line per operator: its implementation, cells, failures and worst ratio."""
    impls = (report.get("meta") or {}).get("impls") or {}
    rows = []
    for op in ops:
        cs = [c for c in report["cells"] if _op(c) == op]
        nf = sum(1 for c in cs if not c.get("passed"))
        w = max(cs, key=_ratio_key)
        rows.append([f"<a href='#op-{_escape(op)}'>{_escape(OPERATOR_TITLES.get(op, op))}</a>",
                     _escape(impls.get(op, (report.get("meta") or {}).get("impl") if op == "lla" else "")),
                     str(len(cs)), f"<span class={'bad' if nf else 'ok'}>{nf}</span>", fmt_ratio(w["ratio"])])
    return ["<h2>Operators</h2>", _table(["operator", "implementation", "cells", "failed", "worst ratio"], rows,
                                         numeric={2, 3, 4})]


def _html_operator(report: dict, op: str) -> list[str]:
    """The section of one operator: its verdict line, tables and plots."""
    cells = [c for c in report["cells"] if _op(c) == op]
    failed = sorted((c for c in cells if not c.get("passed")), key=_ratio_key, reverse=True)
    impls = (report.get("meta") or {}).get("impls") or {}
    title = OPERATOR_TITLES.get(op, op)
    parts = [f"<h2 id='op-{_escape(op)}' style='font-size:20px;border-bottom:2px solid #495057'>{_escape(title)}: "
             f"{_escape(impls.get(op, ''))} &mdash; <span class={'bad' if failed else 'ok'}>{len(failed)} of "
             f"{len(cells)} cells over threshold</span></h2>"]
    if op in OPERATOR_NOTES:
        parts.append(f"<p class=meta>{_escape(OPERATOR_NOTES[op])}</p>")
    parts += _html_cell_tables(cells, failed)
    parts += _html_by_sweep(cells)
    if op == "lla":
        parts += _html_plots(dict(report, cells=cells))
        return parts
    img = plot_overview(cells)
    if img:
        parts.append(f"<img alt='{_escape(title)} cells' src='{img}'>")
    kimg = plot_kappa(cells)
    if kimg:
        parts.append(f"<img alt='{_escape(title)} error against kappa' src='{kimg}'>")
    return parts


def _html_head(report: dict) -> list[str]:
    """Title, the verdict bar and the run's metadata."""
    v, meta = report["verdict"], report.get("meta", {})
    regs = report.get("regressions") or []
    ok = v["passed"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lla-verify audit: {_escape(meta.get('impl'))}"
             f"</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>lla-verify audit: {_escape(meta.get('impl'))} on {_escape(meta.get('device'))} "
                 f"({_escape(meta.get('mode'))})</h1>")
    line = f"{v['n_failed']} of {v['n_cells']} cells over threshold"
    if v.get("interrupted"):
        line += f"; INCOMPLETE: {_escape(v['interrupted'])}"
    if v.get("not_run"):
        line += f"; INCOMPLETE: {_escape(v['not_run'])}"
    if v.get("cuda_context_lost"):
        line += f"; CUDA context lost in {len(v['cuda_context_lost'])} cells (the kernel faulted on the device)"
    if report.get("baseline") is not None:
        line += f"; {len(regs)} regression{'s' if len(regs) != 1 else ''} against the baseline"
    worst = (f"worst ratio {fmt_ratio(v['worst_ratio'])} at <code style='color:#fff'>{_escape(v['worst_spec'])}</code>"
             if v.get("worst_spec") else "")
    causes = ", ".join(f"{n} {_escape(k)}" for k, n in v.get("causes", {}).items())
    parts.append(f"<div class='verdict {'pass' if ok else 'fail'}'><b>{'PASS' if ok else 'FAIL'}</b>: {line}"
                 f"<small>{worst}{' &mdash; failures by cause: ' + causes if causes else ''}</small></div>")
    vers = meta.get("versions", {})
    parts.append(f"<div class='meta'>{_escape(meta.get('date'))} &middot; {_escape(meta.get('impl_description', ''))} "
                 f"&middot; compute {_escape(meta.get('compute_dtype'))}, solver tol {_escape(meta.get('solver_tol'))} "
                 f"&middot; torch {_escape(vers.get('torch'))}, triton {_escape(vers.get('triton'))} "
                 f"({_escape(vers.get('triton_mode'))})"
                 f" &middot; {_escape(wall_text(meta))}<br><code>{_escape(meta.get('command', ''))}</code><br>"
                 f"Each cell: error / budget of its worst query (budget derived per query from conditioning and the "
                 f"compute precision, SPEC 8); a cell fails above 1. {_escape(v.get('gradients_note') or '')}</div>")
    return parts


def _html_regressions(report: dict) -> list[str]:
    b, meta = report["baseline"], report.get("meta", {})
    regs = report.get("regressions") or []
    parts = ["<h2>Regressions against the baseline</h2>",
             f"<p>{b['matched']} cells matched by case spec, {b['new']} new, {b['missing']} no longer run. "
             f"Rule: {_escape(meta.get('regression_rule', ''))}.</p>"]
    if regs:
        parts.append(_table(["what", "ratio (old \u2192 new)", "case", "reproduce"],
                            [[f"<span class=bad>{_escape(r['why'])}</span>",
                              f"{fmt_ratio(r['baseline_ratio'])} &rarr; {fmt_ratio(r['ratio'])}",
                              f"<code>{_escape(r['spec'])}</code>", f"<code>{_escape(r['command'])}</code>"]
                             for r in regs]))
    else:
        parts.append("<p class=ok>No regression.</p>")
    return parts


def _html_cell_tables(cells: list[dict], failed: list[dict]) -> list[str]:
    """The worst failing cells (at most 15), then the worst passing ones."""
    parts = []
    if failed:
        parts.append(f"<h2>Failing cells ({len(failed)}), worst first</h2>")
        parts.append(_cell_table(failed[:15], failing=True))
        if len(failed) > 15:
            parts.append(f"<p class=meta>{len(failed) - 15} more below (failure details) and in report.json.</p>")
        parts.append("<p class=meta>Each command replays its cell and prints the full verdict; the messages are "
                     "also under <a href='#details'>failure details</a>.</p>")
    passing = [c for c in cells if c.get("passed")]
    parts.append("<h2>Worst passing cells</h2>" if failed else "<h2>Worst cells</h2>")
    parts.append(_cell_table(sorted(passing, key=_ratio_key, reverse=True)[:5 if failed else 8], failing=False))
    return parts


def _html_by_sweep(cells: list[dict]) -> list[str]:
    rows = []
    for sw in dict.fromkeys(c["sweep"] for c in cells):
        cs = [c for c in cells if c["sweep"] == sw]
        w = max(cs, key=_ratio_key)
        nf = sum(1 for c in cs if not c.get("passed"))
        t = sum(ratio_number(c.get("time_s")) for c in cs if c.get("time_s") is not None)
        rows.append([_escape(sw), str(len(cs)), f"<span class={'bad' if nf else 'ok'}>{nf}</span>", fmt_ratio(w["ratio"]),
                     f"<code>{_escape(w['spec'])}</code>", f"{t:.2f}"])
    return ["<h2>By sweep</h2>",
            _table(["sweep", "cells", "failed", "worst ratio", "worst case", "impl time (s)"], rows,
                   numeric={1, 2, 3, 5})]


def _html_plots(report: dict) -> list[str]:
    """Each plot with its caption; a line saying why the CG or gradient plot is absent."""
    v, meta, cells = report["verdict"], report.get("meta", {}), report["cells"]
    plt_tol = float(meta.get("solver_tol") or 0.0)
    plots = [
        ("All cells", plot_overview(cells), ""),
        ("Error / budget against kappa", plot_kappa(cells),
         "Dots: sampled queries of every cell; rings: each cell's worst query. Points above the dashed line fail."),
        ("Scale &times; lambda (bandwidth family)", plot_heatmap(cells),
         "Worst ratio per cell (forward or gradient); green well within budget, red over. Scale 1e-4 is uniform "
         "weights, 1e2 one-hot."),
        ("CG iterations", plot_cg(cells, plt_tol),
         "Per query; the line is the textbook bound for unpreconditioned CG (SPEC 5)."),
        ("Gradients", plot_grad(cells), "Backward check with a fixed cotangent (budget.check_backward)."),
    ]
    parts = []
    for title, img, caption in plots:
        if img:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='{img}'><div class=meta>{caption}</div>")
    if not plots[3][1]:
        parts.append("<p class=meta>No CG statistics: the implementation has no forward_with_stats "
                     "(a direct solve, or a kernel that does not report them).</p>")
    if not plots[4][1]:
        parts.append(f"<p class=meta>Gradients: {_escape(v.get('gradients_note') or 'not checked')}.</p>")
    return parts


def _html_failure_details(failed: list[dict]) -> list[str]:
    """The full verdict messages of the worst 60 failing cells."""
    parts = [f"<h2 id=details>Failure details ({len(failed)})</h2>"]
    for c in failed[:60]:
        g = c.get("grad") or {}
        msgs = ([c.get("message", "")] if not c.get("forward_passed", False) else []) + \
            ([g["message"]] if g.get("status") == "checked" and not g.get("passed") else [])
        parts.append(f"<p><b>{_escape(' + '.join(c.get('failed_checks') or ['forward']))} over budget</b> "
                     f"({_ratios(c)}) &middot; attribution {_cause(c['cause'])}<br>"
                     f"<code>{_escape(c['command'])}</code></p><pre>{_escape(chr(10).join(msgs))}</pre>")
    if len(failed) > 60:
        parts.append(f"<p>{len(failed) - 60} more failing cells in the table below and in report.json.</p>")
    return parts


def _html_all_cells(report: dict) -> list[str]:
    """Every cell, and every skipped one, in collapsed tables."""
    cells = report["cells"]
    parts = ["<h2>All cells</h2><details><summary>show the table of all "
             f"{len(cells)} cells</summary>"]
    # with several operators the sweep column names the cell's operator too
    many = len({_op(c) for c in cells}) > 1
    parts.append(_table(
        ["sweep", "case", "ratio", "cause", "err max", "kappa max", "NaN/Inf", "CG mean/max", "CG res max",
         "grad", "time (ms)"],
        [[_escape(f"{_op(c)} {c['sweep']}" if many else c["sweep"]), f"<code>{_escape(c['spec'])}</code>",
          fmt_ratio(c["ratio"]), _cause(c["cause"]), _fmt_sci(c.get("err_max")),
          _fmt_sci(c.get("kappa_max")), f"{c.get('n_nan', 0)}/{c.get('n_inf', 0)}",
          (f"{c['cg_iters_mean']:.1f}/{c['cg_iters_max']}" if "cg_iters_mean" in c else ""),
          _fmt_sci(c.get("cg_residual_max")),
          (fmt_ratio(c["grad"]["ratio"]) if (c.get("grad") or {}).get("status") == "checked" else "&ndash;"),
          f"{1e3 * ratio_number(c.get('time_s')):.1f}" if c.get("time_s") is not None else ""] for c in cells],
        numeric={2, 4, 5, 6, 8, 9, 10}))
    parts.append("</details>")
    if report.get("skipped"):
        parts.append(f"<details><summary>{len(report['skipped'])} cells skipped</summary>")
        parts.append(_table(["case", "reason"], [[f"<code>{_escape(s['spec'])}</code>", _escape(s["reason"])]
                                                 for s in report["skipped"]]))
        parts.append("</details>")
    return parts
