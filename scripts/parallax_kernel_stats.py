"""Static metrics of the parallax_triton launches, compiled for a GPU target without a GPU.

    env -u TRITON_INTERPRET PYTHONPATH=.:kernels python scripts/parallax_kernel_stats.py \
        [--arch 90] [--dtypes bfloat16] [--dims 64 128] [--S 2048] [--package DIR]

Runs the forward and the backward of ``parallax_attention`` on CPU tensors through
lla_verify.testing.compile_check's compile-only driver (every launch compiled to a cubin
for sm_ARCH, none run) and prints, per launch: the tile configuration and its warps and
stages, registers per thread, spill stores and loads (ptxas -v on the launch's PTX),
shared memory, and the tensor-core instructions of its SASS by shape and input type
(HGMMA: Hopper's warpgroup MMA; HMMA: the warp-level one), besides the dots of its TTGIR
by operand type. Which dtype the products of a (query tile, key tile) pair run in, and how
many there are, is what these counts show; the tile sizes are the launcher's
(kernels.GPU_CONFIGS), or its fallback when shared memory runs out.

``--package DIR`` measures another copy of the package (for example the main branch's,
from ``git archive``), imported as parallax_triton in its place.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes that ptxas reports for the PTX (the same ptxas Triton uses)."""
    target = re.search(r"\.target\s+(\S+)", ptx)
    gpu = target.group(1) if target else f"sm_{arch}a"
    text = ""
    # Triton's own ptxas first; a newer Triton (3.9) writes a PTX ISA that only its
    # ptxas-blackwell (CUDA 13) accepts, and which it uses for every target
    for tool in ("ptxas", "ptxas-blackwell"):
        if not Path(_tool(tool)).exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            res = subprocess.run([_tool(tool), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True)
        text = res.stdout + res.stderr
        if "Used" in text:
            break
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill_st": int(spill.group(1)) if spill else -1,
            "spill_ld": int(spill.group(2)) if spill else -1,
            "stack": int(stack.group(1)) if stack else -1}


def _sass(cubin: bytes) -> str:
    """The cubin's SASS as cuobjdump prints it."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(f)], capture_output=True, text=True).stdout


def sass_mma(sass: str) -> collections.Counter:
    """Tensor-core instructions in the SASS by opcode with its modifiers
    (e.g. HGMMA.64x64x16.F32.BF16), a static count (each executes once per loop trip)."""
    out = collections.Counter()
    for m in re.finditer(r"\b(HGMMA|HMMA|IMMA|DMMA)(\.[\w.]+)?", sass):
        op = m.group(0)
        # drop the scheduling suffixes that do not name the shape or the types
        op = re.sub(r"\.(gsb\d|tnspA|tnspB)\b", "", op)
        out[op] += 1
    return out


def sass_total(sass: str) -> int:
    """Every instruction of the SASS, a static count: beside the MMA count, what a launch's
    loop does besides its products (exp, reductions, conversions, spills)."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[@!A-Z]", sass))


def ttgir_dots(ttgir: str) -> collections.Counter:
    """The dots of the TTGIR by their operand element types (tt.dot: warp MMA or FMA;
    ttng.warp_group_dot: wgmma), with the input precision where it is not the default."""
    out = collections.Counter()
    for line in ttgir.splitlines():
        m = re.search(r"(tt\.dot|ttng\.warp_group_dot)\s", line)
        if not m:
            continue
        types = re.findall(r"tensor<\d+x\d+x(\w+)", line)
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        key = f"{m.group(1)} {'x'.join(types[:2]) if types else '?'}" + (f" {prec.group(1)}" if prec else "")
        out[key] += 1
    return out


KINDS = ("fwd", "dq", "dkdv", "infer")


def parse_configs(spec: str) -> dict:
    """'BM,BN,W,S' (every kernel) or 'fwd=BM,BN,W,S;dq=...;dkdv=...' -> {kind: tuple}."""
    out = {}
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        kind, _, cfg = part.rpartition("=")
        vals = tuple(int(x) for x in cfg.split(","))
        if len(vals) != 4:
            raise ValueError(f"expected BLOCK_M,BLOCK_N,num_warps,num_stages, got {cfg!r} in {spec!r}")
        if kind and kind not in KINDS:
            raise ValueError(f"expected a kernel among {KINDS}, got {kind!r} in {spec!r}")
        for k in ([kind] if kind else KINDS):
            out[k] = vals
    return out


