"""``lla-verify bench-parallax``: the Parallax kernel's forward and forward + backward
against torch SDPA (causal) timed in the same run, with accuracy and peak memory.

    lla-verify bench-parallax [--shapes B,H,S,D;...] [--mem-seqs S,...] [--out FILE] [--smoke]

For each (B, H, S, D), bf16, causal: the median time (triton.testing.do_bench) of the
forward of ``--impl`` (default parallax_triton.parallax_attention) and of one forward +
backward step, each over causal SDPA's (flash backend) of the same shape, against the
targets of issue 22 (forward <= 2x SDPA, forward + backward <= 2.5x SDPA's), reported met
or not met (a target is a measurement, not a check: it never sets the exit status).

Accuracy, so that a fast wrong kernel cannot look good: the first ``--oracle-heads``
heads of the timed inputs are a registry case (gaussian q, k, v, the 'random' probe
family at amp 1), and the output of the last timed forward call on them is judged by the
audit's Parallax verdict (budget.parallax.check_parallax_forward: the float64 oracle and
its derived budget); the gradients of the last timed step likewise
(check_parallax_backward) up to S = ``--grad-check-max-s``, past which the float64
autograd's saved tensors (about S^2 D doubles per head) outgrow the card. A verdict over
budget exits 1; so does a forward time below the hardware's floor, or an event-timed
median far below the synchronised one (lla_verify/trust.py, as ``lla-verify bench``).

Peak memory at each S of ``--mem-seqs`` (B = H = 1, D = ``--mem-dim``):
torch.cuda.max_memory_allocated during one call minus what was allocated before it (the
inputs, and for the step the cotangent), for the forward and the step, beside SDPA's,
with the figure per S D element: flat in S is Theta(S D).
"""

from __future__ import annotations

import argparse

from lla_verify.cliutil import UsageError, check_out_file, int_in
from lla_verify.commands.benchkit import (BENCH_SHAPES, SMOKE_NOTE, Table, Timer, add_run_args, bench_device,
                                          causal_sdpa, header_lines, int_list, parse_shapes, progress, randn_inputs,
                                          refused_output, shapes_text)

DEFAULT_SHAPES = shapes_text(BENCH_SHAPES + ((1, 1, 16384, 64),))
SMOKE_SHAPES = "1,2,32,16"
SMOKE_MEM_SEQS = "32"
FWD_TARGET = 2.0  # issue 22: forward at most 2x the SDPA forward
STEP_TARGET = 2.5  # forward + backward at most 2.5x SDPA's
DEFAULT_IMPL = "parallax_triton:parallax_attention"
PROBE_AMP = 1.0  # the 'random' probe family's amplitude: <k_j - kbar, r> of RMS about 1


def register(sub) -> None:
    p = sub.add_parser("bench-parallax", help="time the Parallax kernel's forward and fwd+bwd against torch SDPA, "
                       "with its error and peak memory", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"B,H,S,D;B,H,S,D;... (default {DEFAULT_SHAPES}; "
                   f"--smoke: {SMOKE_SHAPES})")
    p.add_argument("--mem-seqs", default=None,
                   help="S values of the peak-memory rows ('' to skip; default 2048,8192,32768, --smoke: 32)")
    p.add_argument("--mem-dim", type=int_in(16, 128), default=None, help="D of the memory rows (default 64; "
                   "--smoke: 16)")
    p.add_argument("--impl", default=DEFAULT_IMPL,
                   help="the Parallax forward timed and judged, MODULE:CALLABLE with fn(q, k, v, r, *, qk_scale) -> o")
    p.add_argument("--oracle-heads", type=int_in(1), default=1, help="heads judged against the float64 oracle")
    p.add_argument("--grad-check-max-s", type=int_in(1), default=4096,
                   help="largest S whose gradients are judged (float64 autograd memory grows as S^2 D)")
    add_run_args(p, sync_reps=10, sync_help="the check on do_bench's events",
                 smoke_what="one tiny shape")
    p.set_defaults(func=run)


