"""Where a gradient property's example spends its time on a device: the Triton kernels'
first call (JIT compile + run), their warm call, and the harness (issue 24, item 1).

    PYTHONPATH=.:kernels python scripts/study_property_time.py [--device cuda] [--family large_norm]
        [--dtypes float32,bfloat16,float16] [--dims 16,32,64,128] [--S 1,16,17] [--cold]
    TRITON_INTERPRET=1 PYTHONPATH=.:kernels python scripts/study_property_time.py --smoke   # CPU, tiny

Per (dtype, D, S), one (B = 2, H = 2) case of the family, as test_gradients_within_budget
draws them on a GPU (S up to 24):
  first   lla_triton forward + backward, first call in this process (compiles the kernels
          unless Triton's cache has them)
  warm    the same call again
  check   budget.backward.check_backward (calls the kernel once more, warm)
  harness check_backward on gradients in hand: the float64 oracle, the budget's
          ingredients, the dense reference (no kernel call)
  dv_sums the body of test_dv_sums_to_total_cotangent less its kernel call
--cold points TRITON_CACHE_DIR at a fresh empty folder first, so "first" includes the
compile whatever ran before. Times are wall seconds with the device synchronised. Prints a
markdown table and the totals. Without --cold, a run fills Triton's cache for the
configurations it covers (one process per dtype side by side fills it faster).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--family", default="large_norm")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--dims", default="16,32,64,128")
    ap.add_argument("--S", default="17", help="sequence lengths, comma-separated (e.g. 1,16,17)")
    ap.add_argument("--cold", action="store_true", help="an empty TRITON_CACHE_DIR: first calls compile")
    ap.add_argument("--smoke", action="store_true", help="CPU, the interpreter, one tiny configuration")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.dtypes, args.dims, args.S = "cpu", "float32", "16", "3"
    if args.cold:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")

    import torch

    from lla_verify.budget.backward import check_backward, cotangent_for, impl_grads, normalisation_terms
    from lla_verify.oracles.float64 import lla_forward_details
    from lla_verify.registry.cases import Case
    from lla_verify.registry.impls import get_impl

    dev = args.device

    def sync():
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    impl = get_impl("triton")
    rows, tot = [], {"first": 0.0, "warm": 0.0, "check": 0.0, "harness": 0.0, "dv_sums": 0.0}
    configs = [(dt, D, S) for dt in args.dtypes.split(",") for D in (int(x) for x in args.dims.split(","))
               for S in (int(x) for x in args.S.split(","))]
    for dt, D, S in configs:
        p = Case(args.family, {}, B=2, H=2, S=S, D=D, dtype=dt, seed=1).build(dev)
        cot = cotangent_for(p)
        first, _ = timed(lambda: impl_grads(impl, p, cot))
        warm, g = timed(lambda: impl_grads(impl, p, cot))
        check, v = timed(lambda: check_backward(p, impl))
        # the same check on gradients already in hand: the harness alone (its verdict is
        # not used: check_backward's cotangent is zeroed on undefined rows, this one not)
        harness, _ = timed(lambda: check_backward(p, impl, grads=g))

        def dv_body():
            d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
            g = torch.ones(p.v.shape, dtype=torch.float64, device=p.q.device)
            return normalisation_terms(p, d, g, impl.u, {"dq": 0.0, "dk": 0.0, "dlambda": 0.0})["dv"].sum()

        dv, _ = timed(dv_body)
        r = {"first": first, "warm": warm, "check": check, "harness": harness, "dv_sums": dv}
        for key in tot:
            tot[key] += r[key]
        rows.append((dt, D, S, r, v.ratio))
    print(f"{args.family}, B=2, H=2, device {dev}" + (" (cold Triton cache)" if args.cold else ""))
    print("| dtype | D | S | first (s) | warm (s) | check (s) | harness (s) | dv_sums body (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dt, D, S, r, ratio in rows:
        print(f"| {dt} | {D} | {S} | {r['first']:.3f} | {r['warm']:.4f} | {r['check']:.3f} | {r['harness']:.3f} | "
              f"{r['dv_sums']:.3f} | {ratio:.3g} |")
    print("| total | | | " + " | ".join(f"{tot[k]:.3f}" for k in tot) + " | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
