"""``lla-verify bench-decode``: the decode kernels (lla_decode, parallax_decode) against
torch SDPA with a single query against the same cache, timed in the same run.

    lla-verify bench-decode [--batches 1,16,64] [--caches 4096,32768,131072] [--dims 64,128]
                            [--kernels parallax,lla] [--out FILE] [--smoke]

For each batch B, cache length T and head dim D (bf16, ``--heads`` heads, every sequence
using the whole cache): the median time of SDPA on q (B, H, 1, D) against k, v (B, H, T,
D) with is_causal=False, and of each decode kernel on the same q, k, v (lengths T), over
SDPA's, against issue 23's targets: parallax_decode <= 1.2x SDPA, lla_decode <=
(iterations + 2)x SDPA with the CG iterations of the timed call (the largest over its
heads in the target; mean / max reported). Targets are measurements, never the exit status.

Bandwidth: the bytes of the K and V cache (2 B H T D elements) over the time, for every
row alike (lla_decode reads the cache twice; its figure is still per cache byte), as a
fraction of a device-to-device copy measured in this run (bytes read plus bytes written
over its time) and of the nominal figure of known devices (H100 SXM 3.35 TB/s, H200
4.8 TB/s; others none).

Accuracy, so that a fast wrong kernel cannot look good: head (0, 0) of every timed call is
a fixed draw per (T, D), the same for every batch, and the output of the last timed call
there is compared with the float64 decode reference (oracles/decode.py: the last row of
the float64 forward on the cache). The check is normwise: error <= DECODE_ULPS units of
the output dtype's roundoff times |o|, the size of rounding an exact answer to bf16 and
a screen, not the derived budget (that needs the forward's S x S terms, beyond the card
at 128k). Above it: FAIL, exit 1. The reference costs about T^2 D memory traffic per
(T, D); ``--oracle-max-cache`` bounds the T it is computed for.

A combination whose cache (with a margin for the kernels' workspaces) does not fit in the
card's free memory is skipped with a line saying so.

``--graphs`` also times every call captured in a CUDA graph, SDPA's too, and replayed (the
same do_bench, L2 flushed between replays): a replay launches the captured kernels with no
Python, allocation or host copy, so the graph columns compare device time, what a server
that captures its decode step sees, while the plain columns include each wrapper's host
work, which bounds every call at a small cache. The built-in parallax_decode is captured
through its plan and lla_decode through its own (``parallax_decode_plan``,
``lla_decode_plan``: checks and device lengths prepared once); any other call is captured as
it is made, and one that cannot be captured (a host
copy or a synchronisation inside it) gets its reason in the graph columns. The graph's own
output, after the timed replays, is judged against the reference like the plain call's.
"""

from __future__ import annotations

import argparse
import time

from lla_verify.cliutil import UsageError, check_out_file, float_in, int_in
from lla_verify.commands.bench_parallax import load_impl
from lla_verify.commands.benchkit import (SMOKE_NOTE, Table, Timer, add_run_args, bench_device, header_lines,
                                          int_list, median_ms, progress, refusal)

