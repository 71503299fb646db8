"""scripts/study_parallax_bf16_weights.py computes what it says: its fp32-weight pass is the
Parallax operator to fp32 rounding, its bf16-weight pass differs by the weights' rounding
and no more, its parts are exact, and its drawn parameters stay in each family's range."""

from __future__ import annotations

import torch

from lla_verify.budget.parallax import check_parallax_forward
from lla_verify.oracles.parallax import parallax_forward
from lla_verify.registry.cases import FAMILIES
from lla_verify.registry.parallax import parse_parallax_case

from tests.repo_scripts import load

study = load("study_parallax_bf16_weights")


def test_one_pass_is_the_operator_and_bf16_weights_cost_their_rounding():
    p = parse_parallax_case("gaussian::B=1,H=2,S=40,D=16,dtype=bfloat16,seed=0;probe=random").build("cpu")
    o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
    scale = o64.norm(dim=-1).clamp_min(1e-30)
    rel = {}
    for weights, parts in (("fp32", 0), ("bf16", 1), ("bf16", 2)):
        o = study.one_pass(p.q, p.k, p.v, p.r, p.qk_scale, weights=weights, we_parts=parts)
        rel[(weights, parts)] = float(((o.double() - o64).norm(dim=-1) / scale).max())
        verdict = check_parallax_forward(p.q, p.k, p.v, p.r, o.to(p.q.dtype), impl="study", case="gaussian",
                                         qk_scale=p.qk_scale)
        assert verdict.passed, verdict.message
    assert rel[("fp32", 0)] < 1e-5, rel
    # bf16 weights move o by their rounding (2^-9 relative a weight), far above fp32's
    assert 1e-5 < rel[("bf16", 2)] < 2.0**-6, rel


def test_parts_are_exact_and_drawn_parameters_stay_in_range():
    x = torch.randn(1000, dtype=torch.float32) * 10.0 ** torch.randint(-5, 5, (1000,)).float()
    parts = study._bf16_parts(x, 3)
    assert all(bool((p.to(torch.bfloat16).float() == p).all()) for p in parts)
    assert torch.equal(parts[0] + parts[1] + parts[2], x)
    for fam in FAMILIES.values():
        assert study.drawn_params(fam, 0) == fam.easy()
        for seed in (1, 2, 3):
            for prm in fam.params:
                val = study.drawn_params(fam, seed)[prm.name]
                assert prm.lo <= val <= prm.hi or (prm.zero and val == 0.0), (fam.name, prm.name, val)
