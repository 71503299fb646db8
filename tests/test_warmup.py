"""lla_verify/testing/warmup.py: one process per configuration, failures reported, not raised."""

from lla_verify.testing import warmup


def test_warm_runs_each_configuration_and_reports_failures(monkeypatch):
    # the interpreter stands in for the compiler on CPU: the same calls, no cubins
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = warmup.warm(["parallax_decode", "nosuch"], ["float32"], [16], device="cpu", jobs=2, progress=False)
    assert [(p, dt, d) for p, dt, d, _, _ in res] == [("nosuch", "float32", 16), ("parallax_decode", "float32", 16)]
    by = {p: err for p, _, _, _, err in res}
    assert by["parallax_decode"] is None
    assert "package: expected one of" in by["nosuch"]


def test_lla_variants_compile_the_flags_the_properties_use(monkeypatch):
    # the convergence properties call the forward with CG statistics under both
    # preconditioners, the Parallax reduction with rho: each a compile of its own
    import lla_triton

    calls = []
    monkeypatch.setattr(lla_triton, "lla_attention", lambda *a, **kw: calls.append(kw))
    warmup.run_one("lla_triton-cg", "float32", 16, device="cpu")
    assert [(kw.get("return_stats"), kw.get("preconditioner")) for kw in calls] == [(True, "none"), (True, "jacobi")]
    calls.clear()
    warmup.run_one("lla_triton-rho", "float32", 16, device="cpu")
    assert [kw.get("return_rho") for kw in calls] == [True]
    assert set(warmup.LLA_VARIANTS) <= set(warmup.DEFAULT_PACKAGES)


def _launches(monkeypatch, flags=("FIRST", "WANT_STATS")):
    """Record (kernel name, *the values of ``flags``) of every interpreted Triton launch."""
    from triton.runtime import interpreter

    seen = []
    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, *(kwargs.get(f) for f in flags)))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return seen


def test_lla_variants_reach_the_anchor_rounds(monkeypatch):
    # The anchor rounds (docs/kernels.md, "Rows far from the anchor") run other kernel
    # variants (FIRST=False) than the first round; the clusters and bandwidth families reach
    # them, Gaussian inputs never do. The warm-up's calls must, at the GPU's tile heights
    # (forward 32-64 rows, backward 32-64 queries and keys), or each is compiled in the tests.
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        import pytest

        pytest.skip("records the interpreter's launches (TRITON_INTERPRET=1)")
    from lla_triton import backward, forward

    monkeypatch.setattr(forward, "INTERP_CONFIG", (32, 32, 1, 1))
    monkeypatch.setattr(backward, "INTERP_CONFIG", (32, 32, 1, 1))
    seen = _launches(monkeypatch)
    warmup.run_one("lla_triton", "float32", 16, device="cpu")
    assert {n for n, first, _ in seen if first is False} == {"_lla_fwd_kernel", "_lla_bwd_query_kernel",
                                                              "_lla_bwd_key_kernel"}, seen
    seen.clear()
    warmup.run_one("lla_triton-cg", "float32", 16, device="cpu")
    warmup.run_one("lla_triton-rho", "float32", 16, device="cpu")
    assert {stats for n, first, stats in seen if n == "_lla_fwd_kernel" and first is False} == {True, False}, seen


def test_parallax_job_compiles_the_forward_outside_autograd(monkeypatch):
    # Most Parallax properties call the kernel outside autograd, where a bf16 forward runs the
    # inference kernel and the split kernel's MODE 3 (docs/kernels-parallax.md §3): other
    # compiles than the autograd forward's MODE 1 and 2, which the warm-up must reach too
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        import pytest

        pytest.skip("records the interpreter's launches (TRITON_INTERPRET=1)")
    seen = _launches(monkeypatch, flags=("MODE",))
    warmup.run_one("parallax_triton", "bfloat16", 16, device="cpu")
    assert {("_px_fwd_infer_kernel", None), ("_px_fwd_kernel", 3), ("_px_fwd_kernel", 1),
            ("_px_fwd_kernel", 2)} <= set(seen), seen


def test_the_plugin_warms_the_packages_its_implementations_run(monkeypatch):
    """On CUDA the plugin compiles, before the tests, the packages the chosen implementations
    run, and no other: a decode MODULE:CALLABLE leaves its package out."""
    import types

    import torch

    from lla_verify.testing import pytest_plugin

    asked = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(warmup, "warm", lambda packages, device: asked.append(list(packages)) or [])

    def config(**opts):
        o = {"--lla-no-warmup": False, "--lla-device": "cuda", "--lla-impl": "torch-fp32",
             "--lla-parallax-impl": "parallax-dense", "--lla-decode-impl": "lla-decode-triton",
             "--lla-parallax-decode-impl": "parallax-decode-triton", **opts}
        return types.SimpleNamespace(getoption=o.__getitem__,
                                     option=types.SimpleNamespace(help=False, collectonly=False))

    pytest_plugin._warm_up(config())
    pytest_plugin._warm_up(config(**{"--lla-decode-impl": "mypkg:dec", "--lla-parallax-impl": "parallax-triton"}))
    pytest_plugin._warm_up(config(**{"--lla-decode-impl": "lla-decode-keyed",
                                     "--lla-parallax-decode-impl": "parallax-decode-oracle"}))
    assert asked == [["lla_decode", "parallax_decode"], ["parallax_decode", "parallax_triton"], ["lla_decode"]]
