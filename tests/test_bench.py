"""The bench's accuracy column: its case comes from the registry and its verdict is the
audit's (budget.check_forward), so "within budget" in docs/performance.md means what it
means everywhere else. The timing itself needs a GPU and is a command, not a test."""

import torch

from lla_verify.commands.bench import check_case, judge
from lla_verify.registry.cases import parse_case
from lla_verify.oracles.float64 import lla_forward


def _problem():
    case = check_case(S=24, D=16, heads=2, ridge_lambda=0.1, dtype_name="bfloat16")
    return case, case.build()


def test_check_case_is_reproducible_from_its_spec():
    case, prob = _problem()
    again = parse_case(case.spec()).build()
    assert case.family == "gaussian" and prob.q.shape == (1, 2, 24, 16) and prob.q.dtype == torch.bfloat16
    for a, b in ((prob.q, again.q), (prob.k, again.k), (prob.v, again.v)):
        assert torch.equal(a, b)
    assert float(prob.ridge_lambda) == float(torch.tensor(0.1, dtype=torch.float32))


def test_judge_passes_the_rounded_oracle_and_names_an_output_off_by_its_budget():
    case, prob = _problem()
    o64 = lla_forward(prob.q, prob.k, prob.v, ridge_lambda=prob.ridge_lambda, qk_scale=prob.qk_scale)
    good = judge(prob, o64.to(torch.bfloat16))
    assert good.passed and good.ratio <= 1.0, good.message
    # one query of the float64 output moved by 3x what it is allowed (the float64
    # output's own budget): the verdict must fail there, by that ratio, and say where
    allowed = judge(prob, o64).per_query["allowed"]
    bad_o = o64.clone()
    i = 17
    bad_o[0, 1, i, 0] += 3.0 * float(allowed[0, 1, i])
    bad = judge(prob, bad_o, name="planted:bench output off by 3x its budget")
    assert not bad.passed and 2.9 < bad.ratio < 3.1, bad.message
    assert bad.worst == (0, 1, i), bad.message
    assert case.spec() in bad.message and "kappa" in bad.message


# ----------------------------------------------------------- bench-parallax, bench-decode
# Both run here with --smoke (the CPU interpreter, one tiny shape): the timings mean
# nothing, but the table's columns, the accuracy verdicts on the timed output and the
# exit status are the real code path. A planted wrong kernel must show as a FAIL in the
# accuracy column and exit 1.

import os  # noqa: E402

import pytest  # noqa: E402

from lla_verify.cli import main  # noqa: E402

PARALLAX_COLUMNS = ["B,H,S,D", "fwd ms", "fwd ms, synced", "SDPA fwd ms", "fwd / SDPA", "fwd <= 2x SDPA",
                    "fwd err / budget", "fwd+bwd ms", "SDPA fwd+bwd ms", "fwd+bwd / SDPA", "fwd+bwd <= 2.5x SDPA",
                    "grads err / budget"]
PARALLAX_MEMORY_COLUMNS = ["S,D", "inputs MiB (q,k,v,r)", "fwd MiB", "fwd bytes per S*D", "fwd+bwd MiB",
                           "fwd+bwd bytes per S*D", "SDPA fwd MiB", "SDPA fwd+bwd MiB"]
DECODE_COLUMNS = ["B,H,T,D", "kernel", "ms", "ms, synced", "SDPA ms", "/ SDPA", "target", "met", "CG iters mean/max",
                  "cache GB/s", "/ measured peak", "/ nominal peak", "rel err vs f64", "err / allowed"]

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="--smoke runs the Triton kernels through the interpreter "
                                              "(TRITON_INTERPRET=1 before they are imported)")


