"""False-alarm rate of ``mia-audit gate``: reruns of an unchanged recipe with other seeds.

Runs a configuration (default: the smoke preset) with seed 0 as the baseline and with seeds
1..K as "new builds" of the same, unchanged model recipe; gates each against the baseline and
counts failures. Every failure is a false alarm. Not a test (minutes of training).

    python bench/gate_false_alarms.py [--seeds 4] [--preset smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from audit.config import load_config
from audit.gate import compare
from audit.pipeline import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate_false_alarms.json"))
    args = ap.parse_args()
    config = load_config(preset=args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run(dataclasses.replace(config, seed=s), Path(tmp) / f"seed{s}", progress=False)
            for s in range(args.seeds + 1)
        ]
    baseline = results[0]
    rows = []
    for seed, current in enumerate(results[1:], 1):
        checks = compare(current, baseline, config.gate)
        failed = [f"{c.target} {c.attack} {c.metric}: {c.message}" for c in checks if not c.passed]
        rows.append({"seed": seed, "checks": len(checks), "failed": failed})
        print(
            f"seed {seed}: {len(checks) - len(failed)}/{len(checks)} checks passed"
            + "".join(f"\n    FAIL {f}" for f in failed)
        )
    alarms = sum(bool(r["failed"]) for r in rows)
    total = sum(r["checks"] for r in rows)
    failed_checks = sum(len(r["failed"]) for r in rows)
    print(f"false alarms: {alarms} of {len(rows)} reruns failed the gate; {failed_checks} of {total} checks")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"preset": args.preset, "reruns": rows, "false_alarm_runs": alarms}, indent=2)
    )


if __name__ == "__main__":
    main()
