"""The extreme eigenvalues of many small symmetric positive semi-definite matrices.

The budgets need lambda_min and lambda_max of every Sigma_i (kappa, ||Sigma_i||, the
singularity test of the augmented normal matrix), never the rest of the spectrum.

* On CPU: LAPACK ``eigvalsh``. At the oracle's sizes (D <= 128, tens to thousands of
  matrices per call) it is cheaper there than the iteration below, whose dozens of
  small batched steps each cost more than the whole decomposition of a 64 x 64 matrix.
* On any other device (CUDA): ``certified_extremes``. torch's batched ``eigvalsh`` on
  CUDA is one cuSOLVER call per matrix past D = 32 (about 0.8 ms each at D = 64), while
  a few batched matrix-vector products, triangular solves and Cholesky factorisations
  cost about that for the whole batch.

``certified_extremes`` (docs/error-model.md, "Extreme eigenvalues on the device"):

1. lambda_max: ``steps`` Lanczos steps on A with full reorthogonalisation from a fixed
   start vector, then Rayleigh-Ritz: the largest Ritz value theta is a lower bound on
   lambda_max (Cauchy interlacing; V has orthonormal columns to rounding).
2. lambda_min: the same on A^-1, applied by two triangular solves with A's Cholesky
   factor: the largest Ritz value phi of A^-1 gives g = 1/phi >= lambda_min.
3. Certificates by inertia: a Cholesky factorisation of (1 + rtol) theta I - A that
   succeeds proves lambda_max < (1 + rtol) theta, and one of A - g/(1 + rtol) I proves
   lambda_min > g/(1 + rtol) (both up to the factorisation's own backward error,
   about D (D + 1) u64 ||A||).
4. A row whose Cholesky of A fails, whose certificate fails (the Krylov space missed
   or has not resolved an extreme eigenvalue), or whose kappa is so large that the
   certificate's backward error reaches a tenth of rtol (D (D + 1) u64 kappa >
   rtol / 10: the near-singular rows) is answered by ``eigvalsh`` instead, so those
   rows get exactly the values the CPU computes.

Guarantee, for the certified rows, up to float64 rounding of the stored matrix (relative
D u64 on lambda_max; D u64 kappa on lambda_min through the solves, under rtol / (10 (D + 1))
on these rows; 1e-8 for the orthogonality of the Krylov basis that the breakdown cut
keeps): lambda_max / (1 + rtol) <= theta <= lambda_max and
lambda_min <= g <= lambda_min (1 + rtol) (1 + rtol / 10), the last factor the
certificate's backward error; hence kappa / ((1 + rtol)^2 (1 + rtol / 10)) <= theta / g
<= kappa, within 2.2% below at rtol = 1e-2. The returned values are theta and g
themselves: kappa is never overestimated, so no row is exempted from judgement that the
exact kappa would judge. ``eigvalsh``'s own lambda_min carries a relative error of about
D u64 kappa, under rtol / (10 (D + 1)) on every certified row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

_F64 = torch.float64
_U64 = 2.0**-53
RTOL = 1e-2  # certified relative width of each extreme eigenvalue's bracket
LANCZOS_STEPS = 16  # Krylov dimension per end; min(D, this) is used
_BREAKDOWN = 1e-8  # a new Lanczos vector this small relative to A v: invariant subspace found
_START_SEED = 20240601


class Extremes(NamedTuple):
    """Smallest and largest eigenvalue per matrix, leading shape (...); ``certified``
    marks rows the iteration answered (False where ``eigvalsh`` did)."""

    lo: torch.Tensor
    hi: torch.Tensor
    certified: torch.Tensor


def _use_eigvalsh(A: torch.Tensor) -> bool:
    """LAPACK's eigvalsh where it is the cheaper method: on CPU (module docstring)."""
    return A.device.type == "cpu"


def extreme_eigenvalues(A: torch.Tensor, *, smallest: bool = True) -> Extremes:
    """lambda_min and lambda_max of symmetric PSD float64 matrices A (..., D, D).

    ``eigvalsh`` on CPU, ``certified_extremes`` elsewhere (module docstring).
    smallest=False: only lambda_max is needed; lo is then NaN where the iteration answered.
    """
    if _use_eigvalsh(A):
        ev = torch.linalg.eigvalsh(A)
        return Extremes(ev[..., 0], ev[..., -1], torch.zeros(ev.shape[:-1], dtype=torch.bool))
    return certified_extremes(A, smallest=smallest)


def symmetric_norm(E: torch.Tensor) -> torch.Tensor:
    """||E||_2 of symmetric (indefinite) float64 matrices E (..., D, D): max |eigenvalue|.

    ``eigvalsh`` on CPU; elsewhere sqrt(lambda_max(E^2)) from ``certified_extremes``
    (relative width rtol / 2)."""
    if _use_eigvalsh(E):
        return torch.linalg.eigvalsh(E).abs().amax(-1)
    E2 = E @ E
    return certified_extremes(0.5 * (E2 + E2.transpose(-1, -2)), smallest=False).hi.sqrt()


