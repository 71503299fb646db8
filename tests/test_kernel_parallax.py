"""The parallax_triton kernels (forward and backward), judged by the Parallax budgets.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1) at small sizes, and
compiled on a CUDA device. The forward is judged by budget.parallax.check_parallax_forward
(the derived per-query model and FlashAttention's same-precision rule against the float64
oracle), the gradients by check_parallax_backward (float64 autograd through the oracle;
4x the dense fp32 autograd error, or a few ulp). The families: Gaussian, keys with a
large common offset (q unchanged), large probes (|r_i| from 10 to 100), the zero probe
(softmax attention), S not a multiple of the tile, S = 1.
"""

from __future__ import annotations


import pytest
import torch

from lla_contract import LLAInputError
from lla_verify.budget.parallax import check_parallax_backward, check_parallax_forward, kernel_target
from lla_verify.oracles.parallax import parallax_forward
from lla_verify.testing.kernel_device import kernel_device, needs_kernel_device

DEVICE = kernel_device()

pytestmark = [
    pytest.mark.interp,
    needs_kernel_device,
]

if DEVICE is not None:
    from parallax_triton import parallax_attention

KEY_OFFSET = 1e3
FAMILIES = ("gaussian", "key_offset", "large_probe", "key_offset_large_probe", "zero_probe")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(family, *, S=37, D=16, Dv=None, dtype=torch.float32, B=1, H=2, seed=0):
    """q, k, v, r of the family, drawn in float64 and rounded to ``dtype`` (the oracle and
    the budget see the rounded values)."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q, k, r = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.randn(B, H, S, Dv, generator=gen, dtype=torch.float64)
    if family in ("key_offset", "key_offset_large_probe"):
        # a common offset of every key coordinate; q keeps its own scale
        k = k + KEY_OFFSET
    if family in ("large_probe", "key_offset_large_probe"):
        mag = 10.0 ** (1.0 + torch.rand(B, H, S, 1, generator=gen, dtype=torch.float64))
        r = r / r.norm(dim=-1, keepdim=True) * mag
    elif family == "zero_probe":
        r = torch.zeros_like(r)
    elif family not in FAMILIES:
        raise ValueError(family)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, r))


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _judge_forward(q, k, v, r, case, qk_scale=None):
    o = parallax_attention(q, k, v, r, qk_scale=qk_scale)
    assert o.dtype == q.dtype and o.shape == v.shape
    verdict = check_parallax_forward(q, k, v, r, o, impl="parallax_triton", case=case, qk_scale=qk_scale,
                                     compute_dtype=_compute_dtype(q.dtype))
    assert verdict.passed, verdict.message
    return verdict


def _judge_backward(q, k, v, r, case, qk_scale=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=q.dtype)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v, r))
    grads = torch.autograd.grad(parallax_attention(*leaves, qk_scale=qk_scale), leaves, do)
    for g, t in zip(grads, (q, k, v, r)):
        assert g.dtype == t.dtype and g.shape == t.shape
    verdict = check_parallax_backward(q, k, v, r, do, grads, impl="parallax_triton", case=case, qk_scale=qk_scale,
                                      compute_dtype=_compute_dtype(q.dtype))
    assert verdict.passed, verdict.message
    return verdict


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_families(family, dtype):
    # S = 37: three 16-row tiles in the interpreter, the last one partial
    _judge_forward(*_inputs(family, dtype=dtype), f"{family} S=37 D=16 {dtype}")


# bf16 outside autograd: the inference kernel on the fast rows (docs/kernels-parallax.md §3)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("family", ("gaussian", "key_offset_large_probe"))
@pytest.mark.parametrize("D", (32, 64))
def test_forward_wider_heads(family, D, dtype):
    _judge_forward(*_inputs(family, S=48, D=D, H=1, dtype=dtype), f"{family} S=48 D={D} {dtype}")


def test_head_dim_128():
    q, k, v, r = _inputs("key_offset_large_probe", S=20, D=128, Dv=64, H=1)
    _judge_forward(q, k, v, r, "key_offset_large_probe S=20 D=128 Dv=64")
    _judge_backward(q, k, v, r, "key_offset_large_probe S=20 D=128 Dv=64")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("family", ("large_probe", "gaussian"))
def test_forward_value_width_differs(family, dtype):
    _judge_forward(*_inputs(family, S=29, D=16, Dv=32, dtype=dtype), f"{family} D=16 Dv=32 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_single_token(dtype):
    # o_0 = v_0 exactly: one key, no covariance
    q, k, v, r = _inputs("large_probe", S=1, dtype=dtype)
    _judge_forward(q, k, v, r, f"large_probe S=1 {dtype}")
    assert torch.equal(parallax_attention(q, k, v, r), v)


@pytest.mark.parametrize("qk_scale", (0.0, 0.9))
def test_forward_explicit_scale(qk_scale):
    _judge_forward(*_inputs("gaussian", S=21), f"gaussian qk_scale={qk_scale}", qk_scale=qk_scale)


def test_forward_float64_matches_the_oracle():
    # float64 inputs compute in float64 throughout
    _judge_forward(*_inputs("key_offset", dtype=torch.float64), "key_offset float64")
    _judge_forward(*_inputs("large_probe", dtype=torch.float64), "large_probe float64")


# Pinned property-suite draws. Large-norm keys concentrate the softmax on a key far from
# any fixed anchor: there sum_j p_j v_j d_j and nu_i sum_j p_j d_j are ~1e6 and cancel to
# O(1), so only a co-moment centred on the running means meets the budget.
PINNED_FORWARD = (
    "large_norm:factor=19.95128837200088,lam=1:B=1,H=1,S=6,D=16,dtype=float32,seed=0;probe=lla",
    "gaussian:lam=1,scale_mult=3.1622776601683795:B=1,H=1,S=2,D=16,dtype=float32,seed=1;probe=lla",
    # row 19's second key tile weighs a subnormal against the running maximum: dividing by
    # a tile's own weight overflows there and turns the row into NaN
    "large_norm:factor=100,lam=1:B=1,H=1,S=20,D=16,dtype=float32,seed=0;probe=zero",
)


def _pinned_problem(spec):
    from lla_verify.registry.parallax import parse_parallax_case

    return parse_parallax_case(spec).build(DEVICE)


def _pinned(spec):
    p = _pinned_problem(spec)
    return p, parallax_attention(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)


@pytest.mark.parametrize("spec", PINNED_FORWARD)
def test_pinned_forward_within_budget(spec):
    p, o = _pinned(spec)
    verdict = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl="parallax_triton", case=spec, qk_scale=p.qk_scale)
    assert verdict.passed, verdict.message


# Large-norm keys: the softmax sits on keys whose d_ij = <k_j - k_0, r_i> is ~5e3 while
# their spread e_ij is ~0.2; a d rounded at u |d| misses the target there by 3.3x and 2.1x,
# d referred to each row's heaviest key through an exact split product meets it
# (docs/kernels-parallax.md §3).
# Unit-scale keys with a random probe, found on the H200: fp32 on tf32x3 products missed the
# target there by 1.44x and 1.08x (the tensor cores truncate their fp32 accumulation), on
# exact fp32 products (kernels.FP32_PRECISION) at 0.78 and at most 0.64; under the interpreter, which
# rounds to nearest, both pass either way (docs/kernels-parallax.md §6).
PINNED_TARGET = PINNED_FORWARD + (
    "large_norm:factor=20,lam=1:B=1,H=2,S=37,D=16,dtype=float32,seed=2;probe=lla",
    "large_norm:factor=100,lam=1:B=1,H=2,S=37,D=16,dtype=float32,seed=1;probe=small_eig",
    "gaussian:lam=1:B=1,H=1,S=120,D=16,dtype=float32,seed=3;probe=random:amp=1",
    "large_norm:factor=1,lam=1:B=1,H=1,S=53,D=16,dtype=float32,seed=2;probe=random:amp=1",
)


@pytest.mark.parametrize("spec", PINNED_TARGET)
def test_pinned_forward_meets_the_same_precision_target(spec):
    # issue 22's kernel target (budget.parallax.kernel_target): the gaussian S = 2 draw has
    # one covariance row, where a single dense evaluation's error is a lottery ticket
    # (docs/kernels-parallax.md, "The same-precision target")
    p, o = _pinned(spec)
    o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
    allowed, dense_err = kernel_target(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, o64=o64)
    err = (o.double() - o64).norm(dim=-1)
    assert bool((err <= allowed).all()), (f"{spec}: error / target {float((err / allowed).max()):.3g} "
                                          f"(errors {err.flatten().tolist()}, dense {dense_err.flatten().tolist()})")


def test_forward_tiles_narrower_than_the_query_tile():
    # BLOCK_N < BLOCK_M (the GPU's D = 128 configuration): the upper rows of a query tile
    # see no key of the second diagonal key tile and must leave their moments unchanged
    from parallax_triton import parallax_forward_kernel

    spec = "large_norm:factor=19.95128837200088,lam=1:B=1,H=2,S=45,D=16,dtype=float32,seed=3;probe=lla"
    p = _pinned_problem(spec)
    flat = tuple(t.reshape(2, 45, t.shape[-1]).contiguous() for t in (p.q, p.k, p.v, p.r))
    o = parallax_forward_kernel(*flat, p.qk_scale, config=(32, 16, 1, 1)).o.reshape(p.v.shape)
    verdict = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl="parallax_triton", case=f"{spec} BLOCK 32x16",
                                     qk_scale=p.qk_scale)
    assert verdict.passed, verdict.message


def test_zero_probe_is_causal_softmax_attention():
    q, k, v, r = _inputs("zero_probe", S=40, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert float((parallax_attention(q, k, v, r) - ref).abs().max()) < 1e-12


def test_three_dimensional_inputs():
    q, k, v, r = (t[0] for t in _inputs("gaussian", S=20))  # (H, S, D) read as (B, S, D)
    o = parallax_attention(q, k, v, r)
    assert o.shape == v.shape
    assert torch.equal(o, parallax_attention(*(t[None] for t in (q, k, v, r)))[0])


def _uncentred(q, k, v, r):
    """The trap the kernel's anchoring avoids, in fp32 torch: C_i r_i through the uncentred
    expansion sum_j p_ij v_j <k_j, r_i> - nu_i <kbar_i, r_i>."""
    qf, kf, vf, rf = (t.float() for t in (q, k, v, r))
    S = q.shape[-2]
    a = (qf @ kf.transpose(-1, -2)) / q.shape[-1] ** 0.5
    a = a.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(a, -1)
    nu = p @ vf
    h = (rf[..., :, None, :] * kf[..., None, :, :]).sum(-1)  # <k_j, r_i>
    return (nu - ((p * h) @ vf - nu * (p * h).sum(-1, keepdim=True))).to(q.dtype)


SHIFT = 1024.0


def _exactly_shiftable(S=37, D=16, seed=0):
    """fp32 inputs whose keys shifted by SHIFT are exact (keys on a 2^-13 grid, the fp32
    spacing at 1024), with queries of scale 1e-2.

    Parallax is invariant under a common shift of the keys, and here the shifted inputs
    are exact, so the shifted problem is the unshifted one and must meet its budget. Small
    queries keep the shift out of the scores: s <q_i, k_j> rounds at u s |q_i| |k_j|, which
    no centring of the covariance removes (the dense reference has it too) and which the
    budget of the shifted problem allows for. What remains of the shift is the covariance
    term's. The budget of the shifted problem cannot tell the two apart: its sensitivity
    to componentwise relative perturbations of k_j (size u |k_j|) is the uncentred
    expansion's cancellation, ~ u |k_j| |r_i| |v_j|."""
    q, k, v, r = _inputs("large_probe", S=S, D=D, seed=seed, dtype=torch.float64)
    q = q * 1e-2
    k = torch.round(k * 2.0**13) / 2.0**13
    base = tuple(t.float() for t in (q, k, v, r))
    return base, base[1] + SHIFT


