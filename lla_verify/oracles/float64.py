"""Float64 oracles for Local Linear Attention (docs/math.md derives every formula).

Two independent implementations of the same operator:

* ``lla_forward`` / ``lla_forward_details``: the rho/Schur formulation of SPEC 1,
  with the pairwise differences z_ij = k_j - q_i formed explicitly (so a large
  common offset of q and k cancels exactly, before any product), Sigma_i solved by
  Cholesky, and the output normalised by sum_j w_ij (1 - <z_ij, rho_i>) (which is
  delta_i in exact arithmetic, and keeps sum_j s_ij = 1 to rounding).
* ``lla_forward_wls``: the intercept of the augmented weighted least-squares problem
  of SPEC 2, on softmax-normalised weights and an LU solve of the (D+1)-square
  normal matrix; it shares no arithmetic with the first beyond the scores.

Both are float64 on any device, differentiable through autograd with respect to q,
k, v and a tensor ridge_lambda, and process queries in chunks whose pairwise
tensors fit a memory budget (only keys j <= the chunk's last query are touched).

Queries with ridge_lambda == 0 whose Sigma_i is singular (early tokens i < D, or
keys in a low-dimensional subspace) have no value: delta_i = 0 makes s_ij a 0/0.
The oracles return NaN there and ``details.undefined`` marks them; comparisons
skip those rows and say how many. The same mark (and NaN) goes on the rare rows with
lambda > 0 where float64 cannot resolve the value at all: kappa ~ 1e30, every
1 - <z_ij, rho_i> rounding to 0. The mpmath oracle resolves those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lla_contract import LLAInputError, check_delta_eps, check_lambda, check_qkv, check_scale

from .extremes import extreme_eigenvalues, spectral_norm, symmetric_norm

_F64 = torch.float64
# A Sigma_i with lambda == 0 counts as singular when its condition number exceeds
# 1 / (D * u64): there the float64 solve has no correct digit left.
_U64 = 2.0**-53
DEFAULT_CHUNK_BYTES = 128 * 2**20


@dataclass
class LLADetails:
    """Per-query quantities of the float64 oracle; all float64, leading shape (..., S)."""

    o: torch.Tensor  # (..., S, Dv)
    m: torch.Tensor  # (..., S) row max of the scores a_ij
    omega: torch.Tensor  # (..., S)
    mu: torch.Tensor  # (..., S, D)
    rho: torch.Tensor  # (..., S, D)
    delta: torch.Tensor  # (..., S)  sum_j w (1 - z.rho)^2 + lambda omega |rho|^2 (>= 0)
    kappa: torch.Tensor  # (..., S)  cond_2(Sigma_i) (inf when singular)
    lam: torch.Tensor  # (..., S) ridge_lambda as broadcast
    undefined: torch.Tensor  # (..., S) bool: lambda == 0 and Sigma_i singular (or float64 unresolved)
    sigma_norm: torch.Tensor = None  # (..., S) ||Sigma_i||_2 (largest eigenvalue)
    # (..., S) ||(do_i/drho_i) Sigma_i^{-1}||_F ||mu_i||: output change per unit relative residual (None: not asked)
    solv: torch.Tensor = None
    scale: float = 0.0
    extras: dict = field(default_factory=dict)


def _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps):
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    eps = check_delta_eps(delta_eps)
    lead = tuple(q.shape[:-1])
    lam = check_lambda(ridge_lambda, lead, q.device)
    return q.to(_F64), k.to(_F64), v.to(_F64), lam, scale, eps


def flatten_leading(t: torch.Tensor, tail: int) -> torch.Tensor:
    return t.reshape((-1,) + tuple(t.shape[t.dim() - tail:]))


def chunk_size(S: int, D: int, Dv: int, budget: int) -> int:
    # per query of a chunk: a few (S, D) pairwise tensors plus (S) weights, float64
    per_query = 8 * S * (3 * D + Dv + 4)
    return int(max(1, min(S, budget // max(per_query, 1))))


def causal_scores(qc, k, scale, i0, causal_len):
    """Masked scores a_ij for queries i0.. of the chunk against keys 0..causal_len-1."""
    a = scale * (qc @ k[:, :causal_len].transpose(-1, -2))
    C = qc.shape[1]
    rows = torch.arange(i0, i0 + C, device=qc.device)[:, None]
    cols = torch.arange(causal_len, device=qc.device)[None, :]
    mask = cols <= rows
    return a, mask


def _singular_augmented(omega, mu, sig):
    """True where G_i = [[omega, mu^T], [mu, Sigma]] is numerically singular.

    At lambda == 0, G_i (the normal matrix of SPEC 2) is singular exactly when
    delta_i = 0 or Sigma_i is singular, i.e. when o_i is a 0/0. That needs fewer than
    D + 1 weighted keys in affine general position: every early token i < D, and
    keys confined to a low-dimensional affine subspace. The test is on the
    Jacobi-scaled G_i: an exactly singular one comes out of eigvalsh with a smallest
    eigenvalue of a few u64 (either sign), so the cut is a condition number of
    1/(100 (D+1) u64) (about 1e13): past it a float64 solve keeps under two digits
    and the 0/0 cannot be told from a genuine, tiny delta_i. Off the CPU the extremes
    come from ``certified_extremes``, which hands every row near that cut (kappa past
    rtol / (10 (D+1) (D+2) u64), 2e9 at D = 64) to eigvalsh: the same decision either way.
    """
    D = sig.shape[-1]
    G = torch.cat([torch.cat([omega[..., None, None], mu[..., None, :]], -1),
                   torch.cat([mu[..., :, None], sig], -1)], -2)
    d = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(torch.finfo(_F64).tiny).rsqrt()
    ext = extreme_eigenvalues(d[..., :, None] * G * d[..., None, :])
    return ext.lo <= ext.hi * (100 * (D + 1) * _U64)


def _sym_probe(shape, seed, i0: int, device) -> torch.Tensor:
    """Random symmetric (..., D, D) matrices of unit spectral norm, reproducible per chunk.

    Unit spectral (not Frobenius) norm: the probe stands for a normwise perturbation of
    relative size h in the 2-norm, whatever the spectrum of Sigma_i (docs/error-model.md §6).
    ``seed`` may be a tuple: the leading dimension is then one equal block per seed, each
    block the matrices that seed alone gives (several probes evaluated in one batch).
    """
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    n = shape[0] // len(seeds)
    blocks = []
    for s in seeds:
        gen = torch.Generator().manual_seed(s * 1_000_003 + i0)
        blocks.append(torch.randn((n,) + tuple(shape[1:]), generator=gen, dtype=_F64))
    g = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)
    e = (g + g.transpose(-1, -2)).to(device)
    return e / symmetric_norm(e)[..., None, None]


def _chunk_moments(qc, k, lc, scale, i0, i1, eye):
    """Queries i0..i1-1 of a chunk: row max m, weights w_ij = exp(a_ij - m_i) (0 where
    masked), omega_i, z_ij = k_j - q_i (0 where masked), mu_i and Sigma_i (symmetrised),
    all float64, and the causal mask (C, J)."""
    a, mask = causal_scores(qc, k, scale, i0, i1)
    a = a.masked_fill(~mask, float("-inf"))
    m = a.detach().amax(-1, keepdim=True)  # o does not depend on m (shift invariance)
    w = torch.exp(a - m)  # (N, C, J), exactly 0 where masked
    omega = w.sum(-1)
    # exact for shared offsets. Masked pairs are selected out rather than left to w_ij = 0:
    # in the backward 0 times a non-finite adjoint of query i is NaN, and through z_ij it
    # would reach key j > i, a key that never feeds query i (error-model.md §6)
    z = torch.where(mask[..., None], k[:, None, :i1, :] - qc[:, :, None, :], 0.0)  # (N, C, J, D)
    wz = w[..., None] * z
    mu = wz.sum(-2)
    sig = wz.transpose(-1, -2) @ z + (lc * omega)[..., None, None] * eye
    return m, w, omega, z, mu, 0.5 * (sig + sig.transpose(-1, -2)), mask


def sigma_matrices(q, k, *, ridge_lambda, qk_scale=None, chunk_bytes=DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The oracle's Sigma_i, float64 (..., S, D, D), computed exactly as ``lla_forward`` does.

    For tests of what is computed from Sigma_i (kappa, ||Sigma_i||); memory S D^2.
    """
    check_qkv(q, k, k)
    scale = check_scale(qk_scale, q.shape[-1])
    lead, (S, D) = tuple(q.shape[:-2]), q.shape[-2:]
    lam = check_lambda(ridge_lambda, lead + (S,), q.device).reshape(-1, S)
    qf, kf = flatten_leading(q.to(_F64), 2), flatten_leading(k.to(_F64), 2)
    eye = torch.eye(D, dtype=_F64, device=q.device)
    C = chunk_size(S, D, D, chunk_bytes)
    out = [_chunk_moments(qf[:, i0:min(S, i0 + C)], kf, lam[:, i0:min(S, i0 + C)], scale, i0, min(S, i0 + C), eye)[5]
           for i0 in range(0, S, C)]
    return torch.cat(out, 1).reshape(*lead, S, D, D)


