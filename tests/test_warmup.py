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
