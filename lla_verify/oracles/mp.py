"""High-precision oracles for Local Linear Attention: mpmath, and certified intervals.

The float64 oracles (``float64.py``) lose digits in proportion to kappa(Sigma_i) and
omega_i / delta_i; past kappa ~ 1e16 they have none left. The functions here say
what the exact operator of SPEC 1 returns on such inputs, for small problems:

* ``lla_forward_mp`` / ``lla_forward_details_mp``: SPEC 1 evaluated term by term in
  mpmath at ``dps`` decimal digits (precision scoped with ``mpmath.workdps``).
* ``lla_grad_mp`` / ``lla_jvp_mp``: derivatives by central differences in mpmath
  (step 1e-20 at 60 digits: truncation and rounding both ~1e-40).
* ``lla_forward_interval``: an enclosure [lo, hi] of every output, guaranteed to
  contain the exact value, by interval arithmetic (``mpmath.iv``).
* ``mp_self_check``: the mp oracle at two precisions, digits of agreement per output.

Conventions shared with the float64 oracle, so the two compare directly:

* Inputs of any float dtype are taken as the float64 values they hold; every such
  value is an exact mpf. The default bandwidth is the float64 number 1/sqrt(D)
  that ``lla_contract.check_scale`` returns, also taken exactly.
* z_ij = k_j - q_i is formed exactly (``fsub(exact=True)``), so a common offset of q
  and k cancels before any rounding.
* o_i is normalised by sum_j w_ij (1 - <z_ij, rho_i>) (delta_i in exact arithmetic),
  with delta_eps added as eps * sign, as the float64 oracle does.
* A query with lambda_i == 0 whose augmented normal matrix G_i = [[omega, mu^T],
  [mu, Sigma]] is singular (delta_i = 0 or Sigma_i singular: early tokens i < D, keys
  in a low-dimensional affine subspace) has no value: NaN, and ``undefined`` marks it.
  The float64 oracle decides this at a condition number of ~1e13 of the Jacobi-scaled
  G_i; here the cut is 10^(dps/2), which a singular G_i (computed smallest eigenvalue
  ~10^-dps) never passes and a nonsingular one passes unless it is already beyond
  what ``dps`` digits can resolve.

Everything runs in pure Python: the functions refuse problems whose operation count
would take more than a few seconds, unless called with ``force=True``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import mpmath
import numpy as np
import torch

from lla_contract import LLAInputError, check_delta_eps, check_lambda, check_qkv, check_scale

_F64 = torch.float64

# Multiply-adds N * S(S+1)/2 * D (D + Dv) that the mp oracle accepts without force:
# at 50 digits mpmath does ~1e6 of them per second on one core (S = 64, D = 8: 0.3 s).
MP_WORK_LIMIT = 4_000_000
# The interval oracle does ~2e5 of them per second: this allows S = 32, D = 8 (~0.5 s),
# well past the tiny sizes (S, D <= 8) it is meant for.
INTERVAL_WORK_LIMIT = 100_000
# Finite differences evaluate each row ~2 (S D + S Dv + S) times.
GRAD_MAX_S, GRAD_MAX_D = 8, 4
MIN_DPS = 20  # below ~16 digits a float64 input would not even be held exactly


# --------------------------------------------------------------------------- results


@dataclass
class LLADetailsMP:
    """Per-query quantities of the mp oracle as float64 tensors, leading shape (..., S).

    ``mp`` (when asked for) holds the same quantities as numpy object arrays of mpf
    with the same shapes (``kappa`` as mpf, ``undefined`` as bool).
    """

    o: torch.Tensor  # (..., S, Dv)
    m: torch.Tensor  # (..., S) row max of the scores
    omega: torch.Tensor  # (..., S)
    mu: torch.Tensor  # (..., S, D)
    rho: torch.Tensor  # (..., S, D)      NaN where undefined
    delta: torch.Tensor  # (..., S)        omega - <mu, rho> (SPEC 1), NaN where undefined
    kappa: torch.Tensor  # (..., S)        cond_2(Sigma_i) from mp eigenvalues, inf if singular
    lam: torch.Tensor  # (..., S)
    undefined: torch.Tensor  # (..., S) bool
    scale: float = 0.0
    dps: int = 0
    mp: dict | None = None


@dataclass
class MPGrad:
    """Gradients of L = sum <cotangent, o> by central differences at high precision."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dlambda: torch.Tensor  # (..., S): d L / d lambda_i per query (lambda as broadcast)
    dps: int = 0
    step: float = 0.0