HEAD_DIMS = (16, 32, 64, 128)
KERNELS = ("parallax", "lla")
DEFAULT_IMPLS = {"lla": "lla_decode:lla_decode", "parallax": "parallax_decode:parallax_decode"}
PARALLAX_TARGET = 1.2  # issue 23: parallax_decode at most 1.2x SDPA
LLA_EXTRA = 2  # issue 23: lla_decode at most (iterations + 2)x SDPA
DECODE_ULPS = 4.0  # allowed normwise error, in units of the output dtype's roundoff
NOMINAL_BW = (("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12), ("H100 SXM", 3.35e12))  # byte/s, datasheets
SLOW_MS = 20.0  # a call slower than this is timed over a few event-timed calls, not do_bench's estimate loop
VERY_SLOW_MS = 1000.0  # a call slower than this is timed once
ORACLE_CHUNK_BYTES = 8 * 2**30  # the float64 reference's chunk on a GPU: few, large chunks over a long cache
COLUMNS = ("B,H,T,D", "kernel", "ms", "ms, synced", "SDPA ms", "/ SDPA", "target", "met", "CG iters mean/max",
           "cache GB/s", "/ measured peak", "/ nominal peak", "rel err vs f64", "err / allowed")
GRAPH_COLUMNS = ("graph ms", "graph / SDPA graph", "graph / measured peak", "graph met", "graph err / allowed")
SMOKE = {"batches": "2", "caches": "48", "dims": "16"}


def register(sub) -> None:
    p = sub.add_parser("bench-decode", help="time lla_decode and parallax_decode against torch SDPA (one query, "
                       "same cache), with bandwidth and error", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default=None, help="comma list of B (default 1,16,64; --smoke: 2)")
    p.add_argument("--caches", default=None, help="comma list of cache lengths T (default 4096,32768,131072; "
                   "--smoke: 48)")
    p.add_argument("--dims", default=None, help="comma list of D = Dv among 16,32,64,128 (default 64,128; --smoke: 16)")
    p.add_argument("--heads", type=int_in(1), default=1, help="heads per sequence (query and key-value alike)")
    p.add_argument("--kernels", default="parallax,lla", help="comma list among parallax,lla")
    p.add_argument("--ridge-lambda", type=float_in(1e-3, 1e2), default=0.1, help="LLA's lambda")
    p.add_argument("--lla-solver", choices=("auto", "sigma", "keyed"), default="auto",
                   help="the built-in lla_decode's solver (docs/decode.md; auto: the package's choice by cache "
                        "positions and D); its graph columns capture the solver's plan (the keyed one with its "
                        "fixed launch schedule)")
    p.add_argument("--lla-impl", default=DEFAULT_IMPLS["lla"],
                   help="MODULE:CALLABLE with fn(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale) -> o")
    p.add_argument("--parallax-impl", default=DEFAULT_IMPLS["parallax"],
                   help="MODULE:CALLABLE with fn(q, r, k_cache, v_cache, lengths, *, qk_scale) -> o")
    p.add_argument("--oracle-max-cache", type=int_in(0), default=131072,
                   help="largest T whose output is checked against the float64 reference (its cost grows as T^2 D)")
    p.add_argument("--copy-mib", type=int_in(1), default=2048, help="size of the copy that measures the bandwidth")
    p.add_argument("--graphs", action="store_true",
                   help="also time every call, SDPA's too, captured in a CUDA graph and replayed: device time, "
                        "without the wrappers' host work (CUDA only)")
    add_run_args(p, sync_reps=2, sync_help="the last one's output is judged",
                 smoke_what="one tiny combination")
    p.set_defaults(func=run)


def _resolve(args):
    """Defaults that depend on --smoke, then every argument checked: (batches, caches, dims, kernels)."""
    for key, val in SMOKE.items():
        if getattr(args, key) is None:
            setattr(args, key, val if args.smoke else {"batches": "1,16,64", "caches": "4096,32768,131072",
                                                       "dims": "64,128"}[key])
    batches = int_list(args.batches, "--batches")
    caches = int_list(args.caches, "--caches")
    dims = int_list(args.dims, "--dims", allowed=HEAD_DIMS)
    kernels = [x.strip() for x in str(args.kernels).split(",")]
    if not kernels or any(x not in KERNELS for x in kernels) or len(set(kernels)) != len(kernels):
        raise UsageError(f"--kernels: expected a comma list among {','.join(KERNELS)}, got {args.kernels!r}")
    if args.out is not None:
        check_out_file(args.out)
    return batches, caches, dims, kernels


def nominal_bandwidth(name: str) -> float | None:
    """The datasheet memory bandwidth (byte/s) of a known device name, else None."""
    for key, bw in NOMINAL_BW:
        if key.lower() in name.lower():
            return bw
    return None


def copy_bandwidth(dev: str, mib: int, timer: Timer) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of ``mib`` MiB."""
    import torch

    n = mib * 2**20 // 4
    src = torch.randn(n, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    return 2.0 * n * 4 / (ms * 1e-3)


def _fits(dev: str, need: int) -> str | None:
    """Why ``need`` bytes do not fit in the device's free memory, or None."""
    if dev != "cuda":
        return None
    import torch

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


class FixedHead:
    """The fixed head (0, 0) of one (T, D): q, r, k, v drawn from a seed of (T, D) alone,
    and the float64 references computed once for every batch size."""

    def __init__(self, T: int, D: int, dev: str, kernels, lam: float, check: bool):
        import torch

        g = torch.Generator(device="cpu").manual_seed(1_000_003 * T + D)
        draw = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(torch.bfloat16).to(dev)  # noqa: E731
        self.q, self.k, self.v = draw(D), draw(T, D), draw(T, D)
        self.r = (torch.randn(D, generator=g, dtype=torch.float32) / D ** 0.5).to(torch.bfloat16).to(dev)
        self.scale = D ** -0.5
        self.refs = {}
        if not check:
            return
        from lla_verify.oracles.decode import lla_decode_reference, parallax_decode_reference

        one = lambda t: t[None, None]  # noqa: E731
        lens = torch.tensor([T])
        kw = dict(qk_scale=self.scale)
        if dev == "cuda":
            kw["chunk_bytes"] = ORACLE_CHUNK_BYTES
        if "parallax" in kernels:
            self.refs["parallax"] = parallax_decode_reference(one(self.q), one(self.r), one(self.k), one(self.v),
                                                              lens, **kw)[0, 0]
        if "lla" in kernels:
            self.refs["lla"] = lla_decode_reference(one(self.q), one(self.k), one(self.v), lens, ridge_lambda=lam,
                                                    **kw)[0, 0]


def accuracy(o_row, ref):
    """(relative error, error / allowed) of one output row against its float64 reference."""
    import torch

    from lla_verify.registry.precision import unit_roundoff

    err = float((o_row.double() - ref).norm())
    size = float(ref.norm())
    allowed = DECODE_ULPS * unit_roundoff(o_row.dtype) * size
    if not torch.isfinite(o_row).all():
        return float("inf"), float("inf")
    return err / max(size, 1e-300), (err / allowed if allowed > 0 else (0.0 if err == 0 else float("inf")))


class DecodeTimer(Timer):
    """do_bench for fast calls; a call slower than SLOW_MS (lla_decode at 128k, B 64) is
    timed as the median of three event-timed calls after one warm call (one, past
    VERY_SLOW_MS), instead of do_bench's five-call estimate and its repetitions, and is
    then judged from one synchronised call rather than ``sync_reps``."""

    slow = False

    def ms(self, fn, *, grads=None) -> float:
        self.slow = False
        if self.device != "cuda":
            return super().ms(fn, grads=grads)
        import statistics

        import torch

        fn()  # compiles; the allocator warms
        torch.cuda.synchronize()

        def event_ms():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)

        first = event_ms()
        if first < SLOW_MS:
            return median_ms(fn, warmup=self.warmup, rep=self.rep)
        self.slow = True
        if first >= VERY_SLOW_MS:
            return first
        return statistics.median([first, event_ms(), event_ms()])

    def synced(self, fn) -> tuple[float, object]:
        if not self.slow:
            return super().synced(fn)
        reps, self.sync_reps = self.sync_reps, 1
        try:
            return super().synced(fn)
        finally:
            self.sync_reps = reps


def run(args) -> int:
    batches, caches, dims, kernels = _resolve(args)
    dev = bench_device(args.smoke)
    impls = {"lla": load_impl(args.lla_impl, "--lla-impl") if "lla" in kernels else None,
             "parallax": load_impl(args.parallax_impl, "--parallax-impl") if "parallax" in kernels else None}
    import torch

    builtin = {}
    if "lla" in kernels:
        import lla_decode

        builtin["lla"] = impls["lla"] is lla_decode.lla_decode
    if "parallax" in kernels:
        import parallax_decode

        builtin["parallax"] = impls["parallax"] is parallax_decode.parallax_decode
    start = time.perf_counter()
    table = Table()
    for line in header_lines("bench-decode", args, smoke=args.smoke):
        table.emit(line)
    timer = DecodeTimer(dev, warmup=args.warmup, rep=args.rep, sync_reps=args.sync_reps)
    copy_mib = 8 if args.smoke else args.copy_mib
    peak = copy_bandwidth(dev, copy_mib, timer)
    name = "cpu" if args.smoke else torch.cuda.get_device_name()
    nominal = nominal_bandwidth(name)
    table.emit(f"bf16, {args.heads} head(s), one query per sequence against a full cache (lengths T), "
               f"lambda {args.ridge_lambda}; SDPA: torch's own backend choice, is_causal=False")
    table.emit(f"peak bandwidth: measured device-to-device copy {peak / 1e12:.3f} TB/s (read + write, "
               f"{copy_mib} MiB, this run); nominal {'%.2f TB/s' % (nominal / 1e12) if nominal else 'unknown'} "
               f"({name})")
    if args.smoke:
        table.emit(SMOKE_NOTE)
        if args.graphs:
            table.emit("--graphs on the CPU: no graph is captured; each 'replay' is the plain call (the plan's run "
                       "for the built-in kernels), so that the graph columns' code runs")
    table.emit()
    cols = COLUMNS + (GRAPH_COLUMNS if args.graphs else ())
    table.emit("| " + " | ".join(cols) + " |")
    table.emit("|" + "---|" * len(cols))
    failures, flags = [], []
    combos = [(D, T, B) for D in dims for T in caches for B in batches]
    with progress(len(combos), disable=args.no_progress, desc="bench-decode") as bar:
        for D in dims:
            for T in caches:
                check = T <= args.oracle_max_cache
                why = _fits(dev, 2 * T * D * 8 * 8 + (ORACLE_CHUNK_BYTES * 3 if check else 0))
                if why:
                    table.emit(_skip_row(f"*,{args.heads},{T},{D}", f"{why} (the reference and one sequence's cache)",
                                         args.graphs))
                    bar.update(len(batches))
                    continue
                case = FixedHead(T, D, dev, kernels, args.ridge_lambda, check)
                if dev == "cuda":
                    torch.cuda.empty_cache()
                for B in batches:
                    rows, fails, why = _combo(B, T, D, case, impls, builtin, kernels, args, timer, dev, peak, nominal)
                    flags += why
                    if dev == "cuda":
                        torch.cuda.empty_cache()  # this batch's cache is gone with _combo's frame
                    for row in rows:
                        table.emit(row)
                    table.write(args.out)  # what is done so far survives a run cut short
                    failures += fails
                    bar.update()
                del case
    table.emit()
    table.emit(f"ms: median of do_bench (CUDA events, L2 flushed between calls), or of three event-timed calls after "
               f"a warm one for a call over {SLOW_MS:g} ms (one past {VERY_SLOW_MS:g} ms); 'synced' the median of "
               f"{args.sync_reps} calls between device-wide synchronisations (one for a call over {SLOW_MS:g} ms), the "
               "last of which is judged. The built-in kernels are timed with check_finite=False (SDPA checks "
               "nothing either). Targets are issue 23's: 'NOT MET' is a measurement, not a failure; lla_decode's "
               "uses the largest CG iteration count over the call's heads.")
    if args.graphs:
        table.emit("graph ms: the same do_bench over replays of the call captured in a CUDA graph (SDPA's too; "
                   "the built-in kernels through their plans), device time without host work; 'graph met' holds it "
                   "against the same target over SDPA's graph time; 'graph / measured peak' is the cache's bytes over the "
                   "graph time as a fraction of the measured copy bandwidth; 'graph err / allowed' judges the graph's "
                   "output after the timed replays.")
    table.emit(f"cache GB/s: 2 B H T D bf16 elements (K and V once) over the time. err / allowed: head (0, 0) of the "
               f"judged call against the float64 decode reference; allowed {DECODE_ULPS:g} units of bf16 roundoff "
               f"times |o| (above 1: FAIL, exit 1); 'not checked' above --oracle-max-cache {args.oracle_max_cache}.")
    for f in failures:
        table.emit(f"FAIL: {f}")
    for f in flags:
        table.emit(f"TIMING NOT BELIEVED: {f}")
    table.emit(f"wall time {time.perf_counter() - start:.0f} s")
    table.write(args.out)
    return 1 if (failures or flags) else 0


def _skip_row(label: str, why: str, graphs: bool = False) -> str:
    n = len(COLUMNS) + (len(GRAPH_COLUMNS) if graphs else 0)
    return "| " + " | ".join([label, "skipped", why] + [""] * (n - 3)) + " |"


class GraphUnavailable(Exception):
    """A call that cannot be captured in a CUDA graph; the message says why."""


def graphed(fn, *, cuda: bool = True):
    """(replay, out): ``fn`` captured in a CUDA graph after warm-up calls on a side stream
    (torch's recipe: the capture must not be the first call of anything that allocates or
    compiles); ``replay()`` re-runs the captured launches and leaves their result in ``out``.
    GraphUnavailable when the capture fails (a host copy or a synchronisation inside ``fn``).
    ``cuda=False`` (--smoke on the CPU): no graph, ``replay`` is ``fn`` itself, so that the
    rest of the graph columns' code runs."""
    import torch

    if not cuda:
        out = fn()

        def replay():
            out.copy_(fn())
        return replay, out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:  # noqa: BLE001 - any capture error is the finding, named in the row
        torch.cuda.synchronize()
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise GraphUnavailable(f"not capturable: {type(exc).__name__}: {first}") from None
    return graph.replay, out


def _combo(B, T, D, case: FixedHead, impls, builtin, kernels, args, timer: Timer, dev, peak, nominal):
    """The table rows (SDPA, then each kernel) of one (B, T, D), the failed checks' lines and
    the timing flags (a kernel time below the cache's bytes at the device's peak bandwidth)."""
    import torch

    from lla_verify.trust import device_peaks, implausible_speed

    H = args.heads
    cache_bytes = 2 * B * H * T * D * 2
    why = _fits(dev, int(cache_bytes * 1.25) + 2**28)
    if why:
        return [_skip_row(f"{B},{H},{T},{D}", why, args.graphs)], [], []
    g = torch.Generator(device=dev).manual_seed(7 * B + T + D)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float32, generator=g).to(torch.bfloat16)  # noqa: E731
    k, v = rnd(B, H, T, D), rnd(B, H, T, D)
    q = rnd(B, H, D)
    r = (torch.randn(B, H, D, device=dev, dtype=torch.float32, generator=g) / D ** 0.5).to(torch.bfloat16)
    k[0, 0], v[0, 0], q[0, 0], r[0, 0] = case.k, case.v, case.q, case.r
    lengths = torch.full((B,), T, dtype=torch.int64)  # on the host: the kernels read it there
    scale = case.scale
    q4 = q[:, :, None, :]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q4, k, v, is_causal=False)

    t_sdpa = timer.ms(sdpa)
    t_sdpa_sync, o_sdpa = timer.synced(sdpa)
    rows, fails, flags = [], [], []
    label = f"{B},{H},{T},{D}"
    floor_s = cache_bytes / device_peaks(torch.cuda.get_device_name())[1] if dev == "cuda" else None

    def bw(ms):
        rate = cache_bytes / (ms * 1e-3)
        nom = f"{rate / nominal:.2f}" if nominal else "n/a"
        return f"{rate / 1e9:.1f} | {rate / peak:.2f} | {nom}"

    def peak_fraction(ms):
        return f"{cache_bytes / (ms * 1e-3) / peak:.3g}"

    g_sdpa, g_sdpa_cells = None, ""
    if args.graphs:
        try:
            replay, _ = graphed(sdpa, cuda=dev == "cuda")
            g_sdpa = timer.ms(replay)
            g_sdpa_cells = f" {g_sdpa:.4f} | 1.00x | {peak_fraction(g_sdpa)} | - | - |"
        except GraphUnavailable as exc:
            g_sdpa_cells = f" {exc} | - | - | - | - |"
    rows.append(f"| {label} | SDPA | {t_sdpa:.4f} | {t_sdpa_sync:.4f} | {t_sdpa:.4f} | 1.00x | - | - | - "
                f"| {bw(t_sdpa)} | - | - |" + g_sdpa_cells)
    del o_sdpa
    for kern in kernels:
        fn = impls[kern]
        extra = {"check_finite": False} if builtin[kern] else {}
        if builtin[kern] and kern == "lla":
            extra["solver"] = args.lla_solver
        if kern == "parallax":
            call = lambda: fn(q, r, k, v, lengths, qk_scale=scale, **extra)  # noqa: E731
            judged = call
        else:
            lam = args.ridge_lambda
            call = lambda: fn(q, k, v, lengths, ridge_lambda=lam, qk_scale=scale, **extra)  # noqa: E731
            judged = (lambda: fn(q, k, v, lengths, ridge_lambda=lam, qk_scale=scale, return_stats=True, **extra)) \
                if builtin[kern] else call
        t = timer.ms(call)
        t_sync, out = timer.synced(judged)
        if floor_s is not None:
            # only the floor: at microseconds, the synchronised time is mostly the wrapper's
            # host work, so its gap to the event time says nothing of side streams
            why = implausible_speed(min(t, t_sync) / 1e3, floor_s)
            if why:
                flags.append(f"{kern} at {label}: {why}")
        o, stats = out if isinstance(out, tuple) else (out, None)
        misbehaved = refusal(o, (B, H, v.shape[-1]), q)
        ratio = t / t_sdpa
        if kern == "parallax":
            name, target, iters = "parallax_decode", PARALLAX_TARGET, "-"
        else:
            name = "lla_decode"
            if builtin[kern]:
                # the solve that ran: auto's choice, by the package's own rule
                import lla_decode

                name = f"lla_decode ({lla_decode.resolve_solver(args.lla_solver, lengths, H, D)})"
            if stats is not None:
                it = stats["cg_iters"].float()
                target = float(it.max()) + LLA_EXTRA
                iters = f"{it.mean().item():.1f}/{int(it.max().item())}"
            else:
                target, iters = None, "n/a (external impl)"
        if misbehaved:
            acc = f"not judged: {misbehaved} | FAIL"
            fails.append(f"{name} at {label}: {misbehaved}")
        elif kern in case.refs:
            rel, over = accuracy(o[0, 0], case.refs[kern])
            acc = f"{rel:.2e} | {over:.3f}" + ("" if over <= 1.0 else " FAIL")
            if not over <= 1.0:
                spec = args.lla_impl if kern == "lla" else args.parallax_impl
                fails.append(f"{name} at {label}: head (0, 0) error {rel:.3e} relative, {over:.3g}x the allowed "
                             f"{DECODE_ULPS:g} units of bf16 roundoff ({spec})")
        else:
            acc = f"not checked (T > {args.oracle_max_cache}) | -"
        tgt = "-" if target is None else f"<= {target:g}x"
        met = "-" if target is None else ("met" if ratio <= target else "NOT MET")
        graph_cells = ""
        if args.graphs:
            graph_cells = _graph_cells(kern, name, fn, builtin[kern], (q, r, k, v, lengths, scale), case, args, timer,
                                       g_sdpa, target, floor_s, label, fails, flags, dev == "cuda", peak_fraction)
        rows.append(f"| {label} | {name} | {t:.4f} | {t_sync:.4f} | {t_sdpa:.4f} | {ratio:.2f}x | {tgt} | {met} "
                    f"| {iters} | {bw(t)} | {acc} |" + graph_cells)
        del out, o
    return rows, fails, flags