def test_key_shift_meets_the_unshifted_budget():
    (q, k, v, r), k_shifted = _exactly_shiftable()
    assert torch.equal(k_shifted - SHIFT, k)  # the shift is exact
    o = parallax_attention(q, k_shifted, v, r)
    verdict = check_parallax_forward(q, k, v, r, o, impl="parallax_triton", case="keys + 1024, judged unshifted")
    assert verdict.passed, verdict.message

    gen = torch.Generator().manual_seed(1)
    do = torch.randn(v.shape, generator=gen).to(DEVICE)
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k_shifted, v, r))
    grads = torch.autograd.grad(parallax_attention(*leaves), leaves, do)
    verdict = check_parallax_backward(q, k, v, r, do, grads, impl="parallax_triton",
                                      case="keys + 1024, judged unshifted")
    assert verdict.passed, verdict.message


def test_uncentred_expansion_fails_the_key_shift_test():
    # the test above can fail: the uncentred expansion meets the unshifted budget on the
    # unshifted keys and misses it by orders of magnitude on the shifted ones
    (q, k, v, r), k_shifted = _exactly_shiftable()
    plain = check_parallax_forward(q, k, v, r, _uncentred(q, k, v, r), impl="uncentred", case="unshifted")
    assert plain.passed, plain.message
    shifted = check_parallax_forward(q, k, v, r, _uncentred(q, k_shifted, v, r), impl="uncentred",
                                     case="keys + 1024, judged unshifted")
    assert shifted.ratio > 10.0, shifted.message


