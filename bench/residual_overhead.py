"""Residual perturbation's training cost against plain SGD on the same ResNet, side by side.

Per-epoch time of ``sgd`` and ``residual`` (each strategy) on ``resnet8``, the 2,500 member
examples of mnist5k, same batch size and threads; interleaved rounds, medians. Writes
bench/results/residual_overhead.json. Not a test.

    python bench/residual_overhead.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import interleaved_medians

from audit.data import load_dataset
from mechanisms import TrainConfig
from mechanisms.models import build_model
from mechanisms.residual import ResidualConfig, install_noise
from mechanisms.sgd import sgd_epoch
from mechanisms.training import make_optimizer, make_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "residual_overhead.json"))
    args = ap.parse_args()
    data = load_dataset("mnist5k")
    x, y = data.x[:2500], data.y[:2500]
    runners = {}
    for name, strategy in (
        ("sgd", None),
        ("residual 1", "1"),
        ("residual 2", "2"),
        ("residual branch", "branch"),
    ):
        model = build_model("resnet8", data.input_shape, 10, seed=0)
        config = (
            TrainConfig(batch_size=args.batch_size)
            if strategy is None
            else ResidualConfig(batch_size=args.batch_size, strategy=strategy, gamma=0.1)
        )
        if strategy is not None:
            install_noise(model, config, seed=0)
        opt = make_optimizer(model, config)
        sched = make_scheduler(opt, config, 10**6)
        gen = torch.Generator().manual_seed(0)
        runners[name] = lambda m=model, o=opt, s=sched, g=gen: sgd_epoch(
            m, o, s, x, y, batch_size=args.batch_size, generator=g
        )
    med, times = interleaved_medians(runners, args.rounds)
    print(
        f"per-epoch time, resnet8 on 2,500 mnist5k examples, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    for k, v in med.items():
        print(f"  {k:16s} {v:7.2f} s   {v / med['sgd']:5.2f}x sgd")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "seconds_per_epoch": med,
                "ratio": {k: v / med["sgd"] for k, v in med.items()},
                "all_seconds": times,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
