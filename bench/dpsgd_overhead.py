"""DP-SGD overhead: per-epoch time of sgd, our dpsgd, and Opacus (hooks, ghost clipping).

Same model (tanh ``cnn``), same data (the member half of ``mnist5k``: 2,500 examples), same
(expected) batch size, same torch thread count, measured side by side: each round runs one
epoch of every method in turn, and the table reports the median over rounds, so machine
noise hits every method alike. Prints a ratio table and writes
``bench/results/dpsgd_overhead.json``. Not a test: timings never go in tests.

The headline is the steady state, after ``--warmup`` epochs of every method. Poisson lots vary
in size, and the first lot of each new size costs DP-SGD (ours and Opacus's) about 1 ms more
on this CPU (``bench/lot_sizes.py``): oneDNN builds its convolution kernels per input shape,
and new sizes page-fault through fresh memory. A 10-epoch run meets about 50 distinct sizes
in its 100 lots, a 40-epoch run about 70 in 400, so the early epochs are slower; the last
line gives the mean ratio over a fresh run's first ``--first`` epochs (timed during the
warm-up) so that cost is visible. It is printed for our DP-SGD only, which runs right after
``sgd``: the later methods reuse the kernels that earlier ones built for the same shapes, so
their first epochs are not cold.

``--stock-pooling`` times the cnn with torch's own NCHW max pooling in place of our
channels-last pooling (same values; mechanisms/models.py). That is the cnn as stock PyTorch
runs it, the setting in which Opacus measured about 2.0x sgd when the speed target was set:
every method is slower there, by the same per-epoch time, so every ratio is smaller.

    python bench/dpsgd_overhead.py [--batch-size 256] [--rounds 11] [--warmup 20] [--threads 2]
                                   [--stock-pooling]
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import bench_cnn, dp_parser, dp_start, fresh_cnn, interleaved_times

from mechanisms.dpsgd import dpsgd_epoch, dpsgd_gradient
from mechanisms.sgd import sgd_epoch

SIGMA, CLIP = 1.0, 1.0


def main() -> None:
    ap = dp_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=20, help="untimed epochs of every method first")
    ap.add_argument("--first", type=int, default=10, help="report also the mean of the first N epochs")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument(
        "--stock-pooling",
        action="store_true",
        help="every method's cnn pools with torch's nn.MaxPool2d on NCHW memory instead of ours",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpsgd_overhead.json"))
    args = ap.parse_args()
    if not 1 <= args.first <= args.warmup or args.rounds < 1:
        ap.error("need --rounds >= 1 and 1 <= --first <= --warmup")
    x, y, shape, config, plan = dp_start(args, SIGMA, CLIP)
    n, b = len(y), args.batch_size

    runners = {}
    m_sgd, o_sgd, s_sgd = fresh_cnn(shape, config, stock_pooling=args.stock_pooling)
    g_sgd = torch.Generator().manual_seed(0)
    runners["sgd"] = lambda: sgd_epoch(m_sgd, o_sgd, s_sgd, x, y, batch_size=b, generator=g_sgd)
    for engine in ("ghost", "vmap"):
        m, o, s = fresh_cnn(shape, config, stock_pooling=args.stock_pooling)
        g = torch.Generator().manual_seed(0)
        cfg = dataclasses.replace(config, engine=engine)
        # one gradient function (and so one scratch workspace) for the whole run, as in training
        gradient = dpsgd_gradient(cfg, plan, g)
        runners[f"dpsgd ({engine})"] = lambda m=m, o=o, s=s, g=g, cfg=cfg, gr=gradient: dpsgd_epoch(
            m, o, s, x, y, plan=plan, config=cfg, generator=g, gradient=gr
        )
    if not args.no_opacus:
        runners.update(_opacus_runners(x, y, b, shape, args.stock_pooling))

    first = interleaved_times(runners, args.warmup)  # a fresh run's first epochs, timed too
    times = interleaved_times(runners, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each round times every method back to back, so a round's ratio to that round's sgd
    # epoch cancels slow spells of the machine that the ratio of medians does not.
    paired = {
        k: statistics.median(t / s for t, s in zip(v, times["sgd"], strict=True)) for k, v in times.items()
    }
    early = {k: statistics.mean(v[: args.first]) for k, v in first.items()}
    base = med["sgd"]
    pooling = "stock NCHW pooling" if args.stock_pooling else "channels-last pooling"
    print(
        f"per-epoch time, cnn ({pooling}) on mnist5k members (n={n}), batch {b}, {args.threads} threads: "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up epochs"
    )
    print(f"{'method':24s} {'s/epoch':>9s} {'x sgd':>7s} {'paired':>7s} {'x ours':>7s}")
    ours = med["dpsgd (ghost)"]
    for k, v in med.items():
        print(f"{k:24s} {v:9.3f} {v / base:7.2f} {paired[k]:7.2f} {v / ours:7.2f}")
    print("x sgd: ratio of the medians; paired: median over rounds of the ratio within a round")
    print(
        f"first {args.first} epochs of a fresh run (mean): dpsgd (ghost) "
        f"{early['dpsgd (ghost)'] / early['sgd']:.2f}x sgd"
    )
    result = {
        "benchmark": "dpsgd_overhead",
        "model": "cnn",
        "pooling": "stock (nn.MaxPool2d, NCHW)" if args.stock_pooling else "channels-last (ours)",
        "dataset": "mnist5k (member half)",
        "examples": n,
        "batch_size": b,
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup_epochs": args.warmup,
        "seconds_per_epoch_median": med,
        "ratio_to_sgd": {k: v / base for k, v in med.items()},
        "ratio_to_sgd_paired_median": paired,
        f"ratio_to_sgd_first_{args.first}_epochs": {k: v / early["sgd"] for k, v in early.items()},
        "all_seconds": times,
        "warmup_seconds": first,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _opacus_runners(x, y, b, shape, stock_pooling):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    # Opacus warns that its RNG is not cryptographic and that its backward hooks fire on
    # outputs (the input images need no gradient): expected here, and noise in the table.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    runners = {}
    for mode in ("hooks", "ghost"):
        model = bench_cnn(shape, stock_pooling=stock_pooling)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(TensorDataset(x, y), batch_size=b, generator=torch.Generator().manual_seed(0))
        engine = PrivacyEngine(accountant="prv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "ghost":
                model, opt, crit, loader = engine.make_private(
                    module=model,
                    optimizer=opt,
                    data_loader=loader,
                    criterion=torch.nn.CrossEntropyLoss(),
                    noise_multiplier=SIGMA,
                    max_grad_norm=CLIP,
                    grad_sample_mode="ghost",
                )
            else:
                model, opt, loader = engine.make_private(
                    module=model,
                    optimizer=opt,
                    data_loader=loader,
                    noise_multiplier=SIGMA,
                    max_grad_norm=CLIP,
                )
                crit = F.cross_entropy

        def epoch(model=model, opt=opt, loader=loader, crit=crit):
            for xb, yb in loader:
                opt.zero_grad()
                if len(yb) == 0:
                    opt.step()
                    continue
                loss = crit(model(xb), yb)
                loss.backward()
                opt.step()

        runners[f"opacus ({mode})"] = epoch
    return runners


if __name__ == "__main__":
    main()
