"""A fuzz test of the ``lla-verify`` command line: argument lists and case specs for
every subcommand, called in process through ``lla_verify.cli.main``.

For every generated command: the exit status is 0, 1 or 2, stderr holds no traceback,
and a command with a usage error in it (a bad value drawn for any option, a mutated
spec, a stray positional argument) exits 2. Only ``check`` ever runs a computation, on
problems of at most 2 x 2 x 4 x 8; every other command is drawn with at least one
usage error, and its work (the sweep, the search, the timing, the goldens) is replaced
by a function that fails the test if a usage error ever lets it start.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from lla_verify.commands import audit, bench, hunt
from lla_verify.commands import cg as cg_study
from lla_verify.commands import goldens
from lla_verify.registry.cases import FAMILIES, SEED_MAX, Case
from lla_verify.cli import COMMANDS, main
from lla_verify.testing.kept_worker import kept_workers

def fuzz(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))



NO_CUDA = not torch.cuda.is_available()
# argv on Linux holds no NUL; lone surrogates are argv's undecodable bytes, kept out so a
# captured stream behaves as a terminal's does
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
JUNK = TEXT.filter(lambda t: not t.startswith("-"))  # a positional nothing takes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile").write_text("not a folder")
    (root / "latin1.json").write_bytes(b"\xff\xfe{}")
    (root / "truncated.json").write_text('{"cells": [')
    (root / "nocells.json").write_text('{"schema": "lla-verify-audit/1", "cells": [{"ratio": "x"}]}')
    return root


@pytest.fixture(scope="module", autouse=True)
def no_long_work():
    """The work behind each command, replaced: reaching it on a usage error fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a command with a usage error started its work")

    with pytest.MonkeyPatch.context() as mp:
        for mod, name in ((audit, "run_audit"), (cg_study, "run_study"),
                          (hunt, "hill_climb"), (hunt, "random_search"), (bench, "_run"),
                          (goldens, "regen"), (goldens, "check"), (goldens, "compare_ops")):
            mp.setattr(mod, name, refuse)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_worker_process():
    """check runs its cell in a child process (trust.Worker): one kept child serves the
    module's commands instead of a fresh spawn per valid command (kept_worker.py)."""
    with kept_workers():
        yield


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err


def judge(argv, usage_error: bool, capsys):
    note(f"argv: {argv!r}")
    rc, err = run(argv, capsys)
    note(f"exit {rc}; stderr: {err!r}")
    assert "Traceback" not in err, err
    assert rc in (0, 1, 2), (rc, err)
    if usage_error:
        assert rc == 2, (rc, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error:" in lines[0], err
    else:
        assert rc in (0, 1), (rc, err)


# ------------------------------------------------------------------ case specs
@st.composite
def valid_case(draw) -> Case:
    """A tiny case: every parameter drawn in its family's range, S <= 4, D <= 8."""
    name = draw(st.sampled_from(sorted(FAMILIES)))
    params = {}
    for p in FAMILIES[name].params:
        if draw(st.booleans()):
            params[p.name] = float(draw(st.integers(int(p.lo), int(p.hi)))) if p.integer else \
                draw(st.floats(p.lo, p.hi, allow_nan=False))
    return Case(name, params, B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), S=draw(st.integers(1, 4)),
                D=draw(st.sampled_from((2, 4, 8))), dtype=draw(st.sampled_from(("float32", "bfloat16", "float16"))),
                seed=draw(st.integers(0, SEED_MAX)))


def _outside(p):
    below, above = p.lo - max(1.0, abs(p.lo)), p.hi * 10 + 1
    return st.sampled_from([below, above, math.nan, math.inf, -math.inf] + ([p.lo + 0.5] if p.integer else []))


