"""How a GPU's tensor cores accumulate an fp32 ``tl.dot`` of tf32 and bf16 operands.

For 64 x 64 products of operands exactly representable in the operand format (so that the
hardware's error is its accumulation alone), positive and signed, K = 64 and 256: the error
against the exact product in ulp of the result (mean, mean magnitude, largest), the share of
errors towards zero (truncation biases them that way; rounding to nearest does not), and how
often three models match the hardware bit for bit: one rounding of the exact sum, a chain
rounded to nearest after every k-step, and a chain truncated towards zero after every k-step
of 8 (tf32) or 16 (bf16) products. docs/kernels-parallax.md §6 says why it matters: it is why
fp32 Parallax uses exact fp32 products on the GPU.

    PYTHONPATH=.:kernels python scripts/probe_tensor_core_accumulation.py

CUDA only (the interpreter multiplies in numpy, which is what is being compared with): exits 2
without a CUDA device.
"""
import sys

import numpy as np
import torch
import triton
import triton.language as tl

@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr, B16: tl.constexpr):
    om, on, ok = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + om[:, None] * K + ok[None, :])
    b = tl.load(B + ok[:, None] * N + on[None, :])
    if B16:
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    tl.store(C + om[:, None] * N + on[None, :], c)


def rz32(x64):
    f = x64.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(x64)
    return np.where(over, np.nextafter(f, np.float32(0)), f).astype(np.float32)


def chain(a64, b64, kstep, rz):
    out = np.zeros((a64.shape[0], b64.shape[1]), np.float32)
    for k0 in range(0, a64.shape[1], kstep):
        s = out.astype(np.float64) + a64[:, k0:k0 + kstep] @ b64[k0:k0 + kstep]
        out = rz32(s) if rz else s.astype(np.float32)
    return out


def tf32(x):
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & ~np.uint32(0x1FFF)).view(np.float32)


def main() -> int:
    M = N = 64
    if not torch.cuda.is_available():
        print("probe_tensor_core_accumulation: needs a CUDA device (the interpreter has no tensor cores)", file=sys.stderr)
        return 2
    dev = "cuda"
    for kind, K in (("tf32", 64), ("tf32", 256), ("bf16", 64), ("bf16", 256)):
        for dist in ("positive", "signed"):
            g = np.random.default_rng(0)
            a = g.random((M, K), dtype=np.float32) + 0.5 if dist == "positive" else g.standard_normal((M, K), dtype=np.float32)
            b = g.random((K, N), dtype=np.float32) + 0.5 if dist == "positive" else g.standard_normal((K, N), dtype=np.float32)
            if kind == "bf16":
                a = torch.from_numpy(a).bfloat16().float().numpy(); b = torch.from_numpy(b).bfloat16().float().numpy()
                ar, br, kstep = a, b, 16
            else:
                # operands exact in tf32: the hardware's error is then its accumulation alone
                a, b = tf32(a), tf32(b)
                ar, br, kstep = a, b, 8
            At, Bt = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
            C = torch.empty(M, N, device=dev)
            _dot_kernel[(1,)](At, Bt, C, M=M, N=N, K=K, PREC="tf32", B16=kind == "bf16")
            hw = C.cpu().numpy()
            a64, b64 = ar.astype(np.float64), br.astype(np.float64)
            exact = a64 @ b64
            ulp = np.spacing(np.abs(hw).astype(np.float32)).astype(np.float64)
            err = (hw.astype(np.float64) - exact) / ulp
            toward_zero = float(np.mean(np.sign(err) == -np.sign(exact))) if np.any(err) else float("nan")
            rn, rzm = chain(a64, b64, kstep, False), chain(a64, b64, kstep, True)
            rn1 = (exact).astype(np.float32)
            print(f"{kind} K={K} {dist}: err/ulp mean {err.mean():+.3f} |err| mean {np.abs(err).mean():.3f} max {np.abs(err).max():.2f}; "
                  f"towards zero {toward_zero:.2f}; bitwise = RN-once {np.mean(hw == rn1):.3f}, RN chain {np.mean(hw == rn):.3f}, "
                  f"RZ chain(k{kstep}) {np.mean(hw == rzm):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