def _tables(text: str) -> list[tuple[list[str], list[dict]]]:
    """Every markdown table in ``text``: (its columns, its rows as column -> cell)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                rows.append(dict(zip(cols, cells)))
            out.append((cols, rows))
    return out


def _run(tmp_path, *argv):
    out = tmp_path / "table.md"
    status = main([*argv, "--smoke", "--no-progress", "--out", str(out)])
    return status, out.read_text()


@needs_interpreter
def test_bench_parallax_smoke_table(tmp_path):
    status, text = _run(tmp_path, "bench-parallax")
    assert status == 0, text
    assert text.startswith("command: lla-verify bench-parallax ") and "--smoke" in text.splitlines()[0]
    device = text.splitlines()[1]
    assert "SMOKE RUN" in device and "torch " in device and "triton " in device
    (cols, rows), (mcols, mrows) = _tables(text)
    assert cols == PARALLAX_COLUMNS and mcols == PARALLAX_MEMORY_COLUMNS
    assert [r["B,H,S,D"] for r in rows] == ["1,2,32,16"]
    # both verdicts judged and within budget: numbers, not 'not judged'
    for key in ("fwd err / budget", "grads err / budget"):
        assert 0.0 <= float(rows[0][key]) <= 1.0, rows[0]
    assert rows[0]["fwd <= 2x SDPA"] in ("met", "NOT MET")
    assert [r["S,D"] for r in mrows] == ["32,16"] and mrows[0]["fwd MiB"] == "n/a (no CUDA)"


@needs_interpreter
@pytest.mark.parametrize("mutant", ["px_dropped_nu", "px_unnormalised_probe"])
def test_bench_parallax_planted_kernel_fails_its_accuracy_column(tmp_path, mutant):
    status, text = _run(tmp_path, "bench-parallax", "--mem-seqs", "",
                        "--impl", f"lla_verify.testing.mutants:{mutant}")
    (cols, rows), = _tables(text)
    assert status == 1, text
    assert "FAIL" in rows[0]["fwd err / budget"], rows[0]
    assert f"[lla_verify.testing.mutants:{mutant}] parallax forward FAIL" in text


@needs_interpreter
def test_bench_parallax_refuses_a_tensor_subclass_output(tmp_path):
    status, text = _run(tmp_path, "bench-parallax", "--mem-seqs", "",
                        "--impl", "tests.bench_planted:parallax_forward_subclass")
    (cols, rows), = _tables(text)
    assert status == 1, text
    assert rows[0]["fwd err / budget"] == "inf FAIL (implementation)", rows[0]
    assert ("[tests.bench_planted:parallax_forward_subclass] returned a _Lazy (a torch.Tensor subclass) as o; "
            "a plain torch.Tensor is required") in text


@needs_interpreter
def test_bench_decode_smoke_table(tmp_path):
    status, text = _run(tmp_path, "bench-decode")
    assert status == 0, text
    assert text.startswith("command: lla-verify bench-decode ") and "SMOKE RUN" in text.splitlines()[1]
    assert "peak bandwidth: measured device-to-device copy" in text and "nominal" in text
    (cols, rows), = _tables(text)
    assert cols == DECODE_COLUMNS
    # the default solver is auto's choice, named in the row: the Sigma solve at D = 16
    assert [r["kernel"] for r in rows] == ["SDPA", "parallax_decode", "lla_decode (sigma)"]
    assert {r["B,H,T,D"] for r in rows} == {"2,1,48,16"}
    px, lla = rows[1], rows[2]
    assert px["target"] == "<= 1.2x"
    mean, mx = lla["CG iters mean/max"].split("/")
    assert float(mean) <= int(mx) and lla["target"] == f"<= {int(mx) + 2}x"
    for r in (px, lla):
        assert 0.0 <= float(r["err / allowed"]) <= 1.0, r


@needs_interpreter
def test_bench_decode_planted_off_by_one_fails_its_accuracy_column(tmp_path):
    status, text = _run(tmp_path, "bench-decode", "--lla-impl", "tests.bench_planted:lla_off_by_one",
                        "--parallax-impl", "tests.bench_planted:parallax_off_by_one")
    (cols, rows), = _tables(text)
    assert status == 1, text
    for r in rows[1:]:
        assert r["err / allowed"].endswith("FAIL"), r
    assert text.count("FAIL: ") == 2
    # an external lla_decode reports no iterations and so has no target
    assert rows[2]["CG iters mean/max"] == "n/a (external impl)" and rows[2]["target"] == "-"


DECODE_GRAPH_COLUMNS = ["graph ms", "graph / SDPA graph", "graph / measured peak", "graph met", "graph err / allowed"]


@needs_interpreter
def test_bench_decode_times_the_keyed_solver(tmp_path):
    """--lla-solver keyed: lla_decode's keyed solve timed and judged like the Sigma one, its
    iterations reported; on the CPU its graph columns run its plan (the fixed launch schedule)."""
    status, text = _run(tmp_path, "bench-decode", "--kernels", "lla", "--lla-solver", "keyed", "--graphs")
    assert status == 0, text
    assert "--lla-solver keyed" in text.splitlines()[0]
    (cols, rows), = _tables(text)
    assert [r["kernel"] for r in rows] == ["SDPA", "lla_decode (keyed)"]
    mean, mx = rows[1]["CG iters mean/max"].split("/")
    assert 0 < float(mean) <= int(mx) and rows[1]["target"] == f"<= {int(mx) + 2}x"
    assert 0.0 <= float(rows[1]["err / allowed"]) <= 1.0 and 0.0 <= float(rows[1]["graph err / allowed"]) <= 1.0


@needs_interpreter
def test_bench_decode_graph_columns(tmp_path):
    """--graphs adds the graph columns (on the CPU each 'replay' is the plain call, the plan's
    run for parallax_decode), judged like the plain call's output."""
    status, text = _run(tmp_path, "bench-decode", "--graphs")
    assert status == 0, text
    assert "--graphs on the CPU: no graph is captured" in text
    (cols, rows), = _tables(text)
    assert cols == DECODE_COLUMNS + DECODE_GRAPH_COLUMNS
    assert [r["kernel"] for r in rows] == ["SDPA", "parallax_decode", "lla_decode (sigma)"]
    assert rows[0]["graph / SDPA graph"] == "1.00x"
    for r in rows[1:]:
        assert float(r["graph ms"]) > 0 and r["graph met"] in ("met", "NOT MET"), r
        assert 0.0 <= float(r["graph err / allowed"]) <= 1.0, r
    # one cache for every row: fraction x graph time is the cache's bytes over the peak, the
    # same for each row (to the column's 3 significant digits and the time's 4 decimals)
    moved = [float(r["graph / measured peak"]) * float(r["graph ms"]) for r in rows]
    assert all(m > 0 for m in moved) and max(moved) / min(moved) < 1.01, (moved, rows)


