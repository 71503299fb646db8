"""Compile the Triton kernels for a GPU target on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel as numpy and never lowers it, so a
kernel the GPU compiler rejects passes every CPU test. This runs the entry points of
lla_triton, parallax_triton, lla_decode and parallax_decode on CPU tensors with Triton's active driver replaced by one that reports a
CUDA target, and every launch turned into a warmup: each kernel a call would launch is
compiled to a cubin for that target, and none runs. The outputs are never meaningful;
what is checked is that every launch compiles and fits the target's shared memory.
The packages' own test for "interpreting" stays false here, so each picks the tiles (and
the decode packages the split sizes) it would on the GPU; only their refusal of CPU
tensors is lifted.

    python -m lla_verify.testing.compile_check [--arch 90] [--full] [--json OUT]

It must run in a process without TRITON_INTERPRET (Triton decides at decoration time),
so tests call it in a subprocess. It uses Triton's driver and JITFunction.run hooks,
which are internal: a Triton that changes them fails here with a message, not silently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

# shared memory per block (opt-in maximum) by compute capability, bytes
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def interpreter_refused(tool: str) -> bool:
    """Whether TRITON_INTERPRET=1 is set, under which no kernel compiles (with a message
    naming ``tool``): Triton decides at decoration time, so the tool cannot lift it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    print(f"{tool}: unset TRITON_INTERPRET (the interpreter never compiles)", file=sys.stderr)
    return True


def _install(arch: int, compiled: list) -> None:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        """The active driver as a kernel launch sees it: device 0 of a CUDA target."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    from triton.runtime.errors import OutOfResources

    run = JITFunction.run
    limit = SHARED_LIMIT.get(arch)

    def compile_only(self, *args, grid, warmup, **kw):
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        shared = int(getattr(kernel.metadata, "shared", 0))
        rejected = limit is not None and shared > limit
        # the constexprs passed by name (tile sizes, head dims), to show which configuration compiled
        named = {k: v for k, v in kw.items() if isinstance(v, int) and not isinstance(v, bool)}
        compiled.append({"kernel": self.fn.__name__, "shared": shared,
                         "num_warps": int(getattr(kernel.metadata, "num_warps", 0)), "rejected": rejected,
                         "constexprs": named})
        if rejected:
            # what the driver raises when it loads the kernel: the entry points' fallback
            # to smaller tiles must see it here as it would on the card
            raise OutOfResources(shared, limit, "shared memory")
        return kernel

    JITFunction.run = compile_only
    driver.set_active(CompileOnlyDriver())


def _decode_inputs(dt, D):
    """q, r, k_cache, v_cache, lengths: grouped-query heads (H 4 over H_kv 2), a ragged batch
    and several splits of the GPU's split size."""
    import torch

    q, r = (torch.randn(2, 4, D, dtype=dt) for _ in range(2))
    kc, vc = (torch.randn(2, 2, 320, D, dtype=dt) for _ in range(2))
    return q, r, kc, vc, torch.tensor([320, 70])


