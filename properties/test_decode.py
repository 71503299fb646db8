"""Decode equals the forward: one query against a cache gives row t of the causal forward.

For LLA (kernels/lla_decode) and Parallax (kernels/parallax_decode), on every case family
(SPEC 7): every position of a drawn problem is decoded (one batch of B * S sequences, the
cache tails NaN-poisoned) and judged row by row by the forward's budget
(budget.forward.check_forward; budget.parallax.check_parallax_decode). Split sizes, ragged batches and token-by-token
appends are drawn too. Draws shrink towards the easy problem: the gaussian family, its
easy parameters, small S, fp32, a split of one tile, the probe r = 0 and no key offset.
Splits are multiples of the packages' active tile (16 interpreted, 64 compiled).

These properties call the two kernels directly (split sizes, ragged batches and appends
are theirs to draw); ``lla-verify check --op lla-decode|parallax-decode`` and the audit
reach them, and any other decode implementation, through registry/operators.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

from lla_verify.budget.forward import check_forward, forward_budget
from lla_verify.budget.parallax import check_parallax_decode
from lla_verify.budget.verdict import THRESHOLD, assert_within_budget
from lla_verify.registry.cases import Case, Problem
from lla_verify.registry.impls import triton_impl
from lla_verify.testing import suite
from lla_verify.testing.decode import decode_lla_every_position, decode_parallax_every_position, poison_past
from lla_verify.testing.strategies import FAMILY_ORDER, cases
from lla_verify.testing.kernel_device import kernel_device, needs_kernel_device

DEVICE = kernel_device()

pytestmark = [
    pytest.mark.interp,
    needs_kernel_device,
]

if DEVICE is not None:
    import lla_decode as _lla_pkg
    import parallax_decode as _px_pkg
    from lla_decode import DEFAULT_CG_TOL, lla_decode
    from parallax_decode import parallax_decode

    # the budget record: fp32 compute, its solver term at the CG tolerance lla_decode stops at
    IMPL = replace(triton_impl(), name="lla_decode", solver_tol=DEFAULT_CG_TOL)
    # a split both packages accept: a multiple of each one's tile
    TILE = math.lcm(_lla_pkg.tile_size(), _px_pkg.tile_size())
else:
    TILE = 16
ON_GPU = DEVICE == "cuda"
SEQ = (1, 40) if not ON_GPU else (1, 300)
DIMS = (16,) if not ON_GPU else (16, 32, 64, 128)
DTYPES = ("float32", "bfloat16", "float16")
# splits of one, two and three tiles (four on the GPU, whose SEQ reaches further)
SPLITS = st.sampled_from([m * TILE for m in ((1, 2, 3) if not ON_GPU else (1, 2, 4))])


def _cases(**kw):
    base = dict(dtypes=DTYPES, seq=SEQ, head_dims=DIMS, batch=(1, 2), heads=(1, 2))
    base.update(kw)
    return cases(FAMILY_ORDER, **base)


@st.composite
def probes(draw, problem: Problem):
    """Parallax's probe r: 0 (softmax) unless asked, then a Gaussian of a drawn size."""
    size = draw(st.sampled_from([0.0, 1.0, 0.1, 4.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return (size * torch.randn(problem.q.shape, generator=gen, dtype=torch.float64)).to(problem.q.dtype)


def _with_key_offset(p: Problem, offset: float, seed: int) -> Problem:
    if offset == 0.0:
        return p
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(p.q.shape[-1], generator=gen, dtype=torch.float64)
    k = (p.k.double() + offset * (c / c.norm()).to(p.k.device)).to(p.k.dtype)
    return Problem(p.case, p.q, k, p.v, p.ridge_lambda, p.qk_scale)


@settings(max_examples=suite.examples(0.4))
@given(case=_cases(), split=SPLITS)
@example(case=Case("gaussian", {}, S=1, D=16), split=TILE)
def test_lla_decode_is_the_forward_row(case, split):
    p = case.build(DEVICE)
    o, st_ = decode_lla_every_position(p, lla_decode, split=split)
    verdict = check_forward(p, IMPL, o, stats=st_)
    target(min(verdict.ratio, 1e6), label="lla decode ratio")
    assert_within_budget(verdict)


# the keyed solve's launch pair an iteration is slow under the interpreter: shorter sequences there
KEYED_SEQ = SEQ if ON_GPU else (1, 16)


@settings(max_examples=suite.examples(0.4))
@given(case=_cases(seq=KEYED_SEQ), split=SPLITS)
@example(case=Case("gaussian", {}, S=1, D=16), split=TILE)
def test_lla_decode_keyed_solve_is_the_forward_row(case, split):
    """lla_decode(solver="keyed"), CG's products as fp64 passes over the keys, against the
    same rows and budget as the Sigma solve."""
    p = case.build(DEVICE)
    o, st_ = decode_lla_every_position(p, lla_decode, split=split, solver="keyed")
    verdict = check_forward(p, IMPL, o, stats=st_)
    target(min(verdict.ratio, 1e6), label="lla keyed decode ratio")
    assert_within_budget(verdict)


@settings(max_examples=suite.examples(0.4))
@given(case=_cases(), split=SPLITS, data=st.data(), offset=st.sampled_from([0.0, 1e3]))
def test_parallax_decode_is_the_forward_row(case, split, data, offset):
    p = _with_key_offset(case.build(DEVICE), offset, case.seed)
    r = data.draw(probes(p)).to(DEVICE)
    o = decode_parallax_every_position(p, r, parallax_decode, split=split)
    verdict = check_parallax_decode(p.q, p.k, p.v, r, o, impl="parallax_decode",
                                    case=f"{case.spec()} offset {offset:g}", qk_scale=p.qk_scale)
    note(verdict.message)
    target(min(verdict.ratio, 1e6), label="parallax decode ratio")
    assert_within_budget(verdict)


@settings(max_examples=suite.examples(0.3))
@given(case=_cases(batch=(1, 3)), split=SPLITS, data=st.data())
def test_ragged_batch_decode(case, split, data):
    """Sequences of different lengths in one call, each decoded at its last position."""
    p = case.build(DEVICE)
    B, H, S, _ = p.q.shape
    lens = torch.tensor(data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B), label="lengths"),
                        device=DEVICE)
    b, t = torch.arange(B, device=DEVICE), lens - 1
    kc, vc = poison_past(p.k, lens), poison_past(p.v, lens)
    lam = p.lam_tensor.to(DEVICE)[b, :, t].to(torch.float32)
    o = lla_decode(p.q[b, :, t], kc, vc, lens, ridge_lambda=lam, qk_scale=p.qk_scale, split=split)
    fb = forward_budget(p, IMPL)
    defined = ~fb.details.undefined[b, :, t]
    ratio = torch.where(defined, (o.double() - fb.details.o[b, :, t]).norm(dim=-1) / fb.allowed[b, :, t], 0.0)
    assert bool((ratio <= THRESHOLD).all()), f"LLA ragged decode on {case.spec()}, lengths {lens.tolist()}: {ratio}"
    r = data.draw(probes(p)).to(DEVICE)
    o = parallax_decode(p.q[b, :, t], r[b, :, t], kc, vc, lens, qk_scale=p.qk_scale, split=split)
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o, impl="parallax_decode",
                                               case=f"{case.spec()} lengths {lens.tolist()}", qk_scale=p.qk_scale,
                                               lengths=lens))


