"""Where DP-SGD's time goes: ablations of the per-example convolution work, side by side.

Same setting as ``bench/dpsgd_overhead.py`` (tanh ``cnn``, the 2,500 member examples of
mnist5k, batch 256). Besides ``sgd`` and ``dpsgd`` it times three deliberately *wrong*
variants of our DP-SGD, to attribute the overhead: the per-example weight gradients of the
convolutions skipped altogether (left at zero), their patch copies skipped (the GEMMs run on
stale patches; the shifted-window route still builds its stride-phase planes and gradient
grid), or their GEMMs skipped (patches built, nothing multiplied). Everything else
(forward, backward to the layers' outputs, norms, clipping, noise, Poisson lots, optimizer)
is unchanged. Interleaved rounds, medians; timings only, never used for training.

    python bench/dpsgd_breakdown.py [--rounds 8] [--warmup 10]
"""

from __future__ import annotations

import torch
from _common import dp_parser, dp_start, fresh_cnn, interleaved_medians

import mechanisms.ghost_rules as gr
from mechanisms.dpsgd import dpsgd_epoch, dpsgd_gradient
from mechanisms.sgd import sgd_epoch

RULE = gr.LayerRule
ORIGINAL = {
    name: getattr(RULE, name)
    for name in ("_conv_patches", "_conv_shifted", "_patch_chunks", "_shifted_chunks")
}


_ZEROED: set[tuple[int, int]] = set()


def _zero_once(patches: torch.Tensor) -> None:
    """Zero an unfilled chunk buffer the first time it is seen, so the GEMMs run on finite
    stale patches."""
    if (patches.data_ptr(), patches.numel()) not in _ZEROED:
        patches.zero_()
        _ZEROED.add((patches.data_ptr(), patches.numel()))


def _unfilled_patch_chunks(self, module, a):
    for start, stop, patches in ORIGINAL["_patch_chunks"](self, module, a, fill=False):
        _zero_once(patches)
        yield start, stop, patches


def _unfilled_shifted_chunks(self, module, a, ho):
    for start, stop, patches in ORIGINAL["_shifted_chunks"](self, module, a, ho, fill=False):
        _zero_once(patches)
        yield start, stop, patches


def _no_gemm(fill: bool, shifted: bool):
    """A conv rule (either route) that builds its patches (all of them with ``fill``, else
    none) but multiplies nothing: zero gradients."""

    def conv(self, module, a, g):
        kh, kw = module.kernel_size
        out = self._buffer("weight", (a.shape[0], kh * kw * a.shape[1], g.shape[1]), a)
        if fill:
            chunks = (
                ORIGINAL["_shifted_chunks"](self, module, a, g.shape[2])
                if shifted
                else ORIGINAL["_patch_chunks"](self, module, a)
            )
            for _ in chunks:
                pass
        out.zero_()
        self.conv_layout = "patches_by_output"
        return out

    return conv


def main() -> None:
    ap = dp_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10, help="untimed epochs of every variant first")
    args = ap.parse_args()
    x, y, shape, config, plan = dp_start(args)
    n, b = len(y), args.batch_size

    runners = {}
    m, o, s = fresh_cnn(shape, config)
    g = torch.Generator().manual_seed(0)
    runners["sgd"] = lambda: sgd_epoch(m, o, s, x, y, batch_size=b, generator=g)
    variants = {  # _LayerRule methods replaced in each variant
        "dpsgd": {},
        "dpsgd, no conv per-example work": {
            "_conv_patches": _no_gemm(False, False),
            "_conv_shifted": _no_gemm(False, True),
        },
        "dpsgd, no patch copies": {
            "_patch_chunks": _unfilled_patch_chunks,
            "_shifted_chunks": _unfilled_shifted_chunks,
        },
        "dpsgd, no per-example GEMMs": {
            "_conv_patches": _no_gemm(True, False),
            "_conv_shifted": _no_gemm(True, True),
        },
    }
    for name, replaced in variants.items():
        m2, o2, s2 = fresh_cnn(shape, config)
        g2 = torch.Generator().manual_seed(0)
        gradient = dpsgd_gradient(config, plan, g2)

        def run(m2=m2, o2=o2, s2=s2, g2=g2, gradient=gradient, replaced=replaced):
            for attr, fn in replaced.items():
                setattr(RULE, attr, fn)
            try:
                dpsgd_epoch(m2, o2, s2, x, y, plan=plan, config=config, generator=g2, gradient=gradient)
            finally:
                for attr, fn in ORIGINAL.items():
                    setattr(RULE, attr, fn)

        runners[name] = run
    med, _ = interleaved_medians(runners, args.rounds, warmup=args.warmup)
    steps = plan.steps
    print(
        f"cnn on mnist5k members (n={n}), batch {b}, {args.threads} threads, median of {args.rounds} rounds "
        f"after {args.warmup} warm-up epochs"
    )
    print(f"{'variant':34s} {'s/epoch':>8s} {'x sgd':>6s} {'ms/step saved':>14s}")
    for k, v in med.items():
        saved = (med["dpsgd"] - v) / steps * 1e3 if k.startswith("dpsgd,") else float("nan")
        print(f"{k:34s} {v:8.3f} {v / med['sgd']:6.2f} {saved:14.1f}")


if __name__ == "__main__":
    main()
