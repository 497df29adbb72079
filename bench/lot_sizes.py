"""One-time cost of a new Poisson lot size in DP-SGD, and how many sizes a run meets.

Poisson lots vary in size, and the first lot of each new size costs more than later ones of
the same size (oneDNN builds convolution kernels per input shape; new sizes also touch fresh
memory). This times our DP-SGD gradient of the ``cnn`` (mnist5k members) at new lot sizes,
twice each, and counts the distinct sizes in runs of 10, 20, 30 and 40 epochs at batch 256.
Not a test: timings never go in tests.

    python bench/lot_sizes.py [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import dp_parser, dp_start, fresh_cnn

from mechanisms.dpsgd import dpsgd_gradient
from mechanisms.sampling import poisson_lot


def main() -> None:
    args = dp_parser(__doc__).parse_args()
    x, y, shape, config, plan = dp_start(args)
    n, b = len(y), args.batch_size
    model, _, _ = fresh_cnn(shape, config)
    gradient = dpsgd_gradient(config, plan, torch.Generator().manual_seed(0))
    for size in range(b + 50, b + 70):  # warm everything else up on sizes not used below
        gradient(model, x[:size], y[:size])
    first, again = [], []
    for size in range(b - 26, b + 34, 2):
        for times in (first, again):
            start = time.perf_counter()
            gradient(model, x[:size], y[:size])
            times.append(time.perf_counter() - start)
    extra = statistics.median(f - a for f, a in zip(first, again, strict=True))
    print(
        f"cnn, {args.threads} threads, lots of {b - 26}-{b + 32}: first lot of a new size "
        f"{statistics.median(first) * 1e3:.2f} ms, the same size again "
        f"{statistics.median(again) * 1e3:.2f} ms, extra {extra * 1e3:.2f} ms (medians)"
    )
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_lot(n, b / n, g)) for _ in range(40 * plan.steps)]
    for epochs in (10, 20, 30, 40):
        lots = epochs * plan.steps
        print(f"{epochs} epochs: {len(set(sizes[:lots]))} distinct lot sizes in {lots} lots")


if __name__ == "__main__":
    main()
