"""What bf16 weights in the Parallax forward's value products would cost in accuracy.

    PYTHONPATH=.:kernels python scripts/study_parallax_bf16_weights.py [--S 64 256] [--dims 16 64]
        [--seeds 4] [--orderings N] [--out FILE.md]

On a fast tile (docs/kernels-parallax.md §3, "Fast tiles") the forward forms the scores
and d in one bf16 product each, and the value products w vp and we vp at tf32x3: 12 of the
tile's 14 bf16 units of tensor-core work, against FlashAttention's 2 (§9). The lever this
measures, for bf16 inputs: the weights rounded to bf16, w~ = bf16(w), normalised by their
own sum W~ = sum_j w~_j, so that nu_i = sum_j w~_ij v_j / W~_i is an exact weighted mean
for weights perturbed by at most 2^-9 (one bf16 product against the exact bf16 v, one
unit), and the co-moment's weights we_ij = w~_ij (d_ij - dbar_i) in P bf16 parts
(P products against v): the tile would cost 3 + P units instead of 14.

For every case family x probe family, bf16 inputs, it computes the forward with that
arithmetic (plain products as a fast tile forms them, fp32 sums, one pass over the keys
instead of the kernel's tiles: the tiles' merges add fp32 roundings only) and judges it
as the property suite judges an implementation: the Parallax budget
(budget.parallax.check_parallax_forward) and issue 22's same-precision target
(budget.parallax.kernel_target). Beside it, the same one-pass computation with fp32
weights (the arithmetic of today's fast tiles), and the share of (query, key) entries the
fast-tile condition admits (kernels.fast_thresholds): the lever would only apply on fast
tiles, so only cases where every entry is fast say what it would do to the benchmark's
inputs. A study, not a test: it prints a table and writes nothing into the package.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

BF16 = torch.bfloat16


def _bf16_parts(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """x as n bf16 values whose sum approximates it, each the bf16 rounding of what the
    previous ones leave (fp32 arithmetic)."""
    parts, rest = [], x
    for _ in range(n):
        p = rest.to(BF16).to(torch.float32)
        parts.append(p)
        rest = rest - p
    return parts


def _exact_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product of bf16-valued fp32 operands as a tensor core forms it: exact products
    (16 significant bits fit fp32), one fp32 rounding of the sum (here: float64 sum, rounded)."""
    return (a.double() @ b.double()).to(torch.float32)


def one_pass(q, k, v, r, scale, *, weights: str, we_parts: int) -> torch.Tensor:
    """The forward of a fast tile's arithmetic over all keys at once, float32 out.

    weights "fp32": w and we enter the value products unrounded (today's tf32x3 products,
    modelled exact); "bf16": w~ = bf16(w) normalised by sum w~, and we in ``we_parts`` bf16
    parts against the exact bf16 v."""
    qf, kf, vf, rf = (t.float() for t in (q, k, v, r))
    S = q.shape[-2]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    a = _exact_dot(qf, kf.transpose(-1, -2)) * scale
    a = a.masked_fill(~mask, -math.inf)
    w = torch.exp(a - a.amax(-1, keepdim=True))
    # bf16 inputs: d_ij = <k_j, r_i> - <k_0, r_i>, one exact-product bf16 dot and the row's c0
    c0 = _exact_dot(rf, kf[..., :1, :].transpose(-1, -2))
    d = (_exact_dot(rf, kf.transpose(-1, -2)) - c0).masked_fill(~mask, 0.0)
    v0 = vf[..., :1, :]
    if weights == "fp32":
        W = w.sum(-1, keepdim=True)
        nup = (w.double() @ (vf - v0).double()).float() / W
        dbar = (w * d).sum(-1, keepdim=True) / W
        we = w * (d - dbar)
        cm = (we.double() @ (vf - v0).double()).float() - nup * we.sum(-1, keepdim=True)
        return v0 + nup - cm / W
    wt = w.to(BF16).float()
    W = wt.sum(-1, keepdim=True)
    nu = _exact_dot(wt, vf) / W
    dbar = (wt * d).sum(-1, keepdim=True) / W
    parts = _bf16_parts(wt * (d - dbar), we_parts)
    cm = sum(_exact_dot(p, vf) for p in parts) - nu * sum(p.sum(-1, keepdim=True) for p in parts)
    return nu - cm / W


