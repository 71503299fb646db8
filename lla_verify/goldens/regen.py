"""Regenerating the goldens, and checking the stored ones against a fresh computation
(the drift between them, within float64 noise).
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lla_verify.cliutil import atomic_write as _atomic_write  # temp file ".NAME.*.tmp" beside NAME, then a rename
from lla_verify.goldens.catalog import (CATALOG, COTANGENT_SEED_OFFSET, NOISE_FACTOR, BY_NAME, U64, compute,
                                        conditioning, noise_tol, select, stored_probe)
from lla_verify.goldens.store import (DEFAULT_DIR, FORMAT, INPUTS, MANIFEST, manifest_hashes, array_hash,
                                      dump_manifest, embedded_mismatch, encode, entry_operator, entry_path,
                                      is_temp_file,
                                      load_manifest, manifest_entry, read_arrays, versions)


# ------------------------------------------------------------------ comparing
@dataclass
class Drift:
    """Stored vs recomputed arrays of one golden."""

    max_rel: float  # worst elementwise relative difference (inf: NaN pattern or input change)
    where: str  # 'array[index]' of the worst difference, '' when bitwise
    tol: float  # float64 noise allowed for the array at ``where`` (key_tols)
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


# The gradients of one scalar loss share its scale: a gradient that is zero in exact
# arithmetic (dq, dk and d lambda with constant values, at a single token) is float64
# noise at that scale, not at its own, and a small one (tight clusters) carries the
# rounding of the terms that cancel in it.
GRADIENTS = ("dq", "dk", "dv", "dr", "dlambda")
# inputs a case derives in float64 and then rounds to its dtype (the LLA probe, an
# eigenvector probe): float64's platform-dependent last bits can move that rounding by a step
DERIVED_INPUTS = ("r",)


def rel_diff(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> tuple[float, tuple]:
    """The worst elementwise |a - b| / max(|b|, rms(b), floor) and where it is (NaN against
    NaN and equal values count 0; a finite value against a non-finite one counts inf)."""
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
        scale = bf.abs().clamp_min(max(rms, floor, torch.finfo(torch.float64).tiny))
        diff = torch.where(fin, (a - b).abs() / scale, torch.full_like(a, math.inf))
        diff = torch.where(same, torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(torch.argmax(diff.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return float(diff.reshape(-1)[flat]), idx


def key_tols(arrays: dict) -> dict:
    """The float64 noise each array may drift by: NOISE_FACTOR u64 cond (catalog.noise_tol),
    and for d lambda cond squared: d rho / d lambda = -omega Sigma^-1 rho solves with Sigma
    twice, so its float64 error grows as kappa^2 where rho's grows as kappa."""
    base = noise_tol(arrays)
    c = conditioning(arrays)
    return {key: (NOISE_FACTOR * U64 * c * c if key == "dlambda" else base) for key in arrays}


def _undefined_masked(key: str, t: torch.Tensor, undefined: torch.Tensor | None) -> torch.Tensor:
    """A per-query array with its undefined rows (lambda = 0 below rank: a 0/0) set to NaN:
    what is stored there (kappa of a singular Sigma, say) is float64 noise, not a value."""
    if undefined is None or key in INPUTS or key == "undefined" or t.dtype == torch.bool:
        return t
    n = undefined.dim()
    if tuple(t.shape[:n]) != tuple(undefined.shape):
        return t
    mask = undefined.reshape(tuple(undefined.shape) + (1,) * (t.dim() - n))
    return torch.where(mask, torch.full_like(t, math.nan), t)


def derived_input_drift(stored: torch.Tensor, fresh: torch.Tensor, tol: float, row_rel=None) -> float:
    """|stored - fresh| of a derived input in units of one rounding step of its dtype, plus
    the float64 noise of its derivation: tol times its RMS, and ``row_rel`` (broadcast over
    every axis but the last) times each row's norm, for a derivation whose rows are
    conditioned apart (probe_drift). At most 1 when the two differ by the rounding of
    float64's last bits only."""
    from lla_verify.registry.precision import unit_roundoff

    a, b = stored.to(torch.float64), fresh.to(torch.float64)
    if a.shape != b.shape or not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return math.inf
    fin = torch.isfinite(a)
    a, b = torch.where(fin, a, 0.0), torch.where(fin, b, 0.0)
    rms = float(a.square().mean().sqrt()) if a.numel() else 0.0
    step = 2 * unit_roundoff(stored.dtype) * torch.maximum(a.abs(), b.abs()) + tol * rms
    if row_rel is not None:
        rows = torch.maximum(a.norm(dim=-1), b.norm(dim=-1))
        step = step + (row_rel.to(torch.float64) * rows)[..., None]
    ratio = torch.where(a == b, torch.zeros_like(a), (a - b).abs() / step.clamp_min(torch.finfo(torch.float64).tiny))
    return float(ratio.max()) if ratio.numel() else 0.0