def _graph_cells(kern, name, fn, is_builtin, inputs, case: FixedHead, args, timer: Timer, g_sdpa, target, floor_s,
                 label, fails, flags, cuda: bool, peak_fraction) -> str:
    """The graph columns of one kernel row: its call captured and replayed (parallax_decode
    through its plan), timed like the plain call, its output judged like the plain call's;
    ``peak_fraction(ms)``: the cache's bytes over that time, as a fraction of the measured peak."""
    from lla_verify.trust import implausible_speed

    q, r, k, v, lengths, scale = inputs
    if kern == "parallax" and is_builtin:
        import parallax_decode

        plan = parallax_decode.parallax_decode_plan(k, v, lengths, qk_scale=scale)
        call = lambda: plan.run(q, r, check_finite=False)  # noqa: E731
    elif kern == "parallax":
        call = lambda: fn(q, r, k, v, lengths, qk_scale=scale)  # noqa: E731
    elif is_builtin:
        import lla_decode

        plan = lla_decode.lla_decode_plan(k, v, lengths, ridge_lambda=args.ridge_lambda, qk_scale=scale,
                                          solver=args.lla_solver)
        call = lambda: plan.run(q, check_finite=False)  # noqa: E731
    else:
        call = lambda: fn(q, k, v, lengths, ridge_lambda=args.ridge_lambda, qk_scale=scale)  # noqa: E731
    try:
        replay, out = graphed(call, cuda=cuda)
    except GraphUnavailable as exc:
        return f" {exc} | - | - | - | - |"
    misbehaved = refusal(out, (q.shape[0], q.shape[1], v.shape[-1]), q)
    if misbehaved:
        fails.append(f"{name} graph at {label}: {misbehaved}")
        return f" not judged: {misbehaved} | - | - | - | FAIL |"
    t = timer.ms(replay)
    if floor_s is not None:
        why = implausible_speed(t / 1e3, floor_s)
        if why:
            flags.append(f"{kern} graph at {label}: {why}")
    if g_sdpa is None:
        ratio_cell, met = "- (SDPA not captured)", "-"
    else:
        ratio = t / g_sdpa
        ratio_cell = f"{ratio:.2f}x"
        met = "-" if target is None else ("met" if ratio <= target else "NOT MET")
    if kern in case.refs:
        rel, over = accuracy(out[0, 0], case.refs[kern])
        acc = f"{over:.3f}" + ("" if over <= 1.0 else " FAIL")
        if not over <= 1.0:
            fails.append(f"{name} graph at {label}: head (0, 0) error {rel:.3e} relative, {over:.3g}x the allowed "
                         f"{DECODE_ULPS:g} units of bf16 roundoff")
    else:
        acc = f"not checked (T > {args.oracle_max_cache})"
    return f" {t:.4f} | {ratio_cell} | {peak_fraction(t)} | {met} | {acc} |"
