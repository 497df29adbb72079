"""Gradient encoding: bounds, top-k, codebook, noise on every coordinate, denoiser, accounting."""

import itertools
import json
import math
import re

import dp_accounting
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from audit.data import DataOptions
from audit.train import TrainRequest, train_target
from mechanisms.accounting import (
    gaussian_delta,
    student_t_delta,
    student_t_gdp_mu,
    student_t_max_loss,
    student_t_noise_multiplier,
)
from mechanisms.dpsgd import DpSgdPlan
from mechanisms.encoding import (
    Encoder,
    EncodingConfig,
    denoise,
    encode,
    ks_statistic,
    make_codebook,
)
from mechanisms.models import build_model
from mechanisms.per_example import Workspace

from .oracles import dp_epsilon


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-8, 8),
    k=st.integers(1, 40),
    clip=st.floats(0.01, 10),
    mult=st.floats(0.1, 10),
)
def test_encoded_vectors_respect_their_codeword_l2_and_l1_bounds(seed, log_scale, k, clip, mult):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(5, 50, generator=g) * 10.0**log_scale
    grads[0] = 0.0  # a zero gradient too
    codebook = make_codebook(k, 7, 1.5, seed)
    index, values = encode(grads, codebook, clip_norm=clip, multiplier=mult)
    assert values.shape == (5, k)
    # the codeword each example used bounds it coordinate by coordinate, in rank order
    magnitude = values.abs()
    ok_rows = (magnitude.unsqueeze(1) <= codebook.unsqueeze(0) * (1 + 1e-6)).all(dim=2)  # [B, rows]
    assert ok_rows.any(dim=1).all()
    assert (values.norm(dim=1) <= 1.5 * (1 + 1e-5)).all()
    assert (values.abs().sum(dim=1) <= codebook.sum(dim=1).max() * (1 + 1e-5)).all()
    # signs are kept
    picked = torch.gather(grads, 1, index)
    assert ((values == 0) | (values.sign() == picked.sign())).all()


def test_top_k_selects_the_largest_magnitudes_and_clips_before_clamping():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 30, generator=g)
    codebook = make_codebook(6, 3, 100.0, 0)  # a huge codebook never clamps
    index, values = encode(grads, codebook, clip_norm=1.0, multiplier=2.0)
    for i in range(4):
        expected = set(np.argsort(-grads[i].abs().numpy())[:6].tolist())
        assert set(index[i].tolist()) == expected
        top = grads[i, index[i]]
        scaled = top * min(1.0, 1.0 / float(top.norm())) * 2.0
        torch.testing.assert_close(values[i], scaled)


def test_clamp_picks_the_nearest_codeword_by_cosine():
    codebook = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.6, 0.529150262]])  # both norm 1
    grads = torch.tensor([[5.0, -4.9, 4.8, 0.0]])  # nearly flat magnitudes: row 1 is nearer
    _, values = encode(grads, codebook, clip_norm=1.0, multiplier=100.0)
    torch.testing.assert_close(values[0], torch.tensor([0.6, -0.6, 0.529150262]))


def test_codebook_is_seeded_and_data_independent():
    a = make_codebook(100, 8, 1.0, seed=5)
    b = make_codebook(100, 8, 1.0, seed=5)
    c = make_codebook(100, 8, 1.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(8))
    assert (a[:, :-1] >= a[:, 1:]).all()  # descending magnitude profiles
    # the mechanism's codebook depends on the config and the dimension, nothing else
    cfg = EncodingConfig(
        noise_multiplier=1.0, top_k=100, codebook_size=8, codebook_seed=5, codebook="k-draws"
    )
    assert torch.equal(Encoder(cfg, 500).codebook, a)
    release = EncodingConfig(noise_multiplier=1.0, top_k=100, codebook_size=8, codebook_seed=5)
    assert torch.equal(Encoder(release, 500).codebook, make_codebook(100, 8, 1.0, seed=5, draws=200_000))