def probe_drift(g, stored_r: torch.Tensor, fresh_r: torch.Tensor, tol: float) -> float:
    """derived_input_drift of a Parallax golden's probe (as stored: a decode golden's by
    decoded row), each row allowed NOISE_FACTOR u64 times its condition in the probe
    family's float64 derivation (ParallaxCase.probe_cond: an eigenvector probe moves with
    the platform's eigensolver as far as its eigenvalue's gap allows)."""
    rel = NOISE_FACTOR * U64 * g.case.probe_cond()
    return derived_input_drift(stored_probe(g, stored_r), stored_probe(g, fresh_r), tol, row_rel=rel)


def drift(stored: dict, fresh: dict) -> Drift:
    """Compare stored arrays with recomputed ones (both dicts of tensors)."""
    tols = key_tols(fresh)
    tol = noise_tol(fresh)
    undefined = fresh.get("undefined")
    grads = [fresh[k] for k in GRADIENTS if k in fresh and fresh[k].is_floating_point()]
    gscale = max((float(torch.nan_to_num(g.double()).square().mean().sqrt()) for g in grads), default=0.0)
    worst, where = 0.0, ""
    worst_tol = tol
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
        a, b = _undefined_masked(key, a, undefined), _undefined_masked(key, b, undefined)
        rel, idx = rel_diff(a, b, gscale if key in GRADIENTS else 0.0)
        if key in INPUTS and rel == 0.0:
            rel = math.inf  # an input must rebuild bit for bit (e.g. -0.0 vs 0.0, dtype)
        # judged against the array's own tolerance: report the worst in units of it
        k_tol = tols.get(key, tol)
        if not where or rel / k_tol > worst / worst_tol:
            worst, where, worst_tol = rel, f"{key}[{','.join(map(str, idx))}]", k_tol
    return Drift(worst, where if not bitwise else "", worst_tol, bitwise, inputs_changed)


# ------------------------------------------------------------------ regen / check
def _on_stored_derived_inputs(g, stored: dict, fresh: dict) -> tuple[dict, str]:
    """When a derived input (the probe r) rebuilds within one rounding step of its dtype
    and its derivation's float64 noise (probe_drift) but not bit for bit, the outputs
    recomputed on the stored one, so that their drift is the oracle's alone; else
    ``fresh`` as it is (and drift names the input)."""
    moved = any(k in stored and k in fresh and not torch.equal(stored[k], fresh[k]) for k in DERIVED_INPUTS)
    if not moved or g.op not in ("parallax", "parallax-decode"):
        return fresh, ""
    steps = probe_drift(g, stored["r"], fresh["r"], noise_tol(fresh))
    if steps > 1.0:
        return fresh, ""
    return compute(g, r=stored_probe(g, stored["r"])), (
        f"r rebuilds within one rounding of {stored['r'].dtype} and its derivation's float64 noise ({steps:.2g} of "
        "that step: float64's last bits, the platform's eigensolver); the outputs are compared on the stored r")


def say(msg: str = "") -> None:
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
        say(f"FAIL manifest: {exc}")
        return 1
    if man is None:
        say(f"FAIL manifest: no {MANIFEST} in {folder} (run 'lla-verify goldens regen --dir {folder}')")
        return 1
    entries = {e.get("name"): e for e in man["cases"]}
    problems = 0
    noise_only = 0
    here = versions()
    made = man.get("versions", {})
    diffs = {k: (made.get(k), here[k]) for k in here if made.get(k) != here[k]}
    if diffs:
        say("note: manifest made with " + ", ".join(f"{k} {a}" for k, (a, b) in diffs.items())
             + "; running " + ", ".join(f"{k} {b}" for k, (a, b) in diffs.items()))
    fresh_all = _compute_all(goldens)
    for g in goldens:
        fresh = fresh_all[g.name]
        e = entries.get(g.name)
        lines = []
        if isinstance(fresh, Exception):
            problems += 1
            say(f"FAIL {g.name}: cannot recompute: {type(fresh).__name__}: {fresh}")
            continue
        if e is None:
            lines.append(f"missing from the manifest (expected file {g.file})")
        else:
            if e.get("spec") != g.spec:
                lines.append(f"spec in manifest {e.get('spec')!r} != catalog {g.spec!r} (catalog changed without regen)")
            if e.get("file") != g.file:
                lines.append(f"file in manifest {e.get('file')!r} != catalog {g.file!r}")
            if entry_operator(e) != g.op:
                lines.append(f"operator in manifest {entry_operator(e)!r} != catalog {g.op!r}")
            hashes = manifest_hashes(e)
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
                    fresh, note = _on_stored_derived_inputs(g, stored, fresh)
                    if note:
                        say(f"note {g.name}: {note}")
                    dr = drift(stored, fresh)
                    if not dr.ok:
                        lines.append(str(dr))
                    elif not dr.bitwise:
                        noise_only += 1
                        say(f"ok   {g.name}: {dr}")
                else:
                    for key, t in sorted(fresh.items()):
                        if hashes.get(key) != array_hash(t):
                            lines.append(f"recomputed {key} does not match the manifest hash")
        if lines:
            problems += 1
            for ln in lines:
                say(f"FAIL {g.name}: {ln}")
    # entries and files nobody in the catalog claims (checked with --only too: cheap)
    names = {g.name for g in goldens}
    for name in entries:
        if name not in BY_NAME:
            problems += 1
            say(f"FAIL {name}: extra manifest entry (no such golden in the catalog)")
    known = {e.get("file") for e in man["cases"] if e.get("name") in BY_NAME} | {MANIFEST}
    for path in sorted(folder.iterdir()):
        if path.name in known:
            continue
        problems += 1
        if is_temp_file(path.name):
            say(f"FAIL leftover temporary file {path.name} in {folder}: a temporary file of an interrupted regen "
                 f"(not a golden); remove it with '{clean_command(folder)}'")
        else:
            say(f"FAIL extra file {path.name} in {folder} (not in the manifest)")
    n = len(names)
    tail = f" ({noise_only} within float64 noise)" if noise_only else ""
    if problems:
        say(f"goldens check: {problems} problem(s) over {n} golden(s){tail}")
        return 1
    say(f"goldens check: {n} golden(s) reproduce{tail}, hashes match")
    return 0


