"""Compile the project's Triton kernels for every (dtype, head dim) the suite draws, side by
side, before the suite's workers start.

On a GPU the suite's wall time was mostly Triton's JIT: each new (dtype, D) configuration a
property draws compiles the forward and backward kernels (tens of seconds each on one
core), and under pytest-xdist every worker that meets a configuration before Triton's cache
holds it compiles it again. ``warm()`` runs one small call per (package, dtype, D) in its
own process, as many at once as there are CPUs, so the cache holds them all before the first
test: a cold suite pays the compile once, in parallel, and a warm cache makes each job a
cache hit. The pytest plugin calls it on the xdist controller (or the lone process) when the
kernels run compiled (``--lla-warmup``, on by default on CUDA).

    python -m lla_verify.testing.warmup [--packages lla_triton,lla_triton-cg,lla_decode] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

DTYPES = ("float32", "bfloat16", "float16")
HEAD_DIMS = (16, 32, 64, 128)
PACKAGES = ("lla_triton", "lla_decode", "parallax_decode", "parallax_triton", "lla_triton-cg", "lla_triton-rho")
# lla_triton's forward is a different compile per constexpr flag, and the properties call
# three kinds: autograd (fwd + bwd), CG statistics with and without the Jacobi
# preconditioner (the convergence properties), and rho (the Parallax reduction); each kind
# is a job of its own so that they compile side by side. Each call runs on inputs that
# reach the anchor rounds (_clustered_inputs), whose kernels are compiles of their own too
LLA_VARIANTS = ("lla_triton", "lla_triton-cg", "lla_triton-rho")
DEFAULT_PACKAGES = LLA_VARIANTS + ("lla_decode", "parallax_decode")


def _inputs(dtype: str, D: int, S: int, device: str, extra: int = 0):
    import torch

    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    return [torch.randn(1, 2, S, D, generator=gen).to(device=device, dtype=dt) for _ in range(3 + extra)]


def _clustered_inputs(dtype: str, D: int, S: int, device: str):
    """q, k, v whose queries and keys alternate between two tight clusters 8 apart, so that
    every tile of lla_triton's forward, backward-query and backward-key kernels holds rows
    far from its anchor (docs/kernels.md, "Rows far from the anchor"): the call runs the
    anchor rounds, whose kernels (FIRST=False) are other compiles than the first round's.
    Gaussian inputs never reach them; the clusters and bandwidth families do, so without
    this the properties compiled them during the tests."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    c = 4.0 * c / c.norm()
    side = torch.where(torch.arange(S) % 2 == 0, 1.0, -1.0).to(torch.float64)[:, None] * c  # (S, D)
    k = side + 0.1 * torch.randn(1, 2, S, D, generator=gen, dtype=torch.float64)
    q = k + 0.1 * torch.randn(1, 2, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, S, D, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dt) for t in (q, k, v)]


def run_one(package: str, dtype: str, D: int, device: str = "cuda") -> None:
    """One forward (and backward, where the package has one) call of ``package`` at (dtype, D):
    the compile of its main launches."""
    if package not in PACKAGES:
        raise ValueError(f"package: expected one of {PACKAGES}, got {package!r}")
    import torch

    S = 80  # more than one tile, not a multiple of one
    if package in ("lla_triton-cg", "lla_triton-rho"):
        import lla_triton

        q, k, v = _clustered_inputs(dtype, D, S, device)
        if package == "lla_triton-cg":
            for prec in ("none", "jacobi"):
                lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, return_stats=True, preconditioner=prec)
        else:
            lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, return_rho=True)
    elif package in ("lla_triton", "parallax_triton"):
        xs = [t.requires_grad_(True) for t in (_clustered_inputs(dtype, D, S, device) if package == "lla_triton"
                                                else _inputs(dtype, D, S, device, extra=1))]
        if package == "lla_triton":
            import lla_triton

            o = lla_triton.lla_attention(*xs, ridge_lambda=0.1)
        else:
            import parallax_triton

            o = parallax_triton.parallax_attention(*xs)
            # outside autograd a bf16 forward takes bf16 weights: the inference kernel and the
            # split kernel's MODE 3, compiles of their own that most properties call (other
            # dtypes run the autograd forward's kernels there, compiled above)
            if dtype == "bfloat16":
                with torch.no_grad():
                    parallax_triton.parallax_attention(*xs)
        o.float().square().sum().backward()
    else:
        q, k, v = _inputs(dtype, D, S, device)
        lengths = torch.tensor([S], dtype=torch.int64)
        if package == "lla_decode":
            import lla_decode

            # a float lambda and a per-head tensor compile different solve kernels (LAM_PER_HEAD)
            lla_decode.lla_decode(q[:, :, -1], k, v, lengths, ridge_lambda=0.1)
            lla_decode.lla_decode(q[:, :, -1], k, v, lengths, ridge_lambda=torch.full(q.shape[:2], 0.1, device=q.device))
        else:
            import parallax_decode

            parallax_decode.parallax_decode(q[:, :, -1], q[:, :, 0].contiguous(), k, v, lengths)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm(packages=DEFAULT_PACKAGES, dtypes=DTYPES, dims=HEAD_DIMS, *, device: str = "cuda", jobs: int | None = None,
         progress: bool = True) -> list:
    """Run ``run_one`` for every (package, dtype, D), each in a process of its own, ``jobs`` at a
    time (default: the CPUs). Returns (package, dtype, D, seconds, error or None) per job; a
    job that fails is reported, not raised (the tests then meet the same error themselves)."""
    todo = [(p, dt, d) for p in packages for dt in dtypes for d in dims]
    jobs = jobs or min(len(todo), os.cpu_count() or 1)

    def one(job):
        p, dt, d = job
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "lla_verify.testing.warmup", "--one", p, dt, str(d),
                              "--device", device], capture_output=True, text=True)
        err = None if run.returncode == 0 else (run.stderr.strip().splitlines() or ["exit %d" % run.returncode])[-1]
        return (p, dt, d, time.perf_counter() - t0, err)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="lla-verify: compiling kernels", unit="config", file=sys.stderr)
    out = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in as_completed([pool.submit(one, j) for j in todo]):
            out.append(fut.result())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", default=",".join(DEFAULT_PACKAGES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--one", nargs=3, metavar=("PACKAGE", "DTYPE", "D"), help="one configuration, in this process")
    args = ap.parse_args(argv)
    if args.one:
        p, dt, d = args.one
        run_one(p, dt, int(d), args.device)
        return 0
    t0 = time.perf_counter()
    res = warm(args.packages.split(","), args.dtypes.split(","), [int(x) for x in args.dims.split(",")],
               device=args.device, jobs=args.jobs)
    for p, dt, d, sec, err in res:
        print(f"{p:16s} {dt:9s} D={d:<4d} {sec:6.1f} s  {'ok' if err is None else 'FAILED: ' + err}")
    bad = sum(err is not None for *_, err in res)
    print(f"{len(res) - bad} of {len(res)} configurations warmed in {time.perf_counter() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