def _noise_only(config, dim=4000):
    """The released gradient of an empty lot: pure noise, divided by M."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim // 10 - 1, 10))
    assert sum(p.numel() for p in model.parameters()) == dim
    enc = Encoder(config, dim)
    plan = DpSgdPlan(0.1, 10, config.noise_multiplier, 8.0)
    step = enc.gradient(model, plan, torch.Generator().manual_seed(0), Workspace())
    out, _ = step(model, torch.zeros(0, dim // 10 - 1), torch.zeros(0, dtype=torch.long))
    return enc, torch.cat([t.flatten() for t in out.values()]).double().numpy() * 8.0


def test_student_t_noise_multiplier_never_rounds_a_shift_down_and_keeps_one_on_a_level():
    """A shift exactly on a level is used as it is; shifts 1.01**k whose level numpy's
    ``ceil(log(u) / log(1.01))`` puts one step low (float error) are moved up a level, never
    down. The float cases are found here with the same numpy expression, so the test is not
    vacuous (there are dozens between 1.01**-300 and 1.01**100)."""
    assert student_t_noise_multiplier(np.array([1.0]), 1.0, 9.0) == 1 / student_t_gdp_mu(1.0, 9.0)
    u = np.array([1.01**k for k in range(-300, 100)])
    low = u[1.01 ** np.ceil(np.log(u) / math.log(1.01)) < u]
    assert len(low) >= 5
    for shift in low[:: max(1, len(low) // 5)]:
        assert student_t_noise_multiplier(np.array([shift]), 1.0, 9.0) <= 1 / student_t_gdp_mu(shift, 9.0)


@pytest.mark.parametrize("law", ["gaussian", "laplace", "studentt"])
def test_noise_covers_every_coordinate_with_the_stated_law_and_scale(law):
    config = EncodingConfig(noise_multiplier=1.3, noise=law, quant_clip=2.0, top_k=50, denoise=False)
    enc, noise = _noise_only(config)
    assert (noise != 0).all()
    scale = 1.3 * (enc.l1_bound if law == "laplace" else 2.0)
    law_cdf = {
        "gaussian": stats.norm(scale=scale).cdf,
        "laplace": stats.laplace(scale=scale).cdf,
        "studentt": stats.t(9, scale=scale).cdf,
    }[law]
    assert stats.kstest(noise, law_cdf).pvalue > 1e-3
    wrong = stats.norm(scale=scale * 1.3).cdf
    assert stats.kstest(noise, wrong).pvalue < 1e-3  # the test can tell scales apart


def test_ks_statistic_equals_scipy():
    rng = np.random.default_rng(0)
    for n, m in [(100, 80), (1000, 1000), (7, 300)]:
        a, b = rng.standard_t(9, n), rng.standard_t(9, m) * 1.1
        a[:3] = b[:3] = 0.5  # ties
        ours = ks_statistic(torch.from_numpy(a), torch.from_numpy(b))
        assert ours == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_denoiser_skips_below_tau_and_scales_by_min_lambda_d_and_5():
    ref = torch.linspace(-1, 1, 1000)
    same = ref.clone()
    shifted = ref + 0.1  # KS distance 0.05
    d = ks_statistic(shifted, ref)
    assert d == pytest.approx(0.05, abs=2e-3)
    assert denoise(same, ref, multiplier=500, threshold=0.7, max_scale=5) == 0.0  # D = 0: skip
    assert denoise(shifted, ref, multiplier=10, threshold=0.7, max_scale=5) == 0.0  # 10 * 0.05 < 0.7
    assert denoise(shifted, ref, multiplier=20, threshold=0.7, max_scale=5) == pytest.approx(20 * d)
    assert denoise(shifted, ref, multiplier=500, threshold=0.7, max_scale=5) == 5.0  # capped


def _train(tmp_path, name, **options):
    req = TrainRequest(
        dataset="digits",
        model="mlp",
        mechanism="encoding",
        options={"epochs": 2, "batch_size": 64, "lr": 0.2, "top_k": 2000, **options},
        data_options=DataOptions(),
        progress=False,
    )
    return train_target(req, tmp_path / name)


def test_gaussian_law_epsilon_equals_dp_accounting_subsampled_gaussian(tmp_path):
    meta = _train(tmp_path, "g", noise="gaussian", noise_multiplier=1.3, quant_clip=2.0)
    p = json.loads((tmp_path / "g" / "model.json").read_text())["privacy"]
    assert meta["privacy"] == p and p["formal"] is True
    q = 64 / meta["members"]
    # ||e||_2 <= quant_clip = sensitivity, noise std 1.3 * quant_clip: multiplier 1.3
    expected = dp_epsilon(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3)), p["steps"], p["delta"]
    )
    assert p["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert p["sample_rate"] == pytest.approx(q)
    assert "): Gaussian noise on the L2 bound; Poisson-sampled event composed in dp-accounting" in p["note"]
    assert re.fullmatch(  # per-example encoding: no microbatch sentence
        r"gradient encoding \(top-\d+ of \d+, codebook of 64 seeded rows\): Gaussian noise on the L2 bound; "
        r"Poisson-sampled event composed in dp-accounting, add/remove-one adjacency",
        p["note"],
    ), p["note"]


def test_laplace_law_epsilon_equals_dp_accounting_subsampled_laplace_and_calibrates(tmp_path):
    meta = _train(tmp_path, "l", noise="laplace", epsilon=3.0)
    p = meta["privacy"]
    q = 64 / meta["members"]
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.LaplaceDpEvent(p["noise_multiplier"]))
    assert p["epsilon"] == pytest.approx(dp_epsilon(event, p["steps"], p["delta"]), rel=1e-9)
    assert 0.99 * 3.0 <= p["epsilon"] <= 3.0


def test_student_t_delta_is_exact_against_quadrature():
    t = stats.t(9)
    for v in (0.01, 0.3, 2.0):
        for frac in (0.0, 0.01, 0.3, 0.9):
            eps = frac * student_t_max_loss(v, 9)
            num = integrate.quad(
                lambda x, e=eps, s=v: max(0.0, t.pdf(x - s) - math.exp(e) * t.pdf(x)),
                -80,
                80,
                points=[v / 2],
                limit=500,
                epsabs=1e-14,
            )[0]
            assert student_t_delta(np.array([eps]), v, 9)[0] == pytest.approx(num, rel=1e-6, abs=1e-12)
    assert student_t_delta(np.array([1.01 * student_t_max_loss(0.3, 9)]), 0.3, 9)[0] == 0.0


def test_student_t_pair_grows_with_the_shift_so_saturating_the_bound_is_worst():
    eps = np.linspace(0, 3, 61)
    curves = [student_t_delta(eps, v, 9) for v in (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0)]
    for small, large in itertools.pairwise(curves):
        assert (large >= small - 1e-15).all()


@pytest.mark.parametrize("shift", [0.005, 0.2, 1.5])
def test_student_t_gdp_mu_dominates_the_exact_curve_everywhere(shift):
    mu = student_t_gdp_mu(shift, 9)
    eps = np.linspace(0, student_t_max_loss(shift, 9), 5003)[1:]  # off the internal grid
    assert (gaussian_delta(eps, mu) >= student_t_delta(eps, shift, 9) - 1e-15).all()
    # and it is not loose: 2% less mu already violates somewhere
    assert (gaussian_delta(eps, 0.98 * mu) < student_t_delta(eps, shift, 9)).any()


@pytest.mark.parametrize("shift,df", [(0.005, 9.0), (0.3, 9.0), (1.5, 9.0), (4.0, 3.0), (0.7, 30.0)])
def test_student_t_max_loss_is_the_supremum_of_the_privacy_loss(shift, df):
    """Oracle: log p_t(x - v) - log p_t(x) (scipy's t density) maximised numerically. The
    supremum is where the Gaussian-DP search's grid ends: above it delta_t is 0, just below
    it is positive."""
    from scipy import optimize

    def loss(x):
        return stats.t.logpdf(x - shift, df) - stats.t.logpdf(x, df)

    xs = np.linspace(-5 * shift - 20, 5 * shift + 20, 200_001)
    at = xs[np.argmax(loss(xs))]
    best = optimize.minimize_scalar(lambda x: -loss(x), bracket=(at - 0.01, at, at + 0.01), tol=1e-12)
    top = student_t_max_loss(shift, df)
    assert top == pytest.approx(-best.fun, rel=1e-9) and top >= loss(xs).max() - 1e-12
    assert student_t_delta(np.array([top * (1 - 1e-3)]), shift, df)[0] > 0
    assert student_t_delta(np.array([top * (1 + 1e-6)]), shift, df)[0] == 0


@pytest.mark.parametrize("shift", [0.005, 0.2, 1.5])
def test_student_t_gdp_mu_meets_every_constraint_of_its_grid_with_its_margin(shift):
    """The docstring's argument needs delta_G(e_{i+1}; mu) >= delta_t(e_i) at every edge of
    the grid up to the supremum of the loss, and mu rounded up past the bisection's last
    step. The grid recomputed here; the returned mu meets every constraint, and mu less its
    1e-9 margin does not (so the margin is what covers the bisection's float error)."""
    mu = student_t_gdp_mu(shift, 9.0)
    edges = np.linspace(0.0, student_t_max_loss(shift, 9.0), 401)
    need = student_t_delta(edges[:-1], shift, 9.0)
    assert (need > 0).all()
    assert (gaussian_delta(edges[1:], mu) >= need).all()
    assert not (gaussian_delta(edges[1:], mu / (1 + 2e-9)) >= need).all()


def test_student_t_gdp_mu_of_no_shift_is_zero():
    assert student_t_gdp_mu(0.0, 9.0) == 0.0
    assert student_t_gdp_mu(1.0, 9.0) > student_t_gdp_mu(0.5, 9.0) > 0.0


def test_student_t_accounting_upper_bounds_a_monte_carlo_estimate():
    """One Poisson-subsampled step of Student-t(9) noise on a 100-coordinate vector bounded by
    0.1 per coordinate (the encoding regime: many small bounded coordinates): the hockey-stick
    divergence estimated by Monte Carlo from the exact densities stays below the accountant's
    in both directions (soundness), and the accountant is not loose (measured ratios bound /
    MC of 1.08 and 1.14 at eps 0.05 and 0.2; 1.2 allowed)."""
    shifts, q, df, n = np.full(100, 0.1), 0.3, 9.0, 200_000
    sigma = student_t_noise_multiplier(shifts, 1.0, df)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    rng = np.random.default_rng(0)
    c = (df + 1) / 2

    def base_loss(o):  # log p(o - v) - log p(o) for the t density, summed over coordinates
        return (-c * np.log1p((o - shifts) ** 2 / df) + c * np.log1p(o**2 / df)).sum(axis=1)

    from_p = rng.random(n) < q  # remove: upper = qP + (1-q)Q, lower = Q
    upper = rng.standard_t(df, size=(n, 100)) + np.where(from_p[:, None], shifts, 0.0)
    loss_remove = np.log(q * np.exp(base_loss(upper)) + 1 - q)
    loss_add = -np.log(q * np.exp(base_loss(rng.standard_t(df, size=(n, 100)))) + 1 - q)  # upper = Q
    for eps in (0.05, 0.2, 0.4, 0.8):
        bound = acc.get_delta(eps)
        worst = 0.0
        for loss in (loss_remove, loss_add):
            terms = np.maximum(0.0, 1 - np.exp(eps - loss))
            mc, se = terms.mean(), terms.std() / math.sqrt(n)
            assert mc <= bound + 4 * se
            worst = max(worst, mc)
        if eps <= 0.2:
            assert bound <= 1.2 * worst


def test_student_t_run_records_the_gaussian_equivalent_and_its_epsilon(tmp_path):
    meta = _train(tmp_path, "t", noise="studentt", noise_multiplier=1.0)
    p, x = meta["privacy"], meta["extras"]
    assert p["formal"] is True and "Student-t" in p["note"]
    sigma = x["gaussian_equivalent_noise_multiplier"]
    enc = Encoder(
        EncodingConfig(noise_multiplier=1.0, top_k=2000),
        sum(q.numel() for q in build_model("mlp", (1, 8, 8), 10, seed=0).parameters()),
    )
    assert sigma == pytest.approx(student_t_noise_multiplier(enc.envelope, 1.0, 9.0), rel=1e-12)
    q = 64 / meta["members"]
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    assert p["epsilon"] == pytest.approx(dp_epsilon(event, p["steps"], p["delta"]), rel=1e-9)
    assert x["skipped_steps"] <= p["steps"]
    assert x["noise_law"] == "studentt" and x["top_k"] == enc.k
    assert set(x) == {  # the record's fields, by name
        "noise_law",
        "noise_scale",
        "top_k",
        "l2_bound",
        "l1_bound",
        "skipped_steps",
        "mean_update_scale",
        "gaussian_equivalent_noise_multiplier",
    }


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="noise must be"):
        EncodingConfig(noise_multiplier=1.0, noise="cauchy")
    with pytest.raises(ValueError, match="noise_df"):
        EncodingConfig(noise_multiplier=1.0, noise_df=2.0)
    with pytest.raises(ValueError, match="top_k"):
        EncodingConfig(noise_multiplier=1.0, top_k=0)


def test_release_codebook_follows_the_released_recipe():
    """Each row: the k largest of `draws` sorted |N(0, 1)| draws, L2-normalised (MECHANISMS.md
    section 3's generator), recomputed here independently; flatter than k sorted draws."""
    k, rows, draws = 50, 3, 1000
    book = make_codebook(k, rows, 2.0, seed=0, draws=draws)
    g = torch.Generator().manual_seed(0)
    for r in range(rows):
        z = torch.randn(draws, generator=g, dtype=torch.float64).abs().sort(descending=True).values[:k]
        torch.testing.assert_close(book[r], (z * 2.0 / z.norm()).float())
    assert book.shape == (rows, k)
    torch.testing.assert_close(book.double().norm(dim=1), torch.full((rows,), 2.0, dtype=torch.float64))
    steep = make_codebook(k, rows, 2.0, seed=0)
    # the lowest kept rank carries most of the top's magnitude in the release's recipe, little in k draws
    assert float((book[:, -1] / book[:, 0]).min()) > 0.5 > float((steep[:, -1] / steep[:, 0]).max())
    with pytest.raises(ValueError, match="draws"):
        make_codebook(k, rows, 2.0, seed=0, draws=k - 1)


def test_encoding_uses_the_release_codebook_by_default():
    from mechanisms.encoding import Encoder, EncodingConfig

    config = EncodingConfig(noise_multiplier=1.0, top_k=40, codebook_size=4, codebook_draws=5000)
    torch.testing.assert_close(Encoder(config, dim=100).codebook, make_codebook(40, 4, 1.0, 0, draws=5000))
    old = EncodingConfig(noise_multiplier=1.0, top_k=40, codebook_size=4, codebook="k-draws")
    torch.testing.assert_close(Encoder(old, dim=100).codebook, make_codebook(40, 4, 1.0, 0))
    with pytest.raises(ValueError, match="codebook must be one of"):
        EncodingConfig(noise_multiplier=1.0, codebook="downloaded")


# ---- microbatches (issue 24) ----


def _zero_noise(monkeypatch):
    """sample_noise returning zeros, so a step's output is the encoded sum over M alone."""
    import mechanisms.encoding as enc_mod

    monkeypatch.setattr(enc_mod, "sample_noise", lambda law, scale, df, n, rng: np.zeros(n))


def test_microbatch_step_encodes_each_microbatch_mean_gradient_as_a_loop_does(monkeypatch):
    """The loop oracle: lot members join microbatches by independent uniform draws from the
    training generator; each microbatch's gradient is that of its mean loss (autograd, one
    microbatch at a time); each is encoded; the sum is divided by the expected lot size."""
    _zero_noise(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    )
    dim = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(21, 12), torch.randint(0, 3, (21,))
    config = EncodingConfig(
        noise_multiplier=1.0,
        top_k=40,
        codebook_size=8,
        codebook_draws=2000,
        denoise=False,
        batch_size=16,
        microbatch_size=6,
        physical_batch_size=5,
        clip_norm=100.0,  # loose clip and small multiplier: neither clip nor clamp hides a sum for a mean
        quant_multiplier=0.05,
    )
    enc = Encoder(config, dim)
    plan = DpSgdPlan(0.5, 4, 1.0, 16.0)
    groups = 3  # 16 / 6 = 2.67 microbatches, rounded

    def oracle(n: int, seed: int) -> tuple[torch.Tensor, int]:
        member = torch.randint(0, groups, (n,), generator=torch.Generator().manual_seed(seed))
        expected, used = torch.zeros(dim), 0
        for j in range(groups):
            idx = (member == j).nonzero().flatten()
            if len(idx) == 0:
                continue
            used += 1
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            g = torch.cat([p.grad.flatten() for p in model.parameters()])
            index, values = encode(g[None], enc.codebook, clip_norm=100.0, multiplier=config.quant_multiplier)
            expected[index[0]] += values[0]
        return expected / 16.0, used

    for n, seed, used in [(21, 7, 3), (2, 0, 2)]:  # every microbatch used; one left empty
        out, _ = enc.gradient(model, plan, torch.Generator().manual_seed(seed), Workspace())(
            model, x[:n], y[:n]
        )
        released = torch.cat([out[k].flatten() for k, _ in model.named_parameters()])
        expected, really_used = oracle(n, seed)
        assert really_used == used  # the grouping is exercised, empty microbatches too
        torch.testing.assert_close(released, expected, rtol=1e-4, atol=1e-6)
        if n == 21:
            shared = released
    # one example per microbatch is another release (the grouping happens in the step)
    per_example = EncodingConfig(**{**config.__dict__, "microbatch_size": 1})
    gen = torch.Generator().manual_seed(7)
    other, _ = Encoder(per_example, dim).gradient(model, plan, gen, Workspace())(model, x, y)
    assert not torch.allclose(torch.cat([other[n].flatten() for n, _ in model.named_parameters()]), shared)


def test_one_example_moves_a_shared_microbatch_by_up_to_twice_the_bound():
    """Why microbatches are accounted with twice the bound: adding x to a microbatch S can
    turn its encoded vector around, so ||e(S + x) - e(S)|| reaches 2 quant_clip, while an
    example encoded alone moves the sum by at most quant_clip."""
    book = make_codebook(4, 2, 1.0, seed=0, draws=100)
    a = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, 0.0]])
    x = -3 * a  # the mean of {a, x} is -a
    e_s = encode(a, book, clip_norm=1.0, multiplier=4.0)
    e_sx = encode((a + x) / 2, book, clip_norm=1.0, multiplier=4.0)
    dense = [torch.zeros(6).index_put_((i[0],), v[0]) for i, v in (e_s, e_sx)]
    moved = float((dense[1] - dense[0]).norm())
    assert moved == pytest.approx(2 * float(dense[0].norm()))
    assert 1.0 < moved <= 2.0 + 1e-6


