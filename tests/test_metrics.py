"""Metrics against oracles: scikit-learn for ROC/AUC, hand-derived bounds, brute-force TPR."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from attacks.metrics import (
    _bootstrap,
    _tpr_at_level_sorted,
    auc,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    roc_curve,
    split_epsilon_lower_bound,
    stratified_half,
    summarize,
    tpr_at_fpr,
)


@pytest.mark.parametrize("seed", range(5))
def test_roc_and_auc_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    scores = rng.integers(0, 15, n).astype(float)  # many ties
    member = rng.random(n) < rng.uniform(0.2, 0.8)
    fpr, tpr, thr = roc_curve(scores, member)
    f2, t2, th2 = sk_roc_curve(member, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)


def test_auc_below_half_is_not_flipped():
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0


def _brute_tpr(scores, member, level, strict):
    best = 0.0
    for t in np.r_[np.inf, np.unique(scores)]:
        pred = scores >= t
        fpr = (pred & ~member).sum() / (~member).sum()
        if (fpr < level) if strict else (fpr <= level):
            best = max(best, (pred & member).sum() / member.sum())
    return best


@pytest.mark.parametrize("strict", [False, True])
def test_tpr_at_fpr_matches_brute_force_and_bootstrap_kernel(strict):
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(4, 80))
        s = rng.integers(0, 9, n).astype(float)
        m = rng.random(n) < 0.5
        if m.all() or not m.any():
            continue
        for level in (0.001, 0.05, 0.1, 0.29, 0.5, 1.0):
            want = _brute_tpr(s, m, level, strict)
            assert tpr_at_fpr(s, m, level, strict=strict)[0] == want
            assert _tpr_at_level_sorted(np.sort(s[m]), -np.sort(-s[~m]), level, strict) == want


def test_bootstrap_auc_matches_direct_auc_on_each_resample():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)
    m = np.arange(60) < 25
    seed_rng = np.random.default_rng(7)
    aucs, tprs = _bootstrap(s, m, [0.1], False, 5, seed_rng)
    replay = np.random.default_rng(7)
    pos, neg = s[m], s[~m]
    sp, sn = pos[replay.integers(0, 25, (5, 25))], neg[replay.integers(0, 35, (5, 35))]
    for i in range(5):
        both = np.r_[sp[i], sn[i]]
        lab = np.r_[np.ones(25, bool), np.zeros(35, bool)]
        assert aucs[i] == pytest.approx(auc(both, lab), abs=1e-12)
        assert tprs[i, 0] == tpr_at_fpr(both, lab, 0.1)[0]


def test_epsilon_lower_bound_hand_derived():
    # no errors, 1000 + 1000 trials, alpha 0.05: FPR_u = 1 - 0.025^(1/1000)
    u = 1 - 0.025 ** (1 / 1000)
    assert epsilon_lower_bound(0, 1000, 0, 1000, delta=0.0) == pytest.approx(math.log((1 - u) / u), rel=1e-9)
    # ATTACKS.md's "about 5.8" is this ceiling without splitting alpha; with alpha/2 per rate, 5.60
    assert epsilon_lower_bound(0, 1000, 0, 1000, delta=0.0) == pytest.approx(5.6006, abs=1e-4)
    # a general case from the Beta quantiles directly
    fpr_u = stats.beta.ppf(0.975, 11, 990)
    fnr_u = stats.beta.ppf(0.975, 501, 500)
    want = max(math.log((1 - 1e-5 - fnr_u) / fpr_u), math.log((1 - 1e-5 - fpr_u) / fnr_u), 0)
    assert epsilon_lower_bound(10, 1000, 500, 1000, delta=1e-5) == pytest.approx(want, rel=1e-12)
    # chance-level errors give 0, never a negative number
    assert epsilon_lower_bound(500, 1000, 500, 1000) == 0.0
    assert epsilon_lower_bound(1000, 1000, 0, 1000) == 0.0


def test_split_bound_is_chosen_on_one_half_and_flags_saturation():
    m = np.arange(2000) < 1000
    perfect = split_epsilon_lower_bound(m.astype(float), m, delta=0.0)
    assert perfect.saturated and perfect.fp == 0 and perfect.fn == 0
    assert perfect.positives + perfect.negatives == 1000  # evaluated on the other half only
    assert perfect.epsilon == pytest.approx(epsilon_lower_bound(0, 500, 0, 500, delta=0.0))
    rng = np.random.default_rng(0)
    chance = split_epsilon_lower_bound(rng.random(2000), m)
    assert chance.epsilon < 0.5 and not chance.saturated


def test_stratified_half_takes_half_of_each_class_reproducibly():
    member = np.arange(101) < 37  # odd counts: 37 members, 64 non-members
    a = stratified_half(member, 3)
    assert (a & member).sum() == 18 and (a & ~member).sum() == 32
    assert np.array_equal(a, stratified_half(member, 3)) and not np.array_equal(a, stratified_half(member, 4))


@pytest.mark.parametrize(
    "members, signal, delta, alpha", [(0.45, 1.2, 1e-5, 0.05), (0.25, 0.8, 0.01, 0.2), (0.25, 0.8, 0.05, 0.2)]
)
def test_split_bound_against_counting(members, signal, delta, alpha):
    """The threshold maximises the bound over every threshold of the selection half (counted
    directly, ``>=``); the counts, epsilon and every field are those of that threshold on the
    other half; the defaults are delta 1e-5, alpha 0.05 and seed 0. The last two cases are
    ones where the choice depends on the non-member count, the delta and a best bound below 1."""
    rng = np.random.default_rng(12)
    m = rng.random(801) < members
    s = np.round(rng.standard_normal(801) + signal * m, 1)  # ties with the threshold
    b = split_epsilon_lower_bound(s, m, delta=delta, alpha=alpha, seed=3)
    assert b == split_epsilon_lower_bound(s, m, delta=delta, alpha=alpha, seed=3)
    sel = stratified_half(m, 3)

    def counted(scores, member, t):
        guess = scores >= t
        return (
            int((guess & ~member).sum()),
            int((~member).sum()),
            int((~guess & member).sum()),
            int(member.sum()),
        )

    def bound(counts):
        return epsilon_lower_bound(*counts, delta=delta, alpha=alpha)

    values = [bound(counted(s[sel], m[sel], t)) for t in np.unique(s[sel])]
    assert bound(counted(s[sel], m[sel], b.threshold)) == max(values) > 0
    fp, n0, fn, p = counted(s[~sel], m[~sel], b.threshold)
    assert (b.fp, b.negatives, b.fn, b.positives) == (fp, n0, fn, p)
    assert b.epsilon == bound((fp, n0, fn, p)) > 0
    assert (b.delta, b.alpha, b.method) == (delta, alpha, "clopper-pearson, threshold from a held-out half")
    assert isinstance(b.threshold, float) and b.saturated is False
    default = split_epsilon_lower_bound(s, m)
    assert default == split_epsilon_lower_bound(s, m, delta=1e-5, alpha=0.05, seed=0)
    assert default != split_epsilon_lower_bound(s, m, delta=1e-5, alpha=0.05, seed=1)


def test_split_bound_saturates_only_without_errors_and_needs_two_of_each_class():
    m = np.arange(200) < 100
    one_sided = split_epsilon_lower_bound(np.where(m, 1.0, np.arange(200) % 2), m)  # fp > 0, fn = 0
    assert one_sided.fn == 0 and one_sided.fp > 0 and not one_sided.saturated
    nothing = split_epsilon_lower_bound(np.zeros(200), m)  # every threshold bounds 0: "nobody is IN"
    assert nothing.epsilon == 0.0 and nothing.threshold is None
    for member in (np.arange(10) < 1, np.arange(10) < 9):  # one member, one non-member
        with pytest.raises(ValueError, match="too few members or non-members to split"):
            split_epsilon_lower_bound(np.arange(10.0), member)


def test_one_run_bound():
    assert one_run_epsilon_lower_bound(1000, 100, 50) == 0.0
    # delta = 0: the bound is where P[Bin(r, q(eps)) >= v] crosses beta
    eps = one_run_epsilon_lower_bound(1000, 100, 90, delta=0.0, beta=0.05)
    q = math.exp(eps) / (1 + math.exp(eps))
    assert stats.binom.sf(89, 100, q) == pytest.approx(0.05, rel=1e-6)
    assert one_run_epsilon_lower_bound(1000, 100, 95) > eps  # more correct guesses, larger bound
    assert one_run_epsilon_lower_bound(1000, 100, 90, delta=1e-5) <= eps  # delta only weakens it
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(10, 20, 5)


def test_summarize_contents_and_resolution_warnings():
    rng = np.random.default_rng(0)
    m = rng.random(3000) < 0.5
    s = rng.normal(size=3000) + 0.5 * m
    with pytest.warns(UserWarning, match="unstable"):
        r = summarize(s, m, resamples=200)
    assert r.auc_ci[0] < r.auc < r.auc_ci[1]
    assert r.auc == pytest.approx(roc_auc_score(m, s))
    assert r.members == m.sum() and r.non_members == (~m).sum()
    assert 0.001 in r.unstable_levels and 0.1 not in r.unstable_levels
    for level, (lo, hi) in r.tpr_at_fpr_ci.items():
        assert lo <= hi and r.achieved_fpr[level] <= level
    assert r.advantage == pytest.approx(2 * r.balanced_accuracy - 1)
    j = r.to_json()
    assert set(j["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    with pytest.warns(UserWarning) as caught:
        summarize(s[:200], m[:200], fpr_levels=(0.001,), resamples=20)
    messages = " ".join(str(w.message) for w in caught)
    assert "below the resolution" in messages and "unstable" in messages


@pytest.mark.parametrize(
    "scores, member, message",
    [
        ([0.1, np.nan], [True, False], "NaN"),
        ([0.1, 0.2], [True, True], "non-members"),
        ([0.1, 0.2, 0.3], [True, False], "equal length"),
    ],
)
def test_bad_metric_input(scores, member, message):
    with pytest.raises(ValueError, match=message):
        summarize(scores, member)


@pytest.mark.parametrize(
    "counts",
    [(11, 10, 0, 10), (0, 10, 11, 10), (-1, 10, 0, 10), (0, 10, -1, 10), (0, 0, 0, 10), (0, 10, 0, 0)],
)
def test_count_bounds_refuse_impossible_counts(counts):
    """fp <= negatives, fn <= positives, none negative, both classes present: else an error
    naming the counts (the bounds of attacks.bounds use the same rule)."""
    from attacks.bounds import gdp_mu_lower_bound

    with pytest.raises(ValueError, match="invalid counts"):
        epsilon_lower_bound(*counts)
    with pytest.raises(ValueError, match="invalid counts"):
        gdp_mu_lower_bound(*counts)


def test_epsilon_lower_bound_defaults_are_delta_1e5_and_alpha_005():
    assert epsilon_lower_bound(3, 500, 40, 500) == epsilon_lower_bound(
        3, 500, 40, 500, delta=1e-5, alpha=0.05
    )
    assert epsilon_lower_bound(3, 500, 40, 500) != epsilon_lower_bound(3, 500, 40, 500, delta=1e-2)