# ----------------------------------------------------------------------------- bf16 products
# For bf16 inputs the kernels take every tile product whose operands are exact bf16 values,
# or an fp32 side split into exact bf16 parts, as bf16 products (docs/kernels-parallax.md
# §3, "bf16 products"): the same sums as the fp32 path's, only the products' dtype differs.


if DEVICE is not None:
    import triton
    import triton.language as tl

    from parallax_triton.kernels import _bf16_parts

    @triton.jit
    def _split3(X, P, N: tl.constexpr):
        offs = tl.arange(0, N)
        p1, p2, p3 = _bf16_parts(tl.load(X + offs))
        tl.store(P + offs, p1.to(tl.float32))
        tl.store(P + N + offs, p2.to(tl.float32))
        tl.store(P + 2 * N + offs, p3.to(tl.float32))


def test_bf16_parts_are_exact():
    gen = torch.Generator().manual_seed(0)
    n = 4096
    # fp32 values with every significand bit in use, over a wide range of exponents (parts
    # below bf16's smallest subnormal, 2^-133, are outside the claim)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0 ** torch.randint(-60, 60, (n,), generator=gen)
    x = x.float()
    parts = torch.empty(3, n, device=DEVICE)
    _split3[(1,)](x.to(DEVICE), parts, N=n)
    parts = parts.cpu()
    assert torch.equal(parts, parts.to(torch.bfloat16).float())  # each part a bf16 value
    assert torch.equal(parts.double().sum(0), x.double())  # and together exactly x


def test_bf16_products_match_the_fp32_path():
    # the same bf16 values through the bf16 products and through the fp32 path: the row
    # references are exact in both (bitwise equal), dbar_i agrees to a few fp32 roundings
    # of |r_i| max_j |k_j - k_0|. kp_lo in one bf16 part instead of three is 46 of them off.
    # Every entry through the split in both (fast=False): the fast-tile test's thresholds
    # depend on the dtype, and a plain entry is not the split's value.
    from lla_verify.registry.parallax import parse_parallax_case
    from parallax_triton import parallax_forward_kernel

    spec = "large_norm:factor=100,lam=1:B=1,H=2,S=37,D=16,dtype=bfloat16,seed=1;probe=small_eig"
    p = parse_parallax_case(spec).build(DEVICE)
    flat = [t.reshape(2, 37, t.shape[-1]).contiguous() for t in (p.q, p.k, p.v, p.r)]
    b16 = parallax_forward_kernel(*flat, p.qk_scale, fast=False)
    f32 = parallax_forward_kernel(*(t.float() for t in flat), p.qk_scale, fast=False)
    for name in ("ref", "tref", "sa"):
        assert torch.equal(getattr(b16, name), getattr(f32, name)), name
    kp = flat[1].double() - flat[1][:, :1].double()
    unit = 2.0 ** -24 * flat[3].double().norm(dim=-1) * kp.norm(dim=-1).amax(-1, keepdim=True)
    off = float(((b16.dbar.double() - f32.dbar.double()).abs() / unit).max())
    assert off <= 8.0, f"dbar of the bf16 products {off:.3g} fp32 roundings from the fp32 path's"


