"""What the benchmarks share (``lla-verify bench``, ``lla-verify bench-backward``,
scripts/bench_public.py, scripts/ab_kernels.py): the standard shapes and their flag, the
dtype flag, the random inputs, the timer, the SDPA backend of a dtype, and the table
they print and write.

torch and triton are imported where they are used, so a command's argument checks run
without them.
"""

from __future__ import annotations

import argparse
import datetime
import math
from typing import NamedTuple

from lla_verify.cliutil import UsageError, atomic_write, int_in

# the shapes of docs/performance.md: (B, H, S, D)
BENCH_SHAPES = ((16, 1, 2048, 64), (8, 1, 4096, 64), (8, 1, 2048, 128))
# --dtype's values and the registry's dtype names they stand for
DTYPE_FLAGS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def shapes_text(shapes) -> str:
    """(B, H, S, D) tuples as a --shapes value, 'B,H,S,D;B,H,S,D'."""
    return ";".join(",".join(str(x) for x in s) for s in shapes)


def int_tuples(text: str, n: int, flag: str, what: str) -> list[tuple]:
    """'a,b,c;a,b,c' -> tuples of n positive integers, or a UsageError naming ``flag``."""
    out = []
    pos = int_in(1)
    for part in text.split(";"):
        if not part.strip():
            continue
        fields = part.split(",")
        try:
            if len(fields) != n:
                raise argparse.ArgumentTypeError(f"expected {n} fields")
            out.append(tuple(pos(x) for x in fields))
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{flag}: expected {what} ({n} integers >= 1), got {part!r}: {exc}") from None
    return out


def parse_shapes(text: str, flag: str = "--shapes") -> list[tuple]:
    """A --shapes value as (B, H, S, D) tuples: at least one, every field >= 1."""
    shapes = int_tuples(text, 4, flag, "B,H,S,D")
    if not shapes:
        raise UsageError(f"{flag}: expected at least one B,H,S,D, got {text!r}")
    return shapes


def torch_dtype(flag: str):
    """The torch dtype of a --dtype value (a key of DTYPE_FLAGS)."""
    import torch

    return getattr(torch, DTYPE_FLAGS[flag])


class Table:
    """Lines printed as they come (a long run shows progress) and kept for ``write``."""

    def __init__(self):
        self.lines: list[str] = []

    def emit(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)

    def write(self, path) -> None:
        """Every line so far to ``path`` (atomically), when a path is given."""
        if path:
            atomic_write(path, "\n".join(self.lines) + "\n")


def versions_line(*, date: bool = False) -> str:
    """'device: NAME; torch X; triton Y[; date D]', the header of every table."""
    import torch
    import triton

    line = f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}"
    return line + (f"; date {datetime.date.today().isoformat()}" if date else "")


