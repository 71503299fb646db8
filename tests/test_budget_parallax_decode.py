"""budget.parallax.check_parallax_decode: a Parallax decode is judged by the forward's rule on
the decoded rows (docs/decode.md, "The Parallax decode budget"). No kernel: the float64 decode
reference, rounded to the problem's dtype, stands in for an honest implementation, and the
decode mutants of lla_verify.testing.mutants for broken ones. The kernels are judged in
tests/test_kernel_decode.py and properties/test_decode.py.
"""

from __future__ import annotations

import pytest
import torch

from lla_verify.budget.parallax import check_parallax_decode, check_parallax_forward, parallax_budget
from lla_verify.oracles.decode import parallax_decode_reference
from lla_verify.registry.parallax import parse_parallax_case
from lla_verify.testing import mutants
from lla_verify.testing.decode import decode_parallax_every_position, poison_past

SPEC = "gaussian:lam=1:B=3,H=2,S=21,D=16,dtype=float32,seed=0;probe=random:amp=1"
LENGTHS = [21, 1, 9]


def _reference(q, r, k, v, lengths, *, qk_scale=None):
    return parallax_decode_reference(q, r, k, v, lengths, qk_scale=qk_scale).to(q.dtype)


def _problem():
    return parse_parallax_case(SPEC).build("cpu")


def test_every_position_is_the_forwards_verdict():
    """Decode of every position, judged as a decode and as a forward output: one budget,
    the same ratio at the same row."""
    p = _problem()
    o = decode_parallax_every_position(p, p.r, _reference)
    pb = parallax_budget(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, out_dtype=o.dtype)
    dec = check_parallax_decode(p.q, p.k, p.v, p.r, o, impl="reference", case=SPEC, qk_scale=p.qk_scale, pb=pb)
    fwd = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl="reference", case=SPEC, qk_scale=p.qk_scale, pb=pb)
    assert dec.passed and dec.check == "parallax-decode", dec.message
    assert dec.ratio == fwd.ratio and dec.worst == fwd.worst and dec.n_defined == fwd.n_defined == 3 * 2 * 21
    assert "every position against the forward's row" in dec.message


def _ragged(fn):
    p = _problem()
    lens = torch.tensor(LENGTHS)
    b, t = torch.arange(3), lens - 1
    o = fn(p.q[b, :, t], p.r[b, :, t], poison_past(p.k, lens), poison_past(p.v, lens), lens, qk_scale=p.qk_scale)
    return p, lens, o


def test_each_sequence_judged_at_its_last_position():
    p, lens, o = _ragged(_reference)
    v = check_parallax_decode(p.q, p.k, p.v, p.r, o, impl="reference", case=SPEC, qk_scale=p.qk_scale, lengths=lens)
    assert v.passed, v.message
    assert v.n_defined == 3 * 2  # one row per sequence and head
    judged = v.per_query["judged"]
    assert judged.sum() == 6 and all(bool(judged[b, :, L - 1].all()) for b, L in enumerate(LENGTHS))
    # the same rows of an every-position verdict
    full = decode_parallax_every_position(p, p.r, _reference)
    allowed = check_parallax_decode(p.q, p.k, p.v, p.r, full, impl="reference", case=SPEC,
                                    qk_scale=p.qk_scale).per_query["allowed"]
    assert torch.equal(v.per_query["allowed"], allowed)


@pytest.mark.parametrize("bug", ["pxdec_stale_length", "pxdec_off_by_one_length", "pxdec_dropped_nu"])
def test_planted_ragged_decode_bugs_fail(bug):
    fn = getattr(mutants, bug)
    p, lens, o = _ragged(lambda *a, **kw: fn(*a, **kw).to(torch.float32))
    v = check_parallax_decode(p.q, p.k, p.v, p.r, o, impl=f"planted:{bug}", case=SPEC, qk_scale=p.qk_scale,
                              lengths=lens)
    assert not v.passed and v.cause == "implementation", v.message
    # the stale length is the last sequence's: the verdict points there
    if bug == "pxdec_stale_length":
        assert v.worst[0] == 2 and v.worst[2] == LENGTHS[2] - 1, v.message


def test_wrong_shapes_and_lengths():
    p, lens, o = _ragged(_reference)
    v = check_parallax_decode(p.q, p.k, p.v, p.r, o[:, :1], impl="x", case=SPEC, qk_scale=p.qk_scale, lengths=lens)
    assert not v.passed and "output shape (3, 1, 16) != expected (3, 2, 16)" in v.message
    v = check_parallax_decode(p.q, p.k, p.v, p.r, o, impl="x", case=SPEC, qk_scale=p.qk_scale)
    assert not v.passed and "expected (3, 2, 21, 16)" in v.message
    for bad in ([21, 0, 9], [22, 1, 9], [21, 1]):
        with pytest.raises(ValueError, match=r"^lengths: expected 3 integers in \[1, 21\]"):
            check_parallax_decode(p.q, p.k, p.v, p.r, o, impl="x", case=SPEC, lengths=torch.tensor(bad))
