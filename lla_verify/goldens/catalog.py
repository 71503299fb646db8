"""The goldens' catalog and how each is computed.

Each golden is a ``Case`` of the registry (family, params, shape, dtype, seed),
optionally with a *variant* that turns it into an identity the families do not produce
on their own (``v=const``: every value row equal to the first one; ``lam=0``: no ridge
at all). Inputs are rebuilt from that spec, so a golden can be regenerated anywhere;
the float64 oracle (and, for small goldens, the mpmath oracle) computes what is stored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lla_verify.registry.cases import Case, Problem, parse_case
from lla_contract import LLAInputError


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

# ------------------------------------------------------------------ catalog
@dataclass(frozen=True)
class Golden:
    """One named golden: a case, an optional variant, and whether mpmath backs it."""

    name: str
    case: Case
    variant: str = ""
    mp: bool = False  # small golden: o also from the mpmath oracle at MP_DPS digits
    why: str = ""

    @property
    def spec(self) -> str:
        return self.case.spec() + (f"|{self.variant}" if self.variant else "")

    @property
    def file(self) -> str:
        return self.name + SUFFIX

    @property
    def oracle(self) -> dict:
        return {"kind": "float64+mpmath" if self.mp else "float64", "float64": "lla_forward_details (rho/Schur)",
                "mp_dps": MP_DPS if self.mp else None}


def parse_golden_spec(spec: str) -> tuple[Case, str]:
    """Inverse of ``Golden.spec``: 'CASE-SPEC' or 'CASE-SPEC|VARIANT'."""
    base, _, variant = spec.partition("|")
    if variant not in VARIANTS:
        raise LLAInputError(f"golden spec: unknown variant {variant!r} in {spec!r}; expected one of {list(VARIANTS)[1:]}")
    return parse_case(base), variant


def _golden(name, family, params, S, D, dtype="float32", *, B=1, H=1, seed=0, variant="", why=""):
    mp = S <= MP_MAX_S and D <= MP_MAX_D
    return Golden(name, Case(family, dict(params), B, H, S, D, dtype, seed), variant, mp, why)


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
)
BY_NAME = {g.name: g for g in CATALOG}


def get_golden(name: str) -> Golden:
    if name not in BY_NAME:
        raise LLAInputError(f"--only: unknown golden {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def select(only) -> list[Golden]:
    if not only:
        return list(CATALOG)
    return [get_golden(n) for n in dict.fromkeys(only)]


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


def compute(golden: Golden) -> dict[str, torch.Tensor]:
    """Every stored array of ``golden``, recomputed from its spec (CPU, deterministic)."""
    from lla_verify.oracles.float64 import lla_forward, lla_forward_details

    with deterministic():
        p = build_problem(golden)
        lam_in = p.ridge_lambda
        lam_arr = lam_in.clone() if isinstance(lam_in, torch.Tensor) else torch.tensor(lam_in, dtype=torch.float32)
        d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=lam_in, qk_scale=p.qk_scale)
        gen = torch.Generator().manual_seed(int(golden.case.seed) + COTANGENT_SEED_OFFSET)
        do = torch.randn(d.o.shape, generator=gen, dtype=torch.float64)
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
    return {key: t.detach().contiguous() for key, t in out.items()}


def conditioning(arrays: dict) -> float:
    """max over defined queries of max(kappa_i, omega_i / delta_i), at least 1.

    A float64 solve with Sigma_i loses about log10(kappa_i) digits and the division
    by delta_i about log10(omega_i / delta_i); near lambda -> 0 both grow as 1/lambda,
    so their max (not their product) is what the oracle's own rounding looks like.
    """
    ok = ~arrays["undefined"]
    amp = torch.maximum(arrays["kappa"], arrays["omega"] / arrays["delta"].abs())
    amp = torch.where(ok & torch.isfinite(amp), amp, torch.ones_like(amp))
    return float(max(1.0, float(amp.max()))) if amp.numel() else 1.0


def noise_tol(arrays: dict) -> float:
    return NOISE_FACTOR * U64 * conditioning(arrays)
