"""Time two copies of the parallax_triton package against each other and torch SDPA, in one run.

    mkdir -p /tmp/px_old && git archive main kernels/parallax_triton | tar -x -C /tmp/px_old
    PYTHONPATH=.:kernels python scripts/ab_parallax.py --old /tmp/px_old/kernels/parallax_triton \
        [--new kernels/parallax_triton] [--rounds 5] [--out FILE]

At issue 22's shapes (bf16, causal; the 'random' probe of bench-parallax), the forward
alone and one forward + backward step of each copy and of causal SDPA (flash backend),
each the median over ``--rounds`` rounds of triton.testing.do_bench medians, the three
alternating within a round so that clock and thermal drift fall on all of them; the
ratios are to SDPA's time in the same run (issue 22's targets: forward <= 2x, forward +
backward <= 2.5x).

Accuracy, so that a speed-up that loses it does not pass unnoticed: each copy's output
and gradients on a registry case of the shape's D (gaussian q, k, v, 'random' probe; one
head, S = min(S, --judge-s)) against the float64 oracle, as the audit judges them
(budget.parallax: error / budget, above 1 a FAIL, with the worst row's error), and the
largest difference between the two copies' outputs and gradients on the timed inputs.

``--new-configs SPEC ...`` times the new copy once more under each tile configuration SPEC
(scripts/parallax_kernel_stats.py's --config syntax: 'BM,BN,WARPS,STAGES' for every kernel,
or 'fwd=..;dq=..;dkdv=..'), as extra columns 'new[i]'; the accuracy rows use the defaults.

``--set NAME=VALUE ...`` sets constants of the new copy's kernels module before it runs
(Python literals), e.g. ``--old kernels/parallax_triton --set FAST_BF16_WEIGHTS=True`` times
the forward with bf16 weights (docs/kernels-parallax.md §3; the forward alone: the step runs
under autograd, where the lever is off) against the default in one run.

``--smoke`` runs one tiny shape on the CPU through the Triton interpreter (set
TRITON_INTERPRET=1): it exercises the script; its times are meaningless.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

from ab_kernels import load_copy
from parallax_kernel_stats import set_configs

from lla_verify.commands.bench_parallax import _judged_case, _probe
from lla_verify.commands.benchkit import BENCH_SHAPES, Table, causal_sdpa, median_ms, randn_inputs, versions_line

SHAPES = BENCH_SHAPES + ((1, 1, 16384, 64),)
DEVICE = "cuda"


def _ms(fn, grads=None) -> float:
    """do_bench's median on CUDA; one host-timed call in a --smoke run."""
    if DEVICE == "cuda":
        return median_ms(fn, grads=grads)
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _judge(fn, D: int, S: int):
    """(forward verdict, backward verdict) of ``fn`` on the judged registry case."""
    import torch

    from lla_verify.budget.parallax import check_parallax_backward, check_parallax_forward
    from lla_verify.registry.operators import COTANGENT_SEED

    p = _judged_case(1, S, D, DEVICE)
    case = f"gaussian/random bf16 S={S} D={D}"
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (p.q, p.k, p.v, p.r))
    o = fn(*leaves, qk_scale=p.qk_scale)
    gen = torch.Generator().manual_seed(COTANGENT_SEED)
    do = torch.randn(tuple(p.v.shape), generator=gen, dtype=torch.float64).to(p.q.dtype).to(p.q.device)
    grads = torch.autograd.grad(o, leaves, do)
    # the forward judged as it is timed, outside autograd (where a copy may take bf16 weights)
    with torch.no_grad():
        o = fn(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
    vf = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl="ab", case=case, qk_scale=p.qk_scale)
    vb = check_parallax_backward(p.q, p.k, p.v, p.r, do, grads, impl="ab", case=case, qk_scale=p.qk_scale)
    return vf, vb


