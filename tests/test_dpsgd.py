"""DP-SGD: the step against plain SGD, Poisson sampling, noise, accounting and calibration."""

import json

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from audit.train import TrainRequest, train_target
from mechanisms.accounting import SIGMA_RANGE, calibrate_noise_multiplier, dpsgd_event, epsilon
from mechanisms.dpsgd import DpSgdConfig, noisy_gradient, plan_dpsgd, train_dpsgd
from mechanisms.models import build_model
from mechanisms.sampling import poisson_lot


def _reference_epsilon(q, sigma, steps, delta, accountant="pld"):
    """Oracle straight from dp-accounting, independent of mechanisms.accounting."""
    acc = dp_accounting.pld.PLDAccountant() if accountant == "pld" else dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


def test_no_noise_huge_clip_step_equals_plain_sgd():
    model = build_model("cnn", (1, 28, 28), 10, seed=0).double()
    x, y = torch.rand(12, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (12,))
    g = torch.Generator().manual_seed(0)
    grads, _ = noisy_gradient(
        model, x, y, clip_norm=1e9, noise_multiplier=0.0, expected_batch_size=12, generator=g
    )
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-13)


def test_physical_chunks_do_not_change_the_result():
    model = build_model("mlp", (1, 8, 8), 10, seed=0).double()
    x, y = torch.rand(50, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (50,))
    kw = dict(clip_norm=0.1, noise_multiplier=1.0, expected_batch_size=40.0)
    a, loss_a = noisy_gradient(
        model, x, y, generator=torch.Generator().manual_seed(1), physical_batch_size=50, **kw
    )
    b, loss_b = noisy_gradient(
        model, x, y, generator=torch.Generator().manual_seed(1), physical_batch_size=7, **kw
    )
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13)
    # the lot's summed loss (a diagnostic) adds up over the chunks too
    whole = float(F.cross_entropy(model(x), y, reduction="sum"))
    assert loss_a == pytest.approx(whole, rel=1e-10) and loss_b == pytest.approx(whole, rel=1e-10)


def test_noise_has_std_sigma_c_over_expected_batch():
    model = build_model("cnn", (1, 28, 28), 10, seed=0).double()
    x, y = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    sigma, c, b = 1.3, 0.7, 64.0
    clean, _ = noisy_gradient(
        model, x, y, clip_norm=c, noise_multiplier=0.0, expected_batch_size=b, generator=torch.Generator()
    )
    noisy, _ = noisy_gradient(
        model,
        x,
        y,
        clip_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=b,
        generator=torch.Generator().manual_seed(5),
    )
    diff = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean]) * b
    d = diff.numel()
    assert (diff != 0).all(), "noise must cover every coordinate"
    # std estimate of d i.i.d. normals has relative standard error 1/sqrt(2d); allow 5 of them
    assert abs(float(diff.std()) / (sigma * c) - 1) < 5 / np.sqrt(2 * d)
    assert abs(float(diff.mean())) < 5 * sigma * c / np.sqrt(d)


def test_empty_lot_is_pure_noise():
    model = build_model("mlp", (4,), 2, seed=0)
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    grads, loss = noisy_gradient(
        model,
        x,
        y,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert loss == 0.0 and all(g.abs().sum() > 0 for g in grads.values())


def test_poisson_lot_sizes_are_binomial():
    g = torch.Generator().manual_seed(123)
    n, q, lots = 400, 0.05, 3000
    sizes = np.array([len(poisson_lot(n, q, g)) for _ in range(lots)])
    # the total is Binomial(n * lots, q): an exact two-sided test
    assert stats.binomtest(int(sizes.sum()), n * lots, q).pvalue > 1e-3
    # and the size distribution matches Binomial(n, q): chi-square on pooled bins
    edges = [0, 14, 17, 19, 21, 23, 26, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges) - 1, n, q)) * lots
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert sizes.std() > 0  # lots vary in size: not fixed batches


