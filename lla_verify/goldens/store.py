"""Golden outputs on disk: a named catalog of cases of every operator with their oracle outputs.

The stored file pins what the oracle said about a golden's inputs. An LLA golden:

    inputs   q, k, v (in the case's dtype, exactly as rounded), lam (float32)
    forward  o, omega, delta, rho, kappa, undefined      (float64 oracle, details)
    reverse  do (the fixed cotangent), dq, dk, dv, dlambda (float64 autograd)
    mp       o_mp: o from the mpmath oracle at MP_DPS digits (small goldens only)

A Parallax golden: q, k, v, r; o, cond; do, dq, dk, dv, dr; o_mp for small ones. A
decode golden: its inputs in the decode layout (q, k_cache, v_cache, lengths, and lam
for LLA or r for Parallax), o per sequence, and the conditioning (omega, delta, kappa,
undefined per row for LLA, cond for Parallax). docs/goldens.md lists them.

``goldens/MANIFEST.json`` holds, per golden, its operator (absent: lla), spec,
parameters, file and the sha256 of every array; docs/goldens.md describes the format
and when to regenerate. This module hashes, reads and writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from lla_verify.registry.cases import DTYPE_NAMES, get_family
from lla_verify.goldens.catalog import COTANGENT_SEED_OFFSET, Golden, SUFFIX, conditioning


FORMAT = "lla-verify-goldens/1"
MANIFEST = "MANIFEST.json"
# the repository's goldens/ (an editable install or a checkout); a plain install has
# none beside the package, and then the folder is looked for in the working directory
_REPO_GOLDENS = Path(__file__).resolve().parents[2] / "goldens"
DEFAULT_DIR = _REPO_GOLDENS if _REPO_GOLDENS.is_dir() else Path("goldens")

# the inputs of every operator's goldens: they must rebuild bit for bit
INPUTS = ("q", "k", "v", "lam", "r", "k_cache", "v_cache", "lengths")
FORWARD = ("o", "omega", "delta", "rho", "kappa", "undefined")
REVERSE = ("do", "dq", "dk", "dv", "dlambda")
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
    info = {"format": FORMAT, "name": golden.name, "spec": golden.spec}
    if golden.op != "lla":  # an LLA golden's file states no operator: its bytes stay those of before
        info["operator"] = golden.op
    info = json.dumps(info, sort_keys=True)
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
    if info.get("operator", "lla") != entry_operator(entry):
        out.append(f"operator stored in {path.name} {info.get('operator', 'lla')!r} != operator of manifest entry "
                   f"{label!r} {entry_operator(entry)!r} (one of them was edited after regen)")
    return out


def entry_operator(entry: dict) -> str:
    """The operator of a manifest entry: its 'operator', lla when absent (entries written
    before the goldens had operators)."""
    return entry.get("operator", "lla")


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
    c = golden.base
    fam = get_family(c.family)
    resolved = fam.easy()
    for key, val in c.params.items():
        resolved[key] = fam.param(key).clip(val)
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
        "conditioning": conditioning(arrays),
        "arrays": {key: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": array_hash(t)}
                   for key, t in sorted(arrays.items())},
    }
    if "kappa" in arrays:
        entry["kappa_max"] = _finite_max(arrays["kappa"], arrays["undefined"])
        entry["n_undefined"] = int(arrays["undefined"].sum())
    if golden.op != "lla":
        entry["operator"] = golden.op
    if hasattr(golden.case, "probe"):
        from lla_verify.registry.parallax import get_probe

        pf = get_probe(golden.case.probe)
        entry["probe"] = golden.case.probe
        entry["probe_params"] = dict(sorted(golden.case.probe_params.items()))
        entry["resolved_probe_params"] = dict(sorted({**pf.easy(), **{key: pf.param(key).clip(val) for key, val
                                                                       in golden.case.probe_params.items()}}.items()))
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
    from lla_verify.registry.operators import OPERATORS

    for n, e in enumerate(man["cases"]):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ValueError(f"{path}: cases[{n}] is not an object with a string 'name'")
        if entry_operator(e) not in OPERATORS:
            raise ValueError(f"{path}: cases[{n}] ({e['name']!r}) has operator {entry_operator(e)!r}; expected one "
                             f"of {list(OPERATORS)} (or none: lla)")
    return man


def manifest_hashes(entry: dict) -> dict:
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