@st.composite
def broken_spec(draw) -> str:
    """A spec with one mistake that must be refused as a usage error."""
    case = draw(valid_case())
    fam, ps, shape = case.spec().split(":")
    params = FAMILIES[case.family].params
    kind = draw(st.sampled_from(["range", "duplicate", "fullwidth", "no-equals", "unknown", "dtype", "size",
                                 "seed", "huge", "empty-item", "parts"]))
    if kind == "range":
        p = draw(st.sampled_from(params))
        ps = f"{p.name}={draw(_outside(p))}"
    elif kind == "duplicate":
        shape += ",S=2" if draw(st.booleans()) else ""
        ps = ps if shape.endswith("S=2") else f"{params[0].name}={params[0].easy},{params[0].name}={params[0].easy}"
    elif kind == "fullwidth":  # a digit Python's int() and float() read, our parser must not
        wide = chr(0xFF10 + draw(st.integers(0, 9)))
        if ps and draw(st.booleans()):
            ps = ps.replace("=", "=" + wide, 1)
        else:
            shape = shape.replace("S=", "S=" + wide, 1)
    elif kind == "no-equals":
        ps = params[0].name
    elif kind == "unknown":
        ps = (ps + "," if ps else "") + "zz=1"
    elif kind == "dtype":
        shape = shape.replace(f"dtype={case.dtype}", "dtype=" + draw(st.sampled_from(["float8", "int32", ""])))
    elif kind == "size":
        shape = shape.replace(f"B={case.B},", "B=0,", 1) if draw(st.booleans()) else shape.replace(f"D={case.D},", "D=-4,")
    elif kind == "seed":
        shape = shape.replace(f"seed={case.seed}", f"seed={draw(st.integers(SEED_MAX + 1, 10**30))}")
    elif kind == "huge":
        shape = shape.replace(f"S={case.S}", f"S={draw(st.integers(10**7, 10**15))}").replace(f"D={case.D}", "D=64")
    elif kind == "empty-item":
        ps = (ps + ",") if ps else ","
    else:
        return draw(st.sampled_from([f"{fam}:{ps}", f"{fam}:{ps}:{shape}:x", f"nofamily:{ps}:{shape}", ""]))
    return f"{fam}:{ps}:{shape}"


IMPL_OK = ("torch-fp32", "oracle-f64")
IMPL_BAD = (":", "nosuch", "nosuchmod_fuzz:fn", "lla_verify.testing.mutants:nosuch", "lla_verify.registry.cases:SEED_MAX", "")
DEVICE_BAD = ("tpu", "cuda:99", "") + (("cuda",) if NO_CUDA else ())


@fuzz(50)
@given(spec=broken_spec(), impl=st.sampled_from(IMPL_OK), backward=st.booleans())
def test_check_broken_spec(spec, impl, backward, capsys):
    judge(["check", "--case", spec, "--impl", impl] + (["--backward"] if backward else []), True, capsys)


@fuzz(40)
@given(data=st.data())
def test_check(data, capsys):
    """A tiny valid case run, or one usage error (spec, implementation, device, a stray word)."""
    wrong = data.draw(st.sampled_from(["none", "spec", "impl", "device", "junk", "none"]))
    spec = data.draw(broken_spec()) if wrong == "spec" else data.draw(valid_case()).spec()
    impl = data.draw(st.sampled_from(IMPL_BAD if wrong == "impl" else IMPL_OK))
    argv = ["check", "--case", spec, "--impl", impl]
    if wrong == "device" or data.draw(st.booleans()):
        argv += ["--device", data.draw(st.sampled_from(DEVICE_BAD)) if wrong == "device" else "cpu"]
    if data.draw(st.booleans()):
        argv.append("--backward")
    if wrong == "junk":
        argv.append(data.draw(JUNK))
    judge(argv, wrong != "none", capsys)


# ------------------------------------------------------------------ check --op
# the float64 references of each operator take any head dim; a Parallax case carries a probe
OP_IMPL_OK = {"lla": ("torch-fp32",), "parallax": ("parallax-oracle", "parallax-dense"),
              "lla-decode": ("lla-decode-oracle",), "parallax-decode": ("parallax-decode-oracle",)}
PROBE_OK = (";probe=zero", ";probe=random:amp=1")  # within every dtype's range on any family
PROBE_BAD = ("", ";probe=", ";probe=nosuch", ";probe=random:amp=0", ";probe=random:zz=1", ";probe=zero:amp=1",
             ";probe=random:amp=\uff11")
OP_BAD = ("nosuch", "", "LLA", "decode")


@fuzz(40)
@given(data=st.data())
def test_check_op(data, capsys):
    """--op with a tiny valid case, or one usage error (operator, spec, probe, implementation,
    a decode asked for gradients)."""
    op = data.draw(st.sampled_from(sorted(OP_IMPL_OK)))
    px = op.startswith("parallax")
    wrong = data.draw(st.sampled_from(["none", "op", "spec", "probe", "impl", "backward", "none"]))
    if wrong == "probe" and not px:
        wrong = "none"
    if wrong == "backward" and op in ("lla", "parallax"):
        wrong = "none"
    case = data.draw(valid_case())
    if px and case.dtype == "float16":  # a random probe may leave float16's range: keep to the others
        case = Case(case.family, case.params, B=case.B, H=case.H, S=case.S, D=case.D, seed=case.seed)
    spec = data.draw(broken_spec()) if wrong == "spec" else case.spec()
    if px:
        spec += data.draw(st.sampled_from(PROBE_BAD if wrong == "probe" else PROBE_OK))
    impl = data.draw(st.sampled_from(IMPL_BAD if wrong == "impl" else OP_IMPL_OK[op]))
    argv = ["check", "--op", data.draw(st.sampled_from(OP_BAD)) if wrong == "op" else op, "--case", spec,
            "--impl", impl]
    if wrong == "backward" or (op in ("lla", "parallax") and data.draw(st.booleans())):
        argv.append("--backward")
    judge(argv, wrong != "none", capsys)


