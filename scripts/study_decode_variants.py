"""Variants of parallax_decode's split kernel timed against the package's and SDPA in one run.

A study, not a benchmark of record (that is `lla-verify bench-decode`): it asks which change
to the split kernel moves parallax_decode towards SDPA where the cache is large and the call
is bandwidth-bound. Each variant is timed with the package's combine, on the inputs
bench-decode draws (bf16, unit Gaussian q, k, v, the probe r ~ N(0, 1/D)), and its output is
compared with the float64 decode reference on the shapes up to a 32k cache, so a fast wrong
variant shows as wrong.

Variants (constexpr flags of one kernel here, the package's kernel untouched):
- tile BLOCK_N, warps and pipeline stages of the split kernel;
- ONE_SIDED: the tile's cross-moment as X_t = sum_j c_j v'_j with c_j = w_j (d_j - dbar_t),
  centred in d only. sum_j c_j is 0 up to rounding, so the term nu'_t sum_j c_j that the
  two-sided form subtracts is of the order of the sum's own rounding, and the tile pass
  (v'_j - nu'_t) and one column reduction go;
- DOTS: the two row products (scores and d) as one tl.dot of the tile with [q, r] and the two
  column sums (omega nu' and X) as one tl.dot of [w, c] with the values tile, at tf32x3
  (three tf32 products: about fp32's accuracy).

    PYTHONPATH=.:kernels python scripts/study_decode_variants.py --out study.md

--graphs: every call (SDPA too) captured in a CUDA graph and its replays timed, device time
without host work (bench-decode --graphs's capture; the packages through their plans).

--op lla: the same question for lla_decode's output pass (a second memory-bound read of the
cache), its tile, warps and programs an SM set through the package's own constants
(OUT_BLOCK_N, OUT_WARPS, RESIDENT_PER_SM: the last also sets the Sigma pass's split count),
and for the Sigma pass's fp64 block and warps (SIGMA_BLOCK, SPLIT_WARPS),
each variant timed as a whole lla_decode call at lambda 0.1 with its largest CG iteration
count, and its fp32 output compared with the float64 decode reference.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

import parallax_decode as pd
from lla_contract.host import cdiv, f32_arrays, sm_count


# the package's helpers: the variants differ from its split kernel in the tile's moments only
_scalar, _head, _merge, _store_moments = pd._scalar, pd._head, pd._merge, pd._store_moments


@triton.jit
def _col(mat, offs_c, j):
    """Column j of a (rows, 16) tile as a row vector."""
    return tl.sum(tl.where(offs_c[None, :] == j, mat, 0.0), 1)


@triton.jit
def _row(mat, offs_c, j):
    """Row j of a (16, cols) tile as a column vector."""
    return tl.sum(tl.where(offs_c[:, None] == j, mat, 0.0), 0)


@triton.jit(do_not_specialize=('H', 'G', 'T', 'n_splits'))
def _split_variant(Q, R, K, V, LENS, M_S, OM_S, DB_S, NU_S, X_S,
                   H, G, T, n_splits, split, scale,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                   ONE_SIDED: tl.constexpr, DOTS: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _head(bh, H, G)
    L = tl.load(LENS + b)
    start = pid_s * split
    end = tl.minimum(start + split, L)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    offs_c = tl.arange(0, 16)
    q = tl.load(Q + bh.to(tl.int64) * D + offs_d).to(tl.float32)
    r = tl.load(R + bh.to(tl.int64) * D + offs_d).to(tl.float32)
    kbase = K + kvh * T * D
    vbase = V + kvh * T * DV
    k0 = tl.load(kbase + offs_d).to(tl.float32)
    v0 = tl.load(vbase + offs_v).to(tl.float32)
    if DOTS:
        qr = tl.where(offs_c[None, :] == 0, q[:, None] * scale, tl.where(offs_c[None, :] == 1, r[:, None], 0.0))

    m_i = _scalar(float("-inf"))
    omega = _scalar(0.0)
    dbar = _scalar(0.0)
    nu = tl.zeros([DV], dtype=tl.float32)
    x = tl.zeros([DV], dtype=tl.float32)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        k = tl.load(kbase + offs_n[:, None] * D + offs_d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        v = tl.load(vbase + offs_n[:, None] * DV + offs_v[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
        kd = k - k0[None, :]
        vd = v - v0[None, :]
        if DOTS:
            ad = tl.dot(kd, qr, input_precision="tf32x3")
            a = tl.where(keep, _col(ad, offs_c, 0), float("-inf"))
            d = _col(ad, offs_c, 1)
        else:
            a = tl.where(keep, scale * tl.sum(kd * q[None, :], 1), float("-inf"))
            d = tl.sum(kd * r[None, :], 1)
        m_t = tl.max(a, 0)
        w = tl.exp(a - m_t)
        om_t = tl.sum(w, 0)
        db_t = tl.sum(w * d, 0) / om_t
        c = w * (d - db_t)
        if DOTS:
            wc = tl.where(offs_c[None, :] == 0, w[:, None], tl.where(offs_c[None, :] == 1, c[:, None], 0.0))
            sums = tl.dot(tl.trans(wc), vd, input_precision="tf32x3")
            nu_t = _row(sums, offs_c, 0) / om_t
            x_t = _row(sums, offs_c, 1)
        else:
            nu_t = tl.sum(w[:, None] * vd, 0) / om_t
            if ONE_SIDED:
                x_t = tl.sum(c[:, None] * vd, 0)
            else:
                x_t = tl.sum(c[:, None] * (vd - nu_t[None, :]), 0)
        m_new = tl.maximum(m_i, m_t)
        alpha = tl.exp(m_i - m_new)
        beta = tl.exp(m_t - m_new)
        omega, nu, dbar, x = _merge(omega * alpha, nu, dbar, x * alpha, om_t * beta, nu_t, db_t, x_t * beta)
        m_i = m_new
    _store_moments(M_S, OM_S, DB_S, NU_S, X_S, bh.to(tl.int64) * n_splits + pid_s, m_i, omega, dbar, nu, x,
                   offs_v, DV)


def variant_call(q, r, k, v, lens_d, scale, *, block_n, warps, stages, resident, one_sided, dots):
    B, H, D = q.shape
    T, Dv = k.shape[2], v.shape[-1]
    slots = sm_count(q.device) * resident
    split = pd.choose_split(T, B * H, block_n, slots, pd.combine_chunk(Dv))
    n_splits = cdiv(T, split)
    m_s, om_s, db_s = f32_arrays(3, B * H * n_splits, q.device)
    nu_s, x_s = torch.empty(2, B * H, n_splits, Dv, device=q.device, dtype=torch.float32).unbind(0)
    _split_variant[(n_splits, B * H)](q, r, k, v, lens_d, m_s, om_s, db_s, nu_s, x_s, H, 1, T, n_splits, split,
                                      float(scale), D=D, DV=Dv, BLOCK_N=block_n, STAGES=stages,
                                      ONE_SIDED=one_sided, DOTS=dots, num_warps=warps)
    N = B * H
    parts = {"m": m_s[:N * n_splits].view(N, n_splits), "omega": om_s[:N * n_splits].view(N, n_splits),
             "dbar": db_s[:N * n_splits].view(N, n_splits), "nu": nu_s, "x": x_s, "split": split, "lengths": lens_d}
    return pd.parallax_decode_combine(parts, q, v)


def variant_error(name, bn, warps, stages, res, one_sided, dots, q, r, k, v, lengths, lens_d, scale, ref):
    """Relative error of the variant against the float64 reference, run on the same values
    in fp32 (the fp32 output is not rounded to bf16, so the split kernel's own arithmetic
    shows rather than the output's rounding)."""
    q, r, k, v = (t.float() for t in (q, r, k, v))
    if name == "as package":
        out = pd.parallax_decode(q, r, k, v, lengths, qk_scale=scale, check_finite=False)
    else:
        out = variant_call(q, r, k, v, lens_d, scale, block_n=bn, warps=warps, stages=stages, resident=res,
                           one_sided=one_sided, dots=dots)
    return float((out.double() - ref.to(out.device)).norm() / ref.norm())


def _resident(resident, D: int) -> int:
    """A variant's programs an SM at head dim D."""
    if resident is None:
        resident = FOUR_WARP_RESIDENT
    return resident[D] if isinstance(resident, dict) else resident


def check(device="cpu") -> int:
    """Every variant at a small shape on ``device`` (a CPU under TRITON_INTERPRET=1, or a GPU),
    against the float64 reference."""
    from lla_verify.oracles.decode import parallax_decode_reference

    g = torch.Generator().manual_seed(0)
    B, T, D = 2, 200, 16
    k, v = torch.randn(B, 1, T, D, generator=g) + 3.0, torch.randn(B, 1, T, D, generator=g)
    q, r = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g) / 4
    lengths = torch.tensor([T, 77])
    scale = D ** -0.5
    ref = parallax_decode_reference(q, r, k, v, lengths, qk_scale=scale)
    k, v, q, r = (t.to(device) for t in (k, v, q, r))
    lens_d = lengths.to(device=device, dtype=torch.int32)
    worst = 0.0
    for name, bn, warps, stages, resident, one_sided, dots in VARIANTS:
        err = variant_error(name, min(bn, 32), warps, stages, _resident(resident, D), one_sided, dots, q, r, k, v,
                            lengths, lens_d, scale, ref)
        print(f"{name}: rel err {err:.2e}")
        worst = max(worst, err)
    return 0 if worst < 1e-5 else 1


