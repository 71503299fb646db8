"""The registry of LLA problem families (SPEC 7) and of concrete cases.

A *family* is a deterministic generator of whole problems (q, k, v, lambda, scale)
from a few named parameters; each parameter has a range, a scale (log or linear)
and an *easy* value, the one strategies shrink towards and the hunt starts from.
A *case* is a family, its parameter values, a shape, a dtype and a seed: fully
determined, printable as one line and parsed back (``Case.spec`` /
``parse_case``), which is how failures, goldens, the audit and the hunt say
"replay this".

Every family states what it targets; tests/test_cases.py measures that it does.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from lla_contract import LLAInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SEED_MAX = 2**32 - 1  # torch's CPU generator keeps 32 bits: seed 2**32 would repeat seed 0


@dataclass(frozen=True)
class Param:
    name: str
    lo: float
    hi: float
    easy: float
    log: bool = True
    integer: bool = False
    doc: str = ""
    # 0 is in range besides [lo, hi]: the end a log range cannot reach (scale 0 is a
    # point of the operator, uniform weights, not only the limit of small scales)
    zero: bool = False

    def clip(self, x: float) -> float:
        """``x`` moved into range: for generators (strategies, the hunt), whose Case then
        holds and prints the moved value. A given value is never clipped: see ``check``."""
        if self.zero and float(x) == 0.0:
            return 0.0
        x = min(max(float(x), self.lo), self.hi)
        return float(round(x)) if self.integer else x

    def range_text(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        zero = " or exactly 0" if self.zero else ""
        return f"{kind} in [{_fmt(float(self.lo))}, {_fmt(float(self.hi))}]{zero}"

    def check(self, x, family: str = "") -> None:
        """LLAInputError naming the parameter and its range unless ``x`` is a value of it."""
        where = f"{family}'s " if family else ""
        ok = isinstance(x, numbers.Real) and not isinstance(x, bool)
        if ok:
            x = float(x)
            # a parameter that admits 0 besides its range (Param.zero) takes it exactly
            in_range = self.lo <= x <= self.hi or (self.zero and x == 0.0)
            ok = math.isfinite(x) and in_range and (not self.integer or x.is_integer())
        if not ok:
            raise LLAInputError(f"case: parameter {self.name}={x!r}: {where}{self.name} must be {self.range_text()}"
                                + (f" ({self.doc})" if self.doc else ""))


@dataclass(frozen=True)
class Family:
    name: str
    targets: str  # what the family is for, and the claim tests/test_cases.py checks
    params: tuple[Param, ...]
    build: Callable  # (params: dict, shape: (B, H, S, D), gen) -> (q, k, v, lam, scale) in float64
    min_seq: int = 1  # smallest S that makes sense for the family
    per_query_lambda: bool = False  # its lambda varies per query (an implementation needs per_query_lambda)
    # The parameter that sets the ridge: 'lam' is lambda itself; spectrum's 'lam_rel' is
    # lambda kappa (lambda relative to the spectrum's smallest spread); lambda_decades'
    # 'lam_lo' is the smallest of its per-query lambdas.
    ridge: str = "lam"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def easy(self) -> dict:
        return {p.name: p.easy for p in self.params}


@dataclass
class Problem:
    """A concrete problem: inputs already rounded to ``dtype`` (what the implementation sees)."""

    case: "Case"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ridge_lambda: object  # float or (B, H, S) tensor in float32
    qk_scale: float

    def to(self, device) -> "Problem":
        lam = self.ridge_lambda.to(device) if isinstance(self.ridge_lambda, torch.Tensor) else self.ridge_lambda
        return Problem(self.case, self.q.to(device), self.k.to(device), self.v.to(device), lam, self.qk_scale)

    @property
    def lam_tensor(self) -> torch.Tensor:
        """ridge_lambda broadcast to (B, H, S), float64."""
        shape = self.q.shape[:-1]
        if isinstance(self.ridge_lambda, torch.Tensor):
            return self.ridge_lambda.to(torch.float64).broadcast_to(shape)
        return torch.full(shape, float(self.ridge_lambda), dtype=torch.float64, device=self.q.device)

    def describe(self) -> str:
        return self.case.spec()


@dataclass(frozen=True)
class Case:
    family: str
    params: dict = field(default_factory=dict)
    B: int = 1
    H: int = 1
    S: int = 16
    D: int = 16
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """LLAInputError naming the first field that is not a value this case can have.

        Nothing is clipped: the case that runs is the case ``spec()`` prints."""
        fam = get_family(self.family)
        if not isinstance(self.params, dict):
            raise LLAInputError(f"case: params must be a dict, got {type(self.params).__name__}")
        check_params(self.params, fam, "case", f"family {self.family!r}", self.family)
        if self.dtype not in DTYPES:
            raise LLAInputError(f"case: dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        for name, val in (("B", self.B), ("H", self.H), ("S", self.S), ("D", self.D)):
            if not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1:
                raise LLAInputError(f"case: {name} must be an integer >= 1, got {val!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= SEED_MAX:
            raise LLAInputError(f"case: seed must be an integer in [0, {SEED_MAX}] (the generator keeps 32 bits; "
                                f"a larger seed would repeat a smaller one), got {self.seed!r}")

    def spec(self) -> str:
        ps = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.params.items()))
        return f"{self.family}:{ps}:B={self.B},H={self.H},S={self.S},D={self.D},dtype={self.dtype},seed={self.seed}"

    def build_bytes(self) -> int:
        """Host memory ``build`` needs: the float64 draws (q, k, v and the generators'
        temporaries) and the rounded copies."""
        n = int(self.B) * int(self.H) * int(self.S) * int(self.D)  # Python ints: no overflow
        return 8 * 8 * n + 3 * DTYPES[self.dtype].itemsize * n

    def check_bytes(self) -> int:
        """Memory one judged run of this case needs, beside the implementation's own:
        the build, the float64 oracle (queries in chunks of DEFAULT_CHUNK_BYTES, plus
        per-query (D, D) matrices) and the dense same-precision reference, which holds
        about three (B, H, S, S, D) float32 tensors (lla_verify/oracles/dense.py)."""
        B, H, S, D = (int(x) for x in (self.B, self.H, self.S, self.D))
        return (self.build_bytes() + 16 * 8 * B * H * S * D + 3 * 8 * B * H * S * D * D
                + 3 * 4 * B * H * S * S * D + 4 * 128 * 2**20)

    def check_fits(self, device="cpu", *, nbytes: int | None = None, what: str = "checking it") -> None:
        """LLAInputError when ``nbytes`` (default: ``check_bytes``) exceeds the memory
        available on ``device`` (and the build's host memory on the host): refused before
        anything is allocated, not found out by the allocator."""
        need = self.check_bytes() if nbytes is None else int(nbytes)
        shape = f"B={self.B},H={self.H},S={self.S},D={self.D}"
        for dev, n, why in (("cpu", self.build_bytes(), "building its inputs"), (str(device), need, what)):
            have = available_bytes(dev)
            if have is not None and n > have:
                raise LLAInputError(f"case: {shape} needs about {_gib(n)} of {dev} memory for {why}; "
                                    f"{_gib(have)} is available (make S, B, H or D smaller)")

    def build(self, device="cpu") -> Problem:
        self.validate()
        fam = get_family(self.family)
        params = fam.easy()
        params.update({k: float(v) for k, v in self.params.items()})
        self.check_fits(device, nbytes=self.build_bytes(), what="building its inputs")
        gen = torch.Generator().manual_seed(int(self.seed))
        q, k, v, lam, scale = fam.build(params, (self.B, self.H, self.S, self.D), gen)
        dt = DTYPES[self.dtype]
        # The implementation sees inputs rounded to its dtype; the oracle is run on
        # exactly these rounded values (SPEC 8), so rounding is never counted as error.
        q, k, v = (t.to(dt).to(device) for t in (q, k, v))
        if isinstance(lam, torch.Tensor):
            lam = lam.to(torch.float32).to(device)
        else:
            lam = float(torch.tensor(lam, dtype=torch.float32))
        return Problem(self, q, k, v, lam, float(scale))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def available_bytes(device="cpu") -> int | None:
    """Memory a new allocation can take on ``device`` (None when unknown): MemAvailable
    on a Linux host, free memory on a CUDA device."""
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(dev))[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(v) -> str:
    """A parameter as the spec prints it: 6 significant digits when they give the value
    back exactly, else as many as it takes (a replayed spec is the same case)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    if not isinstance(v, float):
        return str(v)
    for digits in range(6, 18):
        text = f"{v:.{digits}g}"
        if float(text) == v:
            return text
    return repr(v)


# ASCII only: Python's float() and int() also take fullwidth and other Unicode digits
# and underscores, which a spec printed by this module never holds
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)",
                     re.IGNORECASE | re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]{1,40}", re.ASCII)
