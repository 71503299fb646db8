"""The GPU's tensor-core rounding of fp32 ``tl.dot`` operands, inside Triton's interpreter.

Compiled, a ``tl.dot`` on fp32 operands with input_precision "tf32" rounds both operands
to TF32 (10 explicit significand bits) before an fp32-accumulated product, and "tf32x3"
splits each operand into a TF32 head and a TF32 tail and adds three of the four cross
products (the tail x tail one is dropped). The interpreter ignores input_precision and
multiplies exact fp32, so on CPU a kernel whose accuracy depends on that choice looks
better than it is on the GPU: lla_triton's backward passed its budget through the
interpreter (dq at 0.495) and failed it on an H200 (1.02) with tf32x3 products.

``tensor_core_rounding()`` (or ``install()``; the test suite's ``--lla-tensor-cores``)
patches the interpreter's dot so that CPU runs see the same operand rounding: round to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``). It
models the operand rounding, not the hardware's accumulation order, so it reproduces the
size of the error, not its bits.
"""

from __future__ import annotations

import contextlib

import numpy as np

_TF32_DROP = np.uint32(0x1FFF)  # the 13 fp32 significand bits TF32 lacks
_EXP = np.uint32(0x7F800000)


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to TF32's 10-bit significand, ties away from zero; Inf and NaN kept."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x1000)) & ~_TF32_DROP
    return np.where((bits & _EXP) == _EXP, bits, rounded).view(np.float32)


def emulated_dot(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray | None:
    """a @ b as the tensor cores compute it for ``precision`` ("tf32", "tf32x3"), or None
    where the interpreter's exact fp32 product is already right (ieee, non-fp32)."""
    if a.dtype != np.float32 or b.dtype != np.float32:
        return None
    if precision == "tf32x3":
        ah, bh = round_to_tf32(a), round_to_tf32(b)
        al, bl = round_to_tf32(a - ah), round_to_tf32(b - bh)
        small = np.matmul(ah, bl, dtype=np.float32) + np.matmul(al, bh, dtype=np.float32)
        return small + np.matmul(ah, bh, dtype=np.float32)
    if precision == "tf32":
        return np.matmul(round_to_tf32(a), round_to_tf32(b), dtype=np.float32)
    return None


def _precision_name(p) -> str:
    # the interpreter passes an enum (INPUT_PRECISION.TF32x3) or a string, by version
    name = str(p).rsplit(".", 1)[-1].lower()
    return name if name in ("tf32", "tf32x3", "ieee") else "ieee"


_ORIGINAL = None


def install() -> None:
    """From now on, interpreted ``tl.dot`` rounds fp32 operands as the GPU does (idempotent)."""
    global _ORIGINAL
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if _ORIGINAL is not None:
        return
    original = _ORIGINAL = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = emulated_dot(a.data, b.data, _precision_name(input_precision))
        if out is None:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle((out + d.data).astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot


def uninstall() -> None:
    """The interpreter's own exact fp32 ``tl.dot`` again."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    from triton.runtime import interpreter

    interpreter.InterpreterBuilder.create_dot = _ORIGINAL
    _ORIGINAL = None


@contextlib.contextmanager
def scoped(install_fn, uninstall_fn, installed):
    """``install_fn()`` for the block, undone after it unless ``installed()`` already held
    before it (a block inside a wider install leaves that install in place)."""
    already = installed()
    install_fn()
    try:
        yield
    finally:
        if not already:
            uninstall_fn()


def tensor_core_rounding():
    """Within the block, interpreted ``tl.dot`` rounds fp32 operands as the GPU does."""
    return scoped(install, uninstall, lambda: _ORIGINAL is not None)
