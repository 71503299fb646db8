"""What the property suite needs besides strategies and budgets: sizes per device,
calling an implementation, and example counts scaled to the active profile."""

from __future__ import annotations

import math

import torch
from hypothesis import settings

from lla_verify.registry.cases import DTYPES, Case, Problem, get_family
from lla_verify.registry.impls import Impl
from lla_verify.testing.strategies import FAMILY_ORDER, cases


DTYPE_ORDER = (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))


def sizes(impl: Impl, device: str) -> dict:
    """Shapes for the suite: small through the interpreter on CPU, real on a GPU; only
    the dtypes and head dims ``impl``'s record accepts."""
    on_gpu = torch.device(device).type == "cuda"
    dims = (4, 8, 16) if not on_gpu else (16, 32, 64, 128)
    if impl.head_dims is not None:
        dims = tuple(d for d in (16, 32, 64, 128) if d in impl.head_dims)
        dims = dims[:1] if not on_gpu else dims
    return {
        "seq": (1, 40) if not on_gpu else (1, 600),
        "head_dims": dims,
        "dtypes": tuple(n for n, dt in DTYPE_ORDER if dt in impl.dtypes),
        "batch": (1, 2),
        "heads": (1, 2),
    }


def case_strategy(impl: Impl, device: str, families=None, **over):
    """Cases ``impl`` accepts: the requested dtypes, head dims and families narrowed to
    what its record supports, so no draw is wasted on a configuration it refuses.

    Called where the property is defined, outside @given: when nothing is left (a
    float32-only property on a bf16-only kernel), the whole property is skipped with
    the record's reason, the one place a pytest.skip belongs.
    """
    import pytest

    kw = sizes(impl, device)
    kw.update(over)
    dtypes = tuple(n for n in kw["dtypes"] if DTYPES[n] in impl.dtypes)
    if not dtypes:
        pytest.skip(f"{impl.name} accepts none of the dtypes {tuple(kw['dtypes'])} this property draws "
                    f"(accepts {[str(d) for d in impl.dtypes]})")
    dims = tuple(d for d in kw["head_dims"] if impl.head_dims is None or d in impl.head_dims)
    if not dims:
        pytest.skip(f"{impl.name} accepts none of the head dims {tuple(kw['head_dims'])} this property draws "
                    f"(accepts {impl.head_dims})")
    names = tuple(families) if families else FAMILY_ORDER
    if not impl.per_query_lambda:
        names = tuple(n for n in names if not get_family(n).per_query_lambda)
        if not names:
            pytest.skip(f"{impl.name} takes one lambda per call: the families {tuple(families)} set one per query")
    kw.update(dtypes=dtypes, head_dims=dims)
    return cases(names, **kw)


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
    from lla_verify.trust import call_forward

    args = (problem.q if q is None else q, problem.k if k is None else k, problem.v if v is None else v)
    lam = problem.ridge_lambda if ridge_lambda is None else ridge_lambda
    o, st = call_forward(impl, *args, ridge_lambda=lam, qk_scale=problem.qk_scale, stats=stats)
    return (o, st) if stats else o


def require(impl: Impl, prop: str) -> None:
    """Skip the whole property, with the record's reason, when ``impl`` cannot be asked
    ``prop`` at all. Outside @given only: the decision holds for every draw."""
    import pytest

    reason = impl.skip_reason(prop)
    if reason:
        pytest.skip(reason)


def unsupported(impl: Impl, problem: Problem) -> str | None:
    """Why ``impl`` refuses this drawn problem (dtype, head dim, per-query lambda), or None."""
    r = impl.supports(dtype=problem.q.dtype, head_dim=problem.q.shape[-1])
    if r is None and not impl.per_query_lambda:
        lam = problem.lam_tensor
        if bool((lam != lam.flatten()[0]).any()):
            r = f"{impl.name} takes one lambda per call, the problem has one per query"
    return r


