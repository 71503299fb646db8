"""The audit on Dask (``lla-verify audit --dask [ADDRESS]``): each cell one task.

A task is a function of the cell, the implementation's name, the device and the
options; it runs the cell exactly as the one-process audit does, in a trust.Worker
child process with its call timeouts (docs/trust.md), so an implementation that
exits, crashes or hangs fails its cell and leaves the Dask worker standing. The
records stream back to the driver as they complete and the driver writes the one
report, in plan order. A Dask worker that dies (killed, out of memory, a lost node)
has its cell retried on another worker once; a cell whose task fails twice is a
failed cell whose message says why, never a hang.

dask and distributed are an optional extra (``pip install 'lla-verify[dask]'``);
every import of them is inside a function, so the rest of lla-verify runs without.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import uuid

from lla_verify.cliutil import UsageError

INSTALL_HINT = "pip install 'lla-verify[dask]'"
# A task whose worker died is rescheduled while its deaths number at most this: one retry
# elsewhere, then the cell fails (distributed.KilledWorker). It is the embedded cluster's
# scheduler setting; a running scheduler keeps its own (distributed.scheduler.allowed-failures).
ALLOWED_FAILURES = 1
TASK_RETRIES = 1  # a task that raised (on the worker, outside the implementation) runs once more
WORKER_START_TIMEOUT = 300.0  # seconds for the embedded cluster's workers to start (torch imports)
CONNECT_TIMEOUT = 30.0  # seconds to reach a running scheduler


# Fields of a report that describe the run, not the verdicts: they differ between a Dask run
# and the one-process run of the same plan, and comparable() leaves them out.
RUN_CELL_FIELDS = frozenset({"time_s", "dask"})
RUN_META_FIELDS = frozenset({"date", "wall_s", "command", "dask"})


def comparable(report: dict) -> dict:
    """``report`` (a report.json's content) without the run's own fields: what a Dask run and
    the one-process run of the same plan must agree on, cell for cell."""
    out = dict(report, meta={k: v for k, v in report["meta"].items() if k not in RUN_META_FIELDS})
    out["cells"] = [{k: v for k, v in c.items() if k not in RUN_CELL_FIELDS} for c in report["cells"]]
    return out


def require() -> None:
    """UsageError naming the missing package unless dask and distributed import."""
    for name in ("dask", "distributed"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"--dask: needs the package {name!r}, which is not installed here ({exc}); "
                             f"install it with: {INSTALL_HINT}") from None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_envs(device: str, n_workers: int | None = None, *, cpus: int | None = None,
                gpus: list[str] | None = None) -> list[dict[str, str]]:
    """The environment of each worker of the embedded cluster, one dict per worker.

    On cuda: one worker per visible GPU (``n_workers`` of them round-robin when given),
    each with CUDA_VISIBLE_DEVICES narrowed to its GPU, so that its ``cuda`` is that GPU
    (no dask-cuda needed: the variable is set in the worker process before torch is
    imported there). On cpu: ``n_workers`` (default one per CPU). Each worker's share of
    the CPUs becomes the intra-op threads of the cells it runs.
    """
    from lla_verify.testing.gpu_pinning import threads_per_worker, visible_devices

    cpus = cpus or _cpus()
    if device.startswith("cuda"):
        if device != "cuda":
            raise UsageError(f"--dask: --device {device}: each worker gets its own GPU as 'cuda'; choose the GPUs "
                             f"with CUDA_VISIBLE_DEVICES and pass --device cuda")
        gpus = visible_devices() if gpus is None else gpus
        if not gpus:
            raise UsageError("--dask: --device cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L)")
        n = n_workers or len(gpus)
        envs = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    else:
        envs = [{} for _ in range(n_workers or cpus)]
    threads = str(threads_per_worker(cpus, len(envs)))
    for env in envs:
        # read by torch when the cell's child process imports it (distributed's default is 1)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    return envs


@contextlib.contextmanager
def session(address: str | None, device: str, n_workers: int | None = None):
    """A distributed.Client and a description of its cluster for the report's meta:
    connected to the scheduler at ``address`` (or named by a scheduler file), or to an
    embedded LocalCluster started here and closed on exit."""
    require()
    import logging

    from distributed import Client, LocalCluster

    if address:
        kw = {"scheduler_file": address} if address.endswith(".json") else {"address": address}
        try:
            client = Client(timeout=CONNECT_TIMEOUT, **kw)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--dask: cannot reach the scheduler {address!r}: {type(exc).__name__}: {exc}") from None
        try:
            n = len(client.scheduler_info().get("workers", {}))
            yield client, {"scheduler": client.scheduler.address, "embedded": False, "workers_at_start": n}
        finally:
            client.close()
        return
    import dask

    envs = worker_envs(device, n_workers)
    # the cells' own child processes need workers that may have children; read again at each
    # worker restart, so it stays set for the cluster's life
    stack = contextlib.ExitStack()
    stack.enter_context(dask.config.set({"distributed.worker.daemon": False}))
    # a worker is sent only the cell it runs (none queued behind it): a worker that dies then
    # charges that one cell's retry budget, not a bystander's
    stack.enter_context(dask.config.set({"distributed.scheduler.worker-saturation": 1.0}))
    cluster = LocalCluster(n_workers=0, processes=True, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR,
                           scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES})
    client = None
    try:
        spec = cluster.new_spec
        for i, env in enumerate(envs):
            cluster.worker_spec[i] = {"cls": spec["cls"], "options": dict(spec["options"], env=env)}
        cluster.scale(len(envs))
        client = Client(cluster)
        client.wait_for_workers(len(envs), timeout=WORKER_START_TIMEOUT)
        yield client, {"scheduler": cluster.scheduler_address, "embedded": True, "workers_at_start": len(envs),
                       "worker_env": envs}
    finally:
        if client is not None:
            client.close()
        cluster.close()
        stack.close()


# ------------------------------------------------------------------ on the worker
_STATE = threading.local()  # per worker thread: its trust.Worker and resolved implementations


def _trust_worker(cell_timeout: float):
    """This thread's child process, kept across cells (a torch import per cell would cost seconds)."""
    from lla_verify.trust import Worker

    w = getattr(_STATE, "worker", None)
    if w is None or w.call_limit != cell_timeout:
        if w is not None:
            w.close()
        w = _STATE.worker = Worker(cell_timeout)
    return w


def _impl(ref, device: str):
    """The implementation: ``ref`` itself, or resolved by name here, as the CLI resolves it
    (a name is LLA's; an (operator, name) pair another operator's, registry/operators.py)."""
    if not isinstance(ref, (str, tuple)):
        return ref
    cache = _STATE.__dict__.setdefault("impls", {})
    if (ref, device) not in cache:
        from lla_verify.commands.audit import resolve_impl, resolve_op_impl

        cache[(ref, device)] = resolve_impl(ref, device) if isinstance(ref, str) else \
            resolve_op_impl(ref[0], ref[1], device)
    return cache[(ref, device)]


def _where(device: str) -> dict:
    import socket

    from distributed import get_worker

    w = get_worker()
    where = {"worker": str(w.name), "address": w.address, "host": socket.gethostname()}
    if device.startswith("cuda"):
        where["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return where


DAEMON_HINT = ("start the workers with distributed.worker.daemon set to False (environment: "
               "DASK_DISTRIBUTED__WORKER__DAEMON=False)")


def worker_problem() -> str | None:
    """Why this Dask worker cannot run cells, or None: a daemonic process may not start
    the child process a cell runs in."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return f"the Dask worker is a daemonic process, which may not start a cell's child process: {DAEMON_HINT}"
    return None


def check_workers(client) -> None:
    """UsageError naming the first worker that cannot run cells (workers joining later
    are checked by each task)."""
    for addr, why in sorted(client.run(worker_problem).items()):
        if why:
            raise UsageError(f"--dask: worker {addr}: {why}")


def run_cell_task(cell, impl_ref, device: str, backward: bool, impl_name: str | None, cell_timeout: float) -> dict:
    """One cell on a Dask worker, as the one-process audit runs it; its record, plus
    ``dask`` (which worker ran it)."""
    from lla_verify.audit.cell import run_cell_isolated
    from lla_verify.trust import picklable

    why = worker_problem()
    if why:
        raise RuntimeError(why)
    impl = _impl(impl_ref, device)
    worker = _trust_worker(cell_timeout) if picklable(impl, cell) else None
    rec = run_cell_isolated(worker, cell, impl, device, backward=backward, impl_name=impl_name)
    rec["dask"] = _where(device)
    return rec


# ------------------------------------------------------------------ on the driver
def _outcome(future, cell, impl, device: str, *, backward: bool, impl_name: str | None) -> dict:
    """The record a finished future carries, or a failed cell saying why it has none."""
    from lla_verify.audit.cell import _cell_record, failed_record

    if future.status == "finished":
        return future.result()
    rec = _cell_record(cell, impl, device, backward=backward, impl_name=impl_name)
    name = impl_name or impl.name
    if future.status == "error":
        exc = future.exception()
        if type(exc).__name__ == "KilledWorker":
            why = (f"the Dask worker running the cell died, and again on each retry (KilledWorker: {exc}): the "
                   f"implementation ended or exhausted its worker process, or the machine lost it")
        else:
            why = f"the cell's task raised on its Dask worker, and again on its retry: {type(exc).__name__}: {exc}"
    else:
        why = f"the scheduler reports the cell's task as {future.status}"
    return failed_record(rec, f"[{name}] {why} on {rec['spec']}")


def _threads(client) -> int:
    """Worker threads in the cluster now (at least 1: a scheduler still waiting for its
    workers gets one cell, and more as they join)."""
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001  the count only paces submission; the tasks' own errors are reported
        return 1


def sweep(client, cells, impl, device: str, *, backward: bool, impl_name: str | None, cell_timeout: float,
          done: dict, on_record, impl_ref=None) -> None:
    """Each of ``cells`` as a task on ``client``'s cluster; ``done[position] = record``
    and ``on_record(record)`` as each completes. Interrupted, it cancels the rest.

    At most one cell per worker thread is in flight: the scheduler charges a worker's
    death to every task it holds, queued or running, so a cell queued behind one that
    kills its worker would lose a retry it did not cause. (While a dead worker restarts,
    the survivors may still hold two; docs/audit.md.)"""
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    # one implementation per operator: dicts keyed by operator, or LLA's plain values
    impls = impl if isinstance(impl, dict) else {"lla": impl}
    names = impl_name if isinstance(impl_name, dict) else {op: impl_name for op in impls}

    def ref_of(op):
        if impl_ref is None:
            return impls[op]
        r = impl_ref[op] if isinstance(impl_ref, dict) else impl_ref
        return r if op == "lla" else (op, r)

    futures = {}
    todo = iter(enumerate(cells))
    running = as_completed()

    def submit(n: int) -> None:
        for _ in range(n):
            nxt = next(todo, None)
            if nxt is None:
                return
            pos, cell = nxt
            op = getattr(cell, "op", "lla")
            f = client.submit(run_cell_task, cell, ref_of(op), device, backward, names.get(op), cell_timeout,
                              key=f"lla-audit-{token}-cell-{pos}", retries=TASK_RETRIES)
            futures[f] = pos
            running.add(f)

    submit(_threads(client))
    try:
        for f in running:
            pos = futures[f]
            op = getattr(cells[pos], "op", "lla")
            rec = _outcome(f, cells[pos], impls[op], device, backward=backward, impl_name=names.get(op))
            done[pos] = rec
            on_record(rec)
            submit(_threads(client) - running.count())
    finally:
        left = [f for f in futures if not f.done()]
        if left:
            client.cancel(left)
