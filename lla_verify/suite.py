"""What the property suite needs besides strategies and budgets: sizes per device,
calling an implementation, and example counts scaled to the active profile."""

from __future__ import annotations

import math

import torch
from hypothesis import settings

from .cases import Case, Problem
from .impls import Impl
from .strategies import cases


def sizes(impl: Impl, device: str) -> dict:
    """Shapes for the suite: small through the interpreter on CPU, real on a GPU."""
    on_gpu = torch.device(device).type == "cuda"
    dims = (4, 8, 16) if not on_gpu else (16, 32, 64, 128)
    if impl.head_dims is not None:
        dims = tuple(d for d in (16, 32, 64, 128) if d in impl.head_dims)
        dims = dims[:1] if not on_gpu else dims
    dtypes = tuple(n for n, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                   ("float16", torch.float16)) if dt in impl.dtypes)
    return {
        "seq": (1, 40) if not on_gpu else (1, 600),
        "head_dims": dims,
        "dtypes": dtypes or ("float32",),
        "batch": (1, 2),
        "heads": (1, 2),
    }


def case_strategy(impl: Impl, device: str, families=None, **over):
    kw = sizes(impl, device)
    kw.update(over)
    return cases(families, **kw)


def examples(fraction: float = 1.0, minimum: int = 2) -> int:
    """A share of the active profile's max_examples (ci: 10, gpu: 40, release: 400)."""
    return max(minimum, int(math.ceil(settings.default.max_examples * fraction)))


def build(case: Case, device: str) -> Problem:
    return case.build(device)


def run(impl: Impl, problem: Problem, *, v=None, q=None, k=None, ridge_lambda=None, stats=False):
    """Call ``impl`` on ``problem`` (optionally with replaced inputs); returns o or (o, stats).

    Across the trust boundary (trust.call_forward): a breach of the calling contract
    (inputs modified, a wrong return value, SystemExit) raises trust.Misbehaved, which
    fails the property with its reason."""
    from .trust import call_forward

    args = (problem.q if q is None else q, problem.k if k is None else k, problem.v if v is None else v)
    lam = problem.ridge_lambda if ridge_lambda is None else ridge_lambda
    o, st = call_forward(impl, *args, ridge_lambda=lam, qk_scale=problem.qk_scale, stats=stats)
    return (o, st) if stats else o


def skip_unless(impl: Impl, prop: str, problem: Problem | None = None):
    """pytest.skip with the record's reason when ``impl`` cannot be asked ``prop``."""
    import pytest

    reason = impl.skip_reason(prop)
    if reason:
        pytest.skip(reason)
    if problem is not None:
        r = impl.supports(dtype=problem.q.dtype, head_dim=problem.q.shape[-1])
        if r:
            pytest.skip(r)
