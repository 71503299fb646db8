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

from lla_verify.registry.cases import FAMILIES, Case, Family, get_family
from lla_contract import LLAInputError

# 'gaussian' first: sampled_from shrinks towards the first element
FAMILY_ORDER = ("gaussian",) + tuple(f for f in FAMILIES if f != "gaussian")


def param_value(draw, p) -> float:
    """Draw one parameter: its easy value unless a nasty one is asked for."""
    if not draw(st.booleans()):
        return p.easy
    if p.integer:
        return float(draw(st.integers(int(p.lo), int(p.hi))))
    if p.zero and draw(st.booleans()):
        return 0.0  # the exact end of the range, which the log draw below never reaches
    if p.log:
        e = draw(st.floats(math.log10(p.lo), math.log10(p.hi), allow_nan=False))
        return p.clip(10.0**e)
    return p.clip(draw(st.floats(p.lo, p.hi, allow_nan=False)))


def ridge_value(draw, p) -> float:
    """Draw the ridge parameter over its whole range, never its easy value: log-uniform,
    its two ends drawn as such too (and shrinking towards the low end)."""
    end = draw(st.sampled_from(("lo", "hi", "inside")))
    if end != "inside":
        return p.lo if end == "lo" else p.hi
    if p.log:
        return p.clip(10.0 ** draw(st.floats(math.log10(p.lo), math.log10(p.hi), allow_nan=False)))
    return p.clip(draw(st.floats(p.lo, p.hi, allow_nan=False)))


@st.composite
def cases(draw, families=None, *, dtypes=("float32", "bfloat16"), seq=(1, 48), head_dims=(4, 8, 16),
          batch=(1, 2), heads=(1, 2), overrides: dict | None = None, full_ridge: bool = False) -> Case:
    """A Case from one of ``families`` (default: all, SPEC 7).

    seq: (min, max) for S (the family's min_seq is respected); head_dims: allowed D,
    smallest first; overrides: fixed parameter values, each in its family's range (e.g. {"lam": 1e-3}).

    full_ridge: the family's ridge parameter (Family.ridge) is drawn over its whole range,
    ends included, instead of behind a booleans() that shrinks it to its easy value. It is
    the family's own parameter, with the family's meaning, never an absolute lambda laid
    over it: 'lam' for most families; for 'spectrum', lam_rel = lambda kappa, since the
    family places lambda relative to the smallest spread of the keys (an absolute lambda
    far above it hides the spectrum the family is for; far below it, it changes only the
    early rank-deficient rows, the 'early' family's subject); for 'lambda_decades',
    lam_lo, the smallest per-query lambda (the others span 'decades' above it: one lambda
    for all queries would undo the family).
    """
    names = tuple(families) if families else FAMILY_ORDER
    for n in names:
        get_family(n)
    if not head_dims:
        raise LLAInputError("head_dims: expected at least one head dimension")
    name = draw(st.sampled_from(names))
    fam: Family = FAMILIES[name]
    params = {p.name: (ridge_value(draw, p) if full_ridge and p.name == fam.ridge else param_value(draw, p))
              for p in fam.params}
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