@needs_interpreter
def test_bench_decode_graph_output_is_judged(tmp_path):
    status, text = _run(tmp_path, "bench-decode", "--graphs", "--lla-impl", "tests.bench_planted:lla_off_by_one",
                        "--parallax-impl", "tests.bench_planted:parallax_off_by_one")
    (cols, rows), = _tables(text)
    assert status == 1, text
    for r in rows[1:]:
        assert r["graph err / allowed"].endswith("FAIL"), r
    assert text.count(" graph at 2,1,48,16: head (0, 0) error") == 2, text


@needs_interpreter
def test_bench_decode_refuses_a_tensor_subclass_output(tmp_path):
    """The trust boundary's rule (trust.check_tensor) in both the plain and the graph columns:
    an output that is not a plain torch.Tensor is not judged, and the run fails."""
    status, text = _run(tmp_path, "bench-decode", "--graphs", "--kernels", "parallax",
                        "--parallax-impl", "tests.bench_planted:parallax_subclass")
    (cols, rows), = _tables(text)
    assert status == 1, text
    row = rows[1]
    assert row["rel err vs f64"].startswith("not judged: returned a _Lazy (a torch.Tensor subclass)"), row
    assert row["err / allowed"] == "FAIL" and row["graph err / allowed"] == "FAIL", row
    assert "FAIL: parallax_decode at 2,1,48,16: returned a _Lazy" in text
    assert "FAIL: parallax_decode graph at 2,1,48,16: returned a _Lazy" in text


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="captures CUDA graphs")
def test_graphed_replays_the_plan_and_names_a_call_it_cannot_capture():
    import parallax_decode

    from lla_verify.commands.bench_decode import graphed

    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(2, 1, 300, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    q, r = (torch.randn(2, 1, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([300, 17])
    plan = parallax_decode.parallax_decode_plan(k, v, lengths)
    replay, out = graphed(lambda: plan.run(q, r, check_finite=False))
    q.copy_(torch.randn(q.shape, device="cuda", generator=g))  # a replay reads q as it is then
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, parallax_decode.parallax_decode(q, r, k, v, lengths))
    import lla_decode

    lplan = lla_decode.lla_decode_plan(k, v, lengths, ridge_lambda=0.1)
    replay, out = graphed(lambda: lplan.run(q, check_finite=False))
    q.copy_(torch.randn(q.shape, device="cuda", generator=g))
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=0.1))
    # the keyed solve's plan: every launch made and gated on the device, so it captures too
    kplan = lla_decode.lla_decode_plan(k, v, lengths, ridge_lambda=0.1, solver="keyed")
    replay, out = graphed(lambda: kplan.run(q, check_finite=False))
    q.copy_(torch.randn(q.shape, device="cuda", generator=g))
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=0.1, solver="keyed"))
    # the fused Parallax combine's plan: its count is the plan's, left zero by every replay
    fused = parallax_decode.FUSED_MAX_SPLITS
    parallax_decode.FUSED_MAX_SPLITS = 1 << 30
    try:
        fplan = parallax_decode.parallax_decode_plan(k, v, lengths)
    finally:
        parallax_decode.FUSED_MAX_SPLITS = fused
    replay, out = graphed(lambda: fplan.run(q, r, check_finite=False))
    for _ in range(2):
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, parallax_decode.parallax_decode(q, r, k, v, lengths))
    assert int(fplan.count.abs().sum()) == 0
    # a device-to-host read inside the capture, in a process of its own: a failed capture may
    # leave the CUDA context unusable for the tests after it in this worker
    import subprocess
    import sys

    code = ("import torch\n"
            "from lla_verify.commands.bench_decode import GraphUnavailable, graphed\n"
            "q = torch.ones(4, device='cuda')\n"
            "try:\n"
            "    graphed(lambda: q * float(q.sum()))\n"
            "    print('captured')\n"
            "except GraphUnavailable as exc:\n"
            "    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.startswith("not capturable: "), run.stdout + run.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["bench-parallax", "bench-decode"])
def test_bench_without_cuda_exits_2_with_one_line(command, capsys):
    assert main([command, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a CUDA device" in err and "--smoke" in err, err


def test_decode_accuracy_rule_passes_the_rounded_reference_and_fails_past_its_ulps():
    from lla_verify.commands.bench_decode import DECODE_ULPS, accuracy, nominal_bandwidth

    g = torch.Generator().manual_seed(3)
    ref = torch.randn(64, generator=g, dtype=torch.float64)
    rel, over = accuracy(ref.to(torch.bfloat16), ref)
    assert 0 < rel <= 2.0**-8 and over <= 1.0 / DECODE_ULPS
    # moved along a random direction by 1.5x what is allowed: a FAIL by that ratio
    d = torch.randn(64, generator=g, dtype=torch.float64)
    allowed = DECODE_ULPS * 2.0**-8 * float(ref.norm())
    bad = (ref + 1.5 * allowed * d / d.norm()).to(torch.bfloat16)
    assert 1.3 < accuracy(bad, ref)[1] < 1.7
    nan = ref.to(torch.bfloat16).clone()
    nan[5] = float("nan")
    assert accuracy(nan, ref)[1] == float("inf")
    assert nominal_bandwidth("NVIDIA H200") == 4.8e12 and nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert nominal_bandwidth("NVIDIA H100 PCIe") is None and nominal_bandwidth("NVIDIA A100-SXM4-80GB") is None


@needs_interpreter
@pytest.mark.parametrize("argv, flag", [
    (["bench-parallax", "--shapes", "1,2"], "--shapes"),
    (["bench-parallax", "--shapes", "1,1,32,24"], "--shapes"),
    (["bench-parallax", "--mem-seqs", "0"], "--mem-seqs"),
    (["bench-parallax", "--mem-dim", "48"], "--mem-dim"),
    (["bench-parallax", "--impl", ":"], "--impl"),
    (["bench-parallax", "--impl", "nosuch_module_x:fn"], "--impl"),
    (["bench-decode", "--batches", "0"], "--batches"),
    (["bench-decode", "--caches", "4k"], "--caches"),
    (["bench-decode", "--dims", "48"], "--dims"),
    (["bench-decode", "--kernels", "lla,flash"], "--kernels"),
    (["bench-decode", "--lla-impl", "nosuch_module_x:fn"], "--lla-impl"),
    (["bench-decode", "--parallax-impl", "parallax_decode:nosuch"], "--parallax-impl"),
    (["bench-decode", "--ridge-lambda", "nan"], "--ridge-lambda"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bench_bad_argument_is_one_line_exit_2(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main([*argv, "--smoke", "--no-progress"])
    except SystemExit as exc:  # argparse's own type errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not list(tmp_path.iterdir())


@needs_interpreter
@pytest.mark.parametrize("command", ["bench-parallax", "bench-decode"])
def test_bench_out_folder_is_refused_before_any_work(command, tmp_path, capsys):
    rc = main([command, "--smoke", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr()
    assert rc == 2 and "--out" in err.err and "command:" not in err.out, err
