"""Parallax as a registered operator: its probe families, cases and implementations.

A Parallax problem is an LLA problem of any family of cases.py (q, k, v and the scale
come from there; its lambda only feeds the exact LLA probe) with a probe r drawn on top
by a *probe family*. A ``ParallaxCase`` is a ``Case`` plus a probe family and its
parameters, printed as one line and parsed back::

    gaussian:lam=1,scale_mult=1:B=1,H=1,S=16,D=16,dtype=float32,seed=0;probe=random:amp=1

Implementations follow the protocol (``--lla-parallax-impl MODULE:CALLABLE``)::

    fn(q, k, v, r, *, qk_scale) -> o

q, k, r of shape (B, H, S, D), v of shape (B, H, S, Dv) on the suite's device; o of
shape (B, H, S, Dv) in q's dtype. The records are ``Impl`` records (impls.py) with
operator "parallax"; what they accept is read exactly as LLA's are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from lla_contract import LLAInputError
from lla_verify.registry.cases import DTYPES, Case, Param, _fmt, check_params, parse_case, parse_params
from lla_verify.registry.impls import ALL_DTYPES, Impl, load_callable

OPERATOR = "parallax"


class ProbeOutOfRange(LLAInputError):
    """The probe family's r does not fit the case's dtype (strategies reject such draws)."""
PROBE_SEP = ";probe="


# ------------------------------------------------------------------ probe families
@dataclass(frozen=True)
class ProbeFamily:
    name: str
    targets: str
    params: tuple[Param, ...]
    build: Callable  # (params, q, k, v, lam, scale, gen) -> r in float64, q's shape
    # (params, q, k, v, lam, scale, gen) -> (..., S) float64, the row's condition in the
    # float64 derivation: |dr_i| / |r_i| <= cond_i u64 to first order, where another
    # platform's eigensolver rounds differently (None: r moves by its last bits alone)
    cond: Callable | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def easy(self) -> dict:
        return {p.name: p.easy for p in self.params}


def _key_spread(k):
    """Per (batch, head) RMS deviation of the keys from their mean, (..., 1, 1): the unit
    a probe is measured in, so that <k_j - kbar_i, r_i> is O(amp) whatever the family's
    key norm or offset."""
    dev = k - k.mean(-2, keepdim=True)
    spread = dev.pow(2).mean((-2, -1), keepdim=True).sqrt()
    # one key (S = 1) or identical keys have no spread: the keys' own size, then 1e-20,
    # stand in, so that r stays finite in every dtype
    size = k.pow(2).mean((-2, -1), keepdim=True).sqrt()
    return torch.maximum(spread, 1e-3 * size).clamp_min(1e-20)


def _zero(p, q, k, v, lam, scale, gen):
    return torch.zeros_like(q)


def _random(p, q, k, v, lam, scale, gen):
    D = q.shape[-1]
    return p["amp"] * torch.randn(q.shape, generator=gen, dtype=torch.float64) / (math.sqrt(D) * _key_spread(k))


def _lla(p, q, k, v, lam, scale, gen):
    from lla_verify.oracles.parallax import lla_probe

    r = lla_probe(q, k, v, ridge_lambda=lam, qk_scale=scale)
    # rows LLA leaves undefined (lambda = 0 below rank) have no probe: 0 there (softmax)
    return torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def _weighted_key_cov(q, k, scale):
    """Per query the softmax-weighted key covariance sum_j p_ij (k_j - kbar_i)(k_j - kbar_i)^T, (..., S, D, D)."""
    S = q.shape[-2]
    a = scale * (q @ k.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    p = torch.softmax(a.masked_fill(~mask, -math.inf), -1)
    kbar = p @ k
    dev = k[..., None, :, :] - kbar[..., :, None, :]  # (..., S_i, S_j, D)
    return (p[..., None] * dev).transpose(-1, -2) @ dev


def eigenspace_members(ev: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(member, tol): which eigenvalues (``ev`` ascending, as torch.linalg.eigh returns them)
    count as equal to ``ev[..., idx]``, those within tol = 1e-8 |largest|, as a (..., D)
    mask, and tol (...,)."""
    tol = 1e-8 * ev[..., -1].abs().clamp_min(torch.finfo(torch.float64).tiny)
    return (ev - ev[..., idx:idx + 1]).abs() <= tol[..., None], tol


