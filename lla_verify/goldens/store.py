"""Golden outputs: a named catalog of LLA cases with their oracle outputs on disk.

Each golden is a ``Case`` of ``cases.py`` (family, params, shape, dtype, seed),
optionally with a *variant* that turns it into an identity of SPEC 3 the families
do not produce on their own (``v=const``: every value row equal to the first one;
``lam=0``: no ridge at all). Inputs are rebuilt from that spec, so a golden can be
regenerated anywhere; the stored file pins what the oracle said about them:

    inputs   q, k, v (in the case's dtype, exactly as rounded), lam (float32)
    forward  o, omega, delta, rho, kappa, undefined      (float64 oracle, details)
    reverse  do (the fixed cotangent), dq, dk, dv, dlambda (float64 autograd)
    mp       o_mp: o from the mpmath oracle at MP_DPS digits (small goldens only)

``goldens/MANIFEST.json`` holds, per golden, its spec, parameters, file and the
sha256 of every array; docs/goldens.md describes the format and when to regenerate.

Commands (``lla-verify goldens ...``):

    regen [--dir D] [--force] [--check] [--only NAME...]
    compare --impl NAME [--device DEV] [--dir D] [--only NAME...]
    clean [--dir D]         delete the temporary files of an interrupted regen
    list

Exit status: 0 clean, 1 a check failed (or regen refused), 2 usage error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lla_verify.registry.cases import DTYPE_NAMES, DTYPES, Case, Problem, get_family, parse_case
from lla_verify.cliutil import atomic_write as _atomic_write  # temp file ".NAME.*.tmp" beside NAME, then a rename
from lla_contract import LLAInputError

FORMAT = "lla-verify-goldens/1"
MANIFEST = "MANIFEST.json"
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
# the repository's goldens/ (an editable install or a checkout); a plain install has
# none beside the package, and then the folder is looked for in the working directory
_REPO_GOLDENS = Path(__file__).resolve().parents[2] / "goldens"
DEFAULT_DIR = _REPO_GOLDENS if _REPO_GOLDENS.is_dir() else Path("goldens")

INPUTS = ("q", "k", "v", "lam")
FORWARD = ("o", "omega", "delta", "rho", "kappa", "undefined")
REVERSE = ("do", "dq", "dk", "dv", "dlambda")
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


def _g(name, family, params, S, D, dtype="float32", *, B=1, H=1, seed=0, variant="", why=""):
    mp = S <= MP_MAX_S and D <= MP_MAX_D
    return Golden(name, Case(family, dict(params), B, H, S, D, dtype, seed), variant, mp, why)


CATALOG: tuple[Golden, ...] = (
    # small: S <= 16, D <= 8, the mpmath oracle at 50 digits is the reference
    _g("gaussian-f32-S16-D4-H2", "gaussian", {}, 16, 4, H=2, seed=1, why="baseline; heads independent"),
    _g("first-token-f32-S1-D4", "gaussian", {}, 1, 4, B=2, seed=2, why="o_0 = v_0 when lambda > 0"),
    _g("softmax-limit-lam100-f32-S16-D4", "gaussian", {"lam": 100.0}, 16, 4, seed=3,
       why="lambda -> inf: causal softmax attention, O(1/lambda)"),
    _g("tiny-scale1e-4-f32-S16-D4", "bandwidth", {"scale": 1e-4}, 16, 4, seed=4,
       why="s -> 0: uniform weights, the MesaNet limit"),
    _g("zero-scale-f32-S16-D4", "bandwidth", {"scale": 0.0}, 16, 4, seed=33,
       why="s = 0: uniform weights exactly; LLA is the MesaNet form (an identity, not a limit)"),
    _g("large-scale1e2-bf16-S16-D4", "bandwidth", {"scale": 100.0}, 16, 4, "bfloat16", seed=5,
       why="s -> inf: hard attention, exp underflow of all but one key"),
    _g("const-values-f16-S16-D4", "gaussian", {}, 16, 4, "float16", seed=6, variant="v=const",
       why="partition of unity: constant values reproduced exactly"),
    _g("linear-values-lam0-f32-S16-D4", "linear_values", {}, 16, 4, seed=7, variant="lam=0",
       why="values linear in keys at lambda 0, S > D: o_i = A q_i + b for i >= D; early tokens 0/0"),
    _g("linear-values-lam1e-8-bf16-S12-D4", "linear_values", {"lam": 1e-8}, 12, 4, "bfloat16", seed=8,
       why="values linear in keys, tiny lambda"),
    _g("subspace-noise1e-6-lam1e-10-f32-S16-D4", "subspace", {"rank": 1, "noise": 1e-6, "lam": 1e-10}, 16, 4, seed=9,
       why="near-singular Sigma_i; float64 loses digits, mpmath does not"),
    _g("early-lam1e-10-f16-S8-D8", "early", {"lam": 1e-10}, 8, 8, "float16", seed=10,
       why="every token early (i < D) with tiny lambda: kappa ~ 1/lambda"),
    _g("offset1e3-f32-S16-D4", "offset", {"offset": 1e3}, 16, 4, seed=11, why="cancellation: ||q|| >> ||k - q||"),
    _g("clusters-spread1e-4-bf16-S16-D4", "clusters", {"clusters": 2, "spread": 1e-4}, 16, 4, "bfloat16", seed=12,
       why="keys in tight clusters"),
    _g("duplicates-pool2-f16-S16-D4", "duplicates", {"pool": 2}, 16, 4, "float16", seed=13,
       why="repeated keys: rank(scatter) <= 2"),
    _g("large-norm1e2-bf16-S16-D4", "large_norm", {"factor": 100.0}, 16, 4, "bfloat16", seed=14,
       why="large norms"),
    _g("lambda-decades-perquery-f32-S16-D4", "lambda_decades", {"lam_lo": 1e-4, "decades": 5.0}, 16, 4, seed=15,
       why="per-query lambda over five decades"),
    _g("spectrum-kappa1e6-bf16-S16-D8", "spectrum", {"kappa": 1e6}, 16, 8, "bfloat16", seed=16,
       why="prescribed spectrum spread"),
    # medium: S up to 512, D up to 64, the float64 oracle is the reference
    _g("gaussian-f32-S512-D16", "gaussian", {}, 512, 16, seed=21, why="baseline at length"),
    _g("spectrum-kappa1e8-bf16-S129-D32", "spectrum", {"kappa": 1e8}, 129, 32, "bfloat16", seed=22,
       why="kappa(Sigma_i) ~ 1e9; S not a multiple of any tile"),
    _g("subspace-noise1e-4-bf16-S33-D16", "subspace", {"rank": 2, "noise": 1e-4, "lam": 1e-8}, 33, 16, "bfloat16",
       seed=23, why="near-singular Sigma_i in bf16"),
    _g("lambda-decades-f16-S96-D64", "lambda_decades", {"lam_lo": 1e-4, "decades": 6.0}, 96, 64, "float16", seed=24,
       why="per-query lambda over six decades, D = 64"),
    _g("offset1e4-f32-S127-D32", "offset", {"offset": 1e4}, 127, 32, seed=25, why="cancellation at 1e4"),
    _g("bandwidth-scale10-bf16-S96-D16", "bandwidth", {"scale": 10.0}, 96, 16, "bfloat16", seed=26,
       why="near one-hot weights"),
    _g("clusters-spread1e-3-f16-S100-D32", "clusters", {"clusters": 3, "spread": 1e-3}, 100, 32, "float16", seed=27,
       why="tight clusters, D = 32"),
    _g("early-lam1e-8-bf16-S72-D64", "early", {"lam": 1e-8}, 72, 64, "bfloat16", seed=28,
       why="early tokens (i < 64) with tiny lambda, D = 64"),
    _g("linear-values-lam0-f32-S100-D16", "linear_values", {}, 100, 16, seed=29, variant="lam=0",
       why="exact reproduction A q + b at lambda 0 for i >= D"),
    _g("duplicates-pool4-f32-S64-D16", "duplicates", {"pool": 4}, 64, 16, seed=30, why="repeated keys at length"),
    _g("large-norm1e3-f16-S64-D32", "large_norm", {"factor": 1e3}, 64, 32, "float16", seed=31,
       why="large norms near the float16 range"),
    _g("const-values-bf16-S200-D16", "gaussian", {"lam": 0.01}, 200, 16, "bfloat16", seed=32, variant="v=const",
       why="partition of unity at length, small lambda"),
)
_BY_NAME = {g.name: g for g in CATALOG}


def get_golden(name: str) -> Golden:
    if name not in _BY_NAME:
        raise LLAInputError(f"--only: unknown golden {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


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


# ------------------------------------------------------------------ hashing, I/O
def array_hash(t: torch.Tensor) -> str:
    """sha256 of '<dtype>|<shape>|' followed by the array's raw little-endian bytes."""
    t = t.detach().cpu().contiguous()
    head = f"{DTYPE_NAMES.get(t.dtype, str(t.dtype).replace('torch.', ''))}|{list(t.shape)}|".encode()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(head + raw).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