@dataclass
class IntervalResult:
    """Certified enclosures: lo <= exact o <= hi elementwise (float64, rounded outward).

    Rows listed in ``unbounded`` have lo = -inf and hi = +inf: their delta_i (or
    Sigma_i) enclosure contains 0 at this precision, which is always the case for an
    exactly undefined row (lambda = 0, i < D). ``notes`` says why, row by row.
    """

    lo: torch.Tensor  # (..., S, Dv)
    hi: torch.Tensor  # (..., S, Dv)
    delta_lo: torch.Tensor  # (..., S) enclosure of sum_j w_ij (1 - <z_ij, rho_i>)
    delta_hi: torch.Tensor
    unbounded: torch.Tensor  # (..., S) bool
    prec: int = 0
    notes: list[str] = field(default_factory=list)
    iv: np.ndarray | None = None  # (..., S, Dv) object array of mpmath.iv.mpf

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_F64)
        return (self.lo <= x) & (x <= self.hi)


@dataclass
class SelfCheck:
    """The mp oracle at two precisions: decimal digits of agreement per output.

    ``digits``: -log10(|o_lo - o_hi| / max_e |o_hi[..., i, e]|), capped at the lower
    dps (inf never appears). ``claimed``: the digits the lower-precision run claims for
    row i, dps_lo - log10(kappa_i * omega_i / |delta_i|) - log10(S * D) - 2, the usual
    first-order loss of a solve and a cancellation, with a margin. Undefined rows are
    NaN in both.
    """

    digits: torch.Tensor  # (..., S, Dv)
    claimed: torch.Tensor  # (..., S)
    dps_pair: tuple[int, int] = (0, 0)

    def ok(self) -> torch.Tensor:
        """(..., S) bool: every digit claimed is there (undefined rows count as ok)."""
        good = (self.digits >= self.claimed[..., None]).all(-1)
        return good | torch.isnan(self.claimed)


# --------------------------------------------------------------------------- helpers


@dataclass
class _Problem:
    Q: list  # [N][S][D] python floats
    K: list
    V: list
    lam: list  # [N][S]
    lam_t: torch.Tensor  # (..., S) float64, as broadcast
    scale: float
    eps: float
    lead: tuple
    S: int
    D: int
    Dv: int

    @property
    def N(self) -> int:
        return len(self.Q)

    def work(self) -> int:
        return self.N * self.S * (self.S + 1) // 2 * self.D * (self.D + self.Dv)


def _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps) -> _Problem:
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    eps = check_delta_eps(delta_eps)
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device).detach().to(_F64)
    S, D, Dv = q.shape[-2], q.shape[-1], v.shape[-1]

    def rows(t):
        return t.detach().to(device="cpu", dtype=_F64).reshape(-1, S, t.shape[-1]).tolist()

    return _Problem(
        Q=rows(q), K=rows(k), V=rows(v), lam=lam.cpu().reshape(-1, S).tolist(), lam_t=lam.cpu(),
        scale=scale, eps=eps, lead=tuple(q.shape[:-2]), S=S, D=D, Dv=Dv,
    )


def _check_dps(dps, name="dps") -> int:
    if isinstance(dps, bool) or not isinstance(dps, int) or dps < MIN_DPS:
        raise LLAInputError(f"{name}: expected an int >= {MIN_DPS} (decimal digits), got {dps!r}")
    return dps


def _check_work(p: _Problem, limit: int, force: bool, who: str) -> None:
    if force:
        return
    w = p.work()
    if w > limit:
        raise LLAInputError(
            f"{who}: problem too large for pure-Python high precision: N*S(S+1)/2*D*(D+Dv) = {w:,} "
            f"multiply-adds (N={p.N}, S={p.S}, D={p.D}, Dv={p.Dv}) exceeds {limit:,}; "
            "use a smaller problem or pass force=True"
        )


def _to_mp(p: _Problem):
    """Inputs as mpf (exact: the current precision holds any float64)."""
    mpf = mpmath.mpf
    Q = [[[mpf(x) for x in row] for row in seq] for seq in p.Q]
    K = [[[mpf(x) for x in row] for row in seq] for seq in p.K]
    V = [[[mpf(x) for x in row] for row in seq] for seq in p.V]
    lam = [[mpf(x) for x in seq] for seq in p.lam]
    return Q, K, V, lam


