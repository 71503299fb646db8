"""The Parallax side of the registry (lla_verify/registry/parallax.py): probe families,
ParallaxCase specs, the implementation records and --lla-parallax-impl resolution."""

import math
import sys

import pytest
import torch

from lla_contract import LLAInputError
from lla_verify.registry.cases import FAMILIES, Case
from lla_verify.registry.impls import BUILTIN_NAMES, get_impl
from lla_verify.registry.parallax import (PARALLAX_BUILTIN_NAMES, PROBES, ParallaxCase, _key_spread,
                                          _weighted_key_cov, get_parallax_impl, is_parallax_available,
                                          parse_parallax_case)


@pytest.mark.parametrize("probe", list(PROBES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_builds_under_every_probe_and_replays(family, probe):
    pc = ParallaxCase(Case(family, {}, B=1, H=2, S=9, D=4, dtype="bfloat16", seed=5), probe, PROBES[probe].easy())
    assert parse_parallax_case(pc.spec()) == pc
    p = pc.build()
    assert p.r.shape == p.q.shape and p.r.dtype == p.q.dtype and bool(torch.isfinite(p.r).all())
    # the same case, so the same q, k, v whatever the probe
    base = pc.case.build()
    assert torch.equal(p.q, base.q) and torch.equal(p.k, base.k) and torch.equal(p.v, base.v)


def test_zero_probe_is_zero_and_lla_probe_is_the_oracles():
    from lla_verify.oracles.parallax import lla_probe

    c = Case("gaussian", {"lam": 0.1}, S=12, D=4, dtype="float32", seed=1)
    assert not ParallaxCase(c, "zero").build().r.any()
    p, base = ParallaxCase(c, "lla").build(), c.build()
    want = lla_probe(base.q, base.k, base.v, ridge_lambda=base.ridge_lambda, qk_scale=base.qk_scale)
    torch.testing.assert_close(p.r, want.to(torch.float32))


def test_small_eig_probe_lies_along_the_smallest_direction_with_projections_of_size_amp():
    c = Case("spectrum", {"kappa": 1e4}, S=24, D=4, dtype="float64", seed=2)
    p = ParallaxCase(c, "small_eig", {"amp": 3.0}).build()
    cov = _weighted_key_cov(p.q, p.k, p.qk_scale)
    ev, vec = torch.linalg.eigh(cov)
    i = 20  # a row with enough keys for a full-rank covariance
    u = vec[0, 0, i, :, 0]
    r = p.r[0, 0, i]
    assert abs(float((r / r.norm()) @ u)) > 1 - 1e-9
    # the weighted RMS of <k_j - kbar_i, r_i> is amp: r_i^T cov_i r_i = amp^2
    assert math.isclose(float(r @ cov[0, 0, i] @ r), 9.0, rel_tol=1e-9)


def test_random_probe_is_measured_in_the_keys_spread():
    small = ParallaxCase(Case("large_norm", {"factor": 1.0}, S=16, D=8, dtype="float64", seed=3), "random").build()
    big = ParallaxCase(Case("large_norm", {"factor": 100.0}, S=16, D=8, dtype="float64", seed=3), "random").build()
    # keys 100x larger, probe 100x smaller: the same <k_j - kbar, r>
    torch.testing.assert_close(big.r * 100, small.r, rtol=1e-12, atol=0)
    assert float(_key_spread(torch.zeros(1, 1, 1, 4, dtype=torch.float64)).min()) > 0


@pytest.mark.parametrize("spec, match", [
    ("gaussian::B=1,H=1,S=4,D=4,dtype=float32,seed=0", "expected 'CASE_SPEC;probe=NAME"),
    ("gaussian::B=1,H=1,S=4,D=4,dtype=float32,seed=0;probe=bogus", "probe: unknown 'bogus'"),
    ("gaussian::B=1,H=1,S=4,D=4,dtype=float32,seed=0;probe=random:amp=1e9", r"amp=1000000000.0: probe random's amp"),
    ("gaussian::B=1,H=1,S=4,D=4,dtype=float32,seed=0;probe=random:size=1", "has no parameter 'size'"),
    ("gaussian::B=1,H=1,S=4,D=4,dtype=float32,seed=0;probe=random:amp=x", "probe parameter amp='x'"),
    ("gaussian::B=1,H=1,S=0,D=4,dtype=float32,seed=0;probe=zero", "S must be an integer >= 1"),
])
def test_bad_parallax_specs_are_named(spec, match):
    with pytest.raises(LLAInputError, match=match):
        parse_parallax_case(spec)


def test_builtin_records_and_external_callables():
    for name in PARALLAX_BUILTIN_NAMES:
        rec = get_parallax_impl(name)
        assert rec.operator == "parallax" and rec.name == name
    ext = get_parallax_impl("lla_verify.testing.mutants:px_dropped_nu")
    assert ext.operator == "parallax" and ext.grads == ("dq", "dk", "dv", "dr")
    for bad, match in (("nope", "unknown implementation 'nope'"), ("no_such_module_x:f", "cannot import module"),
                       ("lla_verify.testing.mutants:missing", "has no attribute 'missing'"),
                       ("lla_verify.testing.mutants:TILE", "is not callable")):
        with pytest.raises(LLAInputError, match=match):
            get_parallax_impl(bad)
    # LLA's registry is unchanged: its names resolve to LLA records, Parallax's do not
    assert all(get_impl(n).operator == "lla" for n in BUILTIN_NAMES)
    with pytest.raises(LLAInputError, match="--lla-impl: unknown implementation 'parallax-dense'"):
        get_impl("parallax-dense")


def test_parallax_triton_is_unavailable_with_its_reason_when_it_does_not_import(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "parallax_triton", None)  # import raises ImportError
    for name in ("parallax-triton", "parallax-triton-bf16w"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        rec = get_parallax_impl(name)
        why = is_parallax_available(rec, "cpu")
        assert why is not None and "parallax_triton does not import" in why, name
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "interpreter" in is_parallax_available(rec, "cpu"), name
    assert is_parallax_available(get_parallax_impl("parallax-dense"), "cpu") is None


def test_the_call_refuses_an_implementation_that_writes_its_inputs():
    from lla_verify import trust
    from lla_verify.registry.impls import Impl
    from lla_verify.testing.parallax import run

    def writes_r(q, k, v, r, *, qk_scale=None):
        r.zero_()
        return v.clone()

    p = ParallaxCase(Case("gaussian", {}, S=6, D=4, dtype="float32"), "random").build()
    with pytest.raises(trust.Misbehaved, match="modified its inputs: r"):
        run(Impl(name="w", forward=writes_r, description="", operator="parallax"), p)


def test_an_external_describing_itself_as_parallax_is_refused_by_lla_and_taken_by_parallax(monkeypatch):
    import types

    mod = types.ModuleType("px_external_for_test")

    def fn(q, k, v, r, *, qk_scale=None):
        return v.clone()

    fn.lla_impl_record = get_parallax_impl("parallax-dense")
    mod.fn = fn
    monkeypatch.setitem(sys.modules, "px_external_for_test", mod)
    with pytest.raises(LLAInputError, match="a parallax implementation, not LLA"):
        get_impl("px_external_for_test:fn")
    assert get_parallax_impl("px_external_for_test:fn").name == "parallax-dense"


def test_mp_parallax_refuses_what_it_cannot_do_by_name():
    from lla_verify.oracles.mp_parallax import parallax_forward_mp, parallax_grad_mp

    q = torch.zeros(1, 1, 9, 4, dtype=torch.float64)
    with pytest.raises(LLAInputError, match="parallax_grad_mp: finite differences in mpmath are for tiny problems"):
        parallax_grad_mp(q, q, q, q, cotangent=q)
    with pytest.raises(LLAInputError, match="r: expected the shape of q"):
        parallax_forward_mp(q, q, q, q[..., :-1])
    with pytest.raises(LLAInputError, match="dps: expected an int >= 20"):
        parallax_forward_mp(q, q, q, q, dps=10)
    big = torch.zeros(4, 1, 128, 8, dtype=torch.float64)
    with pytest.raises(LLAInputError, match="parallax_forward_mp: problem too large"):
        parallax_forward_mp(big, big, big, big)


def test_a_probe_beyond_the_dtype_range_is_refused_by_name():
    from lla_verify.registry.parallax import ProbeOutOfRange

    pc = parse_parallax_case("spectrum:kappa=100000,lam_rel=1,rotate=1,scale_mult=1:B=1,H=1,S=1,D=16,"
                             "dtype=float16,seed=0;probe=lla")
    with pytest.raises(ProbeOutOfRange, match="probe lla reaches .* beyond float16's range"):
        pc.build()
    ParallaxCase(pc.case.__class__(**{**pc.case.__dict__, "dtype": "float32"}), "lla").build()  # fits float32


def test_the_small_eig_direction_is_the_keys_and_not_the_eigensolvers():
    """Early rows have a repeated eigenvalue 0 (rank below D), where eigh may return any
    basis of the eigenspace, with any signs (it differs between CPUs): the probe's
    direction, a fixed vector projected onto the eigenspace, is the same for every basis."""
    from lla_verify.registry.parallax import eigenspace_direction

    gen = torch.Generator().manual_seed(0)
    D = 6
    x = torch.randn(2, D, generator=gen, dtype=torch.float64)
    cov = x.T @ x  # rank 2: eigenvalue 0 four times
    ev, vec = torch.linalg.eigh(cov)
    g = torch.randn(D, generator=gen, dtype=torch.float64)
    u = eigenspace_direction(ev, vec, 0, g)
    assert float((cov @ u).norm()) < 1e-12 * float(cov.norm())  # in the null space
    # another basis of the null space (a rotation of its four vectors) and flipped signs
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    other = vec.clone()
    other[:, :4] = vec[:, :4] @ rot
    other[:, 4] = -other[:, 4]
    assert torch.allclose(eigenspace_direction(ev, other, 0, g), u, rtol=0, atol=1e-12)
    # a simple eigenvalue: its eigenvector, whatever its sign in the basis
    u5 = eigenspace_direction(ev, vec, 5, g)
    assert torch.allclose(u5.abs(), vec[:, 5].abs(), atol=1e-12) and float(u5 @ g) > 0
    assert torch.allclose(eigenspace_direction(ev, -vec, 5, g), u5, atol=1e-12)


SMALL_EIG_CASES = (
    "large_norm:factor=100,lam=1:B=1,H=1,S=48,D=16,dtype=float32,seed=0;probe=small_eig:amp=1",
    "offset:offset=10000:B=1,H=1,S=48,D=16,dtype=float32,seed=0;probe=small_eig",
    "gaussian::B=1,H=2,S=24,D=8,dtype=float32,seed=3;probe=small_eig:index=2",
    "duplicates:pool=4:B=1,H=1,S=32,D=8,dtype=float32,seed=1;probe=small_eig",
)


def _sym_perturbation(cov, size, gen):
    """A random symmetric E per row with |E_i|_2 = size_i."""
    e = torch.randn(cov.shape, generator=gen, dtype=torch.float64)
    e = e + e.transpose(-1, -2)
    return e * (size / torch.linalg.matrix_norm(e, ord=2))[..., None, None]


def test_small_eig_cond_bounds_what_an_eigensolver_backward_error_does_to_the_probe():
    """ProbeFamily.cond of small_eig: each row's probe, rebuilt from its covariance plus an
    eigensolver's backward error (a symmetric E_i of norm t D |C_i|, t in the first-order
    range), moves by at most cond_i t relatively; and the bound is not vacuous: somewhere
    the move reaches a hundredth of it (a condition made 100x too large fails here)."""
    from lla_verify.registry.parallax import small_eig_of_cov

    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for spec in SMALL_EIG_CASES:
        case = parse_parallax_case(spec)
        _, params, base, q, k, v, probe_gen = case._probe_inputs()
        seed = probe_gen.initial_seed()
        cov = _weighted_key_cov(q, k, base.qk_scale)
        r0 = small_eig_of_cov(params, cov, k, torch.Generator().manual_seed(seed))
        assert torch.equal(r0.to(base.q.dtype), case.build().r)  # the probe the case builds
        cond = case.probe_cond()
        assert bool((cond >= 0).all()) and bool(torch.isfinite(cond).all()), spec
        D = q.shape[-1]
        for t in (1e-14, 1e-13, 1e-12):
            for _ in range(3):
                e = _sym_perturbation(cov, t * D * torch.linalg.matrix_norm(cov, ord=2), gen)
                r1 = small_eig_of_cov(params, cov + e, k, torch.Generator().manual_seed(seed))
                moved = (r1 - r0).norm(dim=-1) / r0.norm(dim=-1)
                ratio = torch.where(cond > 0, moved / (cond * t), torch.where(moved > 0, math.inf, 0.0))
                assert float(ratio.max()) <= 1.0, (spec, t, float(ratio.max()))
                worst = max(worst, float(ratio.max()))
    assert worst >= 1e-2, worst


def test_probes_without_an_eigensolver_have_no_condition_of_their_own():
    for probe in ("zero", "random", "large", "lla"):
        case = parse_parallax_case(f"gaussian::B=1,H=1,S=8,D=4,dtype=float32,seed=0;probe={probe}")
        assert PROBES[probe].cond is None and torch.equal(case.probe_cond(), torch.zeros(1, 1, 8, dtype=torch.float64))
