"""Executors side by side: reference models of the quick preset's ``sgd`` recipe trained
serially in this process, by local worker processes, by a local Ray instance, and by a
simulated two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: two raylets,
one CPU each). Every executor's logits are checked equal to the local workers'. Not a test.

Writes ``bench/results/executors.json``.

    python bench/executors.py [--models 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import sgd_recipe

from audit.data import load_dataset
from audit.executors import ExecutorSettings, LocalExecutor, RayExecutor, SerialExecutor
from audit.references import ensure_references


def _time(executor, data, models: int) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        recipe = sgd_recipe(data, epochs=15, batch_size=64, lr=0.05)  # the quick preset's sgd target
        _, logits = ensure_references(tmp, recipe, models, data.population, executor=executor, data=data)
        return time.perf_counter() - start, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-serial", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "executors.json"))
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    data = load_dataset("mnist5k")
    seconds: dict[str, float] = {}
    seconds[f"local processes ({args.workers} x 1 thread)"], reference = _time(
        LocalExecutor(args.workers), data, args.models
    )
    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    t, logits = _time(RayExecutor(ExecutorSettings(kind="ray")), data, args.models)
    seconds[f"local Ray instance ({args.workers} CPUs)"] = t
    same = {"local Ray": bool(np.array_equal(logits, reference))}
    ray.shutdown()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    t, logits = _time(RayExecutor(ExecutorSettings(kind="ray", address=cluster.address)), data, args.models)
    seconds[f"simulated Ray cluster ({nodes} nodes x 1 CPU)"] = t
    same["two-node Ray"] = bool(np.array_equal(logits, reference))
    ray.shutdown()
    cluster.shutdown()

    if not args.skip_serial:
        t, logits = _time(SerialExecutor(), data, args.models)
        seconds[f"serial, this process ({torch.get_num_threads()} threads)"] = t
        same["serial"] = bool(np.array_equal(logits, reference))

    base = next(iter(seconds.values()))
    print(
        f"{args.models} reference models (quick preset's sgd recipe: cnn, 15 epochs, mnist5k), side by side:"
    )
    for name, s in seconds.items():
        print(f"  {name:42s} {s:7.1f} s  {s / args.models:5.2f} s/model  {s / base:5.2f}x local processes")
    print(f"  starting the local Ray instance took {ray_start:.1f} s (not in the time above)")
    print(f"  logits equal to the local processes' (bit for bit): {same}")
    result = {
        "benchmark": "executors",
        "date": time.strftime("%Y-%m-%d"),
        "models": args.models,
        "seconds": seconds,
        "ratio_to_local_processes": {k: v / base for k, v in seconds.items()},
        "ray_start_seconds": ray_start,
        "identical_logits": same,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
