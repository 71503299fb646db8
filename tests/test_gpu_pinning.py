"""Worker-to-GPU pinning, with faked device counts and worker ids (no GPU needed)."""

import pytest

from lla_verify.testing import gpu_pinning as gp


@pytest.mark.parametrize("wid, n, expect", [
    ("gw0", 2, "0"), ("gw1", 2, "1"), ("gw2", 2, "0"), ("gw5", 4, "1"), ("master", 2, None), (None, 2, None),
    ("gw3", 0, None),
])
def test_round_robin(wid, n, expect):
    assert gp.assign(wid, [str(i) for i in range(n)]) == expect


def test_pin_narrows_cuda_visible_devices_to_one():
    env = {"PYTEST_XDIST_WORKER": "gw3", "CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert gp.pin_current_worker(env) == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == "4" and env["LLA_PINNED_GPU"] == "4"


def test_device_count_from_nvidia_smi_when_unset():
    env = {"PYTEST_XDIST_WORKER": "gw1"}
    assert gp.pin_current_worker(env, smi_lister=lambda: 2) == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


def test_no_gpus_leaves_environment_alone():
    env = {"PYTEST_XDIST_WORKER": "gw1"}
    assert gp.pin_current_worker(env, smi_lister=lambda: 0) is None
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_opt_out():
    env = {"PYTEST_XDIST_WORKER": "gw1", "LLA_NO_GPU_PINNING": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert gp.pin_current_worker(env) is None and env["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize("gpus, cpus, expect", [(0, 16, 16), (1, 16, 16), (2, 32, 32), (8, 4, 4), (1, 0, 1)])
def test_workers_for_auto(gpus, cpus, expect):
    assert gp.workers_for(gpus, cpus) == expect


@pytest.mark.parametrize("cpus, workers, expect", [(16, 16, 1), (16, 4, 4), (2, 2, 1), (2, 3, 1), (8, 0, 8)])
def test_threads_per_worker(cpus, workers, expect):
    assert gp.threads_per_worker(cpus, workers) == expect


def test_the_plugin_loads_without_xdist():
    """The xdist hook (pytest_xdist_auto_num_workers) is optional: with xdist switched off
    (-p no:xdist, as a profiler run needs) a required hook is an INTERNALERROR at start-up."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only",
                        "-q", "properties/test_limits.py"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "INTERNALERROR" not in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
