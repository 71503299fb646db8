"""Planted misbehaving implementations for tests/test_trust.py.

Module-level functions, so that they pickle by reference into the harness's worker
processes and can be named on the command line as ``trust_planted:NAME``. Each breaks
the calling contract in one way an evaluator of GPU kernels has been fooled by
(STYLE.md, "Evaluators that were fooled"); an honest one is here for comparison.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from lla_verify.oracles.dense import dense_torch_lla


def honest(q, k, v, *, ridge_lambda, qk_scale=None):
    return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def fill_v(q, k, v, *, ridge_lambda, qk_scale=None):
    """v := 1, return ones: the LLA of constant values is that constant (weights sum to one)."""
    v.fill_(1)
    return torch.ones_like(v)


def double_k(q, k, v, *, ridge_lambda, qk_scale=None):
    """k := 2 k, return the correct LLA of the mutated inputs."""
    k.mul_(2)
    return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def sys_exit(q, k, v, *, ridge_lambda, qk_scale=None):
    sys.exit(0)


def raise_interrupt(q, k, v, *, ridge_lambda, qk_scale=None):
    raise KeyboardInterrupt


def os_exit(q, k, v, *, ridge_lambda, qk_scale=None):
    os._exit(0)


def libc_exit(q, k, v, *, ridge_lambda, qk_scale=None):
    """Ends the process below Python (no os._exit to intercept): only a child process survives it."""
    import ctypes

    ctypes.CDLL(None)._exit(0)


def hang(q, k, v, *, ridge_lambda, qk_scale=None):
    while True:
        time.sleep(0.01)


def returns_list(q, k, v, *, ridge_lambda, qk_scale=None):
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale).tolist()


def returns_none(q, k, v, *, ridge_lambda, qk_scale=None):
    return None


def returns_tuple(q, k, v, *, ridge_lambda, qk_scale=None):
    o = honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
    return (o, o)


def wrong_shape(q, k, v, *, ridge_lambda, qk_scale=None):
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)[..., :-1]


def int64_output(q, k, v, *, ridge_lambda, qk_scale=None):
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale).round().to(torch.int64)


def wrong_device(q, k, v, *, ridge_lambda, qk_scale=None):
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale).to("meta")


class Lazy(torch.Tensor):
    """A tensor subclass: the kind of object that defers work into whoever reads it."""


def subclass_output(q, k, v, *, ridge_lambda, qk_scale=None):
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale).as_subclass(Lazy)


def empty_output(q, k, v, *, ridge_lambda, qk_scale=None):
    return torch.empty_like(q)


_BY_POINTER: dict = {}
COMPUTED: list = []


def pointer_cache(q, k, v, *, ridge_lambda, qk_scale=None):
    """Replays the result of an earlier call whose q sat at the same address."""
    key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
    if key not in _BY_POINTER:
        COMPUTED.append(key)
        _BY_POINTER[key] = honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
    return _BY_POINTER[key]


def interrupt_parent(q, k, v, *, ridge_lambda, qk_scale=None):
    """A genuine Ctrl-C arriving while this cell runs: SIGINT to the process that runs the sweep."""
    import multiprocessing

    target = os.getppid() if multiprocessing.parent_process() is not None else os.getpid()
    os.kill(target, signal.SIGINT)
    time.sleep(5)
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def fake_clock(q, k, v, *, ridge_lambda, qk_scale=None):
    """Computes honestly, slowly, and freezes time.perf_counter so that it looks instant."""
    frozen = time.perf_counter()
    time.perf_counter = lambda: frozen
    time.sleep(0.2)
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def empty_float64_output(q, k, v, *, ridge_lambda, qk_scale=None):
    """torch.empty in float64, the oracle's dtype: the block a freed float64 reference left."""
    return torch.empty(v.shape, dtype=torch.float64, device=v.device)


def _kill_worker_and_self():
    """SIGKILL to the process that started this cell's child (on Dask: the worker running
    the cell), then to this one: to the scheduler, a worker lost to an out-of-memory kill or
    a dead node. Only for runs on Dask: in the one-process audit the parent is the audit."""
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def dask_mixed(q, k, v, *, ridge_lambda, qk_scale=None):
    """One planted behaviour per cell, chosen by its shape (tests/test_audit_dask.py):
    S = 40 in float32 kills its Dask worker every time; S = 48 kills it the first time only
    (a marker file in $LLA_PLANTED_MARKERS), then is honest; S = 40 in bfloat16 calls
    os._exit; any other cell is honest."""
    S = q.shape[-2]
    if S == 40 and q.dtype == torch.float32:
        _kill_worker_and_self()
    if S == 48:
        try:
            fd = os.open(os.path.join(os.environ["LLA_PLANTED_MARKERS"], "killed-S48"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            _kill_worker_and_self()
    if S == 40 and q.dtype == torch.bfloat16:
        os._exit(0)
    return honest(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


class _NanLastValueGrad(torch.autograd.Function):
    """Identity on v; its backward makes the last value's gradient NaN (the public kernel's
    dk and dv past the last full row tile, docs/findings/flashlla.md #7)."""

    @staticmethod
    def forward(ctx, v):
        return v.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[..., -1, :] = float("nan")
        return g


def dv_nan_last_value(q, k, v, *, ridge_lambda, qk_scale=None):
    """The right forward; dv of the last value NaN."""
    return dense_torch_lla(q, k, _NanLastValueGrad.apply(v), ridge_lambda=ridge_lambda, qk_scale=qk_scale)