def _resolve(args) -> None:
    """Defaults that depend on --smoke, then every argument checked (a usage error, exit 2)."""
    if args.shapes is None:
        args.shapes = SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES
    if args.mem_seqs is None:
        args.mem_seqs = SMOKE_MEM_SEQS if args.smoke else "2048,8192,32768"
    if args.mem_dim is None:
        args.mem_dim = 16 if args.smoke else 64
    for B, H, S, D in parse_shapes(args.shapes):
        if D not in (16, 32, 64, 128):
            raise UsageError(f"--shapes: D must be one of 16, 32, 64, 128 (the kernel's head dims), got {D}")
    if args.mem_seqs:
        int_list(args.mem_seqs, "--mem-seqs")
    if args.mem_dim not in (16, 32, 64, 128):
        raise UsageError(f"--mem-dim: expected one of 16, 32, 64, 128, got {args.mem_dim}")
    if args.out is not None:
        check_out_file(args.out)


def load_impl(spec: str, flag: str):
    """The callable of a MODULE:CALLABLE option, or a UsageError naming ``flag``."""
    from lla_contract import LLAInputError
    from lla_verify.registry.impls import load_callable

    try:
        return load_callable(spec, flag, [], "mypkg.mymod:my_kernel")
    except LLAInputError as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    _resolve(args)
    dev = bench_device(args.smoke)
    impl = load_impl(args.impl, "--impl")
    import functools

    import torch

    import parallax_triton

    if impl is parallax_triton.parallax_attention:
        # SDPA checks nothing: the built-in kernel is timed without its finiteness check
        # (a device-to-host read per call), as lla-verify bench times lla_triton
        impl = functools.partial(impl, check_finite=False)

    torch.manual_seed(0)
    table = Table()
    for line in header_lines("bench-parallax", args, smoke=args.smoke):
        table.emit(line)
    timer = Timer(dev, warmup=args.warmup, rep=args.rep, sync_reps=args.sync_reps)
    table.emit(f"bf16, causal; impl {args.impl} (the built-in with check_finite=False); SDPA with the flash backend; "
               f"accuracy on the first "
               f"{args.oracle_heads} head(s) of the timed inputs, the output of the last synchronised call")
    table.emit()
    table.emit("| B,H,S,D | fwd ms | fwd ms, synced | SDPA fwd ms | fwd / SDPA | fwd <= 2x SDPA | fwd err / budget "
               "| fwd+bwd ms | SDPA fwd+bwd ms | fwd+bwd / SDPA | fwd+bwd <= 2.5x SDPA | grads err / budget |")
    table.emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = parse_shapes(args.shapes)
    seqs = int_list(args.mem_seqs, "--mem-seqs") if args.mem_seqs else []
    failures, flags = [], []
    with progress(len(shapes) + len(seqs), disable=args.no_progress, desc="bench-parallax") as bar:
        for shape in shapes:
            row, fails, why = _shape_row(shape, impl, args, timer, dev)
            table.emit(row)
            table.write(args.out)  # what is done so far survives a run cut short
            failures += fails
            flags += why
            bar.update()
            if dev == "cuda":
                torch.cuda.empty_cache()
        table.emit()
        table.emit("timing: 'ms' is the median of do_bench (CUDA events, L2 flushed between calls); 'synced' the "
                   f"median of {args.sync_reps} calls between device-wide synchronisations (launch overhead "
                   "included). The targets are issue 22's; 'not met' is a measurement, not a failure.")
        table.emit("err / budget: the audit's Parallax verdicts (budget.parallax) on the registry case in the first "
                   "heads; above 1 is a FAIL (exit 1)")
        if args.smoke:
            table.emit(SMOKE_NOTE)
        for v in failures:
            table.emit(v.message)
        for f in flags:
            table.emit(f"TIMING NOT BELIEVED: {f}")
        if seqs:
            _memory_rows(table, seqs, args.mem_dim, impl, dev, bar, args.out)
    table.write(args.out)
    return 1 if (failures or flags) else 0


def _judged_case(nh: int, S: int, D: int, device: str):
    """The registry case judged in the first ``nh`` heads: gaussian q, k, v, lambda 0.1 (it
    only feeds the exact-LLA probe family, unused here) and the 'random' probe at amp 1."""
    from lla_verify.registry.cases import Case
    from lla_verify.registry.parallax import ParallaxCase

    case = Case("gaussian", {"lam": 0.1}, B=1, H=int(nh), S=int(S), D=int(D), dtype="bfloat16")
    return ParallaxCase(case, "random", {"amp": PROBE_AMP}).build(device)