def test_epsilon_matches_dp_accounting_for_both_accountants():
    for acc in ("pld", "rdp"):
        ours = epsilon(
            dpsgd_event(noise_multiplier=1.1, sample_rate=0.01, steps=500), delta=1e-5, accountant=acc
        )
        assert ours == pytest.approx(_reference_epsilon(0.01, 1.1, 500, 1e-5, acc), rel=1e-12)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibration_lands_within_one_percent_below_target(target):
    q, steps = 128 / 2500, 200
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        delta=1e-5,
        make_event=lambda s: dpsgd_event(noise_multiplier=s, sample_rate=q, steps=steps),
    )
    eps = _reference_epsilon(q, sigma, steps, 1e-5)
    assert 0.99 * target <= eps <= target


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_is_tight_with_either_accountant_and_refuses_just_below_the_reachable(accountant):
    q, steps = 0.05, 300
    event = lambda s: dpsgd_event(noise_multiplier=s, sample_rate=q, steps=steps)  # noqa: E731
    sigma = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, make_event=event, accountant=accountant
    )
    assert 0.99 * 2.0 <= _reference_epsilon(q, sigma, steps, 1e-5, accountant) <= 2.0
    floor = _reference_epsilon(q, SIGMA_RANGE[1], steps, 1e-5, accountant)  # the smallest reachable
    with pytest.raises(ValueError, match="smallest reachable epsilon"):
        calibrate_noise_multiplier(
            target_epsilon=0.99 * floor, delta=1e-5, make_event=event, accountant=accountant
        )


def test_an_unknown_accountant_is_named_with_the_known_ones():
    from mechanisms.accounting import ACCOUNTANTS, make_accountant

    with pytest.raises(ValueError, match=f"unknown accountant 'nope'; known: {', '.join(ACCOUNTANTS)}$"):
        make_accountant("nope")
    assert len(ACCOUNTANTS) > 1


def test_epsilon_needs_a_delta_strictly_between_0_and_1():
    event = dpsgd_event(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
            epsilon(event, delta=bad)


def test_the_coarse_search_accountant_never_reports_less_than_the_exact_one():
    """The PLD search's coarse discretisation stays pessimistic, so its sigma already meets the
    target under the exact accountant (the confirmation after it is a safety net)."""
    for q, s, steps in [(0.1024, 1.15, 200), (0.05, 0.8, 500), (0.2, 3.0, 100), (0.01, 0.6, 2000)]:
        ev = dpsgd_event(noise_multiplier=s, sample_rate=q, steps=steps)
        assert epsilon(ev, delta=1e-5, accountant="pld-search") >= epsilon(ev, delta=1e-5, accountant="pld")


def test_unreachable_target_names_the_smallest_reachable_epsilon():
    with pytest.raises(ValueError, match="smallest reachable epsilon") as err:
        calibrate_noise_multiplier(
            target_epsilon=1e-4,
            delta=1e-5,
            make_event=lambda s: dpsgd_event(noise_multiplier=s, sample_rate=0.5, steps=10_000),
        )
    # the number named is dp-accounting's epsilon at the largest multiplier searched
    hi = SIGMA_RANGE[1]
    assert f"is {_reference_epsilon(0.5, hi, 10_000, 1e-5):.4g}, at noise multiplier {hi} " in str(err.value)
    assert str(err.value).endswith(
        "(the largest that calibration searches); train for fewer epochs, use a smaller "
        "batch, raise the target, or set --noise-multiplier directly"
    )


def test_calibration_falls_back_to_the_full_range_when_the_rdp_bracket_is_far_off(monkeypatch):
    """The RDP search only brackets the PLD one, in [0.7 s_rdp, s_rdp]. Were RDP three times
    too loose (simulated), 0.7 s_rdp already meets the target and the search must widen to
    the whole range, landing on the same multiplier, within 1% below the target."""
    import mechanisms.accounting as accounting

    q, steps = 0.05, 300
    event = lambda s: dpsgd_event(noise_multiplier=s, sample_rate=q, steps=steps)  # noqa: E731
    exact = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, make_event=event, accountant="pld")
    brent = accounting._brent
    bracket_ends = []

    def loose_rdp(target, delta, make_event, accountant, lo, hi, tol=1e-4):
        value = brent(target, delta, make_event, accountant, lo, hi, tol)
        if accountant == "rdp-bracket":
            bracket_ends.append(value)
            return 3.0 * value
        return value

    monkeypatch.setattr(accounting, "_brent", loose_rdp)
    accounting._EPSILONS.clear()
    sigma = accounting._calibrate(2.0, 1e-5, event, "pld")
    assert bracket_ends and 0.7 * 3.0 * bracket_ends[0] > exact  # the fallback was needed
    assert sigma == pytest.approx(exact, rel=1e-3)
    assert 0.99 * 2.0 <= _reference_epsilon(q, sigma, steps, 1e-5) <= 2.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_refuses_a_target_above_what_it_searches_and_a_target_of_zero(accountant):
    event = lambda s: dpsgd_event(noise_multiplier=s, sample_rate=0.01, steps=10)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"above the largest epsilon calibration considers \(noise multiplier"
    ):
        calibrate_noise_multiplier(target_epsilon=1e4, delta=1e-5, make_event=event, accountant=accountant)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"target epsilon must be > 0, got {bad}"):
            calibrate_noise_multiplier(
                target_epsilon=bad, delta=1e-5, make_event=event, accountant=accountant
            )


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ValueError, match="allow-large-delta"):
        plan_dpsgd(DpSgdConfig(noise_multiplier=1.0, delta=0.01, batch_size=10), n=200)
    with pytest.warns(UserWarning, match="WEAK GUARANTEE"):
        plan_dpsgd(
            DpSgdConfig(noise_multiplier=1.0, delta=0.01, batch_size=10, allow_large_delta=True), n=200
        )


