"""Time two copies of the lla_triton package against each other, interleaved, in one run.

    PYTHONPATH=.:kernels python scripts/ab_kernels.py --old /tmp/old/lla_triton [--new kernels/lla_triton]

A kernel change is judged by the ratio new / old at the bench shapes (bf16, causal,
lambda 0.1): forward alone and one fwd+bwd step, each the median of ``--rounds``
rounds of triton.testing.do_bench medians, the two copies alternating within a round
so that clock and thermal drift fall on both (docs/performance.md, METHOD). The
outputs of the two copies are compared too (max abs difference of o, dq, dk, dv), so a
speed-up that changed the numbers does not pass unnoticed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

from lla_verify.commands.benchkit import BENCH_SHAPES, Table, median_ms, randn_inputs, versions_line


def load_copy(path: str, name: str):
    """Import the package at ``path`` under the module name ``name`` (its relative
    imports stay inside the copy; Triton compiles its kernels separately)."""
    init = Path(path) / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="directory of the baseline lla_triton package")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "kernels" / "lla_triton"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    copies = {"old": load_copy(args.old, "lla_triton_old"), "new": load_copy(args.new, "lla_triton_new")}
    lam = args.ridge_lambda
    table = Table()
    emit = table.emit
    emit(versions_line())
    emit(f"old: {args.old}; new: {args.new}; bf16, causal, lambda {lam}; median of {args.rounds} interleaved rounds")
    emit()
    emit("| B,H,S,D | fwd old ms | fwd new ms | new/old | fwd+bwd old ms | fwd+bwd new ms | new/old "
         "| max abs diff o / dq / dk / dv |")
    emit("|---|---|---|---|---|---|---|---|")
    for B, H, S, D in BENCH_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, g = randn_inputs((B, H, S, D), 4, torch.bfloat16, generator=gen)
        times = {(c, p): [] for c in copies for p in ("fwd", "step")}
        outs = {}
        for c, mod in copies.items():
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            o = mod.lla_attention(qq, kk, vv, ridge_lambda=lam)
            o.backward(g)
            outs[c] = (o.detach(), qq.grad, kk.grad, vv.grad)
        for _ in range(args.rounds):
            for c, mod in copies.items():
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))

                def fwd(mod=mod):
                    with torch.no_grad():
                        mod.lla_attention(q, k, v, ridge_lambda=lam)

                def step(mod=mod, qq=qq, kk=kk, vv=vv):
                    mod.lla_attention(qq, kk, vv, ridge_lambda=lam).backward(g)

                times[(c, "fwd")].append(median_ms(fwd))
                times[(c, "step")].append(median_ms(step, grads=[qq, kk, vv]))
        med = {key: statistics.median(v) for key, v in times.items()}
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(outs["old"], outs["new"])]
        emit(f"| {B},{H},{S},{D} | {med[('old', 'fwd')]:.3f} | {med[('new', 'fwd')]:.3f} "
             f"| {med[('new', 'fwd')] / med[('old', 'fwd')]:.3f} | {med[('old', 'step')]:.3f} "
             f"| {med[('new', 'step')]:.3f} | {med[('new', 'step')] / med[('old', 'step')]:.3f} | "
             + " / ".join(f"{x:.2e}" for x in diffs) + " |")
        torch.cuda.empty_cache()
    table.write(args.out)


if __name__ == "__main__":
    main()
