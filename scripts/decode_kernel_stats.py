"""Static metrics of the decode launches, compiled for a GPU target without a GPU.

    env -u TRITON_INTERPRET PYTHONPATH=.:kernels python scripts/decode_kernel_stats.py \
        [--op lla|parallax] [--solver sigma|keyed] [--dims 64 128] [--variant NAME:MODULE.ATTR=VALUE;...]

Runs one lla_decode or parallax_decode call (bf16, batch 2, a 4096-position cache) on CPU
tensors through lla_verify.testing.compile_check's compile-only driver and prints, per
launch: its tile and warps, registers a thread and spill bytes (ptxas -v on its PTX, as
scripts/parallax_kernel_stats.py reads them) and shared memory. The variants take
scripts/profile_decode_kernels.py's syntax, so a GPU sweep can be narrowed first to the
configurations that do not spill. A compiled call does not run: the keyed solve's host
reads see uninitialised flags, so it may also compile the Sigma path it hands over to.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--op", choices=("lla", "parallax"), default="lla")
    ap.add_argument("--solver", choices=("sigma", "keyed"), default="keyed", help="lla_decode's solver")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--kernels", default=None, help="only launches whose kernel name contains this")
    ap.add_argument("--variant", action="append", default=[], help="NAME:MODULE.ATTR=VALUE;... (repeatable)")
    args = ap.parse_args(argv)
    from lla_verify.testing.compile_check import interpreter_refused

    if interpreter_refused("decode_kernel_stats"):
        return 2
    import torch
    from triton.runtime.jit import JITFunction

    from lla_verify.testing.compile_check import _install
    from parallax_kernel_stats import ptxas_usage
    from profile_decode_kernels import applied, parse_variant

    compiled: list = []
    _install(args.arch, compiled)
    launches = []
    compile_only = JITFunction.run

    def record(self, *a, **kw):
        kernel = compile_only(self, *a, **kw)
        launches.append(dict(compiled[-1], **ptxas_usage(kernel.asm["ptx"], args.arch)))
        return kernel

    JITFunction.run = record
    import lla_decode
    import parallax_decode

    for pkg in (lla_decode, parallax_decode):
        pkg._accepts_cpu = lambda: True  # lifts the CPU refusal only (compile_check's note)
    variants = [("package", [])] + [parse_variant(v) for v in args.variant]
    print(f"sm_{args.arch}; {args.op}_decode" + (f", solver {args.solver}" if args.op == "lla" else ""))
    for D in args.dims:
        g = torch.Generator().manual_seed(0)
        q, r = (torch.randn(2, 1, D, generator=g).to(torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(2, 1, 4096, D, generator=g).to(torch.bfloat16) for _ in range(2))
        lengths = torch.full((2,), 4096)
        for name, sets in variants:
            start = len(launches)
            with applied(sets):
                if args.op == "lla":
                    lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=0.1, check_finite=False,
                                          solver=args.solver)
                else:
                    parallax_decode.parallax_decode(q, r, k, v, lengths, check_finite=False)
            print(f"\n## D={D} [{name}]")
            seen = set()
            for e in launches[start:]:
                c = e["constexprs"]
                key = (e["kernel"], tuple(sorted(c.items())), e["num_warps"])
                if key in seen or (args.kernels and args.kernels not in e["kernel"]):
                    continue
                seen.add(key)
                print(f"- {e['kernel']} BLOCK_N={c.get('BLOCK_N')} warps={e['num_warps']}: regs {e['regs']}, "
                      f"spill st/ld {e['spill_st']}/{e['spill_ld']} B, stack {e['stack']} B, shared {e['shared']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