def _objarray(nested, shape) -> np.ndarray:
    # np.array(nested) would try to coerce mpf scalars; fill a flat object array instead
    vals = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        else:
            vals.append(x)

    walk(nested)
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out.reshape(shape)


def _f64(obj: np.ndarray) -> torch.Tensor:
    return torch.tensor([float(x) for x in obj.reshape(-1)], dtype=_F64).reshape(obj.shape)


@dataclass
class _Row:
    o: list
    m: object
    omega: object
    mu: list
    rho: list | None
    delta: object
    kappa: object
    undefined: bool


def _singular_G(omega, mu, Sig, D, cut) -> bool:
    """G_i = [[omega, mu^T], [mu, Sigma]] singular at the precision in force.

    Jacobi scaling first, so that the test is about the geometry of the keys and not
    about their units; a zero diagonal (all z_ij zero along one axis) is singular.
    """
    G = mpmath.matrix(D + 1, D + 1)
    G[0, 0] = omega
    for d in range(D):
        G[0, d + 1] = G[d + 1, 0] = mu[d]
        for e in range(D):
            G[d + 1, e + 1] = Sig[d, e]
    diag = [G[r, r] for r in range(D + 1)]
    if min(diag) <= 0:
        return True
    sc = [1 / mpmath.sqrt(x) for x in diag]
    for r in range(D + 1):
        for c in range(D + 1):
            G[r, c] *= sc[r] * sc[c]
    ev = mpmath.eigsy(G, eigvals_only=True)
    ev = [ev[r] for r in range(D + 1)]
    return min(ev) <= cut * max(ev)


def _sigma(ctx, wz, z, ridge):
    """Sigma_i = sum_j w_ij z_ij z_ij^T + ridge I in the context ``ctx`` (mpmath.mp, or
    mpmath.iv for enclosures), from wz_j = w_ij z_ij and z_j, each a list of D entries."""
    n, D = len(z), len(z[0])
    Sig = ctx.matrix(D, D)
    for d in range(D):
        for e in range(d, D):
            val = ctx.fdot([wz[j][d] for j in range(n)], [z[j][e] for j in range(n)])
            Sig[d, e] = Sig[e, d] = val + ridge if d == e else val
    return Sig


def _row_mp(qi, K, V, i, lam, s, eps, *, cut, want_kappa) -> _Row:
    """Query i of one sequence, SPEC 1 term by term at the mp precision in force."""
    mp = mpmath.mp
    n, D, Dv = i + 1, len(qi), len(V[0])
    a = [s * mp.fdot(qi, K[j]) for j in range(n)]
    m = max(a)
    w = [mp.exp(x - m) for x in a]
    omega = mp.fsum(w)
    z = [[mp.fsub(K[j][d], qi[d], exact=True) for d in range(D)] for j in range(n)]
    wz = [[w[j] * z[j][d] for d in range(D)] for j in range(n)]
    mu = [mp.fsum(wz[j][d] for j in range(n)) for d in range(D)]
    ridge = lam * omega
    Sig = _sigma(mp, wz, z, ridge)

    kappa = None
    if want_kappa:
        ev = mpmath.eigsy(Sig, eigvals_only=True)
        lo, hi = min(ev[r] for r in range(D)), max(ev[r] for r in range(D))
        kappa = hi / lo if lo > 0 else mpmath.inf

    if lam == 0 and _singular_G(omega, mu, Sig, D, cut):
        nan = mpmath.nan
        return _Row([nan] * Dv, m, omega, mu, None, nan, kappa, True)

    rhs = mpmath.matrix(mu)
    try:
        rho = mpmath.cholesky_solve(Sig, rhs)
    except ValueError:
        # Sigma_i is SPD in exact arithmetic; cholesky refuses when rounding at this
        # precision makes a pivot non-positive (kappa near 10^dps). LU still answers.
        try:
            rho = mpmath.lu_solve(Sig, rhs)
        except ZeroDivisionError:
            raise ArithmeticError(
                f"Sigma_i is numerically singular at dps={mp.dps} for query i={i} "
                f"(lambda_i={mpmath.nstr(lam, 5)}); raise dps"
            ) from None
    rho = [rho[d] for d in range(D)]
    wf = [w[j] * (1 - mp.fdot(z[j], rho)) for j in range(n)]
    den = mp.fsum(wf)
    if eps > 0:
        den += eps * mpmath.sign(den)
    o = [mp.fdot(wf, [V[j][e] for j in range(n)]) / den for e in range(Dv)]
    delta = omega - mp.fdot(mu, rho)
    return _Row(o, m, omega, mu, rho, delta, kappa, False)


