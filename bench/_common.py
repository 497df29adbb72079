"""Shared pieces of the timing benchmarks (run as ``python bench/NAME.py``; not a test)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from audit.data import load_dataset
from mechanisms import TrainConfig
from mechanisms.dpsgd import DpSgdConfig, DpSgdPlan
from mechanisms.models import MaxPool2d, build_model
from mechanisms.training import make_optimizer, make_scheduler

__all__ = [
    "bench_cnn",
    "dp_parser",
    "dp_setting",
    "dp_start",
    "fresh_cnn",
    "interleaved_medians",
    "interleaved_times",
    "mnist5k_members",
    "sgd_recipe",
]


def mnist5k_members() -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The member half of mnist5k (2,500 examples, seed 0) and the input shape."""
    data = load_dataset("mnist5k")
    keep = np.zeros(data.population, dtype=bool)
    keep[np.random.default_rng(0).permutation(data.population)[: data.population // 2]] = True
    mask = torch.from_numpy(keep)
    return data.x[mask], data.y[mask], tuple(data.input_shape)


def dp_setting(batch_size: int, sigma: float = 1.0, clip: float = 1.0):
    """The DP-SGD benches' setting: (x, y, shape, config, plan) for the mnist5k members, an
    expected batch of ``batch_size`` and round(n / batch_size) lots per epoch."""
    x, y, shape = mnist5k_members()
    n, b = len(y), batch_size
    config = DpSgdConfig(noise_multiplier=sigma, clip_norm=clip, batch_size=b, epochs=1, lr=0.05)
    return x, y, shape, config, DpSgdPlan(b / n, round(n / b), sigma, float(b))


def dp_parser(doc: str) -> argparse.ArgumentParser:
    """A DP-SGD bench's parser (described by ``doc``'s first line) with ``--batch-size`` and
    ``--threads``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def dp_start(args: argparse.Namespace, sigma: float = 1.0, clip: float = 1.0):
    """Set torch's thread count from ``args.threads``; :func:`dp_setting` for
    ``args.batch_size``."""
    torch.set_num_threads(args.threads)
    return dp_setting(args.batch_size, sigma, clip)


def bench_cnn(shape: tuple[int, ...], *, stock_pooling: bool = False) -> nn.Module:
    """The seed-0 ``cnn``. With ``stock_pooling`` its pooling layers are torch's own
    ``nn.MaxPool2d`` on NCHW memory (same parameters, same values), as the cnn of the DP-SGD
    literature runs in stock PyTorch, instead of our channels-last ``MaxPool2d``
    (mechanisms/models.py), which makes every epoch of the cnn faster."""
    model = build_model("cnn", shape, 10, seed=0)
    if stock_pooling:
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, MaxPool2d):
                    stock = nn.MaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation)
                    setattr(parent, name, stock)
    return model


def fresh_cnn(shape: tuple[int, ...], config: TrainConfig, *, stock_pooling: bool = False):
    """A seed-0 ``cnn`` (:func:`bench_cnn`) with its optimizer and a schedule that never ends:
    (model, opt, sched)."""
    model = bench_cnn(shape, stock_pooling=stock_pooling)
    opt = make_optimizer(model, config)
    return model, opt, make_scheduler(opt, config, 10**6)


def interleaved_times(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of ``rounds`` rounds that call every runner in turn (machine noise hits them
    alike)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds per call of every runner: ``warmup`` untimed rounds, then ``rounds`` timed
    rounds (:func:`interleaved_times`); medians and all timed seconds."""
    interleaved_times(runners, warmup)
    times = interleaved_times(runners, rounds)
    return {k: statistics.median(v) for k, v in times.items()}, times


def sgd_recipe(data, **hyper):
    """A reference recipe: the cnn trained with sgd on mnist5k (``data``), TrainConfig's
    defaults with ``hyper`` on top, two queries, seed 0."""
    from audit.data import DataOptions
    from audit.references import Recipe

    options = {**TrainConfig().__dict__, **hyper}
    options.pop("progress")
    return Recipe(
        dataset="mnist5k",
        data_options=DataOptions().to_json(),
        data_sha256=data.sha256,
        model="cnn",
        mechanism="sgd",
        hyperparameters=options,
        queries=2,
        stochastic=False,
        seed=0,
    )