def _probe(shape, dtype, generator, device):
    """A Gaussian probe of the 'random' family's size for unit keys: N(0, amp^2 / D)."""
    import torch

    D = shape[-1]
    return (torch.randn(*shape, device=device, dtype=torch.float32, generator=generator) * (PROBE_AMP / D ** 0.5)
            ).to(dtype)


def _cell(verdict) -> str:
    return f"{verdict.ratio:.3f}" + ("" if verdict.passed else f" FAIL ({verdict.cause})")


def _shape_row(shape, impl, args, timer: Timer, dev: str):
    """(the table row of one shape, the failed verdicts, the timing flags)."""
    import torch

    from lla_verify.budget.parallax import check_parallax_backward, check_parallax_forward
    from lla_verify.trust import device_peaks, implausible_speed, roofline_floor_s, timing_disagrees

    B, H, S, D = shape
    bf16 = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = randn_inputs((B, H, S, D), 3, bf16, generator=g, device=dev)
    r = _probe((B, H, S, D), bf16, g, dev)
    do = randn_inputs((B, H, S, D), 1, bf16, generator=g, device=dev)[0]
    nh = max(1, min(B * H, args.oracle_heads))
    prob = _judged_case(nh, S, D, dev)
    scale = prob.qk_scale
    if abs(scale - D ** -0.5) > 1e-12 * scale:
        raise RuntimeError(f"bench-parallax: the judged case's scale {scale} is not 1/sqrt(D) = {D ** -0.5}")
    # the judged heads ride in the timed inputs: the output of a timed call is what is judged
    for dst, src in ((q, prob.q), (k, prob.k), (v, prob.v), (r, prob.r)):
        dst.view(B * H, S, D)[:nh].copy_(src.reshape(nh, S, D))
    first = lambda t: t.reshape(B * H, S, D)[:nh].reshape(1, nh, S, D)  # noqa: E731
    label = f"bench-parallax:{prob.describe()}"
    failures, flags = [], []

    def fwd():
        with torch.no_grad():
            return impl(q, k, v, r, qk_scale=scale)

    t_sdpa = timer.ms(lambda: causal_sdpa(q, k, v))
    t_fwd = timer.ms(fwd)
    t_fwd_sync, o = timer.synced(fwd)
    # an output the trust boundary refuses is a failed verdict, never judged
    vf = refused_output(o, v.shape, q, who=args.impl) or check_parallax_forward(
        prob.q, prob.k, prob.v, prob.r, first(o), impl=args.impl, case=label, qk_scale=scale)
    if not vf.passed:
        failures.append(vf)
    del o
    if dev == "cuda":
        # the causal scores and values products, and one pass over q, k, v, r and o
        peaks = device_peaks(torch.cuda.get_device_name())
        floor = roofline_floor_s(flops=2.0 * B * H * S * (S + 1) * D,
                                 bytes_moved=5.0 * B * H * S * D * q.element_size(),
                                 peak_flops=peaks[0], peak_bytes_s=peaks[1])
        for why in (implausible_speed(min(t_fwd, t_fwd_sync) / 1e3, floor),
                    timing_disagrees(t_fwd / 1e3, t_fwd_sync / 1e3)):
            if why:
                flags.append(f"{B},{H},{S},{D} forward: {why}")

    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]

    def step():
        impl(*leaves, qk_scale=scale).backward(do)

    def judged_step():
        for t in leaves:
            t.grad = None
        step()
        return tuple(t.grad for t in leaves)

    t_step = timer.ms(step, grads=leaves)
    sdpa_leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def sdpa_step():
        causal_sdpa(*sdpa_leaves).backward(do)

    t_sdpa_step = timer.ms(sdpa_step, grads=sdpa_leaves)
    if S <= args.grad_check_max_s:
        _, grads = timer.synced(judged_step)
        vb = check_parallax_backward(prob.q, prob.k, prob.v, prob.r, first(do), tuple(first(x) for x in grads),
                                     impl=args.impl, case=label, qk_scale=scale)
        if not vb.passed:
            failures.append(vb)
        grad_cell = _cell(vb)
    else:
        grad_cell = f"not judged (S > {args.grad_check_max_s})"
    met = lambda ratio, target: "met" if ratio <= target else "NOT MET"  # noqa: E731
    rf, rs = t_fwd / t_sdpa, t_step / t_sdpa_step
    row = (f"| {B},{H},{S},{D} | {t_fwd:.3f} | {t_fwd_sync:.3f} | {t_sdpa:.3f} | {rf:.2f}x | {met(rf, FWD_TARGET)} "
           f"| {_cell(vf)} | {t_step:.3f} | {t_sdpa_step:.3f} | {rs:.2f}x | {met(rs, STEP_TARGET)} | {grad_cell} |")
    return row, failures, flags


