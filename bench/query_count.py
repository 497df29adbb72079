"""Leakage to an attacker with fewer queries, recomputed from a finished run's saved logits.

A run stores every target's and reference's logits for Q queries ([N, Q, C]); for a stochastic
model (residual perturbation) the queries are repeated noisy passes. This script reruns the
attacks on the first q queries only (q = 1: a single-query attacker), for every target of the
run, with the same metrics code as `mia-audit`. Not a test.

    python bench/query_count.py runs/residual-lira --queries 1 4 [--attacks loss lira-online]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from attacks.signals import AttackInputs
from audit.attack import load_target_data, run_attacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a directory written by `mia-audit run`")
    ap.add_argument("--queries", type=int, nargs="+", default=[1])
    ap.add_argument("--attacks", nargs="+", default=["loss", "lira-online", "lira-offline"])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", default=None, help="JSON file (default: RUN/query_count.json)")
    args = ap.parse_args()
    run = Path(args.run)
    rows = []
    for target in sorted((run / "targets").iterdir()):
        meta = json.loads((target / "model.json").read_text())
        logits = np.load(target / "logits.npy")
        keep = np.load(target / "keep.npy")
        refs = run / "references" / target.name
        files = sorted((refs / "logits").glob("*.npy"), key=lambda p: int(p.stem))
        ref_logits = np.stack([np.load(f) for f in files]) if files else None
        ref_keep = np.load(refs / "keep.npy")[: len(files)] if files else None
        labels = load_target_data(meta).y.numpy()
        for q in args.queries:
            if q > logits.shape[1]:
                raise SystemExit(f"{target.name}: only {logits.shape[1]} queries were saved, asked for {q}")
            inputs = AttackInputs(
                logits[:, :q],
                labels,
                None if ref_logits is None else ref_logits[:, :, :q],
                ref_keep,
            )
            results, _ = run_attacks(
                inputs,
                keep,
                tuple(args.attacks),
                fpr_levels=(0.001, 0.01),
                delta=1e-5,
                alpha=0.05,
                resamples=args.resamples,
                seed=0,
            )
            for name, r in results.items():
                row = {
                    "target": target.name,
                    "test_accuracy": meta["test_accuracy"],
                    "queries": q,
                    "attack": name,
                    "auc": r["auc"],
                    "auc_ci": r["auc_ci"],
                    "tpr_at_0.1%": r["tpr_at_fpr"]["0.001"],
                    "tpr_at_0.1%_ci": r["tpr_at_fpr_ci"]["0.001"],
                    "epsilon_lb": r["epsilon_lb"],
                }
                rows.append(row)
                print(
                    f"{target.name:28s} acc {meta['test_accuracy']:.4f} q={q} {name:13s} "
                    f"AUC {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]  "
                    f"TPR@0.1% {row['tpr_at_0.1%']:.4f} [{row['tpr_at_0.1%_ci'][0]:.4f}, "
                    f"{row['tpr_at_0.1%_ci'][1]:.4f}]  eps_lb {r['epsilon_lb']:.3f}"
                )
    out = Path(args.out) if args.out else run / "query_count.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
