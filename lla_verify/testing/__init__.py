"""The property suite's plumbing: Hypothesis strategies over the case registry
(strategies.py), the helpers the properties call (suite.py), planted bugs the suite must
catch (mutants.py), GPU pinning of xdist workers (gpu_pinning.py) and the pytest plugin
(pytest_plugin.py)."""