# '.<target file>.<mkstemp's random part>.tmp': what _atomic_write (cliutil.atomic_write)
# leaves behind when the process dies between creating and renaming its temporary file;
# 'goldens clean' relies on that name
TEMP_RE = re.compile(r"\.(?P<target>[^/\\]+" + re.escape(SUFFIX) + "|" + re.escape(MANIFEST)
                     + r")\.[A-Za-z0-9_]+\.tmp")


def encode(golden: Golden, arrays: dict) -> bytes:
    from safetensors.torch import save

    # one metadata key: safetensors keeps metadata in a hash map, so several keys
    # come out in a different order on every call and the bytes would not repeat
    info = json.dumps({"format": FORMAT, "name": golden.name, "spec": golden.spec}, sort_keys=True)
    return save(arrays, metadata={"golden": info})


def read_arrays(path: Path) -> dict:
    """The arrays of one golden file; raises ValueError when it cannot be parsed."""
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"cannot parse {path.name}: {exc}") from None


def read_embedded(path: Path) -> dict:
    """The ``golden`` metadata a file carries (format, name, spec); ValueError when absent or bad."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"cannot parse {path.name}: {exc}") from None
    if "golden" not in meta:
        raise ValueError(f"{path.name} carries no 'golden' metadata (format, name, spec)")
    try:
        info = json.loads(meta["golden"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: its 'golden' metadata is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path.name}: its 'golden' metadata is not a JSON object")
    return info


def embedded_mismatch(path: Path, entry: dict) -> list[str]:
    """Where the metadata stored inside a golden's file disagrees with its manifest entry.

    The hashes cover the arrays only; the name and spec a file states about itself are
    covered by this comparison, so an edit of either side is caught, and a manifest that
    points one golden at another's file (same arrays, same hashes) is caught too.
    """
    try:
        info = read_embedded(path)
    except ValueError as exc:
        return [str(exc)]
    label = entry.get("name")
    out = []
    if info.get("format") != FORMAT:
        out.append(f"format stored in {path.name} {info.get('format')!r} != {FORMAT!r}")
    for key in ("name", "spec"):
        if info.get(key) != entry.get(key):
            out.append(f"{key} stored in {path.name} {info.get(key)!r} != {key} of manifest entry {label!r} "
                       f"{entry.get(key)!r} (one of them was edited after regen)")
    return out


def is_temp_file(name: str) -> bool:
    """True for the temporary file name of an interrupted ``_atomic_write`` (see TEMP_RE)."""
    return TEMP_RE.fullmatch(name) is not None


def entry_path(folder: Path, entry: dict) -> Path:
    """The file of a manifest entry, confined to ``folder``; ValueError naming the entry otherwise.

    A manifest is data that may come from anywhere (a pull request, a download): its
    'file' must name a file directly inside the goldens folder, so check and compare
    never read anything outside it (an absolute path, '..', a subfolder, or a symlink
    whose target lies outside are refused).
    """
    label = f"manifest entry {entry.get('name')!r}"
    f = entry.get("file")
    if not isinstance(f, str) or not f:
        raise ValueError(f"{label}: 'file' must be a file name, got {f!r}")
    if f in (".", "..") or "\\" in f or "\0" in f or os.path.isabs(f) or Path(f).name != f:
        raise ValueError(f"{label}: 'file' {f!r} is not a plain file name inside the goldens folder {folder} "
                         "(absolute paths, subfolders and '..' are refused)")
    path = folder / f
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ValueError(f"{label}: 'file' {f!r} cannot be resolved ({exc})") from None
    if not target.is_relative_to(folder.resolve()):
        raise ValueError(f"{label}: 'file' {f!r} is a symlink to {target}, outside the goldens folder {folder}")
    return path


def versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("lla-verify", "torch", "numpy", "mpmath", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def manifest_entry(golden: Golden, arrays: dict) -> dict:
    fam = get_family(golden.case.family)
    resolved = fam.easy()
    for key, val in golden.case.params.items():
        resolved[key] = fam.param(key).clip(val)
    c = golden.case
    entry = {
        "name": golden.name,
        "spec": golden.spec,
        "family": c.family,
        "params": dict(sorted(c.params.items())),
        "resolved_params": dict(sorted(resolved.items())),
        "variant": golden.variant,
        "shape": {"B": c.B, "H": c.H, "S": c.S, "D": c.D},
        "dtype": c.dtype,
        "seed": c.seed,
        "cotangent_seed": c.seed + COTANGENT_SEED_OFFSET,
        "why": golden.why,
        "file": golden.file,
        "oracle": golden.oracle,
        "kappa_max": _finite_max(arrays["kappa"], arrays["undefined"]),
        "conditioning": conditioning(arrays),
        "n_undefined": int(arrays["undefined"].sum()),
        "arrays": {key: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": array_hash(t)}
                   for key, t in sorted(arrays.items())},
    }
    if "o_mp" in arrays:
        entry["f64_vs_mp_max_abs"] = _finite_max((arrays["o"] - arrays["o_mp"]).abs(), None)
    return entry


def _finite_max(t: torch.Tensor, undefined) -> float:
    t = t.to(torch.float64)
    if undefined is not None:
        t = torch.where(undefined.reshape(undefined.shape + (1,) * (t.dim() - undefined.dim())), 0.0, t)
    t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    return float(t.max()) if t.numel() else 0.0


def load_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("cases"), list):
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    for n, e in enumerate(man["cases"]):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ValueError(f"{path}: cases[{n}] is not an object with a string 'name'")
    return man


def _manifest_hashes(entry: dict) -> dict:
    """array name -> sha256 string from a manifest entry (a malformed table reads as empty)."""
    arrays = entry.get("arrays")
    if not isinstance(arrays, dict):
        return {}
    return {k: h.get("sha256") for k, h in arrays.items() if isinstance(h, dict)}


def dump_manifest(man: dict) -> bytes:
    text = json.dumps(man, indent=1, sort_keys=True, allow_nan=True)
    # one line per shape: a manifest a person reads in review
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)?\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in (m.group(1) or "").split(",") if x.strip()) + "]", text)
    return (text + "\n").encode()


# ------------------------------------------------------------------ comparing
@dataclass
class Drift:
    """Stored vs recomputed arrays of one golden."""

    max_rel: float  # worst elementwise relative difference (inf: NaN pattern or input change)
    where: str  # 'array[index]' of the worst difference, '' when bitwise
    tol: float  # float64 noise allowed for this golden
    bitwise: bool
    inputs_changed: list

    @property
    def kind(self) -> str:
        if self.bitwise:
            return "bitwise"
        if self.inputs_changed:
            return "inputs changed"
        return "drift within float64 noise" if self.max_rel <= self.tol else "drift"

    @property
    def ok(self) -> bool:
        return self.kind in ("bitwise", "drift within float64 noise")

    def __str__(self) -> str:
        if self.bitwise:
            return "bitwise identical"
        txt = f"{self.kind}: max rel {self.max_rel:.3g} at {self.where} (float64 noise tol {self.tol:.3g})"
        if self.inputs_changed:
            txt += f"; the case no longer rebuilds the stored inputs {self.inputs_changed}"
        return txt


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple]:
    """Worst |a - b| / max(|b|, rms(b)) with its index; a NaN/inf pattern change is inf."""
    if a.shape != b.shape:
        return math.inf, ()
    if a.dtype == torch.bool or b.dtype == torch.bool:
        diff = (a != b).to(torch.float64) * math.inf
    else:
        a, b = a.to(torch.float64), b.to(torch.float64)
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        fin = torch.isfinite(a) & torch.isfinite(b)
        bf = torch.where(fin, b, torch.zeros_like(b))
        rms = float(bf.square().mean().sqrt()) if bf.numel() else 0.0
        scale = bf.abs().clamp_min(max(rms, torch.finfo(torch.float64).tiny))
        diff = torch.where(fin, (a - b).abs() / scale, torch.full_like(a, math.inf))
        diff = torch.where(same, torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(torch.argmax(diff.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return float(diff.reshape(-1)[flat]), idx


def drift(stored: dict, fresh: dict) -> Drift:
    """Compare stored arrays with recomputed ones (both dicts of tensors)."""
    tol = noise_tol(fresh)
    worst, where = 0.0, ""
    bitwise = True
    inputs_changed = []
    for key in sorted(set(stored) | set(fresh)):
        if key not in stored or key not in fresh:
            bitwise = False
            worst, where = math.inf, f"{key} (only in the {'stored' if key in stored else 'recomputed'} set)"
            continue
        a, b = stored[key], fresh[key]
        if a.dtype == b.dtype and a.shape == b.shape and array_hash(a) == array_hash(b):
            continue
        bitwise = False
        if key in INPUTS:
            inputs_changed.append(key)
        rel, idx = _rel_diff(a, b)
        if key in INPUTS and rel == 0.0:
            rel = math.inf  # an input must rebuild bit for bit (e.g. -0.0 vs 0.0, dtype)
        if rel > worst or not where:
            worst, where = rel, f"{key}[{','.join(map(str, idx))}]"
    return Drift(worst, where if not bitwise else "", tol, bitwise, inputs_changed)


# ------------------------------------------------------------------ regen / check
def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _progress(items, desc):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, quiet in CI logs
    return tqdm(items, desc=desc, unit="case", disable=None, file=sys.stderr, leave=False)


def _compute_all(goldens):
    """name -> arrays, or name -> the error that kept it from being recomputed."""
    out = {}
    for g in _progress(goldens, "goldens"):
        try:
            out[g.name] = compute(g)
        except Exception as exc:  # one broken golden must not hide the report on the others
            out[g.name] = exc
    return out


def check(folder: Path, only=None) -> int:
    """``regen --check``: recompute in memory and compare with what is on disk."""
    goldens = select(only)
    try:
        man = load_manifest(folder)
    except ValueError as exc:
        _say(f"FAIL manifest: {exc}")
        return 1
    if man is None:
        _say(f"FAIL manifest: no {MANIFEST} in {folder} (run 'lla-verify goldens regen --dir {folder}')")
        return 1
    entries = {e.get("name"): e for e in man["cases"]}
    problems = 0
    noise_only = 0
    here = versions()
    made = man.get("versions", {})
    diffs = {k: (made.get(k), here[k]) for k in here if made.get(k) != here[k]}
    if diffs:
        _say("note: manifest made with " + ", ".join(f"{k} {a}" for k, (a, b) in diffs.items())
             + "; running " + ", ".join(f"{k} {b}" for k, (a, b) in diffs.items()))
    fresh_all = _compute_all(goldens)
    for g in goldens:
        fresh = fresh_all[g.name]
        e = entries.get(g.name)
        lines = []
        if isinstance(fresh, Exception):
            problems += 1
            _say(f"FAIL {g.name}: cannot recompute: {type(fresh).__name__}: {fresh}")
            continue
        if e is None:
            lines.append(f"missing from the manifest (expected file {g.file})")
        else:
            if e.get("spec") != g.spec:
                lines.append(f"spec in manifest {e.get('spec')!r} != catalog {g.spec!r} (catalog changed without regen)")
            if e.get("file") != g.file:
                lines.append(f"file in manifest {e.get('file')!r} != catalog {g.file!r}")
            hashes = _manifest_hashes(e)
            try:
                path = entry_path(folder, e)
            except ValueError as exc:
                path = None
                lines.append(str(exc))
            if path is not None and not path.exists():
                lines.append(f"missing file {path.name}")
            elif path is not None:
                try:
                    stored = read_arrays(path)
                except ValueError as exc:
                    stored = None
                    lines.append(f"corrupt file: {exc}")
                else:
                    lines.extend(embedded_mismatch(path, e))
                if stored is not None:
                    for key in sorted(set(hashes) | set(stored)):
                        if key not in stored:
                            lines.append(f"array {key} missing from {path.name}")
                        elif key not in hashes:
                            lines.append(f"extra array {key} in {path.name} (not in the manifest)")
                        elif array_hash(stored[key]) != hashes[key]:
                            lines.append(f"hash mismatch in array {key} of {path.name}: the file was altered or "
                                         f"corrupted after regen (sha256 {array_hash(stored[key])[:12]} != manifest "
                                         f"{str(hashes[key])[:12]})")
                    dr = drift(stored, fresh)
                    if not dr.ok:
                        lines.append(str(dr))
                    elif not dr.bitwise:
                        noise_only += 1
                        _say(f"ok   {g.name}: {dr}")
                else:
                    for key, t in sorted(fresh.items()):
                        if hashes.get(key) != array_hash(t):
                            lines.append(f"recomputed {key} does not match the manifest hash")
        if lines:
            problems += 1
            for ln in lines:
                _say(f"FAIL {g.name}: {ln}")
    # entries and files nobody in the catalog claims (checked with --only too: cheap)
    names = {g.name for g in goldens}
    for name in entries:
        if name not in _BY_NAME:
            problems += 1
            _say(f"FAIL {name}: extra manifest entry (no such golden in the catalog)")
    known = {e.get("file") for e in man["cases"] if e.get("name") in _BY_NAME} | {MANIFEST}
    for path in sorted(folder.iterdir()):
        if path.name in known:
            continue
        problems += 1
        if is_temp_file(path.name):
            _say(f"FAIL leftover temporary file {path.name} in {folder}: a temporary file of an interrupted regen "
                 f"(not a golden); remove it with '{clean_command(folder)}'")
        else:
            _say(f"FAIL extra file {path.name} in {folder} (not in the manifest)")
    n = len(names)
    tail = f" ({noise_only} within float64 noise)" if noise_only else ""
    if problems:
        _say(f"goldens check: {problems} problem(s) over {n} golden(s){tail}")
        return 1
    _say(f"goldens check: {n} golden(s) reproduce{tail}, hashes match")
    return 0


def regen(folder: Path, *, force: bool = False, only=None) -> int:
    """Recompute and write; refuse to change stored values without ``force``."""
    goldens = select(only)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        man = load_manifest(folder)
    except ValueError as exc:
        if not force:
            _say(f"refusing: {exc}; rerun with --force to rebuild it")
            return 1
        man = None
    old = {e.get("name"): e for e in (man or {}).get("cases", [])}
    fresh_all = _compute_all(goldens)
    broken = [(n, e) for n, e in fresh_all.items() if isinstance(e, Exception)]
    if broken:
        for name, exc in broken:
            _say(f"FAIL {name}: cannot recompute: {type(exc).__name__}: {exc}")
        _say("regen: nothing written")
        return 1
    to_write, refused, reports = [], [], []
    for g in goldens:
        fresh = fresh_all[g.name]
        path = folder / g.file
        prev = old.get(g.name)
        try:
            entry_path(folder, {"name": g.name, "file": g.file})
        except ValueError as exc:
            # never read through a link that leaves the folder; os.replace swaps the link itself
            if force:
                to_write.append(g)
                reports.append(f"{g.name}: {exc} (replaced by the golden, --force)")
            else:
                refused.append(f"{g.name}: {exc}")
            continue
        if not path.exists():
            to_write.append(g)
            if prev is not None:
                reports.append(f"{g.name}: file was missing, written")
            continue
        try:
            stored = read_arrays(path)
        except ValueError as exc:
            stored, dr_txt = None, f"unreadable ({exc})"
        if stored is not None:
            dr = drift(stored, fresh)
            dr_txt = str(dr)
            if dr.bitwise:
                # values identical: rewrite only if the file's bytes (metadata) differ;
                # the manifest entry is refreshed below, and written only if it moved
                if path.read_bytes() != encode(g, fresh):
                    to_write.append(g)
                    moved = embedded_mismatch(path, {"name": g.name, "spec": g.spec})
                    if moved:
                        reports.append(f"{g.name}: arrays bitwise identical, metadata rewritten ({'; '.join(moved)})")
                continue
        if force:
            to_write.append(g)
            reports.append(f"{g.name}: {dr_txt} (overwritten, --force)")
        else:
            refused.append(f"{g.name}: {dr_txt}")
    if refused:
        for ln in refused:
            _say(f"REFUSED {ln}")
        _say(f"regen: {len(refused)} golden(s) would change; nothing written. Run 'lla-verify goldens regen --check' "
             "to read the drift, then 'regen --force' if the change is intended (see docs/goldens.md).")
        return 1
    for ln in reports:
        _say(ln)
    for g in to_write:
        _atomic_write(folder / g.file, encode(g, fresh_all[g.name]))
    entries = dict(old)
    for g in goldens:
        entries[g.name] = manifest_entry(g, fresh_all[g.name])
    order = [g.name for g in CATALOG if g.name in entries] + sorted(n for n in entries if n not in _BY_NAME)
    new = {
        "format": FORMAT,
        "hash": "sha256 of '<dtype>|<shape as a JSON list>|' followed by the raw little-endian bytes",
        "noise_tol": f"{NOISE_FACTOR:g} * 2^-53 * conditioning (max over defined queries of max(kappa, omega / delta))",
        "cotangent": "do = randn(o.shape, float64, torch.Generator().manual_seed(seed + "
                     f"{COTANGENT_SEED_OFFSET})), zero on undefined rows",
        "cases": [entries[n] for n in order],
    }
    # date and versions move only with the content: an idle regen leaves the bytes alone
    same = man is not None and all(man.get(key) == val for key, val in new.items())
    wrote_manifest = bool(to_write) or not same
    if wrote_manifest:
        new["created"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        new["versions"] = versions()
        _atomic_write(folder / MANIFEST, dump_manifest(new))
    claimed = {e.get("file") for e in entries.values()} | {MANIFEST}
    for path in sorted(folder.iterdir()):
        if is_temp_file(path.name):
            _say(f"note: leftover temporary file {path.name} in {folder}: a temporary file of an interrupted regen "
                 f"(left alone; remove it with '{clean_command(folder)}')")
        elif path.name not in claimed and not path.name.startswith("."):
            _say(f"note: extra file {path.name} in {folder} (not in the manifest; left alone)")
    tail = ", manifest updated" if wrote_manifest else ""
    _say(f"regen: {len(to_write)} written, {len(goldens) - len(to_write)} unchanged{tail}, in {folder}")
    return 0


def clean_command(folder: Path) -> str:
    cmd = "lla-verify goldens clean"
    return cmd if Path(folder).resolve() == DEFAULT_DIR.resolve() else f"{cmd} --dir {folder}"


def temp_files(folder: Path) -> list[Path]:
    """The leftovers of interrupted regens in ``folder``: regular files (not links) matching TEMP_RE."""
    import stat

    out = []
    for path in sorted(folder.iterdir()):
        if is_temp_file(path.name) and stat.S_ISREG(path.lstat().st_mode):
            out.append(path)
    return out


def clean(folder: Path) -> int:
    """``goldens clean``: delete the temporary files interrupted regens left in ``folder``.

    Only regular files whose name matches TEMP_RE ('.<golden or MANIFEST.json>.<random>.tmp',
    what _atomic_write creates) are touched; goldens, the manifest, other files, links and
    folders are left alone. A regen running at the same time would lose its temporary file,
    so run it when none is.
    """
    removed = 0
    for path in temp_files(folder):
        path.unlink()
        removed += 1
        _say(f"removed {path.name} (temporary file of an interrupted regen)")
    _say(f"goldens clean: {removed} temporary file(s) removed from {folder}")
    return 0


# ------------------------------------------------------------------ compare
@dataclass
class CaseResult:
    name: str
    checks: dict  # check name -> ratio (error / allowed; > 1 fails)
    skipped: str | None = None
    notes: str = ""
    detail: str = ""  # the failing verdict's message, printed under the case line

    @property
    def worst(self) -> tuple[str, float]:
        if not self.checks:
            return "", 0.0
        key = max(self.checks, key=lambda k: (math.isnan(self.checks[k]), self.checks[k]))
        return key, self.checks[key]


def _stored_ratio(o: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, undefined: torch.Tensor) -> float:
    defined = ~undefined & torch.isfinite(ref).all(-1)
    err = (o.to(torch.float64) - ref).norm(dim=-1)
    r = torch.where(defined, err / allowed, torch.zeros_like(err))
    r = torch.where(defined & ~torch.isfinite(o).all(-1), torch.full_like(r, math.inf), r)
    return float(r.max()) if r.numel() else 0.0


def _rounded_by(impl, problem: Problem) -> str:
    """Which inputs the implementation's declared rounding changes on ``problem`` ('' if none)."""
    from lla_verify.budget import kernel_view

    seen = kernel_view(problem, impl)
    names = [n for n in ("q", "k", "v") if not torch.equal(getattr(seen, n).to(torch.float64),
                                                         getattr(problem, n).to(torch.float64))]
    if not torch.equal(seen.lam_tensor, problem.lam_tensor):
        names.append("lambda")
    return ", ".join(names)


