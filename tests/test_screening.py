"""SA-DPSGD screening: rollback, forced acceptance, the acceptance law, and both accountings."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import stats

from audit.data import DataOptions
from audit.train import TrainRequest, train_target
from mechanisms.models import build_model
from mechanisms.screening import (
    Annealer,
    ScreeningConfig,
    Snapshot,
    acceptance_probability,
    noisy_loss_change,
    train_screening,
)
from mechanisms.training import make_optimizer

from .oracles import dp_epsilon
from .test_loops import _data


def _state(model, optimizer):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt = {
        i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for i, s in optimizer.state_dict()["state"].items()
    }
    return weights, opt, [dict(g) for g in optimizer.state_dict()["param_groups"]]


def _assert_bit_identical(a, b):
    (wa, oa, ga), (wb, ob, gb) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert oa.keys() == ob.keys()
    for i in oa:
        assert oa[i].keys() == ob[i].keys()
        for k in oa[i]:
            va, vb = oa[i][k], ob[i][k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb
    assert ga == gb


def _step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("steps_before", [0, 3])
def test_rejected_step_restores_parameters_and_optimizer_state_bit_identically(optimizer, steps_before):
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    opt = make_optimizer(model, ScreeningConfig(optimizer=optimizer, momentum=0.9, noise_multiplier=1.0))
    for s in range(steps_before):  # with steps_before = 0 the optimizer has no state yet
        _step(model, opt, s)
    snapshot = Snapshot(model, opt)
    before = _state(model, opt)
    _step(model, opt, 99)
    assert not all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    snapshot.restore()
    _assert_bit_identical(_state(model, opt), before)
    # the restored state then evolves exactly as the original would have
    _step(model, opt, 7)
    after_restore = _state(model, opt)
    twin = build_model("mlp", (1, 8, 8), 10, seed=0)
    twin_opt = make_optimizer(twin, ScreeningConfig(optimizer=optimizer, momentum=0.9, noise_multiplier=1.0))
    for s in range(steps_before):
        _step(twin, twin_opt, s)
    _step(twin, twin_opt, 7)
    _assert_bit_identical(after_restore, _state(twin, twin_opt))


def _digits(n=300):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_training_that_rejects_every_candidate_returns_the_initial_weights(monkeypatch):
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _digits()
    seen = []

    def reject(self, delta_e, u):
        self.candidates += 1
        self.rejections += 1
        seen.append(delta_e)
        return False

    monkeypatch.setattr(Annealer, "decide", reject)
    config = ScreeningConfig(
        epochs=2, batch_size=30, lr=0.5, momentum=0.9, noise_multiplier=1.0, validation_size=50
    )
    result = train_screening(model, x, y, config=config, generator=torch.Generator().manual_seed(0))
    assert len(seen) == result.extras["candidate_steps"] == 20
    assert any(d != 0 for d in seen)  # candidates really moved the model
    for k, v in result.state_dict.items():
        assert torch.equal(v, initial[k]), k
    assert result.extras["accepted_steps"] == 0


def test_forced_acceptance_after_max_rejections():
    a = Annealer(rate=1e6, max_rejections=5)
    assert a.decide(1.0, 0.999)  # t = 0: p = 1, every candidate accepted
    decisions = [a.decide(1.0, 0.5) for _ in range(12)]
    assert decisions == [False] * 5 + [True] + [False] * 5 + [True]
    assert a.forced == 2 and a.accepted == 3 and a.candidates == 13
    b = Annealer(rate=1e6, max_rejections=0)
    b.decide(1.0, 0.5)
    assert all(b.decide(1.0, 0.5) for _ in range(5))
    c = Annealer(rate=1e6, max_rejections=5)
    c.decide(1.0, 0.5)
    assert c.decide(-1e-9, 0.999) and c.decide(0.0, 0.999)  # a loss that does not rise is accepted
    d = Annealer(rate=1e6, max_rejections=2)
    d.decide(1.0, 0.5)
    assert [d.decide(1.0, 0.5) for _ in range(2)] == [False, False]
    assert d.decide(-1.0, 0.5) and d.forced == 0  # due for forcing, but accepted on its merits


@pytest.mark.parametrize("delta_e, accepted, rate", [(0.02, 3, 10.0), (0.5, 1, 1.0), (0.001, 200, 10.0)])
def test_acceptance_probability_follows_exp_minus_de_k_t(delta_e, accepted, rate):
    p = math.exp(-delta_e * rate * accepted)
    assert acceptance_probability(delta_e, accepted, rate) == pytest.approx(p, rel=1e-15)
    # a loss that does not rise: probability exactly 1
    assert (
        acceptance_probability(-delta_e, accepted, rate) == 1.0 == acceptance_probability(0.0, accepted, rate)
    )
    rng = np.random.default_rng(0)
    n, hits = 20_000, 0
    for u in rng.random(n):
        a = Annealer(rate=rate, max_rejections=5)
        a.accepted = accepted
        hits += a.decide(delta_e, float(u))
    # exact two-sided binomial test; a wrong law (e.g. t+1, or k/t) fails with p ~ 0
    assert stats.binomtest(hits, n, p).pvalue > 1e-4


def test_noisy_loss_change_clips_each_example_and_noise_has_the_stated_scale():
    # losses before the step are not zero, so after + before (a mutant mutmut found surviving
    # when they were) differs from after - before
    before = torch.tensor([2.0, 3.0, 0.5, 1.0, 0.25, 4.0], dtype=torch.float64)
    after = before + torch.tensor([5.0, -5.0, 0.05, -0.02, 1.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    tiny = noisy_loss_change(before, after, clip=0.1, noise_multiplier=1e-12, expected_size=6, generator=g)
    assert tiny == pytest.approx((0.1 - 0.1 + 0.05 - 0.02 + 0.1 + 0.0) / 6, abs=1e-12)
    draws = np.array(
        [
            noisy_loss_change(before, before, clip=0.1, noise_multiplier=2.0, expected_size=1, generator=g)
            for _ in range(4000)
        ]
    )
    # N(0, (2 C_v sigma_v)^2) = N(0, 0.4^2): Kolmogorov-Smirnov against the stated law
    assert stats.kstest(draws, stats.norm(scale=0.4).cdf).pvalue > 1e-3


def _train(tmp_path, name, **options):
    req = TrainRequest(
        dataset="digits",
        model="mlp",
        mechanism="screening",
        options={"epochs": 3, "batch_size": 64, "lr": 0.5, **options},
        data_options=DataOptions(),
        progress=False,
    )
    train_target(req, tmp_path / name)
    return json.loads((tmp_path / name / "model.json").read_text())


def test_sound_epsilon_equals_dp_accounting_composition_recomputed_from_model_json(tmp_path):
    meta = _train(tmp_path, "sound", epsilon=4.0, validation_size=40, validation_noise_multiplier=3.0)
    p, h, x = meta["privacy"], meta["hyperparameters"], meta["extras"]
    assert p["formal"] is True and h["variant"] == "sound"
    n = meta["members"]
    steps = x["candidate_steps"]
    assert p["steps"] == steps == h["epochs"] * round(n / h["batch_size"])  # every candidate counted
    assert x["accepted_steps"] <= steps
    train_event = dp_accounting.PoissonSampledDpEvent(
        h["batch_size"] / n, dp_accounting.GaussianDpEvent(p["noise_multiplier"])
    )
    test_event = dp_accounting.PoissonSampledDpEvent(
        h["validation_size"] / n, dp_accounting.GaussianDpEvent(h["validation_noise_multiplier"])
    )
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([train_event, test_event]), steps)
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(p["delta"]), rel=1e-9)
    assert 0.99 * 4.0 <= p["epsilon"] <= 4.0
    # the test is not free: the same sigma without the test event gives a smaller epsilon
    alone = dp_accounting.pld.PLDAccountant()
    alone.compose(train_event, steps)
    assert alone.get_epsilon(p["delta"]) < p["epsilon"]


def test_published_counts_accepted_steps_only_and_says_formal_false(tmp_path):
    meta = _train(
        tmp_path, "pub", noise_multiplier=1.0, variant="published", validation_size=60, anneal_rate=50.0
    )
    p, h, x = meta["privacy"], meta["hyperparameters"], meta["extras"]
    assert p["formal"] is False and "accepted" in p["note"] and "no DP protection" in p["note"]
    n_train = meta["members"] - h["validation_size"]  # the held-out examples never give gradients
    assert p["sample_rate"] == pytest.approx(h["batch_size"] / n_train)
    planned = h["epochs"] * round(n_train / h["batch_size"])
    assert x["accepted_steps"] == p["steps"] == planned  # runs until the planned steps are accepted
    assert x["candidate_steps"] > x["accepted_steps"]  # this setting rejects some candidates

    def eps(steps):
        acc = dp_accounting.pld.PLDAccountant()
        event = dp_accounting.PoissonSampledDpEvent(p["sample_rate"], dp_accounting.GaussianDpEvent(1.0))
        acc.compose(event, steps)
        return acc.get_epsilon(p["delta"])

    assert p["epsilon"] == pytest.approx(eps(x["accepted_steps"]), rel=1e-9)
    assert x["epsilon_counting_every_candidate"] == pytest.approx(eps(x["candidate_steps"]), rel=1e-9)
    assert x["epsilon_counting_every_candidate"] > p["epsilon"]


def test_a_published_run_needs_training_data_beside_its_held_out_examples():
    x, y = _digits(100)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    with pytest.raises(ValueError, match="leaves no training data"):
        train_screening(
            model,
            x,
            y,
            config=ScreeningConfig(
                noise_multiplier=1.0, variant="published", validation_size=100, batch_size=10
            ),
            generator=torch.Generator(),
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="faithful"), r"^variant must be one of sound, published, got 'faithful'$"),
        (dict(anneal_rate=-1.0), r"^anneal_rate must be a finite number >= 0, got -1.0$"),
        (dict(anneal_rate=math.inf), r"^anneal_rate must be a finite number >= 0, got inf$"),
        (dict(anneal_rate=math.nan), r"^anneal_rate must be a finite number >= 0, got nan$"),
        (dict(max_rejections=-1), r"^max_rejections must be >= 0, got -1$"),
        (dict(validation_size=0), r"^validation_size must be >= 1, got 0$"),
        (dict(validation_clip=0.0), r"^validation_clip must be > 0, got 0.0$"),
        (dict(validation_noise_multiplier=0.0), r"^validation_noise_multiplier must be > 0, got 0.0$"),
    ],
)
def test_screening_options_outside_their_domain_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScreeningConfig(noise_multiplier=1.0, **kwargs)


def test_screening_options_at_the_edges_of_their_domain_are_accepted():
    """An anneal rate of 0 (every candidate accepted), no rejection tolerated before a forced
    acceptance, a test of one expected example, a test noise multiplier below 1."""
    config = ScreeningConfig(
        noise_multiplier=1.0,
        anneal_rate=0.0,
        max_rejections=0,
        validation_size=1,
        validation_noise_multiplier=0.5,
    )
    assert (config.anneal_rate, config.max_rejections, config.validation_size) == (0.0, 0, 1)


def test_summary_says_a_stated_epsilon_is_not_a_bound_and_gives_the_reason():
    from reports.render import render_markdown

    attack = {
        "auc": 0.52,
        "auc_ci": [0.5, 0.54],
        "tpr_at_fpr": {"0.001": 0.001, "0.01": 0.01},
        "epsilon_lb": 0.0,
    }
    results = {
        "dataset": {"id": "mnist5k", "population": 5000},
        "targets": [
            {
                "id": "screening-published-eps8",
                "privacy": {
                    "formal": False,
                    "epsilon": 7.9989,
                    "delta": 1e-5,
                    "note": "counts accepted steps only",
                },
                "test_accuracy": 0.92,
                "attacks": {"loss": attack},
            },
            {
                "id": "screening-sound-eps8",
                "privacy": {
                    "formal": True,
                    "epsilon": 7.9988,
                    "delta": 1e-5,
                    "accountant": "pld",
                    "note": "x",
                },
                "test_accuracy": 0.93,
                "attacks": {"loss": attack},
            },
        ],
    }
    md = render_markdown(results)
    assert "| screening-published-eps8 | no formal guarantee (stated ε = 7.999, not a bound) |" in md
    assert "| screening-sound-eps8 | ε = 7.999, δ = 1e-05 (pld) |" in md
    assert "- screening-published-eps8: counts accepted steps only" in md
    assert "- screening-sound-eps8" not in md  # formal runs need no caveat


@pytest.mark.parametrize(
    ("options", "restores_optimizer"),
    [
        ({"variant": "published"}, False),  # as published: the weights only
        ({"variant": "sound"}, True),  # a rejected candidate leaves no trace in any state
        ({"variant": "published", "restore_optimizer": True}, True),
        ({"variant": "sound", "restore_optimizer": False}, False),
    ],
)
def test_a_rejection_restores_the_optimizer_state_as_each_variant_says(
    tmp_path, monkeypatch, options, restores_optimizer
):
    import mechanisms.annealing as annealing

    calls = []
    original = annealing.Snapshot.restore

    def spy(self, optimizer=True):
        calls.append(optimizer)
        momentum = {
            p: s["momentum_buffer"].clone() for p, s in self.optimizer.state.items() if "momentum_buffer" in s
        }
        original(self, optimizer=optimizer)
        for p, before in momentum.items():  # with optimizer=False the momentum is left as it was
            kept = torch.equal(self.optimizer.state[p]["momentum_buffer"], before)
            assert kept == (not optimizer) or not self.state.get(p)

    monkeypatch.setattr(annealing.Snapshot, "restore", spy)
    meta = _train(
        tmp_path, "r", noise_multiplier=1.0, momentum=0.9, validation_size=60, anneal_rate=50.0, **options
    )
    assert meta["extras"]["candidate_steps"] > meta["extras"]["accepted_steps"]  # some rejections happened
    assert calls and set(calls) == {restores_optimizer}


def test_the_noisy_test_draws_its_noise_from_the_training_generator():
    """Reproducible from the run's seed whatever torch's global generator does in between."""
    before = after = torch.zeros(5, dtype=torch.float64)
    kw = dict(clip=0.1, noise_multiplier=2.0, expected_size=5)
    torch.manual_seed(1)
    a = noisy_loss_change(before, after, generator=torch.Generator().manual_seed(3), **kw)
    torch.manual_seed(2)
    b = noisy_loss_change(before, after, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b != 0.0


# the extras every screening run records
COUNTS = ("variant", "candidate_steps", "accepted_steps", "acceptance_rate", "forced_acceptances")
TINY = dict(epochs=3, batch_size=16, lr=0.5, noise_multiplier=1.0, validation_size=16, progress=False)


def _screen(n=80, seed=5, **options):
    """Screening on ``_data(n)`` (6 features, 3 classes) with a float64 MLP: ``TINY``
    overridden by ``options``; returns the result and the configuration."""
    x, y = _data(n)
    config = ScreeningConfig(**{**TINY, **options})
    model = build_model("mlp", (6,), 3, seed=0).double()
    return train_screening(model, x, y, config=config, generator=torch.Generator().manual_seed(seed)), config


@pytest.mark.parametrize("variant", ["sound", "published"])
def test_screening_is_reproducible_from_its_generator_and_leaves_the_global_stream_alone(variant):
    """Every draw (lots, the noisy test, the annealing uniforms) comes from the run's generator:
    the same generator seed gives the same weights and decisions whatever torch's global stream
    holds, and the global stream is not advanced."""

    def run(global_seed):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        result, _ = _screen(anneal_rate=50.0, variant=variant)
        assert torch.equal(torch.random.get_rng_state(), state)  # the global stream untouched
        return result

    first, second = run(0), run(1)
    assert first.extras == second.extras
    assert 0 < first.extras["accepted_steps"] < first.extras["candidate_steps"]  # the uniforms decided
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_published_screening_records_its_counts_and_the_chosen_accountants_epsilons(accountant):
    """The extras record counts and the rate by name; both epsilons (accepted steps, every
    candidate) come from the accountant the run was given; the privacy record names the run's
    multiplier, clip norm and accountant."""
    result, config = _screen(
        noise_multiplier=1.1, clip_norm=0.7, anneal_rate=50.0, variant="published", accountant=accountant
    )
    x_, p = result.extras, result.privacy
    accepted, candidates = x_["accepted_steps"], x_["candidate_steps"]
    assert set(x_) == {*COUNTS, "epsilon_counting_every_candidate"}
    assert x_["variant"] == "published" and 0 < accepted < candidates
    assert x_["acceptance_rate"] == accepted / candidates and 0 <= x_["forced_acceptances"] <= accepted
    assert (p.noise_multiplier, p.clip_norm, p.accountant, p.steps) == (1.1, 0.7, accountant, accepted)

    def eps(steps):
        step = dp_accounting.PoissonSampledDpEvent(16 / 64, dp_accounting.GaussianDpEvent(1.1))
        return dp_epsilon(step, steps, config.delta, accountant)

    assert p.epsilon == pytest.approx(eps(accepted), rel=1e-9)
    every = x_["epsilon_counting_every_candidate"]
    assert every == pytest.approx(eps(candidates), rel=1e-9)
    assert p.sample_rate == 16 / 64 and p.delta == config.delta and result.event is None
    assert p.note == (
        f"SA-DPSGD as published: epsilon {p.epsilon:.4g} counts only the {accepted} accepted of "
        f"{candidates} candidate steps. Not a guarantee: rejected candidates still spend privacy "
        f"(counting every candidate gives epsilon {every:.4g}), and the acceptance test reads 16 "
        "held-out training examples without noise, which have no DP protection at all."
    )


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_sound_screening_records_its_rates_and_the_chosen_accountants_epsilon(accountant):
    """The sound variant's record: every candidate counted, the test's sample rate, the
    training and test events composed by the run's accountant, the note word for word."""
    result, config = _screen(
        noise_multiplier=1.1,
        clip_norm=0.7,
        validation_size=20,
        validation_noise_multiplier=4.0,
        accountant=accountant,
    )
    x_, p = result.extras, result.privacy
    assert set(x_) == {*COUNTS, "validation_sample_rate"}
    assert x_["validation_sample_rate"] == 20 / 80 and x_["candidate_steps"] == p.steps == 3 * 5
    assert (p.formal, p.noise_multiplier, p.clip_norm, p.accountant) == (True, 1.1, 0.7, accountant)
    assert p.sample_rate == 16 / 80 and p.delta == config.delta
    train_event = dp_accounting.PoissonSampledDpEvent(16 / 80, dp_accounting.GaussianDpEvent(1.1))
    test_event = dp_accounting.PoissonSampledDpEvent(20 / 80, dp_accounting.GaussianDpEvent(4.0))
    step = dp_accounting.ComposedDpEvent([train_event, test_event])
    assert p.epsilon == pytest.approx(dp_epsilon(step, 15, config.delta, accountant), rel=1e-9)
    assert p.note == (
        "SA-DPSGD, sound variant: every candidate step counted; the acceptance test releases clipped "
        "per-example loss differences on a Poisson-sampled batch with Gaussian noise; training "
        "(q=0.2, sigma=1.1) and test (q=0.25, sigma=4) composed as two Poisson-sampled Gaussian "
        "events in dp-accounting, add/remove-one adjacency"
    )


