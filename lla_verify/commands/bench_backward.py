"""``lla-verify bench-backward``: forward + backward time of lla_triton against torch SDPA
(flash, causal), with gradient error.

    lla-verify bench-backward [--sweep] [--out FILE]

It lives in the harness, not beside the kernels, because its accuracy columns need the
float64 oracle: the kernel package imports nothing of the harness.

For each (B, H, S, D), bf16, lambda 0.1: the median (triton.testing.do_bench) of one
fwd+bwd step of lla_triton.lla_attention and of causal SDPA (flash backend) timed in
the same run; the backward alone (both kernels, from a saved rho); the CG iterations
of the forward and of the adjoint solve; and the relative L2 error of dq, dk, dv
against autograd through the float64 oracle on the first ``--oracle-heads`` heads
(heads are independent), beside the bf16 rounding floor (the float64 gradient
rounded to bf16). ``--sweep`` first times tile configs of each backward kernel at
the first shape and uses the fastest for its head dim.
"""

from __future__ import annotations

import argparse
import math

from lla_verify.cliutil import UsageError, check_out_file, float_in, int_in
from lla_verify.commands.benchkit import (BENCH_SHAPES, Table, causal_sdpa, median_ms, randn_inputs,
                                          versions_line)

SHAPES = list(BENCH_SHAPES)
SWEEP_A = {64: [(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
           128: [(32, 64, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2),
                 (16, 64, 4, 2)]}
SWEEP_B = {64: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
           128: [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2),
                 (16, 64, 4, 2)]}


def register(sub) -> None:
    p = sub.add_parser("bench-backward", help="time the lla_triton forward + backward against torch SDPA, "
                       "with its gradient error", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="first time the backward's tile configs and use the fastest")
    p.add_argument("--sweep-dims", default="64,128", help="head dims --sweep times (comma list)")
    p.add_argument("--ridge-lambda", type=float_in(0.0, math.inf, hi_open=True), default=0.1)
    p.add_argument("--oracle-heads", type=int_in(1), default=2, help="heads checked against the float64 oracle")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    if args.out is not None:
        check_out_file(args.out)
    dims = [d.strip() for d in args.sweep_dims.split(",")]
    if not all(d.isdigit() and int(d) in SWEEP_A for d in dims):
        raise UsageError(f"--sweep-dims: expected a comma list among {sorted(SWEEP_A)}, got {args.sweep_dims!r}")
    if not torch.cuda.is_available():
        raise UsageError("expected a CUDA device (it times GPU kernels); torch sees none")
    import lla_triton
    from lla_triton import backward as bw

    table = Table()
    lam = args.ridge_lambda
    table.emit(versions_line(date=True))
    table.emit(f"bf16, causal, ridge_lambda {lam}; cg_tol {lla_triton.DEFAULT_CG_TOL}, precision {bw.DEFAULT_PRECISION}")
    if args.sweep:
        for D in (int(x) for x in dims):
            _sweep(table, next(sh for sh in SHAPES if sh[3] == D), lam)
    table.emit()
    table.emit("| B,H,S,D | LLA fwd+bwd ms | fwd ms | bwd ms | SDPA fwd+bwd ms | vs SDPA "
               "| CG iters fwd / bwd (max) | rel err dq / dk / dv | bf16 floor dq / dk / dv |")
    table.emit("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        table.emit(_step_row(shape, lam, args.oracle_heads))
        torch.cuda.empty_cache()
    table.emit()
    table.emit(f"configs used: A {bw.GPU_CONFIGS_A}, B {bw.GPU_CONFIGS_B}")
    table.write(args.out)
    return 0


def _inputs(B, H, S, D, seed=0):
    """q, k, v and the output cotangent g, bf16 standard normal."""
    import torch

    return randn_inputs((B, H, S, D), 4, torch.bfloat16, generator=torch.Generator(device="cuda").manual_seed(seed))


def _backward_only(q, k, v, g, lam, cfg_a=None, cfg_b=None, **options):
    """(a call of the two backward kernels from a saved forward, that forward's output);
    ``options`` override the call's fallback, cg_tol, cg_max_iters or precision."""
    import torch

    import lla_triton
    from lla_triton import backward as bw
    from lla_triton.forward import lla_forward_kernel

    B, H, S, D = q.shape
    q3, k3, v3, g3 = (t.reshape(B * H, S, D) for t in (q, k, v, g))
    lam3 = torch.full((B * H, S), lam, device="cuda")
    fo = lla_forward_kernel(q3, k3, v3, lam3, D ** -0.5, delta_eps=lla_triton.DEFAULT_DELTA_EPS,
                            cg_tol=lla_triton.DEFAULT_CG_TOL, cg_max_iters=lla_triton.default_cg_max_iters(D),
                            preconditioner=None, want_stats=True)
    kw = dict(fallback=fo.fallback, cg_tol=lla_triton.DEFAULT_CG_TOL, cg_max_iters=lla_triton.default_cg_max_iters(D),
              config_a=cfg_a, config_b=cfg_b)
    kw.update(options)

    def call():
        return bw.lla_backward_kernel(q3, k3, v3, fo.rho, lam3, g3, D ** -0.5, **kw)

    return call, fo


def _fastest(table: Table, label: str, configs, call_of) -> tuple:
    """(ms, config) of the fastest of ``configs`` timed through ``call_of(config)``; a
    config the device cannot run is reported and passed over."""
    import triton

    best = None
    for cfg in configs:
        try:
            ms = median_ms(call_of(cfg))
        except triton.runtime.errors.OutOfResources as exc:  # e.g. (64, 64, 8, 2) at D=128
            table.emit(f"  {label} {cfg}: {exc}")
            continue
        table.emit(f"  {label} {cfg}: {ms:.3f}")
        best = min(best or (ms, cfg), (ms, cfg))
    return best


def _sweep(table: Table, shape, lam) -> None:
    """Time the tile configs of each backward kernel at ``shape``, keep the fastest for its
    head dim, and attribute the backward's time (no CG, plain TF32 products, a looser tol)."""
    from lla_triton import backward as bw

    D = shape[3]
    q, k, v, g = _inputs(*shape)
    table.emit()
    table.emit(f"sweep at {shape}: backward ms (kernel A config varied with B default, then B varied)")
    best_a = _fastest(table, "A", SWEEP_A[D], lambda cfg: _backward_only(q, k, v, g, lam, cfg_a=cfg)[0])
    best_b = _fastest(table, "B", SWEEP_B[D], lambda cfg: _backward_only(q, k, v, g, lam, cfg_b=cfg)[0])
    bw.GPU_CONFIGS_A[D] = best_a[1]
    bw.GPU_CONFIGS_B[D] = best_b[1]
    table.emit(f"  chosen for D={D}: A {best_a[1]}, B {best_b[1]}")
    # where the backward's time goes: no CG (passes + kernel B), plain TF32 products
    call0, _ = _backward_only(q, k, v, g, lam)
    table.emit(f"  attribution D={D}: full {median_ms(call0):.3f} ms")
    for label, kw in (("cg_max_iters=0", dict(cg_max_iters=0)),
                      ("precision tf32 (1 pass)", dict(precision="tf32")),
                      ("cg_tol 1e-4", dict(cg_tol=1e-4))):
        f, _ = _backward_only(q, k, v, g, lam, **kw)
        table.emit(f"  attribution D={D}: {label} {median_ms(f):.3f} ms (bwd CG iters max {int(f().cg_iters.max())})")


def _step_row(shape, lam, oracle_heads: int) -> str:
    """One row of the table: fwd+bwd, fwd and bwd times against SDPA's fwd+bwd, CG
    iterations, and the gradients' relative error against the float64 oracle's on the
    first ``oracle_heads`` heads beside the bf16 rounding floor."""
    import torch

    import lla_triton
    from lla_verify.oracles.float64 import lla_forward

    B, H, S, D = shape
    q, k, v, g = _inputs(B, H, S, D)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))

    def step():
        o = lla_triton.lla_attention(qq, kk, vv, ridge_lambda=lam)
        o.backward(g)

    def fwd():
        with torch.no_grad():
            lla_triton.lla_attention(q, k, v, ridge_lambda=lam)

    t_step = median_ms(step, grads=[qq, kk, vv])
    t_fwd = median_ms(fwd)
    call, fo = _backward_only(q, k, v, g, lam)
    t_bwd = median_ms(call)
    bo = call()

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_step():
        causal_sdpa(qs, ks, vs).backward(g)

    t_sdpa = median_ms(sdpa_step, grads=[qs, ks, vs])

    # accuracy on the first heads: fresh grads from one step
    for t in (qq, kk, vv):
        t.grad = None
    step()
    nh = min(oracle_heads, B * H)
    sl = lambda t: t.reshape(B * H, S, D)[:nh]  # noqa: E731
    xs = [sl(t).detach().double().requires_grad_() for t in (q, k, v)]
    o64 = lla_forward(*xs, ridge_lambda=lam)
    ref = torch.autograd.grad((o64 * sl(g).double()).sum(), xs)
    errs, floors = [], []
    for got, r in zip((qq.grad, kk.grad, vv.grad), ref):
        errs.append(float((sl(got).double() - r).norm() / r.norm()))
        floors.append(float((r.bfloat16().double() - r).norm() / r.norm()))
    return (f"| {B},{H},{S},{D} | {t_step:.3f} | {t_fwd:.3f} | {t_bwd:.3f} | {t_sdpa:.3f} | {t_step / t_sdpa:.1f}x "
            f"| {int(fo.cg_iters.max())} / {int(bo.cg_iters.max())} "
            f"| {errs[0]:.2e} / {errs[1]:.2e} / {errs[2]:.2e} | {floors[0]:.2e} / {floors[1]:.2e} / {floors[2]:.2e} |")