def eigenspace_projection(ev: torch.Tensor, vec: torch.Tensor, idx: int, g: torch.Tensor) -> torch.Tensor:
    """The projection of ``g`` (D,) onto the eigenspace of ``ev[..., idx]`` (eigenspace_members)."""
    member = eigenspace_members(ev, idx)[0].to(vec.dtype)
    return (vec @ (member * (vec.transpose(-1, -2) @ g))[..., None])[..., 0]


def eigenspace_direction(ev: torch.Tensor, vec: torch.Tensor, idx: int, g: torch.Tensor) -> torch.Tensor:
    """The unit vector along the projection of ``g`` (D,) onto the eigenspace of eigenvalue
    ``ev[..., idx]`` (``ev``, ``vec`` as torch.linalg.eigh returns them; eigenvalues within
    1e-8 of the largest count as equal): the same whichever basis of that eigenspace, and
    whichever signs, the eigensolver returns."""
    u = eigenspace_projection(ev, vec, idx, g)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _small_eig(p, q, k, v, lam, scale, gen):
    # r_i along the eigenvector of the smallest eigenvalue of the weighted key covariance,
    # scaled so that its projections <k_j - kbar_i, r_i> have RMS amp: a large probe in
    # the directions where the keys barely vary, the direction LLA's rho amplifies.
    return small_eig_of_cov(p, _weighted_key_cov(q, k, scale), k, gen)


