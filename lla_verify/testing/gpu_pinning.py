"""One GPU per pytest-xdist worker, round-robin, chosen before CUDA is touched.

Workers are named gw0, gw1, ... by xdist. Worker n takes GPU n mod G, where G is
the number of visible devices, by narrowing CUDA_VISIBLE_DEVICES to that one
device: every later ``torch.device("cuda")`` in the worker is then its own GPU,
and no test needs to know about the pinning. G is read without creating a CUDA
context (CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``), since a context created
before the narrowing would pin the worker to GPU 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def worker_index(worker_id: str | None) -> int | None:
    """'gw3' -> 3; None or 'master' (no xdist) -> None."""
    if not worker_id:
        return None
    m = re.fullmatch(r"gw(\d+)", worker_id)
    return int(m.group(1)) if m else None


def visible_devices(env: dict | None = None, smi_lister=None) -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES would name them."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    lister = smi_lister or _nvidia_smi_count
    return [str(i) for i in range(lister())]


def _nvidia_smi_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def assign(worker_id: str | None, devices: list[str]) -> str | None:
    """The device id for this worker (round-robin), or None to leave things as they are."""
    n = worker_index(worker_id)
    if n is None or not devices:
        return None
    return devices[n % len(devices)]


def pin_current_worker(env: dict | None = None, smi_lister=None) -> str | None:
    """Narrow CUDA_VISIBLE_DEVICES for this xdist worker; returns the chosen id or None."""
    env = os.environ if env is None else env
    if env.get("LLA_NO_GPU_PINNING") == "1":
        return None
    dev = assign(env.get("PYTEST_XDIST_WORKER"), visible_devices(env, smi_lister))
    if dev is not None:
        env["LLA_PINNED_GPU"] = dev
        env["CUDA_VISIBLE_DEVICES"] = dev
    return dev


def workers_for(n_gpus: int, cpus: int) -> int:
    """Workers for ``-n auto``: one per CPU, GPUs or not.

    The suite is CPU-bound on a GPU machine too (float64 oracles, budgets, Hypothesis
    itself; each kernel launch is small): on one H200 with 16 CPUs, 2 workers finished
    23 properties in 316 s, 14 workers the whole suite in about 130 s (H100,
    docs/performance.md). GPUs are shared round-robin (``assign``)."""
    del n_gpus  # kept in the signature: the pinning, not the count, uses it
    return max(1, cpus)


def threads_per_worker(cpus: int, workers: int) -> int:
    """Torch intra-op threads for each of ``workers`` processes on ``cpus`` CPUs: a
    share, not torch's default of all of them each (16 workers x 16 threads thrash)."""
    return max(1, cpus // max(1, workers))
