import torch

from lla_verify.oracle import lla_forward, lla_forward_wls


def test_two_float64_formulations_agree_smoke():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = lla_forward(q, k, v, ridge_lambda=0.1)
    b = lla_forward_wls(q, k, v, ridge_lambda=0.1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
