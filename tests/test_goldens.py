"""Goldens: the files on disk, their manifest, regen/--check, and compare (CPU, fast)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lla_verify.goldens import catalog as gcat
from lla_verify.goldens import store as gstore
from lla_verify.goldens import regen as gregen
from lla_verify.goldens import compare as gcompare
from lla_verify.registry.cases import FAMILIES
from lla_verify.cli import main
from lla_verify.registry.impls import Impl, get_impl
from lla_verify.testing.kept_worker import kept_workers
from lla_verify.oracles.float64 import mesanet_attention, softmax_attention
from lla_contract import check_lambda, check_qkv, check_scale

SMALL = "gaussian-f32-S16-D4-H2"
PERQ = "lambda-decades-perquery-f32-S16-D4"
MEDIUM = "subspace-noise1e-4-bf16-S33-D16"
LAM0 = "linear-values-lam0-f32-S16-D4"
PX_SMALL = "px-small-eig-offset1e3-f32-S16-D4"
PX_MEDIUM = "px-small-eig-large-norm1e2-f32-S48-D16"
DEC = "dec-gaussian-f32-S7-D16-B2"
DEC_FIRST = "dec-first-token-f32-S1-D16-B3"
PXDEC = "pxdec-random-gaussian-f32-S7-D16-B2"
SUBSET = [SMALL, PERQ, MEDIUM, LAM0, "const-values-f16-S16-D4", PX_SMALL, DEC, PXDEC]
M = "lla_verify.testing.mutants:"


def _copy_goldens(dst):
    shutil.copytree(gstore.DEFAULT_DIR, dst)
    return dst


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ catalog
def test_catalog_covers_every_family_dtype_and_limit():
    names = [g.name for g in gcat.CATALOG]
    assert len(names) == len(set(names))
    lla = gcat.select(None, "lla")
    assert {g.case.family for g in lla} == set(FAMILIES)
    assert {g.case.dtype for g in lla} >= {"float32", "bfloat16", "float16"}
    assert {g.variant for g in lla} == set(gcat.VARIANTS)
    assert any(g.case.S == 1 for g in lla), "first token"
    assert max(g.case.S for g in lla) == 512 and max(g.case.D for g in lla) == 64
    for g in gcat.CATALOG:
        small = g.base.S <= gcat.MP_MAX_S and g.base.D <= gcat.MP_MAX_D
        assert g.mp == (small and g.op in ("lla", "parallax")), g.name
        assert gcat.parse_golden_spec(g.spec, g.op) == (g.case, g.variant), g.name
    assert isinstance(gcat.build_problem(gcat.get_golden(PERQ)).ridge_lambda, torch.Tensor)


def test_bad_golden_spec_and_name_are_named():
    with pytest.raises(ValueError, match="variant"):
        gcat.parse_golden_spec("gaussian::B=1,H=1,S=4,D=2,dtype=float32,seed=0|v=linear")
    with pytest.raises(ValueError, match="--only"):
        gcat.get_golden("no-such-golden")


# ------------------------------------------------------------------ on disk
def test_files_on_disk_match_manifest_hashes():
    man = gstore.load_manifest(gstore.DEFAULT_DIR)
    assert man is not None, "goldens/MANIFEST.json is missing"
    assert set(man["versions"]) >= {"torch", "numpy", "mpmath", "lla-verify"} and man["created"]
    assert [e["name"] for e in man["cases"]] == [g.name for g in gcat.CATALOG]
    total = 0
    for e in man["cases"]:
        g = gcat.get_golden(e["name"])
        assert e["spec"] == g.spec and e["seed"] == g.base.seed
        assert gstore.entry_operator(e) == g.op and ("operator" in e) == (g.op != "lla")
        assert e["oracle"]["mp_dps"] == (gcat.MP_DPS if g.mp else None)
        path = gstore.DEFAULT_DIR / e["file"]
        total += path.stat().st_size
        arrays = load_file(str(path))
        assert set(arrays) == set(e["arrays"]), e["name"]
        for key, t in arrays.items():
            meta = e["arrays"][key]
            assert (gstore._dtype_name(t), list(t.shape)) == (meta["dtype"], meta["shape"]), (e["name"], key)
            assert gstore.array_hash(t) == meta["sha256"], (e["name"], key)
        assert ("o_mp" in arrays) == g.mp
        assert str(arrays["q"].dtype) == f"torch.{g.base.dtype}"
    assert total < 4 * 2**20, f"goldens take {total / 2**20:.1f} MiB; keep them to a few MiB"


def test_regen_check_is_clean_on_the_repository(capsys):
    # CI: a fresh clone must reproduce its goldens (bitwise, or within float64 noise)
    assert main(["goldens", "regen", "--check"]) == 0, capsys.readouterr().out
    assert "reproduce" in capsys.readouterr().out


def test_oracle_reproduces_the_mp_values_to_float64_noise():
    # small goldens: the float64 oracle against the stored mpmath output
    for g in gcat.CATALOG:
        if not g.mp:
            continue
        a = load_file(str(gstore.DEFAULT_DIR / g.file))
        ok = ~a["undefined"] if "undefined" in a else torch.ones(a["o"].shape[:-1], dtype=torch.bool)
        err = (a["o"] - a["o_mp"]).norm(dim=-1)[ok]
        assert float(err.max()) <= gcat.noise_tol(a) * float(a["o_mp"][ok].norm(dim=-1).max()), g.name


def _stored(name):
    return load_file(str(gstore.DEFAULT_DIR / gcat.get_golden(name).file))


def _rel(a, b):
    return float((a - b).norm(dim=-1).max() / b.norm(dim=-1).max())


def _limit_softmax(a, g):
    return _rel(a["o_mp"], softmax_attention(a["q"], a["k"], a["v"], qk_scale=gcat.build_problem(g).qk_scale)) < 0.05


def _limit_mesanet(a, g):
    return _rel(a["o_mp"], mesanet_attention(a["q"], a["k"], a["v"], ridge_lambda=float(a["lam"]))) < 1e-3


def _mesanet_exact(a, g):
    # s = 0 is the MesaNet form exactly: only float64 rounding separates the two formulas
    from lla_verify.budget.forward import MODEL_SAFETY

    mesa, rounding = mesanet_attention(a["q"], a["k"], a["v"], ridge_lambda=float(a["lam"]), return_rounding=True)
    err = (a["o_mp"] - mesa).norm(dim=-1)
    return gcat.build_problem(g).qk_scale == 0.0 and bool((err <= MODEL_SAFETY * rounding + gcat.U64 * mesa.norm(dim=-1)).all())


def _const_values(a, g):
    v0 = a["v"].double()[..., :1, :].expand_as(a["o"])
    return torch.equal(a["o_mp"], v0) and float((a["o"] - v0).abs().max()) < 1e-14


def _first_token(a, g):
    return torch.equal(a["o_mp"][..., 0, :], a["v"].double()[..., 0, :])


def _hard_attention(a, g):
    q, k, v = (a[x].double() for x in "qkv")
    S = q.shape[-2]
    sc = (gcat.build_problem(g).qk_scale * q @ k.transpose(-1, -2)).masked_fill(
        ~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    top = sc.topk(min(2, S), dim=-1).values
    gap = (top[..., 0] - top[..., 1]).nan_to_num(posinf=1e3)  # the first token has one key
    hard = torch.gather(v, -2, sc.argmax(-1)[..., None].expand_as(v))
    err = (a["o_mp"] - hard).norm(dim=-1)
    return bool((err <= 100 * torch.exp(-gap) * v.norm(dim=-1).max() + 1e-15).all())


def _linear_values(a, g):
    # v = A k + b rounded to float32, so exact only to u32: fit A, b, then o_i = A q_i + b for i >= D
    k, v, q = (a[x].double()[0, 0] for x in "kvq")
    X = torch.cat([k, torch.ones(k.shape[0], 1, dtype=k.dtype)], -1)
    coef = torch.linalg.lstsq(X, v).solution
    pred = torch.cat([q, torch.ones(q.shape[0], 1, dtype=q.dtype)], -1) @ coef
    D = q.shape[-1]
    undefined = a["undefined"][0, 0]
    return bool(undefined[:D].all() and not undefined[D:].any()) and _rel(a["o_mp"][0, 0, D:], pred[D:]) < 1e-5


@pytest.mark.parametrize("name, holds", [
    ("softmax-limit-lam100-f32-S16-D4", _limit_softmax),
    ("tiny-scale1e-4-f32-S16-D4", _limit_mesanet),
    ("zero-scale-f32-S16-D4", _mesanet_exact),
    ("const-values-f16-S16-D4", _const_values),
    ("first-token-f32-S1-D4", _first_token),
    ("gaussian-f32-S16-D4-H2", _first_token),
    ("large-scale1e2-bf16-S16-D4", _hard_attention),
    ("linear-values-lam0-f32-S16-D4", _linear_values),
], ids=lambda x: x if isinstance(x, str) else "")
def test_goldens_show_the_limit_or_identity_they_pin(name, holds):
    g = gcat.get_golden(name)
    assert holds(_stored(name), g), f"{name}: {g.why}"


# ------------------------------------------------------------------ --check catches damage
def test_altered_value_is_caught_naming_case_and_array(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    path = folder / gcat.get_golden(SMALL).file
    arrays = load_file(str(path))
    arrays["o"][0, 1, 5, 2] += 1e-9
    save_file(arrays, str(path))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {SMALL}: hash mismatch in array o " in out
    assert "drift: max rel" in out and "at o[0,1,5,2]" in out


def test_corrupted_bytes_are_caught(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    path = folder / gcat.get_golden(MEDIUM).file
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside the last array's data: the header still parses
    path.write_bytes(bytes(raw))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", MEDIUM]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {MEDIUM}: hash mismatch in array" in out
    path.write_bytes(bytes(raw[:100]))  # truncated: the header does not parse
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", MEDIUM]) == 1
    assert f"FAIL {MEDIUM}: corrupt file" in capsys.readouterr().out


def test_missing_and_extra_files_are_reported(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    (folder / gcat.get_golden(SMALL).file).unlink()
    (folder / "stray.safetensors").write_bytes(b"x")
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {SMALL}: missing file {SMALL}.safetensors" in out
    assert "FAIL extra file stray.safetensors" in out
    man = json.loads((folder / gstore.MANIFEST).read_text())
    man["cases"].append(dict(man["cases"][0], name="retired-golden"))
    (folder / gstore.MANIFEST).write_text(json.dumps(man))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", PERQ]) == 1
    assert "FAIL retired-golden: extra manifest entry" in capsys.readouterr().out


def test_check_without_manifest_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["goldens", "regen", "--check", "--dir", str(tmp_path / "empty"), "--only", SMALL]) == 1
    assert "no MANIFEST.json" in capsys.readouterr().out


def test_check_reports_a_golden_it_cannot_recompute(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lla_verify.oracles.mp", None)  # the import now fails
    assert main(["goldens", "regen", "--check", "--only", SMALL]) == 1
    assert f"FAIL {SMALL}: cannot recompute: RuntimeError" in capsys.readouterr().out


# ------------------------------------------------------------------ regen
def test_regen_twice_gives_identical_bytes(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["goldens", "regen", "--dir", str(a), "--only", *SUBSET]) == 0
    assert main(["goldens", "regen", "--dir", str(b), "--only", *SUBSET]) == 0
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb) == {gcat.get_golden(n).file for n in SUBSET} | {gstore.MANIFEST}
    for name in fa:
        if name != gstore.MANIFEST:
            assert fa[name] == fb[name], name
    ma, mb = (json.loads(f[gstore.MANIFEST]) for f in (fa, fb))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    # the same values as the repository's goldens: bitwise here, and within float64
    # noise on a machine whose BLAS takes other code paths (what --check allows)
    for n in SUBSET:
        f = gcat.get_golden(n).file
        assert gregen.drift(load_file(str(gstore.DEFAULT_DIR / f)), load_file(str(a / f))).ok, n
    # a second regen into the same folder writes nothing, not even the manifest date
    assert main(["goldens", "regen", "--dir", str(a), "--only", *SUBSET]) == 0
    assert _files(a) == fa
    assert "0 written" in capsys.readouterr().out


def test_regen_refuses_changed_values_without_force(tmp_path, capsys):
    folder = tmp_path / "g"
    assert main(["goldens", "regen", "--dir", str(folder), "--only", PERQ]) == 0
    before = _files(folder)
    path = folder / gcat.get_golden(PERQ).file
    arrays = load_file(str(path))
    arrays["dlambda"][0, 0, 3] *= 1.5
    save_file(arrays, str(path))
    tampered = _files(folder)
    capsys.readouterr()
    assert main(["goldens", "regen", "--dir", str(folder), "--only", PERQ]) == 1
    out = capsys.readouterr().out
    assert f"REFUSED {PERQ}: drift" in out and "dlambda[0,0,3]" in out and "nothing written" in out
    assert _files(folder) == tampered
    assert main(["goldens", "regen", "--dir", str(folder), "--only", PERQ, "--force"]) == 0
    out = capsys.readouterr().out
    assert f"{PERQ}: drift: max rel" in out and "--force" in out
    assert _files(folder)[path.name] == before[path.name]


def test_drift_classes():
    a = gcat.compute(gcat.get_golden(SMALL))
    tol = gcat.noise_tol(a)
    assert gregen.drift(a, a).kind == "bitwise"
    b = dict(a, dq=a["dq"] * (1 + 2 * gcat.U64))
    assert gregen.drift(a, b).kind == "drift within float64 noise"
    c = dict(a, rho=a["rho"] * (1 + 1e3 * tol))
    d = gregen.drift(a, c)
    assert d.kind == "drift" and d.where.startswith("rho[")
    e = dict(a, q=(a["q"] * 2))
    assert gregen.drift(a, e).kind == "inputs changed"
    f = dict(a, o=torch.where(a["o"] > 0, torch.nan, a["o"]))
    assert gregen.drift(a, f).max_rel == float("inf")


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["goldens", "regen", "--check", "--only", "nope"]) == 2
    assert "--only: unknown golden 'nope'" in capsys.readouterr().err
    assert main(["goldens", "regen", "--check", "--force"]) == 2
    assert main(["goldens", "regen", "--check", "--dir", str(tmp_path / "absent")]) == 2
    assert main(["goldens", "compare", "--impl", "no-such-impl"]) == 2
    assert main(["goldens", "compare", "--impl", "torch-fp32", "--dir", str(tmp_path / "absent")]) == 2
    assert main(["goldens"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["goldens", "compare"])  # --impl is required
    assert exc.value.code == 2


# ------------------------------------------------------------------ compare
def test_compare_torch_fp32_passes(capsys):
    assert main(["goldens", "compare", "--impl", "torch-fp32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    n = len(gcat.select(None, "lla"))  # --op lla, the default: the LLA goldens only
    assert len(out) == n + 1
    assert out[-1].startswith(f"0 of {3 * n} checks over threshold, worst ratio ")


def _lla_no_omega(q, k, v, *, ridge_lambda, qk_scale=None):
    """Planted bug: the ridge is lambda * I instead of lambda * omega * I."""
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device, dtype=torch.float32)
    qc, kc, vc = q.float(), k.float(), v.float()
    S, D = q.shape[-2], q.shape[-1]
    a = (scale * qc @ kc.transpose(-1, -2)).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    w = torch.exp(a - a.amax(-1, keepdim=True))
    z = kc[..., None, :, :] - qc[..., :, None, :]
    wz = w[..., None] * z
    sig = wz.transpose(-1, -2) @ z + lam[..., None, None] * torch.eye(D)
    rho = torch.linalg.solve(sig, wz.sum(-2)[..., None])[..., 0]
    g = w * (1.0 - (z @ rho[..., None])[..., 0])
    return ((g @ vc) / g.sum(-1, keepdim=True)).to(q.dtype)


def test_compare_catches_a_planted_bug(capsys):
    bug = Impl(name="planted-no-omega", forward=_lla_no_omega, description="lambda not multiplied by omega")
    code, results = gcompare.compare(gstore.DEFAULT_DIR, bug, only=[SMALL, PERQ, "gaussian-f32-S512-D16"])
    assert code == 1
    out = capsys.readouterr().out
    for r in results:
        assert r.checks["forward"] > 1 and r.checks["stored"] > 1, r.name
        # today's oracle reproduces the stored reference: bitwise on the machine that wrote
        # it, to float64 noise (a ratio to NOISE_FACTOR u64 cond) on another CPU
        assert r.checks["oracle"] <= 1.0, r
        assert f"{r.name}  " in out and "FAIL" in out
    assert out.strip().splitlines()[-1].startswith("6 of 9 checks over threshold, worst ratio ")


# Goldens the Triton kernel takes (D >= 16), one per dtype at least, mid-sized; one test
# each, so xdist spreads them. The interpreter takes 15 s to 4 min on each on a busy
# 2-core machine (the D=64 one longest). The S=129 ill-conditioned spectrum golden is
# left to `lla-verify goldens compare --impl triton`, which runs all twelve: alone, it ran
# past the 300 s call limit on such a machine, and its kind of problem (bf16, ill
# conditioned) stays covered by the kernel's spectrum tests (tests/test_kernel_backward.py,
# kappa 1e4) and the properties.
KERNEL_GOLDENS = ["subspace-noise1e-4-bf16-S33-D16", "clusters-spread1e-3-f16-S100-D32",
                  "offset1e4-f32-S127-D32", "linear-values-lam0-f32-S100-D16",
                  "early-lam1e-8-bf16-S72-D64"]


@pytest.mark.interp
@pytest.mark.parametrize("name", KERNEL_GOLDENS)
def test_triton_kernel_matches_the_goldens_within_budgets(name, capsys):
    from lla_verify.registry.impls import is_available

    impl = get_impl("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = is_available(impl, device)
    if reason:
        pytest.skip(reason)
    code, results = gcompare.compare(gstore.DEFAULT_DIR, impl, device=device, only=[name])
    out = capsys.readouterr().out
    assert [r.name for r in results] == [name] and not any(r.skipped for r in results), out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("0 of 3 checks over threshold"), out


def test_compare_skips_what_the_impl_cannot_do(capsys):
    narrow = gcompare.compare(gstore.DEFAULT_DIR, Impl(name="f32-d4", forward=get_impl("torch-fp32").forward, description="x",
                                           dtypes=(torch.float32,), head_dims=(4,), per_query_lambda=False),
                       only=[SMALL, MEDIUM, PERQ, "early-lam1e-10-f16-S8-D8"])
    code, results = narrow
    assert code == 0
    skipped = {r.name: r.skipped for r in results}
    assert skipped[SMALL] is None
    assert "does not accept dtype torch.bfloat16" in skipped[MEDIUM]
    assert "no per-query lambda" in skipped[PERQ]
    assert "does not accept dtype torch.float16" in skipped["early-lam1e-10-f16-S8-D8"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("0 of 3 checks over threshold") and "(3 golden(s) skipped)" in last


def test_compare_refuses_an_altered_golden(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    path = folder / gcat.get_golden(SMALL).file
    arrays = load_file(str(path))
    arrays["o_mp"][0, 0, 0, 0] += 1.0
    save_file(arrays, str(path))
    code, results = gcompare.compare(folder, get_impl("torch-fp32"), only=[SMALL])
    assert code == 1 and "hash mismatch in ['o_mp']" in results[0].notes


# ------------------------------------------------------------------ manifest paths, embedded spec, leftovers
def _edit_manifest(folder, name, **changes):
    man = json.loads((folder / gstore.MANIFEST).read_text())
    for e in man["cases"]:
        if e["name"] == name:
            e.update(changes)
    (folder / gstore.MANIFEST).write_text(json.dumps(man))


def _outside_copy(tmp_path, folder, name):
    """The golden's file moved out of the goldens folder (a valid golden, in the wrong place)."""
    out = tmp_path / "afile"
    (folder / gcat.get_golden(name).file).rename(out)
    return out