def set_configs(kmod, spec: str, dims=None) -> None:
    """Replace the GPU tile configurations of the parallax_triton kernels module ``kmod`` for
    the head dims ``dims`` (default all). A copy whose GPU_CONFIGS is keyed by head dim
    alone (one configuration for every kernel) takes the forward's."""
    cfgs = parse_configs(spec)
    table = kmod.GPU_CONFIGS
    if all(isinstance(k, int) for k in table):
        for d in dims or list(table):
            table[d] = cfgs.get("fwd", next(iter(cfgs.values())))
        return
    for kind, cfg in cfgs.items():
        for d in dims or list(table[kind]):
            table[kind][d] = cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="torch dtype names (default bfloat16)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--S", type=int, default=2048, help="sequence length of the compiled call (default 2048)")
    ap.add_argument("--package", default=None, help="directory of a parallax_triton copy to measure instead")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also compile a forward outside autograd with kernels.FAST_BF16_WEIGHTS on (its fast tiles' "
                         "value products as bf16 products; docs/kernels-parallax.md §3, 'bf16 weights')")
    ap.add_argument("--config", default=None,
                    help="tile configurations in place of GPU_CONFIGS' for every head dim: "
                         "'BM,BN,WARPS,STAGES' for every kernel, or 'fwd=..;dq=..;dkdv=..'")
    args = ap.parse_args(argv)
    from lla_verify.testing.compile_check import interpreter_refused

    if interpreter_refused("parallax_kernel_stats"):
        return 2
    if args.package:
        sys.path.insert(0, str(Path(args.package).resolve().parent))

    import torch
    from triton.runtime.jit import JITFunction

    from lla_verify.testing.compile_check import _install

    compiled: list = []
    _install(args.arch, compiled)
    launches = []
    compile_only = JITFunction.run

    def record(self, *a, **kw):
        n = len(compiled)
        try:
            kernel = compile_only(self, *a, **kw)
        except Exception:
            if len(compiled) > n and compiled[-1]["rejected"]:
                launches.append(dict(compiled[-1], num_stages=kw.get("num_stages", 0), regs=-1, spill_st=-1,
                                     spill_ld=-1, stack=-1, sass={}, ttgir={}))
            raise
        entry = dict(compiled[-1])
        entry["num_stages"] = int(getattr(kernel.metadata, "num_stages", 0))
        entry.update(ptxas_usage(kernel.asm["ptx"], args.arch))
        sass = _sass(kernel.asm["cubin"])
        entry["sass"] = sass_mma(sass)
        entry["sass_total"] = sass_total(sass)
        entry["ttgir"] = ttgir_dots(kernel.asm["ttgir"])
        launches.append(entry)
        return kernel

    JITFunction.run = record
    import parallax_triton

    if args.package and Path(parallax_triton.__file__).resolve().parent != Path(args.package).resolve():
        print(f"parallax_kernel_stats: imported {parallax_triton.__file__}, not {args.package}", file=sys.stderr)
        return 2
    parallax_triton.interpreting = lambda: True  # lifts the CPU refusal only (compile_check's note)
    if args.config:
        try:
            set_configs(sys.modules[parallax_triton.__name__ + ".kernels"], args.config)
        except ValueError as exc:
            ap.error(f"--config: {exc}")

    print(f"parallax_triton from {Path(parallax_triton.__file__).parent}; sm_{args.arch}; S = {args.S}")
    for dname in args.dtypes:
        dt = getattr(torch, dname)
        for D in args.dims:
            start = len(launches)
            q, k, v, r = (torch.randn(1, 1, args.S, D, dtype=dt, requires_grad=True) for _ in range(4))
            o = parallax_triton.parallax_attention(q, k, v, r, check_finite=False)
            o.backward(torch.ones_like(o))
            if args.bf16_weights:
                kmod = sys.modules[parallax_triton.__name__ + ".kernels"]
                kmod.FAST_BF16_WEIGHTS, was = True, kmod.FAST_BF16_WEIGHTS
                try:
                    with torch.no_grad():
                        parallax_triton.parallax_attention(q, k, v, r, check_finite=False)
                finally:
                    kmod.FAST_BF16_WEIGHTS = was
            print(f"\n## {dname} D={D}" + (" (the last launches: a forward with bf16 weights)"
                                            if args.bf16_weights else ""))
            for e in launches[start:]:
                c = e["constexprs"]
                status = "REJECTED (shared memory)" if e["rejected"] else "launched"
                print(f"- {e['kernel']} BLOCK_M={c.get('BLOCK_M')} BLOCK_N={c.get('BLOCK_N')} "
                      f"warps={e['num_warps']} stages={e['num_stages']} {status}: regs {e['regs']}, "
                      f"spill st/ld {e['spill_st']}/{e['spill_ld']} B, stack {e['stack']} B, "
                      f"shared {e['shared']} B")
                print("    SASS: " + (", ".join(f"{n} {op}" for op, n in sorted(e["sass"].items())) or "no MMA")
                      + f"; {e.get('sass_total', -1)} instructions in all")
                print("    TTGIR: " + (", ".join(f"{n} {op}" for op, n in sorted(e["ttgir"].items())) or "no dot"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