def small_eig_of_cov(p, cov, k, gen):
    """_small_eig's probe from the covariances ``cov`` (..., S, D, D) of keys ``k``: apart,
    so that a test can hand it a perturbed covariance (as another platform's eigensolver
    sees one) and hold the change against _small_eig_cond."""
    D = k.shape[-1]
    ev, vec = torch.linalg.eigh(cov)
    idx = min(int(p["index"]), D - 1)
    lam_i = ev[..., idx]
    # The eigenvector itself is not a function of the keys: its sign is free, and where the
    # eigenvalue is repeated (every early row, whose covariance has rank below D, has a
    # repeated 0) any unit vector of the eigenspace is one, so eigh's choice follows the
    # platform's LAPACK. The projection onto the eigenspace is a function of the keys: u is
    # a fixed vector projected onto it (eigenvalues within 1e-8 of the largest count as
    # equal), sign included.
    u = eigenspace_direction(ev, vec, idx, torch.randn(D, generator=gen, dtype=torch.float64))
    # an eigenvalue below 1e-6 of the keys' squared spread (early rows, duplicate keys)
    # counts as that: |r_i| stays within 1e3 amp / spread, finite in every dtype
    floor = (1e-6 * _key_spread(k).pow(2))[..., 0].expand_as(lam_i)
    sign = torch.where(torch.rand(lam_i.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign[..., None] * p["amp"] * u / torch.maximum(lam_i, floor).sqrt()[..., None]


def _small_eig_cond(p, q, k, v, lam, scale, gen):
    """Per row, |dr_i| / |r_i| per unit u64 of _small_eig's eigensolver, to first order.

    The eigensolver is the step whose rounding follows the platform (its LAPACK: the
    library, and the code path it picks for the processor), and a backward-stable one
    returns the exact eigensystem of C_i + E_i with |E_i| <= D u64 |C_i| (up to a modest
    constant); call that bound e_i u64. Then (Weyl) each eigenvalue moves by at most |E_i|,
    so 1 / sqrt(max(lam_i, floor)) by |E_i| / (2 max(lam_i, floor)) relatively, and
    (Davis-Kahan) the projector P onto the eigenspace by |E_i| / sep_i, sep_i the distance of
    its eigenvalues from the rest (gap_i, the nearest outside, less spread_i, the farthest
    inside), so u = P g / |P g| by 2 |E_i| |g| / (sep_i |P g|). The eigenspace is the
    eigenvalues within tol_i = 1e-8 |C_i| of lam_i (eigenspace_members): a perturbation
    of half the distance to that edge, flip_i = min(gap_i - tol_i, tol_i - spread_i) / 2
    (the second only where other eigenvalues are inside), moves one across it, and u
    anywhere; 2 e_i / flip_i charges that, so that the allowance passes 2 |r_i| by the time
    the noise reaches the edge. Where flip_i <= 0 the condition is inf.

    The covariance before it (products, softmax) is formed by torch's own float64 kernels,
    which this does not bound: where another platform sums those differently, a golden's
    rebuilt probe shows as changed (goldens.regen.probe_drift)."""
    D = q.shape[-1]
    g = torch.randn(D, generator=gen, dtype=torch.float64)  # the draw _small_eig projects
    cov = _weighted_key_cov(q, k, scale)
    ev, vec = torch.linalg.eigh(cov)
    idx = min(int(p["index"]), D - 1)
    lam_i = ev[..., idx]
    top = ev.abs().amax(-1)
    member, tol = eigenspace_members(ev, idx)
    dist = (ev - lam_i[..., None]).abs()
    gap = torch.where(member, math.inf, dist).amin(-1)
    spread = torch.where(member, dist, 0.0).amax(-1)
    others = member.sum(-1) > 1
    flip = 0.5 * torch.minimum(gap - tol, torch.where(others, tol - spread, math.inf))
    sep = gap - spread
    e = D * top
    tiny = torch.finfo(torch.float64).tiny
    lift = g.norm() / eigenspace_projection(ev, vec, idx, g).norm(dim=-1).clamp_min(tiny)
    floor = (1e-6 * _key_spread(k).pow(2))[..., 0].expand_as(lam_i)
    # every eigenvalue inside (gap = inf): P = I, and only the edge can move it
    direction = 2.0 * e * lift / sep.clamp_min(tiny) + 2.0 * e / flip.clamp_min(tiny)
    cond = torch.where(flip > 0, direction, math.inf) + 0.5 * e / torch.maximum(lam_i, floor)
    # a covariance of exact zeros (the first row, identical keys) has no rounding to move it
    return torch.where(e > 0, cond, torch.zeros_like(cond))


PROBES: dict[str, ProbeFamily] = {}


def _register(f: ProbeFamily):
    PROBES[f.name] = f


_register(ProbeFamily("zero", "r = 0: softmax attention exactly", (), _zero))
_register(ProbeFamily("random", "Gaussian probe, <k_j - kbar, r> of RMS about amp",
                      (Param("amp", 1e-3, 10.0, 1.0),), _random))
_register(ProbeFamily("large", "a large Gaussian probe: the covariance term dominates nu_i",
                      (Param("amp", 10.0, 1e4, 100.0),), _random))
_register(ProbeFamily("lla", "the exact LLA probe rho_i / (1 - <mubar_i, rho_i>) at the case's lambda: "
                      "Parallax equals LLA", (), _lla))
_register(ProbeFamily("small_eig", "r_i along the smallest eigenvectors of the weighted key covariance, "
                      "scaled by 1/sqrt(eigenvalue)",
                      (Param("amp", 1e-2, 1e2, 1.0),
                       Param("index", 0, 3, 0, log=False, integer=True,
                             doc="which eigenvector, from the smallest; min(index, D - 1) is used")),
                      _small_eig, _small_eig_cond))

PROBE_ORDER = tuple(PROBES)  # 'zero' first: sampled_from shrinks towards it


def get_probe(name: str) -> ProbeFamily:
    if name not in PROBES:
        raise LLAInputError(f"probe: unknown {name!r}; expected one of {list(PROBES)}")
    return PROBES[name]


# ------------------------------------------------------------------ cases
@dataclass
class ParallaxProblem:
    """Inputs rounded to the case's dtype (what the implementation sees), r included."""

    case: "ParallaxCase"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    r: torch.Tensor
    qk_scale: float

    def describe(self) -> str:
        return self.case.spec()


@dataclass(frozen=True)
class ParallaxCase:
    case: Case
    probe: str = "random"
    probe_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.case, Case):
            raise LLAInputError(f"parallax case: case must be a Case, got {type(self.case).__name__}")
        fam = get_probe(self.probe)
        if not isinstance(self.probe_params, dict):
            raise LLAInputError(f"parallax case: probe_params must be a dict, got {type(self.probe_params).__name__}")
        check_params(self.probe_params, fam, "parallax case", f"probe {self.probe!r}", f"probe {self.probe}")

    def spec(self) -> str:
        ps = ",".join(f"{key}={_fmt(val)}" for key, val in sorted(self.probe_params.items()))
        return f"{self.case.spec()}{PROBE_SEP}{self.probe}" + (f":{ps}" if ps else "")

    def _probe_inputs(self):
        """(family, params, base problem, float64 q, k, v, the probe's generator)."""
        c = self.case
        fam = get_probe(self.probe)
        params = fam.easy()
        params.update({key: float(val) for key, val in self.probe_params.items()})
        base = c.build("cpu")
        # the probe is drawn from the rounded q, k, v (what the implementation sees), with
        # its own stream: the same Case gives the same q, k, v under every probe
        q, k, v = (t.to(torch.float64) for t in (base.q, base.k, base.v))
        gen = torch.Generator().manual_seed((int(c.seed) * 7919 + 17) % (2**32))
        return fam, params, base, q, k, v, gen

    def probe_cond(self) -> torch.Tensor:
        """(B, H, S) float64: each row's condition in the probe's float64 derivation
        (ProbeFamily.cond; zeros for a family without one): how far, relative to |r_i| and
        per unit u64, another platform's rounding may move r_i before its rounding to the
        case's dtype."""
        fam, params, base, q, k, v, gen = self._probe_inputs()
        if fam.cond is None:
            return torch.zeros(q.shape[:-1], dtype=torch.float64)
        return fam.cond(params, q, k, v, base.ridge_lambda, base.qk_scale, gen)

    def build(self, device="cpu") -> ParallaxProblem:
        c = self.case
        fam, params, base, q, k, v, gen = self._probe_inputs()
        r = fam.build(params, q, k, v, base.ridge_lambda, base.qk_scale, gen)
        dt = DTYPES[c.dtype]
        r_dt = r.to(dt)
        if not bool(torch.isfinite(r_dt).all()):
            # the exact LLA probe of an ill-conditioned row can exceed float16's range: that
            # probe has no value in this dtype, and a clipped one would be another probe
            raise ProbeOutOfRange(f"parallax case: probe {self.probe} reaches |r| = {float(r.abs().max()):.3g}, "
                                  f"beyond {c.dtype}'s range, on {self.spec()}")
        return ParallaxProblem(self, base.q.to(device), base.k.to(device), base.v.to(device),
                               r_dt.to(device), base.qk_scale)


def parse_parallax_case(spec: str) -> ParallaxCase:
    """Inverse of ``ParallaxCase.spec``: 'CASE_SPEC;probe=NAME[:p=v,...]'."""
    if not isinstance(spec, str):
        raise LLAInputError(f"parallax case: expected a spec string, got {type(spec).__name__}")
    head, sep, tail = spec.strip().partition(PROBE_SEP)
    if not sep:
        raise LLAInputError(f"parallax case: expected 'CASE_SPEC{PROBE_SEP}NAME[:p=v,...]', got {spec!r}")
    name, _, ps = tail.partition(":")
    fam = get_probe(name)
    params = parse_params(ps, fam, spec, what="probe parameter", where="parallax case", owner=f"probe {name!r}",
                          label=f"probe {name}")
    return ParallaxCase(parse_case(head), name, params)


# ------------------------------------------------------------------ implementations
def _oracle_forward(q, k, v, r, *, qk_scale=None):
    from lla_verify.oracles.parallax import parallax_forward

    return parallax_forward(q, k, v, r, qk_scale=qk_scale).to(q.dtype)


def _dense_forward(q, k, v, r, *, qk_scale=None):
    from lla_verify.oracles.parallax import parallax_dense

    return parallax_dense(q, k, v, r, qk_scale=qk_scale, compute_dtype=torch.float32)


def _triton_forward(q, k, v, r, *, qk_scale=None):
    import parallax_triton

    return parallax_triton.parallax_attention(q, k, v, r, qk_scale=qk_scale)


def _triton_bf16w_forward(q, k, v, r, *, qk_scale=None):
    import parallax_triton

    # the lever where parallax_triton allows it, a forward no backward reads; a call for
    # gradients gets the tf32x3 merge, as parallax_attention's own default does
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, r))
    return parallax_triton.parallax_attention(q, k, v, r, qk_scale=qk_scale, bf16_weights=not grads)


