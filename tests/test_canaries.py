"""Gradient canaries: they leave the model alone, follow the mechanism's law, and catch bugs."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import make_classification

import mechanisms.dpsgd as dpsgd_module
import mechanisms.per_example as per_example
import mechanisms.privatise as privatise_module
from audit.canary import canary_audits
from mechanisms import build_model, config_from_mapping, get_mechanism
from mechanisms.canaries import GradientCanaries, StepLaw
from mechanisms.dplis import smoothed_noisy_gradient
from mechanisms.dpsgd import DpSgdConfig, DpSgdPlan, dpsgd_gradient, train_private
from mechanisms.encoding import Encoder, EncodingConfig


@pytest.fixture(scope="module")
def data():
    x, y = make_classification(600, 20, n_informative=10, random_state=0)
    return torch.tensor(x[:400], dtype=torch.float32), torch.tensor(y[:400])


def _train(mechanism, options, data, canaries=None, seed=0):
    x, y = data
    mech = get_mechanism(mechanism)
    config = config_from_mapping(mech.config_type, options)
    model = build_model("mlp", (20,), 2, seed=seed)
    extra = {"canaries": canaries} if canaries is not None else {}
    return mech.train(model, x, y, config=config, generator=torch.Generator().manual_seed(seed), **extra)


RECIPES = [
    ("sgd", dict(epochs=2, batch_size=32, lr=0.05)),
    ("dpsgd", dict(epochs=2, batch_size=64, lr=0.1, noise_multiplier=1.0)),
    (
        "dpsgd",
        dict(epochs=2, batch_size=64, lr=0.01, noise_multiplier=1.0, optimizer="adam", weight_decay=0.01),
    ),
    ("dplis", dict(epochs=2, batch_size=64, lr=0.1, noise_multiplier=1.0, smooth_samples=2)),
    ("encoding", dict(epochs=2, batch_size=64, lr=0.1, noise_multiplier=1.0, top_k=50, codebook_size=8)),
    ("screening", dict(epochs=2, batch_size=64, lr=0.1, noise_multiplier=1.0, validation_size=64)),
    (
        "screening",
        dict(epochs=2, batch_size=64, lr=0.1, noise_multiplier=1.0, validation_size=64, variant="published"),
    ),
]


@pytest.mark.parametrize("mechanism, options", RECIPES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(RECIPES)])
def test_canaries_leave_the_real_parameters_bit_for_bit(mechanism, options, data):
    without = _train(mechanism, options, data)
    canaries = GradientCanaries(500, seed=7)
    with_canaries = _train(mechanism, options, data, canaries)
    assert without.state_dict.keys() == with_canaries.state_dict.keys()
    for name, value in without.state_dict.items():
        assert torch.equal(value, with_canaries.state_dict[name]), name
    record = canaries.result()
    assert record.steps > 0 and record.law is not None
    assert torch.isfinite(record.llr).all() and torch.isfinite(record.final).all()
    assert bool((record.final != 0).any())  # the block did go through the optimizer


@pytest.mark.parametrize("noise, df", [("gaussian", 0.0), ("laplace", 0.0), ("studentt", 5.0)])
def test_step_law_log_ratio_matches_scipy_densities(noise, df):
    law = StepLaw(noise, scale=0.7, shift=0.3, sample_rate=0.2, df=df)
    x = np.linspace(-4, 4, 101)
    dist = {
        "gaussian": stats.norm(0, 0.7),
        "laplace": stats.laplace(0, 0.7),
        "studentt": stats.t(df, 0, 0.7),
    }[noise]
    expected = np.log(1 - 0.2 + 0.2 * dist.pdf(x - 0.3) / dist.pdf(x))
    np.testing.assert_allclose(law.log_ratio(torch.from_numpy(x)).numpy(), expected, rtol=1e-10, atol=1e-12)
    # with q = 1 it is the plain log density ratio
    full = StepLaw(noise, scale=0.7, shift=0.3, sample_rate=1.0, df=df)
    np.testing.assert_allclose(
        full.log_ratio(torch.from_numpy(x)).numpy(),
        np.log(dist.pdf(x - 0.3) / dist.pdf(x)),
        rtol=1e-9,
        atol=1e-12,
    )


def _simulate(law, steps, included, m, rng):
    """Monte Carlo of the claimed law: the white-box-steps score of m canaries."""
    total = np.zeros(m)
    for _ in range(steps):
        b = (rng.random(m) < law.sample_rate) & included
        x = b * law.shift + rng.normal(0.0, law.scale, m)
        total += law.log_ratio(torch.from_numpy(x)).numpy()
    return total


def test_white_box_steps_scores_follow_the_exact_law(data):
    """The scores DP-SGD's canaries record are distributed as the claimed law says (two-sample
    KS against a Monte Carlo of it, included and excluded canaries apart); a law whose noise
    is 15% off is rejected, so the check has power."""
    canaries = GradientCanaries(6000, seed=3)
    _train("dpsgd", dict(epochs=5, batch_size=64, lr=0.1, noise_multiplier=0.8), data, canaries)
    record = canaries.result()
    law, steps = record.law, record.steps
    assert steps == 5 * round(400 / 64)
    inc = record.included.numpy()
    llr = record.llr.numpy()
    rng = np.random.default_rng(0)
    for included in (True, False):
        simulated = _simulate(law, steps, np.full(8000, included), 8000, rng)
        assert stats.ks_2samp(llr[inc == included], simulated).pvalue > 1e-3
    wrong = StepLaw("gaussian", scale=law.scale * 1.15, shift=law.shift, sample_rate=law.sample_rate)
    off = np.zeros(8000)
    for _ in range(steps):
        off += law.log_ratio(torch.from_numpy(rng.normal(0.0, wrong.scale, 8000))).numpy()
    assert stats.ks_2samp(llr[~inc], off).pvalue < 1e-3


def test_screening_releases_only_accepted_steps(data):
    canaries = GradientCanaries(500, seed=1)
    result = _train(
        "screening",
        dict(epochs=3, batch_size=64, lr=2.0, noise_multiplier=1.0, validation_size=64, validation_clip=1.0),
        data,
        canaries,
    )
    record = canaries.result()
    assert record.candidates == result.extras["candidate_steps"]
    assert record.steps == result.extras["accepted_steps"] < record.candidates  # some were rejected


def test_rejected_screening_candidates_leave_the_canary_block_as_it_was(monkeypatch, data):
    """A rejected candidate is rolled back in the canary block too: were it not, the block's
    final value (the white-box-final score) would carry steps that were never released."""
    from mechanisms.screening import Annealer

    def reject(self, delta_e, u):
        self.candidates += 1
        self.rejections += 1
        return False

    monkeypatch.setattr(Annealer, "decide", reject)
    canaries = GradientCanaries(500, seed=1)
    options = dict(epochs=2, batch_size=64, lr=2.0, momentum=0.9, noise_multiplier=1.0, validation_size=64)
    _train("screening", options, data, canaries)
    record = canaries.result()
    assert record.steps == 0 and record.candidates == 2 * round(400 / 64)
    assert torch.equal(record.final, torch.zeros(500, dtype=torch.float64))


def test_encoding_canary_is_one_clamped_coordinate():
    config = EncodingConfig(top_k=30, codebook_size=6, noise_multiplier=1.0)
    encoder = Encoder(config, dim=200)
    top = float(encoder.codebook[:, 0].max())
    assert config.clip_norm * config.quant_multiplier > top  # so the clamp binds
    assert encoder.canary_value(config.clip_norm, 10.0) == pytest.approx(top)
    plan = DpSgdPlan(0.1, 10, 1.0, 64.0)
    law = encoder.law(plan, 10.0)
    assert (
        law.shift == pytest.approx(top / 64.0)
        and law.scale == pytest.approx(1.0 / 64.0)
        and law.noise == "studentt"
    )


def test_encoding_canaries_release_the_encoded_value_over_the_lot_size():
    """A canary lot through encoding: included canaries released at canary_value / b (noise
    negligible), excluded at 0; the denoiser's factor scales the update only. With C != 1 and
    a factor != 1 so that misplaced factors show (mutation testing found these unchecked)."""
    config = EncodingConfig(top_k=30, codebook_size=6, noise_multiplier=1.0, clip_norm=2.0)
    encoder = Encoder(config, dim=200)
    canaries = GradientCanaries(300, seed=0, norm=3.0)
    lot = canaries.draw(1.0, dpsgd_module.poisson_lot)  # every included canary
    encoder._privatise_canaries(lot, scale=1e-12, expected=8.0, factor=0.25)
    value = encoder.canary_value(2.0, 3.0)
    assert value > 0
    expected = canaries.included.float() * value / 8.0
    torch.testing.assert_close(lot.released, expected.to(lot.released), atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(lot.update, lot.released * 0.25)
    # the encoded canary is the clipped, scaled, clamped first coordinate: below C times the
    # multiplier and at most the largest codeword's first entry
    top = float(encoder.codebook[:, 0].max())
    assert value == pytest.approx(min(top, 2.0 * config.quant_multiplier))
    # where the clamp does not bind, the value is the clip norm times the multiplier
    small = Encoder(
        EncodingConfig(top_k=30, codebook_size=6, noise_multiplier=1.0, clip_norm=4.0, quant_multiplier=0.05),
        dim=200,
    )
    assert float(small.codebook[:, 0].max()) > 4.0 * 0.05
    assert small.canary_value(4.0, 3.0) == pytest.approx(4.0 * 0.05)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_dplis_canaries_are_clipped_like_dpsgd(reduce):
    model = build_model("mlp", (20,), 2, seed=0)
    x, y = torch.randn(16, 20), torch.randint(0, 2, (16,))
    canaries = GradientCanaries(200, seed=0, norm=3.0)
    lot = canaries.draw(1.0, dpsgd_module.poisson_lot)  # every included canary
    smoothed_noisy_gradient(
        model,
        x,
        y,
        clip_norm=0.5,
        noise_multiplier=1e-12,
        expected_batch_size=8.0,
        smooth_sigma=0.01,
        smooth_samples=3,
        generator=torch.Generator().manual_seed(0),
        reduce=reduce,
        canaries=lot,
    )
    expected = canaries.included.float() * 0.5 / 8.0  # clipped to C, divided by the lot size
    torch.testing.assert_close(lot.released, expected, atol=1e-9, rtol=1e-5)


# --- planted bugs (AUDITING.md): each claims epsilon 2 from the correct accountant ---------------

BUG_CONFIG = DpSgdConfig(epochs=10, batch_size=64, lr=0.1, epsilon=2.0)


def _audit_dpsgd(data, make_gradient=None):
    x, y = data
    canaries = GradientCanaries(20_000, seed=11)
    model = build_model("mlp", (20,), 2, seed=0)
    result = train_private(
        model,
        x,
        y,
        config=BUG_CONFIG,
        generator=torch.Generator().manual_seed(0),
        canaries=canaries,
        make_gradient=make_gradient,
    )
    eps = result.privacy.epsilon
    assert eps == pytest.approx(2.0, abs=0.01)
    audits = canary_audits(
        canaries.result(),
        threat_models=("white-box-steps", "white-box-final"),
        delta=1e-5,
        confidence=0.95,
        accountant_epsilon=eps,
        formal=True,
    )
    return {a["threat_model"]: max(b["epsilon_lb"] for b in a["bounds"] if b["valid"]) for a in audits}


def test_correct_dpsgd_audits_below_its_epsilon(data):
    strongest = _audit_dpsgd(data)
    assert all(0 < v < 2.0 for v in strongest.values()), strongest


def test_planted_bug_noise_a_tenth_of_what_is_accounted(data):
    def broken(plan, optimizer):
        weak = DpSgdPlan(plan.sample_rate, plan.steps, plan.noise_multiplier / 10, plan.expected_batch_size)
        return dpsgd_gradient(BUG_CONFIG, weak, torch.Generator().manual_seed(0))

    strongest = _audit_dpsgd(data, broken)
    assert strongest["white-box-steps"] > 2.0 and strongest["white-box-final"] > 2.0, strongest


def test_planted_bug_clipping_skipped(data, monkeypatch):
    monkeypatch.setattr(per_example, "clip_factors", lambda norms, clip_norm: torch.ones_like(norms))
    strongest = _audit_dpsgd(data)
    assert strongest["white-box-steps"] > 2.0 and strongest["white-box-final"] > 2.0, strongest


def test_planted_bug_every_example_in_every_lot(data, monkeypatch):
    monkeypatch.setattr(dpsgd_module, "poisson_lot", lambda n, rate, g: torch.arange(n, device=g.device))
    strongest = _audit_dpsgd(data)
    assert strongest["white-box-steps"] > 2.0 and strongest["white-box-final"] > 2.0, strongest


def test_planted_bug_noise_reused_at_every_step(data, monkeypatch):
    """Caught step by step only: excluded canaries' observations stop varying across steps, which
    the variance score (chosen on calibration canaries) sees; the final weights do not show it."""
    cache = {}

    def reused(total, *, clip_norm, noise_multiplier, expected_batch_size, generator):
        for key, t in total.items():
            if (key, t.shape) not in cache:
                cache[(key, t.shape)] = torch.normal(
                    0.0, noise_multiplier * clip_norm, t.shape, generator=generator, dtype=t.dtype
                )
            t.add_(cache[(key, t.shape)]).div_(expected_batch_size)
        return total

    monkeypatch.setattr(privatise_module, "add_noise", reused)
    strongest = _audit_dpsgd(data)
    assert strongest["white-box-steps"] > 2.0, strongest
    assert strongest["white-box-final"] < 2.0, strongest


def test_sgd_canaries_hit_the_ceiling(data):
    canaries = GradientCanaries(4000, seed=2)
    _train("sgd", dict(epochs=2, batch_size=32, lr=0.05), data, canaries)
    audits = canary_audits(
        canaries.result(),
        threat_models=("white-box-steps",),
        delta=1e-5,
        confidence=0.95,
        accountant_epsilon=None,
        formal=False,
    )
    one_run = next(b for b in audits[0]["bounds"] if b["method"] == "one-run")
    assert one_run["saturated"] and one_run["epsilon_lb"] > 3.0
    assert math.isfinite(one_run["ceiling"])


def test_sgd_canaries_follow_their_schedule_exactly(data):
    """The baseline's canaries, redrawn from the seed: each included canary is seen once per
    epoch at a uniform step and adds norm / (that batch's size); excluded ones never."""
    count, seed, epochs, batch = 300, 5, 2, 32
    canaries = GradientCanaries(count, seed=seed, calibration=0.3)
    _train("sgd", dict(epochs=epochs, batch_size=batch, lr=0.05), data, canaries)
    record = canaries.result()
    n = len(data[1])
    steps = -(-n // batch)
    sizes = torch.tensor([min(batch, n - s * batch) for s in range(steps)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    included = torch.rand(count, generator=g) < 0.5
    calibration = torch.rand(count, generator=g) < 0.3
    expected = torch.zeros(count, dtype=torch.float64)
    seen_last = torch.zeros(count, dtype=torch.bool)
    for _ in range(epochs):
        at = torch.randint(0, steps, (count,), generator=g)
        expected += torch.where(included, batch / sizes[at], 0.0)
        seen_last |= included & (at == steps - 1)
    assert sizes[-1] < batch and bool(seen_last.any())  # the smaller last batch is exercised
    assert torch.equal(record.included, included) and torch.equal(record.calibration, calibration)
    assert record.steps == record.candidates == epochs * steps
    assert torch.equal(record.llr, expected)  # "none": the count of sightings in shift units
    assert bool((record.final[~included] == 0).all()) and bool((record.final[included] < 0).all())


@pytest.mark.parametrize(
    "law",
    [
        StepLaw("gaussian", scale=0.7, shift=0.3, sample_rate=0.2),
        StepLaw("laplace", scale=0.5, shift=0.25, sample_rate=1.0),
        StepLaw("studentt", scale=0.4, shift=0.6, sample_rate=0.1, df=3.5),
        StepLaw("none", scale=0.0, shift=0.125, sample_rate=0.08),
    ],
    ids=lambda law: law.noise,
)
def test_step_law_json_names_its_fields_and_reloads(law):
    """model.json records the law with to_json; audit.canary.load_record rebuilds it with
    StepLaw(**law): the names are the constructor's, and df is there exactly for Student-t."""
    record = law.to_json()
    keys = {"noise", "scale", "shift", "sample_rate"} | ({"df"} if law.noise == "studentt" else set())
    assert set(record) == keys
    assert StepLaw(**record) == law


def test_canary_gradient_norms_are_norm_times_clip_norm_in_the_block_dtype():
    canaries = GradientCanaries(40, seed=1, norm=4.0, dtype=torch.float64)
    lot = canaries.draw(1.0, dpsgd_module.poisson_lot)
    assert len(lot.index) == int(canaries.included.sum()) > 0
    norms = lot.gradient_norms(0.5)
    assert norms.dtype == torch.float64 and lot.dtype == torch.float64
    assert torch.equal(norms, torch.full((len(lot.index),), 2.0, dtype=torch.float64))
    assert torch.equal(lot.gradient_norms(0.5, 3.0), torch.full_like(norms, 6.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise="normal"), r"^noise law must be one of gaussian, laplace, studentt, none, got 'normal'$"),
        (dict(sample_rate=0.0), r"^sample_rate must be in \(0, 1\], got 0.0$"),
        (dict(sample_rate=1.5), r"^sample_rate must be in \(0, 1\], got 1.5$"),
        (dict(scale=0.0), r"^noise scale must be > 0, got 0.0$"),
        (dict(noise="laplace", scale=-1.0), r"^noise scale must be > 0, got -1.0$"),
        (dict(shift=0.0), r"^canary shift must be a finite number > 0, got 0.0$"),
        (dict(shift=-0.5), r"^canary shift must be a finite number > 0, got -0.5$"),
        (dict(shift=math.inf), r"^canary shift must be a finite number > 0, got inf$"),
        (dict(noise="studentt", df=0.0), r"^Student-t degrees of freedom must be > 0, got 0.0$"),
    ],
)
def test_step_law_refuses_laws_outside_its_domain(kwargs, message):
    law = dict(noise="gaussian", scale=1.0, shift=1.0, sample_rate=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        StepLaw(**law)


def test_step_law_accepts_the_edges_of_its_domain():
    StepLaw("gaussian", scale=1.0, shift=1.0, sample_rate=1.0)
    StepLaw("studentt", scale=1.0, shift=1.0, sample_rate=0.5, df=0.5)  # heavy tails are a law
    StepLaw("none", scale=0.0, shift=1.0, sample_rate=0.5)  # no noise needs no scale


def test_the_record_is_the_committed_steps_statistics():
    """result(): llr, mean-square-minus-squared-mean variance and final value, computed by hand
    from the released values that were committed (a discarded one left out)."""
    canaries = GradientCanaries(6, seed=3, norm=2.5)
    law = StepLaw("gaussian", scale=0.8, shift=0.4, sample_rate=0.5)
    canaries.law = law
    released = torch.tensor(
        [
            [0.3, -1.0, 2.0, 0.0, 0.5, 1.5],
            [1.1, 0.2, -0.7, 0.0, 0.5, 2.5],
            [9.0] * 6,
            [-0.4, 0.6, 0.1, 0.0, 0.5, 3.5],
        ]
    )
    for i, x in enumerate(released):
        lot = canaries.draw(0.5, dpsgd_module.poisson_lot)
        lot.released, lot.update = x.clone(), x.clone()
        canaries.record(lot)
        if i == 2:
            canaries.discard()
        else:
            canaries.commit()
    with pytest.raises(RuntimeError, match="^no pending canary step to commit$"):
        canaries.commit()  # a committed step is not pending any more
    kept = released[[0, 1, 3]].double()
    record = canaries.result()
    assert record.steps == 3 and record.candidates == 4 and record.norm == 2.5 and record.law == law
    assert record.llr.dtype == record.variance.dtype == torch.float64  # sums over steps in float64
    torch.testing.assert_close(record.llr, law.log_ratio(kept).sum(0).double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(record.variance, kept.var(0, unbiased=False), rtol=1e-9, atol=1e-9)
    assert record.final.dtype == torch.float64 and torch.equal(
        record.final, torch.zeros(6, dtype=torch.float64)
    )
    # one step: its variance is 0 and the mean is the value itself (a divisor of 1, not 2)
    one = GradientCanaries(3, seed=0)
    one.law = StepLaw("none", scale=0.0, shift=0.5, sample_rate=0.5)
    lot = one.draw(0.5, dpsgd_module.poisson_lot)
    lot.released = lot.update = torch.tensor([0.5, 1.0, 0.0])
    one.record(lot)
    one.commit()
    assert torch.equal(one.result().variance, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(one.result().llr, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))


def test_record_and_commit_refuse_an_unfinished_step():
    canaries = GradientCanaries(4, seed=0)
    with pytest.raises(RuntimeError, match="^no pending canary step to commit$"):
        canaries.commit()  # nothing recorded yet
    lot = canaries.draw(1.0, dpsgd_module.poisson_lot)
    lot.released = lot.scatter(1.0)  # released but no update
    with pytest.raises(RuntimeError, match="^the mechanism did not privatise the canary lot$"):
        canaries.record(lot)
    lot.released, lot.update = None, lot.scatter(1.0)
    with pytest.raises(RuntimeError, match="^the mechanism did not privatise the canary lot$"):
        canaries.record(lot)
    lot.released = lot.update
    canaries.record(lot)
    with pytest.raises(RuntimeError, match="^the mechanism did not set the canaries' law$"):
        canaries.commit()
    # a discarded step (a rejected screening candidate) cannot be committed afterwards
    canaries.law = StepLaw("gaussian", scale=1.0, shift=1.0, sample_rate=0.5)
    canaries.discard()
    with pytest.raises(RuntimeError, match="^no pending canary step to commit$"):
        canaries.commit()
    assert canaries.result().steps == 0 and canaries.candidates == 1  # the refused records count not


def test_scatter_and_the_gradient_keep_the_block_dtype():
    canaries = GradientCanaries(8, seed=2, dtype=torch.float64)
    lot = canaries.draw(1.0, dpsgd_module.poisson_lot)
    values = torch.arange(len(lot.index), dtype=torch.float32) / 3
    for out in (lot.scatter(values), lot.scatter(0.1)):
        assert out.dtype == torch.float64 and out.shape == (8,)
    assert torch.equal(lot.scatter(values)[lot.index], values.double())
    lot.released = lot.update = lot.scatter(0.1)
    canaries.record(lot)
    assert canaries.block.grad.dtype == torch.float64
    assert torch.equal(canaries.block.grad, lot.scatter(0.1))
    lot.released = lot.update = torch.full((8,), 0.25)  # a float32 update: cast to the block's
    canaries.record(lot)
    assert canaries.block.grad.dtype == torch.float64
    # the baseline's lots (lot_at) are the canaries' too: same generator, same dtype
    schedule = canaries.draw_epoch(3)
    at = canaries.lot_at(schedule, 1)
    assert at.dtype == torch.float64 and at.generator is canaries.generator and at.norm == canaries.norm
    assert torch.equal(at.index, (schedule == 1).nonzero().flatten())


def test_canary_settings_at_their_edges_and_the_default_norm():
    assert GradientCanaries(2, seed=0).norm == 10.0  # the documented default
    assert GradientCanaries(2, seed=0, norm=1.0, calibration=0.0).calibration.sum() == 0
    assert GradientCanaries(50, seed=0).block.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(count=1), "at least 2"),
        (dict(count=100, norm=0.5), "norm"),
        (dict(count=100, calibration=1.0), "calibration"),
    ],
)
def test_bad_canary_settings(kwargs, message):
    count = kwargs.pop("count")
    with pytest.raises(ValueError, match=message):
        GradientCanaries(count, seed=0, **kwargs)


def test_encoding_canary_records_are_reproducible_from_the_seed(data):
    """The same seeds give the same canary record (the canaries' noise comes from their own
    seeded stream, not from the OS: mutation testing found that unchecked)."""
    records = []
    for _ in range(2):
        canaries = GradientCanaries(300, seed=5)
        _train(
            "encoding",
            dict(epochs=1, batch_size=64, top_k=20, codebook_size=8, noise_multiplier=1.0),
            data,
            canaries,
        )
        records.append(canaries.result())
    a, b = records
    torch.testing.assert_close(a.llr, b.llr, rtol=0, atol=0)
    torch.testing.assert_close(a.final, b.final, rtol=0, atol=0)
    other = GradientCanaries(300, seed=6)
    _train(
        "encoding",
        dict(epochs=1, batch_size=64, top_k=20, codebook_size=8, noise_multiplier=1.0),
        data,
        other,
    )
    assert not torch.equal(other.result().llr, a.llr)


def test_encoding_canary_noise_is_fresh_at_every_step():
    """Each step's canary noise is a fresh draw (a seed drawn from a small range would repeat
    noise across steps, which mutation testing found unchecked)."""
    config = EncodingConfig(top_k=30, codebook_size=6, noise_multiplier=1.0)
    encoder = Encoder(config, dim=200)
    canaries = GradientCanaries(50, seed=0, norm=3.0)
    seen = set()
    for _ in range(60):
        lot = canaries.draw(1.0, dpsgd_module.poisson_lot)
        encoder._privatise_canaries(lot, scale=1.0, expected=8.0, factor=1.0)
        seen.add(tuple(lot.released.tolist()))
    assert len(seen) == 60


def test_dpsgd_canary_law_scale_and_shift_with_a_clip_norm_other_than_one():
    # sigma C / b and C / b: a C in the wrong place survived mutation testing when every test had C = 1
    from mechanisms.privatise import gaussian_law

    law = gaussian_law(clip_norm=2.0, noise_multiplier=1.5, expected_batch_size=64.0, sample_rate=0.1)
    assert law.scale == pytest.approx(1.5 * 2.0 / 64.0) and law.shift == pytest.approx(2.0 / 64.0)
    assert law.sample_rate == 0.1 and law.noise == "gaussian"


def test_dpsgd_canary_records_are_reproducible_from_the_seed(data):
    """The canaries' noise comes from their own seeded generator (drawing it from torch's global
    generator survived mutation testing)."""
    records = []
    for _ in range(2):
        torch.manual_seed(len(records))  # a different global state each time: must not matter
        canaries = GradientCanaries(300, seed=5)
        _train("dpsgd", dict(epochs=1, batch_size=64, lr=0.1, noise_multiplier=1.0), data, canaries)
        records.append(canaries.result())
    torch.testing.assert_close(records[0].llr, records[1].llr, rtol=0, atol=0)


def test_encoding_canaries_follow_the_encodings_law_not_dpsgds(data):
    """The law a run records for its canaries is the mechanism's own claim (encoding: Student-t
    noise on the encoded value); the white-box scores are likelihood ratios under it."""
    canaries = GradientCanaries(300, seed=5)
    options = dict(epochs=1, batch_size=64, top_k=20, codebook_size=8, noise_multiplier=1.0)
    _train("encoding", options, data, canaries)
    law = canaries.result().law
    assert (law.noise, law.df) == ("studentt", 9.0)
    b = 64.0
    encoder = Encoder(config_from_mapping(EncodingConfig, options), dim=1000)
    assert law.shift == pytest.approx(encoder.canary_value(1.0, canaries.norm) / b, rel=1e-6)


def test_dpsgd_law_uses_the_clip_norm_and_the_expected_lot_size():
    from mechanisms.dpsgd import dpsgd_law
    from mechanisms.privatise import gaussian_law

    plan = DpSgdPlan(sample_rate=0.05, steps=10, noise_multiplier=1.3, expected_batch_size=50.0)
    law = dpsgd_law(DpSgdConfig(noise_multiplier=1.3, clip_norm=0.4), plan)
    assert law == gaussian_law(
        clip_norm=0.4, noise_multiplier=1.3, expected_batch_size=50.0, sample_rate=0.05
    )
    assert law != dpsgd_law(DpSgdConfig(noise_multiplier=1.3, clip_norm=1.0), plan)
