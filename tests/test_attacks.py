"""The contract every attack passes, plus oracles for the signals and RMIA."""

import math

import numpy as np
import pytest
from scipy.special import softmax

from attacks import AttackInputs, attack_names, auc, get_attack, logit_scaled_confidence
from attacks.lira import lira_offline, lira_online
from attacks.rmia import rmia, rmia_scores, rmia_scores_naive
from attacks.signals import cross_entropy

N, Q, C, M = 1000, 2, 5, 8


def _population(shift, seed=0):
    """Synthetic target and reference logits; members' true-label logit is raised by ``shift``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    keep_t = rng.random(N) < 0.5
    keep = np.argsort(rng.random((M, N)), axis=0) < M // 2
    difficulty = rng.normal(0, 1, N)  # per-example hardness shared by all models

    def logits(member):
        z = rng.normal(0, 1, (N, Q, C))
        z[np.arange(N), :, y] += 1.5 + difficulty[:, None] + shift * member[:, None]
        return z

    refs = np.stack([logits(keep[m]) for m in range(M)])
    return AttackInputs(logits(keep_t), y, refs, keep, seed=0), keep_t


@pytest.mark.parametrize("name", attack_names())
def test_contract_null_auc_is_chance(name):
    inputs, member = _population(shift=0.0)
    scores = get_attack(name).fn(inputs).scores
    assert scores.shape == (N,) and np.isfinite(scores).all()
    # under the null, AUC ~ Normal(0.5, sqrt((n1 + n0 + 1) / (12 n1 n0))); 4 standard errors
    n1, n0 = member.sum(), (~member).sum()
    se = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    assert abs(auc(scores, member) - 0.5) < 4 * se


@pytest.mark.parametrize("name", attack_names())
def test_contract_planted_leak_is_found(name):
    inputs, member = _population(shift=1.5)
    assert auc(get_attack(name).fn(inputs).scores, member) > 0.65


@pytest.mark.parametrize("name", attack_names())
def test_contract_deterministic(name):
    inputs, _ = _population(shift=1.0)
    a, b = get_attack(name).fn(inputs).scores, get_attack(name).fn(inputs).scores
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", [n for n in attack_names() if get_attack(n).needs_references])
def test_reference_attacks_need_references(name):
    inputs, _ = _population(shift=0.0)
    bare = AttackInputs(inputs.target_logits, inputs.labels)
    with pytest.raises(ValueError, match="reference models"):
        get_attack(name).fn(bare)


def test_inputs_are_validated():
    inputs, _ = _population(shift=0.0)
    bad = inputs.target_logits.copy()
    bad[3, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        AttackInputs(bad, inputs.labels)
    bad_refs = inputs.ref_logits.copy()
    bad_refs[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="reference logits contain 1 NaN"):
        AttackInputs(inputs.target_logits, inputs.labels, bad_refs, inputs.ref_keep)
    with pytest.raises(ValueError, match="labels must be integers in"):
        AttackInputs(inputs.target_logits, inputs.labels + C)


def test_logit_scaled_confidence_is_stable_and_exact():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 2, 4))
    y = rng.integers(0, 4, 50)
    p = softmax(z, axis=-1)
    py = np.take_along_axis(p, y[:, None, None].repeat(2, 1), -1)[..., 0]
    np.testing.assert_allclose(logit_scaled_confidence(z, y), np.log(py) - np.log(1 - py), rtol=1e-9)
    np.testing.assert_allclose(cross_entropy(z, y), -np.log(py), rtol=1e-12)
    # a very confident model: log(p / (1 - p)) on rounded probabilities would give inf
    huge = np.array([[[60.0, 0.0, 0.0]]])
    assert logit_scaled_confidence(huge, np.array([0]))[0, 0] == pytest.approx(60 - math.log(2))


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_rmia_sort_equals_naive(gamma):
    rng = np.random.default_rng(1)
    rx = rng.lognormal(size=300)
    rz = np.r_[rng.lognormal(size=200), rx[:50]]  # including exact ties
    np.testing.assert_array_equal(rmia_scores(rx, rz, gamma), rmia_scores_naive(rx, rz, gamma))


def test_rmia_offline_tunes_a_and_finds_leak():
    inputs, member = _population(shift=1.5)
    result = rmia(inputs, online=False)
    assert 0.0 <= result.notes["a"] <= 1.0 and auc(result.scores, member) > 0.65


def test_lira_never_in_or_out_examples_fall_back_and_are_counted():
    inputs, _ = _population(shift=1.5)
    keep = inputs.ref_keep.copy()
    keep[:, :10] = True  # never OUT
    keep[:, 10:20] = False  # never IN
    odd = AttackInputs(inputs.target_logits, inputs.labels, inputs.ref_logits, keep)
    on = lira_online(odd)
    assert on.notes["no_out_reference"] == 10 and on.notes["no_in_reference"] == 10
    assert on.notes["fallback_global_variance"] == 20
    off = lira_offline(odd)
    assert off.notes["no_out_reference"] == 10 and np.isfinite(off.scores).all()


def test_lira_fixed_variance_and_variants_run():
    inputs, member = _population(shift=1.5)
    assert auc(lira_online(inputs, fixed_variance=True).scores, member) > 0.65
    assert auc(lira_offline(inputs, variant="logpdf").scores, member) > 0.55
    assert auc(lira_online(inputs, center="median").scores, member) > 0.65


def test_lira_fixed_variance_is_the_default_below_64_references():
    inputs, _ = _population(shift=1.5)
    assert lira_online(inputs).notes["fixed_variance"] is True  # 8 references
    per_example = lira_online(inputs, fixed_variance=False)
    assert per_example.notes["fixed_variance"] is False
    assert not np.array_equal(per_example.scores, lira_online(inputs).scores)
    assert lira_offline(inputs).notes["fixed_variance"] is True