def compare_one(golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    from lla_verify.budget import check_forward, forward_budget
    from lla_verify.registry.impls import is_available

    dt = DTYPES[golden.case.dtype]
    reason = impl.supports(dtype=dt, head_dim=golden.case.D) or is_available(impl, device)
    rebuilt = build_problem(golden)
    if not reason and isinstance(rebuilt.ridge_lambda, torch.Tensor) and not impl.per_query_lambda:
        reason = f"{impl.name} has no per-query lambda"
    if reason:
        return CaseResult(golden.name, {}, skipped=reason)
    if entry is None:
        return CaseResult(golden.name, {"golden": math.inf}, notes=f"not in the manifest of {folder}")
    try:
        path = entry_path(folder, entry)
        stored = read_arrays(path)
    except (ValueError, FileNotFoundError) as exc:
        return CaseResult(golden.name, {"golden": math.inf}, notes=str(exc))
    hashes = _manifest_hashes(entry)
    bad = [k for k, h in hashes.items() if k not in stored or array_hash(stored[k]) != h]
    if bad or not hashes:
        return CaseResult(golden.name, {"golden": math.inf}, notes=f"hash mismatch in {bad}: the file is altered"
                          if bad else f"manifest entry {golden.name!r} has no array hashes")
    mismatch = embedded_mismatch(path, entry)
    if entry.get("spec") != golden.spec:
        mismatch.append(f"spec in manifest {entry.get('spec')!r} != catalog {golden.spec!r}")
    if mismatch:
        return CaseResult(golden.name, {"golden": math.inf}, notes="; ".join(mismatch))
    changed = [k for k in ("q", "k", "v") if array_hash(getattr(rebuilt, k)) != array_hash(stored[k])]
    if changed:
        return CaseResult(golden.name, {"golden": math.inf},
                          notes=f"the spec no longer rebuilds the stored inputs {changed}")
    problem = problem_from_arrays(golden, stored, rebuilt.qk_scale)
    with deterministic():
        from lla_verify.trust import Misbehaved, call_forward

        on = problem.to(device)
        try:
            o, _ = call_forward(impl, on.q, on.k, on.v, ridge_lambda=on.ridge_lambda, qk_scale=problem.qk_scale)
        except Misbehaved as exc:  # a breach of the calling contract fails the golden, whatever came back
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")
        except Exception as exc:  # an implementation crash is a failed check, reported with its reason
            return CaseResult(golden.name, {"forward": math.inf}, notes=f"{type(exc).__name__}: {exc}")
        o = o.cpu()
        fb = forward_budget(problem, impl, dense=True, out_dtype=o.dtype)
        verdict = check_forward(problem, impl, o, fb=fb)
    # the oracle of today against the stored oracle: the golden still means what it says
    fresh_o, rounded = fb.details.o, _rounded_by(impl, problem)
    if rounded:  # fb's oracle is of the inputs the implementation rounded (budget.kernel_view)
        from lla_verify.oracles.float64 import lla_forward_details

        fresh_o = lla_forward_details(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                                      qk_scale=problem.qk_scale).o
    rel, idx = _rel_diff(stored["o"], fresh_o)
    tol = noise_tol(stored)
    checks = {"oracle": rel / tol if rel > 0 else 0.0, "forward": verdict.ratio}
    ref_key = "o_mp" if "o_mp" in stored else "o"
    if rounded:
        pass  # the stored reference is of other inputs than those computed from: "forward" judges
    elif o.shape == stored[ref_key].shape:
        checks["stored"] = _stored_ratio(o, stored[ref_key], fb.allowed, stored["undefined"])
    else:
        checks["stored"] = math.inf
    notes = f"stored ref {'mp' + str(MP_DPS) if ref_key == 'o_mp' else 'f64'}"
    if rel > 0:
        notes += f"; oracle drift {rel:.2g} at o[{','.join(map(str, idx))}]"
    if rounded:
        notes += f"; {impl.name} rounds these inputs ({rounded}): judged against the oracle of the rounded ones"
    detail = "" if verdict.passed else "\n".join("    " + ln for ln in verdict.message.splitlines())
    return CaseResult(golden.name, checks, notes=notes, detail=detail)


def _compare_one_isolated(worker, golden: Golden, folder: Path, entry: dict | None, impl, device: str) -> CaseResult:
    from lla_verify.trust import ChildFailed, run_isolated

    try:
        return run_isolated(worker, compare_one, golden, folder, entry, impl, device)
    except ChildFailed as exc:  # the implementation ended or hung its process: this golden fails
        return CaseResult(golden.name, {"forward": math.inf}, notes=f"[{impl.name}] {exc}")


def compare(folder: Path, impl, *, device: str = "cpu", only=None, isolate: bool = True,
            timeout: float | None = None) -> tuple[int, list[CaseResult]]:
    """Every selected golden through ``impl``; with ``isolate`` each in a child process
    (trust.Worker), so an implementation that exits or hangs fails its golden only."""
    from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

    goldens = select(only)
    man = load_manifest(folder)
    if man is None:
        raise FileNotFoundError(f"--dir: no {MANIFEST} in {folder}")
    entries = {e.get("name"): e for e in man["cases"]}
    width = max(len(g.name) for g in goldens)
    worker = (Worker(timeout if timeout is not None else DEFAULT_CALL_TIMEOUT)
              if isolate and picklable(impl) else None)
    try:
        results = _compare_all(worker, goldens, folder, entries, impl, device, width)
    finally:
        if worker is not None:
            worker.close()
    return _compare_summary(results)


def _compare_all(worker, goldens, folder, entries, impl, device, width) -> list[CaseResult]:
    results = []
    for g in goldens:
        r = _compare_one_isolated(worker, g, folder, entries.get(g.name), impl, device)
        results.append(r)
        if r.skipped:
            _say(f"{g.name:<{width}}  SKIP  {r.skipped}")
            continue
        key, worst = r.worst
        status = "PASS" if worst <= 1.0 else "FAIL"
        ratios = "  ".join(f"{k} {v:.3g}" for k, v in r.checks.items())
        _say(f"{g.name:<{width}}  {status}  ratio {worst:.3g}  ({ratios}; {r.notes})")
        if r.detail:
            _say(r.detail)
    return results


def _compare_summary(results: list[CaseResult]) -> tuple[int, list[CaseResult]]:
    n = sum(len(r.checks) for r in results)
    over = sum(1 for r in results for v in r.checks.values() if not v <= 1.0)
    ran = [r for r in results if not r.skipped]
    skipped = len(results) - len(ran)
    if ran:
        w = max(ran, key=lambda r: (math.isnan(r.worst[1]), r.worst[1]))
        tail = f", worst ratio {w.worst[1]:.3g} at {w.name} ({w.worst[0]})"
    else:
        tail = ""
    skip_txt = f" ({skipped} golden(s) skipped)" if skipped else ""
    _say(f"{over} of {n} checks over threshold{tail}{skip_txt}")
    return (1 if over else 0), results


# ------------------------------------------------------------------ CLI
def _usage(msg: str) -> int:
    from lla_verify.cliutil import one_line

    print(f"lla-verify goldens: error: {one_line(msg)}", file=sys.stderr)
    return 2


def _run_regen(args) -> int:
    folder = Path(args.dir)
    try:
        select(args.only)
    except LLAInputError as exc:
        return _usage(str(exc))
    if args.check and args.force:
        return _usage("--check and --force: --check writes nothing, drop one of them")
    if folder.exists() and not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    if args.check:
        if not folder.is_dir():
            return _usage(f"--dir: {folder} does not exist")
        return check(folder, args.only)
    from lla_verify.cliutil import UsageError, check_out_dir

    try:
        check_out_dir(str(folder), "--dir")  # before the goldens are computed
    except UsageError as exc:
        return _usage(str(exc))
    return regen(folder, force=args.force, only=args.only)


def _run_compare(args) -> int:
    from lla_verify.registry.impls import get_impl

    folder = Path(args.dir)
    from lla_verify.cliutil import UsageError, check_device

    try:
        select(args.only)
        impl = get_impl(args.impl)
        check_device(args.device)
    except LLAInputError as exc:
        return _usage(str(exc).replace("--lla-impl", "--impl"))
    except UsageError as exc:
        return _usage(str(exc))
    from lla_verify.registry.impls import is_available

    why = is_available(impl, args.device)
    if why:
        return _usage(f"--impl {args.impl}: not available on {args.device}: {why}")
    if not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    try:
        code, _ = compare(folder, impl, device=args.device, only=args.only)
    except (FileNotFoundError, ValueError) as exc:
        _say(f"FAIL {exc}")
        return 1
    return code


def _run_clean(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    return clean(folder)


def _run_list(args) -> int:
    width = max(len(g.name) for g in CATALOG)
    for g in CATALOG:
        _say(f"{g.name:<{width}}  {'mp' if g.mp else 'f64'}  {g.spec}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("goldens", help="golden outputs: regenerate, check, and compare an implementation against them")
    gs = p.add_subparsers(dest="goldens_command", metavar="ACTION")
    p.set_defaults(func=lambda a: _usage("expected an action: regen, compare or list (see lla-verify goldens --help)"))

    r = gs.add_parser("regen", help="recompute every golden deterministically and write it (or --check)")
    r.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    r.add_argument("--force", action="store_true", help="overwrite goldens whose values changed, printing the drift")
    r.add_argument("--check", action="store_true",
                   help="recompute in memory and report drift, hash mismatches, missing and extra files")
    r.add_argument("--only", nargs="+", metavar="NAME", help="only these goldens (see 'lla-verify goldens list')")
    r.set_defaults(func=_run_regen)

    c = gs.add_parser("compare", help="run an implementation on every golden and compare within derived budgets")
    c.add_argument("--impl", required=True, help="a built-in implementation name or MODULE:CALLABLE")
    c.add_argument("--device", default="cpu", help="device to run the implementation on (default: cpu)")
    c.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="only these goldens")
    c.set_defaults(func=_run_compare)

    cl = gs.add_parser("clean", help="delete the temporary files an interrupted regen left behind (nothing else)")
    cl.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    cl.set_defaults(func=_run_clean)

    ls = gs.add_parser("list", help="the catalog: name, reference kind, spec")
    ls.set_defaults(func=_run_list)
