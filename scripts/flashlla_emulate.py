"""The public FlashLLA forward's arithmetic, re-derived in torch from its formulas: which of
its errors its roundings alone explain.

The public kernel (flashlla/ops/forward.py and cg.py) forms, per query row: fp32 scores
from bf16 q, k; W = exp(s - m) in fp32; omega = sum W; M = bf16(W) K; mu = M - omega q;
rho by unpreconditioned CG from 0 on Sigma p = bf16(W * bf16(p) K^T) K - (p.q) M
- (p.M) q + omega (p.q) q + lambda omega p (the uncentred expansion); den = omega - mu.rho;
and o = bf16(W (1 - bf16(rho) k_j + rho.q) / den) V. This file writes those steps with
torch matmuls (bf16-valued operands, fp32 sums), so on a CPU one sees what those roundings
do, and on a GPU (``--compare-public``) how close the real kernel is to them.

    python scripts/flashlla_emulate.py --shape 8,2048,128 --device cuda --compare-public
    python scripts/flashlla_emulate.py --shape 2,256,64           # CPU: emulation vs oracle
    python scripts/flashlla_emulate.py --pins                     # CPU: the verdict on each pinned case

It prints the relative error against lla-verify's float64 oracle over all tokens and
over the tokens from t on (t = 8, 16, 64), and with ``--compare-public`` the same for the
public kernel (``flashlla.lla_attention`` at its defaults, and with cg_max_iters = 128).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lla_verify.oracles.float64 import lla_forward  # noqa: E402


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def emulate_forward(q, k, v, ridge_lambda, *, qk_scale: float | None = None, cg_iters: int = 32,
                    roundings: bool = True, delta_eps: float = 1e-12) -> torch.Tensor:
    """One head: q, k, v of shape (S, D) holding bf16 values, ridge_lambda a float or one
    value a query (S,); returns o in fp32 (the kernel stores it in bf16). ``qk_scale``:
    None is 1 / sqrt(D). ``roundings=False`` keeps every operand in fp32: the same
    algorithm without the kernel's bf16 steps."""
    if q.dim() != 2 or k.shape != q.shape or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k, v: expected (S, D), (S, D), (S, Dv), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    q, k, v = (t.float() for t in (q, k, v))
    r = _bf16 if roundings else (lambda t: t)
    S, D = q.shape
    s = (q @ k.T) * (D ** -0.5 if qk_scale is None else float(qk_scale))
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    W = torch.exp(s - s.max(dim=1, keepdim=True).values)
    omega = W.sum(1, keepdim=True)
    M = r(W) @ k
    mu = M - omega * q
    lam = torch.as_tensor(ridge_lambda, dtype=torch.float32, device=q.device)
    if lam.dim() not in (0, 1) or (lam.dim() == 1 and lam.shape[0] != S):
        raise ValueError(f"ridge_lambda: expected a float or a tensor of shape ({S},), got shape {tuple(lam.shape)}")
    lam_omega = (lam if lam.dim() == 0 else lam[:, None]) * omega
    # CG from rho = 0, as _cg_kernel runs it: a row stops when |res|^2 <= max(atol, |res_0|^2) rtol
    # (atol = rtol = 1e-12) or turns non-finite; denominators get + 1e-10
    rho = torch.zeros_like(q)
    res, p = mu.clone(), mu.clone()
    norm0 = (res * res).sum(1, keepdim=True)
    active = norm0 != 0
    for _ in range(cg_iters):
        sp = r(W * (r(p) @ k.T)) @ k
        pq, pm = (p * q).sum(1, keepdim=True), (p * M).sum(1, keepdim=True)
        sp = sp - pq * M - pm * q + omega * pq * q + p * lam_omega
        norm = (res * res).sum(1, keepdim=True)
        alpha = torch.where(active, norm / ((p * sp).sum(1, keepdim=True) + 1e-10), torch.zeros_like(norm))
        rho = rho + alpha * p
        res = res - alpha * sp
        norm_new = (res * res).sum(1, keepdim=True)
        done = (norm_new <= torch.clamp(norm0, min=1e-12) * 1e-12) | ~torch.isfinite(norm_new)
        active = active & ~done
        p = res + torch.where(active, norm_new / norm, torch.zeros_like(norm)) * p
    den = omega - (mu * rho).sum(1, keepdim=True)
    den = den + delta_eps * torch.where(den >= 0, 1.0, -1.0)
    weight = W * (1.0 - r(rho) @ k.T + (rho * q).sum(1, keepdim=True)) / den
    return r(weight) @ v