SHAPE_FIELDS = ("B", "H", "S", "D", "dtype", "seed")


def _items(text: str, what: str, spec: str):
    """(key, value) pairs of 'k=v,k=v'; every key once, every item with its '='."""
    seen = set()
    if not text:
        return
    for item in text.split(","):
        key, eq, val = item.partition("=")
        if not item:
            raise LLAInputError(f"case: an empty {what} item (two commas, or a trailing one) in {spec!r}")
        if not eq:
            raise LLAInputError(f"case: {what} {key!r} has no value: expected {key}=VALUE in {spec!r}")
        if key in seen:
            raise LLAInputError(f"case: {what} {key!r} given twice in {spec!r}")
        seen.add(key)
        yield key, val


def check_params(params: dict, fam, where: str, owner: str, label: str) -> None:
    """LLAInputError unless every key of ``params`` is a parameter of ``fam`` (a Family or a
    ProbeFamily) and its value in that parameter's range. Messages begin with ``where``
    ('case'), name the family as ``owner`` ("family 'gaussian'") when a key is not one of
    its parameters and as ``label`` ("gaussian's lam must be ...") when a value is out of range."""
    for key, val in params.items():
        _param_of(fam, key, where, owner).check(val, label)


def _param_of(fam, key, where: str, owner: str) -> Param:
    try:
        return fam.param(key)
    except KeyError:
        raise LLAInputError(f"{where}: {owner} has no parameter {key!r} "
                            f"(has {[p.name for p in fam.params]})") from None


