"""Executors run independent jobs (e.g. reference-model training) and yield their results.

The interface is one method, ``map(fn, jobs, shared=None)``, yielding ``(index, result)`` as
jobs finish. ``shared`` is one large read-only object every job needs (the dataset's arrays):
an engine without a shared file system ships it once per machine (Ray's object store), a local
one may ignore it (its workers load the data themselves). Jobs and results are small and
picklable; the caller writes results to disk, so workers need no shared file system.

``LocalExecutor`` runs jobs in worker processes with one torch thread each: on a CPU, small
models train faster one per core than two threads on one model. ``RayExecutor`` runs them as
Ray tasks, on a local instance it starts or on a cluster it joins. A job's exception is
re-raised in the caller with the job's index, and a worker that dies surfaces as an error
(after Ray's bounded retries), never a hang.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Executor",
    "ExecutorSettings",
    "JobError",
    "LocalExecutor",
    "RayExecutor",
    "SerialExecutor",
    "make_executor",
]


class JobError(RuntimeError):
    """A job failed; the message names the job and its error."""


class Executor(Protocol):
    def map(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], shared: Any = None
    ) -> Iterator[tuple[int, Any]]: ...


@dataclass(frozen=True)
class ExecutorSettings:
    """How jobs run (never what they compute: results are the same whichever runs them).

    ``kind``: ``local`` (worker processes on this machine) or ``ray``; ``address``: a Ray
    cluster to join (None: start a local instance); ``cpus_per_job`` (also the torch threads of
    a job) and ``gpus_per_job`` (a fraction shares a GPU between jobs) are Ray resources;
    ``retries``: how often Ray reruns a job whose worker died (an exception is not retried: the
    same seed fails the same way).
    """

    kind: str = "local"
    address: str | None = None
    cpus_per_job: int = 1
    gpus_per_job: float = 0.0
    retries: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.kind!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ValueError(f"executor address must be a non-empty string, got {self.address!r}")
        if self.address is not None and self.kind != "ray":
            raise ValueError("an executor address needs the ray executor (--executor ray)")
        if (
            isinstance(self.cpus_per_job, bool)
            or not isinstance(self.cpus_per_job, int)
            or self.cpus_per_job < 1
        ):
            raise ValueError(f"cpus_per_job must be an integer >= 1, got {self.cpus_per_job!r}")
        g = self.gpus_per_job
        if isinstance(g, bool) or not isinstance(g, int | float) or not (0 <= g <= 64):
            raise ValueError(f"gpus_per_job must be a number in [0, 64], got {g!r}")
        if (
            isinstance(self.retries, bool)
            or not isinstance(self.retries, int)
            or not (0 <= self.retries <= 100)
        ):
            raise ValueError(f"retries must be an integer in [0, 100], got {self.retries!r}")


class SerialExecutor:
    """Runs jobs one after another in this process (torch's thread settings untouched)."""

    def map(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], shared: Any = None
    ) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            try:
                yield i, fn(job)
            except Exception as err:
                raise JobError(f"job {i} failed: {type(err).__name__}: {err}") from err


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    A worker's parent is the forkserver, which exits when the main process does (killed or
    not), so a killed run leaves no worker training on and holding the caller's pipes. If the
    parent is already gone (it died before this call), exit now. Elsewhere: nothing to do.
    """
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return
    if os.getppid() != parent or parent == 1:
        os._exit(1)


# While the forkserver starts, the main process's pid is in the environment: the forkserver
# preloads this module, and on import asks to die with that parent. (Its workers die with it,
# see _init_worker.) CPython's forkserver otherwise outlives a killed main process.
_MAIN_PID = "MIA_AUDIT_FORKSERVER_MAIN"


def _guard_forkserver() -> None:
    main = os.environ.get(_MAIN_PID, "")
    if main.isdigit() and os.getppid() == int(main):
        _die_with_parent()


_guard_forkserver()


def _start_forkserver(preload: list[str]) -> None:
    """Start the shared forkserver (once per process) with ``preload`` and the guard above."""
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(["audit.executors", *preload])
    previous = os.environ.get(_MAIN_PID)
    os.environ[_MAIN_PID] = str(os.getpid())
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            os.environ.pop(_MAIN_PID, None)
        else:
            os.environ[_MAIN_PID] = previous


def _init_worker(threads: int) -> None:
    import torch

    _die_with_parent()
    torch.set_num_threads(threads)


class LocalExecutor:
    """Worker processes, each with ``threads`` torch threads.

    Workers fork from a "forkserver" that has already imported torch and the project: they
    start in milliseconds instead of seconds, and inherit no threads or locks from the caller.
    On Linux the forkserver dies with the main process and every worker with the forkserver,
    however the main process ends (SIGKILL included).
    """

    def __init__(self, workers: int, threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, threads

    def map(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], shared: Any = None
    ) -> Iterator[tuple[int, Any]]:
        if not jobs:
            return
        ctx = mp.get_context("forkserver")
        # torch._dynamo: what the first optimizer of a process imports (1.6 s), once, not per job
        _start_forkserver(
            ["torch", "torch._dynamo", "mechanisms", "attacks", "audit.references", "audit.train"]
        )
        with cf.ProcessPoolExecutor(
            max_workers=min(self.workers, len(jobs)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.threads,),
        ) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            try:
                for future in cf.as_completed(futures):
                    i = futures[future]
                    try:
                        yield i, future.result()
                    except cf.process.BrokenProcessPool as err:
                        raise JobError(
                            f"a worker process died while running job {i} (out of memory?)"
                        ) from err
                    except Exception as err:
                        raise JobError(f"job {i} failed: {type(err).__name__}: {err}") from err
            finally:
                for f in futures:
                    f.cancel()


def _ray_job(fn: Callable[[Any], Any], job: Any, shared: Any, threads: int) -> Any:
    """A job as a Ray task: the same torch thread count as a local worker, ``shared`` installed
    (checked) before the job runs."""
    import torch

    torch.set_num_threads(threads)
    if shared is not None:
        from .data import install_shared

        install_shared(shared)
    return fn(job)


class RayExecutor:
    """Jobs as Ray tasks, on the cluster at ``address`` or on a local instance started on first
    use (kept for this process, shut down at exit).

    A task whose worker process dies (killed, out of memory, node lost) is rerun up to
    ``retries`` times by Ray; a job that raises stops the run with its error. ``shared`` goes
    to the object store once and reaches each machine once. Pending tasks are cancelled when
    the caller stops iterating (an error, Ctrl-C); results already yielded are the caller's.
    """

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self.settings = settings or ExecutorSettings(kind="ray")

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as err:
            raise ValueError(
                "the ray executor needs Ray: pip install 'mia-audit[ray]' (or pip install ray)"
            ) from err
        if not ray.is_initialized():
            import logging

            try:
                ray.init(
                    address=self.settings.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except ConnectionError as err:
                raise ValueError(f"cannot join the Ray cluster at {self.settings.address!r}: {err}") from err
            import atexit

            atexit.register(ray.shutdown)
        return ray

    def map(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], shared: Any = None
    ) -> Iterator[tuple[int, Any]]:
        """Submit every job now (not on first iteration), then yield results as they finish."""
        if not jobs:
            return iter(())
        ray = self._ray()
        s = self.settings
        task = ray.remote(
            num_cpus=s.cpus_per_job, num_gpus=s.gpus_per_job, max_retries=s.retries, retry_exceptions=False
        )(_ray_job)
        shared_ref = ray.put(shared) if shared is not None else None
        refs = {task.remote(fn, job, shared_ref, s.cpus_per_job): i for i, job in enumerate(jobs)}
        return self._results(ray, refs)

    def _results(self, ray: Any, refs: dict[Any, int]) -> Iterator[tuple[int, Any]]:
        retries = self.settings.retries
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        cause = err.cause if err.cause is not None else err
                        raise JobError(f"job {i} failed: {type(cause).__name__}: {cause}") from None
                    except ray.exceptions.RayError as err:
                        raise JobError(
                            f"job {i}: its worker died {retries + 1} time(s) "
                            f"({type(err).__name__}); out of memory, or the node was lost?"
                        ) from None
                    yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def make_executor(workers: int | None, settings: ExecutorSettings | None = None) -> Executor:
    """The ray executor when ``settings`` asks for it; else ``workers`` = None: one per core;
    1: in this process; more: a LocalExecutor."""
    if settings is not None and settings.kind == "ray":
        return RayExecutor(settings)
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    return SerialExecutor() if n == 1 else LocalExecutor(n)