def _peak_extra_mib(fn, dev: str):
    """MiB allocated at the peak of ``fn()`` beyond what was allocated before it (None on
    the CPU, where torch keeps no such count)."""
    import torch

    if dev != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _memory_rows(table: Table, seqs, D: int, impl, dev: str, bar, out) -> None:
    """Peak extra memory of the forward and of one step at each S (B = H = 1), beside
    SDPA's, and per S D element."""
    import torch

    emit = table.emit
    emit()
    emit(f"Peak memory beyond the inputs (torch.cuda.max_memory_allocated during the call minus what was allocated "
         f"before it), B = H = 1, D = {D}, bf16; 'per S*D' is bytes per element of one (S, D) tensor: flat in S "
         "is Theta(S D). The step's figure holds the four gradients (4 S D elements) and the output.")
    emit()
    emit("| S,D | inputs MiB (q,k,v,r) | fwd MiB | fwd bytes per S*D | fwd+bwd MiB | fwd+bwd bytes per S*D "
         "| SDPA fwd MiB | SDPA fwd+bwd MiB |")
    emit("|---|---|---|---|---|---|---|---|")
    for S in seqs:
        emit(_memory_row(S, D, impl, dev))
        table.write(out)
        bar.update()
        if dev == "cuda":
            torch.cuda.empty_cache()  # the row's tensors are gone with _memory_row's frame


def _memory_row(S: int, D: int, impl, dev: str) -> str:
    import torch

    fmt = lambda x: "n/a (no CUDA)" if x is None else f"{x:.2f}"  # noqa: E731
    per = lambda x: "n/a" if x is None else f"{x * 2**20 / (S * D):.1f}"  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = randn_inputs((1, 1, S, D), 3, torch.bfloat16, generator=g, device=dev)
    r = _probe((1, 1, S, D), torch.bfloat16, g, dev)
    do = randn_inputs((1, 1, S, D), 1, torch.bfloat16, generator=g, device=dev)[0]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
    sdpa_leaves = leaves[:3]

    def fwd():
        with torch.no_grad():
            return impl(q, k, v, r, qk_scale=D ** -0.5)

    def step():
        impl(*leaves, qk_scale=D ** -0.5).backward(do)
        return tuple(t.grad for t in leaves)

    def sdpa_fwd():
        with torch.no_grad():
            return causal_sdpa(q, k, v)

    def sdpa_step():
        causal_sdpa(*sdpa_leaves).backward(do)
        return tuple(t.grad for t in sdpa_leaves)

    def clear():
        for t in leaves:
            t.grad = None

    fwd()  # compile and warm the allocator outside the measured calls
    step()
    clear()
    m_fwd = _peak_extra_mib(fwd, dev)
    m_step = _peak_extra_mib(step, dev)
    clear()
    m_sdpa = _peak_extra_mib(sdpa_fwd, dev)
    m_sdpa_step = _peak_extra_mib(sdpa_step, dev)
    inputs = 4 * q.numel() * q.element_size() / 2**20
    return (f"| {S},{D} | {inputs:.2f} | {fmt(m_fwd)} | {per(m_fwd)} | {fmt(m_step)} | {per(m_step)} "
            f"| {fmt(m_sdpa)} | {fmt(m_sdpa_step)} |")
