"""The kernels compile for a GPU target on this machine (lla_verify/testing/compile_check.py).

The interpreter never lowers a kernel; this compiles one configuration of each package
(lla_triton and parallax_triton forward and backward, the decode kernels of lla_decode and
parallax_decode) to an sm_90 cubin, with the launch-time shared-memory check, so a kernel
the GPU compiler rejects fails CI without a GPU. `make compile-check` runs every dtype
and head dim.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, as on a new machine
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, "-m", "lla_verify.testing.compile_check", "--json", str(out), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    return run, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("pkg", ["lla_triton", "parallax_triton"])
def test_forward_and_backward_compile_for_sm90(tmp_path, pkg):
    run, doc = _run(tmp_path, "--dims", "16", "--only", f"{pkg} float32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (res,) = doc["results"]
    names = {k["kernel"] for k in res["kernels"] if not k["rejected"]}
    assert res["ok"] and len(names) >= 3, res  # a forward and at least two backward kernels


# every launch of a decode call; lla_decode's split kernel holds the fp64 tl.dot
DECODE_KERNELS = {
    "lla_decode": {"_lla_split_kernel", "_lla_sigma_sum_kernel", "_lla_solve_kernel", "_lla_out_kernel",
                   "_lla_finish_kernel", "_keyed_stats_kernel", "_keyed_start_kernel", "_keyed_product_kernel",
                   "_keyed_update_kernel"},
    "parallax_decode": {"_parallax_split_kernel", "_parallax_group_kernel", "_parallax_combine_kernel"},
}


@pytest.mark.parametrize("pkg", sorted(DECODE_KERNELS))
def test_decode_compiles_for_sm90_at_the_gpu_tile(tmp_path, pkg):
    run, doc = _run(tmp_path, "--dims", "16", "--only", f"{pkg} float32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (res,) = doc["results"]
    assert res["ok"], res
    assert {k["kernel"] for k in res["kernels"] if not k["rejected"]} == DECODE_KERNELS[pkg], res
    # the configuration a GPU launch takes, not the interpreter's: lla_decode's tile is
    # larger than the interpreter's; parallax_decode shares its 16-position tile with the
    # interpreter, and its GPU launch shows in the one-warp split and the combine's chunk
    module = __import__(pkg)
    tiles = {k["constexprs"]["BLOCK_N"] for k in res["kernels"] if "BLOCK_N" in k["constexprs"]}
    if pkg == "parallax_decode":
        assert tiles == {module.BLOCK_N}, res
    else:
        # the Sigma pass on the package's tile; the passes on splits of their own on theirs
        from lla_decode import keyed

        assert tiles == {module.BLOCK_N, module.OUT_BLOCK_N, keyed.KEY_PASS_BLOCK_N, keyed.KEY_STATS_BLOCK_N}, res
        assert {k["constexprs"]["BLOCK_N"] for k in res["kernels"] if k["kernel"] == "_lla_split_kernel"} == \
            {module.BLOCK_N}, res
    if pkg == "parallax_decode":
        split = [k for k in res["kernels"] if k["kernel"] == "_parallax_split_kernel"]
        assert {k["num_warps"] for k in split} == {module.SPLIT_WARPS}, res
        # the fused combine's variant of the split kernel compiled besides the plain one
        assert {k["constexprs"].get("FUSED") for k in split} == {0, 1}, res
        chunks = {k["constexprs"]["CHUNK"] for k in res["kernels"]
                  if "CHUNK" in k["constexprs"] and k["kernel"] != "_parallax_split_kernel"}
        assert chunks == {module.combine_chunk(16, interp=False)} != {module.INTERPRETED_COMBINE_CHUNK}, res
    else:
        assert module.BLOCK_N != module.INTERPRETED_BLOCK_N, res
        # the Sigma kernels both ungated and gated (the keyed solve's hand-over)
        for name in ("_lla_split_kernel", "_lla_sigma_sum_kernel", "_lla_solve_kernel"):
            assert {k["constexprs"].get("GATED") for k in res["kernels"] if k["kernel"] == name} == {0, 1}, name
