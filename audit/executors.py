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


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    """Worker processes, each with ``threads`` torch threads.

    Workers fork from a "forkserver" that has already imported torch and the project: they
    start in milliseconds instead of seconds, and inherit no threads or locks from the caller.
    """

    def __init__(self, workers: int, threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, threads

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not jobs:
            return
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mechanisms", "attacks", "audit.references", "audit.train"])
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