def _calls(full: bool, dims=None):
    """(label, thunk) per configuration: every entry point, forward and backward, and the
    decode kernels."""
    import torch

    dtypes = (torch.float32, torch.bfloat16, torch.float16) if full else (torch.float32, torch.bfloat16)
    dims = dims or ((16, 32, 64, 128) if full else (128,))
    out = []
    for dt in dtypes:
        for D in dims:
            def lla(dt=dt, D=D):
                import lla_triton

                q, k, v = (torch.randn(1, 2, 256, D, dtype=dt, requires_grad=True) for _ in range(3))
                o = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, check_finite=False)
                o.backward(torch.ones_like(o))

            def parallax(dt=dt, D=D):
                import parallax_triton

                q, k, v, r = (torch.randn(1, 2, 256, D, dtype=dt, requires_grad=True) for _ in range(4))
                o = parallax_triton.parallax_attention(q, k, v, r, check_finite=False)
                o.backward(torch.ones_like(o))
                if dt == torch.bfloat16:
                    # the forward with bf16 weights (outside autograd: FAST_BF16_WEIGHTS)
                    with torch.no_grad():
                        parallax_triton.parallax_attention(q, k, v, r, check_finite=False, bf16_weights=True)

            def lla_dec(dt=dt, D=D):
                import lla_decode

                q, _, kc, vc, lens = _decode_inputs(dt, D)
                lla_decode.lla_decode(q, kc, vc, lens, ridge_lambda=0.1, check_finite=False)
                # a lambda per head: the solve kernel's other variant (a float is an argument)
                lla_decode.lla_decode(q, kc, vc, lens, ridge_lambda=torch.full(q.shape[:2], 0.1), check_finite=False)
                # the keyed solve's kernels (its loop reads a flag from the device: zeros here)
                lla_decode.lla_decode(q, kc, vc, lens, ridge_lambda=0.1, check_finite=False, solver="keyed",
                                      cg_max_iters=1)
                # a keyed plan past its cap: the Sigma kernels gated by the hand-over's flags
                from lla_decode import keyed

                cap = keyed.KEYED_MAX_ITERS
                keyed.KEYED_MAX_ITERS = 1
                try:
                    plan = lla_decode.lla_decode_plan(kc, vc, lens, ridge_lambda=0.1, num_heads=q.shape[1],
                                                      cg_max_iters=2, solver="keyed")
                    plan.run(q, check_finite=False)
                finally:
                    keyed.KEYED_MAX_ITERS = cap

            def parallax_dec(dt=dt, D=D):
                import parallax_decode

                parallax_decode.parallax_decode(*_decode_inputs(dt, D), check_finite=False)
                # more splits a head than a combine chunk: the combine's first level too
                q1, r1 = (torch.randn(1, 1, D, dtype=dt) for _ in range(2))
                k1, v1 = (torch.randn(1, 1, 2048, D, dtype=dt) for _ in range(2))
                parallax_decode.parallax_decode(q1, r1, k1, v1, torch.tensor([2048]), split=16, check_finite=False)
                # the split kernel with the fused combine (off by default: FUSED_MAX_SPLITS)
                fused = parallax_decode.FUSED_MAX_SPLITS
                parallax_decode.FUSED_MAX_SPLITS = 1 << 30
                try:
                    parallax_decode.parallax_decode(*_decode_inputs(dt, D), check_finite=False)
                finally:
                    parallax_decode.FUSED_MAX_SPLITS = fused

            name = str(dt).removeprefix("torch.")
            out += [(f"lla_triton {name} D={D}", lla), (f"parallax_triton {name} D={D}", parallax),
                    (f"lla_decode {name} D={D}", lla_dec), (f"parallax_decode {name} D={D}", parallax_dec)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--full", action="store_true", help="every dtype and head dim (default: fp32/bf16, D 128)")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="head dims (default 128; --full: 16 to 128)")
    ap.add_argument("--only", default=None, help="configurations whose label contains this, e.g. 'parallax_triton' or 'lla_decode float32'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if interpreter_refused("compile_check"):
        return 2
    compiled: list = []
    _install(args.arch, compiled)
    import lla_decode
    import lla_triton
    import parallax_decode
    import parallax_triton

    # the entry points refuse CPU tensors unless interpreting; here they only compile.
    # the modules of lla_triton and parallax_triton each bind interpreting for themselves, so
    # replacing the package's name lifts the refusal alone; the decode packages keep the
    # refusal under a name of its own
    for pkg in (lla_triton, parallax_triton):
        pkg.interpreting = lambda: True
    for pkg in (lla_decode, parallax_decode):
        pkg._accepts_cpu = lambda: True
    results, failed = [], 0
    limit = SHARED_LIMIT.get(args.arch)
    for label, thunk in _calls(args.full, args.dims):
        if args.only and args.only not in label:
            continue
        start = len(compiled)
        err = None
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001 - a compile error of any kind is the finding
            err = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
        kernels = [k for k in compiled[start:] if not k["rejected"]]
        rejected = [k["kernel"] for k in compiled[start:] if k["rejected"]]
        ok = err is None and bool(kernels)
        failed += not ok
        results.append({"config": label, "ok": ok, "error": err, "kernels": compiled[start:]})
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {len(kernels)} kernels compiled for sm_{args.arch}"
              + (f", shared up to {max(k['shared'] for k in kernels)} B" if kernels else "")
              + (f" ({len(rejected)} tile configs over the {limit} B limit"
                 + (", fallen back from)" if ok else ")") if rejected else "")
              + (f"; {err.splitlines()[-1]}" if err else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": args.arch, "results": results}, fh, indent=1)
    print(f"compile_check: {len(results) - failed} of {len(results)} configurations compile for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
