"""Hypothesis strategies that draw whole LLA problems from the families of cases.py.

Every strategy draws a ``Case`` (family, parameters, shape, dtype, seed), so a
failure prints a one-line spec that ``lla-verify check --case SPEC`` replays.

Shrinking moves towards the easy problem: each parameter sits behind a
``booleans()`` draw that, when shrunk to False, gives the family's easy value
(kappa 2, scale 1/sqrt(D), lambda 1, offset 1, ...); S shrinks towards its
minimum, D towards the smallest allowed, the dtype towards float32, the family
towards 'gaussian', B and H towards 1, the seed towards 0.
"""

from __future__ import annotations

import math

from hypothesis import event, note
from hypothesis import strategies as st

from .cases import FAMILIES, Case, Family, get_family
from .validate import LLAInputError

# 'gaussian' first: sampled_from shrinks towards the first element
FAMILY_ORDER = ("gaussian",) + tuple(f for f in FAMILIES if f != "gaussian")


def param_value(draw, p) -> float:
    """Draw one parameter: its easy value unless a nasty one is asked for."""
    if not draw(st.booleans()):
        return p.easy
    if p.integer:
        return float(draw(st.integers(int(p.lo), int(p.hi))))
    if p.log:
        e = draw(st.floats(math.log10(p.lo), math.log10(p.hi), allow_nan=False))
        return p.clip(10.0**e)
    return p.clip(draw(st.floats(p.lo, p.hi, allow_nan=False)))


@st.composite
def cases(draw, families=None, *, dtypes=("float32", "bfloat16"), seq=(1, 48), head_dims=(4, 8, 16),
          batch=(1, 2), heads=(1, 2), overrides: dict | None = None) -> Case:
    """A Case from one of ``families`` (default: all, SPEC 7).

    seq: (min, max) for S (the family's min_seq is respected); head_dims: allowed D,
    smallest first; overrides: fixed parameter values, each in its family's range (e.g. {"lam": 1e-3}).
    """
    names = tuple(families) if families else FAMILY_ORDER
    for n in names:
        get_family(n)
    if not head_dims:
        raise LLAInputError("head_dims: expected at least one head dimension")
    name = draw(st.sampled_from(names))
    fam: Family = FAMILIES[name]
    params = {p.name: param_value(draw, p) for p in fam.params}
    if overrides:
        params.update(overrides)
    lo, hi = max(seq[0], fam.min_seq), max(seq[1], fam.min_seq)
    S = draw(st.integers(lo, hi))
    D = draw(st.sampled_from(tuple(sorted(head_dims))))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    B = draw(st.integers(*batch))
    H = draw(st.integers(*heads))
    seed = draw(st.integers(0, 2**16))
    case = Case(family=name, params=params, B=B, H=H, S=S, D=D, dtype=dtype, seed=seed)
    note(f"case: {case.spec()}")
    event(f"family={name}")
    event(f"dtype={dtype}")
    return case


def family_strategy(name: str, **kw):
    """Cases from one family only."""
    return cases(families=(name,), **kw)