@pytest.mark.parametrize("law", ["gaussian", "laplace", "studentt"])
def test_microbatch_accounting_uses_twice_the_bound(law):
    """The event with microbatches equals the per-example event at half the noise multiplier
    (Gaussian and Laplace), and the Student-t bound on twice the envelope."""
    per_example = Encoder(EncodingConfig(noise_multiplier=1.0, top_k=300, noise=law), 1000)
    micro = Encoder(EncodingConfig(noise_multiplier=1.0, top_k=300, noise=law, microbatch_size=2), 1000)
    q, steps, delta = 0.05, 50, 1e-5
    got = dp_epsilon(micro.event(2.0, q, steps), 1, delta)
    if law == "studentt":
        half = student_t_noise_multiplier(2 * per_example.envelope, 2.0, 9.0)
        assert micro.gaussian_equivalent(2.0) == pytest.approx(half)
        assert half < per_example.gaussian_equivalent(2.0)
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(half))
        expected = dp_epsilon(dp_accounting.SelfComposedDpEvent(step, steps), 1, delta)
    else:
        expected = dp_epsilon(per_example.event(1.0, q, steps), 1, delta)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > dp_epsilon(per_example.event(2.0, q, steps), 1, delta)


def test_microbatch_run_calibrates_and_says_so_and_refuses_gradient_canaries(tmp_path):
    meta = _train(tmp_path, "mb", noise="gaussian", epsilon=4.0, microbatch_size=2)
    p = meta["privacy"]
    assert 0.99 * 4.0 <= p["epsilon"] <= 4.0 and "microbatches of 2" in p["note"]
    one = _train(tmp_path, "one", noise="gaussian", epsilon=4.0)
    # twice the sensitivity: about twice the noise for the same epsilon
    assert p["noise_multiplier"] == pytest.approx(2 * one["privacy"]["noise_multiplier"], rel=0.02)
    from audit.canary import CanarySettings

    with pytest.raises(ValueError, match="microbatch_size 4 encodes microbatches"):
        train_target(
            TrainRequest(
                dataset="digits",
                model="mlp",
                mechanism="encoding",
                options={
                    "epochs": 1,
                    "batch_size": 64,
                    "top_k": 200,
                    "noise_multiplier": 1.0,
                    "microbatch_size": 4,
                },
                progress=False,
                canaries=CanarySettings(count=100, inputs=0),
            ),
            tmp_path / "c",
        )
    with pytest.raises(ValueError, match="microbatch_size must be >= 1"):
        EncodingConfig(noise_multiplier=1.0, microbatch_size=0)
    with pytest.raises(ValueError, match="must be <= batch_size"):
        EncodingConfig(noise_multiplier=1.0, batch_size=8, microbatch_size=9)


