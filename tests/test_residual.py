"""Residual perturbation: exactness at gamma = 0, noise statistics, inference, plumbing."""

import numpy as np
import pytest
import torch

from audit.train import TrainRequest, released, train_target
from mechanisms.models import build_model, residual_blocks
from mechanisms.residual import NoisySlot, ResidualConfig, SoftmaxEnsemble, install_noise


def _noise_seeds(model):
    """The seeds of the noise generators in ``model``'s residual blocks."""
    return {b.perturb.generator.initial_seed() for b in residual_blocks(model)}


def _pair(strategy, gamma, perturb_at_eval=True):
    plain = build_model("resnet8", (1, 12, 12), 10, seed=0)
    noisy = build_model("resnet8", (1, 12, 12), 10, seed=0)
    install_noise(
        noisy, ResidualConfig(strategy=strategy, gamma=gamma, perturb_at_eval=perturb_at_eval), seed=1
    )
    return plain, noisy


@pytest.mark.parametrize("strategy", ["1", "2", "branch"])
def test_gamma_zero_equals_the_unperturbed_network_exactly(strategy):
    plain, noisy = _pair(strategy, 0.0)
    x = torch.rand(4, 1, 12, 12)
    for mode in (True, False):
        plain.train(mode)
        noisy.train(mode)
        assert torch.equal(plain(x), noisy(x))


def _slot(strategy, gamma):
    return NoisySlot(strategy, gamma, True, torch.Generator().manual_seed(0))


def test_noise_statistics_per_strategy():
    shortcut = torch.rand(200, 8, 10, 10) * 3 + 0.5
    branch = torch.randn(200, 8, 10, 10)
    y = shortcut + branch
    n = y.numel()
    # strategy 2: additive, std gamma
    d2 = _slot("2", 0.3)(shortcut, branch) - y
    assert abs(float(d2.std()) / 0.3 - 1) < 5 / np.sqrt(2 * n)
    assert abs(float(d2.mean())) < 5 * 0.3 / np.sqrt(n)
    # strategy 1: multiplicative, std gamma * |x|: the standardised noise is N(0, 1)
    z1 = (_slot("1", 0.2)(shortcut, branch) - y) / (0.2 * shortcut)
    assert abs(float(z1.std()) - 1) < 5 / np.sqrt(2 * n) and abs(float(z1.mean())) < 5 / np.sqrt(n)
    # branch: the residual branch scaled by (1 + gamma xi)
    zb = (_slot("branch", 0.5)(shortcut, branch) - y) / (0.5 * branch)
    assert abs(float(zb.std()) - 1) < 5 / np.sqrt(2 * n)


@pytest.mark.parametrize("strategy, gamma", [("1", 0.2), ("2", 0.3), ("branch", 0.25)])
def test_noise_scale_in_every_block_of_the_network(strategy, gamma):
    """Inside resnet8, each block's join gets noise of the stated scale (per block)."""
    _, model = _pair(strategy, gamma)
    seen = []
    for block in residual_blocks(model):
        block.perturb.register_forward_hook(lambda m, inp, out: seen.append((*inp, out)))
    with torch.no_grad():
        model(torch.rand(64, 1, 12, 12))
    assert len(seen) == 3
    for shortcut, branch, out in seen:
        d = (out - shortcut - branch).double()
        scale = {"1": gamma * shortcut, "2": torch.full_like(shortcut, gamma), "branch": gamma * branch}
        s = scale[strategy].double()
        keep = s.abs() > 1e-2  # a zero input carries no multiplicative noise
        z = d[keep] / s[keep]
        n = z.numel()
        assert n > 2000
        assert abs(float(z.std()) - 1) < 5 / np.sqrt(2 * n), float(z.std())
        assert abs(float(z.mean())) < 5 / np.sqrt(n)


def test_noise_is_independent_per_example_and_pass():
    slot = _slot("2", 1.0)
    s, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    first, second = slot(s, b), slot(s, b)
    assert not torch.equal(first[0], first[1])  # per example
    assert not torch.equal(first, second)  # per pass


def test_two_passes_differ_when_on_and_agree_when_off():
    x = torch.rand(3, 1, 12, 12)
    _, on = _pair("2", 0.2, perturb_at_eval=True)
    _, off = _pair("2", 0.2, perturb_at_eval=False)
    on.eval()
    off.eval()
    assert not torch.equal(on(x), on(x))
    assert torch.equal(off(x), off(x))
    off.train()
    assert not torch.equal(off(x), off(x))  # training always perturbs


def test_eval_pass_averaging_reduces_variance():
    _, model = _pair("2", 0.5)
    model.eval()
    x = torch.rand(1, 1, 12, 12).repeat(400, 1, 1, 1)  # 400 draws of the same example

    def averaged(m):
        return sum(torch.softmax(model(x), 1) for _ in range(m)) / m

    with torch.no_grad():
        v1 = averaged(1).var(0).sum()
        v4 = averaged(4).var(0).sum()
    # independent passes: the variance of the mean of 4 is a quarter (sampling error ~ 10%)
    assert 0.18 < float(v4 / v1) < 0.33


