"""Decode equals the forward: one query against a cache gives row t of the causal forward.

Asked of the decode implementations chosen by --lla-decode-impl (default: kernels/lla_decode)
and --lla-parallax-decode-impl (default: kernels/parallax_decode), built-in names or
MODULE:CALLABLE, resolved through registry/operators.py and called across the trust
boundary (lla_verify.trust.call_decode), on every case family (SPEC 7): every position of a
drawn problem is decoded (one batch of B * S sequences, the cache tails NaN-poisoned) and
judged row by row by the forward's budget (budget.forward.check_forward;
budget.parallax.check_parallax_decode). Ragged batches and token-by-token appends are drawn
too, and split sizes for an implementation that takes them (the built-ins: ``split``, the
record's ``options``). Draws shrink towards the easy problem: the gaussian family, its easy
parameters, small S, fp32, a split of one tile, the probe r = 0 and no key offset. Splits
are multiples of the packages' active tile (16 interpreted, 64 compiled).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

from lla_verify.budget.forward import check_forward, forward_budget
from lla_verify.budget.parallax import check_parallax_decode
from lla_verify.budget.verdict import THRESHOLD, assert_within_budget
from lla_verify.registry.cases import DTYPES as CASE_DTYPES
from lla_verify.registry.cases import Case, Problem
from lla_verify.registry.operators import get_operator
from lla_verify.testing import suite
from lla_verify.testing.decode import decode_lla_every_position, decode_parallax_every_position, poison_past
from lla_verify.testing.kernel_device import kernel_device
from lla_verify.testing.strategies import FAMILY_ORDER, cases
from lla_verify.trust import call_decode

pytestmark = [pytest.mark.interp]

if kernel_device() is not None:
    import lla_decode as _lla_pkg
    import parallax_decode as _px_pkg

    # a split both packages accept: a multiple of each one's tile
    TILE = math.lcm(_lla_pkg.tile_size(), _px_pkg.tile_size())
else:
    TILE = 16
ON_GPU = kernel_device() == "cuda"
SEQ = (1, 40) if not ON_GPU else (1, 300)
DIMS = (16,) if not ON_GPU else (16, 32, 64, 128)
DTYPES = ("float32", "bfloat16", "float16")
# splits of one, two and three tiles (four on the GPU, whose SEQ reaches further)
SPLITS = st.sampled_from([m * TILE for m in ((1, 2, 3) if not ON_GPU else (1, 2, 4))])


def _cases(**kw):
    base = dict(dtypes=DTYPES, seq=SEQ, head_dims=DIMS, batch=(1, 2), heads=(1, 2))
    base.update(kw)
    return cases(FAMILY_ORDER, **base)


def _build(case, impl, device):
    """The case's problem, where ``impl`` accepts its dtype and head dim (else the draw is
    set aside, naming why: a property that can judge none fails as Unsatisfiable)."""
    why = impl.supports(dtype=CASE_DTYPES[case.dtype], head_dim=case.D)
    if why:
        suite.not_this_property(why)
    return case.build(device)


def _split_kw(impl, split) -> dict:
    return {"split": split} if "split" in impl.options else {}


def _lla(impl, split):
    """``impl`` with lla_decode's calling convention, across the trust boundary: (o, stats)."""
    def fn(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None, return_stats=False):
        o, st_ = call_decode(impl, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths},
                             {"ridge_lambda": ridge_lambda, "qk_scale": qk_scale, **_split_kw(impl, split)},
                             stats=return_stats)
        return (o, st_ or {}) if return_stats else o
    return fn


