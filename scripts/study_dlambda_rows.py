"""Where the error of dlambda on early rows comes from (the backward issue's open finding).

    PYTHONPATH=.:kernels [TRITON_INTERPRET=1] python scripts/study_dlambda_rows.py \
        [--case SPEC] [--rows 64] [--cg-tol 1e-7] [--device cpu|cuda] [--precision ieee|tf32x3]

Takes the first ``--rows`` rows of a case (causal: they see only each other, so the
rows are those of the full case) and builds dlambda_i = omega_i <u_i, rho_i>
(docs/math.md section 6) in float64 with exactly one ingredient perturbed at a time:

- one intermediate of forming b_i rounded to fp32 (scores, weights, the anchored keys
  k - c, f, den, <g, v>, <g, o>), the two solves exact;
- rho_i from a CG in fp32 arithmetic on an fp32 Sigma_i (what a solve on a formed
  Sigma_i attains), or rho_i from the Triton forward kernel itself (its first tile
  anchored at row 0, as on the GPU), b_i and u_i exact;

and judges each by the gradient budget (budget.check_backward, the other gradients
set to the reference), so every line reads as "this ingredient alone costs that much
of the budget". The first finding (docs/audit.md, second GPU audit) was: forming b_i
costs at most 0.28 at kappa 1e6 (one-pass and two-pass forms alike), the kernel's rho
0.56 (its true residual sits at the fp32 floor, ~1.4e-7, whatever cg_tol).
"""

from __future__ import annotations

import argparse
import math

import torch

