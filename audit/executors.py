"""Executors run independent jobs (e.g. reference-model training) and yield their results.

The interface is one method, ``map(fn, jobs)``, yielding ``(index, result)`` as jobs finish,
so a distributed engine can plug in behind it. ``LocalExecutor`` runs jobs in worker processes
with one torch thread each: on a CPU, small models train faster one per core than two threads
on one model. A job's exception is re-raised in the caller with the job's index, and a worker
that dies surfaces as an error, never a hang.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

__all__ = ["Executor", "JobError", "LocalExecutor", "SerialExecutor", "make_executor"]


class JobError(RuntimeError):
    """A job failed; the message names the job and its error."""


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class SerialExecutor:
    """Runs jobs one after another in this process (torch's thread settings untouched)."""

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
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

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not jobs:
            return
        ctx = mp.get_context("forkserver")
        _start_forkserver(["torch", "mechanisms", "attacks", "audit.references", "audit.train"])
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


def make_executor(workers: int | None) -> Executor:
    """``workers`` = None: one per core; 1: in this process; more: a LocalExecutor."""
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    return SerialExecutor() if n == 1 else LocalExecutor(n)
