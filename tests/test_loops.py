"""Loop-level privacy tests: the training loops themselves (not only their helpers) draw
Poisson lots, divide the privatised sum by the *expected* lot size, and (sound screening)
decide on the clipped noisy test only. Each test fails under the mutation it names."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mechanisms.dpsgd as dpsgd_module
import mechanisms.screening as screening_module
from mechanisms import build_model, config_from_mapping, get_mechanism
from mechanisms.encoding import Encoder, encode

from .oracles import dp_epsilon


def _data(n=30, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _spy_lots(monkeypatch, module=dpsgd_module):
    lots = []
    original = module.poisson_lot

    def spy(n, q, generator):
        lot = original(n, q, generator)
        lots.append((n, q, lot.clone()))
        return lot

    monkeypatch.setattr(module, "poisson_lot", spy)
    return lots


def _clipped(model, x, y, c, times=1):
    """Oracle: sum over examples of the clipped gradient of ``times`` copies of the example's
    loss (DPlis with no smoothing sums K equal gradients), by a loop over single examples."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        g = {n: times * p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        f = min(1.0, c / (float(norm) + 1e-6))
        for n in total:
            total[n] += f * g[n]
    return total


RECIPES = {
    "dpsgd": {},
    "dplis": {"smooth_samples": 2, "smooth_sigma": 0.0},
    "screening": {"validation_size": 8},
}
ENCODING = {"top_k": 20, "codebook_size": 4, "denoise": False}


def _train(mechanism, options, x, y, seed=0):
    """``mechanism`` trained on (x, y) with ``options``, a float64 MLP; returns the result."""
    mech = get_mechanism(mechanism)
    config = config_from_mapping(mech.config_type, options)
    model = build_model("mlp", (6,), 3, seed=0).double()
    return mech.train(model, x, y, config=config, generator=torch.Generator().manual_seed(seed))


def _small_run(mechanism, options):
    """Two epochs on 60 examples in expected lots of 20 (6 planned steps), progress bar off;
    noise multiplier 1 unless ``options`` says (none for the non-private baseline)."""
    base = {"epochs": 2, "batch_size": 20, "lr": 0.05, "progress": False}
    if mechanism != "sgd":
        base["noise_multiplier"] = 1.0
    return _train(mechanism, {**base, **options}, *_data(n=60))


@pytest.mark.parametrize("mechanism", [*RECIPES, "encoding"])
def test_the_loop_draws_poisson_lots(monkeypatch, mechanism):
    """Mutation caught: fixed-size (shuffled) batches instead of Poisson lots."""
    x, y = _data(n=400)
    options = {"epochs": 5, "batch_size": 64, "lr": 0.05, "noise_multiplier": 1.0}
    options.update(RECIPES.get(mechanism, ENCODING))
    lots = _spy_lots(monkeypatch)
    _train(mechanism, options, x, y)
    train = [lot for n, q, lot in lots if abs(q - 64 / 400) < 1e-12]
    assert len(train) >= 5 * round(400 / 64)
    sizes = np.array([len(lot) for lot in train])
    expected_var = 400 * 0.16 * 0.84
    # a fixed-size batch has variance 0; Binomial(400, 0.16) has 53.8 (chi-square: the sample
    # variance of 31+ lots falls below 0.4 of it with probability < 1e-3)
    assert sizes.var(ddof=1) > 0.4 * expected_var
    assert abs(sizes.mean() - 64) < 4 * np.sqrt(expected_var / len(sizes))


