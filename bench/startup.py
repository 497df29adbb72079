"""Fast starts, side by side (issue 23): noise calibration (the exact-PLD search it replaced
against today's coarse search confirmed exactly), the command line's answers before torch
is imported (against importing everything first, as it used to), the first optimizer of a
fresh process (with and without ``torch._dynamo`` preloaded), and ``train --epsilon 8``
against the same run with the calibrated ``--noise-multiplier``. Not a test.

Writes ``bench/results/startup.json``.

    python bench/startup.py [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _wall(cmd: list[str], repeat: int = 3) -> float:
    """Median wall time of a command (a fresh process each time)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def calibration() -> list[dict]:
    from mechanisms import accounting

    q, steps = 256 / 2500, 20 * round(2500 / 256)  # the quick preset's DP-SGD targets on mnist5k

    def make(s):
        return accounting.dpsgd_event(noise_multiplier=s, sample_rate=q, steps=steps)

    rows = []
    for eps in (1.0, 4.0, 8.0):
        accounting._EPSILONS.clear()
        start = time.perf_counter()
        before = accounting._calibrate(eps, 1e-5, make, "pld")  # the former search: exact PLD throughout
        t_before = time.perf_counter() - start
        accounting._EPSILONS.clear()
        start = time.perf_counter()
        after = accounting.calibrate_noise_multiplier(target_epsilon=eps, delta=1e-5, make_event=make)
        t_after = time.perf_counter() - start
        final = accounting.epsilon(make(after), delta=1e-5)  # memoised: what training records
        rows.append(
            {
                "epsilon": eps,
                "sigma_before": before,
                "sigma_after": after,
                "relative_difference": abs(after - before) / before,
                "seconds_before": round(t_before, 3),
                "seconds_after": round(t_after, 3),
                "speedup": round(t_before / t_after, 2),
                "epsilon_after_exact": final,
            }
        )
        print(
            f"calibration eps {eps:g}: sigma {before:.6f} -> {after:.6f} (rel {rows[-1]['relative_difference']:.1e}), "
            f"{t_before:.2f} s -> {t_after:.2f} s ({rows[-1]['speedup']}x), exact epsilon {final:.5f}"
        )
    return rows


def command_line() -> dict:
    py = sys.executable
    eager = [py, "-c", "import torch, attacks, mechanisms, audit.commands, audit.api, audit.pipeline"]
    out = {
        "mia-audit --help": _wall(["mia-audit", "--help"]),
        "mia-audit datasets": _wall(["mia-audit", "datasets"]),
        "mia-audit train --help (imports the mechanisms)": _wall(["mia-audit", "train", "--help"]),
        "importing everything first (what --help did before)": _wall(eager),
    }
    for k, v in out.items():
        print(f"{k}: {v:.2f} s")
    return {k: round(v, 3) for k, v in out.items()}


def first_optimizer() -> dict:
    py = sys.executable
    code = (
        "import time, torch{pre}\n"
        "m = torch.nn.Linear(3, 2); t = time.perf_counter(); torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "print(time.perf_counter() - t)"
    )
    out = {}
    for name, pre in (("cold", ""), ("torch._dynamo preloaded", "; import torch._dynamo")):
        r = subprocess.run([py, "-c", code.format(pre=pre)], check=True, capture_output=True, text=True)
        out[name] = round(float(r.stdout.strip()), 3)
        print(f"first optimizer, {name}: {out[name]:.3f} s")
    return out


def train() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = ["mia-audit", "train", "--dataset", "mnist5k", "--model", "cnn", "--epochs", "10"]
        base += ["--mechanism", "dpsgd", "--quiet"]
        start = time.perf_counter()
        subprocess.run([*base, "--epsilon", "8", "--out", f"{tmp}/a"], check=True, capture_output=True)
        t_eps = time.perf_counter() - start
        meta = json.loads(Path(f"{tmp}/a/model.json").read_text())
        sigma = meta["privacy"]["noise_multiplier"]
        start = time.perf_counter()
        subprocess.run(
            [*base, "--noise-multiplier", repr(sigma), "--out", f"{tmp}/b"], check=True, capture_output=True
        )
        t_sigma = time.perf_counter() - start
        other = json.loads(Path(f"{tmp}/b/model.json").read_text())
    out = {
        "--epsilon 8 wall s": round(t_eps, 2),
        "--noise-multiplier wall s": round(t_sigma, 2),
        "ratio": round(t_eps / t_sigma, 3),
        "seconds --epsilon 8": meta["seconds"],
        "seconds --noise-multiplier": other["seconds"],
        "noise_multiplier": sigma,
    }
    print(
        f"train --epsilon 8: {t_eps:.1f} s wall ({meta['seconds']}); --noise-multiplier {sigma:.4f}: "
        f"{t_sigma:.1f} s ({other['seconds']}); ratio {out['ratio']}"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-train", action="store_true", help="skip the two training runs")
    args = ap.parse_args()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads default",
        "calibration": calibration(),
        "command_line": command_line(),
        "first_optimizer": first_optimizer(),
    }
    if not args.skip_train:
        results["train"] = train()
    path = HERE / "results" / "startup.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