@settings(max_examples=suite.examples(0.2))
@given(case=_cases(seq=(1, TILE)), data=st.data())
def test_token_by_token_reproduces_the_forward(case, data):
    """Appending k_t, v_t to a cache (NaN beyond what was written) and decoding each step:
    up to one tile of tokens, in a cache of up to 2.25 tiles split by the tile."""
    p = case.build(DEVICE)
    B, H, S, D = p.q.shape
    T_max = S + data.draw(st.integers(0, 20 * TILE // 16), label="spare cache positions")
    r = data.draw(probes(p)).to(DEVICE)
    lam = p.lam_tensor.to(DEVICE).to(torch.float32)
    kc = torch.full((B, H, T_max, D), float("nan"), dtype=p.k.dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    o_l, o_p = [], []
    for t in range(S):
        kc[:, :, t], vc[:, :, t] = p.k[:, :, t], p.v[:, :, t]
        lens = torch.full((B,), t + 1, dtype=torch.int64, device=DEVICE)
        o_l.append(lla_decode(p.q[:, :, t], kc, vc, lens, ridge_lambda=lam[:, :, t], qk_scale=p.qk_scale,
                              split=TILE))
        o_p.append(parallax_decode(p.q[:, :, t], r[:, :, t], kc, vc, lens, qk_scale=p.qk_scale, split=TILE))
    assert_within_budget(check_forward(p, IMPL, torch.stack(o_l, 2)))
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, torch.stack(o_p, 2), impl="parallax_decode",
                                               case=f"{case.spec()} token by token", qk_scale=p.qk_scale))
