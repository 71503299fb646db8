"""Planted wrong decode kernels for tests/test_bench.py, named on the command line as
``tests.bench_planted:NAME`` (bench-decode's --lla-impl / --parallax-impl). The *_off_by_one
ones read the cache one position short, the off-by-one a decode kernel's length handling
invites; parallax_subclass (and parallax_forward_subclass, for bench-parallax's --impl) returns
the right values as a torch.Tensor subclass, an output the trust boundary does not judge."""

from __future__ import annotations

from lla_decode import lla_decode
from parallax_decode import parallax_decode


def _shorter(lengths):
    return (lengths - 1).clamp_min(1)


def lla_off_by_one(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale=None):
    return lla_decode(q, k_cache, v_cache, _shorter(lengths), ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def parallax_off_by_one(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    return parallax_decode(q, r, k_cache, v_cache, _shorter(lengths), qk_scale=qk_scale)


class _Lazy(__import__("torch").Tensor):
    """A tensor subclass: the kind of output the trust boundary refuses to judge."""


def parallax_subclass(q, r, k_cache, v_cache, lengths, *, qk_scale=None):
    return parallax_decode(q, r, k_cache, v_cache, lengths, qk_scale=qk_scale).as_subclass(_Lazy)


def parallax_forward_subclass(q, k, v, r, *, qk_scale=None):
    """bench-parallax's --impl: parallax_triton's output, returned as a torch.Tensor subclass."""
    from parallax_triton import parallax_attention

    return parallax_attention(q, k, v, r, qk_scale=qk_scale).as_subclass(_Lazy)
