"""The GPU's fp32 arithmetic where it differs from the interpreter's, inside Triton's interpreter.

Two operations of a compiled Triton kernel round differently from the numpy calls the
interpreter makes for them, and both act on LLA's weights w_ij = exp(a_ij - m_i):

- an fp32 ``tl.dot`` with input_precision "ieee" (lla_triton's fp32 scores,
  ``_common.score_precision``) compiles to a chain of FMAs along K, one rounding per
  product into a running sum (Triton's FMA dot lowering), where numpy's matmul sums in
  blocks with several accumulators. For a score a_ij of many same-signed products (queries
  and keys sharing a direction) the chain's error grows with K: a few u |a_ij| against
  numpy's one or two;
- ``tl.exp(x)`` on fp32 compiles to ex2.approx(x * log2(e)): the product rounds (a
  relative error u |x| of the result) and ex2.approx is itself a few ulp off, where the
  interpreter calls a correctly rounded np.exp.

``install()`` (or the context manager ``gpu_fp32()``) patches the interpreter so that CPU
runs see both: the FMA chain exactly (each step rounds once to fp32, through float64: the
product of two fp32 numbers is exact there, and the sum's double rounding differs from a
true FMA only at rare near-ties), and the exponential's argument rounding (ex2.approx's own
few-ulp error is not emulated: its bits are the hardware's). Like ``tensor_cores`` it
reproduces the size of the GPU's error, not its bits. Nest it inside or outside
``tensor_cores.tensor_core_rounding()``: fp32 "ieee" dots come here, the others go on to
whatever dot was installed before.
"""

from __future__ import annotations


import numpy as np

_LOG2E = np.float32(1.4426950408889634)
_SAVED = None


def fma_chain_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b summed as the GPU's fp32 FMA dot does: acc = fma(a[:, k], b[k, :], acc)
    for k = 0 .. K - 1, each step rounded once to fp32."""
    out = np.array(np.broadcast_to(acc, a.shape[:-1] + b.shape[-1:]), dtype=np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for kk in range(a.shape[-1]):
        out = (out.astype(np.float64) + a64[..., :, kk, None] * b64[..., kk, None, :]).astype(np.float32)
    return out


def approx_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) for fp32 x as 2^(x * log2 e) with the product rounded to fp32 first."""
    if x.dtype != np.float32:
        return np.exp(x)
    y = (x * _LOG2E).astype(np.float32)
    return np.exp2(y.astype(np.float64)).astype(np.float32)


def _is_ieee(p) -> bool:
    return str(p).rsplit(".", 1)[-1].lower() not in ("tf32", "tf32x3")


def install() -> None:
    """From now on, interpreted fp32 "ieee" dots are FMA chains and tl.exp rounds its
    argument as the GPU does (idempotent)."""
    global _SAVED
    from triton.runtime import interpreter

    if _SAVED is not None:
        return
    builder = interpreter.InterpreterBuilder
    before_dot, before_exp = builder.create_dot, builder.create_exp
    _SAVED = (before_dot, before_exp)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if (a.data.dtype == np.float32 and b.data.dtype == np.float32 and d.data.dtype == np.float32
                and _is_ieee(input_precision)):
            return interpreter.TensorHandle(fma_chain_dot(a.data, b.data, d.data), d.dtype.scalar)
        return before_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_exp(self, arg):
        return interpreter.TensorHandle(approx_exp(arg.data), arg.dtype.scalar)

    builder.create_dot = create_dot
    builder.create_exp = create_exp


def uninstall() -> None:
    """The dot and exp that were installed before ``install()`` again."""
    global _SAVED
    if _SAVED is None:
        return
    from triton.runtime import interpreter

    interpreter.InterpreterBuilder.create_dot, interpreter.InterpreterBuilder.create_exp = _SAVED
    _SAVED = None


def gpu_fp32():
    """Within the block, the interpreter's fp32 "ieee" dots and tl.exp round as the GPU's do."""
    from lla_verify.testing.tensor_cores import scoped

    return scoped(install, uninstall, lambda: _SAVED is not None)