def regen(folder: Path, *, force: bool = False, only=None) -> int:
    """Recompute and write; refuse to change stored values without ``force``. Stored values
    within float64 noise of the recomputation (``drift``) are kept as they are."""
    goldens = select(only)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        man = load_manifest(folder)
    except ValueError as exc:
        if not force:
            say(f"refusing: {exc}; rerun with --force to rebuild it")
            return 1
        man = None
    old = {e.get("name"): e for e in (man or {}).get("cases", [])}
    fresh_all = _compute_all(goldens)
    broken = [(n, e) for n, e in fresh_all.items() if isinstance(e, Exception)]
    if broken:
        for name, exc in broken:
            say(f"FAIL {name}: cannot recompute: {type(exc).__name__}: {exc}")
        say("regen: nothing written")
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
            if not force:
                fresh, _ = _on_stored_derived_inputs(g, stored, fresh)
            dr = drift(stored, fresh)
            dr_txt = str(dr)
            if dr.ok and not dr.bitwise and not force:
                # float64 noise (another CPU's kernels, another library version): the stored
                # values still hold, and are kept; --force writes this machine's
                fresh = fresh_all[g.name] = stored
                reports.append(f"{g.name}: kept, {dr_txt}")
                dr = Drift(0.0, "", dr.tol, True, [])
            if dr.bitwise:
                # values identical: rewrite only if the file's bytes (metadata) differ;
                # the manifest entry is refreshed below, and written only if it moved
                if path.read_bytes() != encode(g, fresh):
                    to_write.append(g)
                    moved = embedded_mismatch(path, {"name": g.name, "spec": g.spec, "operator": g.op})
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
            say(f"REFUSED {ln}")
        say(f"regen: {len(refused)} golden(s) would change; nothing written. Run 'lla-verify goldens regen --check' "
             "to read the drift, then 'regen --force' if the change is intended (see docs/goldens.md).")
        return 1
    for ln in reports:
        say(ln)
    for g in to_write:
        _atomic_write(folder / g.file, encode(g, fresh_all[g.name]))
    entries = dict(old)
    for g in goldens:
        entries[g.name] = manifest_entry(g, fresh_all[g.name])
    order = [g.name for g in CATALOG if g.name in entries] + sorted(n for n in entries if n not in BY_NAME)
    new = {
        "format": FORMAT,
        "hash": "sha256 of '<dtype>|<shape as a JSON list>|' followed by the raw little-endian bytes",
        "noise_tol": f"{NOISE_FACTOR:g} * 2^-53 * conditioning (max over defined queries of max(kappa, omega / delta); "
                     "Parallax: cond, max over queries of sensitivity / max(|o_i|, rms |o|)); conditioning squared "
                     "for dlambda; gradients relative to at least the largest gradient's rms; undefined rows "
                     "left out (docs/goldens.md)",
        "operator": "lla when an entry names none; parallax, lla-decode, parallax-decode (registry/operators.py)",
        "cotangent": "do = randn(o.shape, float64, torch.Generator().manual_seed(seed + "
                     f"{COTANGENT_SEED_OFFSET})), zero on undefined rows (LLA and Parallax goldens)",
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
            say(f"note: leftover temporary file {path.name} in {folder}: a temporary file of an interrupted regen "
                 f"(left alone; remove it with '{clean_command(folder)}')")
        elif path.name not in claimed and not path.name.startswith("."):
            say(f"note: extra file {path.name} in {folder} (not in the manifest; left alone)")
    tail = ", manifest updated" if wrote_manifest else ""
    say(f"regen: {len(to_write)} written, {len(goldens) - len(to_write)} unchanged{tail}, in {folder}")
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
        say(f"removed {path.name} (temporary file of an interrupted regen)")
    say(f"goldens clean: {removed} temporary file(s) removed from {folder}")
    return 0