def _run_mp(p: _Problem, dps: int, *, want_kappa: bool):
    """All rows of all sequences at ``dps`` digits; returns [N][S] of _Row."""
    with mpmath.workdps(dps):
        Q, K, V, lam = _to_mp(p)
        s = mpmath.mpf(p.scale)
        cut = mpmath.mpf(10) ** (-(dps // 2))
        return [
            [_row_mp(Q[n][i], K[n], V[n], i, lam[n][i], s, p.eps, cut=cut, want_kappa=want_kappa)
             for i in range(p.S)]
            for n in range(p.N)
        ]


# --------------------------------------------------------------------------- forward


def lla_forward_mp(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, dps=50, return_mp=False,
                   force=False):
    """Causal LLA evaluated in mpmath at ``dps`` digits; float64 of shape (..., S, Dv).

    q, k: (..., S, D); v: (..., S, Dv); any float dtype (taken exactly). ridge_lambda:
    float >= 0 or tensor broadcastable to (..., S). Sigma_i rho_i = mu_i is solved by
    ``mpmath.cholesky_solve`` (LU where rounding defeats Cholesky). Undefined rows
    (see the module docstring) are NaN. With ``return_mp=True`` returns
    ``(o, o_mp)``, o_mp a numpy object array of mpf of the same shape, rounded to dps.
    """
    dps = _check_dps(dps)
    p = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    _check_work(p, MP_WORK_LIMIT, force, "lla_forward_mp")
    rows = _run_mp(p, dps, want_kappa=False)
    o_mp = _objarray([[r.o for r in seq] for seq in rows], p.lead + (p.S, p.Dv))
    o = _f64(o_mp)
    return (o, o_mp) if return_mp else o


def lla_forward_details_mp(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, dps=50, return_mp=False,
                           force=False) -> LLADetailsMP:
    """``lla_forward_mp`` plus m, omega, mu, rho, delta, kappa(Sigma_i) per query.

    kappa comes from the eigenvalues of Sigma_i by ``mpmath.eigsy`` at ``dps`` digits
    (meaningful up to ~10^dps). Set ``return_mp`` to keep the mpf values in ``.mp``.
    """
    dps = _check_dps(dps)
    p = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    _check_work(p, MP_WORK_LIMIT, force, "lla_forward_details_mp")
    rows = _run_mp(p, dps, want_kappa=True)
    L, S, D, Dv = p.lead, p.S, p.D, p.Dv
    nan = mpmath.nan
    mpd = {
        "o": _objarray([[r.o for r in seq] for seq in rows], L + (S, Dv)),
        "m": _objarray([[r.m for r in seq] for seq in rows], L + (S,)),
        "omega": _objarray([[r.omega for r in seq] for seq in rows], L + (S,)),
        "mu": _objarray([[r.mu for r in seq] for seq in rows], L + (S, D)),
        "rho": _objarray([[r.rho if r.rho is not None else [nan] * D for r in seq] for seq in rows], L + (S, D)),
        "delta": _objarray([[r.delta for r in seq] for seq in rows], L + (S,)),
        "kappa": _objarray([[r.kappa for r in seq] for seq in rows], L + (S,)),
    }
    undefined = torch.tensor([[r.undefined for r in seq] for seq in rows], dtype=torch.bool).reshape(L + (S,))
    t = {key: _f64(val) for key, val in mpd.items()}
    return LLADetailsMP(
        o=t["o"], m=t["m"], omega=t["omega"], mu=t["mu"], rho=t["rho"], delta=t["delta"], kappa=t["kappa"],
        lam=p.lam_t, undefined=undefined, scale=p.scale, dps=dps, mp=mpd if return_mp else None,
    )


# --------------------------------------------------------------------------- derivatives


def _check_step(step, dps) -> float:
    try:
        h = float(step)
    except (TypeError, ValueError):
        raise LLAInputError(f"step: expected a positive float, got {step!r}") from None
    if not math.isfinite(h) or h <= 0:
        raise LLAInputError(f"step: expected a finite value > 0, got {h}")
    # central differences lose ~ -log10(h) digits to cancellation; keep some
    if h < 10.0 ** (-(dps - 10)):
        raise LLAInputError(f"step: {h:g} leaves fewer than 10 of the {dps} digits after cancellation; "
                            "raise dps or the step")
    return h


def _check_grad_size(p: _Problem, force: bool, who: str) -> None:
    if force:
        return
    if p.S > GRAD_MAX_S or p.D > GRAD_MAX_D or p.Dv > GRAD_MAX_D or p.N > 4:
        raise LLAInputError(
            f"{who}: finite differences in mpmath are for tiny problems (S <= {GRAD_MAX_S}, D, Dv <= {GRAD_MAX_D}, "
            f"at most 4 sequences), got N={p.N}, S={p.S}, D={p.D}, Dv={p.Dv}; pass force=True to run anyway"
        )


def _like(t, shape, name) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise LLAInputError(f"{name}: expected a torch.Tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise LLAInputError(f"{name}: expected a floating dtype, got {t.dtype}")
    try:
        t = torch.broadcast_to(t.detach(), tuple(shape))
    except RuntimeError:
        raise LLAInputError(f"{name}: shape {tuple(t.shape)} does not broadcast to {tuple(shape)}") from None
    if not bool(torch.isfinite(t).all()):
        raise LLAInputError(f"{name}: expected finite values")
    return t.to(device="cpu", dtype=_F64)


def lla_grad_mp(q, k, v, *, ridge_lambda, qk_scale=None, cotangent, delta_eps=0.0, dps=60, step=1e-20,
                force=False) -> MPGrad:
    """dL/dq, dL/dk, dL/dv, dL/dlambda_i of L = sum <cotangent, o>, by central differences in mp.

    Each input scalar x is moved to x +- step (exact at 60 digits for float64 x of
    modest size), only the rows that depend on it are re-evaluated (query i: row i;
    key or value j: rows i >= j), and (L+ - L-) / (2 step) is taken at ``dps`` digits.
    Error: truncation ~ step^2 |L'''| and cancellation ~ 10^-dps |L| / step, both ~1e-40
    at the defaults. Where lambda_i < 2 step the lambda difference is one-sided
    (second order, (-3 L0 + 4 L1 - L2) / (2 step)), since lambda < 0 is not defined.
    dlambda is per query (shape (..., S)) whatever shape ridge_lambda had.
    """
    dps = _check_dps(dps)
    h = _check_step(step, dps)
    p = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    _check_grad_size(p, force, "lla_grad_mp")
    cot = _like(cotangent, p.lead + (p.S, p.Dv), "cotangent").reshape(-1, p.S, p.Dv).tolist()
    S, D, Dv = p.S, p.D, p.Dv
    with mpmath.workdps(dps):
        Q, K, V, lam = _to_mp(p)
        s = mpmath.mpf(p.scale)
        cut = mpmath.mpf(10) ** (-(dps // 2))
        hm = mpmath.mpf(h)
        C = [[[mpmath.mpf(x) for x in row] for row in seq] for seq in cot]
        dq = [[[None] * D for _ in range(S)] for _ in range(p.N)]
        dk = [[[None] * D for _ in range(S)] for _ in range(p.N)]
        dv = [[[None] * Dv for _ in range(S)] for _ in range(p.N)]
        dl = [[None] * S for _ in range(p.N)]
        for n in range(p.N):
            Qn, Kn, Vn, ln, Cn = Q[n], K[n], V[n], lam[n], C[n]

            def loss(rows):
                tot = mpmath.mpf(0)
                for i in rows:
                    r = _row_mp(Qn[i], Kn, Vn, i, ln[i], s, p.eps, cut=cut, want_kappa=False)
                    tot += mpmath.fdot(Cn[i], r.o)
                return tot

            def central(container, idx, rows):
                x0 = container[idx]
                container[idx] = x0 + hm
                up = loss(rows)
                container[idx] = x0 - hm
                down = loss(rows)
                container[idx] = x0
                return (up - down) / (2 * hm)

            for i in range(S):
                for d in range(D):
                    dq[n][i][d] = central(Qn[i], d, [i])
            for j in range(S):
                later = range(j, S)
                for d in range(D):
                    dk[n][j][d] = central(Kn[j], d, later)
                for e in range(Dv):
                    dv[n][j][e] = central(Vn[j], e, later)
            for i in range(S):
                if ln[i] >= 2 * hm:
                    dl[n][i] = central(ln, i, [i])
                else:
                    x0 = ln[i]
                    vals = []
                    for t in range(3):
                        ln[i] = x0 + t * hm
                        vals.append(loss([i]))
                    ln[i] = x0
                    dl[n][i] = (-3 * vals[0] + 4 * vals[1] - vals[2]) / (2 * hm)
        L = p.lead

        def t(nested, tail):
            return torch.tensor([[[float(x) for x in row] for row in seq] for seq in nested],
                                dtype=_F64).reshape(L + (S,) + tail)

        return MPGrad(
            dq=t(dq, (D,)), dk=t(dk, (D,)), dv=t(dv, (Dv,)),
            dlambda=torch.tensor([[float(x) for x in seq] for seq in dl], dtype=_F64).reshape(L + (S,)),
            dps=dps, step=h,
        )


def lla_jvp_mp(q, k, v, *, ridge_lambda, qk_scale=None, tangents, delta_eps=0.0, dps=60, step=1e-20,
               force=False) -> torch.Tensor:
    """Directional derivative d/dt o(q + t tq, k + t tk, v + t tv, lambda + t tlam) at t = 0.

    tangents: (tq, tk, tv, tlam), each a tensor broadcastable to its input's shape
    ((..., S) for tlam) or None for zero. Two mp forwards (central difference); if
    some lambda_i - step |tlam_i| < 0 the one-sided second-order formula is used for
    every row. Returns float64 (..., S, Dv). Cheaper than ``lla_grad_mp``: one
    direction instead of every input.
    """
    dps = _check_dps(dps)
    h = _check_step(step, dps)
    p = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    _check_work(p, MP_WORK_LIMIT // 4, force, "lla_jvp_mp")
    if not isinstance(tangents, (tuple, list)) or len(tangents) != 4:
        raise LLAInputError("tangents: expected a tuple (tq, tk, tv, tlam), each a tensor or None")
    S, D, Dv = p.S, p.D, p.Dv
    shapes = (p.lead + (S, D), p.lead + (S, D), p.lead + (S, Dv), p.lead + (S,))
    names = ("tangents[0] (tq)", "tangents[1] (tk)", "tangents[2] (tv)", "tangents[3] (tlam)")
    tans = [torch.zeros(sh, dtype=_F64) if t is None else _like(t, sh, nm) for t, sh, nm in zip(tangents, shapes, names)]
    tq, tk, tv = (t.reshape(-1, S, t.shape[-1]).tolist() for t in tans[:3])
    tl = tans[3].reshape(-1, S).tolist()
    with mpmath.workdps(dps):
        Q, K, V, lam = _to_mp(p)
        s = mpmath.mpf(p.scale)
        cut = mpmath.mpf(10) ** (-(dps // 2))
        hm = mpmath.mpf(h)
        one_sided = any(lam[n][i] - hm * abs(tl[n][i]) < 0 for n in range(p.N) for i in range(S))

        def moved(X, T, t):
            return [[[X[n][i][d] + t * T[n][i][d] for d in range(len(X[n][i]))] for i in range(S)] for n in range(p.N)]

        def forward(t):
            Qt, Kt, Vt = moved(Q, tq, t), moved(K, tk, t), moved(V, tv, t)
            lt = [[lam[n][i] + t * tl[n][i] for i in range(S)] for n in range(p.N)]
            return [[_row_mp(Qt[n][i], Kt[n], Vt[n], i, lt[n][i], s, p.eps, cut=cut, want_kappa=False).o
                     for i in range(S)] for n in range(p.N)]

        if one_sided:
            f0, f1, f2 = forward(0), forward(hm), forward(2 * hm)
            res = [[[(-3 * f0[n][i][e] + 4 * f1[n][i][e] - f2[n][i][e]) / (2 * hm) for e in range(Dv)]
                    for i in range(S)] for n in range(p.N)]
        else:
            fu, fd = forward(hm), forward(-hm)
            res = [[[(fu[n][i][e] - fd[n][i][e]) / (2 * hm) for e in range(Dv)] for i in range(S)]
                   for n in range(p.N)]
        return torch.tensor([[[float(x) for x in row] for row in seq] for seq in res],
                            dtype=_F64).reshape(p.lead + (S, Dv))


# --------------------------------------------------------------------------- self-check


def mp_self_check(q, k, v, *, ridge_lambda, qk_scale=None, delta_eps=0.0, dps_pair=(30, 60),
                  force=False) -> SelfCheck:
    """Run the mp oracle at two precisions and count the digits on which they agree.

    Cheap evidence, for sizes where intervals are too slow, that the lower-precision
    result holds the digits it claims (see ``SelfCheck``): if it did not, the
    higher-precision run (whose error is 10^(dps_hi - dps_lo) times smaller) would
    disagree with it there.
    """
    if not isinstance(dps_pair, (tuple, list)) or len(dps_pair) != 2:
        raise LLAInputError(f"dps_pair: expected (dps_lo, dps_hi), got {dps_pair!r}")
    lo_dps, hi_dps = (_check_dps(d, "dps_pair") for d in dps_pair)
    if hi_dps <= lo_dps:
        raise LLAInputError(f"dps_pair: expected dps_lo < dps_hi, got {dps_pair!r}")
    p = _prepare(q, k, v, ridge_lambda, qk_scale, delta_eps)
    _check_work(p, MP_WORK_LIMIT // 2, force, "mp_self_check")
    lo_rows = _run_mp(p, lo_dps, want_kappa=True)
    hi_rows = _run_mp(p, hi_dps, want_kappa=False)
    S, D, Dv = p.S, p.D, p.Dv
    digits = [[[math.nan] * Dv for _ in range(S)] for _ in range(p.N)]
    claimed = [[math.nan] * S for _ in range(p.N)]
    with mpmath.workdps(hi_dps):
        for n in range(p.N):
            for i in range(S):
                a, b = lo_rows[n][i], hi_rows[n][i]
                if a.undefined or b.undefined:
                    continue
                scale = max(abs(x) for x in b.o)
                for e in range(Dv):
                    err = abs(a.o[e] - b.o[e])
                    digits[n][i][e] = float(lo_dps) if err == 0 or scale == 0 else \
                        min(float(lo_dps), float(-mpmath.log10(err / scale)))
                loss = mpmath.log10(max(a.kappa, 1)) + mpmath.log10(max(a.omega / abs(a.delta), 1))
                claimed[n][i] = float(lo_dps - loss - math.log10(S * D) - 2)
    return SelfCheck(
        digits=torch.tensor(digits, dtype=_F64).reshape(p.lead + (S, Dv)),
        claimed=torch.tensor(claimed, dtype=_F64).reshape(p.lead + (S,)),
        dps_pair=(lo_dps, hi_dps),
    )


# --------------------------------------------------------------------------- intervals


@contextlib.contextmanager
def _iv_prec(prec: int):
    # mpmath.iv has no workprec; restore its precision by hand, exceptions included.
    old = mpmath.iv.prec
    mpmath.iv.prec = prec
    try:
        yield
    finally:
        mpmath.iv.prec = old


def _endpoints_outward(x) -> tuple[float, float]:
    """Float64 [lo, hi] containing the interval x (rounded outward, exactly)."""
    a, b = (mpmath.mp.make_mpf(r) for r in x._mpi_)
    lo, hi = float(a), float(b)
    if lo > a:  # mpf vs float comparisons are exact
        lo = math.nextafter(lo, -math.inf)
    if hi < b:
        hi = math.nextafter(hi, math.inf)
    return lo, hi


def _row_iv(qi, K, V, i, lam, s):
    """Enclosures (o_i list, den) for query i, or (None, reason) when unbounded."""
    iv = mpmath.iv
    n, D, Dv = i + 1, len(qi), len(V[0])
    a = [s * iv.fdot(qi, K[j]) for j in range(n)]
    # Any real shift is exact (SPEC 3); a point shift keeps the weights narrow.
    m = max(iv.mpf(x.b) for x in a)
    w = [iv.exp(x - m) for x in a]
    omega = iv.fsum(w)
    z = [[K[j][d] - qi[d] for d in range(D)] for j in range(n)]
    wz = [[w[j] * z[j][d] for d in range(D)] for j in range(n)]
    mu = iv.matrix([iv.fsum(wz[j][d] for j in range(n)) for d in range(D)])
    ridge = lam * omega
    Sig = _sigma(iv, wz, z, ridge)
    try:
        rho = iv.lu_solve(Sig, mu)
    except (ZeroDivisionError, TypeError):
        # ZeroDivisionError: a pivot enclosure contains 0. TypeError: mpmath's pivot
        # search found no candidate excluding 0 and left the pivot index None. Both
        # mean the enclosure of Sigma_i contains a singular matrix.
        return None, "Sigma_i enclosure contains a singular matrix"
    rho = [rho[d] for d in range(D)]
    wf = [w[j] * (1 - iv.fdot(z[j], rho)) for j in range(n)]
    den = iv.fsum(wf)
    if 0 in den:
        return None, f"delta_i enclosure {den} contains 0"
    return [iv.fdot(wf, [V[j][e] for j in range(n)]) / den for e in range(Dv)], den


def lla_forward_interval(q, k, v, *, ridge_lambda, qk_scale=None, prec=200, return_iv=False,
                         force=False) -> IntervalResult:
    """Certified enclosures of causal LLA for tiny problems (S, D up to ~8).

    Method: every quantity of SPEC 1 is evaluated in ``mpmath.iv`` interval arithmetic
    (outward rounding, ``prec`` bits) from point intervals of the exact float64
    inputs and scale: the scores, exp (mpmath's iv.exp is rigorous), omega, mu and
    Sigma_i = sum_j w z z^T + lambda omega I. The solve Sigma_i rho_i = mu_i is
    ``iv.lu_solve``: Gaussian elimination in interval arithmetic, whose result
    contains the solution for every matrix in the enclosure of Sigma_i, hence the
    exact one; it refuses (here: the row is unbounded) when a pivot's enclosure
    contains 0. Then den = sum_j w_ij (1 - <z_ij, rho_i>) (= delta_i exactly) and
    o_i = sum_j w_ij (1 - <z_ij, rho_i>) v_j / den in intervals; if the enclosure of
    den contains 0 the row is unbounded. Each rule of interval arithmetic maps
    enclosures to enclosures, so the result contains the exact o_i; the endpoints are
    rounded outward to float64.

    Widths grow with kappa(Sigma_i) and omega/delta_i, times 2^-prec: at prec 200 on
    a well-conditioned problem they are ~1e-55 relative. delta_eps is not supported
    (it is 0 here, as in the oracles' default).
    """
    if isinstance(prec, bool) or not isinstance(prec, int) or prec < 60:
        raise LLAInputError(f"prec: expected an int >= 60 (bits), got {prec!r}")
    p = _prepare(q, k, v, ridge_lambda, qk_scale, 0.0)
    _check_work(p, INTERVAL_WORK_LIMIT, force, "lla_forward_interval")
    S, Dv = p.S, p.Dv
    inf = math.inf
    lo = [[[-inf] * Dv for _ in range(S)] for _ in range(p.N)]
    hi = [[[inf] * Dv for _ in range(S)] for _ in range(p.N)]
    dlo = [[-inf] * S for _ in range(p.N)]
    dhi = [[inf] * S for _ in range(p.N)]
    unb = [[False] * S for _ in range(p.N)]
    notes = []
    keep = [[None] * S for _ in range(p.N)]
    iv = mpmath.iv
    with _iv_prec(prec):
        full = iv.mpf([-inf, inf])
        s = iv.mpf(p.scale)
        for n in range(p.N):
            Qn = [[iv.mpf(x) for x in row] for row in p.Q[n]]
            Kn = [[iv.mpf(x) for x in row] for row in p.K[n]]
            Vn = [[iv.mpf(x) for x in row] for row in p.V[n]]
            for i in range(S):
                o, den = _row_iv(Qn[i], Kn, Vn, i, iv.mpf(p.lam[n][i]), s)
                if o is None:
                    unb[n][i] = True
                    notes.append(f"sequence {n}, query {i}: unbounded ({den})")
                    keep[n][i] = [full] * Dv
                    continue
                keep[n][i] = o
                dlo[n][i], dhi[n][i] = _endpoints_outward(den)
                for e in range(Dv):
                    lo[n][i][e], hi[n][i][e] = _endpoints_outward(o[e])
    L = p.lead + (S,)
    return IntervalResult(
        lo=torch.tensor(lo, dtype=_F64).reshape(L + (Dv,)),
        hi=torch.tensor(hi, dtype=_F64).reshape(L + (Dv,)),
        delta_lo=torch.tensor(dlo, dtype=_F64).reshape(L),
        delta_hi=torch.tensor(dhi, dtype=_F64).reshape(L),
        unbounded=torch.tensor(unb, dtype=torch.bool).reshape(L),
        prec=prec, notes=notes,
        iv=_objarray(keep, L + (Dv,)) if return_iv else None,
    )
