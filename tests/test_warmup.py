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
