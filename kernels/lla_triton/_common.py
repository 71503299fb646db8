"""Helpers shared by the forward and backward kernels of lla_triton.

Kept small and stable: the backward engineer imports from here.
"""

from __future__ import annotations

import os

import torch

# The dtypes and head dims the kernels are compiled for.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# Input precision of tl.dot on fp32 operands (see docs/kernels.md):
#   "ieee"   exact fp32 products, no tensor cores (slow, most accurate)
#   "tf32x3" three TF32 tensor-core products (about fp32 accuracy)
#   "tf32"   one TF32 product (10-bit mantissa; too coarse for CG on an
#            ill-conditioned Sigma_i, kept for speed experiments)
PRECISIONS = ("ieee", "tf32x3", "tf32")


def score_precision(dtype: torch.dtype, precision: str, upcast: bool) -> str:
    """tl.dot input precision for the scores a_ij = s <q_i, k_j>.

    The weights exponentiate the scores, so a score's absolute error is a relative
    error of its weight: fp32 inputs need u_fp32 |a_ij|, which tf32x3 (about 12 u_fp32
    per product: the split of each operand and the dropped lo*lo term) does not give
    (docs/kernels.md, "Precision knob"). So fp32 scores are IEEE unless the caller asked
    for plain tf32. 16-bit inputs have exact products in TF32 (8 or 11 significand
    bits), so tf32 is exact there; interpreted (upcast) tiles follow the fp32 rule.
    """
    if dtype == torch.float32 or upcast:
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32"


def backward_product_precision(dtype: torch.dtype, precision: str) -> str:
    """tl.dot input precision for the backward's fp32 tile products.

    The backward's per-pair terms are differences that cancel (e_ij = c_ij - (<u_i, k'_j>
    - <u_i, q'_i>), f_ij e_ij + beta_i, then sum_j dA_ij k'_j with sum_j dA_ij = 0), so a
    product's relative error is amplified by that cancellation. tf32x3's error (about
    8-12 u_fp32 per product) then exceeds what a dense fp32 autograd commits: dq at
    ratio 1.02 of the same-precision allowance on an H200 (bandwidth scale 100, fp32),
    1.79 with tf32x3 emulated in the interpreter, 0.495 with exact fp32 products, and
    0.655 with tf32x3 in the forward and IEEE in the backward (docs/kernels-backward.md).
    So fp32 inputs get IEEE products here unless the caller asked for plain tf32 (a
    speed experiment); 16-bit inputs keep ``precision`` (their split products are exact).
    """
    if dtype == torch.float32 and precision != "tf32":
        return "ieee"
    return precision


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_dtype_ok_for_dot(dtype: torch.dtype) -> bool:
    """Whether tiles of this dtype may go to tl.dot unconverted.

    The interpreter of Triton 3.9 computes garbage for bfloat16 dot operands
    (triton issue 11584), so under the interpreter every tile is upcast to fp32
    first; compiled, 16-bit operands give exact products with fp32 accumulation.
    """
    return not interpreting() or dtype == torch.float32


try:  # Triton 3.x; the name has moved before, so fall back to matching on the class name
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover
    _OutOfResources = None

# Tile configs smaller than any default, tried in order when a default does not fit
# the GPU's shared memory (fp32 operands need twice the bf16 staging buffers).
SMALLER_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1))
_FITTING: dict = {}


def _is_out_of_resources(exc: Exception) -> bool:
    if _OutOfResources is not None and isinstance(exc, _OutOfResources):
        return True
    return type(exc).__name__ == "OutOfResources"


def round_configs(config, keep: int) -> tuple:
    """Fallbacks for a later anchor round, whose kernel variant (other constexprs: the
    anchored path instead of the split one) can need more shared memory than the first
    round's config left room for. Its tile ids count tiles of the first round's block
    ``config[keep]``, so that block stays; fewer stages come first, then a smaller other
    block with one stage."""
    bm, bn, nw, ns = (int(x) for x in config)
    out = [(bm, bn, nw, s) for s in range(ns - 1, 0, -1)]
    other = (bn, bm)[keep]
    while other > 16:
        other //= 2
        out.append((bm, other, nw, 1) if keep == 0 else (other, bn, nw, 1))
    return tuple(out)