@fuzz(30)
@given(spec=TEXT)
def test_check_arbitrary_spec_text(spec, capsys):
    rc, err = run(["check", "--case", spec, "--impl", "torch-fp32"], capsys)
    assert "Traceback" not in err and rc in (0, 1, 2), (spec, rc, err)


# ------------------------------------------------------------------ the other commands
def options(table: dict, files, data) -> tuple[list[str], list[str]]:
    """Draw each option of ``table`` (name -> (valid values, invalid values)) or leave it
    out; at least one invalid. Returns argv and the names drawn invalid."""
    argv, bad = [], []
    names = sorted(table)
    forced = data.draw(st.sampled_from([n for n in names if table[n][1]] + ["junk"]))
    for name in names:
        good, wrong = table[name]
        if name != forced and not data.draw(st.booleans()):
            continue
        # one usage error at a time, so each check must catch its own; now and then a second
        use_bad = name == forced or (bool(wrong) and data.draw(st.integers(0, 7)) == 0)
        pool = wrong if use_bad else good
        if not pool:
            continue
        val = data.draw(st.sampled_from(pool))
        argv += [name] + [v.format(root=files) for v in (val if isinstance(val, tuple) else (val,)) if v is not None]
        if use_bad:
            bad.append(name)
    if forced == "junk":
        argv.append(data.draw(JUNK))
        bad.append("junk")
    return argv, bad


OUT_BAD = ("{root}/afile", "{root}/afile/sub", "")
AUDIT = {
    "--impl": (("torch-fp32",), IMPL_BAD + ("flashlla",)),
    "--seed": (("0", "7"), ("-1", str(SEED_MAX + 1), "x", "\uff11", "1e3")),
    "--cells": (("0:1", "3:5"), ("three", "9999:", "5:5", "1:2:3")),
    "--only": (("gaussian:lam=0.1:",), ("no-such-cell",)),
    "--device": (("cpu",), DEVICE_BAD),
    "--regression-factor": (("2", "1"), ("0.5", "nan", "x", "-inf")),
    "--regression-floor": (("0.5", "0"), ("-1", "nan")),
    "--baseline": ((), ("{root}/missing.json", "{root}/latin1.json", "{root}/truncated.json", "{root}/nocells.json",
                        "{root}", "{root}/afile")),
    "--out": (("{root}/out",), OUT_BAD),
    "--merge": ((), (("{root}/latin1.json",), ("{root}/nocells.json", "{root}/truncated.json"),
                     ("{root}/missing.json",))),
    "--quick": (((None,),), ()),
    "--ops": (("lla", "all", "lla,parallax"), ("nosuch", "", "lla,,parallax", "LLA")),
    "--parallax-impl": (("parallax-oracle",), IMPL_BAD + ("triton",)),
    "--decode-impl": (("lla-decode-oracle",), IMPL_BAD + ("parallax-decode-oracle",)),
    "--parallax-decode-impl": (("parallax-decode-oracle",), IMPL_BAD + ("lla-decode-oracle",)),
}


@fuzz(40)
@given(data=st.data())
def test_audit(data, files, capsys):
    argv, bad = options(AUDIT, files, data)
    if data.draw(st.integers(0, 4)) == 0:  # --quick with --full is argparse's usage error
        argv += ["--quick", "--full"]
    judge(["audit"] + argv, bool(bad), capsys)


CG = {
    "--impl": (("none", "torch-fp32"), IMPL_BAD),
    "--kappas": (("1", "9"), ("0", "-3", "1001", "x", "2.5")),
    "--tol": (("1e-3",), ("-1", "nan", "0", "1", "inf", "x")),
    "--max-iters": (("0", "5"), ("-5", "x", str(2**31))),
    "--device": (("cpu",), DEVICE_BAD),
    "--seed": (("0",), ("-1", str(SEED_MAX + 1))),
    "--out": (("{root}/cg",), OUT_BAD),
}


@fuzz(30)
@given(data=st.data())
def test_cg(data, files, capsys):
    argv, bad = options(CG, files, data)
    judge(["cg", "--no-progress"] + argv, bool(bad), capsys)