def median_ms(fn, *, grads=None, warmup: int = 25, rep: int = 100) -> float:
    """triton.testing.do_bench's median time of ``fn`` in ms (``grads``: tensors whose
    .grad it clears between calls)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")


def randn_inputs(shape, n: int, dtype, *, generator, device: str = "cuda") -> list:
    """``n`` standard normal tensors of ``shape``, drawn in float32 from ``generator`` and
    rounded to ``dtype``."""
    import torch

    return [torch.randn(*shape, device=device, dtype=torch.float32, generator=generator).to(dtype)
            for _ in range(n)]


def sdpa_backend(dtype):
    """The SDPA backend a causal attention of ``dtype`` is timed with: flash, which has no
    float32 kernel, else the memory-efficient one."""
    import torch
    from torch.nn.attention import SDPBackend

    return SDPBackend.FLASH_ATTENTION if dtype != torch.float32 else SDPBackend.EFFICIENT_ATTENTION


def causal_sdpa(q, k, v):
    """Causal torch SDPA of q, k, v on ``sdpa_backend(q.dtype)``."""
    import torch
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(sdpa_backend(q.dtype)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


# ------------------------------------------------------------------ bench-parallax, bench-decode
# Their shared frame: a CUDA run, or ``--smoke`` (one tiny shape on the CPU through the
# Triton interpreter, to exercise the code path: its times are meaningless and say so).
KERNEL_PACKAGES = ("lla_triton", "parallax_triton", "lla_decode", "parallax_decode")
SMOKE_NOTE = "SMOKE RUN on the CPU through the Triton interpreter: every time and bandwidth below is meaningless"


def bench_device(smoke: bool) -> str:
    """'cpu' for a --smoke run (the Triton interpreter switched on before any kernel is
    imported), else 'cuda'; a UsageError when there is no CUDA device and no --smoke."""
    import os
    import sys

    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            loaded = [m for m in KERNEL_PACKAGES if m in sys.modules]
            if loaded:  # triton.jit chose compiled kernels when these were imported
                raise UsageError(f"--smoke: {', '.join(loaded)} already imported without the Triton interpreter; "
                                 "set TRITON_INTERPRET=1 before starting")
            os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UsageError("expected a CUDA device (it times GPU kernels); torch sees none "
                         "(--smoke runs one tiny shape on the CPU, timings meaningless)")
    return "cuda"


def header_lines(command: str, args, *, smoke: bool) -> list[str]:
    """The command line (every option's value, defaults included), the device and the
    torch and triton versions: the first lines of a bench-parallax or bench-decode table."""
    import torch
    import triton

    skip = {"func", "command"}
    opts = []
    for key, val in sorted(vars(args).items()):
        if key in skip or val is None or val is False:
            continue
        flag = "--" + key.replace("_", "-")
        opts.append(flag if val is True else f"{flag} {shlex_quote(str(val))}")
    device = SMOKE_NOTE if smoke else torch.cuda.get_device_name()
    return [f"command: lla-verify {command} {' '.join(opts)}".rstrip(),
            f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; "
            f"date {datetime.date.today().isoformat()}"]


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


class Timer:
    """Median times in ms: triton.testing.do_bench on CUDA (its own warm-up and L2 flush
    between calls), the host clock over ``smoke_reps`` calls in a --smoke run; and the
    calls between device-wide synchronisations (trust.timed_calls) whose last output the
    accuracy columns judge."""

    def __init__(self, device: str, *, warmup: int, rep: int, sync_reps: int, smoke_reps: int = 2):
        self.device, self.warmup, self.rep, self.sync_reps, self.smoke_reps = device, warmup, rep, sync_reps, smoke_reps

    def ms(self, fn, *, grads=None) -> float:
        if self.device == "cuda":
            return median_ms(fn, grads=grads, warmup=self.warmup, rep=self.rep)
        import statistics
        import time

        times = []
        for _ in range(self.smoke_reps):
            for t in grads or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def synced(self, fn) -> tuple[float, object]:
        """(median ms of ``sync_reps`` calls between device-wide synchronisations, the
        last call's result)."""
        import statistics

        from lla_verify.trust import timed_calls

        times, out = timed_calls(fn, device=self.device, reps=self.sync_reps if self.device == "cuda" else 1)
        return statistics.median(times) * 1e3, out


def progress(total: int, *, disable: bool, desc: str):
    """A tqdm bar on stderr (the table goes to stdout)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def int_list(text: str, flag: str, *, allowed=None) -> list[int]:
    """'a,b,c' -> integers >= 1 (each in ``allowed`` when given), or a UsageError naming ``flag``."""
    out = []
    for part in str(text).split(","):
        try:
            x = int_in(1)(part)
        except argparse.ArgumentTypeError:
            raise UsageError(f"{flag}: expected a comma list of integers >= 1, got {text!r}") from None
        if allowed is not None and x not in allowed:
            raise UsageError(f"{flag}: expected values among {list(allowed)}, got {x} in {text!r}")
        out.append(x)
    return out


def add_run_args(p: argparse.ArgumentParser, *, sync_reps: int, sync_help: str, smoke_what: str) -> None:
    """The timing and output options the Parallax and decode benchmarks share: --sync-reps,
    --warmup, --rep, --smoke (``smoke_what``: what it runs), --no-progress, --out."""
    p.add_argument("--sync-reps", type=int_in(1), default=sync_reps,
                   help=f"calls timed between device-wide synchronisations ({sync_help})")
    p.add_argument("--warmup", type=int_in(1), default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int_in(1), default=100, help="do_bench repetitions (ms)")
    p.add_argument("--smoke", action="store_true",
                   help=f"{smoke_what} on the CPU through the Triton interpreter (exercises the code; "
                        "timings meaningless)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")


class Refused(NamedTuple):
    """A failed verdict for an output the harness does not judge (trust.check_tensor: a
    torch.Tensor subclass, another type, or the wrong shape, dtype or device)."""
    message: str
    ratio: float = math.inf
    passed: bool = False
    cause: str = "implementation"


def refusal(o, shape: tuple, like) -> str | None:
    """Why ``o`` is not a plain tensor of ``shape`` with ``like``'s dtype and device
    (trust.check_tensor's words), else None: the benchmarks judge only what the trust
    boundary accepts."""
    from lla_verify.trust import Misbehaved, check_tensor

    try:
        check_tensor(o, "o", shape=tuple(shape), dtypes=(like.dtype,), device=like.device)
    except Misbehaved as exc:
        return str(exc)
    return None


def refused_output(o, shape: tuple, like, *, who: str) -> Refused | None:
    """``refusal`` as a failed verdict of ``who``, else None."""
    why = refusal(o, shape, like)
    return None if why is None else Refused(f"[{who}] {why}")