def _solve_rho(sig, rhs, eye):
    """(rho, L, bad): rho_i = Sigma_i^-1 rhs_i by Cholesky, by LU on the rows (``bad``) whose
    Cholesky fails; L the factor, the identity on those rows."""
    L, info = torch.linalg.cholesky_ex(sig)
    bad = info != 0
    # A failed factor comes back partial and finite on CPU (LAPACK) but NaN on CUDA
    # (pytorch/pytorch#121009). The where below keeps it out of the forward only: the
    # backward of the discarded solve still runs, and 0 times NaN is NaN, into Sigma_i,
    # mu_i and every key. The identity stands in (error-model.md §6, "on every device").
    L = torch.where(bad[..., None, None], eye, L)
    rho = torch.cholesky_solve(rhs[..., None], L)[..., 0]
    if bool(bad.any()):
        # Sigma_i is SPD in exact arithmetic when lambda_i > 0, but kappa beyond
        # 1/u64 (or a Sigma probe past lambda_min) can fail Cholesky; LU still returns
        # the float64 answer there.
        rho_lu = torch.linalg.solve_ex(sig, rhs[..., None])[0][..., 0]
        rho = torch.where(bad[..., None], rho_lu, rho)
    return rho, L, bad


def _core(q, k, v, lam, scale, eps, *, want_details: bool, chunk_bytes: int, sigma_probe=None, mu_shift=None,
          want_solv: bool = True):
    """The rho/Schur oracle on flattened (N, S, D) float64 inputs.

    sigma_probe = (h, seed) adds h ||Sigma_i||_2 E_i to every Sigma_i, E_i random symmetric
    of unit spectral norm (constant: no gradient flows through the perturbation). Budgets
    use it to measure how far rounding inside the solves can move the gradients. A tuple
    of seeds splits N into one equal block per seed (_sym_probe).
    mu_shift (N, S, D): rho_i solves Sigma_i rho_i = mu_i + shift_i, i.e. carries the solve
    residual -shift_i, and every later step uses that rho_i, as a kernel uses its inexact
    one; differentiable in the shift (budget.rho_residual_dlambda).
    want_solv=False leaves the details' solv out (None): only the forward budget reads it.
    """
    N, S, D = q.shape
    Dv = v.shape[-1]
    C = chunk_size(S, D, Dv, chunk_bytes)
    outs, dets = [], {key: [] for key in ("m", "omega", "mu", "rho", "delta", "kappa", "undefined", "solv", "sigma_norm")}
    eye = torch.eye(D, dtype=_F64, device=q.device)
    # kappa and ||Sigma_i|| need only the extreme eigenvalues (extremes.py), and nothing
    # in a chunk uses them: Sigma_i of consecutive chunks wait here, up to chunk_bytes, and
    # go through in one batch (on the GPU the iteration's cost is per call, not per row)
    pending, pending_bytes = [], 0

    def flush():
        ext = extreme_eigenvalues(torch.cat(pending, 1))
        lo, hi = ext.lo, ext.hi
        dets["kappa"].append(torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(_F64).tiny),
                                         torch.full_like(hi, float("inf"))))
        dets["sigma_norm"].append(hi)
        pending.clear()

    for i0 in range(0, S, C):
        i1 = min(S, i0 + C)
        qc, lc = q[:, i0:i1], lam[:, i0:i1]
        m, w, omega, z, mu, sig, mask = _chunk_moments(qc, k, lc, scale, i0, i1, eye)
        if sigma_probe is not None:
            h, seed = sigma_probe
            # Sigma_i is symmetric positive semi-definite: its 2-norm is its top eigenvalue
            size = extreme_eigenvalues(sig.detach(), smallest=False).hi.clamp_min(0.0)[..., None, None]
            sig = sig + h * size * _sym_probe(sig.shape, seed, i0, sig.device)

        zero_lam = lc.detach() == 0
        undefined = torch.zeros_like(zero_lam)
        if bool(zero_lam.any()):
            # only rows with lambda == 0 can be singular: test those alone
            undefined[zero_lam] = _singular_augmented(omega.detach()[zero_lam], mu.detach()[zero_lam],
                                                      sig.detach()[zero_lam])
        if want_details:
            pending.append(sig.detach())
            pending_bytes += sig.numel() * sig.element_size()
            if pending_bytes >= chunk_bytes or i1 == S:
                flush()
                pending_bytes = 0
        if bool(undefined.any()):
            # Keep the graph finite: solve an identity system there, NaN the output below.
            sig = torch.where(undefined[..., None, None], eye.expand_as(sig), sig)

        rhs = mu if mu_shift is None else mu + mu_shift[:, i0:i1]
        rho, L, bad = _solve_rho(sig, rhs, eye)
        lost = ~torch.isfinite(rho.detach()).all(-1) & ~undefined
        if bool(lost.any()):
            # Neither Cholesky nor LU solved these rows (Sigma_i singular in float64 at
            # lambda_i > 0): no value, and the solve's backward would carry 0 x Inf = NaN
            # into the keys; the identity system stands in, as for the undefined rows above
            undefined = undefined | lost
            sig = torch.where(lost[..., None, None], eye.expand_as(sig), sig)
            rho, L, bad = _solve_rho(sig, rhs, eye)

        f = 1.0 - (z @ rho[..., None])[..., 0]  # (N, C, J): 1 - <z_ij, rho_i>
        # selected, not multiplied, to 0 where masked (as z: 0 x NaN is NaN)
        wf = torch.where(mask, w * f, 0.0)
        den = wf.sum(-1)
        if eps > 0:
            den = den + eps * torch.sign(den)
        # lambda > 0 but so small (kappa ~ 1e30) that every f_ij rounds to 0: float64 has
        # no digit of this row; flag it with the structurally undefined ones (mpmath
        # resolves it: tests/test_oracle_mp.py)
        undefined = undefined | (den.detach() == 0) | ~torch.isfinite(den.detach())
        den = torch.where(undefined, torch.ones_like(den), den)
        o = (wf[..., None] * v[:, None, :i1, :]).sum(-2) / den[..., None]
        o = torch.where(undefined[..., None], torch.full_like(o, float("nan")), o)
        outs.append(o)
        if want_details:
            delta = (w * f * f).sum(-1) + lc * omega * (rho * rho).sum(-1)
            # Solver sensitivity (error-model.md): a residual r_i in the solve moves o_i
            # by (d o_i / d rho_i) Sigma_i^{-1} r_i, with d o_i/d rho_i = -B_i and
            # B_i = (1/den_i) sum_j w_ij (v_j - o_i) z_ij^T; so ||B_i Sigma_i^{-1}||_F ||mu_i||
            # is the output change per unit of relative residual ||r_i|| / ||mu_i||.
            if want_solv:
                with torch.no_grad():
                    coef = (w / den[..., None])[..., None] * (v[:, None, :i1, :] - o[:, :, None, :])
                    Bm = coef.transpose(-1, -2) @ z  # (N, C, Dv, D)
                    X = torch.cholesky_solve(Bm.transpose(-1, -2), L)
                    if bool(bad.any()):
                        X = torch.where(bad[..., None, None], torch.linalg.solve_ex(sig, Bm.transpose(-1, -2))[0], X)
                    solv = X.flatten(-2).norm(dim=-1) * mu.norm(dim=-1)
                    solv = torch.where(undefined, torch.full_like(solv, float("nan")), solv)
                dets["solv"].append(solv)
            dets["m"].append(m[..., 0])
            dets["omega"].append(omega)
            dets["mu"].append(mu)
            dets["rho"].append(rho)
            dets["delta"].append(delta)
            dets["undefined"].append(undefined)
    o = torch.cat(outs, 1)
    if not want_details:
        return o, None
    return o, {key: torch.cat(val, 1) if val else None for key, val in dets.items()}