def test_models_without_residual_blocks_are_refused():
    message = (
        r"^residual perturbation needs a model with residual blocks \(resnet8, resnet20, or a user "
        r"model built from mechanisms\.models\.BasicBlock\); this model has none$"
    )
    with pytest.raises(ValueError, match=message):
        install_noise(build_model("cnn", (1, 28, 28), 10), ResidualConfig(), seed=0)
    with pytest.raises(ValueError, match="strategy must be"):
        ResidualConfig(strategy="3")


def test_training_records_no_formal_guarantee_and_audits_the_noisy_model(tmp_path):
    request = TrainRequest(
        dataset="digits",
        model="resnet8",
        mechanism="residual",
        progress=False,
        options={"epochs": 1, "batch_size": 64, "lr": 0.05, "gamma": 0.1, "eval_passes": 2},
    )
    meta = train_target(request, tmp_path)
    assert meta["privacy"]["formal"] is False and meta["privacy"]["epsilon"] is None
    assert "no formal guarantee" in meta["privacy"]["note"]
    assert meta["extras"]["eval_passes"] == 2 and meta["hyperparameters"]["strategy"] == "2"
    model = build_model("resnet8", (1, 8, 8), 10)
    inference = released(model, "residual", meta["hyperparameters"], seed=0)
    assert inference.stochastic and inference.passes == 2
    assert all(isinstance(b.perturb, NoisySlot) for b in residual_blocks(inference.model))
    plain = released(build_model("cnn", (1, 28, 28), 10), "sgd", {}, seed=0)
    assert not plain.stochastic and plain.passes == 1


def test_attack_uses_repeated_noisy_passes_as_queries(tmp_path):
    from audit.attack import AttackRequest, attack_target

    request = TrainRequest(
        dataset="digits",
        model="resnet8",
        mechanism="residual",
        progress=False,
        options={"epochs": 1, "batch_size": 64, "lr": 0.05, "gamma": 0.3},
    )
    train_target(request, tmp_path / "target")
    results = attack_target(
        AttackRequest(
            target=str(tmp_path / "target"),
            attacks=("loss", "lira-online"),
            references=2,
            workers=1,
            queries=3,
            resamples=100,
            progress=False,
        ),
        tmp_path / "out",
    )
    t = results["targets"][0]
    assert t["id"] == "residual" and t["privacy"]["formal"] is False and t["queries"] == 3
    logits = np.load(tmp_path / "out" / "targets" / "residual" / "logits.npy")
    assert logits.shape == (1797, 3, 10)
    assert not np.array_equal(logits[:, 0], logits[:, 1])  # repeated passes of a noisy model differ
    recipe = (tmp_path / "out" / "references" / "residual" / "recipe.json").read_text()
    assert '"stochastic": true' in recipe


def test_ensemble_averages_independent_members_at_the_softmax(tmp_path):
    config = ResidualConfig(strategy="2", gamma=0.0, ensemble=3)
    base = build_model("resnet8", (1, 12, 12), 10, seed=0)
    ens = install_noise(base, config, seed=4)
    assert isinstance(ens, SoftmaxEnsemble) and ens.members[0] is base
    # members are independent initialisations, reproducible from the seed
    w = [dict(m.named_parameters())["stem.0.weight"] for m in ens.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    again = install_noise(build_model("resnet8", (1, 12, 12), 10, seed=0), config, seed=4)
    assert torch.equal(dict(again.members[2].named_parameters())["stem.0.weight"], w[2])
    x = torch.rand(5, 1, 12, 12)
    ens.eval()
    with torch.no_grad():
        mean_softmax = sum(torch.softmax(m(x), dim=1) for m in ens.members) / 3
        torch.testing.assert_close(torch.softmax(ens(x), dim=1), mean_softmax)
        torch.testing.assert_close(ens(x).exp().sum(dim=1), torch.ones(5))


def test_ensemble_trains_every_member_and_reloads_for_attacks(tmp_path):
    request = TrainRequest(
        dataset="digits",
        model="resnet8",
        mechanism="residual",
        progress=False,
        options={"epochs": 1, "batch_size": 64, "lr": 0.05, "gamma": 0.1, "ensemble": 2},
    )
    meta = train_target(request, tmp_path / "t")
    assert meta["hyperparameters"]["ensemble"] == 2 and meta["extras"]["ensemble"] == 2
    assert sorted({h["member"] for h in meta["history"]}) == [0, 1]
    from audit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "t")
    assert any(k.startswith("members.1.") for k in ckpt.state_dict)
    assert not torch.equal(ckpt.state_dict["members.0.head.weight"], ckpt.state_dict["members.1.head.weight"])
    # the ensemble's accuracy is that of the averaged softmax of the reloaded members
    from audit.attack import AttackRequest, attack_target

    results = attack_target(
        AttackRequest(
            target=str(tmp_path / "t"),
            attacks=("loss", "lira-offline"),
            references=2,
            workers=1,
            queries=2,
            resamples=100,
            progress=False,
        ),
        tmp_path / "out",
    )
    t = results["targets"][0]
    assert 0.0 <= t["attacks"]["loss"]["auc"] <= 1.0 and t["queries"] == 2
    recipe = (tmp_path / "out" / "references" / "residual" / "recipe.json").read_text()
    assert '"ensemble": 2' in recipe