def spectral_norm(K: torch.Tensor) -> torch.Tensor:
    """||K||_2 of float64 (..., m, n) matrices: sqrt(lambda_max) of the smaller Gram matrix,
    through ``extreme_eigenvalues``. On CPU LAPACK's eigvalsh (the largest singular value
    to float64 rounding); elsewhere the certified iteration, within rtol / 2 below ||K||_2,
    never above. torch's batched svdvals (and matrix_norm(ord=2), cond) of matrices past
    32 x 32 on CUDA is one cuSOLVER call per matrix, 3-4 ms each at 64 x 64. Zero matrices
    give 0 without the iteration (which cannot certify them and would hand each to eigvalsh)."""
    G = K.transpose(-1, -2) @ K if K.shape[-1] <= K.shape[-2] else K @ K.transpose(-1, -2)
    G = 0.5 * (G + G.transpose(-1, -2))
    nz = G.flatten(-2).abs().amax(-1) > 0
    out = torch.zeros(G.shape[:-2], dtype=G.dtype, device=G.device)
    if bool(nz.any()):
        out[nz] = extreme_eigenvalues(G[nz], smallest=False).hi.clamp_min(0.0).sqrt()
    return out


@functools.lru_cache(maxsize=32)
def _start_on(D: int, device: str) -> torch.Tensor:
    x = torch.randn(D, generator=torch.Generator().manual_seed(_START_SEED), dtype=_F64)
    return (x / x.norm()).to(device)


def _start(D: int, device) -> torch.Tensor:
    """The fixed unit start vector, the same on every device (read-only: callers copy).

    Pseudo-random: a structured start (all ones) can be orthogonal to an extreme
    eigenvector of a structured matrix; the certificate catches that anyway."""
    return _start_on(int(D), str(torch.device(device)))


def _top_ritz(apply, n: int, D: int, steps: int, device) -> torch.Tensor:
    """Largest Ritz value of the operator ``apply`` ((n, D) -> (n, D), symmetric PSD) on
    the Krylov space of dimension ``steps`` from the fixed start vector, per row."""
    V = torch.zeros(n, D, steps, dtype=_F64, device=device)
    W = torch.zeros(n, D, steps, dtype=_F64, device=device)
    v = _start(D, device).expand(n, D).clone()
    for j in range(steps):
        V[..., j] = v
        w = apply(v)
        W[..., j] = w
        if j == steps - 1:
            break
        size = w.norm(dim=-1, keepdim=True)
        Vj = V[..., :j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding
            w = w - (Vj @ (Vj.transpose(-1, -2) @ w[..., None]))[..., 0]
        nrm = w.norm(dim=-1, keepdim=True)
        # After a breakdown the remainder is rounding noise, and normalised noise is not
        # orthogonal enough to keep the Ritz values bounds: stop that row's basis (zero
        # columns add Ritz values 0, below every eigenvalue of a PSD operator).
        v = torch.where(nrm > _BREAKDOWN * size, w / nrm.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(w))
    H = V.transpose(-1, -2) @ W
    return torch.linalg.eigvalsh(0.5 * (H + H.transpose(-1, -2)))[..., -1]


def certified_extremes(A: torch.Tensor, *, smallest: bool = True, rtol: float = RTOL,
                       steps: int = LANCZOS_STEPS) -> Extremes:
    """Certified extreme eigenvalues of symmetric PSD float64 matrices A (..., D, D),
    with ``eigvalsh`` for the rows the certificate does not cover (module docstring)."""
    lead, D = A.shape[:-2], A.shape[-1]
    flat = A.reshape(-1, D, D)
    n, dev = flat.shape[0], flat.device
    if n == 0:
        empty = flat.new_zeros(lead)
        return Extremes(empty, empty.clone(), torch.zeros(lead, dtype=torch.bool, device=dev))
    k = max(1, min(int(steps), D))
    eye = torch.eye(D, dtype=_F64, device=dev)
    hi = _top_ritz(lambda x: (flat @ x[..., None])[..., 0], n, D, k, dev)
    _, info_hi = torch.linalg.cholesky_ex(((1.0 + rtol) * hi)[:, None, None] * eye - flat)
    ok = (info_hi == 0) & torch.isfinite(hi) & (hi > 0)
    lo = torch.full_like(hi, float("nan"))
    if smallest:
        L, info = torch.linalg.cholesky_ex(flat)
        good = info == 0
        L = torch.where(good[:, None, None], L, eye)

        def inverse(x):
            y = torch.linalg.solve_triangular(L, x[..., None], upper=False)
            return torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True)[..., 0]

        lo = 1.0 / _top_ritz(inverse, n, D, k, dev)
        _, info_lo = torch.linalg.cholesky_ex(flat - (lo / (1.0 + rtol))[:, None, None] * eye)
        resolvable = hi / lo * (D * (D + 1) * _U64) <= 0.1 * rtol
        ok = ok & good & (info_lo == 0) & torch.isfinite(lo) & (lo > 0) & resolvable
    if not bool(ok.all()):
        rest = ~ok
        ev = torch.linalg.eigvalsh(flat[rest])
        hi = hi.masked_scatter(rest, ev[..., -1])
        lo = lo.masked_scatter(rest, ev[..., 0])
    return Extremes(lo.reshape(lead), hi.reshape(lead), ok.reshape(lead))