def _px(impl, split):
    """``impl`` with parallax_decode's calling convention, across the trust boundary."""
    def fn(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
        return call_decode(impl, {"q": q, "r": r, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths},
                           {"qk_scale": qk_scale, **_split_kw(impl, split)})[0]
    return fn


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
def test_lla_decode_is_the_forward_row(decode_impl, device, case, split):
    p = _build(case, decode_impl, device)
    o, st_ = decode_lla_every_position(p, _lla(decode_impl, split))
    verdict = check_forward(p, decode_impl, o, stats=st_ or None)
    note(verdict.message)
    target(min(verdict.ratio, 1e6), label="lla decode ratio")
    assert_within_budget(verdict)


# the keyed solve's launch pair an iteration is slow under the interpreter: shorter sequences there
KEYED_SEQ = SEQ if ON_GPU else (1, 16)


@pytest.fixture(scope="module")
def keyed_impl(decode_impl, device):
    """lla_decode's second solve, asked alongside the package's default one: run where the
    implementation under test is the package (lla-decode-triton), since it is the package's."""
    if decode_impl.name != "lla-decode-triton":
        pytest.skip(f"lla_decode's keyed solve is the package's; the implementation under test is {decode_impl.name}")
    return get_operator("lla-decode").resolve("lla-decode-keyed")


@settings(max_examples=suite.examples(0.4))
@given(case=_cases(seq=KEYED_SEQ), split=SPLITS)
@example(case=Case("gaussian", {}, S=1, D=16), split=TILE)
def test_lla_decode_keyed_solve_is_the_forward_row(keyed_impl, device, case, split):
    """lla_decode(solver="keyed"), CG's products as fp64 passes over the keys, against the
    same rows and budget as the Sigma solve."""
    p = _build(case, keyed_impl, device)
    o, st_ = decode_lla_every_position(p, _lla(keyed_impl, split))
    verdict = check_forward(p, keyed_impl, o, stats=st_ or None)
    note(verdict.message)
    target(min(verdict.ratio, 1e6), label="lla keyed decode ratio")
    assert_within_budget(verdict)


@settings(max_examples=suite.examples(0.4))
@given(case=_cases(), split=SPLITS, data=st.data(), offset=st.sampled_from([0.0, 1e3]))
def test_parallax_decode_is_the_forward_row(parallax_decode_impl, device, case, split, data, offset):
    impl = parallax_decode_impl
    p = _with_key_offset(_build(case, impl, device), offset, case.seed)
    r = data.draw(probes(p)).to(device)
    o = decode_parallax_every_position(p, r, _px(impl, split))
    verdict = check_parallax_decode(p.q, p.k, p.v, r, o, impl=impl.name, case=f"{case.spec()} offset {offset:g}",
                                    qk_scale=p.qk_scale, compute_dtype=impl.compute_dtype)
    note(verdict.message)
    target(min(verdict.ratio, 1e6), label="parallax decode ratio")
    assert_within_budget(verdict)


def _ragged(p, data, device):
    """Drawn lengths (B,), each sequence's last position t, and the caches poisoned past them."""
    B = p.q.shape[0]
    S = p.q.shape[2]
    lens = torch.tensor(data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B), label="lengths"),
                        device=device)
    return lens, torch.arange(B, device=device), lens - 1, poison_past(p.k, lens), poison_past(p.v, lens)


@settings(max_examples=suite.examples(0.3))
@given(case=_cases(batch=(1, 3)), split=SPLITS, data=st.data())
def test_ragged_batch_lla_decode(decode_impl, device, case, split, data):
    """Sequences of different lengths in one call, each decoded at its last position."""
    p = _build(case, decode_impl, device)
    lens, b, t, kc, vc = _ragged(p, data, device)
    lam = p.lam_tensor.to(device)[b, :, t].to(torch.float32)
    o = _lla(decode_impl, split)(p.q[b, :, t], kc, vc, lens, ridge_lambda=lam, qk_scale=p.qk_scale)
    fb = forward_budget(p, decode_impl)
    defined = ~fb.details.undefined[b, :, t]
    ratio = torch.where(defined, (o.double() - fb.details.o[b, :, t]).norm(dim=-1) / fb.allowed[b, :, t], 0.0)
    worst = int(ratio.argmax())
    seq, head = divmod(worst, ratio.shape[1])
    assert bool((ratio <= THRESHOLD).all()), (
        f"{decode_impl.name}: ragged decode on {case.spec()}, lengths {lens.tolist()}: error / budget "
        f"{float(ratio.max()):.3g} at sequence {seq} (position {int(t[seq])}), head {head}; "
        f"per sequence and head {ratio.tolist()}")


