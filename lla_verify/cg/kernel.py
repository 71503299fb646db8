"""The kernel's side of the CG study: its iterations and reported residuals, and
``cg_records``, every per-query number of one problem (reference, bound and kernel,
plain and Jacobi) when given an implementation with stats.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch

from lla_verify.registry.cases import Problem
from lla_contract import LLAInputError
from lla_verify.cg.bound import finite_precision_limit, iteration_bound, jacobi_iteration_bound
from lla_verify.cg.reference import check_preconditioner, kappas, reference_cg, sigma_mu, true_residual

_F64 = torch.float64


# ------------------------------------------------------------------ the kernel side
@dataclass
class KernelRun:
    """One kernel call with CG statistics; tensors (B, H, S[, D]) on the problem's device."""

    o: torch.Tensor
    iters: torch.Tensor
    residual: torch.Tensor  # as the kernel reports it
    rho: torch.Tensor | None  # the kernel's own rho when exposed
    note: str | None = None  # why rho is absent


def run_kernel(impl, problem: Problem, *, tol: float, max_iters: int, preconditioner=None) -> KernelRun:
    """Run the implementation once with the given CG settings, statistics on.

    For the Triton kernel this goes through lla_triton.forward.lla_forward_kernel (the
    entry lla_attention itself uses without autograd), which also returns rho, so one
    launch gives o, the iteration count, the reported residual and rho. Other
    implementations go through ``impl.forward_with_stats`` and have no rho.
    """
    check_preconditioner(preconditioner)
    B, H, S, D = problem.q.shape
    if impl.name == "triton":
        try:
            from lla_triton import forward as fwd  # type: ignore
            fn = fwd.lla_forward_kernel
        except (ImportError, AttributeError) as exc:
            fn, why = None, f"lla_triton.forward.lla_forward_kernel is not exposed ({exc})"
        if fn is not None:
            fold = lambda t: t.reshape(B * H, S, t.shape[-1]).contiguous()  # noqa: E731
            lam = problem.lam_tensor.to(torch.float32).reshape(B * H, S).contiguous().to(problem.q.device)
            with torch.no_grad():
                out = fn(fold(problem.q), fold(problem.k), fold(problem.v), lam, problem.qk_scale,
                         delta_eps=_kernel_delta_eps(), cg_tol=tol, cg_max_iters=int(max_iters),
                         preconditioner=preconditioner, want_stats=True)
            return KernelRun(o=out.o.reshape(B, H, S, -1), iters=out.cg_iters.reshape(B, H, S),
                             residual=out.cg_residual.reshape(B, H, S), rho=out.rho.reshape(B, H, S, D))
    else:
        why = f"{impl.name} exposes no rho"
    if impl.forward_with_stats is None:
        raise LLAInputError(f"{impl.name}: has no forward_with_stats (no CG statistics to compare)")
    # an implementation the harness does not own runs across the trust boundary, as in
    # check and audit: its outputs are the harness's copies, its breaches are Misbehaved
    from lla_verify.trust import Misbehaved, call_forward

    bound = dataclasses.replace(impl, forward_with_stats=functools.partial(
        impl.forward_with_stats, cg_tol=tol, cg_max_iters=int(max_iters), preconditioner=preconditioner))
    o, st = call_forward(bound, problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                         qk_scale=problem.qk_scale, stats=True)
    missing = [key for key in ("cg_iters", "cg_residual") if key not in (st or {})]
    if missing:
        raise Misbehaved(f"forward_with_stats returned no per-query {' or '.join(missing)} of shape {(B, H, S)}")
    return KernelRun(o=o, iters=st["cg_iters"], residual=st["cg_residual"], rho=None, note=why)


def _kernel_delta_eps() -> float:
    # lla_attention's default guard, so the internal entry computes what users get
    try:
        import lla_triton  # type: ignore

        return float(getattr(lla_triton, "DEFAULT_DELTA_EPS", 0.0))
    except ImportError:
        return 0.0


def kernel_defaults(D: int = 64) -> tuple[float, int, str | None]:
    """(DEFAULT_CG_TOL, the default iteration cap at head dim D, None) from lla_triton, or
    fallbacks and the reason."""
    try:
        import lla_triton  # type: ignore
    except ImportError as exc:
        return 1e-6, 64, f"lla_triton does not import: {exc}"
    tol = float(getattr(lla_triton, "DEFAULT_CG_TOL", 1e-6))
    cap = getattr(lla_triton, "default_cg_max_iters", None)
    iters = int(cap(D)) if cap is not None else 64
    return tol, iters, None


def triton_unavailable(device: str = "cpu") -> str | None:
    """None when lla_triton.lla_attention can run on ``device`` here, else why not."""
    from lla_verify.registry.impls import get_impl, is_available

    reason = is_available(get_impl("triton"), device)
    if reason is None:
        return None
    # one prefix for every cause, so a skip is recognisable in any report
    return f"lla_triton.lla_attention not available ({reason})"


# ------------------------------------------------------------------ per-query records
@dataclass
class CGRecords:
    """Per-query arrays (flattened over B, H, S; float64 or int64 on the CPU) for one problem."""

    case: str
    tol: float
    max_iters: int
    ref_max_iters: int
    D: int
    columns: dict = field(default_factory=dict)  # name -> 1-D tensor, one entry per query
    kernel_skipped: str | None = None  # why some kernel columns are absent

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).numel()) if self.columns else 0

    def rows(self) -> list[dict]:
        names = list(self.columns)
        cols = [self.columns[n].tolist() for n in names]
        return [dict(zip(names, vals)) for vals in zip(*cols)]