# programs an SM of the 4-warp, 64-position kernel the variants below were first timed
# against (ptxas's register counts at D <= 64 and D = 128)
FOUR_WARP_RESIDENT = {16: 4, 32: 4, 64: 4, 128: 2}

VARIANTS = [
    # name, block_n, warps, stages, resident (programs an SM: an int, or by D; None: the
    # 4-warp kernel's FOUR_WARP_RESIDENT), one_sided, dots. "as package" times
    # parallax_decode itself, at whatever the package sets.
    ("as package", pd.BLOCK_N, pd.SPLIT_WARPS, pd.SPLIT_STAGES, pd.RESIDENT_PER_SM, False, False),
    ("n64 w4", 64, 4, 3, None, False, False),
    ("w8", 64, 8, 3, None, False, False),
    ("n128 w4", 128, 4, 3, None, False, False),
    ("n128 w8", 128, 8, 3, None, False, False),
    ("s2", 64, 4, 2, None, False, False),
    ("s4", 64, 4, 4, None, False, False),
    ("n32 w2", 32, 2, 3, None, False, False),
    ("one-sided", 64, 4, 3, None, True, False),
    ("one-sided n128 w8", 128, 8, 3, None, True, False),
    ("dots", 64, 4, 3, None, True, True),
    ("dots n128 w8", 128, 8, 3, None, True, True),
    ("dots w8", 64, 8, 3, None, True, True),
    ("n32 w2 r8", 32, 2, 3, 8, False, False),
    ("n16 w1 r8", 16, 1, 3, 8, False, False),
    ("n32 w1 r8", 32, 1, 3, 8, False, False),
    ("n64 w2", 64, 2, 3, None, False, False),
    ("n16 w1 r16", 16, 1, 3, 16, False, False),
    ("n32 w1 r16", 32, 1, 3, 16, False, False),
    ("n16 w1 r12", 16, 1, 3, 12, False, False),
    ("n16 w1 r8 s4", 16, 1, 4, 8, False, False),
    # fewer, longer splits: at batch 1 eight programs an SM make up to 8 x SMs splits of one
    # or two tiles, and the combine merges them in one program
    ("n16 w1 r2", 16, 1, 3, 2, False, False),
    ("n16 w1 r4", 16, 1, 3, 4, False, False),
]

