"""What every ``lla-verify`` subcommand shares: the usage error, argument types,
checks of output paths made before any work starts, and atomic file writes.

A report is written to a temporary file in its own folder and renamed over the
target (``os.replace`` is atomic on one file system), so an interrupted write
(Ctrl-C, SIGTERM, a full disk) leaves the previous file or none, never a
truncated one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import tempfile
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input; ``cli.main`` prints it as one line and exits 2."""


def one_line(msg: str) -> str:
    """``msg`` with control characters (a newline or carriage return inside a quoted
    argument) escaped, so an error stays one line on stderr."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) == "Cc" else ch for ch in str(msg))


# ------------------------------------------------------------------ argument types
def int_in(lo: int, hi: int | None = None):
    """An argparse type: a decimal integer in [lo, hi] (ASCII digits only)."""

    def parse(text: str) -> int:
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        t = text.strip()
        body = t[1:] if t[:1] in "+-" else t
        if not (body.isascii() and body.isdigit()) or len(body) > 40:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        val = int(t)
        if val < lo or (hi is not None and val > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return val

    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the interval, each end open or closed."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    want = f"a finite number in {left}{lo:g}, {hi:g}{right}"

    def parse(text: str) -> float:
        t = text.strip()
        if not t.isascii():
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        try:
            val = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        ok = math.isfinite(val) and (val > lo if lo_open else val >= lo) and (val < hi if hi_open else val <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return val

    return parse


SEED_MAX = 2**32 - 1  # the case generators' CPU generator keeps 32 bits of a seed
seed_type = int_in(0, SEED_MAX)


def check_device(text: str, flag: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that this process can use, else a UsageError."""
    import re

    import torch

    if text not in ("cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]{1,3}", text or ""):
        raise UsageError(f"{flag}: expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{flag}: {text} requested but torch sees no CUDA device (use {flag} cpu)")
        if ":" in text and int(text.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"{flag}: {text} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return text


# ------------------------------------------------------------------ output paths
def _probe_writable(folder: Path, flag: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lla-verify-probe.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write into {str(folder)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def check_out_dir(path: str, flag: str = "--out") -> Path:
    """Make the output folder ``path`` (and its parents) and prove a file can be written
    there, before any cell runs: a bad ``--out`` found after an hour's sweep loses it."""
    if not path:
        raise UsageError(f"{flag}: expected a folder, got an empty path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag}: {path!r} exists and is not a folder")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag}: {path!r} lies under {str(parent)!r}, which is a file, not a folder")
        if parent.exists():
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create the folder {path!r}: {exc.strerror or exc}") from None
    _probe_writable(p, flag)
    return p


def check_out_file(path: str, flag: str = "--out") -> Path:
    """An output file's folder must exist and be writable, and the file must not be a folder."""
    if not path:
        raise UsageError(f"{flag}: expected a file name, got an empty path")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag}: {path!r} is a folder; expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"{flag}: the folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag}: {path!r} lies under {str(parent)!r}, which is a file, not a folder")
    _probe_writable(parent, flag)
    return p


# ------------------------------------------------------------------ atomic writes
def atomic_write(path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # the temporary file sits beside its target, so os.replace is a rename on one file system
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp makes the file private; reports and goldens are ordinary files
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def jsonable(x):
    """``x`` with every non-finite float replaced by the string 'inf', '-inf' or 'nan'
    (strict JSON has none of them), through dicts, lists and tuples."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def save_figure(fig, path, **kw) -> None:
    """``fig.savefig`` into memory, then ``atomic_write``."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kw)
    atomic_write(path, buf.getvalue())
