"""The LLA operator's input contract: the argument checks the kernels, the oracles, the
registry and the CLI share.

A leaf: it imports torch and nothing of this project, so a kernel package depends on
torch, triton and this module only, and installs and runs without the harness.

Every failure is an ``LLAInputError`` (a ``ValueError``) whose message names the
argument and says what was expected, so a bad call never turns into a silent NaN
or an error deep inside a solver or a Triton compile.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class LLAInputError(ValueError):
    """A caller passed an argument the LLA operator is not defined for."""


_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CPU = torch.device("cpu")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_dtype(name: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        raise LLAInputError(f"{name}: expected a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_nonnegative(value, name: str, *, expected: str = "a float >= 0") -> float:
    """``value`` as a float, checked to be finite and >= 0; else an LLAInputError naming
    ``name`` (``expected`` says what a value of the wrong type should have been)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise LLAInputError(f"{name}: expected {expected}, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise LLAInputError(f"{name}: expected a finite value >= 0, got {x}")
    return x


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dtypes: Iterable[torch.dtype] = _FLOAT_DTYPES,
    head_dims: Iterable[int] | None = None,
    check_finite: bool = True,
) -> None:
    """Check q, k, v of shape (..., S, D) for the LLA operator.

    q and k must agree exactly; v may have its own last dimension (the value
    width) but the same leading dimensions and S.
    """
    dtypes = tuple(dtypes)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise LLAInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        _check_dtype(name, t, dtypes)
        if t.dim() < 2:
            raise LLAInputError(f"{name}: expected shape (..., S, D) with at least 2 dims, got {_describe(t)}")
        if t.shape[-1] == 0:
            raise LLAInputError(f"{name}: head dimension D must be >= 1, got {_describe(t)}")
        if t.shape[-2] == 0:
            raise LLAInputError(f"{name}: sequence length S must be >= 1, got {_describe(t)}")
    if q.shape != k.shape:
        raise LLAInputError(
            f"k: expected the shape of q {tuple(q.shape)} (S_q == S_k, same D), got {tuple(k.shape)}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise LLAInputError(
            f"v: expected leading shape {tuple(q.shape[:-1])} to match q, got {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise LLAInputError(
            f"q, k, v: expected one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if head_dims is not None:
        head_dims = tuple(head_dims)
        if q.shape[-1] not in head_dims:
            raise LLAInputError(f"q: head dimension D={q.shape[-1]} unsupported; expected one of {head_dims}")
    # one host sync for the three tensors (a device-to-host read stalls the launch queue);
    # the per-tensor search for the message runs only on failure
    if check_finite and bool(nonfinite_flag((q, k, v))):
        raise_nonfinite((("q", q), ("k", k), ("v", v)))


def check_probe(r, q: torch.Tensor, *, dtypes: Iterable[torch.dtype] = _FLOAT_DTYPES,
                check_finite: bool = True) -> None:
    """Check Parallax's probe r: a tensor of q's shape (..., S, D) on q's device."""
    if not isinstance(r, torch.Tensor):
        raise LLAInputError(f"r: expected a torch.Tensor of shape {tuple(q.shape)}, got {type(r).__name__}")
    _check_dtype("r", r, tuple(dtypes))
    if r.shape != q.shape:
        raise LLAInputError(f"r: expected the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    if r.device != q.device:
        raise LLAInputError(f"r: expected q's device {q.device}, got {r.device}")
    if check_finite and bool(nonfinite_flag((r,))):
        raise_nonfinite((("r", r),))


def nonfinite_flag(tensors) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device, True where any holds a NaN or Inf. No host
    sync: a caller that reads it later (the kernels, with their own device-to-host read)
    keeps the launch queue running."""
    return ~torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def raise_nonfinite(named) -> None:
    """Raise LLAInputError naming the first of ``named`` ((name, tensor) pairs) with a NaN
    or Inf, its count and the index of the first one."""
    for name, t in named:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise LLAInputError(
                f"{name}: expected finite values, found {int(bad.sum())} non-finite "
                f"(first at index {idx}: {t[idx].item()})"
            )
    raise LLAInputError("q, k, v: expected finite values, found NaN or Inf")  # pragma: no cover


def check_scale(qk_scale: float | None, head_dim: int) -> float:
    """Return the bandwidth scale s (default 1/sqrt(D)), checked to be finite and >= 0.

    s = 0 is a point of the operator, not only its limit: every score is 0, every
    weight exp(0) = 1, and LLA is exactly the MesaNet form (docs/math.md §4.2). Only
    None asks for the default; a 0 is kept as given.
    """
    if qk_scale is None:
        return 1.0 / math.sqrt(head_dim)
    s = check_nonnegative(qk_scale, "qk_scale", expected="a float >= 0 or None")
    return s + 0.0  # -0.0 reads as 0.0


def check_lambda_value(ridge_lambda, lead_shape: tuple[int, ...], *, dtype=torch.float64) -> float:
    """A ridge_lambda that is not a tensor, checked on the host (no device round trip) as
    ``check_lambda`` checks it, and returned as a float (finite in ``dtype``, >= 0)."""
    try:
        val = float(ridge_lambda)
    except (TypeError, ValueError):
        raise LLAInputError(
            f"ridge_lambda: expected a float >= 0 or a tensor broadcastable to {lead_shape}, got {ridge_lambda!r}"
        ) from None
    if not math.isfinite(val):
        raise LLAInputError("ridge_lambda: expected finite values, found NaN or Inf")
    if val < 0:
        raise LLAInputError(f"ridge_lambda: expected values >= 0, got minimum {val:g}")
    if val > torch.finfo(dtype).max:
        # it would round to Inf in the kernels' dtype (torch.full refuses it outright)
        raise LLAInputError(f"ridge_lambda: expected a value finite in {dtype} (at most "
                            f"{torch.finfo(dtype).max:g}), got {val:g}")
    return val


def check_lambda(ridge_lambda, lead_shape: tuple[int, ...], device, *, dtype=torch.float64) -> torch.Tensor:
    """Return ridge_lambda broadcast to ``lead_shape`` (= (..., S)) as a tensor.

    A float or a tensor that broadcasts to (..., S); every value finite and >= 0.
    Tensors keep their autograd graph (the oracle differentiates through them).
    """
    if isinstance(ridge_lambda, torch.Tensor):
        lam = ridge_lambda
        if not (lam.is_floating_point()):
            raise LLAInputError(f"ridge_lambda: expected a floating tensor, got dtype {lam.dtype}")
        lam = lam.to(device=device, dtype=dtype)
    else:
        return torch.full(lead_shape, check_lambda_value(ridge_lambda, lead_shape, dtype=dtype), device=device,
                          dtype=dtype)
    try:
        lam_b = torch.broadcast_to(lam, lead_shape)
    except RuntimeError:
        raise LLAInputError(
            f"ridge_lambda: shape {tuple(lam.shape)} does not broadcast to (..., S) = {lead_shape}"
        ) from None
    det = lam_b.detach()
    # both checks in one device-to-host read
    nonfinite, negative = torch.stack([(~torch.isfinite(det)).any(), (det < 0).any()]).tolist()
    if nonfinite:
        raise LLAInputError("ridge_lambda: expected finite values, found NaN or Inf")
    if negative:
        raise LLAInputError(f"ridge_lambda: expected values >= 0, got minimum {det.min().item():g}")
    return lam_b


def check_delta_eps(delta_eps: float) -> float:
    return check_nonnegative(delta_eps, "delta_eps")


def check_cache(q, k_cache, v_cache, lengths, *, dtypes: Iterable[torch.dtype] = _FLOAT_DTYPES,
                head_dims: Iterable[int] | None = None, check_finite: bool = True) -> torch.Tensor:
    """Check a decode call's query (B, H, D) against its cache (B, Hk, T_max, D) and
    (B, Hk, T_max, Dv) with per-sequence lengths (B,), 1 <= lengths[b] <= T_max; Hk divides H
    (grouped-query heads share a key-value head). Returns lengths as a host int64 tensor.

    Finiteness covers only the cache positions a sequence uses: the rest is free memory a
    server has not written yet.
    """
    dtypes = tuple(dtypes)
    for name, t, rank in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(t, torch.Tensor):
            raise LLAInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise LLAInputError(f"{name}: expected a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.dim() != rank:
            want = "(B, H, D)" if rank == 3 else "(B, H_kv, T_max, D)"
            raise LLAInputError(f"{name}: expected shape {want}, got {_describe(t)}")
    B, H, D = q.shape
    Bk, Hk, T, Dk = k_cache.shape
    if Bk != B or Dk != D or T == 0 or Hk == 0 or H % Hk:
        raise LLAInputError(f"k_cache: expected shape ({B}, H_kv, T_max >= 1, {D}) with H_kv dividing H = {H}, "
                            f"got {tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3] or v_cache.shape[-1] == 0:
        raise LLAInputError(f"v_cache: expected shape {tuple(k_cache.shape[:3])} + (Dv,), got {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise LLAInputError(f"q, k_cache, v_cache: expected one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise LLAInputError(f"q, k_cache, v_cache: expected one device, got {q.device}, {k_cache.device}, "
                            f"{v_cache.device}")
    if head_dims is not None:
        head_dims = tuple(head_dims)
        for name, d in (("q", D), ("v_cache", v_cache.shape[-1])):
            if d not in head_dims:
                raise LLAInputError(f"{name}: head dimension {d} unsupported; expected one of {head_dims}")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
            or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
        raise LLAInputError(f"lengths: expected an integer tensor of shape ({B},), got "
                            f"{_describe(lengths) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    # an integer tensor carries no autograd graph, so nothing to detach from
    lens = lengths.to(_CPU, torch.int64)
    # the extremes in one reduction (a decode call's host work is most of its time at a small
    # cache); which entry is out of range is searched only on failure
    lo, hi = lens.aminmax() if B else (1, T)
    if int(lo) < 1 or int(hi) > T:
        b = int(((lens < 1) | (lens > T)).nonzero()[0])
        raise LLAInputError(f"lengths: expected 1 <= lengths[b] <= T_max = {T}, got lengths[{b}] = {int(lens[b])}")
    if check_finite:
        check_cache_finite(q, k_cache, v_cache, lens)
    return lens


def check_cache_finite(q, k_cache, v_cache, lens, extra=()) -> None:
    """The finiteness half of ``check_cache`` (lens: its result), with the whole tensors of
    ``extra`` ((name, tensor) pairs on q's device, e.g. Parallax's probe) in the same
    reduction: one device-to-host read a call, the only synchronisation of a decode call."""
    T = k_cache.shape[2]
    unused = (torch.arange(T, device=k_cache.device)[None, :] >= lens.to(k_cache.device)[:, None])[:, None, :]
    # per position, not masked copies: a (B, H_kv, T_max) mask beside the cache, not a second cache
    ok = torch.stack([torch.isfinite(q).all()] + [(torch.isfinite(c).all(-1) | unused).all()
                                                  for c in (k_cache, v_cache)]
                     + [torch.isfinite(t).all() for _, t in extra]).all()
    if not bool(ok):
        raise_nonfinite((("q", q), ("k_cache", k_cache.masked_fill(unused[..., None], 0)),
                         ("v_cache", v_cache.masked_fill(unused[..., None], 0))) + tuple(extra))


def check_plan_cache(k_cache, v_cache) -> None:
    """A decode plan reads the cache in place, so that a later step's writes reach it: the
    cache must be a contiguous tensor (a copy taken at planning would not see them). Shapes,
    dtypes and lengths are check_cache's."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise LLAInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise LLAInputError(f"{name}: a plan reads the cache in place: expected a contiguous tensor, got "
                                f"strides {t.stride()}")
        if t.dim() != 4:
            raise LLAInputError(f"{name}: expected shape (B, H_kv, T_max, D), got {_describe(t)}")


def check_num_heads(num_heads, n_kv: int) -> int:
    """A plan's query heads: None (one per key-value head) or an int >= 1."""
    if num_heads is None:
        return n_kv
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise LLAInputError(f"num_heads: expected None (H_kv) or an int >= 1, got {num_heads!r}")
    return num_heads


def check_planned(name: str, t, shape: tuple, dtype, device, *, contiguous: bool = False) -> None:
    """A run's tensor against the plan: exactly ``shape``, ``dtype`` and ``device`` (attribute
    comparisons only: no device work, so a run can be captured in a CUDA graph)."""
    ok = isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device \
        and (t.is_contiguous() or not contiguous)
    if not ok:
        got = (f"shape {tuple(t.shape)}, {t.dtype} on {t.device}" + ("" if t.is_contiguous() else ", not contiguous")
               if isinstance(t, torch.Tensor) else type(t).__name__)
        want = "a contiguous tensor of shape" if contiguous else "shape"
        raise LLAInputError(f"{name}: expected {want} {tuple(shape)}, {dtype} on {device} (the plan's), got {got}")


def write_plan_lengths(k_cache, v_cache, q_shape: tuple, lengths, lens_d: torch.Tensor, *,
                       dtypes: Iterable[torch.dtype], head_dims: Iterable[int]) -> torch.Tensor:
    """A plan's set_lengths: ``lengths`` checked against the cache as check_cache checks a
    call's (for a query of ``q_shape``), then written into the plan's device copy ``lens_d``.
    Returns them as a host int64 tensor."""
    like = torch.empty(q_shape, device=k_cache.device, dtype=k_cache.dtype)
    lens = check_cache(like, k_cache, v_cache, lengths, dtypes=dtypes, head_dims=head_dims, check_finite=False)
    lens_d.copy_(lens.to(torch.int32))
    return lens