def launch_fitting(name: str, key, config, launch, *, explicit: bool, fallbacks=SMALLER_CONFIGS):
    """``launch(config)``; where the config needs more shared memory than this GPU has,
    the next of ``fallbacks`` that fits, remembered per (name, key).

    An explicit config (a caller's tile sweep) is never replaced: its error propagates.
    """
    if explicit:
        return launch(tuple(config))
    first = _FITTING.get((name, key), tuple(config))
    order = [first] + [c for c in (tuple(config),) + tuple(fallbacks) if c != first]
    last = None
    for cfg in order:
        try:
            out = launch(cfg)
        except Exception as exc:  # noqa: BLE001 - only out-of-resources is retried
            if not _is_out_of_resources(exc):
                raise
            last = exc
            continue
        _FITTING[(name, key)] = cfg
        return out
    raise last


def fitted_rounds(name: str, key, config, keep: int, launch, *, explicit: bool):
    """``launch_round(tile_ids, anchors, todo)`` for reanchor_rounds: ``launch(cfg,
    tile_ids, anchors, todo)`` through launch_fitting, from ``config`` (the first round's)
    down its round_configs. Later rounds run another kernel variant (the anchored path
    where the first ran the split one: 240 KiB of shared memory for kernel A at D = 64 with
    the first round's tiles, on a 227 KiB H200), so they fit their tiles on their own."""
    config = tuple(config)

    def launch_round(tile_ids, anchors, todo):
        return launch_fitting(name, key + (config,), config, lambda c: launch(c, tile_ids, anchors, todo),
                              explicit=explicit, fallbacks=round_configs(config, keep))
    return launch_round


def reanchor_rounds(far: torch.Tensor, block: int, launch_round, counter=None, also=None) -> bool:
    """Host side of the anchor rounds (docs/kernels.md, "Rows far from the anchor").

    ``far`` (N, S) int8 holds what the first launch marked: rows (or keys) of its
    tiles too far from the tile's anchor, left unwritten. While any remain, the tiles
    holding them run again around their first such row: ``launch_round(tile_ids,
    anchors, todo)`` with tile_ids (T,) int32 = head * n_tiles + tile, anchors (T,)
    int32 row indices, todo (N, S) int8; it refills ``far``. Each round serves at least
    its anchor's row, so there are at most ``block`` rounds. ``counter`` (N, S) int32,
    when given, counts the rounds each row took part in.

    ``also``, a 0-d bool tensor (the caller's deferred check of its inputs), is read in
    the same device-to-host transfer as the first far.any() and returned; when it is
    True no round runs (the caller raises).

    The loop lives on the host, not in the kernel: a kernel-side loop around the
    passes miscompiled bf16 products at D = 16 under Triton 3.6 (wrong results, then
    an illegal address). Ordinary inputs pay one device-to-host read of far.any().
    """
    if also is not None:
        any_far, flag = torch.stack([far.any(), also.to(far.device)]).tolist()
        if flag or not any_far:
            return bool(flag)
    elif not bool(far.any()):
        return False
    N, S = far.shape
    n_tiles = -(-S // block)
    pad = n_tiles * block - S
    idx = torch.arange(n_tiles * block, device=far.device, dtype=torch.int32).view(n_tiles, block)
    for r in range(block):
        if r and not bool(far.any()):
            return False
        todo = far.clone()
        far.zero_()
        if counter is not None:
            counter += todo.to(counter.dtype)
        tf = torch.nn.functional.pad(todo, (0, pad)).view(N, n_tiles, block).bool()
        first = torch.where(tf, idx, torch.iinfo(torch.int32).max).amin(-1).reshape(-1)
        tile_ids = tf.any(-1).reshape(-1).nonzero().squeeze(1)
        launch_round(tile_ids.to(torch.int32).contiguous(), first[tile_ids].to(torch.int32).contiguous(), todo)
    if bool(far.any()):  # pragma: no cover - each round serves its anchor row
        raise RuntimeError("lla_triton: anchor rounds did not terminate")
    return False
