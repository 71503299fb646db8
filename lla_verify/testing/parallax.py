"""What the Parallax properties need besides the LLA suite's helpers: strategies that
draw a ``ParallaxCase`` (a case of any family of cases.py plus a probe family on top)
and one call of a Parallax implementation across the trust boundary.

Shrinking: the case shrinks as strategies.cases says (family 'gaussian', S small, easy
parameters); the probe family towards 'zero', its parameters towards their easy values.
"""

from __future__ import annotations

import torch
from hypothesis import event, note
from hypothesis import strategies as st

from lla_verify.registry.impls import Impl
from lla_verify.registry.parallax import PROBE_ORDER, ParallaxCase, ParallaxProblem, ProbeOutOfRange, get_probe
from lla_verify.testing import suite
from lla_verify.testing.strategies import param_value


@st.composite
def parallax_cases(draw, case_strategy, probes=None) -> ParallaxCase:
    """A ParallaxCase: a Case from ``case_strategy`` and a probe from ``probes`` (default all)."""
    names = tuple(probes) if probes else PROBE_ORDER
    for n in names:
        get_probe(n)
    case = draw(case_strategy)
    name = draw(st.sampled_from(names))
    fam = get_probe(name)
    params = {p.name: param_value(draw, p) for p in fam.params}
    pc = ParallaxCase(case, name, params)
    note(f"parallax case: {pc.spec()}")
    event(f"probe={name}")
    return pc


def parallax_case_strategy(impl: Impl, device: str, families=None, probes=None, **over):
    """Parallax cases ``impl`` accepts (dtypes, head dims narrowed as suite.case_strategy does)."""
    return parallax_cases(suite.case_strategy(impl, device, families=families, **over), probes)


def build(pc: ParallaxCase, device: str) -> ParallaxProblem:
    """Inside @given: ``pc.build(device)``, rejecting (with the reason in Hypothesis'
    statistics) a draw whose probe does not fit the dtype, such as the exact LLA probe of
    a near-singular row in float16."""
    try:
        return pc.build(device)
    except ProbeOutOfRange as exc:
        suite.not_this_property(str(exc).split(" on ")[0])


def run(impl: Impl, problem: ParallaxProblem, *, q=None, k=None, v=None, r=None) -> torch.Tensor:
    """Call ``impl`` on ``problem`` (optionally with replaced inputs) across the trust
    boundary: fresh copies of q, k, v, r, inputs compared with a snapshot after the call,
    the output checked and copied (lla_verify/trust.py). A breach raises trust.Misbehaved."""
    from lla_verify import trust

    named = {"q": problem.q if q is None else q, "k": problem.k if k is None else k,
             "v": problem.v if v is None else v, "r": problem.r if r is None else r}
    snapshot = {n: t.detach().clone() for n, t in named.items()}
    handed = trust._hand_over(named)
    device = named["q"].device
    trust.poison(device, named["v"].numel())
    with torch.no_grad(), trust._Watch(), trust.FreshHeap(device):
        trust._sync(device)
        out = trust._guarded(impl.forward, handed["q"], handed["k"], handed["v"], handed["r"],
                             qk_scale=problem.qk_scale)
        trust._sync(device)
    trust._check_inputs(snapshot, named, handed)
    o = trust.check_tensor(out, "the output o", shape=tuple(named["v"].shape),
                           dtypes=trust._output_dtypes(named["q"]), device=device)
    return trust.materialise(o)


def unsupported(impl: Impl, problem: ParallaxProblem) -> str | None:
    """Why ``impl`` cannot be asked this problem: a dtype or head dim its record refuses,
    or an exact output beyond the dtype's range (a large probe in float16), which no
    implementation can return in q's dtype."""
    why = impl.supports(dtype=problem.q.dtype, head_dim=problem.q.shape[-1])
    if why is None and problem.q.dtype == torch.float16:
        from lla_verify.oracles.parallax import parallax_forward

        big = float(parallax_forward(problem.q, problem.k, problem.v, problem.r, qk_scale=problem.qk_scale).abs().max())
        if not big < torch.finfo(torch.float16).max / 2:
            why = "the exact output (max |o| %.3g) is beyond float16's range" % big
    return why


def assume_supported(impl: Impl, problem: ParallaxProblem) -> None:
    """Inside @given: reject a draw ``impl`` refuses, naming why (suite.assume_supported)."""
    why = unsupported(impl, problem)
    if why:
        suite.not_this_property(why)


__all__ = ["parallax_cases", "parallax_case_strategy", "build", "run", "assume_supported"]