def lla_forward(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Causal LLA in float64 (rho/Schur formulation). Returns float64 of shape (..., S, Dv).

    q, k: (..., S, D); v: (..., S, Dv); any float dtype, converted exactly to float64.
    ridge_lambda: float >= 0 or tensor broadcastable to (..., S).
    """
    return _output_only(q, k, v, ridge_lambda, qk_scale, delta_eps, chunk_bytes, None)


def _output_only(q, k, v, ridge_lambda, qk_scale, delta_eps, chunk_bytes, sigma_probe, mu_shift=None):
    q64, k64, v64, lam, scale, eps = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    lead = q.shape[:-2]
    o, _ = _core(
        flatten_leading(q64, 2), flatten_leading(k64, 2), flatten_leading(v64, 2), lam.reshape(-1, q.shape[-2]), scale, eps,
        want_details=False, chunk_bytes=chunk_bytes, sigma_probe=sigma_probe,
        mu_shift=None if mu_shift is None else flatten_leading(mu_shift, 2),
    )
    return o.reshape(*lead, q.shape[-2], v.shape[-1])


def lla_forward_sigma_probe(q, k, v, *, ridge_lambda, h: float, seed, qk_scale=None,
                            chunk_bytes=DEFAULT_CHUNK_BYTES):
    """``lla_forward`` with every Sigma_i perturbed by h ||Sigma_i||_2 E_i (see ``_core``).

    Not an LLA variant: a probe for error budgets (budget.check_backward). Differentiable
    like ``lla_forward``. ``seed``: an int, or a tuple of n seeds for inputs stacked n
    times along a new first dimension, slice t probed as seed[t] alone probes it.
    """
    if isinstance(seed, int):
        seeds = int(seed)
    else:
        seeds = tuple(int(s) for s in seed)
        if not seeds or q.dim() < 3 or q.shape[0] != len(seeds):
            raise ValueError(f"seed: expected an int, or one seed per slice of q's first dimension "
                             f"({q.shape[0] if q.dim() else 0}), got {len(seeds)} seeds")
    return _output_only(q, k, v, ridge_lambda, qk_scale, 0.0, chunk_bytes, (float(h), seeds))


def lla_forward_mu_shift(q, k, v, *, ridge_lambda, shift, qk_scale=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """``lla_forward`` with each rho_i solving Sigma_i rho_i = mu_i + shift_i (shift: (..., S, D)).

    Not an LLA variant: a probe for error budgets. A solve that stops with residual
    r_i = mu_i - Sigma_i rho_i returns the rho_i of shift -r_i, and a backward that uses it
    (kernels do) computes this function's gradient; differentiating that gradient in the
    shift gives the gradient's response to the solve's residual (budget.rho_residual_dlambda).
    """
    return _output_only(q, k, v, ridge_lambda, qk_scale, 0.0, chunk_bytes, None, shift)


def lla_forward_details(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, chunk_bytes=DEFAULT_CHUNK_BYTES,
                        mu_shift=None, solver_sensitivity: bool = True):
    """``lla_forward`` plus omega, mu, rho, delta, kappa(Sigma_i) and the undefined mask.

    mu_shift: as ``lla_forward_mu_shift`` (None: none). solver_sensitivity=False leaves
    ``solv`` out (None; a solve per query with Dv right-hand sides that only the forward
    budget reads). With inputs that require grad, the
    returned ``o`` carries the graph of ``lla_forward`` (or ``lla_forward_mu_shift``), so
    one pass gives both the details and the float64 gradients (budget.check_backward).
    """
    q64, k64, v64, lam, scale, eps = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    lead = tuple(q.shape[:-2])
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    o, d = _core(
        flatten_leading(q64, 2), flatten_leading(k64, 2), flatten_leading(v64, 2), lam.reshape(-1, S), scale, eps,
        want_details=True, chunk_bytes=chunk_bytes,
        mu_shift=None if mu_shift is None else flatten_leading(mu_shift, 2), want_solv=solver_sensitivity,
    )

    def r(t, *tail):
        return t.reshape(*lead, S, *tail)

    return LLADetails(
        o=r(o, Dv), m=r(d["m"]), omega=r(d["omega"]), mu=r(d["mu"], D), rho=r(d["rho"], D),
        delta=r(d["delta"]), kappa=r(d["kappa"]), lam=lam, undefined=r(d["undefined"]), scale=scale,
        solv=None if d["solv"] is None else r(d["solv"]), sigma_norm=r(d["sigma_norm"]),
    )


def lla_forward_wls(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Causal LLA as the intercept of a weighted ridge regression (SPEC 2), float64.

    Independent of ``lla_forward``: softmax-normalised weights p_ij, the augmented
    design x_ij = [1, z_ij], the normal matrix G_i = sum_j p_ij x x^T + diag(0, lambda I)
    solved by LU against sum_j p_ij x_ij v_j^T; o_i is the first row of the solution.
    delta_eps is accepted for a uniform signature; the intercept has no denominator
    to guard, so it must be 0.
    """
    q64, k64, v64, lam, scale, eps = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    if eps != 0.0:
        raise ValueError("delta_eps: the WLS formulation has no delta to guard; pass 0")
    lead = tuple(q.shape[:-2])
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]
    qf, kf, vf, lf = flatten_leading(q64, 2), flatten_leading(k64, 2), flatten_leading(v64, 2), lam.reshape(-1, S)
    C = chunk_size(S, D + 1, Dv, chunk_bytes)
    reg = torch.diag(torch.cat([torch.zeros(1, dtype=_F64), torch.ones(D, dtype=_F64)])).to(q64.device)
    outs = []
    for i0 in range(0, S, C):
        i1 = min(S, i0 + C)
        qc = qf[:, i0:i1]
        a, mask = causal_scores(qc, kf, scale, i0, i1)
        p = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=-1)
        x = torch.cat([torch.ones_like(qc[:, :, None, :1]).expand(-1, -1, i1, 1),
                       kf[:, None, :i1, :] - qc[:, :, None, :]], dim=-1)  # (N, C, J, D+1)
        px = p[..., None] * x
        G = px.transpose(-1, -2) @ x + lf[:, i0:i1, None, None] * reg
        R = px.transpose(-1, -2) @ vf[:, None, :i1, :]  # (N, C, D+1, Dv)
        beta, info = torch.linalg.solve_ex(G, R)
        o = beta[..., 0, :]
        o = torch.where((info != 0)[..., None], torch.full_like(o, float("nan")), o)
        outs.append(o)
    return torch.cat(outs, 1).reshape(*lead, S, Dv)


