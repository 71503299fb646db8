"""scripts/probe_tensor_core_accumulation.py's models of an accumulation (its GPU figures are a
command's, not a test's): truncation never rounds a sum up in magnitude and differs from
rounding to nearest, a chain of k-steps rounds once a step, and without CUDA it exits 2."""

import numpy as np
import torch

from tests import repo_scripts


def test_the_accumulation_models():
    probe = repo_scripts.load("probe_tensor_core_accumulation")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000) * 10.0 ** rng.integers(-5, 5, 10_000)
    rz = probe.rz32(x).astype(np.float64)
    rn = x.astype(np.float32).astype(np.float64)
    assert (np.abs(rz) <= np.abs(x)).all() and (np.sign(rz) == np.sign(x)).all()
    # one fp32 ulp at most below in magnitude, and below wherever nearest rounds up
    assert (np.abs(x) - np.abs(rz) < np.spacing(np.abs(rz).astype(np.float32))).all()
    up = np.abs(rn) > np.abs(x)
    assert up.any() and (rz[up] != rn[up]).all() and (rz[~up] == rn[~up]).all()
    a = np.full((1, 16), 1.0 + 2.0**-20)
    b = np.full((16, 1), 1.0 + 2.0**-20)
    exact = float((a @ b)[0, 0])
    assert probe.chain(a, b, 8, True)[0, 0] <= exact <= probe.chain(a, b, 16, False)[0, 0] + 2e-6
    t = probe.tf32(np.array([1.0 + 2.0**-12, 1.0 + 2.0**-11], dtype=np.float32))
    assert t.tolist() == [1.0, 1.0 + 2.0**-10]  # below half an ulp down; a tie away from zero


def test_it_needs_cuda():
    if torch.cuda.is_available():
        return
    probe = repo_scripts.load("probe_tensor_core_accumulation")
    assert probe.main() == 2
