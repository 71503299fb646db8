"""The LLA planted bugs are the dense reference with one step changed: without a bug
(``mutants.control``, ``_dense(bug="")``) they compute what ``torch-fp32``
(oracles/dense.py::dense_torch_lla) computes, bit for bit, forward and backward. A
property that fails the control fails the reference too, so a kill by it is not a kill of
the planted bug."""

from __future__ import annotations

import pytest
import torch

from lla_verify.budget.backward import cotangent_for, impl_grads
from lla_verify.oracles.dense import causal_mask, masked_scores, moments, prepare, weights
from lla_verify.registry.cases import parse_case
from lla_verify.registry.impls import Impl, get_impl
from lla_verify.testing import mutants

DENSE = get_impl("torch-fp32")

SPECS = [
    "gaussian:lam=0.001:B=1,H=2,S=19,D=16,dtype=bfloat16,seed=1",
    "spectrum:kappa=1e+06,lam_rel=1,rotate=1,scale_mult=1:B=1,H=1,S=21,D=8,dtype=float32,seed=0",
    # early rows at lambda 1e-8: the delta guard returns the softmax average there
    "linear_values:lam=1e-08:B=1,H=2,S=9,D=4,dtype=float32,seed=0",
    # kappa 6e7 to 9e8 at S = 1: the fp32 Cholesky fails and the jitter fallback decides
    "linear_values:lam=1e-08:B=1,H=2,S=1,D=4,dtype=float32,seed=0",
    "large_norm:factor=1000,lam=0.1:B=1,H=1,S=1,D=4,dtype=float32,seed=0",
]


def _chol_fails(p) -> bool:
    qc, kc, _, lam, scale = prepare(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                                    compute_dtype=torch.float32)
    w = weights(masked_scores(qc, kc, scale, causal_mask(p.q.shape[-2], p.q.device)))
    _, mu, sig = moments(w, qc, kc, lam * w.sum(-1))
    return bool((torch.linalg.cholesky_ex(sig)[1] != 0).any())


def _same(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("spec", SPECS)
def test_control_is_the_reference_bit_for_bit(spec):
    p = parse_case(spec).build()
    args = dict(ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    ref = DENSE.forward(p.q, p.k, p.v, **args)
    _same(mutants.control(p.q, p.k, p.v, **args), ref, "control forward")
    _same(mutants._dense(p.q, p.k, p.v, **args), ref, "_dense(bug='') forward")
    control = Impl(name="control", forward=mutants.control, description="")
    do = cotangent_for(p)
    want, got = impl_grads(DENSE, p, do), impl_grads(control, p, do)
    assert set(want) == set(got)
    for name in want:
        _same(got[name], want[name], f"control {name}")


def test_the_cases_reach_the_references_guards():
    # the bitwise comparison means most where the reference departs from a plain solve
    specs = [parse_case(s).build() for s in SPECS]
    assert sum(_chol_fails(p) for p in specs) >= 2


def test_split_combine_controls_are_the_decode_references_and_the_mutants_differ_past_one_split():
    """The split-combine decode mutants' controls (the rescale kept) are the float64 decode
    references to float64 rounding; the mutants equal their controls bit for bit while the
    cache holds one split (the bug has nothing to rescale) and differ once it holds two."""
    from lla_verify.oracles.decode import lla_decode_reference, parallax_decode_reference
    from lla_verify.testing.decode import every_position

    p = parse_case("gaussian:lam=0.1:B=1,H=2,S=40,D=16,dtype=float32,seed=3").build("cpu")
    r = torch.randn(p.q.shape, generator=torch.Generator().manual_seed(0))
    lam = p.lam_tensor[..., None]
    qd, kc, vc, lens, (lam_d, rd) = every_position(p.q, p.k, p.v, lam, r)
    lam_d = lam_d[..., 0]
    one_split = lens <= mutants.SPLIT
    for name, ref, ctrl, bug, args, kw in [
        ("lla", lla_decode_reference, mutants.dec_split_control, mutants.dec_unscaled_split_combine,
         (qd, kc, vc, lens), {"ridge_lambda": lam_d}),
        ("parallax", parallax_decode_reference, mutants.pxdec_split_control, mutants.pxdec_unscaled_split_combine,
         (qd, rd, kc, vc, lens), {}),
    ]:
        want, got, wrong = ref(*args, **kw), ctrl(*args, **kw), bug(*args, **kw)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name} control: {m}")
        _same(wrong[one_split], got[one_split], f"{name} mutant within one split")
        err = (wrong[~one_split] - got[~one_split]).norm(dim=-1) / got[~one_split].norm(dim=-1)
        assert bool((err > 1e-3).all()), f"{name} mutant past one split: relative differences {err.min():.3g}.."
