"""The float64 oracle against the mpmath oracle where Sigma_i is ill-conditioned.

The float64 oracle is the reference for everything else, so it is held to its own
budget (the same model at u = 2^-53, lla_verify.budget) against mpmath at 50 digits,
on the near-singular families, wherever kappa u64 leaves float64 digits to check.
Oracles: lla_verify/oracles/float64.py (float64) and lla_verify/oracles/mp.py (mpmath).
"""

import pytest
import torch
from hypothesis import given, settings

from lla_verify.testing import suite
from lla_verify.budget.forward import U64, forward_budget
from lla_verify.registry.impls import get_impl
from lla_verify.oracles.mp import lla_forward_mp
from lla_verify.testing.strategies import cases

pytestmark = pytest.mark.mp


@settings(max_examples=suite.examples(0.5))
@given(case=cases(("subspace", "clusters", "early", "spectrum", "offset"), dtypes=("float32",), seq=(2, 14),
                  head_dims=(3, 4), batch=(1, 1), heads=(1, 1)))
def test_float64_oracle_agrees_with_mpmath_within_its_budget(case):
    p = case.build("cpu")
    oracle = get_impl("oracle-f64")
    fb = forward_budget(p, oracle, dense=False, out_dtype=torch.float64)
    kappa = torch.nan_to_num(fb.details.kappa, posinf=1e300)
    mp = lla_forward_mp(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, dps=50)
    err = (fb.details.o - mp).norm(dim=-1)
    checkable = ~fb.details.undefined & (kappa * U64 < 1e-3)
    ratio = torch.where(checkable, err / fb.allowed, torch.zeros_like(err))
    worst = int(torch.argmax(ratio.flatten()))
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), ratio.shape))
    assert float(ratio[idx]) <= 1.0, (
        f"float64 oracle vs mpmath: ratio {float(ratio[idx]):.3g} at query {idx}: error {float(err[idx]):.3e} vs "
        f"allowed {float(fb.allowed[idx]):.3e}, kappa {float(kappa[idx]):.3e} on {case.spec()}")