HUNT = {
    "--impl": (("torch-fp32",), IMPL_BAD),
    "--family": (("gaussian", "all"), ("nope", "")),
    "--evals": (("1",), ("0", "-1", "x")),
    "--seq": (("2",), ("0", "-2", "x")),
    "--head-dim": (("4",), ("0", "x")),
    "--seed": (("0",), ("-4", str(SEED_MAX + 1))),
    "--device": (("cpu",), DEVICE_BAD),
    "--dtype": (("float32",), ("float8", "fp32")),
    "--out": (("{root}/hunt",), OUT_BAD),
    "--op": (("lla",), ("nope", "", "LLA", "parallax-decoder")),
    # the LLA operator has no probe: any --probe is refused with --op lla
    "--probe": ((), ("zero", "all", "nope")),
}


@fuzz(30)
@given(data=st.data())
def test_hunt(data, files, capsys):
    argv, bad = options(HUNT, files, data)
    judge(["hunt"] + argv, bool(bad), capsys)


BENCH = {
    "--shapes": (("1,1,16,16",), ("1,2", "x", "1,1,0,16", "")),
    "--dtype": (("bf16",), ("fp64",)),
    "--ridge-lambda": (("0.1",), ("0", "nan", "-1", "1e9")),
    "--precisions": (("ieee",), ("fp64", "ieee,", "")),
    "--configs": (("64,64,4,2",), ("64,64", "a,b,c,d")),
    "--cg-tol": (("1e-4",), ("0", "nan", "2")),
    "--fixed-iters": (("8",), ("0", "-1")),
    "--oracle-heads": (("1",), ("0",)),
    "--mem-seqs": (("16",), ("x", "0", "16,")),
    "--warmup": (("1",), ("0",)),
    "--rep": (("1",), ("-5",)),
    "--out": (("{root}/bench.md",), ("{root}", "{root}/afile/x", "{root}/missing/x.md")),
}


@fuzz(30)
@given(data=st.data())
def test_bench(data, files, capsys):
    argv, bad = options(BENCH, files, data)
    judge(["bench"] + argv, bool(bad), capsys)


@fuzz(30)
@given(data=st.data())
def test_goldens(data, files, capsys):
    action = data.draw(st.sampled_from(["regen", "compare", "list", "none"]))
    if action == "none":
        judge(["goldens"], True, capsys)  # no action: the help, exit 2
        return
    if action == "list":
        junk = data.draw(st.one_of(st.none(), JUNK))
        judge(["goldens", "list"] + ([junk] if junk is not None else []), junk is not None, capsys)
        return
    table = {"--only": (("gaussian-f32-S16-D4-H2",), ("nosuch",)),
             "--dir": ((), ("{root}/afile",) + (("{root}/missing",) if action == "compare" else ()))}
    if action == "regen":
        table["--check"] = (((None,),), ())
        table["--force"] = ((), ((None,),))  # with --check: refused; alone it would rewrite the goldens
        table["--dir"] = ((), ("{root}/afile", "{root}/afile/x"))
    else:
        table["--impl"] = (("torch-fp32",), IMPL_BAD)
        table["--device"] = (("cpu",), DEVICE_BAD)
        table["--op"] = (("lla",), ("nope", "", "LLA"))
        # the other operators' implementations: only with --op all, refused beside --op lla
        table["--parallax-impl"] = ((), ("parallax-oracle", "nope"))
        table["--decode-impl"] = ((), ("lla-decode-oracle",))
    argv, bad = options(table, files, data)
    if action == "regen" and "--force" in argv and "--check" not in argv:
        argv.append("--check")  # --force alone is valid: the pair is the usage error
    if action == "compare" and "--impl" not in argv:
        argv += ["--impl", "torch-fp32"]
    judge(["goldens", action] + argv, bool(bad), capsys)


@fuzz(10)
@given(junk=st.lists(JUNK, max_size=2))
def test_info(junk, capsys):
    judge(["info"] + junk, bool(junk), capsys)


@pytest.mark.skipif("suite" not in COMMANDS, reason="no suite command in this version")
@fuzz(10)
@given(argv=st.one_of(
    st.lists(JUNK, max_size=2).map(lambda j: ["suite"] + j),  # no --impl
    st.sampled_from(IMPL_BAD).map(lambda i: ["suite", "--impl", i]),
    st.sampled_from(("tpu", "", "gpu")).map(lambda d: ["suite", "--impl", "torch-fp32", "--device", d])))
def test_suite_usage_errors(argv, capsys):
    # a valid call starts pytest on the whole suite: only usage errors are drawn
    judge(argv, True, capsys)


@fuzz(10)
@given(cmd=TEXT.filter(lambda t: t not in COMMANDS), junk=st.lists(TEXT, max_size=2))
def test_any_first_word(cmd, junk, capsys):
    rc, err = run([cmd] + junk, capsys)  # argparse: --help exits 0, anything else 2
    assert "Traceback" not in err and rc in (0, 2), (cmd, junk, rc, err)