def emulated_lla(q, k, v, *, ridge_lambda, qk_scale=None) -> torch.Tensor:
    """The emulation behind lla-verify's protocol, fn(q, k, v, *, ridge_lambda, qk_scale) -> o
    on (B, H, S, D), with the public adapter's roundings: q, k, v to bf16, lambda in q's
    dtype as passed (lla_attention's coercion), o to bf16 and back to q's dtype."""
    B, H, S, _ = q.shape
    lam = ridge_lambda if isinstance(ridge_lambda, torch.Tensor) else torch.tensor(float(ridge_lambda))
    lam = lam.to(q.dtype).float().expand(B, H, S)
    heads = [emulate_forward(q[b, h].to(torch.bfloat16), k[b, h].to(torch.bfloat16), v[b, h].to(torch.bfloat16),
                             lam[b, h], qk_scale=qk_scale) for b in range(B) for h in range(H)]
    return torch.stack(heads).reshape(B, H, S, -1).to(torch.bfloat16).to(q.dtype)


def emulated_record():
    """The public kernel's registry record with the emulation as its forward, on any device."""
    from dataclasses import replace

    from lla_verify.registry.impls import get_impl

    return replace(get_impl("flashlla"), name="flashlla-emulated", forward=emulated_lla, devices=("cpu", "cuda"))


# lla-verify's --lla-impl takes the emulation with its record: --lla-impl flashlla_emulate:emulated_lla
# (scripts/ on PYTHONPATH) runs the property suite against the public arithmetic on the CPU
emulated_lla.lla_impl_record = emulated_record()


def pins_report() -> int:
    """The emulation through lla-verify's forward verdict on every pinned LLA case of
    properties/regressions.json that the public kernel accepts (its record: bf16 inputs,
    fp32 / bf16 dtypes, D in 16..128), each ratio to compare with the public kernel's on
    the GPU (docs/findings/flashlla.md #8)."""
    from lla_verify.budget.forward import check_forward
    from lla_verify.testing.regressions import pinned
    from lla_verify.testing.suite import unsupported

    impl = emulated_record()
    for case in pinned("lla"):
        p = case.build("cpu")
        why = unsupported(impl, p)
        if why:
            print(f"{'skipped':>10s}  {case.spec()}: {why.split(':')[0]}", flush=True)
            continue
        verdict = check_forward(p, impl, impl.forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale))
        print(f"{verdict.ratio:10.3g}  {case.spec()}", flush=True)
    return 0


def _report(name: str, o: torch.Tensor, ref: torch.Tensor, starts=(0, 8, 16, 64)) -> dict:
    out = {}
    for t in starts:
        if t < ref.shape[-2]:
            out[t] = float((o.double()[..., t:, :] - ref[..., t:, :]).norm() / ref[..., t:, :].norm())
    print(f"{name:36s} " + "  ".join(f"tokens>={t}: {e:.3e}" for t, e in out.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2,256,64", help="B,S,D (heads folded into B)")
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare-public", action="store_true", help="also run flashlla.lla_attention (CUDA)")
    ap.add_argument("--pins", action="store_true",
                    help="instead: the emulation's forward verdict (error / budget) on each pinned LLA case (CPU)")
    args = ap.parse_args(argv)
    if args.pins:
        return pins_report()
    try:
        B, S, D = (int(x) for x in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape: expected B,S,D, got {args.shape!r}")
    if min(B, S, D) < 1:
        ap.error(f"--shape: B, S, D must be positive, got {args.shape!r}")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.compare_public:
        if args.device != "cuda":
            ap.error("--compare-public: the public kernel runs on CUDA only (add --device cuda)")
        try:
            import flashlla  # noqa: F401
        except ImportError as exc:
            ap.error(f"--compare-public: flashlla does not import ({exc}); put its repository on PYTHONPATH")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    q, k, v = (torch.randn(B, S, D, device=args.device, generator=gen).to(torch.bfloat16) for _ in range(3))
    lam = args.ridge_lambda
    ref = lla_forward(q.double(), k.double(), v.double(), ridge_lambda=lam)
    print(f"B={B} S={S} D={D} lambda={lam} bf16 inputs, relative error against the float64 oracle:")
    for rnd in (True, False):
        emu = torch.stack([emulate_forward(q[b], k[b], v[b], lam, roundings=rnd) for b in range(B)])
        _report(f"emulation, {'bf16 steps' if rnd else 'all fp32'}", emu.to(torch.bfloat16) if rnd else emu, ref)
    if args.compare_public:
        import flashlla

        _report("public, defaults", flashlla.lla_attention(q, k, v, ridge_lambda=lam), ref)
        _report("public, cg_max_iters=128", flashlla.lla_attention(q, k, v, ridge_lambda=lam, cg_max_iters=128), ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
