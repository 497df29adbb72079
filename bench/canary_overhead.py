"""What a white-box canary audit adds to a DP-SGD training run (AUDITING.md).

The quick preset's DP-SGD recipe at epsilon 8 (mnist5k members, cnn, lot 256, lr 0.2, the
calibrated noise multiplier fixed so calibration is not timed), trained whole, with and without
gradient canaries riding along, in interleaved rounds; then the bounds of both white-box threat
models computed from the canaries' record. Prints seconds and ratios; timings never go in tests.

    python bench/canary_overhead.py [--canaries 100000] [--epochs 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import interleaved_times, mnist5k_members

from audit.canary import canary_audits
from mechanisms import build_model
from mechanisms.canaries import GradientCanaries
from mechanisms.dpsgd import DpSgdConfig, train_dpsgd

# The quick preset's dpsgd-eps8 target calibrates to this noise multiplier (20 epochs, q 0.1024).
SIGMA_EPS8 = 1.146972


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "canary_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, shape = mnist5k_members()
    config = DpSgdConfig(epochs=args.epochs, batch_size=256, lr=0.2, noise_multiplier=SIGMA_EPS8)
    records = []

    def train(with_canaries: bool) -> None:
        canaries = GradientCanaries(args.canaries, seed=len(records)) if with_canaries else None
        model = build_model("cnn", shape, 10, seed=0)
        extra = {"canaries": canaries} if canaries is not None else {}
        train_dpsgd(model, x, y, config=config, generator=torch.Generator().manual_seed(0), **extra)
        if canaries is not None:
            records.append(canaries.result())

    times = interleaved_times(
        {"dpsgd": lambda: train(False), "dpsgd + canaries": lambda: train(True)}, 1 + args.rounds
    )
    times = {k: v[1:] for k, v in times.items()}  # the first round warms up (imports, allocator)
    audit_seconds = []
    for record in records[1:]:
        start = time.perf_counter()
        audits = canary_audits(
            record,
            threat_models=("white-box-steps", "white-box-final"),
            delta=1e-5,
            confidence=0.95,
            accountant_epsilon=8.0,
            formal=True,
        )
        audit_seconds.append(time.perf_counter() - start)
    base = statistics.median(times["dpsgd"])
    ride = statistics.median(times["dpsgd + canaries"])
    paired = statistics.median(a / b for a, b in zip(times["dpsgd + canaries"], times["dpsgd"], strict=True))
    bounds = statistics.median(audit_seconds)
    rows = [
        ("DP-SGD training", base, 1.0),
        (f"DP-SGD training + {args.canaries:,} canaries", ride, ride / base),
        ("  paired ratio (median of rounds)", None, paired),
        ("bounds, both threat models", bounds, bounds / base),
        ("training + canaries + bounds", ride + bounds, (ride + bounds) / base),
    ]
    print(f"{'':46s} {'seconds':>8s} {'x DP-SGD':>9s}")
    for name, sec, ratio in rows:
        print(f"{name:46s} {'' if sec is None else f'{sec:8.2f}':>8s} {ratio:9.3f}")
    best = {a["threat_model"]: a["strongest_valid"] for a in audits}
    print("last audit's strongest valid bounds:", {k: round(v["epsilon_lb"], 3) for k, v in best.items()})
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/canary_overhead.py " + " ".join(sys.argv[1:]),
        "canaries": args.canaries,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": args.threads,
        "seconds": times,
        "audit_seconds": audit_seconds,
        "median_training": base,
        "median_training_with_canaries": ride,
        "ratio": ride / base,
        "paired_ratio": paired,
        "ratio_with_bounds": (ride + bounds) / base,
        "strongest_valid": best,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
