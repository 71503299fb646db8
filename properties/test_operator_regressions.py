"""The stored regressions of the operators other than LLA (properties/regressions.json
entries with an "op", what ``lla-verify hunt --op OP --add-regression`` stores), each
checked on every run through the operators table (registry/operators.py), exactly as
``lla-verify check --op OP --case SPEC`` replays it.

The implementation under test: ``--lla-parallax-impl`` for Parallax, ``--lla-decode-impl``
and ``--lla-parallax-decode-impl`` for the decodes (default: the Triton decode kernels),
each skipped with the reason where it cannot run here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from lla_verify.budget.verdict import assert_within_budget
from lla_verify.registry.operators import OPERATORS
from lla_verify.testing.regressions import pinned

_STORED = Path(str(resources.files(__package__).joinpath("regressions.json")))
PINNED = [(op, case) for op in OPERATORS if op != "lla" for case in pinned(op, path=_STORED)]


FIXTURES = {"parallax": "parallax_impl", "lla-decode": "decode_impl", "parallax-decode": "parallax_decode_impl"}


def _impl(op_name, request):
    return request.getfixturevalue(FIXTURES[op_name])


@pytest.mark.parametrize("op_name, case", PINNED, ids=[f"{op}:{c.spec()}" for op, c in PINNED])
def test_operator_pinned_regressions(op_name, case, request, device):
    op = OPERATORS[op_name]
    impl = _impl(op_name, request)
    reason = op.supports(impl, case)
    if reason:
        pytest.skip(reason)
    for verdict in op.check(case, impl, device):
        assert_within_budget(verdict)