def assume_supported(impl: Impl, problem: Problem) -> None:
    """Inside @given: reject a draw ``impl`` refuses, naming why in Hypothesis' statistics.

    case_strategy draws only supported configurations, so this is a guard; a property
    whose every draw is rejected fails as Unsatisfiable instead of passing empty.
    """
    r = unsupported(impl, problem)
    if r:
        not_this_property(r)


def not_this_property(reason: str) -> None:
    """Inside @given: set aside a draw that is outside what the property can judge, naming
    why. A rejected draw does not count as an example, so a property that can judge none
    of its draws fails as Unsatisfiable instead of passing having asserted nothing (what
    a bare ``return`` does)."""
    from hypothesis import event, reject

    event(f"rejected: {reason}")
    reject()


def judged_rows(verdict) -> int:
    """The rows a verdict held to a budget: the defined queries of a forward verdict, and
    of a backward one those within the compute precision (``summary["n_judged"]``)."""
    return int(verdict.summary.get("n_judged", verdict.n_defined))


def set_aside_unless_judged(verdict) -> None:
    """Inside @given, after a check: a verdict that passed while holding no row to a
    budget (every row undefined at lambda = 0, or beyond the compute precision) compared
    nothing, and the draw is set aside (``not_this_property``) instead of counting as a
    pass. A failing verdict is left for the property to report."""
    if verdict.passed and judged_rows(verdict) == 0:
        not_this_property(f"{verdict.check}: no row judged ({verdict.n_defined} defined, "
                          f"{verdict.n_undefined} undefined)")


def score_shift(q: torch.Tensor, k: torch.Tensor, qk_scale: float, shift: float = 200.0):
    """Inputs for the score-shift identity, exact in q's dtype: ``(q1, k1, q2, k2)``.

    k1 is k with its last coordinate a constant alpha, q1 is q with its last coordinate
    on a grid of t/64, and q2 = q1 + t e_D, k2 = k1 + t e_D, t the power of two with
    qk_scale t^2 >= ``shift``. Then k_j - q_i is unchanged and row i's scores move by
    qk_scale t (q_iD + alpha + t) >= shift / 2, a per-row constant (beyond exp's fp32 range
    at the default). The grid makes every sum exact: the last coordinates are multiples
    of g = t/64 below 2t in magnitude, at most 7 significant bits, which bf16, fp16 and
    fp32 all hold; q_iD >= -t/2 keeps the shift's size. A sum that did not round exactly
    would change the problem, and the identity would not hold at all."""
    t = 2.0 ** math.ceil(math.log2(math.sqrt(shift / qk_scale)))
    g = t / 64
    alpha = max(0.5, g)
    qd = (q[..., -1].double() / g).round().clamp(-32, 63) * g
    q1, k1 = q.clone(), k.clone()
    q1[..., -1] = qd.to(q.dtype)
    k1[..., -1] = alpha
    q2, k2 = q1.clone(), k1.clone()
    q2[..., -1] = (qd + t).to(q.dtype)
    k2[..., -1] = alpha + t
    for name, a, b in (("q", q1, q2), ("k", k1, k2)):
        if not bool(((b[..., -1].double() - a[..., -1].double()) == t).all()):
            raise RuntimeError(f"score_shift: {name} + {t} e_D does not round exactly in {q.dtype}: a harness bug")
    return q1, k1, q2, k2


def skip_unless(impl: Impl, prop: str, problem: Problem | None = None):
    """Outside @given: ``require``, then a skip when ``problem`` is unsupported. Inside a
    Hypothesis test a skip would end the whole property at its first such draw: use
    ``require`` before @given and ``assume_supported`` inside."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        raise RuntimeError("suite.skip_unless called inside @given: call suite.require(impl, prop) before "
                           "@given and suite.assume_supported(impl, problem) inside")
    import pytest

    require(impl, prop)
    r = unsupported(impl, problem) if problem is not None else None
    if r:
        pytest.skip(r)