@pytest.mark.parametrize("how", ["dotdot", "absolute", "subfolder"])
def test_manifest_file_outside_the_folder_is_refused(tmp_path, capsys, how):
    folder = _copy_goldens(tmp_path / "g")
    out = _outside_copy(tmp_path, folder, SMALL)
    if how == "subfolder":
        (folder / "sub").mkdir()
        out = out.rename(folder / "sub" / "afile")
    file = {"dotdot": "../afile", "absolute": str(out), "subfolder": "sub/afile"}[how]
    _edit_manifest(folder, SMALL, file=file)
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    text = capsys.readouterr().out
    assert f"FAIL {SMALL}: manifest entry {SMALL!r}: 'file' {file!r} is not a plain file name inside the goldens " \
           f"folder {folder}" in text, text
    res = gcompare.compare_one(gcat.get_golden(SMALL), folder, gstore.load_manifest(folder)["cases"][0], get_impl("torch-fp32"), "cpu")
    assert res.checks == {"golden": float("inf")} and f"manifest entry {SMALL!r}: 'file' {file!r}" in res.notes


def test_golden_symlinked_out_of_the_folder_is_refused(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    out = _outside_copy(tmp_path, folder, SMALL)
    link = folder / gcat.get_golden(SMALL).file
    link.symlink_to(out)
    before = out.read_bytes()
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    text = capsys.readouterr().out
    assert f"FAIL {SMALL}: manifest entry {SMALL!r}: 'file' {link.name!r} is a symlink to {out.resolve()}, " \
           f"outside the goldens folder" in text, text
    entry = gstore.load_manifest(folder)["cases"][0]
    res = gcompare.compare_one(gcat.get_golden(SMALL), folder, entry, get_impl("torch-fp32"), "cpu")
    assert res.checks == {"golden": float("inf")} and "is a symlink to" in res.notes
    # regen does not read through the link, and --force replaces the link, never its target
    assert main(["goldens", "regen", "--dir", str(folder), "--only", SMALL]) == 1
    assert f"REFUSED {SMALL}: manifest entry {SMALL!r}: 'file' {link.name!r} is a symlink" in capsys.readouterr().out
    assert main(["goldens", "regen", "--dir", str(folder), "--only", SMALL, "--force"]) == 0
    assert not link.is_symlink() and out.read_bytes() == before
    # what --force wrote is this machine's recomputation: the stored values to float64 noise
    assert gregen.drift(gstore.read_arrays(out), gstore.read_arrays(link)).ok
    # a link that loops is refused, not followed forever
    link.unlink()
    link.symlink_to(link.name)
    with pytest.raises(ValueError, match=f"^manifest entry {SMALL!r}: 'file' {link.name!r} cannot be resolved"):
        gstore.entry_path(folder, entry)
    link.unlink()
    link.write_bytes(before)
    # a symlink that stays inside the folder is an ordinary entry
    inside = folder / "inside.safetensors"
    link.rename(inside)
    link.symlink_to(inside.name)
    _edit_manifest(folder, SMALL)
    assert gstore.entry_path(folder, entry) == link


def _rewrite_embedded(path, **changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        info = json.loads(fh.metadata()["golden"])
    arrays = load_file(str(path))
    info.update(changes)
    save_file(arrays, str(path), metadata={"golden": json.dumps(info)})


def test_embedded_spec_must_match_the_manifest(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    g = gcat.get_golden(SMALL)
    path = folder / g.file
    other = gcat.get_golden(PERQ).spec
    # the spec inside the file edited: every array (and so every hash) unchanged
    _rewrite_embedded(path, spec=other)
    assert gstore.read_arrays(path).keys() == load_file(str(gstore.DEFAULT_DIR / g.file)).keys()
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    want = f"FAIL {SMALL}: spec stored in {g.file} {other!r} != spec of manifest entry {SMALL!r} {g.spec!r}"
    assert want in capsys.readouterr().out
    res = gcompare.compare_one(g, folder, gstore.load_manifest(folder)["cases"][0], get_impl("torch-fp32"), "cpu")
    assert res.checks == {"golden": float("inf")} and f"spec stored in {g.file} {other!r}" in res.notes
    # regen puts the catalog's metadata back (the arrays are bitwise the same) and says so
    assert main(["goldens", "regen", "--dir", str(folder), "--only", SMALL]) == 0
    assert f"{SMALL}: arrays bitwise identical, metadata rewritten (spec stored in" in capsys.readouterr().out
    assert path.read_bytes() == (gstore.DEFAULT_DIR / g.file).read_bytes()
    # the manifest's spec edited instead: the file's own spec is named beside it
    _edit_manifest(folder, SMALL, spec=other)
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    want = f"FAIL {SMALL}: spec stored in {g.file} {g.spec!r} != spec of manifest entry {SMALL!r} {other!r}"
    assert want in capsys.readouterr().out
    res = gcompare.compare_one(g, folder, gstore.load_manifest(folder)["cases"][0], get_impl("torch-fp32"), "cpu")
    assert res.checks == {"golden": float("inf")} and f"spec of manifest entry {SMALL!r} {other!r}" in res.notes
    # the name inside the file, and a file without the metadata at all
    _edit_manifest(folder, SMALL, spec=g.spec)
    _rewrite_embedded(path, name=PERQ)
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    assert f"name stored in {g.file} {PERQ!r} != name of manifest entry {SMALL!r} {SMALL!r}" in capsys.readouterr().out
    save_file(load_file(str(path)), str(path))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    assert f"FAIL {SMALL}: {g.file} carries no 'golden' metadata" in capsys.readouterr().out


def _interrupted_write(monkeypatch, path, data):
    """_atomic_write killed between writing its temporary file and renaming it."""
    def killed(*a):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        m.setattr(os, "unlink", lambda p: None)  # the process died: no cleanup ran
        with pytest.raises(KeyboardInterrupt):
            gregen._atomic_write(path, data)


def test_leftover_temporary_file_is_named_and_cleaned(tmp_path, capsys, monkeypatch):
    folder = _copy_goldens(tmp_path / "g")
    golden = folder / gcat.get_golden(SMALL).file
    _interrupted_write(monkeypatch, golden, b"half a golden")
    _interrupted_write(monkeypatch, folder / gstore.MANIFEST, b"{")
    temps = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
    assert len(temps) == 2 and all(gstore.is_temp_file(n) for n in temps), temps
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 1
    out = capsys.readouterr().out
    for n in temps:
        assert f"FAIL leftover temporary file {n} in {folder}: a temporary file of an interrupted regen (not a " \
               f"golden); remove it with 'lla-verify goldens clean --dir {folder}'" in out
    assert "extra file" not in out
    assert main(["goldens", "regen", "--dir", str(folder), "--only", SMALL]) == 0
    assert f"note: leftover temporary file {temps[0]} in {folder}" in capsys.readouterr().out
    # clean removes those two and nothing else: not a look-alike of another name, a
    # link or a folder with a matching name, nor the goldens
    keep = [".notes.txt.abc123.tmp", f"{golden.name}.abcd1234.tmp", ".x.safetensors.tmp", "stray.safetensors"]
    for n in keep:
        (folder / n).write_bytes(b"x")
    (folder / f".{golden.name}.link0000.tmp").symlink_to(golden.name)
    (folder / f".{golden.name}.dir00000.tmp").mkdir()
    keep += [f".{golden.name}.link0000.tmp", f".{golden.name}.dir00000.tmp"]
    before = {p.name for p in folder.iterdir()}
    assert main(["goldens", "clean", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"goldens clean: 2 temporary file(s) removed from {folder}" in out
    assert {p.name for p in folder.iterdir()} == before - set(temps)
    assert golden.read_bytes() == (gstore.DEFAULT_DIR / golden.name).read_bytes()
    for n in keep:
        assert (folder / n).exists() or (folder / n).is_symlink(), n
    assert main(["goldens", "clean", "--dir", str(folder)]) == 0
    assert "0 temporary file(s) removed" in capsys.readouterr().out
    assert main(["goldens", "clean", "--dir", str(tmp_path / "absent")]) == 2


# ------------------------------------------------------------------ Parallax and decode goldens (registry/operators.py)
def test_catalog_has_goldens_of_every_operator():
    from lla_verify.registry.operators import OPERATORS
    from lla_verify.registry.parallax import ParallaxCase

    assert {g.op for g in gcat.CATALOG} == set(OPERATORS)
    px = gcat.select(None, "parallax")
    assert {g.case.probe for g in px} >= {"zero", "random", "lla", "small_eig"}
    assert {g.base.family for g in px} >= {"gaussian", "offset", "spectrum"}
    assert {g.base.dtype for g in px} >= {"float32", "bfloat16"}
    for op in ("lla-decode", "parallax-decode"):
        dec = gcat.select(None, op)
        assert len({g.base.family for g in dec}) >= 3, op
        assert any(g.base.B > 1 for g in dec), f"{op}: a batch of problems"
    assert any(g.base.S == 1 for g in gcat.select(None, "lla-decode")), "the first token alone"
    for g in gcat.CATALOG:
        assert isinstance(g.case, ParallaxCase) == g.op.startswith("parallax"), g.name
        assert not g.variant or g.op == "lla", g.name
    with pytest.raises(ValueError, match="for operator parallax"):
        gcat.parse_golden_spec(gcat.get_golden(PX_SMALL).spec + "|v=const", "parallax")
    with pytest.raises(ValueError, match="--only: golden 'gaussian-f32-S16-D4-H2' is of operator lla, not parallax"):
        gcat.select([SMALL], "parallax")


def test_decode_goldens_store_every_position_ragged_with_the_first_token():
    for name in (DEC, PXDEC, DEC_FIRST):
        g = gcat.get_golden(name)
        a = _stored(name)
        B, H, S, D = g.base.B, g.base.H, g.base.S, g.base.D
        assert torch.equal(a["lengths"], torch.arange(1, S + 1).repeat(B)), name
        assert tuple(a["k_cache"].shape) == (B * S, H, S, D) and tuple(a["o"].shape) == (B * S, H, D)
        past = torch.arange(S)[None, :] >= a["lengths"][:, None]  # the cache past each length is NaN
        assert bool(a["k_cache"].isnan().all(-1)[:, 0][past].all()) and not a["k_cache"][:, 0][~past].isnan().any()
    # one key: o_0 = v_0 for every sequence, exactly
    a = _stored(DEC_FIRST)
    assert torch.equal(a["o"], a["v_cache"][:, :, 0].double())


def test_operator_goldens_pin_what_their_oracles_say():
    from lla_verify.oracles.float64 import lla_forward
    from lla_verify.oracles.parallax import parallax_forward

    # r = 0: softmax attention (mpmath reference)
    a = _stored("px-zero-gaussian-f32-S16-D4")
    sm = softmax_attention(a["q"], a["k"], a["v"], qk_scale=gcat.get_golden("px-zero-gaussian-f32-S16-D4").case.build().qk_scale)
    assert _rel(a["o_mp"], sm) < 1e-13
    # the exact LLA probe: Parallax equals LLA's output on the same inputs, but for the probe's
    # rounding to float32 (the stored r is the case dtype's; a random probe is O(1) away)
    g = gcat.get_golden("px-lla-gaussian-f32-S16-D4")
    a, p = _stored(g.name), g.case.case.build()
    assert _rel(a["o_mp"], lla_forward(a["q"], a["k"], a["v"], ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)) < 1e-6
    # a decode golden's rows are the forward's rows (float64 noise apart)
    for name in (DEC, PXDEC):
        g = gcat.get_golden(name)
        p = g.case.build()
        if g.op == "lla-decode":
            fwd = lla_forward(p.q, p.k, p.v, ridge_lambda=gcat.decode_lambda(p), qk_scale=p.qk_scale)
        else:
            fwd = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        assert _rel(_stored(name)["o"], gcat.flat_rows(fwd)) < 1e-13, name


# the built-in correct implementations, and the planted bugs of lla_verify/testing/mutants.py
# with a golden each fails on (docs/goldens.md)
CORRECT = [("parallax", "parallax-dense"), ("parallax", "parallax-oracle"), ("lla-decode", "lla-decode-oracle"),
           ("parallax-decode", "parallax-decode-oracle")]
PLANTED = [
    ("parallax", "px_uncentred", PX_MEDIUM),
    ("parallax", "px_unnormalised_probe", PX_SMALL),
    ("parallax", "px_dropped_nu", "px-zero-gaussian-f32-S16-D4"),
    ("parallax", "px_unmasked_correction", PX_SMALL),
    ("lla-decode", "dec_off_by_one_length", DEC),
    ("lla-decode", "dec_stale_length", DEC),
    ("parallax-decode", "pxdec_off_by_one_length", PXDEC),
    ("parallax-decode", "pxdec_stale_length", PXDEC),
    ("parallax-decode", "pxdec_dropped_nu", PXDEC),
]


def _op_impl(op, spec):
    from lla_verify.commands.audit import resolve_op_impl

    return resolve_op_impl(op, spec, "cpu")


@pytest.mark.parametrize("op, impl", CORRECT, ids=[i for _, i in CORRECT])
def test_correct_operator_implementations_pass_their_goldens(op, impl, capsys):
    code, results = gcompare.compare(gstore.DEFAULT_DIR, _op_impl(op, impl), op=op, isolate=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert [r.name for r in results] == [g.name for g in gcat.select(None, op)]
    assert not any(r.skipped for r in results)
    for r in results:
        assert set(r.checks) == {"oracle", "forward", "stored"} and max(r.checks.values()) <= 1.0, (r.name, r.checks)


@pytest.mark.parametrize("op, mutant, golden", PLANTED, ids=[m for _, m, _ in PLANTED])
def test_planted_bugs_fail_the_operator_goldens(op, mutant, golden, capsys):
    code, results = gcompare.compare(gstore.DEFAULT_DIR, _op_impl(op, M + mutant), op=op, only=[golden],
                                     isolate=False)
    out = capsys.readouterr().out
    r, = results
    assert code == 1 and r.checks["forward"] > 1 and r.checks["stored"] > 1, out
    assert r.checks["oracle"] <= 1.0  # the golden is fine; the implementation is not
    assert f"{golden}  FAIL" in out


def test_compare_op_cli_and_usage_errors(capsys):
    # nine operator sections over three commands, each isolated: one kept child serves them
    # all instead of a spawn per section (lla_verify/testing/kept_worker.py)
    with kept_workers():
        _compare_op_cli_and_usage_errors(capsys)


def _compare_op_cli_and_usage_errors(capsys):
    only = ["first-token-f32-S1-D4", PX_SMALL, DEC_FIRST, PXDEC]
    base = ["goldens", "compare", "--op", "all", "--impl", "torch-fp32", "--parallax-impl", "parallax-dense",
            "--decode-impl", "lla-decode-oracle", "--parallax-decode-impl", "parallax-decode-oracle", "--only", *only]
    assert main(base) == 0
    out = capsys.readouterr().out
    for op in ("parallax", "lla-decode", "parallax-decode"):
        assert f"== {op}: " in out
    assert out.strip().splitlines()[-1].startswith("0 of 12 checks over threshold")
    # one operator's planted bug fails the whole compare, in its section
    bad = [a if a != "parallax-decode-oracle" else M + "pxdec_stale_length" for a in base]
    assert main(bad) == 1
    assert f"{PXDEC}  FAIL" in capsys.readouterr().out
    assert main(["goldens", "compare", "--op", "parallax", "--impl", M + "px_dropped_nu", "--only", PX_SMALL]) == 1
    capsys.readouterr()
    for args, msg in [
        (["--op", "nope", "--impl", "torch-fp32"], "--op: unknown operator 'nope'; expected 'all' or one of"),
        (["--op", "parallax", "--impl", "torch-fp32"], "torch-fp32"),
        (["--impl", "torch-fp32", "--parallax-impl", "parallax-dense"], "--parallax-impl: only with --op all"),
        (["--op", "parallax", "--impl", "parallax-dense", "--only", SMALL], "is of operator lla, not parallax"),
        (["--op", "all", "--impl", "torch-fp32", "--decode-impl", "nope"], "--decode-impl"),
    ]:
        assert main(["goldens", "compare", *args]) == 2, args
        assert msg in capsys.readouterr().err, args


def test_altered_operator_golden_is_caught(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    g = gcat.get_golden(PX_SMALL)
    path = folder / g.file
    arrays = load_file(str(path))
    arrays["r"][0, 0, 3, 1] *= 2  # an input of the Parallax operator
    save_file(arrays, str(path), metadata={"golden": json.dumps({"format": gstore.FORMAT, "name": g.name,
                                                                 "spec": g.spec, "operator": "parallax"})})
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", PX_SMALL]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {PX_SMALL}: hash mismatch in array r " in out and "inputs changed" in out
    code, results = gcompare.compare(folder, _op_impl("parallax", "parallax-dense"), op="parallax", only=[PX_SMALL],
                                     isolate=False)
    assert code == 1 and "hash mismatch in ['r']" in results[0].notes
    # a decode golden's stale length: the stored input no longer what the spec rebuilds
    d = gcat.get_golden(DEC)
    arrays = load_file(str(folder / d.file))
    arrays["lengths"][-1] -= 1
    save_file(arrays, str(folder / d.file))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", DEC]) == 1
    assert f"FAIL {DEC}: hash mismatch in array lengths " in capsys.readouterr().out


def test_operator_in_manifest_and_file_must_match(tmp_path, capsys):
    folder = _copy_goldens(tmp_path / "g")
    g = gcat.get_golden(PXDEC)
    # an entry without an operator is an LLA golden: here that contradicts the catalog and the file
    man = json.loads((folder / gstore.MANIFEST).read_text())
    for e in man["cases"]:
        if e["name"] == PXDEC:
            del e["operator"]
    (folder / gstore.MANIFEST).write_text(json.dumps(man))
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", PXDEC]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {PXDEC}: operator in manifest 'lla' != catalog 'parallax-decode'" in out
    assert f"operator stored in {g.file} 'parallax-decode' != operator of manifest entry {PXDEC!r} 'lla'" in out
    entry = next(e for e in gstore.load_manifest(folder)["cases"] if e["name"] == PXDEC)
    res = gcompare.compare_one(g, folder, entry, _op_impl("parallax-decode", "parallax-decode-oracle"), "cpu")
    assert res.checks == {"golden": float("inf")} and "operator in manifest 'lla' != catalog" in res.notes
    # an operator nobody knows: the manifest is refused
    _edit_manifest(folder, PXDEC, operator="softmax")
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", PXDEC]) == 1
    assert "has operator 'softmax'; expected one of" in capsys.readouterr().out
    # the file's own operator edited: named beside the manifest's
    _edit_manifest(folder, PXDEC, operator="parallax-decode")
    _rewrite_embedded(folder / g.file, operator="lla-decode")
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", PXDEC]) == 1
    assert f"operator stored in {g.file} 'lla-decode' != operator of manifest entry" in capsys.readouterr().out


# The Triton kernels of the other operators on goldens they take (D >= 16), through the
# interpreter here: one Parallax and one decode golden each, bf16 and fp32.
OP_KERNEL_GOLDENS = {
    "parallax-triton": ("parallax", ["px-random-gaussian-bf16-S33-D16", PX_MEDIUM]),
    "lla-decode-triton": ("lla-decode", [DEC, "dec-offset1e3-bf16-S33-D16"]),
    "lla-decode-keyed": ("lla-decode", [DEC, "dec-offset1e3-bf16-S33-D16"]),
    "parallax-decode-triton": ("parallax-decode", [PXDEC, "pxdec-small-eig-offset1e3-bf16-S33-D16"]),
}


@pytest.mark.interp
@pytest.mark.parametrize("kernel", list(OP_KERNEL_GOLDENS))
def test_operator_kernels_match_their_goldens_within_budgets(kernel, capsys):
    from lla_verify.cliutil import UsageError

    op, names = OP_KERNEL_GOLDENS[kernel]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from lla_verify.commands.audit import resolve_op_impl

        impl = resolve_op_impl(op, kernel, device)
    except UsageError as exc:
        pytest.skip(str(exc))
    code, results = gcompare.compare(gstore.DEFAULT_DIR, impl, device=device, only=names, op=op)
    out = capsys.readouterr().out
    assert [r.name for r in results] == names and not any(r.skipped for r in results), out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(f"0 of {3 * len(names)} checks over threshold"), out


# ------------------------------------------------------------------ float64 noise across CPUs
# The goldens were written on one CPU and are checked on others, whose float64 kernels round
# differently in the last bits: the checks below hold what is noise apart from what is not.

def _noisy(t: torch.Tensor, rel: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return t + rel * t.abs().clamp_min(1e-300) * torch.randn(t.shape, generator=gen, dtype=t.dtype)


def test_drift_takes_a_zero_gradient_at_the_losss_scale_and_still_sees_a_real_change():
    """const-values: dq, dk and d lambda are 0 in exact arithmetic and float64 noise in
    the stored file; noise of that size elsewhere is drift within noise, a change of 1e-9
    of the loss's gradient scale is not."""
    name = "const-values-f16-S16-D4"
    stored = gstore.read_arrays(gstore.DEFAULT_DIR / gcat.get_golden(name).file)
    fresh = dict(stored)
    fresh["dq"] = stored["dq"] + 3e-16 * torch.randn(stored["dq"].shape, generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64)
    assert gregen.drift(stored, fresh).ok, gregen.drift(stored, fresh)
    gscale = float(stored["dv"].square().mean().sqrt())
    fresh["dq"] = stored["dq"] + 1e-9 * gscale
    dr = gregen.drift(stored, fresh)
    assert not dr.ok and dr.where.startswith("dq"), dr


def test_drift_leaves_out_undefined_rows_and_holds_d_lambda_to_kappa_squared():
    name = "linear-values-lam0-f32-S100-D16"
    stored = gstore.read_arrays(gstore.DEFAULT_DIR / gcat.get_golden(name).file)
    und = stored["undefined"]
    assert bool(und.any())
    fresh = dict(stored)
    # kappa of an undefined row (a singular Sigma) is noise: any value there is no drift
    fresh["kappa"] = torch.where(und, stored["kappa"] * 3.0, stored["kappa"])
    assert gregen.drift(stored, fresh).ok
    fresh["kappa"] = torch.where(und, stored["kappa"], stored["kappa"] * (1 + 1e-6))
    assert not gregen.drift(stored, fresh).ok
    tols = gregen.key_tols(stored)
    c = gcat.conditioning(stored)
    assert tols["dlambda"] == pytest.approx(tols["o"] * c) and tols["dq"] == tols["o"]


def test_a_derived_probe_a_rounding_step_apart_is_judged_on_the_stored_one(monkeypatch, capsys):
    """The LLA probe is float64 rounded to float32: a step apart (another CPU) the check
    recomputes the outputs on the stored r and passes; several steps apart it fails."""
    from lla_verify.registry import parallax as rpx

    name = "px-lla-gaussian-f32-S16-D4"
    real = rpx.ParallaxCase.build
    stored_r = gstore.read_arrays(gstore.DEFAULT_DIR / gcat.get_golden(name).file)["r"]

    def shifted(steps):
        def build(self, device="cpu"):
            p = real(self, device)
            r = stored_r.clone()
            for _ in range(steps):  # steps ulps away from the stored probe
                r = torch.nextafter(r, torch.full_like(r, math.inf))
            p.r = r
            return p
        return build

    monkeypatch.setattr(rpx.ParallaxCase, "build", shifted(1))
    assert main(["goldens", "regen", "--check", "--only", name]) == 0
    out = capsys.readouterr().out
    assert "r rebuilds within one rounding" in out, out
    code, (res,) = gcompare.compare(gstore.DEFAULT_DIR, _op_impl("parallax", "parallax-dense"), op="parallax",
                                    only=[name], isolate=False)
    assert code == 0 and "judged on the stored r" in res.notes, res
    monkeypatch.setattr(rpx.ParallaxCase, "build", shifted(8))
    assert main(["goldens", "regen", "--check", "--only", name]) == 1
    assert "the case no longer rebuilds the stored inputs ['r']" in capsys.readouterr().out


def test_regen_keeps_values_within_float64_noise(tmp_path, monkeypatch, capsys):
    folder = _copy_goldens(tmp_path / "g")
    path = folder / gcat.get_golden(SMALL).file
    before = path.read_bytes()
    real = gregen.compute

    def noisy(g, r=None):
        out = real(g) if r is None else real(g, r=r)
        return {k: (_noisy(t, 1e-15) if k == "o" else t) for k, t in out.items()}

    monkeypatch.setattr(gregen, "compute", noisy)
    manifest = (folder / gstore.MANIFEST).read_bytes()
    assert main(["goldens", "regen", "--dir", str(folder), "--only", SMALL]) == 0
    out = capsys.readouterr().out
    assert "kept, drift within float64 noise" in out and "0 written" in out, out
    # nothing moved: neither the file nor the manifest (its date included) is rewritten
    assert path.read_bytes() == before and (folder / gstore.MANIFEST).read_bytes() == manifest
    assert main(["goldens", "regen", "--check", "--dir", str(folder), "--only", SMALL]) == 0


def test_an_array_of_another_shape_is_infinite_drift():
    a = torch.zeros(2, 3, dtype=torch.float64)
    assert gregen.rel_diff(a, torch.zeros(3, 2, dtype=torch.float64))[0] == math.inf
    stored = gstore.read_arrays(gstore.DEFAULT_DIR / gcat.get_golden(SMALL).file)
    fresh = dict(stored, o=stored["o"][..., :-1])
    dr = gregen.drift(stored, fresh)
    assert not dr.ok and dr.where.startswith("o") and dr.max_rel == math.inf, dr


def test_an_eigenvector_probe_moved_by_the_eigensolver_is_judged_on_the_stored_one(monkeypatch, capsys):
    """The small_eig probe follows the platform's eigensolver as far as its eigenvalue's gap
    allows (ParallaxCase.probe_cond): rebuilt through an eigensolver with a backward error
    of a few D u64 |C_i| (another CPU's LAPACK), a large-norm golden's probe moves by more
    than a float32 rounding step, and the check still passes, on the stored r; moved far
    past its derivation's noise, the check names r as changed."""
    from lla_verify.registry import parallax as rpx

    real = rpx._weighted_key_cov
    stored_r = gstore.read_arrays(gstore.DEFAULT_DIR / gcat.get_golden(PX_MEDIUM).file)["r"]

    def perturbed(t):
        def cov(q, k, scale):
            c = real(q, k, scale)
            e = torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            e = e + e.transpose(-1, -2)
            size = t * q.shape[-1] * torch.linalg.matrix_norm(c, ord=2)
            return c + e * (size / torch.linalg.matrix_norm(e, ord=2).clamp_min(1e-300))[..., None, None]
        return cov

    monkeypatch.setattr(rpx, "_weighted_key_cov", perturbed(4 * 2.0**-53))
    g = gcat.get_golden(PX_MEDIUM)
    rebuilt = g.case.build().r
    assert not torch.equal(rebuilt, stored_r)
    # the rounding step alone does not cover it: the eigensolver's share is needed
    assert gregen.derived_input_drift(stored_r, rebuilt, 0.0) > 1.0
    assert gregen.probe_drift(g, stored_r, rebuilt, 0.0) <= 1.0
    assert main(["goldens", "regen", "--check", "--only", PX_MEDIUM]) == 0
    assert "r rebuilds within one rounding" in capsys.readouterr().out
    code, (res,) = gcompare.compare(gstore.DEFAULT_DIR, _op_impl("parallax", "parallax-dense"), op="parallax",
                                    only=[PX_MEDIUM], isolate=False)
    assert code == 0, res
    monkeypatch.setattr(rpx, "_weighted_key_cov", perturbed(1e-3))
    assert main(["goldens", "regen", "--check", "--only", PX_MEDIUM]) == 1
    assert "the case no longer rebuilds the stored inputs ['r']" in capsys.readouterr().out