def parse_params(text: str, fam, spec: str, *, what: str, where: str, owner: str, label: str) -> dict:
    """The 'k=v,...' parameters ``text`` of ``fam`` in ``spec``, as floats: each a parameter of
    the family, given once, in ASCII digits and in its range, checked in the order given.
    ``what`` names an item ('parameter'); where, owner, label as in ``check_params``."""
    params = {}
    for key, val in _items(text, what, spec):
        p = _param_of(fam, key, where, owner)
        if not _NUMBER.fullmatch(val):
            raise LLAInputError(f"{where}: {what} {key}={val!r}: {label}'s {key} must be {p.range_text()} "
                                f"in ASCII digits")
        params[key] = float(val)
        p.check(params[key], label)
    return params


def parse_case(spec: str) -> Case:
    """Inverse of ``Case.spec``: 'family:p=v,...:B=1,H=1,S=16,D=16,dtype=float32,seed=0'.

    Strict: every parameter in its family's range, finite, given once, in ASCII digits;
    a mistyped spec is an LLAInputError naming the field, never a nearby case."""
    if not isinstance(spec, str):
        raise LLAInputError(f"case: expected a spec string, got {type(spec).__name__}")
    parts = spec.strip().split(":")
    if len(parts) != 3:
        raise LLAInputError(f"case: expected 'family:params:shape', got {spec!r}")
    name, ps, shape = parts
    fam = get_family(name)
    params = parse_params(ps, fam, spec, what="parameter", where="case", owner=f"family {name!r}", label=name)
    kw = {}
    for key, val in _items(shape, "shape field", spec):
        if key == "dtype":
            if val not in DTYPES:
                raise LLAInputError(f"case: dtype must be one of {list(DTYPES)}, got {val!r}")
            kw[key] = val
        elif key in SHAPE_FIELDS:
            want = f"an integer in [0, {SEED_MAX}]" if key == "seed" else "an integer >= 1"
            if not _INTEGER.fullmatch(val):
                raise LLAInputError(f"case: {key}={val!r}: expected {want} in ASCII digits")
            kw[key] = int(val)
        else:
            raise LLAInputError(f"case: unknown shape field {key!r} in {spec!r} (expected {', '.join(SHAPE_FIELDS)})")
    return Case(family=name, params=params, **kw)


# ------------------------------------------------------------------ generators
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _orthonormal(gen, D, r):
    a = _randn(gen, D, max(r, 1))
    qmat, _ = torch.linalg.qr(a)
    return qmat[:, :r]


def _default_scale(D):
    return 1.0 / math.sqrt(D)


def _gaussian(p, shape, gen):
    B, H, S, D = shape
    q, k, v = _randn(gen, B, H, S, D), _randn(gen, B, H, S, D), _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], p["scale_mult"] * _default_scale(D)