def _builtin() -> dict[str, Callable[[], Impl]]:
    return {
        "parallax-dense": lambda: Impl(
            name="parallax-dense", forward=_dense_forward, operator=OPERATOR,
            description="dense centred Parallax in fp32 torch; the same-precision reference",
            compute_dtype=torch.float32, grads=("dq", "dk", "dv", "dr")),
        "parallax-oracle": lambda: Impl(
            name="parallax-oracle", forward=_oracle_forward, operator=OPERATOR,
            description="the float64 Parallax oracle itself (a sanity run of the suite)",
            dtypes=(torch.float64,) + ALL_DTYPES, compute_dtype=torch.float64, grads=("dq", "dk", "dv", "dr")),
        "parallax-triton": lambda: Impl(
            name="parallax-triton", forward=_triton_forward, operator=OPERATOR,
            description="parallax_triton: one-pass Parallax in Triton over FlashAttention's tiles, fp32 accumulation",
            head_dims=(16, 32, 64, 128), devices=("cuda", "cpu"), compute_dtype=torch.float32,
            grads=("dq", "dk", "dv", "dr")),
        "parallax-triton-bf16w": lambda: Impl(
            name="parallax-triton-bf16w", forward=_triton_bf16w_forward, operator=OPERATOR,
            description="parallax_triton with bf16 weights on the fast tiles of a forward outside autograd "
                        "(bf16 inputs; docs/kernels-parallax.md §3); gradients as parallax-triton's",
            head_dims=(16, 32, 64, 128), devices=("cuda", "cpu"), compute_dtype=torch.float32,
            grads=("dq", "dk", "dv", "dr")),
    }