def test_plan_edges_a_full_batch_is_allowed_and_delta_of_exactly_one_over_n_is_not():
    plan = plan_dpsgd(DpSgdConfig(noise_multiplier=1.0, delta=1e-3, batch_size=200, epochs=3), n=200)
    assert (plan.sample_rate, plan.steps, plan.expected_batch_size) == (1.0, 3, 200.0)
    from mechanisms.sampling import steps_per_epoch

    assert steps_per_epoch(260, 100 / 260) == 3  # 1/q = 2.6 rounds to nearest, not down
    with pytest.raises(ValueError, match="exceeds the 200 training examples"):
        plan_dpsgd(DpSgdConfig(noise_multiplier=1.0, delta=1e-3, batch_size=201), n=200)
    with pytest.raises(ValueError, match="allow-large-delta"):
        plan_dpsgd(DpSgdConfig(noise_multiplier=1.0, delta=1 / 200, batch_size=10), n=200)


def test_config_needs_exactly_one_of_sigma_or_epsilon():
    with pytest.raises(ValueError, match="exactly one"):
        DpSgdConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DpSgdConfig(noise_multiplier=1.0, epsilon=3.0)


def test_batchnorm_is_refused():
    model = build_model("tests.user_models:with_batchnorm", (4,), 2)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_dpsgd(
            model,
            torch.zeros(20, 4),
            torch.zeros(20, dtype=torch.long),
            config=DpSgdConfig(noise_multiplier=1.0, batch_size=5, delta=1e-3),
            generator=torch.Generator(),
        )


def _request(**options):
    return TrainRequest(
        dataset="digits",
        model="mlp",
        mechanism="dpsgd",
        progress=False,
        options={"epochs": 2, "batch_size": 64, "lr": 0.5, **options},
    )


def test_model_json_epsilon_equals_dp_accounting_recomputed(tmp_path):
    meta = train_target(_request(epsilon=3.0, clip_norm=0.7), tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())["privacy"]
    assert saved == meta["privacy"] and saved["formal"] is True and saved["accountant"] == "pld"
    recomputed = _reference_epsilon(
        saved["sample_rate"], saved["noise_multiplier"], saved["steps"], saved["delta"]
    )
    assert saved["epsilon"] == pytest.approx(recomputed, rel=1e-12)
    assert 0.99 * 3.0 <= saved["epsilon"] <= 3.0
    assert (
        saved["sample_rate"] == 64 / 898
        and saved["steps"] == 2 * round(898 / 64)
        and saved["clip_norm"] == 0.7
    )


