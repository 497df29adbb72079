"""Never above: a correct DP-SGD's valid canary bounds stay below its accountant's epsilon.

The quick preset's DP-SGD recipes at epsilon 1 and 8 (mnist5k members, cnn; the calibrated
noise multiplier fixed), trained with 100,000 gradient canaries for several seeds (training and
canary streams both change with the seed). Counts, over every seed and threat model, the valid
bounds above the accountant's epsilon at their own 95% confidence and at the gate's confidence
(1% false alarms per run, Bonferroni over the run's valid bounds). Prints one row per run.

    python bench/canary_validity.py [--seeds 10] [--canaries 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import mnist5k_members

from attacks.bounds import recompute_epsilon
from audit.canary import canary_audits
from audit.gate import FALSE_ALARM_RATE
from mechanisms import build_model
from mechanisms.accounting import dpsgd_event, epsilon
from mechanisms.canaries import GradientCanaries
from mechanisms.dpsgd import DpSgdConfig, plan_dpsgd, train_dpsgd

# target epsilon -> options of the quick preset's DP-SGD targets
RECIPES = {
    1.0: dict(epochs=8, batch_size=512, lr=1.0, momentum=0.5),
    8.0: dict(epochs=20, batch_size=256, lr=0.2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--canaries", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "canary_validity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, shape = mnist5k_members()
    rows, above_95, above_gate, total = [], 0, 0, 0
    for eps_target, options in RECIPES.items():
        plan = plan_dpsgd(DpSgdConfig(**options, epsilon=eps_target), len(y))
        config = DpSgdConfig(**options, noise_multiplier=plan.noise_multiplier)
        eps = epsilon(
            dpsgd_event(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps
            ),
            delta=1e-5,
        )
        for seed in range(args.seeds):
            canaries = GradientCanaries(args.canaries, seed=1000 + seed)
            model = build_model("cnn", shape, 10, seed=seed)
            train_dpsgd(
                model, x, y, config=config, generator=torch.Generator().manual_seed(seed), canaries=canaries
            )
            audits = canary_audits(
                canaries.result(),
                threat_models=("white-box-steps", "white-box-final"),
                delta=1e-5,
                confidence=0.95,
                accountant_epsilon=eps,
                formal=True,
            )
            valid = [(a["threat_model"], b) for a in audits for b in a["bounds"] if b["valid"]]
            confidence = 1 - FALSE_ALARM_RATE / len(valid)
            for threat_model, b in valid:
                at_gate = recompute_epsilon(b, confidence)
                total += 1
                above_95 += b["epsilon_lb"] > eps
                above_gate += at_gate > eps
                rows.append(
                    {
                        "epsilon": eps,
                        "seed": seed,
                        "threat_model": threat_model,
                        "method": b["method"],
                        "epsilon_lb": b["epsilon_lb"],
                        "epsilon_lb_at_gate": at_gate,
                    }
                )
            best = max(b["epsilon_lb"] for _, b in valid)
            print(f"epsilon {eps:.3f} seed {seed}: strongest valid bound {best:.3f}", flush=True)
    print(
        f"{total} valid bounds: {above_95} above the accountant's epsilon at 95%, {above_gate} at the gate's confidence"
    )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/canary_validity.py " + " ".join(sys.argv[1:]),
        "canaries": args.canaries,
        "seeds": args.seeds,
        "valid_bounds": total,
        "above_at_95": above_95,
        "above_at_gate": above_gate,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