def _cell(v) -> str:
    err = v.summary.get("err_max") if isinstance(v.summary, dict) else None
    return f"{v.ratio:.3f}{'' if v.passed else ' FAIL'}" + (f" (err {err:.2e})" if err is not None else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="directory of the baseline parallax_triton package")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "kernels" / "parallax_triton"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--judge-s", type=int, default=1024, help="S of the accuracy case (float64 autograd is S^2 D)")
    ap.add_argument("--shapes", default=None, help="B,H,S,D;... (default issue 22's four)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--new-configs", nargs="*", default=[], help="extra tile configurations of the new copy")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="constants of the new copy's kernels module (Python literals)")
    ap.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.shapes = args.shapes or "1,2,40,16"
        args.rounds = 1

    import torch

    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    copies = {"old": load_copy(args.old, "parallax_triton_old"), "new": load_copy(args.new, "parallax_triton_new")}
    fns = {c: functools.partial(m.parallax_attention, check_finite=False) for c, m in copies.items()}
    import copy
    import sys

    new_kernels = sys.modules["parallax_triton_new.kernels"]
    import ast

    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(new_kernels, name):
            ap.error(f"--set {item!r}: expected NAME=VALUE with NAME a constant of {new_kernels.__name__}")
        setattr(new_kernels, name, ast.literal_eval(value))
    defaults = copy.deepcopy(new_kernels.GPU_CONFIGS)
    variants = {f"new[{i}]": spec for i, spec in enumerate(args.new_configs)}

    def configured(spec, fn):
        def call(*a, **kw):
            new_kernels.GPU_CONFIGS.clear()
            new_kernels.GPU_CONFIGS.update(copy.deepcopy(defaults))
            if spec is not None:
                set_configs(new_kernels, spec)
            try:
                return fn(*a, **kw)
            finally:
                new_kernels.GPU_CONFIGS.clear()
                new_kernels.GPU_CONFIGS.update(copy.deepcopy(defaults))
        return call

    timed = dict(fns, **{name: configured(spec, fns["new"]) for name, spec in variants.items()})
    table = Table()
    emit = table.emit
    emit(versions_line(date=True) if DEVICE == "cuda" else "SMOKE RUN on the CPU: every time below is meaningless")
    emit(f"old: {args.old}; new: {args.new}" + (f" with {', '.join(args.set)}" if args.set else "")
         + f"; bf16, causal; SDPA flash; median of {args.rounds} interleaved rounds")
    for name, spec in variants.items():
        emit(f"{name}: the new copy with --config {spec!r}")
    emit()
    extra = "".join(f" {n} fwd ms (x SDPA) |" for n in variants) + "".join(f" {n} fwd+bwd ms (x SDPA) |"
                                                                        for n in variants)
    emit("| B,H,S,D | SDPA fwd ms | old fwd ms (x SDPA) | new fwd ms (x SDPA) | new/old | SDPA fwd+bwd ms "
         "| old fwd+bwd ms (x SDPA) | new fwd+bwd ms (x SDPA) | new/old | max abs diff o / dq / dk / dv / dr |"
         + extra)
    emit("|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(variants)))
    judged = {}
    for B, H, S, D in shapes:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = randn_inputs((B, H, S, D), 3, torch.bfloat16, generator=gen, device=DEVICE)
        r = _probe((B, H, S, D), torch.bfloat16, gen, DEVICE)
        g = randn_inputs((B, H, S, D), 1, torch.bfloat16, generator=gen, device=DEVICE)[0]
        outs = {}
        for c, fn in fns.items():
            leaves = tuple(t.clone().requires_grad_() for t in (q, k, v, r))
            o = fn(*leaves)
            o.backward(g)
            outs[c] = (o.detach(),) + tuple(t.grad for t in leaves)
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(outs["old"], outs["new"])]
        del outs
        runs = {"sdpa": lambda *a: causal_sdpa(*a[:3]), **timed}
        times = {(c, p): [] for c in runs for p in ("fwd", "step")}
        for _ in range(args.rounds):
            for c, fn in runs.items():
                leaves = [t.clone().requires_grad_() for t in ((q, k, v) if c == "sdpa" else (q, k, v, r))]

                def fwd(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v, r)

                def step(fn=fn, leaves=leaves):
                    fn(*leaves).backward(g)

                times[(c, "fwd")].append(_ms(fwd))
                times[(c, "step")].append(_ms(step, grads=leaves))
        med = {key: statistics.median(t) for key, t in times.items()}

        def cell(c, p):
            return f"{med[(c, p)]:.3f} ({med[(c, p)] / med[('sdpa', p)]:.2f}x)"

        emit(f"| {B},{H},{S},{D} | {med[('sdpa', 'fwd')]:.3f} | {cell('old', 'fwd')} | {cell('new', 'fwd')} "
             f"| {med[('new', 'fwd')] / med[('old', 'fwd')]:.3f} | {med[('sdpa', 'step')]:.3f} "
             f"| {cell('old', 'step')} | {cell('new', 'step')} | {med[('new', 'step')] / med[('old', 'step')]:.3f} "
             f"| " + " / ".join(f"{x:.2e}" for x in diffs) + " |"
             + "".join(f" {cell(n, 'fwd')} |" for n in variants) + "".join(f" {cell(n, 'step')} |" for n in variants))
        table.write(args.out)
        if D not in judged:
            judged[D] = {c: _judge(fn, D, min(S, args.judge_s)) for c, fn in fns.items()}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    emit()
    emit("accuracy (one head, gaussian q, k, v, 'random' probe, bf16): error / budget of budget.parallax "
         "(above 1 a FAIL), worst row's error")
    emit()
    emit("| D | S | old fwd | new fwd | old grads | new grads |")
    emit("|---|---|---|---|---|---|")
    for D, per in judged.items():
        S = next(min(s[2], args.judge_s) for s in shapes if s[3] == D)
        emit(f"| {D} | {S} | {_cell(per['old'][0])} | {_cell(per['new'][0])} | {_cell(per['old'][1])} "
             f"| {_cell(per['new'][1])} |")
    for D, per in judged.items():
        for c in ("old", "new"):
            for v in per[c]:
                if not v.passed:
                    emit(f"{c} D={D}: {v.message}")
    table.write(args.out)


if __name__ == "__main__":
    main()
