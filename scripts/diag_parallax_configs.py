"""parallax_triton forward + backward per (dtype, D, tile configuration), each in a process
of its own, against float64 autograd through the oracle: which launches of the kernel go
wrong on a device. A launch that faults (an illegal address) kills only its own process's
CUDA context, so every other row of the table is still measured.

    python scripts/diag_parallax_configs.py [--device cuda] [--jobs 16] [--configs 64,64,8,2 ...]
    TRITON_INTERPRET=1 python scripts/diag_parallax_configs.py --device cpu --dtypes float32 --dims 16

Each row: relative L2 errors of o, dq, dk, dv, dr (float64 reference at the rounded inputs;
bf16 rounding is about 4e-3, fp16 5e-4, fp32 6e-8), or the error that ended its process.
A configuration "default" is the one the launcher picks (kernels.gpu_config)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(dtype: str, D: int, config, device: str, S: int = 37) -> dict:
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
    from parallax_triton import kernels as K

    from lla_verify.oracles.parallax import parallax_forward

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v, r, g = (torch.randn(2, S, D, generator=gen, dtype=torch.float64) for _ in range(5))
    qd, kd, vd, rd, gd = (t.to(dt).to(device) for t in (q, k, v, r, g))
    scale = D ** -0.5
    fo = K.parallax_forward_kernel(qd, kd, vd, rd, scale, config=config)
    bo = K.parallax_backward_kernel(qd, kd, vd, rd, gd, fo, scale, config=config)
    if device == "cuda":
        torch.cuda.synchronize()
    ins = [t.double().detach().requires_grad_(True) for t in (qd, kd, vd, rd)]
    o = parallax_forward(*ins, qk_scale=scale)
    grads = torch.autograd.grad(o, ins, gd.double())

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    return dict(o=rel(fo.o, o), dq=rel(bo.dq, grads[0]), dk=rel(bo.dk, grads[1]), dv=rel(bo.dv, grads[2]),
                dr=rel(bo.dr, grads[3]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--dims", default="16,32,64,128")
    ap.add_argument("--configs", nargs="*", default=[], help="BLOCK_M,BLOCK_N,warps,stages besides the default")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--one", nargs=3, metavar=("DTYPE", "D", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        dtype, D, cfg = args.one
        config = None if cfg == "default" else tuple(int(x) for x in cfg.split(","))
        print(json.dumps(one(dtype, int(D), config, args.device)))
        return 0
    todo = [(dt, int(D), c) for dt in args.dtypes.split(",") for D in args.dims.split(",")
            for c in ["default", *args.configs]]

    def run(job):
        dt, D, c = job
        try:
            p = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", dt, str(D), c],
                               capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return job, f"timed out after {args.timeout:.0f} s"
        if p.returncode == 0:
            return job, json.loads(p.stdout.strip().splitlines()[-1])
        return job, (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run, todo))
    print("| dtype | D | config | o | dq | dk | dv | dr |\n|---|---|---|---|---|---|---|---|")
    bad = 0
    for (dt, D, c), res in rows:
        if isinstance(res, dict):
            print(f"| {dt} | {D} | {c} | " + " | ".join(f"{res[n]:.2e}" for n in ("o", "dq", "dk", "dv", "dr")) + " |")
        else:
            bad += 1
            print(f"| {dt} | {D} | {c} | {res} | | | | |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