DEFAULT_CASE = "spectrum:kappa=100000,rotate=0:B=1,H=1,S=1000,D=64,dtype=float32,seed=0"
ROUNDABLE = ("a", "w", "kp", "f", "den", "gv", "go")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default=DEFAULT_CASE)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cg-tol", type=float, default=1e-7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="the kernel's precision (ieee, tf32x3, tf32; default its own)")
    args = ap.parse_args(argv)

    import lla_triton
    from lla_triton.forward import lla_forward_kernel
    from lla_verify.budget.backward import check_backward, oracle_grads
    from lla_verify.registry.cases import Problem, parse_case
    from lla_verify.cg.reference import reference_cg, sigma_mu
    from lla_verify.registry.impls import get_impl
    from lla_verify.oracles.float64 import lla_forward_details

    full = parse_case(args.case).build()
    R = args.rows
    lam_full = full.lam_tensor
    prob = Problem(full.case, *(t[..., :R, :].contiguous() for t in (full.q, full.k, full.v)),
                   lam_full[..., :R].contiguous(), full.qk_scale)
    q, k, v = (t.reshape(R, -1).double() for t in (prob.q, prob.k, prob.v))
    lam = prob.lam_tensor.reshape(R).double()
    D, scale = q.shape[-1], prob.qk_scale
    # the audit's cotangent, cut to the first R rows: dlambda_i depends on g_i and rows <= i only
    from lla_verify.budget.backward import cotangent_for
    g = cotangent_for(full)[..., :R, :].reshape(R, D).to(prob.q.dtype).double()
    cot = g.reshape(1, 1, R, D)
    ref = oracle_grads(prob, cot)
    det = lla_forward_details(q[None], k[None], v[None], ridge_lambda=lam[None], qk_scale=scale)
    rho64, mu, kappa = det.rho[0], det.mu[0], det.kappa[0]

    causal = torch.tril(torch.ones(R, R, dtype=torch.bool))
    # the oracle's Sigma_i and omega_i, with the row max as the weights' shift (as b_of's)
    sigma, _, omega = (t[0] for t in sigma_mu(q[None], k[None], lam[None], scale))

    def b_of(rho, rounded=()):
        """b_i as kernel A forms it (anchor c = q_0, values anchored at v_0), float64 but
        for the intermediates named in ``rounded``, which are rounded to fp32."""
        r = (lambda name, t: t.float().double() if name in rounded else t)  # noqa: E731
        c, vref = q[0], v[0]
        a = r("a", (q @ k.T) * scale).masked_fill(~causal, -math.inf)
        w = r("w", torch.exp(a - a.max(1).values[:, None]))
        kp, qp, vp = r("kp", k - c), r("kp", q - c), v - vref
        f = r("f", (1 + (qp * rho).sum(1)[:, None]) - rho @ kp.T)
        den = r("den", (w * f).sum(1))
        gv = r("gv", g @ vp.T)
        go = r("go", (g * (((w * f) @ vp) / den[:, None])).sum(1))
        wc = w * (gv - go[:, None]) / den[:, None]
        return wc @ kp - wc.sum(1)[:, None] * qp

    def dlam(rho, b):
        u = torch.linalg.solve(sigma, b[..., None])[..., 0]
        return omega * (u * rho).sum(1)

    impl = get_impl("triton")

    def judge(label, dl):
        grads = {n: ref[n].clone() for n in ref}
        grads["dlambda"] = dl.reshape(1, 1, R)
        r = check_backward(prob, impl, cot=cot, grads=grads).per_query["dlambda"].flatten()
        i = int(r.argmax())
        print(f"{label:40s} dlambda error / budget: max {float(r.max()):.3g} at row {i} (kappa {float(kappa[i]):.2e}); "
              f"rows 1-8 {[round(float(x), 2) for x in r[1:9]]}")

    print(f"{args.case}, first {R} rows; ratio = this ingredient's dlambda error / the gradient budget")
    for name in ROUNDABLE:
        judge(f"b with {name} rounded to fp32", dlam(rho64, b_of(rho64, (name,))))
    judge("b with all of them rounded", dlam(rho64, b_of(rho64, ROUNDABLE)))
    rho_cg32 = reference_cg(sigma, mu, tol=args.cg_tol, max_iters=16 * D, dtype=torch.float32,
                            history=False).rho.double()
    judge("rho from fp32 CG on an fp32 Sigma", dlam(rho_cg32, b_of(rho_cg32)))

    dev = args.device
    q3, k3, v3 = (t.to(dev).reshape(1, R, D).contiguous() for t in (prob.q, prob.k, prob.v))
    lam3 = prob.lam_tensor.to(dev).float().reshape(1, R).contiguous()
    block = 64 if dev == "cpu" else None  # the GPU's first tile: rows 0-63 anchored at row 0
    fo = lla_forward_kernel(q3, k3, v3, lam3, scale, delta_eps=lla_triton.DEFAULT_DELTA_EPS, cg_tol=args.cg_tol,
                            cg_max_iters=16 * D, preconditioner=None, want_stats=True, precision=args.precision,
                            config=(block, 16, 1, 1) if block else None)
    rk = fo.rho[0].double().cpu()
    rel = ((rk - rho64).norm(dim=-1) / rho64.norm(dim=-1)).tolist()
    print(f"kernel rho: relative error rows 1-8 {[f'{x:.1e}' for x in rel[1:9]]}; "
          f"CG iterations {fo.cg_iters[0, 1:9].tolist()}; final residual "
          f"{[f'{float(x):.1e}' for x in fo.cg_residual[0, 1:9]]}")
    judge("rho from the Triton forward kernel", dlam(rk, b_of(rk)))

    # the backward kernel itself (kernel A's b, adjoint CG and dlambda), first on the
    # exact rho rounded to fp32, then on the forward kernel's rho: what the audit ran
    from lla_triton.backward import lla_backward_kernel
    g3 = g.to(prob.q.dtype).to(dev).reshape(1, R, D).contiguous()
    for label, rho_in in (("exact rho", rho64.float().to(dev)[None]), ("kernel rho", fo.rho)):
        bo = lla_backward_kernel(q3, k3, v3, rho_in.contiguous(), lam3, g3, scale, fallback=fo.fallback,
                                 cg_tol=args.cg_tol, cg_max_iters=16 * D, precision=args.precision,
                                 config_a=(block, 16, 1, 1) if block else None,
                                 config_b=(16, 16, 1, 1) if block else None)
        judge(f"backward kernel, {label}", bo.dlam[0].double().cpu())
        print(f"  adjoint CG iterations rows 1-8 {bo.cg_iters[0, 1:9].tolist()}; recursive residual "
              f"{[f'{float(x):.1e}' for x in bo.cg_residual[0, 1:9]]}")


if __name__ == "__main__":
    main()
