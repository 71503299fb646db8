"""The property suite's plugin (options, fixtures, Hypothesis profiles), named here for
an environment where lla-verify's pytest11 entry point is not installed (the source
tree on PYTHONPATH); pytest registers it once either way."""

pytest_plugins = ["lla_verify.testing.pytest_plugin"]