def _subspace(p, shape, gen):
    # Queries and keys on one r-dimensional affine subspace (plus tiny noise):
    # Sigma_i has D - r eigenvalues ~ omega_i (2 noise^2 + lambda), the rest O(omega_i).
    B, H, S, D = shape
    r = int(min(max(1, p["rank"]), max(1, D - 1)))
    U = _orthonormal(gen, D, r)
    base = _randn(gen, B, H, 1, D)
    q = base + _randn(gen, B, H, S, r) @ U.T + p["noise"] * _randn(gen, B, H, S, D)
    k = base + _randn(gen, B, H, S, r) @ U.T + p["noise"] * _randn(gen, B, H, S, D)
    v = _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], _default_scale(D)


def _clusters(p, shape, gen):
    B, H, S, D = shape
    n = int(p["clusters"])
    centers = _randn(gen, B, H, n, D) * 2.0
    idx = torch.randint(0, n, (B, H, S), generator=gen)
    pick = torch.gather(centers, 2, idx[..., None].expand(B, H, S, D))
    k = pick + p["spread"] * _randn(gen, B, H, S, D)
    q = k + p["spread"] * _randn(gen, B, H, S, D)
    v = _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], _default_scale(D)


def _duplicates(p, shape, gen):
    B, H, S, D = shape
    pool = int(max(1, min(p["pool"], S)))
    keys = _randn(gen, B, H, pool, D)
    idx = torch.randint(0, pool, (B, H, S), generator=gen)
    k = torch.gather(keys, 2, idx[..., None].expand(B, H, S, D))
    q = _randn(gen, B, H, S, D)
    v = _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], _default_scale(D)


def _bandwidth(p, shape, gen):
    B, H, S, D = shape
    q, k, v = _randn(gen, B, H, S, D), _randn(gen, B, H, S, D), _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], p["scale"]


def _early(p, shape, gen):
    # Tiny lambda: for i < D, Sigma_i has rank i + 1 < D, so kappa ~ 1/lambda and
    # delta_i ~ lambda; the 0/0 of lambda = 0 is one step away.
    B, H, S, D = shape
    q, k, v = _randn(gen, B, H, S, D), _randn(gen, B, H, S, D), _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], _default_scale(D)


def _offset(p, shape, gen):
    # A common offset of norm R on q and k: ||q|| >> ||k - q|| when R is large.
    # Scale divided by R so the scores stay O(1)-spread and the weights do not go one-hot.
    B, H, S, D = shape
    c = _randn(gen, 1, 1, 1, D)
    c = c / c.norm() * p["offset"]
    q, k, v = _randn(gen, B, H, S, D) + c, _randn(gen, B, H, S, D) + c, _randn(gen, B, H, S, D)
    return q, k, v, p["lam"], _default_scale(D) / max(1.0, p["offset"]) * p["scale_mult"]


def _large_norm(p, shape, gen):
    B, H, S, D = shape
    f = p["factor"]
    q, k, v = (f * _randn(gen, B, H, S, D) for _ in range(3))
    return q, k, v, p["lam"], _default_scale(D) / f


def _linear_values(p, shape, gen):
    # v_j = A k_j + b: LLA reproduces A q_i + b exactly at lambda = 0 once i >= D.
    B, H, S, D = shape
    q, k = _randn(gen, B, H, S, D), _randn(gen, B, H, S, D)
    A = _randn(gen, B, H, D, D) / math.sqrt(D)
    b = _randn(gen, B, H, 1, D)
    v = k @ A.transpose(-1, -2) + b
    return q, k, v, p["lam"], _default_scale(D)


def _lambda_decades(p, shape, gen):
    B, H, S, D = shape
    q, k, v = _randn(gen, B, H, S, D), _randn(gen, B, H, S, D), _randn(gen, B, H, S, D)
    lo, width = math.log10(p["lam_lo"]), p["decades"]
    lam = 10.0 ** (lo + width * _rand(gen, B, H, S))
    return q, k, v, lam, _default_scale(D)