SHAPES = [(16, 32768, 64), (64, 32768, 64), (64, 131072, 64), (64, 4096, 64),
          (16, 32768, 128), (64, 32768, 128), (64, 4096, 128)]


def _time(fn, graphs: bool) -> float:
    """Median ms of ``fn`` by do_bench (L2 flushed between calls); with ``graphs``, of the
    replays of ``fn`` captured in a CUDA graph (bench-decode --graphs: device time, no host
    work)."""
    from triton.testing import do_bench

    if graphs:
        from lla_verify.commands.bench_decode import graphed

        fn, _ = graphed(fn)
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


LLA_VARIANTS = [
    # name, out_block_n, out_warps, resident per SM, Sigma block, split warps (None: the package's)
    ("as package", None, None, None, None, None),
    ("out n16 w1 r8", 16, 1, 8, None, None),
    ("out n32 w1 r8", 32, 1, 8, None, None),
    ("out n16 w1 r4", 16, 1, 4, None, None),
    ("out n64 w4 r8", 64, 4, 8, None, None),
    # the Sigma pass: smaller fp64 blocks (more programs a split, fewer registers each)
    ("sigma bs32 w4", None, None, None, 32, 4),
    ("sigma bs32 w8", None, None, None, 32, 8),
    ("sigma bs32 w4 + out n16 w1 r8", 16, 1, 8, 32, 4),
]