PARALLAX_BUILTIN_NAMES = tuple(_builtin())
DEFAULT_PARALLAX_IMPL = "parallax-dense"


def get_parallax_impl(spec: str) -> Impl:
    """Resolve ``NAME`` (a built-in) or ``MODULE:CALLABLE`` (the protocol above)."""
    table = _builtin()
    if spec in table:
        return table[spec]()
    opt = "--lla-parallax-impl"
    fn = load_callable(spec, opt, list(table), "mypkg.mymod:my_parallax")
    record = getattr(fn, "lla_impl_record", None)
    if isinstance(record, Impl) and record.operator == OPERATOR:
        return record
    return Impl(name=spec, forward=fn, operator=OPERATOR, description=f"external Parallax implementation {spec}",
                grads=("dq", "dk", "dv", "dr"))


def is_parallax_available(impl: Impl, device: str) -> str | None:
    """None if ``impl`` can run on ``device`` in this process, else why not."""
    reason = impl.supports(device=device)
    if reason:
        return reason
    if impl.name in ("parallax-triton", "parallax-triton-bf16w"):
        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton kernel runs on CPU only through the interpreter (set TRITON_INTERPRET=1)"
        try:
            import parallax_triton
        except ImportError as exc:
            return f"parallax_triton does not import: {exc}"
        if not hasattr(parallax_triton, "parallax_attention"):
            return "parallax_triton.parallax_attention is not built yet"
    return None


__all__ = ["PROBES", "ProbeFamily", "ParallaxCase", "ParallaxProblem", "parse_parallax_case", "get_probe",
           "get_parallax_impl", "is_parallax_available", "PARALLAX_BUILTIN_NAMES", "DEFAULT_PARALLAX_IMPL"]