@pytest.mark.parametrize("mechanism", [*RECIPES, "encoding"])
def test_the_loop_divides_by_the_expected_lot_size(monkeypatch, mechanism):
    """One step with negligible noise and plain SGD at lr 1: the parameters move by minus the
    clipped sum over the drawn lot divided by qN. Mutation caught: dividing by the lot's
    realised size."""
    x, y = _data(n=30)
    batch = 24  # q = 0.8: one lot per epoch, so one epoch is one step
    # noise std sigma C / B = 4e-6 per coordinate: far below the 4-10% a wrong divisor makes
    options = {"epochs": 1, "batch_size": batch, "lr": 1.0, "momentum": 0.0, "noise_multiplier": 1e-4}
    options["accountant"] = "rdp"  # PLD discretises a near-noiseless run into too many buckets
    options.update(RECIPES.get(mechanism, {"top_k": 10, "codebook_size": 4, "denoise": False}))
    if mechanism == "screening":
        options.update(anneal_rate=0.0)  # every candidate accepted: the step is kept
    lots = _spy_lots(monkeypatch)
    mech = get_mechanism(mechanism)
    config = config_from_mapping(mech.config_type, options)
    model = build_model("mlp", (6,), 3, seed=0).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = mech.train(model, x, y, config=config, generator=torch.Generator().manual_seed(3))
    n_train = len(y)
    (n, q, lot) = next(item for item in lots if abs(item[1] - batch / n_train) < 1e-12)
    assert len(lot) != round(q * n)  # the seed gives a lot whose size differs from qN
    oracle_model = build_model("mlp", (6,), 3, seed=0).double()
    if mechanism == "encoding":
        per = []
        for i in lot.tolist():
            oracle_model.zero_grad()
            F.cross_entropy(oracle_model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
            per.append(torch.cat([p.grad.flatten() for p in oracle_model.parameters()]))
        encoder = Encoder(config, sum(p.numel() for p in oracle_model.parameters()))
        index, values = encode(
            torch.stack(per),
            encoder.codebook.double(),
            clip_norm=config.clip_norm,
            multiplier=config.quant_multiplier,
        )
        flat = torch.zeros(per[0].numel(), dtype=torch.float64)
        flat.index_add_(0, index.flatten(), values.flatten().double())
        summed, offset = {}, 0
        for name, p in oracle_model.named_parameters():
            summed[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    else:
        times = 2 if mechanism == "dplis" else 1
        summed = _clipped(oracle_model, x[lot], y[lot], config.clip_norm, times=times)
    gap = 0.0
    for name, p in result.state_dict.items():
        expected = before[name] - summed[name] / (q * n)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-4)
        realised = before[name] - summed[name] / len(lot)
        gap = max(gap, float((expected - realised).abs().max()))
    assert gap > 5e-4  # the mutation would miss the tolerance by five times or more


def test_sound_screening_decides_on_the_clipped_noisy_test_only(monkeypatch):
    """Every accept decision reads the value the noisy test released, and that value is
    clipped per example and noised. Mutation caught: deciding on the raw loss change."""
    released = []
    original = screening_module.noisy_loss_change

    def spy(before, after, **kw):
        value = original(before, after, **kw)
        released.append((before.clone(), after.clone(), kw, value))
        return value

    decided = []
    decide = screening_module.Annealer.decide

    def spy_decide(self, delta_e, u):
        decided.append(delta_e)
        return decide(self, delta_e, u)

    monkeypatch.setattr(screening_module, "noisy_loss_change", spy)
    monkeypatch.setattr(screening_module.Annealer, "decide", spy_decide)
    test_lots = _spy_lots(monkeypatch, screening_module)
    x, y = _data(n=200)
    mech = get_mechanism("screening")
    config = config_from_mapping(
        mech.config_type,
        {"epochs": 3, "batch_size": 32, "lr": 0.5, "noise_multiplier": 1.0, "validation_size": 40},
    )
    model = build_model("mlp", (6,), 3, seed=0).double()
    mech.train(model, x, y, config=config, generator=torch.Generator().manual_seed(0))
    assert decided and decided == [value for *_, value in released]
    # the test batches are Poisson lots at rate validation_size / N
    sizes = [len(lot) for n, q, lot in test_lots if abs(q - 40 / 200) < 1e-12]
    assert len(sizes) == len(decided) and np.var(sizes) > 0
    for before, after, kw, value in released:
        raw = float((after - before).sum()) / kw["expected_size"]
        clipped = float((after - before).clamp(-kw["clip"], kw["clip"]).sum()) / kw["expected_size"]
        assert (
            kw["noise_multiplier"] == config.validation_noise_multiplier
            and kw["clip"] == config.validation_clip
            and kw["expected_size"] == config.validation_size  # the expected, not the realised, size
        )
        assert value != pytest.approx(raw, abs=1e-12) and value != pytest.approx(clipped, abs=1e-12)  # noised


@pytest.mark.parametrize(
    "mechanism, options, label",
    [
        ("sgd", {}, "sgd"),
        ("dpsgd", {}, "dpsgd"),
        ("dplis", RECIPES["dplis"], "dplis"),
        ("encoding", ENCODING, "encoding"),
        ("screening", RECIPES["screening"], "screening-sound"),
        ("screening", {**RECIPES["screening"], "variant": "published"}, "screening-published"),
    ],
)
def test_each_loop_labels_its_progress_bar_with_its_mechanism(monkeypatch, mechanism, options, label):
    """The progress bar names the mechanism that trains (an encoding run labelled "dpsgd" would
    tell a user the wrong loop is running), counts the planned steps, advances one step at a
    time (published screening: one per accepted candidate) to the end, and is off when asked."""
    import mechanisms.sgd as sgd_module

    bars, updates = [], []

    class Counted:
        def __init__(self, bar):
            self.bar = bar

        def __enter__(self):
            self.bar.__enter__()
            return self

        def __exit__(self, *exc):
            return self.bar.__exit__(*exc)

        def update(self, n):
            updates.append(n)
            self.bar.update(n)

    for module in (dpsgd_module, screening_module, sgd_module):
        original = module.progress_bar

        def spy(total, desc, enabled, original=original):
            bars.append((total, desc, enabled))
            return Counted(original(total, desc, enabled))

        monkeypatch.setattr(module, "progress_bar", spy)
    _small_run(mechanism, options)
    # the published variant holds its validation examples out of training
    trained = 60 - options["validation_size"] if options.get("variant") == "published" else 60
    total = 2 * round(trained / 20)
    assert bars == [(total, label, False)]
    assert sum(updates) == total and all(n in (0, 1) for n in updates)  # the bar ends full, step by step


@pytest.mark.parametrize(
    "mechanism, options",
    [
        ("dpsgd", {}),
        ("dplis", RECIPES["dplis"]),
        ("encoding", {**ENCODING, "noise": "gaussian"}),
        ("screening", RECIPES["screening"]),
        ("screening", {**RECIPES["screening"], "variant": "published"}),
        ("sgd", {}),
    ],
)
def test_each_loop_returns_its_dp_event_and_its_history(mechanism, options):
    """A train function's result is the library's API: its DpEvent is what a caller composes
    further, so its epsilon (a fresh dp-accounting PLD accountant) must be the one recorded, and
    for DP-SGD, DPlis and Gaussian encoding it is the Poisson-subsampled Gaussian at the run's
    multiplier composed over its steps; sound screening spends more (its tests are released
    too). Runs without a formal guarantee return no event. The history has one row per epoch
    (published screening: per epoch of candidate steps, until enough are accepted)."""
    import dp_accounting

    private = {} if mechanism == "sgd" else {"noise_multiplier": 1.2, "delta": 1e-5}
    result = _small_run(mechanism, {**options, **private})
    epochs = [h["epoch"] for h in result.history]
    if options.get("variant") == "published":  # runs until enough candidates are accepted
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    else:
        assert epochs == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    p = result.privacy
    if not p.formal:
        assert result.event is None
        return
    assert dp_epsilon(result.event, 1, 1e-5) == pytest.approx(p.epsilon, rel=1e-9)
    gaussian = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(p.sample_rate, dp_accounting.GaussianDpEvent(1.2)), p.steps
    )
    assert p.noise_multiplier == 1.2 and p.steps == 6
    if mechanism == "screening":
        assert p.epsilon > dp_epsilon(gaussian, 1, 1e-5)
    else:
        assert p.epsilon == pytest.approx(dp_epsilon(gaussian, 1, 1e-5), rel=1e-9)
