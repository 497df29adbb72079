"""Where DP-SGD's time goes: ablations of the per-example convolution work, side by side.

Same setting as ``bench/dpsgd_overhead.py`` (tanh ``cnn``, the 2,500 member examples of
mnist5k, batch 256). Besides ``sgd`` and ``dpsgd`` it times three deliberately *wrong*
variants of our DP-SGD, to attribute the overhead: the per-example weight gradients of the
convolutions skipped altogether (left at zero), their patch copies skipped (the GEMMs run on
stale patches), or their GEMMs skipped (patches built, nothing multiplied). Everything else
(forward, backward to the layers' outputs, norms, clipping, noise, Poisson lots, optimizer)
is unchanged. Interleaved rounds, medians; timings only, never used for training.

    python bench/dpsgd_breakdown.py [--rounds 8]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, mnist5k_members

import mechanisms.per_example as pe
from mechanisms.dpsgd import DpSgdConfig, DpSgdPlan, dpsgd_epoch, dpsgd_gradient
from mechanisms.models import build_model
from mechanisms.sgd import sgd_epoch
from mechanisms.training import make_optimizer, make_scheduler

ORIGINAL = pe._LayerRule._conv_patches


def _ablated(copy: bool, gemm: bool):
    """``_LayerRule._conv_patches`` with its patch copy and/or GEMM left out (timing only)."""

    def conv_patches(self, module, a, g2):
        x = self._patch_view(module, a)
        b, k = x.shape[0], x[0, 0, 0].numel()
        out = self._buffer("weight", (b, k, g2.shape[1]), a)
        if not (copy or gemm):
            out.zero_()
        chunk = max(1, min(b, pe.PATCH_CHUNK_BYTES // (x[0].numel() * a.element_size())))
        cols = self._buffer("cols", (chunk, *x.shape[1:]), a)
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            if copy:
                cols[: stop - start].copy_(x[start:stop])
            if gemm:
                patches = cols[: stop - start].view(stop - start, -1, k)
                torch.bmm(patches.transpose(1, 2), g2[start:stop].transpose(1, 2), out=out[start:stop])
        self.conv_layout = "patches_by_output"
        return out

    return conv_patches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, shape = mnist5k_members()
    n, b = len(y), args.batch_size
    config = DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0, batch_size=b, epochs=1, lr=0.05)
    plan = DpSgdPlan(b / n, round(n / b), 1.0, float(b))

    def fresh():
        model = build_model("cnn", shape, 10, seed=0)
        opt = make_optimizer(model, config)
        return model, opt, make_scheduler(opt, config, 10**6)

    runners = {}
    m, o, s = fresh()
    g = torch.Generator().manual_seed(0)
    runners["sgd"] = lambda: sgd_epoch(m, o, s, x, y, batch_size=b, generator=g)
    variants = {
        "dpsgd": ORIGINAL,
        "dpsgd, no conv per-example work": _ablated(copy=False, gemm=False),
        "dpsgd, no patch copies": _ablated(copy=False, gemm=True),
        "dpsgd, no per-example GEMMs": _ablated(copy=True, gemm=False),
    }
    for name, rule in variants.items():
        m2, o2, s2 = fresh()
        g2 = torch.Generator().manual_seed(0)
        gradient = dpsgd_gradient(config, plan, g2)

        def run(m2=m2, o2=o2, s2=s2, g2=g2, gradient=gradient, rule=rule):
            pe._LayerRule._conv_patches = rule
            try:
                dpsgd_epoch(m2, o2, s2, x, y, plan=plan, config=config, generator=g2, gradient=gradient)
            finally:
                pe._LayerRule._conv_patches = ORIGINAL

        runners[name] = run
    med, _ = interleaved_medians(runners, args.rounds)
    steps = plan.steps
    print(
        f"cnn on mnist5k members (n={n}), batch {b}, {args.threads} threads, median of {args.rounds} rounds"
    )
    print(f"{'variant':34s} {'s/epoch':>8s} {'x sgd':>6s} {'ms/step saved':>14s}")
    for k, v in med.items():
        saved = (med["dpsgd"] - v) / steps * 1e3 if k.startswith("dpsgd,") else float("nan")
        print(f"{k:34s} {v:8.3f} {v / med['sgd']:6.2f} {saved:14.1f}")


if __name__ == "__main__":
    main()
