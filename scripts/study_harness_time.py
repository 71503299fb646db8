"""Where the harness of a property spends its time per example at the gpu profile's sizes,
with the implementation's own call left out (issue 24: the clusters properties and the
rho reduction stayed slow on the H200 with every Triton compile a cache hit).

    PYTHONPATH=.:kernels python scripts/study_harness_time.py --prop forward --family clusters
        [--seed 3] [--examples 16] [--max-work 2e9] [--device cpu] [--gpu-fallback]

Draws the cases the property draws on a GPU (suite.case_strategy for the triton record at
device 'cuda': S up to 600, D up to 128; Hypothesis at the gpu profile, --seed), without
running the property's body, then times each stage of the property's harness on --device
for each drawn case, with torch-fp32's output (or the float64 oracle's rho rounded to
fp32 for --prop rho) standing in for the kernel's. Stages:

  forward   details (lla_forward_details), sensitivity (2 JVPs), dense (fp32 reference),
            check (check_forward on a finished budget: the comparison)
  backward  check_backward, split by a profiler-free timer into the oracle pass, the
            reference gradients, the central difference, the Sigma probes and the dense
            reference
  rho       rho_probe_budget, parallax_forward, forward_budget (oracle-f64), parallax_budget

--gpu-fallback routes the extreme eigenvalues through the path CUDA takes (the certified
iteration, oracles/extremes.py) and counts the matrices it hands to eigvalsh: on CUDA each
costs one cuSOLVER call (about 0.8 ms at D = 64, docs/error-model.md §5), which the CPU's
LAPACK eigvalsh does not show. --max-work skips cases with B H S^2 D^2 above it (the CPU's
float64 oracle at S = 600, D = 128 takes minutes on two cores); skipped cases are listed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time


def draw_cases(prop: str, family: str | None, seed: int, n: int):
    from hypothesis import Phase, given, settings
    from hypothesis import seed as hseed

    from lla_verify.registry.impls import get_impl
    from lla_verify.testing import pytest_plugin  # noqa: F401  registers the profiles
    from lla_verify.testing import suite

    triton = get_impl("triton")
    if prop == "forward":
        strat = suite.case_strategy(triton, "cuda", families=(family,))
    elif prop == "backward":
        strat = suite.case_strategy(triton, "cuda", families=(family,), seq=(1, 24))
    else:
        strat = suite.case_strategy(triton, "cuda", families=("gaussian", "spectrum", "offset", "clusters",
                                                              "lambda_decades"))
    out = []

    @hseed(seed)
    @settings(settings.get_profile("gpu"), max_examples=n, database=None, phases=[Phase.generate])
    @given(case=strat)
    def collect(case):
        out.append(case)

    collect()
    return out


class Stages:
    """Wall seconds per stage, the device synchronised around each."""

    def __init__(self, cuda: bool = False):
        self.t = collections.defaultdict(float)
        self.cuda = cuda

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.t[name] += time.perf_counter() - t0


def install_fallback_counter():
    """Force the CUDA path of extremes.py on this device and count eigvalsh's matrices there."""
    import torch

    from lla_verify.oracles import extremes

    counts = collections.Counter()
    real = torch.linalg.eigvalsh
    extremes._use_eigvalsh = lambda A: False

    def counting(A, *a, **kw):
        # only certified_extremes' fallback: _top_ritz's small Ritz problems are not a Sigma_i
        if sys._getframe(1).f_code.co_name == "certified_extremes":
            counts[int(A.shape[-1])] += int(A.numel() // (A.shape[-1] * A.shape[-2]))
        return real(A, *a, **kw)

    extremes.torch.linalg.eigvalsh = counting  # torch.linalg is one module: patched for every caller
    return counts


def time_forward(case, dev, st: Stages):
    import torch

    from lla_verify.budget import forward as fwd
    from lla_verify.oracles.dense import dense_torch_lla
    from lla_verify.oracles.float64 import lla_forward_details
    from lla_verify.registry.impls import get_impl

    triton = get_impl("triton")
    p = case.build(dev)
    o = dense_torch_lla(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                        compute_dtype=torch.float32).to(p.q.dtype)
    with st("details"):
        d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    with st("sensitivity"):
        fwd.sensitivity(p)
    with st("dense"):
        dense_torch_lla(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, compute_dtype=torch.float32)
    with st("check_forward (whole)"):
        v = fwd.check_forward(p, triton, o)
    return v.ratio, d


def time_backward(case, dev, st: Stages):
    import torch

    from lla_verify.budget import backward as bwd
    from lla_verify.budget.forward import kernel_view
    from lla_verify.oracles.dense import dense_torch_lla
    from lla_verify.registry.impls import get_impl

    triton = get_impl("triton")
    p = case.build(dev)
    pk = kernel_view(p, triton)
    with st("oracle_pass"):
        op = bwd.oracle_pass(pk)
    cot = bwd.cotangent_for(pk)
    cot = torch.where((~op.details.undefined)[..., None], cot, torch.zeros_like(cot)).to(p.q.dtype).to(torch.float64)
    with st("reference_grads"):
        bwd.reference_grads(op, cot, dlambda_residual=True)
    grads = bwd.impl_grads(triton, p, cot, forward=lambda *a, **kw: dense_torch_lla(*a, compute_dtype=torch.float32, **kw))
    with st("check_backward (whole)"):
        v = bwd.check_backward(p, triton, grads=grads)
    return v.ratio, op.details


def time_rho(case, dev, st: Stages):
    import torch

    from lla_verify.budget.forward import forward_budget
    from lla_verify.budget.parallax import parallax_budget, rho_probe_budget
    from lla_verify.oracles.float64 import lla_forward_details
    from lla_verify.oracles.parallax import parallax_forward
    from lla_verify.registry.impls import get_impl

    triton, oracle = get_impl("triton"), get_impl("oracle-f64")
    p = case.build(dev)
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, solver_sensitivity=False)
    rho = torch.nan_to_num(d.rho).to(torch.float32)
    with st("rho_probe_budget"):
        rb = rho_probe_budget(p.q, p.k, p.v, rho, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, impl=triton)
    with st("parallax_forward"):
        px64 = parallax_forward(p.q, p.k, p.v, rb.probe, qk_scale=p.qk_scale)
    with st("forward_budget(oracle-f64)"):
        fa = forward_budget(p, oracle, dense=False, out_dtype=torch.float64).allowed
    with st("parallax_budget(f64)"):
        pa = parallax_budget(p.q, p.k, p.v, rb.probe, qk_scale=p.qk_scale, compute_dtype=torch.float64,
                             out_dtype=torch.float64, dense=False).allowed
    allowed = torch.where(rb.judged, rb.allowed + fa + pa, float("inf"))
    err = torch.where(rb.judged, (px64 - rb.lla).norm(dim=-1), 0.0)
    return float((err / allowed).max()), d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prop", choices=("forward", "backward", "rho"), default="forward")
    ap.add_argument("--family", default="clusters")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--max-work", type=float, default=2e9, help="skip cases with B H S^2 D^2 above this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-fallback", action="store_true")
    ap.add_argument("--list", action="store_true", help="only list the drawn cases")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over all examples: the ops with the most self time (on CUDA, device "
                         "time), which names a linalg routine that loops over its batch one matrix at a time")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: what each of 16 xdist workers gets on 16 cores)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    cases = draw_cases(args.prop, args.family, args.seed, args.examples)
    counts = install_fallback_counter() if args.gpu_fallback else None
    fn = {"forward": time_forward, "backward": time_backward, "rho": time_rho}[args.prop]
    tot = Stages()
    print("| case | work | kappa>2e9 rows | rows | eigvalsh on CUDA | " + "stage seconds | ratio |")
    print("|---|---|---|---|---|---|---|")
    prof = None
    if args.profile:
        import torch.profiler as tp

        acts = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        prof = tp.profile(activities=acts)
        prof.__enter__()
    for c in cases:
        work = c.B * c.H * c.S ** 2 * c.D ** 2
        if args.list or work > args.max_work:
            print(f"| {c.spec()} | {work:.2g} | skipped | | | | |")
            continue
        st = Stages(args.device.startswith("cuda"))
        before = sum(counts.values()) if counts is not None else 0
        ratio, d = fn(c, args.device, st)
        n_eig = (sum(counts.values()) - before) if counts is not None else "-"
        kap = torch.nan_to_num(d.kappa, posinf=1e300)
        for k, v in st.t.items():
            tot.t[k] += v
        stages = ", ".join(f"{k} {v:.2f}" for k, v in st.t.items())
        print(f"| {c.spec()} | {work:.2g} | {int((kap > 2e9).sum())} | {kap.numel()} | {n_eig} | {stages} | {ratio:.3g} |")
    print("totals: " + ", ".join(f"{k} {v:.1f} s" for k, v in tot.t.items()))
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    if counts is not None:
        print(f"matrices handed to eigvalsh on the CUDA path, by D: {dict(counts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