def cg_records(problem: Problem, *, tol: float, max_iters: int, ref_max_iters: int | None = None,
               impl=None, device=None, with_fp32_reference: bool = True) -> CGRecords:
    """Everything issue 6 tracks, per query, for one problem.

    Columns: query (flat index), kappa, kappa_jacobi, bound and bound_jacobi
    (iteration bounds at tol), limit and limit_jacobi (finite_precision_limit), ref64_{plain,jacobi}_{iters,res,conv}: float64
    reference CG (run up to ref_max_iters, default max(max_iters, 10 D), so the
    float64 count is seen even where the kernel is capped); ref32_* the same CG in
    float32 on the rounded Sigma_i (finite precision alone) when asked; and with an
    implementation: kernel_{plain,jacobi}_{iters,res,res64,err_o} (reported count and
    residual, the float64 recomputation of the residual when the kernel's rho is
    exposed, the relative error of o against the float64 oracle) and
    kernel_{plain,jacobi}_err_rho.
    """
    from lla_verify.oracles.float64 import lla_forward

    dev = device or problem.q.device
    B, H, S, D = problem.q.shape
    ref_max = int(ref_max_iters if ref_max_iters is not None else max(max_iters, 10 * D))
    sig, mu, _ = sigma_mu(problem.q.to(dev), problem.k.to(dev), problem.lam_tensor.to(dev), problem.qk_scale)
    kap, kapj = kappas(sig)
    cols = {
        "query": torch.arange(B * H * S),
        "kappa": kap.reshape(-1).cpu(),
        "kappa_jacobi": kapj.reshape(-1).cpu(),
    }
    kfin = torch.where(torch.isfinite(kap), kap, torch.full_like(kap, math.inf))
    cols["bound"] = torch.where(torch.isfinite(kfin), iteration_bound(torch.where(torch.isfinite(kfin), kfin,
                                torch.ones_like(kfin)), tol), torch.full_like(kfin, math.inf)).reshape(-1).cpu()
    cols["bound_jacobi"] = torch.where(torch.isfinite(kfin) & torch.isfinite(kapj), jacobi_iteration_bound(
        torch.where(torch.isfinite(kfin), kfin, torch.ones_like(kfin)),
        torch.where(torch.isfinite(kapj), kapj, torch.ones_like(kapj)).clamp_min(1.0), tol),
        torch.full_like(kfin, math.inf)).reshape(-1).cpu()
    cols["limit"] = finite_precision_limit(kap.cpu(), tol, D, max_iters).reshape(-1)
    cols["limit_jacobi"] = finite_precision_limit(kap.cpu(), tol, D, max_iters, kappa_rate=kapj.cpu()).reshape(-1)
    exact = torch.linalg.solve_ex(sig, mu[..., None])[0][..., 0]
    for dt, tag in ((_F64, "ref64"), (torch.float32, "ref32")):
        if tag == "ref32" and not with_fp32_reference:
            continue
        for prec in (None, "jacobi"):
            name = f"{tag}_{prec or 'plain'}"
            run = reference_cg(sig, mu, tol=tol, max_iters=ref_max if dt == _F64 else max_iters,
                               preconditioner=prec, dtype=dt, history=False)
            cols[f"{name}_iters"] = run.iters.reshape(-1).cpu()
            cols[f"{name}_res"] = run.residual.reshape(-1).cpu()
            cols[f"{name}_conv"] = run.converged.reshape(-1).cpu()
            cols[f"{name}_err_rho"] = _rel_err(run.rho.to(_F64), exact).reshape(-1).cpu()
    skipped = None
    if impl is not None:
        o_ref = lla_forward(problem.q, problem.k, problem.v, ridge_lambda=problem.ridge_lambda,
                            qk_scale=problem.qk_scale).cpu()
        for prec in (None, "jacobi"):
            name = f"kernel_{prec or 'plain'}"
            kr = run_kernel(impl, problem, tol=tol, max_iters=max_iters, preconditioner=prec)
            cols[f"{name}_iters"] = kr.iters.reshape(-1).to(torch.int64).cpu()
            cols[f"{name}_res"] = kr.residual.reshape(-1).to(_F64).cpu()
            cols[f"{name}_err_o"] = _rel_err(kr.o.to(_F64).cpu(), o_ref).reshape(-1)
            if kr.rho is None:
                skipped = f"kernel rho not compared: {kr.note}"
            else:
                cols[f"{name}_res64"] = true_residual(sig, mu, kr.rho.to(dev)).reshape(-1).cpu()
                cols[f"{name}_err_rho"] = _rel_err(kr.rho.to(_F64).to(dev), exact).reshape(-1).cpu()
    return CGRecords(case=problem.describe(), tol=float(tol), max_iters=int(max_iters), ref_max_iters=ref_max,
                     D=D, columns=cols, kernel_skipped=skipped)


def _rel_err(x, ref):
    num = (x.to(_F64) - ref.to(_F64)).norm(dim=-1)
    den = ref.to(_F64).norm(dim=-1)
    return num / torch.where(den > 0, den, torch.ones_like(den))