def softmax_attention(q, k, v, *, qk_scale=None):
    """Causal softmax attention in float64: the lambda -> infinity limit of LLA."""
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    q64, k64, v64 = q.to(_F64), k.to(_F64), v.to(_F64)
    S = q.shape[-2]
    a = scale * (q64 @ k64.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=-1)
    return p @ v64


def _spd_cond(A: torch.Tensor) -> torch.Tensor:
    """cond_2 of symmetric positive definite (..., n, n) float64 matrices from their extreme
    eigenvalues (extremes.py: on CUDA never above the exact value, within 2.2% below),
    instead of torch.linalg.cond's SVD, one cuSOLVER call per matrix on CUDA past 32 x 32.
    A row whose smallest eigenvalue does not come out positive takes linalg.cond."""
    ext = extreme_eigenvalues(0.5 * (A + A.transpose(-1, -2)))
    pos = ext.lo > 0
    kappa = ext.hi / torch.where(pos, ext.lo, torch.ones_like(ext.lo))
    if not bool(pos.all()):
        kappa = kappa.masked_scatter(~pos, torch.linalg.cond(A[~pos]))
    return kappa


def mesanet_attention(q, k, v, *, ridge_lambda, return_rounding=False):
    """LLA at scale 0, and its scale -> 0 limit (docs/math.md §4.2), float64.

    Linear attention on augmented keys k' = [k; 1] and queries q' = [q; 1] with a
    ridge lambda_i (i+1) on the key block only:
        o_i = B_i y_i,  A_i y_i = q'_i,  B_i = sum_j v_j k'_j^T,
        A_i = sum_j k'_j k'_j^T + diag(lambda_i (i+1) I_D, 0).
    A formula of its own (no scores, no rho, no Schur complement), so it checks LLA at
    qk_scale = 0, where the two are equal exactly, independently of the oracle.
    Memory is Theta(S D^2) (prefix sums of k' k'^T); meant for tests and small S.

    return_rounding=True also returns, per query, the first-order estimate of this
    float64 computation's own error (no safety factor):
        u64 (sqrt(i+1) + D + 1) (kappa_2(A_i) + 1) ||B_i||_2 ||y_i||
    A_i and B_i are sums of i+1 terms (probabilistic rounding, sqrt(i+1) u64 relative),
    the solve is backward stable (about (D+1) u64), and kappa_2(A_i) carries both into
    y_i; the +1 is the rounding of B_i and of the product B_i y_i.
    """
    check_qkv(q, k, v)
    lead = tuple(q.shape[:-2])
    S, D = q.shape[-2], q.shape[-1]
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device)
    one = torch.ones(*q.shape[:-1], 1, dtype=_F64, device=q.device)
    qa = torch.cat([q.to(_F64), one], -1)
    ka = torch.cat([k.to(_F64), one], -1)
    A = torch.cumsum(ka[..., :, None] * ka[..., None, :], dim=-3)  # (..., S, D+1, D+1)
    Bm = torch.cumsum(v.to(_F64)[..., :, None] * ka[..., None, :], dim=-3)  # (..., S, Dv, D+1)
    count = torch.arange(1, S + 1, dtype=_F64, device=q.device)
    reg = torch.diag(torch.cat([torch.ones(D, dtype=_F64), torch.zeros(1, dtype=_F64)])).to(q.device)
    A = A + (lam * count)[..., None, None] * reg
    y, info = torch.linalg.solve_ex(A, qa[..., None])  # (..., S, D+1, 1)
    # At lambda = 0 the first D queries sum fewer than D + 1 rank-one terms: singular in
    # exact arithmetic. LU need not find the zero pivot (whether it rounds to 0 depends on
    # the CPU's kernels), so that case is decided by counting, the rest by LU.
    short = ((lam == 0) & (count < D + 1)).expand(info.shape)
    if bool((short | (info != 0)).any()):
        first = int(torch.nonzero((short | (info != 0)).reshape(-1, S))[0, 1])
        raise LLAInputError(
            f"ridge_lambda: the augmented Gram matrix of query {first} is singular (lambda = 0 there, and "
            f"fewer than D + 1 = {D + 1} independent augmented keys); mesanet_attention needs ridge_lambda > 0 "
            "for such queries")
    o = (Bm @ y)[..., 0].reshape(*lead, S, v.shape[-1])
    if not return_rounding:
        return o
    steps = (count.sqrt() + (D + 1)) * (_spd_cond(A) + 1.0)
    rounding = _U64 * steps * spectral_norm(Bm) * y[..., 0].norm(dim=-1)
    return o, rounding.reshape(*lead, S)
