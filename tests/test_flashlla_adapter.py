"""The adapter for the public FlashLLA kernel (lla_verify/impls.py, SPEC 6), checked
without it: a stand-in ``flashlla`` module with its documented call,
``lla_attention(q, k, v, *, ridge_lambda, qk_scale)`` on (B, S, D) tensors, computing
the dense reference per (B, S, D) batch. The adapter's own work (folding (B, H, S, D)
into that layout and back, translating lambda, refusing what the kernel cannot do) is
what these tests can fail on."""

import sys
import types

import pytest
import torch

from lla_verify.cases import Case
from lla_verify.impls import dense_torch_lla, get_impl, is_available
from lla_verify.validate import LLAInputError

CALLS = []


def _stand_in_lla_attention(q, k, v, *, ridge_lambda=10.0, qk_scale=None, **kw):
    assert q.dim() == 3, f"flashlla takes (B, S, D), got {tuple(q.shape)}"
    assert isinstance(ridge_lambda, float), type(ridge_lambda)
    CALLS.append((tuple(q.shape), ridge_lambda, qk_scale))
    o = dense_torch_lla(q[:, None], k[:, None], v[:, None], ridge_lambda=ridge_lambda, qk_scale=qk_scale)[:, 0]
    return o, torch.ones(q.shape[:-1])  # returned as (o, omega), like its autograd Function


@pytest.fixture
def stand_in(monkeypatch):
    mod = types.ModuleType("flashlla")
    mod.lla_attention = _stand_in_lla_attention
    monkeypatch.setitem(sys.modules, "flashlla", mod)
    CALLS.clear()
    return mod


def test_heads_and_batches_keep_their_own_outputs(stand_in):
    p = Case("gaussian", {"lam": 0.5}, B=2, H=3, S=13, D=8, dtype="bfloat16", seed=4).build()
    impl = get_impl("flashlla")
    o = impl.forward(p.q, p.k, p.v, ridge_lambda=0.5, qk_scale=p.qk_scale)
    want = dense_torch_lla(p.q, p.k, p.v, ridge_lambda=0.5, qk_scale=p.qk_scale)
    assert o.shape == p.v.shape and o.dtype == p.q.dtype
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    assert CALLS == [((6, 13, 8), 0.5, p.qk_scale)]


def test_a_uniform_lambda_tensor_is_passed_as_its_value(stand_in):
    p = Case("gaussian", {}, B=1, H=2, S=9, D=8, seed=1).build()
    get_impl("flashlla").forward(p.q, p.k, p.v, ridge_lambda=torch.full((1, 2, 9), 0.25), qk_scale=None)
    assert CALLS[-1][1] == 0.25


def test_per_query_lambda_is_refused_by_name(stand_in):
    p = Case("lambda_decades", {}, B=1, H=1, S=9, D=8, seed=1).build()
    with pytest.raises(LLAInputError, match="ridge_lambda must be one value"):
        get_impl("flashlla").forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=None)
    assert not CALLS


def test_the_record_says_what_it_cannot_be_asked(stand_in):
    impl = get_impl("flashlla")
    assert impl.skip_reason("grad") and not impl.per_query_lambda
    assert impl.supports(dtype=torch.float32, head_dim=64)  # bf16 only: a reason, not None
    assert impl.supports(dtype=torch.bfloat16, head_dim=32)  # D = 64 only
    assert is_available(impl, "cpu")  # CUDA only, even when importable