# ----------------------------------------------------------------------------- fast tiles
# An entry takes the plain product where its rounding bound is below u_in / 4 of the
# exponent and of e (docs/kernels-parallax.md §3, "Fast tiles"). fast=True forces the plain
# product on every entry, fast=False the split on every entry.


def _flat(*ts):
    return [t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous() for t in ts]


def _small_norm(dtype=torch.float32):
    """Gaussian q, k, r at 1e-2 (s |q| |k| ~ 4e-4, |r| |k - k_0| ~ 2e-3): below fp32's thresholds
    (8.3e-3 at D = 16) on every entry."""
    q, k, v, r = _inputs("gaussian", dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q * 1e-2, k * 1e-2, v, r * 1e-2))


@pytest.mark.parametrize("case", ("small_norm float32", "gaussian bfloat16", "zero_probe bfloat16",
                                  "gaussian float16"))
def test_fast_tiles_take_the_plain_product_everywhere(case):
    from parallax_triton.kernels import fast_fraction, parallax_forward_kernel

    family, dtype = case.split()
    dtype = getattr(torch, dtype)
    q, k, v, r = _small_norm() if family == "small_norm" else _inputs(family, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    flat = _flat(q, k, v, r)
    assert fast_fraction(flat[0], flat[1], flat[3], scale) == (1.0, 1.0)
    fo = parallax_forward_kernel(*flat, scale)
    # every tile took the plain products: bitwise the forced-plain result, and not the split's
    # (16-bit outputs round both to the same values: the fp32 row quantities tell them apart)
    plain, split = (parallax_forward_kernel(*flat, scale, fast=f) for f in (True, False))
    for name in ("o", "nup", "cr", "dbar", "tref", "trem", "sa"):
        assert torch.equal(getattr(fo, name), getattr(plain, name)), name
    # the references: the split keeps the exact hi parts there, the plain path whole products
    assert not torch.equal(fo.sa, split.sa)
    assert family == "zero_probe" or not torch.equal(fo.tref, split.tref)
    _judge_forward(q, k, v, r, f"{case}, plain products")
    _judge_backward(q, k, v, r, f"{case}, plain products")


@pytest.mark.parametrize("spec", (
    PINNED_TARGET[3],  # large_norm x20, fp32
    "large_norm:factor=20,lam=1:B=1,H=2,S=37,D=16,dtype=bfloat16,seed=2;probe=lla",
))
def test_large_norm_takes_the_split(spec):
    from parallax_triton.kernels import fast_fraction, parallax_forward_kernel

    p, o = _pinned(spec)
    flat = _flat(p.q, p.k, p.v, p.r)
    fa, fd = fast_fraction(flat[0], flat[1], flat[3], p.qk_scale)
    if p.q.dtype == torch.float32:
        # key 0's d is 0 in both paths (k_0 - k_0 = 0): the one plain entry of each row
        assert fa == 0.0 and fd <= 1.0 / 19 + 1e-12, (fa, fd)
        assert torch.equal(o.reshape(flat[2].shape), parallax_forward_kernel(*flat, p.qk_scale, fast=False).o)
    else:
        # bf16: d (|r_i| (|k_j| + |k_0|) in the thousands) takes the split on every entry; the
        # scores, s |q_i| |k_j| below 910, the plain product
        assert fd == 0.0 and fa == 1.0, (fa, fd)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_key_offset_takes_the_split(dtype):
    from parallax_triton.kernels import fast_fraction

    q, k, v, r = _flat(*_inputs("key_offset", dtype=dtype))
    fa, fd = fast_fraction(q, k, r, q.shape[-1] ** -0.5)
    # s |q_i| |k_j| ~ 4e3 against 910 (bf16) and 68 (fp16); bf16's plain d bounds |k_j| + |k_0|
    assert fa == 0.0, fa
    assert fd == (0.0 if dtype == torch.bfloat16 else 1.0), fd


@pytest.mark.skipif(kernel_device() != "cpu",
                    reason="a demonstration on the interpreter's arithmetic: on the H200 the plain products of "
                           "these two draws meet the target (0.86, 0.22), docs/kernels-parallax.md 'Fast tiles'")
def test_plain_products_miss_the_target_on_large_norm():
    # the tests above can fail: with every entry plain, the large-norm draws whose softmax sits
    # on keys far from k_0 miss issue 22's target in the interpreter, with and without
    # --lla-tensor-cores (the split meets it)
    from parallax_triton.kernels import parallax_forward_kernel

    worst = []
    for spec in PINNED_TARGET[3:]:
        p = _pinned_problem(spec)
        flat = _flat(p.q, p.k, p.v, p.r)
        o = parallax_forward_kernel(*flat, p.qk_scale, fast=True).o.reshape(p.v.shape)
        o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        allowed, _ = kernel_target(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, o64=o64)
        worst.append(float(((o.double() - o64).norm(dim=-1) / allowed).max()))
    assert max(worst) > 1.5, worst


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_mixed_tiles_stay_bitwise_causal(dtype):
    # keys after position t made large: the tiles that hold t need the split for them, while
    # t's own entries stay plain. Per-entry decisions leave rows <= t bitwise unchanged, down
    # to the fp32 row quantities (16-bit outputs would round a change away; with every entry
    # of a mixed tile through the split, nup and cr of rows 16..20 change); dq, dr too.
    from parallax_triton.kernels import fast_fraction, parallax_forward_kernel

    t = 20
    q, k, v, r = _inputs("gaussian", dtype=dtype)
    k2 = k.clone()
    k2[..., t + 1:, :] = k2[..., t + 1:, :] * 1e3
    scale = q.shape[-1] ** -0.5
    assert fast_fraction(*_flat(q, k2, r), scale)[0] < 1.0
    fos = [parallax_forward_kernel(*_flat(q, keys, v, r), scale) for keys in (k, k2)]
    for name in ("o", "m", "lw", "nup", "dbar", "cr", "tref", "trem", "ref", "sa", "sr"):
        a, b = (getattr(fo, name)[:, :t + 1] for fo in fos)
        assert torch.equal(a, b), name
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    grads = []
    for keys in (k, k2):
        leaves = tuple(x.detach().clone().requires_grad_(True) for x in (q, keys, v, r))
        dq, _dk, _dv, dr = torch.autograd.grad(parallax_attention(*leaves), leaves, do)
        grads.append((dq, dr))
    for name, a, b in zip(("dq", "dr"), *grads):
        assert torch.equal(a[..., :t + 1, :], b[..., :t + 1, :]), name


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_families(family, dtype):
    _judge_backward(*_inputs(family, dtype=dtype), f"{family} S=37 D=16 {dtype}")


@pytest.mark.parametrize("D", (32, 64))
def test_backward_wider_heads(D):
    _judge_backward(*_inputs("key_offset_large_probe", S=48, D=D, H=1), f"key_offset_large_probe S=48 D={D}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_backward_key_tiles_wider_than_the_query_tile(dtype):
    # BLOCK_M < BLOCK_N (the GPU's dk, dv configuration at D = 128): a key tile's first
    # query tile starts inside it, and its upper keys see only part of that query tile
    from parallax_triton import parallax_backward_kernel, parallax_forward_kernel

    q, k, v, r = _inputs("key_offset_large_probe", S=45, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    flat = [t.reshape(2, 45, t.shape[-1]).contiguous() for t in (q, k, v, r, do)]
    scale = q.shape[-1] ** -0.5
    fo = parallax_forward_kernel(*flat[:4], scale)
    bo = parallax_backward_kernel(*flat, fo, scale, config=(16, 32, 1, 1))
    grads = tuple(t.reshape(x.shape) for t, x in zip((bo.dq, bo.dk, bo.dv, bo.dr), (q, k, v, r)))
    verdict = check_parallax_backward(q, k, v, r, do, grads, impl="parallax_triton",
                                      case=f"key_offset_large_probe S=45 {dtype} BLOCK 16x32",
                                      compute_dtype=_compute_dtype(dtype))
    assert verdict.passed, verdict.message


def test_backward_value_width_differs_and_single_token():
    _judge_backward(*_inputs("gaussian", S=29, D=32, Dv=16, H=1), "gaussian D=32 Dv=16")
    _judge_backward(*_inputs("large_probe", S=1), "large_probe S=1")


# Audit cells (the audit's cotangent), where the backward once missed its budget
# (docs/kernels-parallax.md §5): at scale 100 most rows are one-hot, where dr = -C_i^T g_i
# is ~1e-79 and an uncentred sum of p_ij gv_ij (k_j - k_0) left u |g| |v| |k| (ratio 3.6e4),
# and a score rounded on its own at |a| ~ 700 moves the second key's p by 1e-4 (dr 4.5);
# large-norm keys put d_ij at ~5e3 against e_ij ~ 1e-9 at the heavy key, and lse = m + log W
# rounds log W at u |m| (dv 34).
PINNED_BACKWARD = (
    "bandwidth:lam=1,scale=100:B=1,H=1,S=48,D=16,dtype=float32,seed=0;probe=random:amp=1",
    "large_norm:factor=100,lam=1:B=1,H=1,S=48,D=16,dtype=float32,seed=0;probe=small_eig:amp=1",
    # one covariance row: the kernel's dr_1 error (2.8e-7) is 1.8x the dense error's median over
    # 200 orderings, but the median of the first nine fell below that distribution's lower
    # quartile and put it 1.0007x over; the budget's 21 orderings make that a 0.6% event
    # (docs/error-model.md §8)
    "gaussian:lam=1,scale_mult=3.1622776601683795:B=1,H=1,S=2,D=16,dtype=float32,seed=1;probe=lla",
)


def _pinned_gradients(spec):
    """The pinned case, the registry's cotangent and the kernel's (dq, dk, dv, dr)."""
    from lla_verify.registry.operators import COTANGENT_SEED

    p = _pinned_problem(spec)
    gen = torch.Generator().manual_seed(COTANGENT_SEED)
    do = torch.randn(tuple(p.v.shape), generator=gen, dtype=torch.float64).to(p.q.dtype).to(DEVICE)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (p.q, p.k, p.v, p.r))
    return p, do, torch.autograd.grad(parallax_attention(*leaves, qk_scale=p.qk_scale), leaves, do)


@pytest.mark.parametrize("spec", PINNED_BACKWARD)
def test_pinned_backward_within_budget(spec):
    p, do, grads = _pinned_gradients(spec)
    verdict = check_parallax_backward(p.q, p.k, p.v, p.r, do, grads, impl="parallax_triton", case=spec,
                                      qk_scale=p.qk_scale)
    assert verdict.passed, verdict.message


# Large-norm keys make most rows one-hot, and dk at a one-hot row's heavy key is
# -p_ij gv_ij r_i + s da_ij q_i at full weight, with gv_ij = <g_i, v_j - nu_i> small
# (0.0385 on query 20 of the first case, which gives 98% of dk_1). A gc_i = <g_i, nu_i - v_ref>
# taken from the saved nu_i rounds at u |g_i| |nu_i - v_0| (5e-5 there): dk_1 was 40x its
# dense median, the second case's worst dk row 12x; the budget fails the first (1.61) but
# passes the second (0.75), whose floor and score term are 16x its median
# (docs/kernels-parallax.md §5, "gc_i from the dq kernel", and §7). So the rows are judged
# on their own here: FlashAttention's rule against each row's own dense median. Rows under
# 1e-3 of the head's largest dk are left to the budget's floor: their sums cancel far below the head's scale (dk_12 of the first case is 7e-16
# against 197), where the dense median is a draw of terms the budget's floor already allows.
ONE_HOT_DK = (
    PINNED_BACKWARD[1],
    "large_norm:factor=100,lam=1:B=1,H=2,S=37,D=16,dtype=float32,seed=1;probe=small_eig",
)


# One tf32x3 product (the GPU's fp32 tl.dot, and the interpreter's under --lla-tensor-cores)
# misses lo*lo and each operand's residual after its two TF32 parts: each at most 2^-22 of
# |a| |b| (an rna TF32 part is within 2^-11 of what it rounds), 3 * 2^-22 together. Where
# one product carries a row (dv at a one-hot row's heavy key), the kernel's error is that
# relative size of the row while the dense fp32 computation can be exact there (median 0).
TF32X3_PRODUCT = 3 * 2.0 ** -22


def _assert_rows_within_the_dense_factor(spec, name):
    """Each row of weight (at least 1e-3 of the head's largest) of gradient ``name`` within
    BWD_FACTOR times its own dense median, or one tf32x3 product's rounding of the row."""
    from lla_verify.budget.parallax import BWD_FACTOR, GRAD_NAMES, parallax_backward_budget

    n = GRAD_NAMES.index(name)
    p, do, grads = _pinned_gradients(spec)
    pb = parallax_backward_budget(p.q, p.k, p.v, p.r, do, qk_scale=p.qk_scale)
    g64, med = pb.grads64[n], pb.dense_err[n]
    weight = g64.norm(dim=-1)
    judged = weight >= 1e-3 * weight.amax(-1, keepdim=True)
    err = (grads[n].double() - g64).norm(dim=-1)
    allowed = torch.maximum(BWD_FACTOR * med, TF32X3_PRODUCT * weight)
    ratio = torch.where(judged, err / allowed, 0.0)
    at = tuple(int(x) for x in torch.unravel_index(ratio.argmax(), ratio.shape))
    assert float(ratio[at]) <= 1.0, (f"{spec}: {name} row {at} error {float(err[at]):.3e} is "
                                     f"{float(err[at] / med[at]):.3g}x its dense median {float(med[at]):.3e} "
                                     f"(|{name}| {float(weight[at]):.3e}, one tf32x3 product's rounding "
                                     f"{TF32X3_PRODUCT * float(weight[at]):.3e})")


@pytest.mark.parametrize("spec", ONE_HOT_DK)
def test_dk_rows_within_the_dense_factor_at_one_hot_rows(spec):
    _assert_rows_within_the_dense_factor(spec, "dk")


# dv_j = sum_i p_ij (1 - e_ij) g_i: on a one-hot row the heavy key's 1 - e_ij is 1 up to
# e_ij, a small difference. d_ij kept as (hi_ij - t_i) + rem_ij left e_i,ref at u |rem_ref|
# (dbar_i, a mean dominated by that key, is rem_ref rounded once more): dv_31 of the first
# case was 29.6x its dense median, the second case's worst dv row 8.6x. With the remainder
# also taken less its value at the key, d is exactly 0 there (docs/kernels-parallax.md §5).
@pytest.mark.parametrize("spec", ONE_HOT_DK)
def test_dv_rows_within_the_dense_factor_at_one_hot_rows(spec):
    _assert_rows_within_the_dense_factor(spec, "dv")


def test_backward_float64():
    # the float64 path computes in float64; the dense float64 reference in its own coordinate
    # order is the oracle itself (error 0), in the others it draws float64 rounding, whose
    # median scales the allowance: on the key-offset family the scores' float64 rounding
    # (kernel dq 8.3e-13) is 26x the floor alone and 0.16 of the budget
    _judge_backward(*_inputs("gaussian", dtype=torch.float64), "gaussian float64")
    _judge_backward(*_inputs("large_probe", dtype=torch.float64), "large_probe float64")
    _judge_backward(*_inputs("key_offset", dtype=torch.float64), "key_offset float64")


def test_gradcheck_float64():
    # S = 4: one partial query and key tile with the causal diagonal, the only path an S below
    # the tile takes; gradcheck's finite differences cost two interpreted forwards per input
    # element and one backward per output element, so S sets its cost linearly
    xs = tuple(t.requires_grad_(True) for t in _inputs("large_probe", S=4, H=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: parallax_attention(*a), xs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradients_only_where_asked():
    q, k, v, r = _inputs("gaussian", S=20)
    r = r.clone().requires_grad_(True)
    parallax_attention(q, k, v, r).sum().backward()
    assert r.grad is not None and r.grad.shape == r.shape and bool(r.grad.abs().sum() > 0)


def test_double_backward_raises():
    xs = tuple(t.requires_grad_(True) for t in _inputs("gaussian", S=20))
    (dq,) = torch.autograd.grad(parallax_attention(*xs).sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


# ----------------------------------------------------------------------------- argument errors
def _bad(**change):
    q, k, v, r = _inputs("gaussian", S=16)
    args = dict(q=q, k=k, v=v, r=r)
    args.update(change)
    return args


@pytest.mark.parametrize("change, pattern", [
    (lambda a: dict(r=a["r"][..., :8, :]), r"^r: expected the shape of q"),
    (lambda a: dict(r=None), r"^r: expected a torch.Tensor"),
    (lambda a: dict(r=a["r"].to(torch.int32)), r"^r: expected a floating dtype"),
    (lambda a: dict(q=a["q"][..., :8], k=a["k"][..., :8], r=a["r"][..., :8]), r"^q: head dimension D=8 unsupported"),
    (lambda a: dict(v=torch.randn(1, 2, 16, 24, device=a["v"].device)), r"^v: value dimension Dv=24 unsupported"),
    (lambda a: dict(v=a["v"].half()), r"^q, k, v, r: expected one dtype"),
    (lambda a: dict(r=a["r"].index_put((torch.tensor(0),) * 4, torch.tensor(float("nan")))),
     r"^r: expected finite values"),
    (lambda a: dict(k=a["k"][..., :5, :]), r"^k: expected the shape of q"),
    (lambda a: dict(q=a["q"][0, 0]), r"^q: expected shape \(B, H, S, D\) or \(B, S, D\)"),
])
def test_bad_arguments_name_the_argument(change, pattern):
    base = _bad()
    args = dict(base, **change(base))
    with pytest.raises(LLAInputError, match=pattern):
        parallax_attention(args["q"], args["k"], args["v"], args["r"])


@pytest.mark.parametrize("qk_scale", (-1.0, float("nan"), "x"))
def test_bad_scale(qk_scale):
    with pytest.raises(LLAInputError, match="^qk_scale: "):
        parallax_attention(*_inputs("gaussian", S=16), qk_scale=qk_scale)


# ----------------------------------------------------------------------------- bf16 weights
# every case family with the probe families in turn, bf16: the registry's cases, not this
# file's, so that the forward is judged where the property suite judges it
BF16_WEIGHT_CASES = [f"{fam}::B=1,H=2,S=37,D=16,dtype=bfloat16,seed={i};probe={probe}"
                     for i, (fam, probe) in enumerate(zip(
                         ("gaussian", "subspace", "clusters", "duplicates", "bandwidth", "early", "offset",
                          "large_norm", "linear_values", "lambda_decades", "spectrum"),
                         ("random", "lla", "random", "small_eig", "large", "random", "lla", "random", "lla",
                          "zero", "random")))]


@pytest.mark.parametrize("we_parts", [2, 1])
def test_bf16_weights_meet_the_forward_budget_and_target_on_every_family(monkeypatch, we_parts):
    """FAST_BF16_WEIGHTS (docs/kernels-parallax.md §3, "bf16 weights"): a forward outside
    autograd whose fast tiles merge with bf16 weights is within the Parallax budget and issue
    22's target on every case family, and differs from the tf32x3 merge wherever a tile is fast;
    with the inference kernel's co-moment weights in two bf16 parts (the default) or one
    (kernels.INFER_WE_PARTS)."""
    from parallax_triton import kernels as K

    from lla_verify.registry.parallax import parse_parallax_case

    monkeypatch.setattr(K, "INFER_WE_PARTS", we_parts)
    used = 0
    for spec in BF16_WEIGHT_CASES:
        p = parse_parallax_case(spec).build(DEVICE)
        monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", False)
        base = parallax_attention(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", True)
        o = parallax_attention(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        verdict = check_parallax_forward(p.q, p.k, p.v, p.r, o, impl="parallax_triton[bf16 weights]", case=spec,
                                         qk_scale=p.qk_scale)
        assert verdict.passed, verdict.message
        o64 = parallax_forward(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale)
        allowed, _ = kernel_target(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale, o64=o64)
        err = (o.double() - o64).norm(dim=-1)
        assert bool((err <= allowed).all()), f"{spec}: target ratio {float((err / allowed).max()):.3g}"
        used += not torch.equal(o, base)
    # a lever that is never pulled passes the above: most of these cases have fast tiles
    assert used >= len(BF16_WEIGHT_CASES) // 2, f"bf16 weights changed {used} of {len(BF16_WEIGHT_CASES)} outputs"


def test_forward_outside_autograd_takes_each_row_by_its_own_prefix():
    """Outside autograd (bf16 weights), a row whose every entry is fast by its own bounds and
    the keys up to it (kernels._fast_rows) is computed by inference._px_fwd_infer_kernel,
    any other row by the split kernel: one large key at position 21 sends rows 21.. to the
    split kernel (bitwise apart from the inference kernel's rows there, and within budget and
    issue 22's target), while rows 0..20, some of them in the same query tile as row 21, are
    the inference kernel's bit for bit and the same as without the large key (causal)."""
    from parallax_triton.kernels import NORM_NAMES, fast_thresholds, infer_fast_rows, parallax_forward_kernel

    q, k, v, r = _inputs("gaussian", S=40, H=1, dtype=torch.bfloat16, seed=4)
    big = k.clone()
    big[..., 21, :] *= 1000.0
    flat = [t.reshape(1, 40, -1).contiguous() for t in (q, big, v, r)]
    scale = 16 ** -0.5
    out = parallax_forward_kernel(*flat, scale, bf16_weights=True)
    norms = out.norms[0]
    ta, td = fast_thresholds(torch.bfloat16, 16)
    col = NORM_NAMES.index
    fast = ((norms[:, col("qn")] * norms[:, col("kn")].cummax(0).values <= ta)
            & (norms[:, col("rn")] * norms[:, col("kdn")].cummax(0).values <= td))
    assert bool(fast[:21].all()) and not bool(fast[21:].any()), fast
    # the inference kernel writes those rows and no other
    written = torch.full_like(flat[2], float("nan"))
    infer_fast_rows(*flat, scale, out.norms, out.ta, out.td, written)
    assert torch.equal(~written[0].isnan().any(-1), fast)
    everything_fast = parallax_forward_kernel(*flat, scale, bf16_weights=True, fast=True).o[0]
    o = out.o[0]
    assert torch.equal(o[:21], everything_fast[:21])
    assert not torch.equal(o[21:], everything_fast[21:])
    plain = parallax_forward_kernel(*(t.reshape(1, 40, -1).contiguous() for t in (q, k, v, r)), scale,
                                    bf16_weights=True).o[0]
    assert torch.equal(o[:21], plain[:21])
    case = "gaussian bf16 S=40 D=16, key 21 x1000"
    verdict = check_parallax_forward(q, big, v, r, out.o.reshape(v.shape), impl="parallax_triton[bf16 weights]",
                                     case=case)
    assert verdict.passed, verdict.message
    o64 = parallax_forward(q, big, v, r)
    allowed, _ = kernel_target(q, big, v, r, o64=o64)
    err = (out.o.reshape(v.shape).double() - o64).norm(dim=-1)
    assert bool((err <= allowed).all()), f"{case}: target ratio {float((err / allowed).max()):.3g}"


def test_bf16_weights_stay_out_of_a_forward_a_backward_reads(monkeypatch):
    """The backward's dq and dr take the forward's row statistics at fp32 accuracy (with
    bf16 weights they missed the gradient budget by up to 1.6x on the subspace and clusters
    families): under autograd the forward and the gradients are the tf32x3 merge's, bit for bit."""
    from parallax_triton import kernels as K

    from lla_verify.registry.parallax import parse_parallax_case

    p = parse_parallax_case("subspace::B=1,H=1,S=33,D=16,dtype=bfloat16,seed=2;probe=random").build(DEVICE)
    do = torch.randn(p.v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(p.v)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", on)
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in (p.q, p.k, p.v, p.r))
        o = parallax_attention(*leaves, qk_scale=p.qk_scale)
        runs.append((o.detach(),) + torch.autograd.grad(o, leaves, do))
        with torch.no_grad():
            runs[-1] += (parallax_attention(p.q, p.k, p.v, p.r, qk_scale=p.qk_scale),)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dr"), runs[0], runs[1]):
        assert torch.equal(a, b), f"{name} changed under autograd with bf16 weights on"
    # outside autograd the lever is pulled on this case (its tiles are fast)
    assert not torch.equal(runs[0][-1], runs[1][-1])


def test_bf16_weights_argument(monkeypatch):
    """parallax_attention(bf16_weights=...) overrides the module default outside autograd, and
    asking for it where a backward will read the forward is an error naming the argument;
    the registry's parallax-triton-bf16w is the lever outside autograd and parallax-triton under it."""
    from parallax_triton import kernels as K

    from lla_verify.registry.parallax import get_parallax_impl, parse_parallax_case

    p = parse_parallax_case("gaussian::B=1,H=1,S=20,D=16,dtype=bfloat16,seed=0;probe=random").build(DEVICE)
    monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", False)
    plain = parallax_attention(p.q, p.k, p.v, p.r)
    on = parallax_attention(p.q, p.k, p.v, p.r, bf16_weights=True)
    assert not torch.equal(plain, on)
    monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", True)
    assert torch.equal(parallax_attention(p.q, p.k, p.v, p.r), on)
    assert torch.equal(parallax_attention(p.q, p.k, p.v, p.r, bf16_weights=False), plain)
    monkeypatch.setattr(K, "FAST_BF16_WEIGHTS", False)
    rec = get_parallax_impl("parallax-triton-bf16w")
    with torch.no_grad():
        assert torch.equal(rec.forward(p.q, p.k, p.v, p.r), on)
    leaves = [t.detach().clone().requires_grad_(True) for t in (p.q, p.k, p.v, p.r)]
    assert torch.equal(rec.forward(*leaves).detach(), plain)
    with pytest.raises(LLAInputError, match="bf16_weights: True needs a forward outside autograd"):
        parallax_attention(*leaves, bf16_weights=True)
    with pytest.raises(LLAInputError, match="bf16_weights: expected None, True or False, got 'yes'"):
        parallax_attention(p.q, p.k, p.v, p.r, bf16_weights="yes")