def test_dpsgd_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    train_target(_request(noise_multiplier=1.0), tmp_path / "a")
    train_target(_request(noise_multiplier=1.0), tmp_path / "b")
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dpsgd_learns_on_digits(tmp_path):
    meta = train_target(_request(noise_multiplier=1.0, epochs=8, lr=1.0, momentum=0.0), tmp_path)
    assert meta["test_accuracy"] > 0.6, meta["test_accuracy"]  # chance is 0.1


def test_instance_norm_with_running_statistics_is_refused():
    from torch import nn

    from mechanisms.dpsgd import refuse_batchnorm

    with pytest.raises(ValueError, match="running statistics"):
        refuse_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True)))
    refuse_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2)))  # no running stats: fine


def test_epsilon_memo_keys_on_every_parameter_of_the_event():
    """The memoised epsilon is recomputed for any change of the event (sigma in its last bits,
    the rate, the steps), delta or accountant, and equals dp-accounting's own answer."""
    import dp_accounting

    from mechanisms.accounting import _EPSILONS, dpsgd_event, epsilon

    def direct(event, delta):
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(event)
        return acc.get_epsilon(delta)

    base = dict(noise_multiplier=1.1, sample_rate=0.05, steps=50)
    variants = [
        base,
        {**base, "noise_multiplier": 1.1 + 1e-12},
        {**base, "sample_rate": 0.0500001},
        {**base, "steps": 51},
    ]
    values = []
    for v in variants:
        event = dpsgd_event(**v)
        values.append(epsilon(event, delta=1e-5))
        assert values[-1] == direct(event, 1e-5)
        assert (repr(event), 1e-5, "pld") in _EPSILONS
    assert (
        values[2] > values[0]
        and values[3] > values[0]
        and len({repr(dpsgd_event(**v)) for v in variants}) == 4
    )
    event = dpsgd_event(**base)
    assert epsilon(event, delta=1e-6) > values[0]
    assert epsilon(event, delta=1e-5, accountant="rdp") > values[0]


def test_calibration_matches_the_exact_search_and_model_json_times_its_parts(tmp_path):
    """The coarse-then-confirmed calibration lands on the exact search's sigma (relative
    difference <= 1e-3, never above the target), and model.json splits its time."""
    from mechanisms import accounting

    def make(s):
        return accounting.dpsgd_event(noise_multiplier=s, sample_rate=0.1, steps=30)

    for eps in (1.0, 4.0):
        exact = accounting._calibrate(eps, 1e-5, make, "pld")
        fast = accounting.calibrate_noise_multiplier(target_epsilon=eps, delta=1e-5, make_event=make)
        assert abs(fast - exact) / exact <= 1e-3
        assert accounting.epsilon(make(fast), delta=1e-5) <= eps
    meta = train_target(_request(epsilon=3.0), tmp_path)
    t = meta["seconds"]
    assert t["accounting"] > 0 and t["training"] > 0 and t["evaluation"] > 0
    assert t["training"] + t["accounting"] + t["evaluation"] <= t["total"] + 1e-3
    assert meta["train_seconds"] == t["training"]


def test_the_dpsgd_event_accepts_exactly_its_domain():
    """Sample rate in (0, 1] (1 is full batch), noise multiplier > 0, steps >= 0; each refusal
    names the argument and the value."""
    assert dpsgd_event(noise_multiplier=1.0, sample_rate=1.0, steps=0) is not None
    for rate in (0.0, -0.1, 1.0 + 1e-9, 1.5):
        with pytest.raises(ValueError, match=rf"sample_rate must be in \(0, 1\], got {rate}"):
            dpsgd_event(noise_multiplier=1.0, sample_rate=rate, steps=10)
    with pytest.raises(ValueError, match="noise_multiplier must be > 0, got 0.0"):
        dpsgd_event(noise_multiplier=0.0, sample_rate=0.5, steps=10)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        dpsgd_event(noise_multiplier=1.0, sample_rate=0.5, steps=-1)
