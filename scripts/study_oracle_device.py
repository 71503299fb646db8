"""The float64 oracle's details and the budgets on CPU and on CUDA: kappa(Sigma_i) from one
eigvalsh per query (old) against the certified extremes of lla_verify/oracles/extremes.py
(new); issue 24, item 1.

    PYTHONPATH=.:kernels python scripts/study_oracle_device.py [--shapes 512x64,2048x64,2048x128]
        [--devices cpu,cuda] [--threads 16] [--reps 3]
    PYTHONPATH=.:kernels python scripts/study_oracle_device.py --smoke   # tiny, CPU, one rep
    ... --devices cpu --methods old,certified   # the certified iteration on CPU

Times three things on one gaussian bf16 problem (B = 1, H = 2): lla_forward_details, the
forward budget the audit runs (budget.forward.check_forward on torch-fp32's output) and the
backward budget (budget.backward.check_backward of torch-fp32). Each is the median wall
time of --reps calls after one warm-up call, with torch.cuda.synchronize around each call
on CUDA. "old" routes every extreme-eigenvalue query through eigvalsh (the previous
behaviour, on every device); "new" is the library's dispatch (eigvalsh on CPU, the
certified iteration elsewhere), so the two differ only off the CPU; "certified" forces the
iteration on every device (the CPU included, to see why the dispatch keeps eigvalsh
there). The last column counts the rows the iteration hands to eigvalsh. ("old" is the
previous method, not the previous code to the line: that normalised the Sigma probe's
random E_i with eigvalsh on the CPU whatever the device; "old" does it on the device.) The verdicts' ratios
of both are printed: they should agree to the kappa guarantee (a 2.2% change of kappa at
most). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def _parse_shapes(text: str):
    out = []
    for item in text.split(","):
        s, _, d = item.strip().partition("x")
        if not (s.isdigit() and d.isdigit()):
            raise SystemExit(f"study_oracle_device: --shapes: expected SxD items like 512x64, got {item!r}")
        out.append((int(s), int(d)))
    return out


@contextlib.contextmanager
def _method(name: str):
    """'old': eigvalsh for every extreme eigenvalue (as before the certified method); 'new':
    the library's own dispatch; 'certified': the certified iteration on every device, CPU
    included (what 'new' does off the CPU). Only this script switches it."""
    from lla_verify.oracles import extremes

    saved = extremes._use_eigvalsh
    if name == "old":
        extremes._use_eigvalsh = lambda A: True
    elif name == "certified":
        extremes._use_eigvalsh = lambda A: False
    try:
        yield
    finally:
        extremes._use_eigvalsh = saved


def _timed(fn, device: str, reps: int):
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    result = fn()  # warm-up: cuSOLVER / cuBLAS handles, allocator
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _fallback_rows(problem) -> str:
    """How many rows the certified method hands to eigvalsh on this problem (device only)."""
    from lla_verify.oracles.extremes import certified_extremes
    from lla_verify.oracles.float64 import sigma_matrices

    A = sigma_matrices(problem.q, problem.k, ridge_lambda=problem.ridge_lambda, qk_scale=problem.qk_scale)
    ext = certified_extremes(A)
    return f"{int((~ext.certified).sum())}/{ext.certified.numel()}"


def run(shapes, devices, methods, reps: int, threads: int | None):
    import torch

    from lla_verify.budget.backward import check_backward, cotangent_for
    from lla_verify.budget.forward import check_forward
    from lla_verify.oracles.float64 import lla_forward_details
    from lla_verify.registry.cases import Case
    from lla_verify.registry.impls import get_impl

    if threads:
        torch.set_num_threads(threads)
    impl = get_impl("torch-fp32")
    rows = []
    for S, D in shapes:
        case = Case("gaussian", {}, B=1, H=2, S=S, D=D, dtype="bfloat16", seed=0)
        for device in devices:
            problem = case.build(device)
            o = impl.forward(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                             qk_scale=problem.qk_scale)
            cot = cotangent_for(problem)
            work = {
                "lla_forward_details": lambda: lla_forward_details(
                    problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda, qk_scale=problem.qk_scale),
                "forward budget": lambda: check_forward(problem, impl, o),
                "backward budget": lambda: check_backward(problem, impl, cot=cot),
            }
            fallback = "-" if device == "cpu" and "certified" not in methods else _fallback_rows(problem)
            for what, fn in work.items():
                res = {}
                for m in methods:
                    with _method(m):
                        res[m] = _timed(fn, device, reps)
                rows.append((S, D, device, what, res, fallback))
    return rows


def _ratio(result) -> str:
    r = getattr(result, "ratio", None)
    return "-" if r is None else f"{float(r):.4g}"


def table(rows, methods) -> str:
    head = ["S", "D", "device", "what"] + [f"{m} s" for m in methods]
    faster = [m for m in methods if m != "old"] if "old" in methods else []
    head += [f"old / {m}" for m in faster]
    head += [f"ratio {m}" for m in methods] + ["eigvalsh rows (certified)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for S, D, device, what, res, fallback in rows:
        cells = [str(S), str(D), device, what] + [f"{res[m][0]:.3f}" for m in methods]
        cells += [f"{res['old'][0] / res[m][0]:.2f}x" for m in faster]
        cells += [_ratio(res[m][1]) for m in methods] + [fallback]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="512x64,2048x64,2048x128", help="comma-separated SxD (B = 1, H = 2)")
    ap.add_argument("--devices", default=None, help="comma-separated; default cpu, and cuda when available")
    ap.add_argument("--methods", default="old,new",
                    help="old (eigvalsh everywhere), new (the library's dispatch), certified (the iteration everywhere)")
    ap.add_argument("--threads", type=int, default=16, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny shape on CPU, one rep, all three methods (for the tests)")
    args = ap.parse_args(argv)

    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("old", "new", "certified"):
            raise SystemExit(f"study_oracle_device: --methods: expected old, new or certified, got {m!r}")
    if args.reps < 1:
        raise SystemExit(f"study_oracle_device: --reps: expected an integer >= 1, got {args.reps}")
    if args.smoke:
        shapes, devices, reps, threads, methods = [(12, 8)], ["cpu"], 1, None, ["old", "new", "certified"]
    else:
        shapes, reps, threads = _parse_shapes(args.shapes), args.reps, args.threads
        devices = ([d.strip() for d in args.devices.split(",")] if args.devices
                   else ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"study_oracle_device: --devices: {d} asked for, but CUDA is not available")
    rows = run(shapes, devices, methods, reps, threads)
    print(f"gaussian bf16, B = 1, H = 2; median of {reps} after a warm-up; CPU threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}"
          + (f"; {torch.cuda.get_device_name()}" if any(d.startswith("cuda") for d in devices) else ""))
    print()
    print(table(rows, methods))
    return rows


if __name__ == "__main__":
    main()