def test_the_noise_is_seeded_from_the_run_generator_with_a_full_draw():
    """train_residual seeds the noise with one 62-bit draw of the run's generator: the same
    generator seed gives the same noise and weights whatever torch's global stream holds."""
    from sklearn.datasets import load_digits

    from mechanisms.residual import train_residual

    digits = load_digits()
    x = torch.tensor(digits.images[:96], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:96])
    config = ResidualConfig(epochs=1, batch_size=32, lr=0.05, gamma=0.2, progress=False)

    def run(seed):
        model = build_model("resnet8", (1, 8, 8), 10, seed=0)
        result = train_residual(model, x, y, config=config, generator=torch.Generator().manual_seed(seed))
        return model, result

    for seed in (3, 11):
        expected = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
        assert expected >= 2**40  # so a seed drawn from a small range could not equal it
        model, result = run(seed)
        assert _noise_seeds(model) == {expected}
        assert "member" not in result.history[0]  # one member: no member field
        assert result.extras == {
            "strategy": "2",
            "gamma": 0.2,
            "perturb_at_eval": True,
            "eval_passes": 1,
            "ensemble": 1,
        }
    torch.manual_seed(0)  # the global stream plays no part
    first = run(3)[1].state_dict
    torch.manual_seed(1)
    second = run(3)[1].state_dict
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_slot_seeds_are_distinct_per_purpose_member_and_seed():
    from mechanisms.residual import _slot_seed

    seeds = {
        (s, m, p): _slot_seed(s, m, p) for s in (0, 2, 4, 7, 2**62 - 1) for m in (0, 1, 2) for p in (0, 1)
    }
    assert len(set(seeds.values())) == len(seeds)
    assert _slot_seed(5, 1) == _slot_seed(5, 1, 0) != _slot_seed(5, 1, 1)  # the noise is purpose 0
    # the ensemble's members: a different seed of the same parity gives other members
    config = ResidualConfig(strategy="2", gamma=0.0, ensemble=2)
    w4 = install_noise(build_model("resnet8", (1, 12, 12), 10, seed=0), config, seed=4).members[1]
    w6 = install_noise(build_model("resnet8", (1, 12, 12), 10, seed=0), config, seed=6).members[1]
    assert not torch.equal(w4.stem[0].weight, w6.stem[0].weight)


def test_ensemble_members_draw_initialisation_and_noise_from_separate_seeds():
    """Member i >= 1 is initialised from ``_slot_seed(seed, i, purpose=1)`` and its noise comes
    from ``_slot_seed(seed, i)`` (purpose 0): were the two the same seed, a member's initial
    weights and its noise would be read from one random stream."""
    import copy

    from mechanisms.residual import _reinitialise, _slot_seed

    config = ResidualConfig(strategy="2", gamma=0.1, ensemble=3)
    fresh = build_model("resnet8", (1, 12, 12), 10, seed=0)
    ens = install_noise(copy.deepcopy(fresh), config, seed=9)
    for i in (1, 2):
        init_seed, noise_seed = _slot_seed(9, i, purpose=1), _slot_seed(9, i)
        assert init_seed != noise_seed
        expected = _reinitialise(copy.deepcopy(fresh), init_seed).state_dict()
        got = ens.members[i].state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        assert _noise_seeds(ens.members[i]) == {noise_seed}
    assert _noise_seeds(ens.members[0]) == {_slot_seed(9, 0)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="3"), r"^strategy must be one of 1, 2, branch, got '3'$"),
        (dict(gamma=-0.1), r"^gamma must be >= 0, got -0.1$"),
        (dict(eval_passes=0), r"^eval_passes must be >= 1, got 0$"),
        (dict(ensemble=0), r"^ensemble must be >= 1, got 0$"),
    ],
)
def test_residual_options_outside_their_domain_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualConfig(**kwargs)
    ResidualConfig(gamma=0.0, eval_passes=1, ensemble=1)  # the edges are allowed


def test_the_registry_refuses_a_model_without_residual_blocks_by_name():
    from mechanisms import get_mechanism

    with pytest.raises(
        ValueError, match=r"^residual perturbation needs a model with residual blocks .*Sequential has none"
    ):
        get_mechanism("residual").validate_model(build_model("mlp", (20,), 2))