def _spectrum(p, shape, gen):
    # Keys and queries with per-axis spread sigma_d = kappa^(-d / (2 (D-1))), so the
    # weighted scatter has eigenvalues spread over about kappa; lambda = lam_rel / kappa
    # keeps the ridge from hiding the spread. rotate=0 leaves the bad scaling on the
    # axes (where Jacobi helps); rotate=1 hides it behind a random rotation.
    B, H, S, D = shape
    kap = p["kappa"]
    expo = torch.arange(D, dtype=torch.float64) / max(D - 1, 1)
    sig = kap ** (-expo / 2.0)
    q = _randn(gen, B, H, S, D) * sig
    k = _randn(gen, B, H, S, D) * sig
    if p["rotate"] >= 0.5:
        R = _orthonormal(gen, D, D)
        q, k = q @ R.T, k @ R.T
    v = _randn(gen, B, H, S, D)
    return q, k, v, p["lam_rel"] / kap, p["scale_mult"] * _default_scale(D)


def _lam(lo=1e-3, hi=1e2, easy=1.0):
    return Param("lam", lo, hi, easy, doc="ridge strength lambda (relative to normalised weights)")


FAMILIES: dict[str, Family] = {}


def _register(f: Family):
    FAMILIES[f.name] = f


_register(Family("gaussian", "baseline: standard normal q, k, v", (_lam(), Param("scale_mult", 0.25, 4.0, 1.0)), _gaussian))
_register(Family(
    "subspace", "near-singular Sigma_i: q and k on a rank-r affine subspace; kappa(Sigma_i) >= 1e6 for most queries "
    "when noise <= 1e-4 and lambda <= 1e-8",
    (Param("rank", 1, 8, 2, log=False, integer=True,
           doc="rank of the subspace; min(rank, D - 1) is used, a rank-D subspace being no constraint"), Param("noise", 1e-8, 1e-1, 1e-1), _lam(1e-12, 1.0, 1.0)),
    _subspace,
))
_register(Family(
    "clusters", "near-singular Sigma_i from keys in a few tight clusters",
    (Param("clusters", 1, 4, 2, log=False, integer=True), Param("spread", 1e-6, 1.0, 1.0), _lam(1e-8, 1.0, 1.0)),
    _clusters,
))
_register(Family(
    "duplicates", "repeated keys: rank(scatter) <= pool size",
    (Param("pool", 1, 16, 8, log=False, integer=True, doc="distinct keys; min(pool, S) are used"), _lam(1e-6, 10.0, 1.0)), _duplicates,
))
_register(Family(
    "bandwidth", "extreme bandwidths: scale 0 (uniform weights exactly: the MesaNet form) and 1e-4 (nearly "
    "uniform) to 1e2 (one-hot, exp underflow)",
    (Param("scale", 1e-4, 1e2, 0.25, zero=True), _lam(1e-3, 10.0, 1.0)), _bandwidth,
))
_register(Family(
    "early", "early tokens with tiny lambda: kappa(Sigma_i) ~ 1/lambda for i < D",
    (_lam(1e-10, 1e-2, 1e-2),), _early,
))
_register(Family(
    "offset", "cancellation: a common offset of norm R on q and k (||q|| >> ||k - q||)",
    (Param("offset", 1.0, 1e4, 1.0), _lam(1e-3, 10.0, 1.0), Param("scale_mult", 0.25, 4.0, 1.0)), _offset,
))
_register(Family(
    "large_norm", "large norms: q, k, v scaled by a factor (scale divided by it)",
    (Param("factor", 1.0, 1e3, 1.0), _lam(1e-3, 10.0, 1.0)), _large_norm,
))
_register(Family(
    "linear_values", "values linear in keys: exact reproduction A q + b at lambda = 0 for i >= D",
    (_lam(1e-8, 1.0, 1e-8),), _linear_values,
))
_register(Family(
    "lambda_decades", "per-query lambda log-uniform over several decades",
    (Param("lam_lo", 1e-4, 1.0, 0.1), Param("decades", 0.0, 6.0, 1.0, log=False)), _lambda_decades,
    per_query_lambda=True, ridge="lam_lo",
))
_register(Family(
    "spectrum", "prescribed spread of Sigma_i's spectrum: kappa(Sigma_i) tracks the kappa parameter (1 to 1e8)",
    (Param("kappa", 1.0, 1e8, 2.0), Param("rotate", 0, 1, 1, log=False, integer=True),
     Param("lam_rel", 1e-3, 10.0, 1.0), Param("scale_mult", 0.25, 4.0, 1.0)), _spectrum, ridge="lam_rel",
))


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise LLAInputError(f"family: unknown {name!r}; expected one of {list(FAMILIES)}")
    return FAMILIES[name]