class _LLASetting:
    """lla_decode's output-pass constants set for the duration of a ``with`` block."""

    def __init__(self, out_bn, out_warps, resident, sigma_block=None, split_warps=None):
        import lla_decode

        self.mod, self.new = lla_decode, {}
        for key, val in (("OUT_BLOCK_N", out_bn), ("OUT_WARPS", out_warps), ("SIGMA_BLOCK", sigma_block),
                         ("SPLIT_WARPS", split_warps)):
            if val is not None:
                self.new[key] = val
        if resident is not None:
            self.new["RESIDENT_PER_SM"] = {d: resident for d in lla_decode.RESIDENT_PER_SM}

    def __enter__(self):
        self.old = {k: getattr(self.mod, k) for k in self.new}
        for k, v in self.new.items():
            setattr(self.mod, k, v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            setattr(self.mod, k, v)


def lla_main(args, shapes, wanted) -> list[str]:
    import lla_decode

    from lla_verify.oracles.decode import lla_decode_reference

    dev, lam = "cuda", 0.1
    lines = ["| B,H,T,D | variant | ms | x SDPA | CG iters (max) | rel err vs float64 (fp32 run) |",
             "|---|---|---|---|---|---|"]
    for B, T, D in shapes:
        g = torch.Generator(device=dev).manual_seed(7 * B + T + D)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float32, generator=g).to(torch.bfloat16)  # noqa: E731
        k, v = rnd(B, 1, T, D), rnd(B, 1, T, D)
        q = rnd(B, 1, D)
        lengths = torch.full((B,), T, dtype=torch.int64)
        q4 = q[:, :, None, :]
        t_sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v), args.graphs)
        ref = None
        if T <= args.ref_max_cache:
            ref = lla_decode_reference(q.double(), k.double(), v.double(), lengths, ridge_lambda=lam).to(dev)
        label = f"{B},1,{T},{D}"
        lines.append(f"| {label} | SDPA | {t_sdpa:.4f} | 1.00x | - | - |")
        print(lines[-1], flush=True)
        for name, *setting in LLA_VARIANTS:
            if wanted is not None and name not in wanted:
                continue
            with _LLASetting(*setting):
                try:
                    _, stats = lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=lam, check_finite=False,
                                                     return_stats=True)
                    if args.graphs:  # the plan, made under this variant's constants: a plain call is not capturable
                        plan = lla_decode.lla_decode_plan(k, v, lengths, ridge_lambda=lam)
                        fn = lambda: plan.run(q, check_finite=False)  # noqa: E731
                    else:
                        fn = lambda: lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=lam,  # noqa: E731
                                                           check_finite=False)
                    t = _time(fn, args.graphs)
                    err = "-"
                    if ref is not None:
                        o32 = lla_decode.lla_decode(q.float(), k.float(), v.float(), lengths, ridge_lambda=lam,
                                                    check_finite=False)
                        err = f"{float((o32.double() - ref).norm() / ref.norm()):.2e}"
                except Exception as exc:  # a variant that does not compile or fit is a row
                    lines.append(f"| {label} | {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
                    print(lines[-1], flush=True)
                    continue
            it = int(stats["cg_iters"].max())
            lines.append(f"| {label} | {name} | {t:.4f} | {t / t_sdpa:.2f}x | {it} | {err} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ref-max-cache", type=int, default=32768)
    ap.add_argument("--check", action="store_true",
                    help="every variant against the float64 reference at a small shape (on a CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--one-level-max-tiles", type=int, default=None,
                    help="parallax_decode.ONE_LEVEL_MAX_TILES for this run (the package's split rule, every variant)")
    ap.add_argument("--op", choices=("parallax", "lla"), default="parallax")
    ap.add_argument("--graphs", action="store_true",
                    help="time replays of each call captured in a CUDA graph (SDPA's too): device time, no host work")
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--shapes", default=None, help="B:T:D,... (default: SHAPES)")
    args = ap.parse_args(argv)
    if args.one_level_max_tiles is not None:
        pd.ONE_LEVEL_MAX_TILES = args.one_level_max_tiles
    if args.check:
        return check("cuda" if torch.cuda.is_available() else "cpu")
    if args.op == "lla":
        shapes = ([tuple(int(x) for x in sh.split(":")) for sh in args.shapes.split(",")] if args.shapes
                  else SHAPES)
        lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
                 ""] + lla_main(args, shapes, set(args.variants.split(",")) if args.variants else None)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        return 0

    from lla_verify.oracles.decode import parallax_decode_reference

    dev = "cuda"
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", "",
             "| B,H,T,D | variant | ms | x SDPA | GB/s | rel err vs float64 |", "|---|---|---|---|---|---|"]
    print(lines[0], flush=True)
    shapes = [tuple(int(x) for x in sh.split(":")) for sh in args.shapes.split(",")] if args.shapes else SHAPES
    wanted = set(args.variants.split(",")) if args.variants else None
    variants = [vt for vt in VARIANTS if wanted is None or vt[0] in wanted]
    for B, T, D in shapes:
        g = torch.Generator(device=dev).manual_seed(7 * B + T + D)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float32, generator=g).to(torch.bfloat16)  # noqa: E731
        k, v = rnd(B, 1, T, D), rnd(B, 1, T, D)
        q = rnd(B, 1, D)
        r = (torch.randn(B, 1, D, device=dev, dtype=torch.float32, generator=g) / D ** 0.5).to(torch.bfloat16)
        lengths = torch.full((B,), T, dtype=torch.int64)
        lens_d = lengths.to(device=dev, dtype=torch.int32)
        scale = D ** -0.5
        cache_bytes = 2 * B * T * D * 2
        q4 = q[:, :, None, :]
        t_sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v), args.graphs)
        ref = None
        if T <= args.ref_max_cache:
            ref = parallax_decode_reference(q, r, k, v, lengths, qk_scale=scale).to(dev)
        label = f"{B},1,{T},{D}"
        row = f"| {label} | SDPA | {t_sdpa:.4f} | 1.00x | {cache_bytes / t_sdpa / 1e6:.0f} | - |"
        lines.append(row)
        print(row, flush=True)
        for name, bn, warps, stages, resident, one_sided, dots in variants:
            res = _resident(resident, D)
            if name == "as package" and args.graphs:  # a plain call copies its lengths: not capturable
                plan = pd.parallax_decode_plan(k, v, lengths, qk_scale=scale)
                fn = lambda: plan.run(q, r, check_finite=False)  # noqa: E731
            elif name == "as package":
                fn = lambda: pd.parallax_decode(q, r, k, v, lengths, qk_scale=scale, check_finite=False)  # noqa: E731
            else:
                fn = (lambda bn=bn, warps=warps, stages=stages, res=res, one_sided=one_sided, dots=dots:  # noqa: E731
                      variant_call(q, r, k, v, lens_d, scale, block_n=bn, warps=warps, stages=stages, resident=res,
                                   one_sided=one_sided, dots=dots))
            try:
                t = _time(fn, args.graphs)
            except Exception as exc:  # a variant that does not compile or fit is a row, not the end of the run
                row = f"| {label} | {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |"
                lines.append(row)
                print(row, flush=True)
                continue
            err = "-"
            if ref is not None:
                err = variant_error(name, bn, warps, stages, res, one_sided, dots, q, r, k, v, lengths, lens_d, scale,
                                    ref)
                err = f"{err:.2e}"
            row = f"| {label} | {name} | {t:.4f} | {t / t_sdpa:.2f}x | {cache_bytes / t / 1e6:.0f} | {err} |"
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
