"""The decode sweep tools' own logic (scripts/profile_decode_kernels.py): the variant syntax
that scripts/decode_sweeps.sh and scripts/decode_kernel_stats.py share, the constants set
and restored around a variant, and the summary table. Their GPU timings are commands, not
tests."""

import re
import subprocess
from pathlib import Path

import pytest

from tests import repo_scripts

ROOT = Path(__file__).resolve().parents[1]


def test_variant_syntax_and_its_constants_restored():
    prof = repo_scripts.load("profile_decode_kernels")
    import parallax_decode

    name, sets = prof.parse_variant("r16:parallax_decode.RESIDENT_PER_SM={16:16,32:16,64:16,128:8};"
                                    "parallax_decode.SPLIT_STAGES=4")
    assert name == "r16"
    assert sets == [("parallax_decode", "RESIDENT_PER_SM", {16: 16, 32: 16, 64: 16, 128: 8}),
                    ("parallax_decode", "SPLIT_STAGES", 4)]
    before = (dict(parallax_decode.RESIDENT_PER_SM), parallax_decode.SPLIT_STAGES)
    with pytest.raises(RuntimeError):
        with prof.applied(sets):
            assert parallax_decode.SPLIT_STAGES == 4 and parallax_decode.RESIDENT_PER_SM[64] == 16
            raise RuntimeError("a variant that fails")
    assert (parallax_decode.RESIDENT_PER_SM, parallax_decode.SPLIT_STAGES) == before


def test_variant_errors_name_what_is_wrong():
    prof = repo_scripts.load("profile_decode_kernels")
    with pytest.raises(SystemExit, match="MODULE.ATTR=VALUE"):
        prof.parse_variant("x:SPLIT_STAGES=4")
    with pytest.raises(SystemExit, match="parallax_decode has no SPLIT_STAGE"):
        with prof.applied([("parallax_decode", "SPLIT_STAGE", 4)]):
            pass


def test_summary_table():
    prof = repo_scripts.load("profile_decode_kernels")
    table = prof.summary({"1,1,4096,64": {"package": 1.48, "fused": 1.1}, "64,1,131072,64": {"package": 1.25}},
                         ["package", "fused"])
    assert table.splitlines() == ["| B,H,T,D | package | fused |", "|---|---|---|",
                                  "| 1,1,4096,64 | 1.48x | 1.10x |", "| 64,1,131072,64 | 1.25x | - |"]


def test_every_variant_of_the_sweep_script_names_a_constant(tmp_path):
    """Each --variant of scripts/decode_sweeps.sh sets constants that exist, with values of
    their type, so a GPU call does not spend its minutes on a typo."""
    import importlib

    prof = repo_scripts.load("profile_decode_kernels")
    text = (ROOT / "scripts" / "decode_sweeps.sh").read_text()
    for var, mod in (("$L", "lla_decode"), ("$K", "lla_decode.keyed"), ("$P", "parallax_decode")):
        text = text.replace(var + ".", mod + ".")
    text = re.sub(r"\$\(all (\d+)\)", lambda m: "{16:%s,32:%s,64:%s,128:%s}" % ((m.group(1),) * 4), text)
    variants = re.findall(r'--variant "([^"]+)"', text)
    assert len(variants) >= 20
    for spec in variants:
        _, sets = prof.parse_variant(spec)
        for mod, attr, value in sets:
            old = getattr(importlib.import_module(mod), attr)
            assert old is None or type(old) is type(value), (spec, attr, old, value)
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "decode_sweeps.sh"), str(tmp_path), "nosuch"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown sweep nosuch" in bad.stderr