def test_a_run_plants_white_box_canaries_only_where_they_stand_for_examples():
    from audit.pipeline import _canaries_refused

    assert _canaries_refused("encoding", {"noise_multiplier": 1.0}) is None
    assert "microbatch_size 2" in _canaries_refused(
        "encoding", {"noise_multiplier": 1.0, "microbatch_size": 2}
    )
    assert _canaries_refused("dpsgd", {"noise_multiplier": 1.0}) is None
    assert _canaries_refused("residual", {}) == "no gradient to plant canaries in"


def test_the_denoiser_compares_the_release_with_pure_noise_of_the_same_scale():
    """An empty lot releases pure noise over M; the denoiser's reference must be noise of that
    same scale, so their KS distance is small and a strict threshold skips the step (a
    reference at another scale would look like signal and pass with a full update)."""
    config = EncodingConfig(
        noise_multiplier=1.3, noise="gaussian", top_k=50, distance_multiplier=1.0, distance_threshold=0.2
    )
    dim = 4000
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim // 10 - 1, 10))
    enc = Encoder(config, dim)
    plan = DpSgdPlan(0.1, 10, config.noise_multiplier, 8.0)
    step = enc.gradient(model, plan, torch.Generator().manual_seed(0), Workspace())
    for _ in range(3):
        out, _ = step(model, torch.zeros(0, dim // 10 - 1), torch.zeros(0, dtype=torch.long))
        assert all(bool((t == 0).all()) for t in out.values())
    assert enc.skipped == 3 and enc.scales == [0.0, 0.0, 0.0]


def test_student_t_noise_multiplier_composes_each_coordinates_mu_at_its_standardised_shift():
    """Oracle: 1 / sqrt(sum_i mu_i^2) with mu_i computed directly at bounds_i / scale (no
    level grid); the grid rounds shifts up by at most 1%, so the result is at most the direct
    one and within a few percent of it. A zero bound adds nothing; the scale divides."""
    bounds = np.array([0.9, 0.5, 0.5, 0.5, 0.31, 0.2, 0.05, 0.012])  # a level shared by three
    for scale in (0.7, 2.5):
        direct = 1 / math.sqrt(sum(student_t_gdp_mu(b / scale, 9.0) ** 2 for b in bounds))
        got = student_t_noise_multiplier(bounds, scale, 9.0)
        assert 0.97 * direct <= got <= direct
        # each shift is rounded up by at most one level (1%): mu grows with the shift
        up = 1 / math.sqrt(sum(student_t_gdp_mu(1.01 * b / scale, 9.0) ** 2 for b in bounds))
        assert up <= got
        assert student_t_noise_multiplier(np.append(bounds, 0.0), scale, 9.0) == got
        # shifts below 1e-4 of the largest count as that floor (conservative, fewer levels)
        floor = student_t_noise_multiplier(np.append(bounds, 0.9e-4), scale, 9.0)
        assert student_t_noise_multiplier(np.append(bounds, 1e-9), scale, 9.0) == floor < got
    one = student_t_noise_multiplier(np.array([0.4]), 1.0, 9.0)
    assert one == pytest.approx(1 / student_t_gdp_mu(0.4, 9.0), rel=0.02) and one <= 1 / student_t_gdp_mu(
        0.4, 9.0
    )
    assert student_t_noise_multiplier(np.zeros(3), 1.0, 9.0) == math.inf
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"noise scale must be > 0, got {bad}"):
            student_t_noise_multiplier(bounds, bad, 9.0)


@pytest.mark.parametrize("law", ["gaussian", "laplace", "studentt"])
def test_sample_noise_is_centred_at_zero_with_the_stated_scale(law):
    """Each law at a small scale: the median is 0 (a shifted location would move it by the
    shift) and the spread matches the law's own quantiles."""
    from mechanisms.encoding import sample_noise

    draws = sample_noise(law, 0.1, 9.0, 40_000, np.random.default_rng(0))
    dist = {
        "gaussian": stats.norm(scale=0.1),
        "laplace": stats.laplace(scale=0.1),
        "studentt": stats.t(9, scale=0.1),
    }[law]
    assert abs(np.median(draws)) < 0.005
    assert stats.kstest(draws, dist.cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="unknown noise law 'cauchy'"):
        sample_noise("cauchy", 0.1, 9.0, 3, np.random.default_rng(0))