def test_a_one_step_run_records_its_acceptance_rate():
    """One candidate, accepted (the first always is: its acceptance probability is 1 with no
    step accepted yet): the rate is 1, not 1/2."""
    result, _ = _screen(n=64, epochs=1, batch_size=64)
    assert (result.extras["candidate_steps"], result.extras["accepted_steps"]) == (1, 1)
    assert result.extras["acceptance_rate"] == 1.0


def test_sound_screening_may_test_on_every_example_but_not_on_more():
    """validation_size is the test's expected batch size (rate validation_size / N): N is the
    largest it can be; above that the run is refused by name."""
    result, _ = _screen(n=40, epochs=1, batch_size=10, validation_size=40)
    assert result.extras["validation_sample_rate"] == 1.0
    with pytest.raises(ValueError, match=r"^validation_size 41 exceeds the 40 training examples$"):
        _screen(n=40, epochs=1, batch_size=10, validation_size=41)


@pytest.mark.parametrize(
    "variant, n, batch, seed",
    [("sound", 80, 16, 5), ("published", 80, 16, 5), ("sound", 3, 1, 9)],
    ids=["sound", "published", "tiny"],
)
def test_screening_history_is_each_epochs_mean_training_loss(monkeypatch, variant, n, batch, seed):
    """Each history row is the mean loss over the examples of that epoch's candidate lots (the
    lots' summed losses over their sizes), with the counts after that epoch; a cosine schedule
    runs over the planned steps. The sound variant stops after the planned candidates. The tiny
    case has an epoch whose lots hold one example in all (its mean is that example's loss)."""
    import mechanisms.screening as screening_module

    steps, at = [], []
    original = screening_module.dpsgd_step

    def spy(*args, **kwargs):
        loss_sum, size = original(*args, **kwargs)
        steps.append((loss_sum, size))
        at.append(kwargs["at"])
        return loss_sum, size

    monkeypatch.setattr(screening_module, "dpsgd_step", spy)
    validation = 16 if n > 3 else 1
    result, _ = _screen(
        n,
        seed,
        batch_size=batch,
        validation_size=validation,
        anneal_rate=50.0,
        variant=variant,
        schedule="cosine",
    )
    per_epoch = round((n - validation if variant == "published" else n) / batch)
    assert len(steps) == result.extras["candidate_steps"]
    assert len(result.history) == math.ceil(len(steps) / per_epoch)
    examples = []
    for i, row in enumerate(result.history):
        epoch = steps[i * per_epoch : (i + 1) * per_epoch]
        examples.append(sum(size for _, size in epoch))
        assert row["epoch"] == i + 1
        mean = sum(loss for loss, _ in epoch) / examples[-1] if examples[-1] else 0.0
        assert row["train_loss"] == pytest.approx(mean, rel=1e-12)
        assert row["candidate_steps"] == min((i + 1) * per_epoch, len(steps))
    assert result.history[-1]["accepted_steps"] == result.extras["accepted_steps"]
    # the (epoch, step) a non-finite loss is reported at: candidates numbered within their epoch
    assert at == [(i // per_epoch + 1, i % per_epoch + 1) for i in range(len(steps))]
    if variant == "sound":  # every candidate counted: exactly the planned steps
        assert len(steps) == 3 * per_epoch
    if n == 3:
        assert 1 in examples
