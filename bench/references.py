"""Reference-model training throughput, and RMIA's cost at scale. Not a test.

1. Train M reference models with the same recipe two ways, side by side in one run:
   ``--workers 2`` (two worker processes, one torch thread each) against a sequential loop in
   this process with torch's default thread count.
2. RMIA scores (sort + binary search) at 50,000 x 50,000, against the naive n x z matrix at a
   size the naive one can hold: time and peak memory (tracemalloc) of each.

Writes ``bench/results/references.json``.

    python bench/references.py [--models 4] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from _common import sgd_recipe

from attacks.rmia import rmia_scores, rmia_scores_naive
from audit.data import load_dataset
from audit.executors import LocalExecutor, SerialExecutor
from audit.references import ensure_references


def _references(models: int, epochs: int) -> dict:
    data = load_dataset("mnist5k")
    recipe = sgd_recipe(data, epochs=epochs)
    timings = {}
    for name, executor in (
        ("2 workers x 1 thread", LocalExecutor(2, threads=1)),
        (f"sequential, {torch.get_num_threads()} threads", SerialExecutor()),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ensure_references(tmp, recipe, models, data.population, executor=executor)
            timings[name] = time.perf_counter() - start
    names = list(timings)
    return {
        "models": models,
        "epochs": epochs,
        "seconds": timings,
        "speedup": timings[names[1]] / timings[names[0]],
    }


def _measure(fn, *args):
    tracemalloc.start()
    start = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def _rmia(n_big: int, n_naive: int) -> dict:
    rng = np.random.default_rng(0)
    big = rng.lognormal(size=n_big)
    small = rng.lognormal(size=n_naive)
    t_sort, m_sort = _measure(rmia_scores, big, big, 2.0)
    t_small, m_small = _measure(rmia_scores, small, small, 2.0)
    t_naive, m_naive = _measure(rmia_scores_naive, small, small, 2.0)
    assert np.array_equal(rmia_scores(small, small, 2.0), rmia_scores_naive(small, small, 2.0))
    return {
        f"sorted {n_big}x{n_big}": {"seconds": t_sort, "peak_bytes": m_sort},
        f"sorted {n_naive}x{n_naive}": {"seconds": t_small, "peak_bytes": m_small},
        f"naive {n_naive}x{n_naive}": {"seconds": t_naive, "peak_bytes": m_naive},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "references.json"))
    args = ap.parse_args()
    refs = _references(args.models, args.epochs)
    print(f"{args.models} reference models (cnn, sgd, {args.epochs} epochs, mnist5k), one run, side by side:")
    for k, v in refs["seconds"].items():
        print(f"  {k:28s} {v:8.1f} s   {v / args.models:6.1f} s/model")
    print(f"  speed-up of the workers: {refs['speedup']:.2f}x")
    rmia = _rmia(50_000, 5_000)
    print("RMIA scores (time, peak traced memory):")
    for k, v in rmia.items():
        print(f"  {k:28s} {v['seconds']:8.3f} s   {v['peak_bytes'] / 2**20:8.1f} MiB")
    result = {
        "benchmark": "references",
        "references": refs,
        "rmia": rmia,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
