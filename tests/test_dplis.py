"""DPlis: the smoothed step against DP-SGD and a loop oracle; accounting identical to DP-SGD."""

import pytest
import torch
import torch.nn.functional as F

from audit.train import TrainRequest, train_target
from mechanisms.dplis import DplisConfig, smoothed_noisy_gradient, smoothing_sigma
from mechanisms.dpsgd import DpSgdPlan, noisy_gradient
from mechanisms.models import build_model
from mechanisms.per_example import NORM_EPS


def _setup(name="cnn", shape=(1, 28, 28), n=9):
    model = build_model(name, shape, 10, seed=0).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y


@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("mlp", (1, 8, 8))])
def test_k1_sigma0_equals_dpsgd_step_under_the_same_generator(name, shape):
    model, x, y = _setup(name, shape)
    kw = dict(clip_norm=0.05, noise_multiplier=1.3, expected_batch_size=8.0)
    a, la = noisy_gradient(model, x, y, generator=torch.Generator().manual_seed(7), **kw)
    b, lb = smoothed_noisy_gradient(
        model, x, y, generator=torch.Generator().manual_seed(7), smooth_sigma=0.0, smooth_samples=1, **kw
    )
    assert la == pytest.approx(lb, rel=1e-12)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)


def _oracle(model, x, y, *, sigma_s, k, clip, sigma, b, seed):
    """Loop over examples; the same K perturbations for every example, drawn as DPlis draws."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    xis = [
        {n: torch.normal(0.0, sigma_s, p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
        for _ in range(k)
    ]
    original = {n: p.detach().clone() for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        h = {n: torch.zeros_like(p) for n, p in params.items()}
        for xi in xis:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n] + xi[n])
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
            for n, p in params.items():
                h[n] += p.grad
        norm = torch.sqrt(sum((t**2).sum() for t in h.values()))
        f = min(1.0, clip / (float(norm) + NORM_EPS))
        for n in total:
            total[n] += f * h[n]
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(original[n])
    for t in total.values():
        t.add_(torch.normal(0.0, sigma * clip, t.shape, generator=gen, dtype=t.dtype)).div_(b)
    return total


@pytest.mark.parametrize("physical,engine", [(1024, "auto"), (4, "auto"), (4, "vmap")])
def test_perturbations_are_shared_by_the_lot_and_match_a_loop(physical, engine):
    model, x, y = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got, _ = smoothed_noisy_gradient(
        model,
        x,
        y,
        clip_norm=0.5,
        noise_multiplier=1.0,
        expected_batch_size=8.0,
        smooth_sigma=0.05,
        smooth_samples=3,
        generator=torch.Generator().manual_seed(3),
        physical_batch_size=physical,
        engine=engine,
    )
    want = _oracle(model, x, y, sigma_s=0.05, k=3, clip=0.5, sigma=1.0, b=8.0, seed=3)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():  # parameters restored bit for bit
        assert torch.equal(p, before[n])


def test_perturbations_are_fresh_each_step():
    model, x, y = _setup()
    gen = torch.Generator().manual_seed(0)
    kw = dict(clip_norm=1e9, noise_multiplier=0.0, expected_batch_size=8.0, smooth_samples=2, generator=gen)
    a, _ = smoothed_noisy_gradient(model, x, y, smooth_sigma=0.05, **kw)
    b, _ = smoothed_noisy_gradient(model, x, y, smooth_sigma=0.05, **kw)
    assert any(not torch.allclose(a[n], b[n]) for n in a)
    c, _ = smoothed_noisy_gradient(model, x, y, smooth_sigma=0.0, **kw)
    d, _ = smoothed_noisy_gradient(model, x, y, smooth_sigma=0.0, **kw)
    assert all(torch.equal(c[n], d[n]) for n in c)


def test_smoothing_sigma_units_and_schedule():
    plan = DpSgdPlan(sample_rate=0.1, steps=10, noise_multiplier=1.1, expected_batch_size=256.0)
    cfg = DplisConfig(noise_multiplier=1.1, smooth_radius=20.0, clip_norm=1.0)
    # r * (lr / B) * sigma * C, with the current learning rate (the radius follows the schedule)
    assert smoothing_sigma(cfg, plan, lr=256 * 6e-5) == pytest.approx(20 * 6e-5 * 1.1)
    assert smoothing_sigma(cfg, plan, lr=0.0) == 0.0
    assert smoothing_sigma(DplisConfig(noise_multiplier=1.0, smooth_sigma=0.3), plan, lr=1.0) == 0.3
    with pytest.raises(ValueError, match="smooth_reduce"):
        DplisConfig(noise_multiplier=1.0, smooth_reduce="max")


def _request(mechanism, **options):
    return TrainRequest(
        dataset="digits",
        model="mlp",
        mechanism=mechanism,
        progress=False,
        options={"epochs": 2, "batch_size": 64, "lr": 0.5, **options},
    )


def test_accounting_equals_dpsgd(tmp_path):
    a = train_target(_request("dpsgd", noise_multiplier=1.2), tmp_path / "a")["privacy"]
    b = train_target(_request("dplis", noise_multiplier=1.2, smooth_samples=2), tmp_path / "b")["privacy"]
    for key in (
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "formal",
    ):
        assert a[key] == b[key], key
    c = train_target(_request("dplis", epsilon=3.0, smooth_samples=2), tmp_path / "c")["privacy"]
    assert 0.99 * 3.0 <= c["epsilon"] <= 3.0 and c["formal"] is True
    assert b["note"] == (
        "DPlis (DP-SGD with loss smoothing): the same Poisson-sampled Gaussian event as DP-SGD; "
        "epsilon from dp-accounting"
    )


def test_the_loop_trains_with_the_smoothed_gradient(tmp_path, monkeypatch):
    """Every step of a DPlis run goes through the smoothed gradient (a run that silently fell
    back to DP-SGD's gradient would pass the accounting test above), and its weights differ
    from DP-SGD's at the same seed."""
    from safetensors.torch import load_file

    import mechanisms.dplis as dplis_module

    calls = []
    real = dplis_module.smoothed_noisy_gradient
    monkeypatch.setattr(
        dplis_module, "smoothed_noisy_gradient", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    meta = train_target(_request("dplis", noise_multiplier=1.2, smooth_samples=2), tmp_path / "dplis")
    assert len(calls) == meta["privacy"]["steps"] > 0
    train_target(_request("dpsgd", noise_multiplier=1.2), tmp_path / "dpsgd")
    a = load_file(tmp_path / "dplis" / "model.safetensors")
    b = load_file(tmp_path / "dpsgd" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_smoothing_sigma_is_in_the_reference_codes_units():
    # r * (lr / B) * sigma * C, with C != 1 so that a C in the wrong place shows (mutation testing)
    from mechanisms.dplis import DplisConfig, smoothing_sigma

    config = DplisConfig(noise_multiplier=1.5, clip_norm=2.0, smooth_radius=0.3)
    plan = DpSgdPlan(0.1, 10, 1.5, 64.0)
    assert smoothing_sigma(config, plan, lr=0.2) == pytest.approx(0.3 * (0.2 / 64.0) * 1.5 * 2.0)
    fixed = DplisConfig(noise_multiplier=1.5, clip_norm=2.0, smooth_sigma=0.01)
    assert smoothing_sigma(fixed, plan, lr=0.2) == 0.01


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_the_training_gradient_passes_every_option_through(reduce):
    """dplis_gradient (what training calls) equals smoothed_noisy_gradient called with the
    configuration's options, for both reductions over the K samples (mutation testing found
    the reduction unchecked in the training path)."""
    from mechanisms.dplis import dplis_gradient

    torch.manual_seed(0)
    x, y = torch.randn(24, 10), torch.randint(0, 3, (24,))
    config = DplisConfig(
        noise_multiplier=0.7,
        clip_norm=50.0,
        smooth_samples=3,
        smooth_sigma=0.05,
        smooth_reduce=reduce,
        physical_batch_size=7,
    )
    plan = DpSgdPlan(0.5, 10, 0.7, 12.0)
    model = build_model("mlp", (10,), 3, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    got, loss = dplis_gradient(config, plan, optimizer, torch.Generator().manual_seed(4))(model, x, y)
    want, want_loss = smoothed_noisy_gradient(
        model,
        x,
        y,
        clip_norm=50.0,
        noise_multiplier=0.7,
        expected_batch_size=12.0,
        smooth_sigma=0.05,
        smooth_samples=3,
        generator=torch.Generator().manual_seed(4),
        reduce=reduce,
        physical_batch_size=7,
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    assert loss == pytest.approx(want_loss)
    other, _ = smoothed_noisy_gradient(
        model,
        x,
        y,
        clip_norm=50.0,
        noise_multiplier=0.7,
        expected_batch_size=12.0,
        smooth_sigma=0.05,
        smooth_samples=3,
        generator=torch.Generator().manual_seed(4),
        reduce="sum" if reduce == "mean" else "mean",
    )
    # with a clip norm that does not bind, the reduction matters (sum = K x mean before noise)
    assert any(not torch.allclose(got[k], other[k]) for k in want)


def test_the_mean_reduction_is_the_sum_over_k_before_clipping():
    """With no clipping binding and no noise, reduce="mean" gives exactly the "sum" gradient
    over K (the same perturbations from the same seed)."""
    model, x, y = _setup()
    kw = dict(
        clip_norm=1e9, noise_multiplier=0.0, expected_batch_size=8.0, smooth_sigma=0.05, smooth_samples=4
    )
    total, _ = smoothed_noisy_gradient(
        model, x, y, generator=torch.Generator().manual_seed(5), reduce="sum", **kw
    )
    mean, _ = smoothed_noisy_gradient(
        model, x, y, generator=torch.Generator().manual_seed(5), reduce="mean", **kw
    )
    for n in total:
        torch.testing.assert_close(mean[n], total[n] / 4, rtol=1e-9, atol=1e-12)
        assert total[n].abs().max() > 0