def fast_share(q, k, r, scale, D) -> float:
    """The share of causal (query, key) entries whose plain score and plain d the fast-tile
    condition admits, for bf16 inputs (kd_j = |k_j| + |k_0|)."""
    sys.path.insert(0, "kernels")
    from parallax_triton.kernels import fast_thresholds

    ta, td = fast_thresholds(BF16, D)
    qn = scale * q.double().norm(dim=-1)
    kn = k.double().norm(dim=-1)
    kd = kn + kn[..., :1]
    rn = r.double().norm(dim=-1)
    S = q.shape[-2]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    ok = (qn[..., :, None] * kn[..., None, :] <= ta) & (rn[..., :, None] * kd[..., None, :] <= td)
    return float(ok[..., mask].double().mean())


def drawn_params(family, seed: int) -> dict:
    """Seed 0: the family's easy parameters; others: each parameter drawn uniformly over its
    range (on a log scale where it is logarithmic), so that the hard ends are reached."""
    if seed == 0:
        return family.easy()
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for p in family.params:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        x = math.exp(math.log(p.lo) + u * (math.log(p.hi) - math.log(p.lo))) if p.log and p.lo > 0 else (
            p.lo + u * (p.hi - p.lo))
        out[p.name] = p.clip(x)
    return out


def main(argv=None) -> int:
    from lla_verify.budget.parallax import check_parallax_forward, kernel_target
    from lla_verify.oracles.parallax import parallax_forward
    from lla_verify.registry.cases import FAMILIES, Case
    from lla_verify.registry.parallax import PROBES, ParallaxCase, ProbeOutOfRange

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--S", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, default=4, help="seed 0 the easy parameters, the others drawn")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="bf16 parts of we to try")
    ap.add_argument("--orderings", type=int, default=None,
                    help="coordinate orderings of the target's dense error (default: the target's own, "
                         "budget.parallax.TARGET_ORDERINGS; fewer run faster at large S and D)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience
        def tqdm(x, **_):
            return x

    variants = [("fp32", 0)] + [("bf16", p) for p in args.parts]
    cols = ["fp32 w"] + [f"bf16 w, we x{p}" for p in args.parts]
    rows = []
    jobs = [(f, pr, S, D, s) for f in FAMILIES for pr in PROBES for S in args.S for D in args.dims
            for s in range(args.seeds)]
    worst: dict = {}
    for fam, probe, S, D, seed in tqdm(jobs, desc="cases"):
        pc = ParallaxCase(Case(fam, drawn_params(FAMILIES[fam], seed), 1, 1, S, D, "bfloat16", seed), probe)
        try:
            p = pc.build("cpu")
        except ProbeOutOfRange:
            continue
        o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        extra = {} if args.orderings is None else {"orderings": args.orderings}
        allowed, _ = kernel_target(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, o64=o64, **extra)
        share = fast_share(p.q, p.k, p.r, p.qk_scale, D)
        key = (fam, probe)
        w = worst.setdefault(key, {"share": 1.0, "budget": [0.0] * len(variants), "target": [0.0] * len(variants)})
        w["share"] = min(w["share"], share)
        for i, (wt, parts) in enumerate(variants):
            o = one_pass(p.q, p.k, p.v, p.r, p.qk_scale, weights=wt, we_parts=parts)
            verdict = check_parallax_forward(p.q, p.k, p.v, p.r, o.to(BF16), impl=f"{wt}x{parts}",
                                             case=pc.spec(), qk_scale=p.qk_scale, compute_dtype=torch.float32)
            err = (o.to(BF16).double() - o64).norm(dim=-1)
            w["budget"][i] = max(w["budget"][i], float(verdict.ratio))
            w["target"][i] = max(w["target"][i], float((err / allowed).max()))
    head = ("| family | probe | fast share (min) | " + " | ".join(f"{c}: budget / target" for c in cols) + " |\n"
            + "|---" * (3 + len(cols)) + "|")
    for (fam, probe), w in worst.items():
        cells = " | ".join(f"{b:.3g} / {t:.3g}" for b, t in zip(w["budget"], w["target"]))
        rows.append(f"| {fam} | {probe} | {w['share']:.2f} | {cells} |")
    fast = [w for w in worst.values() if w["share"] == 1.0]
    summary = [f"cases: bf16, S in {args.S}, D in {args.dims}, {args.seeds} seeds; worst ratio per family x probe "
               f"(error / budget, error / issue 22's target; over 1 fails)"]
    for i, c in enumerate(cols):
        over_b = sum(1 for w in fast if w["budget"][i] > 1.0)
        over_t = sum(1 for w in fast if w["target"][i] > 1.0)
        summary.append(f"- {c}: of the {len(fast)} family x probe cells whose every entry is fast, {over_b} over "
                       f"budget, {over_t} over the target; worst {max((w['target'][i] for w in fast), default=0):.3g} "
                       f"of the target")
    text = "\n".join(summary + ["", head] + rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
