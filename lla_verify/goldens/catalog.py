"""The goldens' catalog and how each is computed.

Each golden belongs to an operator of the operators table (registry/operators.py):
``lla``, ``parallax``, ``lla-decode`` or ``parallax-decode``. Its case is that
operator's case (``op.parse_case``): a ``Case`` of the registry (family, params, shape,
dtype, seed) for LLA and LLA decode, a ``ParallaxCase`` (the same plus a probe family)
for the Parallax ones. An LLA golden may carry a *variant* that turns it into an
identity the families do not produce on their own (``v=const``: every value row equal
to the first one; ``lam=0``: no ridge at all). Inputs are rebuilt from that spec, so a
golden can be regenerated anywhere; the float64 oracles (and, for small LLA and
Parallax goldens, the mpmath ones) compute what is stored.

A decode golden stores the inputs in the decode layout the operator's check gives an
implementation (testing/decode.every_position: every position of the forward case as
one batch of B * S sequences of lengths 1..S, so ragged, with the first token, and the
cache past each length NaN), and the float64 decode reference (oracles.decode) per
sequence.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from lla_verify.registry.cases import Case, Problem
from lla_contract import LLAInputError
from lla_verify.registry.operators import get_operator


SUFFIX = ".safetensors"
MP_DPS = 50
MP_MAX_S, MP_MAX_D = 16, 8  # small goldens: the mpmath oracle stays under a second each
# The cotangent for the stored gradients is randn from this seed offset, so it
# differs from the input draws of the same case seed.
COTANGENT_SEED_OFFSET = 1_000_003
U64 = 2.0**-53
# float64 noise allowed between library versions: NOISE_FACTOR * u64 * cond, with
# cond = max over defined queries of kappa(Sigma_i) * omega_i / delta_i. The factor
# covers accumulation lengths (sqrt(S D) ~ 100) and the backward pass.
NOISE_FACTOR = 1e3
VARIANTS = {
    "": "the case as its family builds it",
    "v=const": "v_j = v_0 for every j (partition of unity: o_i = v_0 exactly)",
    "lam=0": "ridge_lambda = 0 (no ridge; early tokens i < D are 0/0 and stored as NaN)",
}

# what the float64 reference of each operator is, for the manifest
ORACLES = {
    "lla": "lla_forward_details (rho/Schur)",
    "parallax": "oracles.parallax.parallax_forward (centred covariance)",
    "lla-decode": "oracles.decode.lla_decode_reference (the forward oracle's last row per prefix)",
    "parallax-decode": "oracles.decode.parallax_decode_reference (the forward oracle's last row per prefix)",
}


# ------------------------------------------------------------------ catalog
@dataclass(frozen=True)
class Golden:
    """One named golden: an operator, its case, an optional variant (LLA only), and
    whether mpmath backs it."""

    name: str
    case: object  # the operator's case: cases.Case, or parallax.ParallaxCase
    variant: str = ""
    mp: bool = False  # small golden: o also from the mpmath oracle at MP_DPS digits
    why: str = ""
    op: str = "lla"

    @property
    def base(self) -> Case:
        """The LLA ``Case`` under the golden (family, sizes, dtype, seed)."""
        return get_operator(self.op).base_case(self.case)

    @property
    def spec(self) -> str:
        return get_operator(self.op).spec(self.case) + (f"|{self.variant}" if self.variant else "")

    @property
    def file(self) -> str:
        return self.name + SUFFIX

    @property
    def oracle(self) -> dict:
        return {"kind": "float64+mpmath" if self.mp else "float64", "float64": ORACLES[self.op],
                "mp_dps": MP_DPS if self.mp else None}


def parse_golden_spec(spec: str, op: str = "lla") -> tuple:
    """Inverse of ``Golden.spec``: 'CASE-SPEC' or 'CASE-SPEC|VARIANT' (variants are LLA's),
    the case parsed by ``op``'s parse_case."""
    operator = get_operator(op, "golden operator")
    base, _, variant = spec.partition("|")
    if variant not in VARIANTS or (variant and op != "lla"):
        allowed = list(VARIANTS)[1:] if op == "lla" else []
        raise LLAInputError(f"golden spec: unknown variant {variant!r} in {spec!r} for operator {op}; "
                            f"expected one of {allowed}")
    return operator.parse_case(base), variant


def _golden(name, family, params, S, D, dtype="float32", *, B=1, H=1, seed=0, variant="", why=""):
    mp = S <= MP_MAX_S and D <= MP_MAX_D
    return Golden(name, Case(family, dict(params), B, H, S, D, dtype, seed), variant, mp, why)


def _px(name, op, probe, probe_params, family, params, S, D, dtype="float32", *, B=1, H=1, seed=0, why=""):
    """A golden of the Parallax forward or decode: the LLA case with a probe family on top."""
    from lla_verify.registry.parallax import ParallaxCase

    mp = op == "parallax" and S <= MP_MAX_S and D <= MP_MAX_D
    case = ParallaxCase(Case(family, dict(params), B, H, S, D, dtype, seed), probe, dict(probe_params))
    return Golden(name, case, "", mp, why, op)


def _dec(name, family, params, S, D, dtype="float32", *, B=1, H=1, seed=0, why=""):
    """An LLA decode golden: every position of the forward case, decoded."""
    return Golden(name, Case(family, dict(params), B, H, S, D, dtype, seed), "", False, why, "lla-decode")


CATALOG: tuple[Golden, ...] = (
    # small: S <= 16, D <= 8, the mpmath oracle at 50 digits is the reference
    _golden("gaussian-f32-S16-D4-H2", "gaussian", {}, 16, 4, H=2, seed=1, why="baseline; heads independent"),
    _golden("first-token-f32-S1-D4", "gaussian", {}, 1, 4, B=2, seed=2, why="o_0 = v_0 when lambda > 0"),
    _golden("softmax-limit-lam100-f32-S16-D4", "gaussian", {"lam": 100.0}, 16, 4, seed=3,
       why="lambda -> inf: causal softmax attention, O(1/lambda)"),
    _golden("tiny-scale1e-4-f32-S16-D4", "bandwidth", {"scale": 1e-4}, 16, 4, seed=4,
       why="s -> 0: uniform weights, the MesaNet limit"),
    _golden("zero-scale-f32-S16-D4", "bandwidth", {"scale": 0.0}, 16, 4, seed=33,
       why="s = 0: uniform weights exactly; LLA is the MesaNet form (an identity, not a limit)"),
    _golden("large-scale1e2-bf16-S16-D4", "bandwidth", {"scale": 100.0}, 16, 4, "bfloat16", seed=5,
       why="s -> inf: hard attention, exp underflow of all but one key"),
    _golden("const-values-f16-S16-D4", "gaussian", {}, 16, 4, "float16", seed=6, variant="v=const",
       why="partition of unity: constant values reproduced exactly"),
    _golden("linear-values-lam0-f32-S16-D4", "linear_values", {}, 16, 4, seed=7, variant="lam=0",
       why="values linear in keys at lambda 0, S > D: o_i = A q_i + b for i >= D; early tokens 0/0"),
    _golden("linear-values-lam1e-8-bf16-S12-D4", "linear_values", {"lam": 1e-8}, 12, 4, "bfloat16", seed=8,
       why="values linear in keys, tiny lambda"),
    _golden("subspace-noise1e-6-lam1e-10-f32-S16-D4", "subspace", {"rank": 1, "noise": 1e-6, "lam": 1e-10}, 16, 4, seed=9,
       why="near-singular Sigma_i; float64 loses digits, mpmath does not"),
    _golden("early-lam1e-10-f16-S8-D8", "early", {"lam": 1e-10}, 8, 8, "float16", seed=10,
       why="every token early (i < D) with tiny lambda: kappa ~ 1/lambda"),
    _golden("offset1e3-f32-S16-D4", "offset", {"offset": 1e3}, 16, 4, seed=11, why="cancellation: ||q|| >> ||k - q||"),
    _golden("clusters-spread1e-4-bf16-S16-D4", "clusters", {"clusters": 2, "spread": 1e-4}, 16, 4, "bfloat16", seed=12,
       why="keys in tight clusters"),
    _golden("duplicates-pool2-f16-S16-D4", "duplicates", {"pool": 2}, 16, 4, "float16", seed=13,
       why="repeated keys: rank(scatter) <= 2"),
    _golden("large-norm1e2-bf16-S16-D4", "large_norm", {"factor": 100.0}, 16, 4, "bfloat16", seed=14,
       why="large norms"),
    _golden("lambda-decades-perquery-f32-S16-D4", "lambda_decades", {"lam_lo": 1e-4, "decades": 5.0}, 16, 4, seed=15,
       why="per-query lambda over five decades"),
    _golden("spectrum-kappa1e6-bf16-S16-D8", "spectrum", {"kappa": 1e6}, 16, 8, "bfloat16", seed=16,
       why="prescribed spectrum spread"),
    # medium: S up to 512, D up to 64, the float64 oracle is the reference
    _golden("gaussian-f32-S512-D16", "gaussian", {}, 512, 16, seed=21, why="baseline at length"),
    _golden("spectrum-kappa1e8-bf16-S129-D32", "spectrum", {"kappa": 1e8}, 129, 32, "bfloat16", seed=22,
       why="kappa(Sigma_i) ~ 1e9; S not a multiple of any tile"),
    _golden("subspace-noise1e-4-bf16-S33-D16", "subspace", {"rank": 2, "noise": 1e-4, "lam": 1e-8}, 33, 16, "bfloat16",
       seed=23, why="near-singular Sigma_i in bf16"),
    _golden("lambda-decades-f16-S96-D64", "lambda_decades", {"lam_lo": 1e-4, "decades": 6.0}, 96, 64, "float16", seed=24,
       why="per-query lambda over six decades, D = 64"),
    _golden("offset1e4-f32-S127-D32", "offset", {"offset": 1e4}, 127, 32, seed=25, why="cancellation at 1e4"),
    _golden("bandwidth-scale10-bf16-S96-D16", "bandwidth", {"scale": 10.0}, 96, 16, "bfloat16", seed=26,
       why="near one-hot weights"),
    _golden("clusters-spread1e-3-f16-S100-D32", "clusters", {"clusters": 3, "spread": 1e-3}, 100, 32, "float16", seed=27,
       why="tight clusters, D = 32"),
    _golden("early-lam1e-8-bf16-S72-D64", "early", {"lam": 1e-8}, 72, 64, "bfloat16", seed=28,
       why="early tokens (i < 64) with tiny lambda, D = 64"),
    _golden("linear-values-lam0-f32-S100-D16", "linear_values", {}, 100, 16, seed=29, variant="lam=0",
       why="exact reproduction A q + b at lambda 0 for i >= D"),
    _golden("duplicates-pool4-f32-S64-D16", "duplicates", {"pool": 4}, 64, 16, seed=30, why="repeated keys at length"),
    _golden("large-norm1e3-f16-S64-D32", "large_norm", {"factor": 1e3}, 64, 32, "float16", seed=31,
       why="large norms near the float16 range"),
    _golden("const-values-bf16-S200-D16", "gaussian", {"lam": 0.01}, 200, 16, "bfloat16", seed=32, variant="v=const",
       why="partition of unity at length, small lambda"),
    # Parallax: o = nu - C r on a family's q, k, v with a probe family's r (registry/parallax.py);
    # small ones (S <= 16, D <= 8) also from the mpmath oracle
    _px("px-zero-gaussian-f32-S16-D4", "parallax", "zero", {}, "gaussian", {}, 16, 4, H=2, seed=41,
        why="r = 0: softmax attention exactly"),
    _px("px-lla-gaussian-f32-S16-D4", "parallax", "lla", {}, "gaussian", {}, 16, 4, seed=42,
        why="the exact LLA probe: Parallax equals LLA"),
    _px("px-small-eig-offset1e3-f32-S16-D4", "parallax", "small_eig", {}, "offset", {"offset": 1e3}, 16, 4, seed=43,
        why="probe along the smallest key directions, keys at a common offset: the uncentred expansion cancels"),
    _px("px-random-spectrum-kappa1e4-bf16-S16-D8", "parallax", "random", {"amp": 3.0}, "spectrum", {"kappa": 1e4},
        16, 8, "bfloat16", seed=44, why="random probe over a prescribed key spectrum, bf16 inputs"),
    _px("px-random-gaussian-bf16-S33-D16", "parallax", "random", {}, "gaussian", {}, 33, 16, "bfloat16", seed=45,
        why="random probe, S not a multiple of any tile"),
    _px("px-small-eig-offset1e4-f32-S48-D16", "parallax", "small_eig", {"amp": 10.0}, "offset", {"offset": 1e4},
        48, 16, seed=46, why="large probe in the keys' thin directions at offset 1e4: centring decides the digits"),
    _px("px-small-eig-large-norm1e2-f32-S48-D16", "parallax", "small_eig", {}, "large_norm", {"factor": 100.0},
        48, 16, seed=50, why="large keys, probe along their flattest direction: the uncentred expansion's "
                             "cancellation exceeds the budget"),
    _px("px-lla-spectrum-kappa1e6-f32-S40-D16", "parallax", "lla", {}, "spectrum", {"kappa": 1e6}, 40, 16, seed=47,
        why="the LLA probe on an ill-conditioned key spectrum: LLA's amplification carried by r"),
    _px("px-zero-spectrum-kappa1e6-bf16-S64-D32", "parallax", "zero", {}, "spectrum", {"kappa": 1e6}, 64, 32,
        "bfloat16", seed=48, why="softmax attention through the Parallax path, D = 32"),
    _px("px-large-clusters-f16-S24-D16", "parallax", "large", {}, "clusters", {"clusters": 2, "spread": 1e-2}, 24, 16,
        "float16", seed=49, why="a large probe: the covariance term dominates nu_i, float16 inputs"),
    # decode: every position of the forward case as a batch of B * S sequences of lengths
    # 1..S (ragged, the first token included), judged against the forward's rows
    _dec("dec-gaussian-f32-S7-D16-B2", "gaussian", {}, 7, 16, B=2, seed=51,
         why="a cache shorter than a tile, two problems: lengths 1..7 twice"),
    _dec("dec-first-token-f32-S1-D16-B3", "gaussian", {}, 1, 16, B=3, seed=52,
         why="the first token only: o_0 = v_0 for every sequence"),
    _dec("dec-offset1e3-bf16-S33-D16", "offset", {"offset": 1e3}, 33, 16, "bfloat16", seed=53,
         why="cancellation at offset 1e3 over caches longer than a tile, bf16"),
    _dec("dec-spectrum-kappa1e6-f32-S20-D16", "spectrum", {"kappa": 1e6}, 20, 16, seed=54,
         why="ill-conditioned Sigma_i: the decode CG over the cache"),
    _px("pxdec-random-gaussian-f32-S7-D16-B2", "parallax-decode", "random", {}, "gaussian", {}, 7, 16, B=2, seed=61,
        why="a cache shorter than a tile, two problems: lengths 1..7 twice"),
    _px("pxdec-small-eig-offset1e3-bf16-S33-D16", "parallax-decode", "small_eig", {}, "offset", {"offset": 1e3},
        33, 16, "bfloat16", seed=62, why="probe in the keys' thin directions at a common offset, bf16"),
    _px("pxdec-lla-spectrum-kappa1e4-f32-S20-D16", "parallax-decode", "lla", {}, "spectrum", {"kappa": 1e4}, 20, 16,
        seed=63, why="the LLA probe decoded: Parallax decode equals LLA's rows"),
)
BY_NAME = {g.name: g for g in CATALOG}


def get_golden(name: str) -> Golden:
    if name not in BY_NAME:
        raise LLAInputError(f"--only: unknown golden {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def select(only, op: str | None = None) -> list[Golden]:
    """The goldens named by ``only`` (all when empty), of operator ``op`` when given."""
    if not only:
        return [g for g in CATALOG if op is None or g.op == op]
    out = [get_golden(n) for n in dict.fromkeys(only)]
    for g in out:
        if op is not None and g.op != op:
            raise LLAInputError(f"--only: golden {g.name!r} is of operator {g.op}, not {op} "
                                f"(pick it with --op {g.op})")
    return out


# ------------------------------------------------------------------ computing
@contextlib.contextmanager
def deterministic():
    """One CPU thread and deterministic algorithms: the same bytes on every run.

    A multi-threaded reduction splits its sums by thread count, which would make
    the last bits depend on the machine's core count.
    """
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def build_problem(golden: Golden) -> Problem:
    """The golden's Problem on CPU, inputs as the implementation sees them."""
    p = golden.case.build()
    if golden.variant == "v=const":
        p.v = p.v[..., :1, :].expand_as(p.v).contiguous()
    elif golden.variant == "lam=0":
        p.ridge_lambda = 0.0
    return p


def problem_from_arrays(golden: Golden, arrays: dict, qk_scale: float) -> Problem:
    """A Problem on the stored inputs (lam is stored 0-d for a scalar lambda)."""
    lam = arrays["lam"]
    ridge = float(lam) if lam.dim() == 0 else lam.clone()
    return Problem(golden.case, arrays["q"].clone(), arrays["k"].clone(), arrays["v"].clone(), ridge, qk_scale)


def compute(golden: Golden, r: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every stored array of ``golden``, recomputed from its spec (CPU, deterministic).

    ``r`` (a Parallax golden only, (B, H, S, D)): the probe to use in place of the one the
    case derives. A probe derived in float64 (the LLA probe, an eigenvector) is rounded
    to the input dtype, and float64's platform-dependent last bits can move that rounding
    by one step: ``regen --check`` then recomputes the outputs on the stored probe, so that
    their drift measures the oracle alone (regen.derived_input_drift)."""
    fn = {"lla": _compute_lla, "parallax": _compute_parallax, "lla-decode": _compute_lla_decode,
          "parallax-decode": _compute_parallax_decode}[golden.op]
    if r is not None and golden.op not in ("parallax", "parallax-decode"):
        raise ValueError(f"golden {golden.name}: only a Parallax golden takes a probe r")
    with deterministic():
        out = fn(golden) if r is None else fn(golden, r=r)
    return {key: t.detach().contiguous() for key, t in out.items()}


def stored_probe(golden: Golden, r: torch.Tensor) -> torch.Tensor:
    """A stored probe as the problem holds it, (B, H, S, D): a Parallax decode golden stores
    it by decoded row, (B*S, H, D)."""
    if golden.op != "parallax-decode":
        return r
    from lla_verify.testing.decode import unflatten

    return unflatten(r, golden.case.case.B, golden.case.case.S)


def _cotangent(golden: Golden, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(golden.base.seed) + COTANGENT_SEED_OFFSET)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def parallax_conditioning(q, k, v, r, o64, qk_scale) -> torch.Tensor:
    """Parallax's relative condition number, 0-d float64: max over queries of sens_i /
    max(|o_i|, rms |o|), sens_i the first-order change of o_i under unit relative
    perturbations of q, k, v and r (budget.parallax.parallax_sensitivity). The float64
    oracle's own rounding is u64 times this (it sets the noise of --check as kappa does
    for LLA)."""
    from lla_verify.budget.parallax import parallax_sensitivity

    sens = parallax_sensitivity(q, k, v, r, qk_scale=qk_scale)
    on = o64.detach().norm(dim=-1)
    rms = float(on.square().mean().sqrt()) if on.numel() else 0.0
    c = sens / on.clamp_min(max(rms, torch.finfo(torch.float64).tiny))
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    return torch.tensor(float(c.max()) if c.numel() else 0.0, dtype=torch.float64)


def _compute_parallax(golden: Golden, r: torch.Tensor | None = None) -> dict:
    from lla_verify.oracles.parallax import parallax_forward

    p = golden.case.build()
    if r is not None:
        p.r = r.to(p.r.dtype)
    xs = tuple(t.to(torch.float64).requires_grad_(True) for t in (p.q, p.k, p.v, p.r))
    o = parallax_forward(*xs, qk_scale=p.qk_scale)
    do = _cotangent(golden, o.shape)
    dq, dk, dv, dr = torch.autograd.grad((o * do).sum(), xs)
    out = {"q": p.q, "k": p.k, "v": p.v, "r": p.r, "o": o.detach(), "do": do, "dq": dq, "dk": dk, "dv": dv,
           "dr": dr, "cond": parallax_conditioning(p.q, p.k, p.v, p.r, o, p.qk_scale)}
    if golden.mp:
        from lla_verify.oracles.mp_parallax import parallax_forward_mp

        out["o_mp"] = parallax_forward_mp(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, dps=MP_DPS)
    return out


def decode_lambda(problem: Problem) -> torch.Tensor:
    """lambda per query as the LLA decode check hands it over: float32, (B, H, S)."""
    return problem.lam_tensor.to(torch.float32)


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, ...) per-row arrays in the decode layout (B * S, H, ...) of testing.decode."""
    B, H, S = t.shape[:3]
    return t.transpose(1, 2).reshape(B * S, H, *t.shape[3:])


def _compute_lla_decode(golden: Golden) -> dict:
    from lla_verify.oracles.decode import lla_decode_reference
    from lla_verify.oracles.float64 import lla_forward_details
    from lla_verify.testing.decode import every_position

    p = golden.case.build()
    lam = decode_lambda(p)
    qd, kc, vc, lens, (lam_d,) = every_position(p.q, p.k, p.v, lam[..., None])
    lam_d = lam_d[..., 0]
    o = lla_decode_reference(qd, kc, vc, lens, ridge_lambda=lam_d, qk_scale=p.qk_scale)
    # the forward's details on the same (float32) lambda: the conditioning of each decoded row
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=lam, qk_scale=p.qk_scale)
    return {"q": qd, "k_cache": kc, "v_cache": vc, "lengths": lens, "lam": lam_d, "o": o,
            "omega": flat_rows(d.omega), "delta": flat_rows(d.delta), "kappa": flat_rows(d.kappa),
            "undefined": flat_rows(d.undefined)}


def _compute_parallax_decode(golden: Golden, r: torch.Tensor | None = None) -> dict:
    from lla_verify.oracles.decode import parallax_decode_reference
    from lla_verify.oracles.parallax import parallax_forward
    from lla_verify.testing.decode import every_position

    p = golden.case.build()
    if r is not None:
        p.r = r.to(p.r.dtype)
    qd, kc, vc, lens, (rd,) = every_position(p.q, p.k, p.v, p.r)
    o = parallax_decode_reference(qd, rd, kc, vc, lens, qk_scale=p.qk_scale)
    o_fwd = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
    return {"q": qd, "r": rd, "k_cache": kc, "v_cache": vc, "lengths": lens, "o": o,
            "cond": parallax_conditioning(p.q, p.k, p.v, p.r, o_fwd, p.qk_scale)}


def _compute_lla(golden: Golden) -> dict:
    from lla_verify.oracles.float64 import lla_forward, lla_forward_details

    p = build_problem(golden)
    lam_in = p.ridge_lambda
    lam_arr = lam_in.clone() if isinstance(lam_in, torch.Tensor) else torch.tensor(lam_in, dtype=torch.float32)
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=lam_in, qk_scale=p.qk_scale)
    do = _cotangent(golden, d.o.shape)
    # undefined rows (lambda = 0, delta = 0) have no value and so no gradient
    do = torch.where(d.undefined[..., None], torch.zeros_like(do), do)
    q, k, v = (t.to(torch.float64).requires_grad_(True) for t in (p.q, p.k, p.v))
    lam = p.lam_tensor.clone().requires_grad_(True)
    o = lla_forward(q, k, v, ridge_lambda=lam, qk_scale=p.qk_scale)
    o = torch.where(d.undefined[..., None], torch.zeros_like(o), o)
    dq, dk, dv, dl = torch.autograd.grad((o * do).sum(), (q, k, v, lam))
    out = {
        "q": p.q, "k": p.k, "v": p.v, "lam": lam_arr,
        "o": d.o, "omega": d.omega, "delta": d.delta, "rho": d.rho, "kappa": d.kappa,
        "undefined": d.undefined, "do": do, "dq": dq, "dk": dk, "dv": dv, "dlambda": dl,
    }
    if golden.mp:
        try:
            from lla_verify.oracles.mp import lla_forward_mp
        except ImportError as exc:
            raise RuntimeError(f"golden {golden.name}: the mpmath oracle (lla_verify.oracles.mp) "
                               f"is not importable: {exc}") from None
        out["o_mp"] = lla_forward_mp(p.q, p.k, p.v, ridge_lambda=lam_in, qk_scale=p.qk_scale, dps=MP_DPS)
    return out


def conditioning(arrays: dict) -> float:
    """max over defined queries of max(kappa_i, omega_i / delta_i), at least 1; for a
    Parallax golden its stored ``cond`` (parallax_conditioning), at least 1.

    A float64 solve with Sigma_i loses about log10(kappa_i) digits and the division
    by delta_i about log10(omega_i / delta_i); near lambda -> 0 both grow as 1/lambda,
    so their max (not their product) is what the oracle's own rounding looks like.
    """
    if "cond" in arrays:
        c = float(arrays["cond"])
        return max(1.0, c) if math.isfinite(c) else math.inf
    ok = ~arrays["undefined"]
    amp = torch.maximum(arrays["kappa"], arrays["omega"] / arrays["delta"].abs())
    amp = torch.where(ok & torch.isfinite(amp), amp, torch.ones_like(amp))
    return float(max(1.0, float(amp.max()))) if amp.numel() else 1.0


def noise_tol(arrays: dict) -> float:
    return NOISE_FACTOR * U64 * conditioning(arrays)