@settings(max_examples=suite.examples(0.3))
@given(case=_cases(batch=(1, 3)), split=SPLITS, data=st.data())
def test_ragged_batch_parallax_decode(parallax_decode_impl, device, case, split, data):
    """Sequences of different lengths in one call, each decoded at its last position."""
    impl = parallax_decode_impl
    p = _build(case, impl, device)
    lens, b, t, kc, vc = _ragged(p, data, device)
    r = data.draw(probes(p)).to(device)
    o = _px(impl, split)(p.q[b, :, t], r[b, :, t], kc, vc, lens, qk_scale=p.qk_scale)
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, o, impl=impl.name,
                                               case=f"{case.spec()} lengths {lens.tolist()}", qk_scale=p.qk_scale,
                                               lengths=lens, compute_dtype=impl.compute_dtype))


def _appended(p, data, device):
    """An empty cache (NaN everywhere) with up to 20 * TILE / 16 spare positions."""
    B, H, S, D = p.q.shape
    T_max = S + data.draw(st.integers(0, 20 * TILE // 16), label="spare cache positions")
    kc = torch.full((B, H, T_max, D), float("nan"), dtype=p.k.dtype, device=device)
    return kc, torch.full_like(kc, float("nan"))


@settings(max_examples=suite.examples(0.2))
@given(case=_cases(seq=(2, TILE)), data=st.data())
def test_token_by_token_lla_decode(decode_impl, device, case, data):
    """Appending k_t, v_t to a cache (NaN beyond what was written) and decoding each step:
    2 to one tile of tokens (at least one append after the first; the every-position
    property has t = 0 alone), in a cache of up to 2.25 tiles split by the tile."""
    p = _build(case, decode_impl, device)
    B, H, S, D = p.q.shape
    kc, vc = _appended(p, data, device)
    lam = p.lam_tensor.to(device).to(torch.float32)
    fn = _lla(decode_impl, TILE)
    o = []
    for t in range(S):
        kc[:, :, t], vc[:, :, t] = p.k[:, :, t], p.v[:, :, t]
        lens = torch.full((B,), t + 1, dtype=torch.int64, device=device)
        o.append(fn(p.q[:, :, t], kc, vc, lens, ridge_lambda=lam[:, :, t], qk_scale=p.qk_scale))
    assert_within_budget(check_forward(p, decode_impl, torch.stack(o, 2)))


@settings(max_examples=suite.examples(0.2))
@given(case=_cases(seq=(2, TILE)), data=st.data())
def test_token_by_token_parallax_decode(parallax_decode_impl, device, case, data):
    """Parallax's token-by-token appends, as for LLA."""
    impl = parallax_decode_impl
    p = _build(case, impl, device)
    B, H, S, D = p.q.shape
    kc, vc = _appended(p, data, device)
    r = data.draw(probes(p)).to(device)
    fn = _px(impl, TILE)
    o = []
    for t in range(S):
        kc[:, :, t], vc[:, :, t] = p.k[:, :, t], p.v[:, :, t]
        lens = torch.full((B,), t + 1, dtype=torch.int64, device=device)
        o.append(fn(p.q[:, :, t], r[:, :, t], kc, vc, lens, qk_scale=p.qk_scale))
    assert_within_budget(check_parallax_decode(p.q, p.k, p.v, r, torch.stack(o, 2), impl=impl.name,
                                               case=f"{case.spec()} token by token", qk_scale=p.qk_scale,
                                               compute_dtype=impl.compute_dtype))
